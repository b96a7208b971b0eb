"""`lmforge quickstart`: the whole life cycle on the built-in data, as far as it exists.

    1. build the `tiny` preset, save it as a Hugging Face model directory, reload it and check
       the reloaded model gives identical logits; print its size and FLOPs per token
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.config import preset
from lmforge.model import build_model, flops_per_token, num_parameters
from lmforge.settings import parse_args


@dataclass
class QuickstartConfig:
    out_dir: str = field(default="runs/quickstart", metadata={"help": "where every stage writes"})
    preset: str = field(default="tiny", metadata={"help": "model size to build"})
    seed: int = 0


def step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def build_save_reload(cfg: QuickstartConfig) -> Path:
    model_cfg = preset(cfg.preset)
    model = build_model(model_cfg, seed=cfg.seed).eval()
    path = save_model(model, Path(cfg.out_dir) / "init")
    reloaded = load_model(path).eval()
    x = torch.randint(0, model_cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        same = torch.equal(model(x).logits, reloaded(x).logits)
    if not same:
        raise RuntimeError(f"{path}: the reloaded model's logits differ from the saved model's")
    n = num_parameters(model)
    print(f"    {cfg.preset}: {n / 1e6:.2f}M parameters, {flops_per_token(model_cfg, 256) / 1e6:.1f} MFLOPs "
          f"per training token at sequence length 256")
    print(f"    saved to {path} and reloaded: logits identical")
    return path


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(QuickstartConfig, argv, prog="lmforge quickstart", description=__doc__)
    start = time.time()
    step(1, f"build the '{cfg.preset}' model, save it as a Hugging Face directory, reload it")
    build_save_reload(cfg)
    print(f"\nquickstart done in {time.time() - start:.0f}s")
    return 0
