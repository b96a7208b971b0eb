"""`lmforge sft`: supervised fine-tuning on conversations, with the loss on the assistant's tokens only.

    lmforge sft --config configs/sft_tiny.yaml [--method lora --lora.r 16 --lora.target-modules all-linear]

1. the model: an HF model dir (usually a pretraining checkpoint), and its tokenizer with a chat template
2. what is trained (`method`):
      full    every weight
      lora    low-rank adapters on `lora.target_modules` (Hu et al. 2021); checkpoints are PEFT adapter dirs
      dora    LoRA with a learned magnitude per row (Liu et al. 2024); the same format, use_dora=true
      freeze  only the blocks in `freeze.layers` (negative = from the end) and the modules in `freeze.modules`
   `--quant nf4` (QLoRA, lora/dora only): the frozen base's linear layers in the blocks are held as 4-bit
   NormalFloat (model/nf4.py) and dequantised on the fly; the adapter applies to the unquantised base
3. the data: conversations (OpenAI messages, ShareGPT, Alpaca, MiniMind ...) rendered with the chat
   template; labels only on assistant replies; padded or packed rows; a new seeded order every epoch
4. the objective: chunked cross-entropy on the labelled tokens. The Trainer does the rest.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

import torch

from lmforge.checkpoint import load_model, model_from, save_model
from lmforge.data.sft import IGNORE_INDEX, SFTDataset, SFTSample, pack, sft_batches
from lmforge.model.lora import LoraConfig, apply_lora, save_adapter
from lmforge.model.nf4 import NF4Linear, quantize_linears_nf4
from lmforge.settings import OptionError, check_ranges
from lmforge.tokenizer import Tokenizer
from lmforge.train.environment import setup_env
from lmforge.train.objectives import DEFAULT_CHUNK, causal_lm_loss
from lmforge.train.stage import EpochBatches, TrainingSet, dropout_option, set_dropout, stage_main
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer, TrainResult


@dataclass
class FreezeConfig:
    layers: list[int] = field(default_factory=lambda: [-1], metadata={
        "help": "method freeze: indices of the blocks to train (negative counts from the end)"})
    modules: list[str] = field(default_factory=list, metadata={
        "help": "method freeze: other modules to train too, e.g. model.norm lm_head model.embed_tokens"})


@dataclass
class SFTConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}  # `--resume auto` (settings.py)

    model: str = field(default="runs/pretrain/final", metadata={
        "help": "the HF model dir to fine-tune (a preset name starts from random weights)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer dir (default: the model dir)"})
    data: list[str] = field(default_factory=list, metadata={"help": "conversation files (jsonl, parquet, globs)"})
    val_data: list[str] = field(default_factory=list, metadata={"help": "validation conversation files"})
    format: str = field(default="auto", metadata={"help": "auto | messages | sharegpt | alpaca | minimind ..."})
    skip_bad: bool = field(default=False, metadata={
        "help": "skip and count bad records (malformed JSON, missing fields, unknown roles, ...) instead of stopping"})
    loss_on: Literal["all", "last"] = field(default="all", metadata={
        "help": "train on every assistant reply, or only the last of each conversation"})
    max_len: int = field(default=1024, metadata={"help": "tokens per sample (longer samples are cut)", "min": 2})
    batch_size: int = field(default=8, metadata={"help": "samples (or packed rows) per micro-batch per process",
                                                                 "min": 1})
    packed: bool = field(default=False, metadata={"help": "pack several samples per row of max_len tokens"})
    method: Literal["full", "lora", "dora", "freeze"] = field(default="full", metadata={"help": "what is trained"})
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: Literal["none", "nf4"] = field(default="none", metadata={
        "help": "lora/dora: hold the frozen base's block linears in 4-bit NF4 (QLoRA), dequantised on the fly"})
    double_quant: bool = field(default=False, metadata={
        "help": "quant nf4: quantise the blocks' scales too (int8 per 256: 4.13 bits a weight, not 4.5)"})
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    merge: bool = field(default=False, metadata={"help": "lora/dora: also write RUN_DIR/merged, the merged model"})
    chunk_size: int = field(default=DEFAULT_CHUNK, metadata={"help": "tokens per chunk of the output layer + loss",
                                                                        "min": 1})
    dropout: float | None = dropout_option("dropout")
    embedding_dropout: float | None = dropout_option("embedding_dropout")
    attention_dropout: float | None = dropout_option("attention_dropout")
    residual_dropout: float | None = dropout_option("residual_dropout")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_dir="runs/sft", steps=500, eval_every=100, save_every=250,
        optim=OptimConfig(lr=5e-5, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.1)))


def shift_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SFT readers align labels with input_ids (Hugging Face style); the loss wants position t's target."""
    labels = batch["labels"]
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return {**batch, "labels": shifted}


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int) -> list[int]:
    """This process's samples of an epoch, in order: a seeded shuffle per epoch (or none), every
    world_size-th sample from the rank-th, so the processes share the epoch without overlap."""
    order = list(range(count))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[rank::world_size]


