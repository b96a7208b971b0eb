"""What a training run reports: progress (on standard error: a bar on a terminal; to a file or a CI log,
where a bar's carriage-return redraws pile up, one plain line every PLAIN_EVERY seconds), RUN_DIR/metrics.jsonl
(one JSON object per logged step or evaluation), TensorBoard, Weights & Biases, the model FLOP utilisation
(MFU), and at the end the loss curve, RUN_DIR/loss.png. Only rank 0 writes."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.train.checkpointing import remove_stale_temporaries

if TYPE_CHECKING:
    from lmforge.train.trainer import Trainer

PLAIN_EVERY = 10.0  # seconds between progress lines when standard error is not a terminal


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The matmul FLOP/s this device reaches: the best of a few square matmuls (the MFU denominator)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl, without a last line that a killed process left unfinished."""
    rows = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


class MetricsLogger:
    """Rank 0's outputs: progress (a bar, or plain lines), metrics.jsonl, TensorBoard, W&B, and the loss curve at
    the end. `clock`: the training loop's (seconds), which paces the plain lines."""

    def __init__(self, trainer: Trainer, resume_step: int | None, clock: Callable[[], float] = time.perf_counter):
        self.trainer, cfg = trainer, trainer.cfg
        self.active = trainer.env.is_main
        self.bar = self.tb = self.wandb = None
        self.clock, self.started, self.first_step = clock, clock(), trainer.step
        self.plain = False
        self.last_line = -math.inf
        self.peak = None
        if not self.active:
            return
        run_dir = trainer.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.metrics_path.write_text("")
        elif self.metrics_path.exists():
            # Rows past the checkpoint came from the interrupted run (whose last line may be cut off by
            # the kill); this run writes them again.
            rows = [row for row in read_metrics(self.metrics_path) if row["step"] <= resume_step]
            self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        remove_stale_temporaries(run_dir)
        (run_dir / "config.json").write_text(json.dumps({"train": asdict(cfg), **trainer.log_config},
                                                        indent=2, default=str))
        if trainer.flops_per_token:
            dtype = torch.bfloat16 if cfg.precision.startswith("bf16") else \
                torch.float16 if cfg.precision == "fp16" else torch.float32
            self.peak = cfg.peak_flops or measure_peak_flops(trainer.env.device, dtype)
        if cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.planned, initial=trainer.step, desc="training", dynamic_ncols=True,
                            file=sys.stderr)
        self.plain = cfg.progress and self.bar is None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(run_dir), name=run_dir.name,
                                    config={"train": asdict(cfg), **trainer.log_config})

    def train(self, row: dict) -> None:
        if not self.active:
            return
        world = self.trainer.env.world_size
        if self.peak and self.trainer.flops_per_token:
            row["mfu"] = row["tokens_per_s"] * self.trainer.flops_per_token / (self.peak * world)
        if self.bar is not None:
            post = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if "mfu" in row:
                post["mfu"] = f"{100 * row['mfu']:.1f}%"
            self.bar.total = self.trainer.planned  # a time budget fits it as the run goes
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.plain:
            self.progress_line(row)
        if row["step"] % self.trainer.cfg.log_every == 0 or row["step"] == self.trainer.planned:
            self.write(row)

    def progress_line(self, row: dict) -> None:
        """One plain line (step, loss, lr, tokens/s, time taken and left) at the first step, then at most one
        every PLAIN_EVERY seconds, and at the last step."""
        now, total = self.clock(), self.trainer.planned
        if now - self.last_line < PLAIN_EVERY and row["step"] < total:
            return
        self.last_line = now
        elapsed = now - self.started
        left = elapsed / max(row["step"] - self.first_step, 1) * (total - row["step"])
        print(f"step {row['step']}/{total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
              f"{row['tokens_per_s']:.0f} tok/s  {_minutes(elapsed)} elapsed, {_minutes(left)} left",
              file=sys.stderr, flush=True)

    def write(self, row: dict) -> None:
        if not self.active:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k if k.startswith("val_") else f"train/{k}", v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()

    def loss_curve(self) -> Path | None:
        """loss.png: training loss (and validation loss) against the step, from metrics.jsonl."""
        return plot_series(read_metrics(self.metrics_path), [("loss", "train loss", "-"),
                                                             ("val_loss", "validation loss", "o-")],
                           self.trainer.run_dir / "loss.png", "cross-entropy (nats/token)")


def _minutes(seconds: float) -> str:
    """m:ss (h:mm:ss from an hour)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def plot_series(rows: list[dict], series: list[tuple[str, str, str]], path: Path, ylabel: str) -> Path | None:
    """A PNG of metrics against the step: each (key, label, matplotlib line style) of `series` that the
    rows have finite values of; None (and no file) if none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [([(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])],
              label, style) for key, label, style in series]
    lines = [(points, label, style) for points, label, style in lines if points]
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in lines:
        ax.plot(*zip(*points), style, label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
