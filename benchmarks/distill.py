"""Distillation (issue 16): `tiny` trained alone against `tiny` distilled from a pretrained `small`, for the same
steps, on the same batches, from the same initial weights, compared by validation bits per byte.

1. the built-in Shakespeare: a 6400-token tokenizer and shards (`lmforge tokenizer`, `lmforge prepare
   --val-fraction 0.05`: 59k validation tokens)
2. the teacher: `small` pretrained for --teacher-steps on configs/pretrain_tiny.yaml's batches (bf16-pure,
   lr 1e-3)
3. `tiny` alone: configs/pretrain_tiny.yaml for --steps
4. `tiny` distilled: configs/distill_tiny.yaml for --steps (the forward KL at T 1 alone); --alpha, --beta,
   --kd-temperature override the recipe
Both tiny runs start from the same weights (seed 0) and see the same batches; their bits per byte are over the
same --eval-batches of the val split. Each run's directory under --out is resumed when it is there (a finished
run is only evaluated again); the distilled run's is named by its loss (alpha, beta, T), so another loss trains
anew and the teacher and `tiny` alone are reused.

    .venv/bin/python -P benchmarks/distill.py [--teacher-steps 400 --steps 200]
    .venv/bin/python -P benchmarks/distill.py --alpha 0.5 --kd-temperature 1.5    # MiniMind's offline recipe

The last line printed is one JSON object; "ratio" = tiny alone's bits per byte / the distilled tiny's (above 1:
distillation helped).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmforge.data.pretrain import prepare
from lmforge.settings import parse_args_or_raise
from lmforge.tokenizer import train_tokenizer
from lmforge.train import distill, pretrain

ROOT = Path(__file__).parents[1]


def run_stage(stage, config_cls, args: list[str], run_dir: str) -> tuple[float, float]:
    """(final validation bits per byte, seconds) of a stage's run with `args` on the command line."""
    args = [*args, "--train.run-dir", run_dir]
    print(" ".join(["lmforge", stage.__name__.rsplit(".", 1)[1], *args]), flush=True)
    started = time.perf_counter()
    result = stage.run(parse_args_or_raise(config_cls, args))
    return result.val_bpb, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-distill")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--beta", type=float, default=None)
    parser.add_argument("--kd-temperature", type=float, default=None)
    args = parser.parse_args()

    out = Path(args.out)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        train_tokenizer(["builtin:shakespeare"], out_dir=out / "tokenizer", show_progress=False)
    if not (out / "data" / "manifest.json").is_file():
        # 5% held out (the default 1% is one piece of text, 4180 tokens: two batches)
        prepare(out / "tokenizer", ["builtin:shakespeare"], out / "data", val_fraction=0.05, show_progress=False)
    common = ["--data", str(out / "data"), "--eval-batches", str(args.eval_batches), "--train.steps",
              str(args.steps), "--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]
    pretrain_recipe = ["--config", str(ROOT / "configs" / "pretrain_tiny.yaml"), *common]
    teacher_dir = out / f"teacher-small-{args.teacher_steps}"
    teacher_bpb, teacher_s = run_stage(pretrain, pretrain.PretrainConfig, [
        *pretrain_recipe, "--model", "small", "--train.steps", str(args.teacher_steps), "--train.precision",
        "bf16-pure", "--train.optim.lr", "1e-3", "--train.eval-every", "0"], str(teacher_dir))
    alone_bpb, alone_s = run_stage(pretrain, pretrain.PretrainConfig, pretrain_recipe,
                                   str(out / f"tiny-alone-{args.steps}"))
    overrides = [item for name in ("alpha", "beta", "kd_temperature") if getattr(args, name) is not None
                 for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    distill_args = ["--config", str(ROOT / "configs" / "distill_tiny.yaml"), *common, "--teacher",
                    str(teacher_dir / "final"), *overrides]
    cfg = parse_args_or_raise(distill.DistillConfig, distill_args)
    loss = f"alpha{cfg.alpha:g}-beta{cfg.beta:g}-T{cfg.kd_temperature:g}"  # another loss, another run dir
    distilled_bpb, distilled_s = run_stage(distill, distill.DistillConfig, distill_args,
                                           str(out / f"tiny-distilled-{args.steps}-{loss}"))
    print(json.dumps({"ratio": round(alone_bpb / distilled_bpb, 4), "alone_bpb": round(alone_bpb, 4),
                      "distilled_bpb": round(distilled_bpb, 4), "teacher_bpb": round(teacher_bpb, 4),
                      "steps": args.steps, "teacher_steps": args.teacher_steps, "loss": loss,
                      "seconds": {"teacher": round(teacher_s), "alone": round(alone_s),
                                  "distilled": round(distilled_s)}}))


if __name__ == "__main__":
    main()
