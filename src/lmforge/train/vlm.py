"""`lmforge vlm`: LLaVA's two training stages (Liu et al. 2023, "Visual Instruction Tuning", sec. 4.2).

    lmforge vlm --stage align --model tiny-llava --tokenizer DIR --data runs/shapes/llava_captions.jsonl
    lmforge vlm --stage sft --model runs/vlm-align/final --data runs/shapes/llava_train.jsonl [--method lora]

1. the model (`model`): a llava model directory (vision/checkpoint.py), or a preset (`tiny-llava`,
   `small-llava`): its vision tower and projector freshly initialised, its language model the one in
   `text_model` (an lmforge/HF text model directory, its vocabulary grown by `<image>` if it lacks it) or
   the preset's, fresh. The tokenizer gets `<image>` (RUN_DIR/tokenizer) when it lacks it.
2. what is trained (`stage`):
      align   projector alignment ("pre-training for feature alignment"): only `multi_modal_projector`, on
              image-caption pairs; the vision tower and the language model frozen
      sft     visual instruction tuning: the projector and the language model (`method` full, lora on its
              blocks' linears, or freeze: only `freeze.layers`/`freeze.modules` of it), the vision tower too
              with `train_vision_tower`
3. the data: image chats (data/vlm.py: OpenAI image_url parts or LLaVA's <image> + image), labels on the
   assistant's replies only, never on image tokens; a new seeded order every epoch
4. the objective: the chunked cross-entropy of causal_lm_loss, through Llava.forward with the pixel values.
Checkpoints are llava model directories (save_llava; a LoRA run's with the adapters merged), which
transformers' LlavaForConditionalGeneration loads; resume, logging and processes as every stage (the Trainer).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.distributed as dist

from lmforge.checkpoint import load_model
from lmforge.data.vlm import ImageChatDataset, ImageSample, collate_images
from lmforge.model.llava import LLAVA_PRESETS, Llava, LlavaConfig, build_llava, llava_preset
from lmforge.model.lora import LoraConfig, apply_lora, lora_modules, merge_lora
from lmforge.model.vision import VisionConfig
from lmforge.settings import OptionError, check_ranges
from lmforge.tokenizer import Tokenizer
from lmforge.train.environment import setup_env
from lmforge.train.objectives import DEFAULT_CHUNK, causal_lm_loss
from lmforge.train.sft import FreezeConfig, all_samples, freeze_except, index_batches, shift_labels
from lmforge.train.stage import EpochBatches, TrainingSet, stage_main
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer, TrainResult
from lmforge.vision.checkpoint import IMAGE_TOKEN, add_image_token, load_llava, save_llava


@dataclass
class VLMConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}

    stage: Literal["align", "sft"] = field(default="align", metadata={
        "help": "align: train only the projector (on captions); sft: visual instruction tuning"})
    model: str = field(default="tiny-llava", metadata={
        "help": f"a llava model dir, or a preset ({', '.join(LLAVA_PRESETS)}) with a fresh vision tower"})
    text_model: str | None = field(default=None, metadata={
        "help": "preset only: a text model dir for the language model (default: the preset's, fresh)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer dir (default: the model dir, or text_model); <image> is added if it lacks it"})
    data: list[str] = field(default_factory=list, metadata={"help": "image chat files (jsonl, parquet, globs)"})
    val_data: list[str] = field(default_factory=list, metadata={"help": "validation image chat files"})
    skip_bad: bool = field(default=False, metadata={
        "help": "skip and count bad records (malformed JSON, a missing image, placeholders that do not match the "
                "images, ...) instead of stopping"})
    max_len: int = field(default=512, metadata={"help": "tokens per sample, image tokens included (longer samples "
                                                        "are cut; one cut inside an image is dropped)", "min": 2})
    batch_size: int = field(default=16, metadata={"help": "samples per micro-batch per process", "min": 1})
    method: Literal["full", "lora", "freeze"] = field(default="full", metadata={
        "help": "sft: what of the language model is trained (the projector always is)"})
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    train_vision_tower: bool = field(default=False, metadata={"help": "sft: train the vision tower too"})
    chunk_size: int = field(default=DEFAULT_CHUNK, metadata={"help": "tokens per chunk of the output layer + loss",
                                                                        "min": 1})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_dir="runs/vlm", steps=500, eval_every=100, save_every=250,
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.1)))


def image_tokenizer(source: str, run_dir: Path) -> str:
    """A tokenizer directory with `<image>`: `source` itself, or a copy in RUN_DIR/tokenizer with it added
    (written by the main process while the others wait)."""
    if Tokenizer.from_dir(source).token_to_id(IMAGE_TOKEN) is not None:
        return source
    out = run_dir / "tokenizer"
    if not dist.is_initialized() or dist.get_rank() == 0:
        add_image_token(source, out)
    if dist.is_initialized():
        dist.barrier()
    return str(out)


def with_text_model(text_dir: str, vision: VisionConfig, tokenizer: Tokenizer, seed: int) -> Llava:
    """A llava model around a text model directory's weights; the embedding and output rows of tokens the text
    model lacks (`<image>`) keep their fresh initialisation."""
    text = load_model(text_dir)
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    text_cfg = copy.copy(text.config)
    text_cfg.vocab_size = max(text_cfg.vocab_size, image_id + 1)
    model = build_llava(LlavaConfig(text=text_cfg, vision=vision, image_token_index=image_id), seed=seed)
    target = model.language_model.state_dict()
    with torch.no_grad():
        for name, tensor in text.state_dict().items():
            target[name][:tensor.shape[0]].copy_(tensor)  # rows: the vocabulary may have grown
    return model


def build(cfg: VLMConfig, tokenizer: Tokenizer, device: torch.device) -> Llava:
    """The model with only what `stage` and `method` train left trainable."""
    if Path(cfg.model).is_dir():
        if cfg.text_model:
            raise OptionError("text_model: only with a preset model (a llava directory has its language model)")
        model = load_llava(cfg.model, device=device)
    elif cfg.model in LLAVA_PRESETS:
        if cfg.text_model:
            model = with_text_model(cfg.text_model, VisionConfig(**LLAVA_PRESETS[cfg.model]["vision"]), tokenizer,
                                    cfg.train.seed)
        else:
            model = build_llava(llava_preset(cfg.model, tokenizer.token_to_id(IMAGE_TOKEN),
                                             vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id,
                                             pad_token_id=tokenizer.pad_id), seed=cfg.train.seed)
    else:
        raise FileNotFoundError(f"model: '{cfg.model}' is neither a llava model directory nor a preset "
                                f"({', '.join(LLAVA_PRESETS)})")
    for p in model.parameters():
        p.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(True)
    if cfg.stage == "sft":
        if cfg.method == "full":
            model.language_model.requires_grad_(True)
        elif cfg.method == "lora":
            apply_lora(model.language_model, cfg.lora)
        else:
            freeze_except(model.language_model, cfg.freeze.layers, cfg.freeze.modules)
        model.vision_tower.requires_grad_(cfg.train_vision_tower)
    return model


def save_weights(tokenizer_dir: str):
    """A checkpoint's weights as a llava model directory; LoRA adapters merged into a copy first (the
    training model keeps them)."""
    def save(model: Llava, path: Path):
        if lora_modules(model):
            model = copy.deepcopy(model)
            merge_lora(model.language_model)
        return save_llava(model, path, tokenizer_dir=tokenizer_dir)
    return save


def read_samples(files: list[str], cfg: VLMConfig, tokenizer: Tokenizer, model: Llava, what: str
                 ) -> list[ImageSample]:
    mc = model.config
    return all_samples(ImageChatDataset(files, tokenizer, mc.image_token_index, mc.image_seq_length,
                                        mc.vision.image_size, cfg.max_len, cfg.skip_bad), what, cfg.train.device)


def run(cfg: VLMConfig) -> TrainResult:
    check_ranges(cfg)
    if not cfg.data:
        raise ValueError("data: give one or more image chat files")
    if cfg.stage == "align" and (cfg.method != "full" or cfg.train_vision_tower):
        raise OptionError("method and train_vision_tower: stage align trains only the projector (use stage sft)")
    env = setup_env(cfg.train.device)
    source = cfg.tokenizer or (cfg.model if Path(cfg.model).is_dir() else cfg.text_model)
    if source is None:
        raise OptionError(f"tokenizer: a preset ({cfg.model}) without text_model needs a tokenizer dir")
    tokenizer_dir = image_tokenizer(source, Path(cfg.train.run_dir))
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    model = build(cfg, tokenizer, env.device)
    image_size = model.config.vision.image_size

    def batches(samples: list[ImageSample], shuffle: bool):
        collate = lambda indices: shift_labels(collate_images([samples[i] for i in indices], tokenizer.pad_id,
                                                              image_size))
        return index_batches(len(samples), cfg.batch_size, cfg.train.seed, shuffle, env.rank, env.world_size,
                             collate)

    samples = read_samples(cfg.data, cfg, tokenizer, model, "data")
    val_data = None
    if cfg.val_data:
        val_samples = read_samples(cfg.val_data, cfg, tokenizer, model, "val_data")
        val_data = lambda: batches(val_samples, False)(0)
    tokens = sum(len(s.input_ids) for s in samples)
    steps_per_epoch = -(-len(samples) // (env.world_size * cfg.batch_size)) / cfg.train.grad_accum
    trainer = Trainer(cfg.train, model, lambda m, batch: causal_lm_loss(m, batch, cfg.chunk_size),
                      EpochBatches(batches(samples, True)), val_data=val_data, save_weights=save_weights(tokenizer_dir),
                      log_config={k: v for k, v in asdict(cfg).items() if k != "train"},
                      training_set=TrainingSet(", ".join(cfg.data), tokens, tokens / steps_per_epoch))
    return trainer.fit()


main = stage_main(VLMConfig, run, "lmforge vlm",
                  "Train a LLaVA model: projector alignment on captions (--stage align), then visual instruction "
                  "tuning (--stage sft: full, LoRA or chosen layers; the vision tower optionally).")
