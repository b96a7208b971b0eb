"""What every training stage shares around the one Trainer: its command's `main` (stage_main), resumable
epochs of in-memory data (EpochBatches), the dropout options of the stages that build a model (pretrain, sft),
and the warning when a run would go over its training set more than once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import nn

from lmforge.settings import OptionError, parse_args


@dataclass
class TrainingSet:
    """A stage's training data, for the warning when a run would go over it more than once."""

    name: str  # as the user named it: runs/data, runs/sft/train.jsonl
    tokens: int  # tokens of one pass over it
    tokens_per_step: float  # tokens an optimizer step takes from it (all processes; a mean where batches vary)


def repeat_warning(steps: int, data: TrainingSet, keep_best: bool, minutes: float | None = None) -> str | None:
    """The warning for `steps` optimizer steps (fitted to a budget of `minutes`) that go over `data` more than
    once, or None."""
    epochs = steps * data.tokens_per_step / max(data.tokens, 1)
    if epochs <= 1:
        return None
    fitted = f" (fitted to {minutes:g} minutes)" if minutes else ""
    advice = ("final is the step with the best validation loss (train.keep_best)" if keep_best else
              "expect overfitting: see --train.keep-best")
    return (f"{steps} steps{fitted} x {data.tokens_per_step:,.0f} tokens = {epochs:.1f} epochs of {data.name}'s "
            f"{_count(data.tokens)} training tokens; {advice}")


def _count(n: int) -> str:
    """1234 -> 1.2k, 250_000 -> 250k, 3_400_000 -> 3.4M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{1 if n < 10 * size else 0}f}{unit}"
    return str(n)


# A stage's dropout options: the ModelConfig (config.json) field each sets, and its help. `dropout` sets all three.
DROPOUT_OPTIONS = {
    "embedding_dropout": ("embd_pdrop", "on the token embeddings (config.json: embd_pdrop)"),
    "attention_dropout": ("attention_dropout", "on the attention probabilities (config.json: attention_dropout)"),
    "residual_dropout": ("resid_pdrop", "on each attention and MLP output, before the residual add "
                                        "(config.json: resid_pdrop)"),
}


def dropout_option(option: str):
    """The dataclass field of a stage's dropout option (`dropout` or a key of DROPOUT_OPTIONS): a probability
    in training, or null for the model's own (0 for a preset, its config.json's for a directory)."""
    kind = DROPOUT_OPTIONS[option][1] + "; overrides dropout" if option in DROPOUT_OPTIONS else \
        "dropout in training on the embeddings, the attention probabilities and the residual branches alike " \
        "(null: the model's own rates, 0 for a preset)"
    return field(default=None, metadata={"help": kind, "min": 0})


def set_dropout(model: nn.Module, options: Any) -> None:
    """Put a stage's dropout options into the model's config, which the model reads at every forward in
    training mode and checkpoints write to config.json (so a later stage from them keeps the rates unless its
    own options say otherwise). Raises OptionError naming the option for a rate of 1 or more."""
    for option, (name, _) in DROPOUT_OPTIONS.items():
        chosen = option if getattr(options, option) is not None else "dropout"
        value = getattr(options, chosen)
        if value is None:
            continue
        if not 0 <= value < 1:
            raise OptionError(f"{chosen}: {value} is not a dropout probability (from 0, below 1)")
        setattr(model.config, name, float(value))


def stage_main(config_cls: type, run: Callable[[Any], Any], prog: str, description: str):
    """The `main(argv)` of a training stage: parse its config (YAML + dotted flags), run it, and leave the
    process group that torchrun made, so every stage behaves the same on the command line."""
    def main(argv: list[str] | None = None) -> int:
        cfg = parse_args(config_cls, argv, prog=prog, description=description)
        try:
            run(cfg)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0
    return main


class EpochBatches:
    """Resumable Batches from `make_batches(epoch)`, a function that deterministically yields one epoch's
    batches (e.g. a seeded shuffle of a tokenized data set). The state is (epoch, batches taken);
    resuming replays that epoch's generator up to the position, which is cheap for in-memory data."""

    def __init__(self, make_batches: Callable[[int], Iterator[dict]]):
        self.make_batches = make_batches
        self.epoch, self.taken = 0, 0
        self.current = make_batches(0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        for _ in range(2):
            try:
                batch = next(self.current)
                self.taken += 1
                return batch
            except StopIteration:
                self.epoch, self.taken = self.epoch + 1, 0
                self.current = self.make_batches(self.epoch)
        raise ValueError("the training data yields no batch")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.taken = state["epoch"], 0
        self.current = self.make_batches(self.epoch)
        for _ in range(state["taken"]):
            next(self.current)
            self.taken += 1