def index_batches(count: int, batch_size: int, seed: int, shuffle: bool, rank: int, world_size: int,
                  collate: Callable[[list[int]], object]):
    """make_batches(epoch) for EpochBatches over samples that batch alike in size: this process's samples of
    the epoch (epoch_order), batch_size at a time, each batch `collate(indices)`."""
    def make(epoch: int):
        mine = epoch_order(count, seed, epoch, shuffle, rank, world_size)
        for start in range(0, len(mine), batch_size):
            yield collate(mine[start:start + batch_size])
    return make


def epoch_batches(samples: list[SFTSample], cfg: SFTConfig, pad_id: int, rank: int, world_size: int,
                  shuffle: bool):
    """make_batches(epoch) for EpochBatches: this process's samples of the epoch (epoch_order), batched."""
    def make(epoch: int):
        mine = [samples[i] for i in epoch_order(len(samples), cfg.train.seed, epoch, shuffle, rank, world_size)]
        for batch in sft_batches(mine, cfg.batch_size, pad_id, cfg.packed, cfg.max_len):
            yield shift_labels(batch)
    return make


def freeze_except(model: torch.nn.Module, layers: list[int], modules: list[str]) -> list[str]:
    """Freeze every parameter but those of the chosen blocks and modules; returns the trained names."""
    count = len(model.model.layers)
    for index in layers:
        if not -count <= index < count:
            raise ValueError(f"freeze.layers: {index} is not a block of this {count}-block model")
    prefixes = [f"model.layers.{index % count}." for index in layers] + [m.rstrip(".") + "." for m in modules]
    named = dict(model.named_modules())
    for m in modules:
        if m not in named:
            raise ValueError(f"freeze.modules: the model has no module '{m}'")
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(prefix) for prefix in prefixes))
        if p.requires_grad:
            trained.append(name)
    return trained


