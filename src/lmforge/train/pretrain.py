"""`lmforge pretrain`: next-token prediction on shards written by `lmforge prepare`.

    lmforge pretrain --config configs/pretrain_tiny.yaml [--train.steps 2000 --train.optim.lr 1e-3 ...]

1. the model: a preset name (random init, vocabulary sized to the data's tokenizer) or an HF model dir
2. the data: windows of seq_len + 1 tokens from the shards, each process its own share
3. the objective: chunked cross-entropy (+ the router's aux loss for MoE models)
4. the Trainer does the rest; checkpoints are HF model dirs with the tokenizer copied in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import ClassVar

import torch
import torch.distributed as dist

from lmforge.checkpoint import model_from, save_model
from lmforge.config import PRESETS
from lmforge.data.pretrain import Manifest, PretrainLoader
from lmforge.model import flops_per_token
from lmforge.settings import check_ranges
from lmforge.tokenizer import Tokenizer
from lmforge.train.environment import setup_env
from lmforge.train.objectives import DEFAULT_CHUNK, causal_lm_loss
from lmforge.train.stage import TrainingSet, dropout_option, set_dropout, stage_main
from lmforge.train.trainer import OptimConfig, TrainConfig, Trainer, TrainResult


@dataclass
class PretrainConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "train.resume"}  # `--resume auto` (settings.py)

    model: str = field(default="tiny", metadata={"help": f"a preset ({', '.join(PRESETS)}) or an HF model dir"})
    data: str = field(default="runs/data", metadata={"help": "directory of shards from `lmforge prepare`"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer dir copied into checkpoints (default: the one the shards were made with)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence", "min": 1})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch on each process",
                                                                 "min": 1})
    shuffle: bool = field(default=True, metadata={"help": "visit the windows in a seeded random order"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation (0 = all)",
                                                                    "min": 0})
    chunk_size: int = field(default=DEFAULT_CHUNK, metadata={"help": "tokens per chunk of the output layer + loss",
                                                                        "min": 1})
    dropout: float | None = dropout_option("dropout")
    embedding_dropout: float | None = dropout_option("embedding_dropout")
    attention_dropout: float | None = dropout_option("attention_dropout")
    residual_dropout: float | None = dropout_option("residual_dropout")
    # keep_best: pretraining always has its validation split, and on a small corpus the last step is rarely the best
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        run_dir="runs/pretrain", keep_best=True, optim=OptimConfig(lr=1e-3, warmup_steps=100, weight_decay=0.1)))


class LoaderBatches:
    """A PretrainLoader as the Trainer's resumable stream of {"input_ids", "labels"} dicts."""

    def __init__(self, loader: PretrainLoader):
        self.loader = loader
        self.iterator = iter(loader)

    def __next__(self) -> dict[str, torch.Tensor]:
        inputs, targets = next(self.iterator)
        return {"input_ids": inputs, "labels": targets}

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.iterator = iter(self.loader)


def build(cfg: PretrainConfig, manifest: Manifest, device: torch.device):
    model = model_from(cfg.model, device=device, seed=cfg.train.seed, vocab_size=manifest.vocab_size,
                       eos_token_id=manifest.eos_id, pad_token_id=manifest.eos_id)
    if model.config.vocab_size < manifest.vocab_size:
        raise ValueError(f"model: {cfg.model} has {model.config.vocab_size} token embeddings, the data's "
                         f"tokenizer {manifest.vocab_size}")
    set_dropout(model, cfg)
    return model


def validation_bytes_per_token(batches, tokenizer: Tokenizer) -> float:
    """UTF-8 bytes per target token over exactly the validation batches evaluated, summed over processes.
    Special tokens (the end-of-text between documents) count as no bytes, as in nanochat's bpb."""
    byte_count = token_count = 0
    for batch in batches:
        for row in batch["labels"].tolist():
            byte_count += len(tokenizer.decode(row, skip_special_tokens=True).encode("utf-8"))
            token_count += len(row)
    totals = torch.tensor([byte_count, token_count], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def run(cfg: PretrainConfig) -> TrainResult:
    """Pretrain as `cfg` says; returns the final validation loss and bits per byte, the run dir, the
    loss-curve PNG and the final checkpoint (an HF model dir)."""
    check_ranges(cfg)
    env = setup_env(cfg.train.device)
    manifest = Manifest.load(cfg.data)
    tokenizer_dir = cfg.tokenizer or manifest.tokenizer
    model = build(cfg, manifest, env.device)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len: {cfg.seq_len} is longer than the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    train = PretrainLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, cfg.shuffle, cfg.train.seed,
                           env.rank, env.world_size)

    def val_data():
        loader = PretrainLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, False, 0, env.rank, env.world_size)
        count = len(loader) if cfg.eval_batches <= 0 else min(cfg.eval_batches, len(loader))
        return ({"input_ids": x, "labels": y} for x, y in islice(loader, count))

    training_set = TrainingSet(cfg.data, int(train.shard_starts[-1]),
                               cfg.batch_size * cfg.seq_len * cfg.train.grad_accum * env.world_size)
    trainer = Trainer(
        cfg.train, model, lambda m, batch: causal_lm_loss(m, batch, cfg.chunk_size), LoaderBatches(train),
        val_data=val_data, bytes_per_token=validation_bytes_per_token(val_data(), Tokenizer.from_dir(tokenizer_dir)),
        flops_per_token=flops_per_token(model.config, cfg.seq_len),
        save_weights=lambda m, path: save_model(m, path, tokenizer_dir=tokenizer_dir),
        log_config={k: v for k, v in asdict(cfg).items() if k != "train"}, training_set=training_set)
    return trainer.fit()


main = stage_main(PretrainConfig, run, "lmforge pretrain",
                  "Pretrain a model (a preset, or an HF dir to continue) on prepared shards.")
