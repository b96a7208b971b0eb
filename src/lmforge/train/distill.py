"""`lmforge distill`: knowledge distillation of a teacher model into a student, on the one Trainer.

    lmforge distill --config configs/distill_tiny.yaml [--teacher DIR --beta 0 --alpha 0.5 --kd-temperature 1.5]

1. the models: the student, a preset (random weights, the teacher's vocabulary) or an HF model directory,
   trained whole; the teacher, any HF model directory with the same tokenizer (a TeacherError otherwise),
   frozen, in eval mode, run without gradients on every batch the student trains on
2. the data: pretraining shards (a directory from `lmforge prepare`: windows of seq_len tokens, every token
   trained, validated on the shards' own val split in bits per byte), or conversations (SFT data: the
   assistant's replies trained; a conversation up to its last reply is a prompt for on-policy batches)
3. each batch of conversations (GKD, Agarwal et al. 2024, algorithm 1): with probability lmbda, the
   student's own completions of the batch's prompts, sampled through the Engine with its current weights
   (on-policy: the student learns where its own samples lead it, not only where the data goes); else, with
   seq_kd, the teacher's completions (sequence-level KD, Kim & Rush 2016); else the data as it is. The draw
   of batch k of a process is seeded by (seed, rank, k), so a resumed run draws what the uninterrupted run
   drew, and samples the same completions from the same weights
4. the objective (objectives.distillation_loss), over the trained tokens:
       alpha * CE(labels) + (1 - alpha) * T² * JSD(β)(teacher ‖ student) at temperature T = kd_temperature
   β = 0 is the forward KL of Hinton et al. 2015 (with alpha and T, MiniMind's offline recipe), β = 1 the
   reverse KL of MiniLLM (Gu et al. 2024), in between GKD's generalised Jensen-Shannon divergence.
Names and defaults are those of TRL's GKDTrainer (lmbda 0.5, beta 0.5, temperature 0.9, the sampling
temperature, max_new_tokens 128, seq_kd false); T = 1 and alpha = 0 give its loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from lmforge.checkpoint import load_model, model_from, save_model
from lmforge.config import PRESETS
from lmforge.data.pretrain import MANIFEST, Manifest, PretrainLoader
from lmforge.data.sft import IGNORE_INDEX, SFTSample, collate, pad
from lmforge.infer.sampling import SamplingParams
from lmforge.settings import check_ranges
from lmforge.tokenizer import Tokenizer
from lmforge.train.environment import setup_env
from lmforge.train.objectives import distillation_loss
from lmforge.train.pretrain import LoaderBatches, validation_bytes_per_token
from lmforge.train.rollout import Sampler
from lmforge.train.sft import index_batches, read_samples, shift_labels
from lmforge.train.stage import EpochBatches, stage_main
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer, TrainResult

# The teacher computes in the precision the student trains in; it needs no fp32 master weights.
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-pure": torch.bfloat16,
                  "fp16": torch.float16}


class TeacherError(ValueError):
    """A teacher that cannot teach this student: another tokenizer or vocabulary. Names both directories."""


@dataclass
class DistillConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}

    model: str = field(default="tiny", metadata={
        "help": f"the student: a preset ({', '.join(PRESETS)}; random weights) or an HF model dir"})
    teacher: str | None = field(default=None, metadata={
        "help": "the teacher: an HF model dir with the student's tokenizer"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer dir (default: the student's dir, else the teacher's)"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "a directory of shards from `lmforge prepare`, or conversation files (jsonl, parquet, globs)"})
    val_data: list[str] = field(default_factory=list, metadata={
        "help": "held-out conversation files (shards are validated on their own val split)"})
    format: str = field(default="auto", metadata={"help": "conversations: auto | messages | sharegpt | ..."})
    loss_on: Literal["all", "last"] = field(default="all", metadata={
        "help": "conversations: train on every assistant reply, or only the last"})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad records instead of stopping"})
    max_len: int = field(default=1024, metadata={"help": "conversations: tokens per sample (longer are cut)",
                                                 "min": 2})
    seq_len: int = field(default=256, metadata={"help": "shards: tokens per training sequence", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch per process", "min": 1})
    eval_batches: int = field(default=20, metadata={"help": "shards: validation batches per evaluation (0 = all)",
                                                    "min": 0})
    alpha: float = field(default=0.0, metadata={
        "help": "weight of the cross-entropy on the labels; 1 - alpha weighs the divergence", "min": 0, "max": 1})
    beta: float = field(default=0.5, metadata={
        "help": "generalised JSD: 0 = forward KL(teacher || student), 1 = reverse KL", "min": 0, "max": 1})
    kd_temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature T of both models in the divergence (scaled by T²)", "min": 0.01})
    lmbda: float = field(default=0.5, metadata={
        "help": "conversations: the fraction of batches the student completes itself (on-policy)", "min": 0,
        "max": 1})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature of generated completions",
                                                      "min": 0})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per generated completion", "min": 1})
    seq_kd: bool = field(default=False, metadata={
        "help": "conversations: batches not on-policy are the teacher's completions (sequence-level KD)"})
    chunk_size: int = field(default=1024, metadata={
        "help": "tokens per chunk of both models' output layers + the loss (7 to 11 fp32 [chunk, vocab] arrays)",
        "min": 1})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_dir="runs/distill", steps=500, eval_every=100, save_every=250,
        optim=OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.1, min_lr_ratio=0.1)))

    @property
    def generates(self) -> bool:
        return self.lmbda > 0 or self.seq_kd

    def validate(self, shards: bool, distributed: bool) -> None:
        if not self.teacher:
            raise ValueError("teacher: give the teacher's model directory")
        if shards and self.generates:
            raise ValueError(f"lmbda: {self.lmbda} (seq_kd: {self.seq_kd}) generates completions of conversation "
                             "prompts, and text shards have none: set lmbda 0 (and seq_kd false), or give "
                             "conversations")
        if self.alpha > 0 and self.lmbda > 0:
            raise ValueError(f"alpha: {self.alpha} with lmbda {self.lmbda} would train the student by "
                             "cross-entropy on its own samples; on-policy distillation learns from the teacher "
                             "alone: set alpha 0")
        if self.generates and self.train.distributed == "fsdp" and distributed:
            raise ValueError("train.distributed: generating needs the whole student on each process, which fsdp "
                             "shards; use ddp with lmbda > 0 or seq_kd")


# -- the teacher ---------------------------------------------------------------------------------------------

def load_teacher(teacher_dir: str, tokenizer: Tokenizer, tokenizer_dir: str, device: torch.device,
                 precision: str) -> torch.nn.Module:
    """The teacher, frozen and in eval mode, after checking that it reads text as the student does: the same
    tokenizer (its vocabulary and rules, by hash)."""
    if Tokenizer.from_dir(teacher_dir).sha256() != tokenizer.sha256():
        raise TeacherError(f"teacher: {teacher_dir} has another tokenizer than the student's ({tokenizer_dir}); "
                           "distillation compares the two models' next-token distributions token by token")
    teacher = load_model(teacher_dir, dtype=TEACHER_DTYPES[precision], device=device)
    return teacher.eval().requires_grad_(False)


def build_student(cfg: DistillConfig, teacher: torch.nn.Module, tokenizer: Tokenizer, device: torch.device):
    """A preset gets the teacher's vocabulary (the logits the loss compares have one width); a model dir must
    already have it."""
    vocab_size = teacher.config.vocab_size
    student = model_from(cfg.model, device=device, seed=cfg.train.seed, vocab_size=vocab_size,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if student.config.vocab_size != vocab_size:
        raise TeacherError(f"teacher: {cfg.teacher} has {vocab_size} token embeddings, the student {cfg.model} "
                           f"{student.config.vocab_size}; both need the same vocabulary")
    return student


# -- text shards ---------------------------------------------------------------------------------------------

def shards_dir(data: list[str]) -> Path | None:
    """The directory of pretraining shards that `data` names, or None for conversation files."""
    directories = [Path(d) for d in data if Path(d).is_dir()]
    if not directories:
        return None
    if len(data) > 1 or not (directories[0] / MANIFEST).is_file():
        raise ValueError(f"data: {directories[0]} is a directory: give one directory of shards from `lmforge "
                         "prepare` (with its manifest.json), or conversation files")
    return directories[0]


def text_data(cfg: DistillConfig, shards: Path, tokenizer: Tokenizer, env):
    """(training batches, validation batches, UTF-8 bytes per validation token) of the shards, read as
    `lmforge pretrain` reads them, so that bits per byte compare with a pretraining run's."""
    train = PretrainLoader(shards, "train", cfg.batch_size, cfg.seq_len, True, cfg.train.seed, env.rank,
                           env.world_size)

    def val_data():
        loader = PretrainLoader(shards, "val", cfg.batch_size, cfg.seq_len, False, 0, env.rank, env.world_size)
        count = len(loader) if cfg.eval_batches <= 0 else min(cfg.eval_batches, len(loader))
        return ({"input_ids": x, "labels": y} for x, y in islice(loader, count))

    return LoaderBatches(train), val_data, validation_bytes_per_token(val_data(), tokenizer)