def build(cfg: SFTConfig, tokenizer: Tokenizer, device: torch.device):
    quant = getattr(cfg, "quant", "none")  # build is shared with stages that have no quant option
    if quant != "none" and cfg.method not in ("lora", "dora"):
        raise OptionError(f"quant: {quant} needs method lora or dora (a 4-bit base is frozen), not {cfg.method}")
    if getattr(cfg, "double_quant", False) and quant == "none":
        raise OptionError("double_quant: needs quant nf4")
    if quant == "nf4" and Path(cfg.model).is_dir():  # each block linear read, quantised and dropped in turn
        model = load_model(cfg.model, device=device,
                           linear_hook=lambda linear: NF4Linear(linear, double_quant=cfg.double_quant))
        return adapt(model, cfg)
    model = model_from(cfg.model, device=device, seed=cfg.train.seed, vocab_size=tokenizer.vocab_size,
                       eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if quant == "nf4":
        quantize_linears_nf4(model, double_quant=cfg.double_quant)
    return adapt(model, cfg)


def adapt(model, cfg: SFTConfig):
    """The method's trainable parts on the built model: LoRA/DoRA adapters, or the layers left unfrozen."""
    if cfg.method in ("lora", "dora"):
        apply_lora(model, replace(cfg.lora, use_dora=cfg.method == "dora" or cfg.lora.use_dora))
    elif cfg.method == "freeze":
        freeze_except(model, cfg.freeze.layers, cfg.freeze.modules)
    return model


def read_samples(files: list[str], cfg: SFTConfig, tokenizer: Tokenizer, what: str) -> list[SFTSample]:
    return all_samples(SFTDataset(files, tokenizer, cfg.max_len, cfg.format, cfg.loss_on, cfg.skip_bad), what,
                       cfg.train.device)


def all_samples(dataset, what: str, device: str) -> list:
    """Every sample of a dataset of conversations (SFTDataset, data/vlm.ImageChatDataset): none is an error
    naming the files (`what`: the option that named them), skipped bad records are reported."""
    samples = list(dataset)
    if not samples:
        raise ValueError(f"{what}: no trainable conversation in {dataset.files} ({dataset.stats.summary()})")
    if dataset.stats.skipped and setup_env(device).is_main:
        print(f"{what}: skipped bad input: {dataset.stats.summary()}")
    return samples


def training_set(samples: list[SFTSample], cfg: SFTConfig, world_size: int) -> TrainingSet:
    """The conversations' tokens and what a step takes of them: one epoch is each process's share in rows
    (samples, or packed rows of max_len), batch_size rows a micro-batch, grad_accum micro-batches a step."""
    rows = sum(1 for _ in pack(samples, cfg.max_len)) if cfg.packed else len(samples)
    steps_per_epoch = math.ceil(rows / world_size / cfg.batch_size) / cfg.train.grad_accum
    tokens = sum(len(sample.input_ids) for sample in samples)
    return TrainingSet(", ".join(cfg.data), tokens, tokens / steps_per_epoch)


def weights_saver(adapters: bool, base_dir: str | None, tokenizer_dir: str):
    """How a fine-tuning run's checkpoints hold its weights: a PEFT adapter directory (pointing at the base
    model directory), or a whole model directory with the tokenizer."""
    if adapters:
        return lambda model, path: save_adapter(model, path, base_model_path=base_dir)
    return lambda model, path: save_model(model, path, tokenizer_dir=tokenizer_dir)


def run(cfg: SFTConfig) -> TrainResult:
    check_ranges(cfg)
    if not cfg.data:
        raise ValueError("data: give one or more conversation files")
    if cfg.merge and not (cfg.method in ("lora", "dora") and Path(cfg.model).is_dir()):
        raise ValueError("merge: needs method lora or dora and a base model directory")
    env = setup_env(cfg.train.device)
    tokenizer_dir = cfg.tokenizer or cfg.model
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    model = build(cfg, tokenizer, env.device)  # build is shared with the preference and RL stages: not set_dropout
    set_dropout(model, cfg)
    adapters = cfg.method in ("lora", "dora")
    base_dir = cfg.model if Path(cfg.model).is_dir() else None
    samples = read_samples(cfg.data, cfg, tokenizer, "data")
    train = EpochBatches(epoch_batches(samples, cfg, tokenizer.pad_id, env.rank, env.world_size, shuffle=True))
    val_data = None
    if cfg.val_data:
        val_samples = read_samples(cfg.val_data, cfg, tokenizer, "val_data")
        val_data = lambda: epoch_batches(val_samples, cfg, tokenizer.pad_id, env.rank, env.world_size, False)(0)
    trainer = Trainer(cfg.train, model, lambda m, batch: causal_lm_loss(m, batch, cfg.chunk_size), train,
                      val_data=val_data, save_weights=weights_saver(adapters, base_dir, tokenizer_dir),
                      log_config={k: v for k, v in asdict(cfg).items() if k != "train"},
                      training_set=training_set(samples, cfg, env.world_size))
    result = trainer.fit()
    if cfg.merge and env.is_main:
        from lmforge.merge import merge

        merge(base_dir, result.model_dir, Path(cfg.train.run_dir) / "merged")
    return result


main = stage_main(SFTConfig, run, "lmforge sft",
                  "Supervised fine-tuning: full, LoRA, DoRA or chosen layers; loss on replies only.")