# -- conversations, and completions generated through the Engine ---------------------------------------------

def prompt_length(sample: SFTSample) -> int:
    """Where the conversation's last reply begins (labels aligned with input_ids): its prompt is every token
    before, the tokens that open the assistant's turn included."""
    start = max(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    while start > 0 and sample.labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Each prompt followed by its completion, right-padded; labels (shifted: position t's is token t + 1) on
    the completion's tokens only, its end token included when one ended it (as TRL's GKD masks them)."""
    rows = [prompt + completion for prompt, completion in zip(prompts, completions)]
    labels = [[IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX]
              for prompt, completion in zip(prompts, completions)]
    return {"input_ids": pad(rows, pad_id), "labels": pad(labels, IGNORE_INDEX)}


class DistillBatches:
    """The Trainer's resumable stream of conversation batches (module docstring, step 3): the samples of
    each epoch in a seeded order, every batch as it is, or the student's or the teacher's completions of
    its prompts. The state is the epoch position and the number of batches drawn."""

    def __init__(self, samples: list[SFTSample], cfg: DistillConfig, pad_id: int, env, student: Sampler,
                 teacher: Sampler):
        self.samples, self.cfg, self.pad_id, self.rank = samples, cfg, pad_id, env.rank
        self.prompt_lengths = [prompt_length(s) for s in samples]
        if cfg.generates and min(self.prompt_lengths) == 0:
            raise ValueError("data: a conversation that begins with its reply has no prompt to complete")
        self.student, self.teacher = student, teacher

        self.epochs = EpochBatches(index_batches(len(samples), cfg.batch_size, cfg.train.seed, True, env.rank,
                                                 env.world_size, lambda indices: indices))
        self.drawn = 0

    def __next__(self) -> dict[str, torch.Tensor]:
        indices = next(self.epochs)
        draw = np.random.default_rng([self.cfg.train.seed, self.rank, self.drawn])
        self.drawn += 1
        on_policy = draw.random() < self.cfg.lmbda
        if not (on_policy or self.cfg.seq_kd):
            batch = shift_labels(collate([self.samples[i] for i in indices], self.pad_id))
        else:
            prompts = [self.samples[i].input_ids[:self.prompt_lengths[i]] for i in indices]
            sampler = self.student if on_policy else self.teacher
            seed = int(draw.integers(2**31))  # prompt i samples with seed + i, whatever else is batched with it
            outputs = sampler(prompts, [seed + i for i in range(len(prompts))])
            batch = completion_batch(prompts, [o.token_ids for o in outputs], self.pad_id)
        return {**batch, "on_policy": torch.tensor(float(on_policy))}

    def state_dict(self) -> dict:
        return {**self.epochs.state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.epochs.load_state_dict(state)
        self.drawn = state["drawn"]


def conversation_data(cfg: DistillConfig, tokenizer: Tokenizer, env, student, teacher):
    """(training batches, validation batches or None) of the conversation files."""
    samples = read_samples(cfg.data, cfg, tokenizer, "data")
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    context = cfg.max_len + cfg.max_new_tokens
    train = DistillBatches(samples, cfg, tokenizer.pad_id, env,
                           Sampler(student, tokenizer, params, cfg.batch_size, context),
                           Sampler(teacher, tokenizer, params, cfg.batch_size, context))
    if not cfg.val_data:
        return train, None
    val_samples = read_samples(cfg.val_data, cfg, tokenizer, "val_data")

    def val_data():
        mine = val_samples[env.rank::env.world_size]
        return (shift_labels(collate(mine[i:i + cfg.batch_size], tokenizer.pad_id))
                for i in range(0, len(mine), cfg.batch_size))

    return train, val_data


# -- the stage -----------------------------------------------------------------------------------------------

def run(cfg: DistillConfig) -> TrainResult:
    check_ranges(cfg)
    if not cfg.data:
        raise ValueError("data: give a directory of shards or conversation files")
    shards = shards_dir(cfg.data)
    env = setup_env(cfg.train.device)
    cfg.validate(shards is not None, env.distributed)
    tokenizer_dir = cfg.tokenizer or (cfg.model if Path(cfg.model).is_dir() else cfg.teacher)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    teacher = load_teacher(cfg.teacher, tokenizer, tokenizer_dir, env.device, cfg.train.precision)
    if shards is not None and Manifest.load(shards).tokenizer_sha256 != tokenizer.sha256():
        raise TeacherError(f"data: the shards in {shards} were made with another tokenizer than the teacher's "
                           f"({cfg.teacher})")
    student = build_student(cfg, teacher, tokenizer, env.device)
    bytes_per_token = None
    if shards is not None:
        train, val_data, bytes_per_token = text_data(cfg, shards, tokenizer, env)
    else:
        train, val_data = conversation_data(cfg, tokenizer, env, student, teacher)

    def loss_fn(model, batch):
        loss, metrics = distillation_loss(model, teacher, batch, cfg.alpha, cfg.beta, cfg.kd_temperature,
                                          cfg.chunk_size)
        if "on_policy" in batch:  # the share of the step's tokens the student sampled itself
            metrics["on_policy"] = batch["on_policy"]
        return loss, metrics

    trainer = Trainer(cfg.train, student, loss_fn, train, val_data=val_data, bytes_per_token=bytes_per_token,
                      save_weights=lambda m, path: save_model(m, path, tokenizer_dir=tokenizer_dir),
                      log_config={k: v for k, v in asdict(cfg).items() if k != "train"})
    return trainer.fit()


main = stage_main(DistillConfig, run, "lmforge distill",
                  "Knowledge distillation: offline (forward KL at a temperature, mixed with cross-entropy; "
                  "generalised JSD) or on-policy (GKD: the student samples, the teacher scores).")
