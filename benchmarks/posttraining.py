"""Post-training shown to work on the built-in tasks: SFT, then rejection-sampling fine-tuning (RFT) and DPO
on the SFT model's own answers, each measured by exact-match accuracy on held-out problems.

    .venv/bin/python benchmarks/posttraining.py                  # ~30 minutes on 2 CPU cores
    .venv/bin/python benchmarks/posttraining.py --quick          # a smoke run of the same commands

Every step is an lmforge command (printed as it runs), in one run directory:
1. `lmforge tasks`: arithmetic word problems (GSM8K format), train and held-out;
2. `lmforge tokenizer` on the built-in corpus (digits are tokens of their own);
3. `lmforge sft` of the `tiny` preset from scratch on the problems' worked solutions;
4. `lmforge rejection` from the SFT model on training prompts (n samples each at temperature T): the right
   answers as SFT data, each prompt's best and worst answers as preference pairs;
5. `lmforge sft` of the SFT model on its own right answers (RFT), and `lmforge dpo` of it on its own pairs
   for two epochs (more overfits them: BENCHMARKS.md).
Stages finished by an earlier run in --out (tasks, tokenizer, SFT) are reused.
Accuracy: greedy answers to the held-out problems through the Engine, checked by `#### N` (strict).
Last line: one JSON object; "ratio" = the better of RFT's and DPO's accuracy / the SFT model's.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import time
from pathlib import Path

from lmforge import cli
from lmforge.data.arithmetic import is_correct
from lmforge.data.prompts import read_prompts
from lmforge.infer.engine import Engine
from lmforge.infer.llm import encode_prompts
from lmforge.infer.sampling import SamplingParams

QUIET = ["--train.progress", "false", "--train.device", "cpu"]


def lmforge(*args: str) -> None:
    print("lmforge " + shlex.join(args), flush=True)
    started = time.perf_counter()
    code = cli.main(list(args))
    if code:
        raise SystemExit(f"lmforge {args[0]} failed ({code})")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def accuracy(model_dir: Path, problems: Path, limit: int) -> float:
    """Greedy exact-match accuracy (strict `#### N`) on the first `limit` held-out problems."""
    prompts = list(read_prompts(problems))[:limit]
    engine = Engine.from_pretrained(model_dir, max_batch_size=32)
    ids = encode_prompts(engine.tokenizer, [p.messages for p in prompts])
    outputs = engine.generate(ids, SamplingParams(max_tokens=96, temperature=0.0))
    return sum(is_correct(o[0].text, p.answer) for o, p in zip(outputs, prompts)) / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/posttraining")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    q = args.quick
    train, test, sft_steps, rs_prompts = (200, 50, 20, 20) if q else (5000, 500, 1500, 1500)
    if not (out / "tasks" / "test.jsonl").is_file():  # a finished stage of an earlier run is reused
        lmforge("tasks", "--out", str(out / "tasks"), "--train", str(train), "--test", str(test), "--max-ops", "2")
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        lmforge("tokenizer", "--data", "builtin:shakespeare", "--vocab-size", "2048", "--out", str(out / "tokenizer"))
    common = ["--max-len", "160", "--batch-size", "32", "--packed", *QUIET]
    sft_model = out / "sft" / "final"
    if not sft_model.exists():
        lmforge("sft", "--model", "tiny", "--tokenizer", str(out / "tokenizer"), "--data",
                str(out / "tasks" / "sft.jsonl"), "--train.run-dir", str(out / "sft"), "--train.steps", str(sft_steps),
                "--train.optim.lr", "3e-3", "--train.optim.warmup-steps", "50", "--train.save-every", "0",
                "--train.eval-every", "0", *common)
    lmforge("rejection", "--model", str(sft_model), "--prompts", str(out / "tasks" / "prompts.jsonl"), "--max-prompts",
            str(rs_prompts), "--n", "4", "--temperature", "0.8", "--max-new-tokens", "96", "--out",
            str(out / "rs" / "sft.jsonl"), "--pairs-out", str(out / "rs" / "pairs.jsonl"))
    kept = json.loads((out / "rs" / "sft.summary.json").read_text())
    if not kept["kept"] or not kept["pairs"]:
        print(json.dumps({"accuracy": {"sft": accuracy(sft_model, out / "tasks" / "test.jsonl", test)},
                          "note": "the SFT model answered no sampled prompt right: nothing to fine-tune on",
                          "ratio": 0.0}))
        return
    for name in ("rft", "dpo"):
        shutil.rmtree(out / name, ignore_errors=True)
    lmforge("sft", "--model", str(sft_model), "--data", str(out / "rs" / "sft.jsonl"), "--train.run-dir",
            str(out / "rft"), "--train.steps", str(max(10, sft_steps // 5)), "--train.optim.lr", "3e-4",
            "--train.optim.warmup-steps", "10", "--train.save-every", "0", "--train.eval-every", "0", *common)
    lmforge("dpo", "--model", str(sft_model), "--data", str(out / "rs" / "pairs.jsonl"), "--train.run-dir",
            str(out / "dpo"), "--train.steps", str(max(10, math.ceil(2 * kept["pairs"] / 16))),
            "--train.optim.lr", "2e-5", "--beta", "0.1", "--max-len", "160", "--batch-size", "16",
            "--train.save-every", "0", "--train.eval-every", "0", *QUIET)
    held_out = out / "tasks" / "test.jsonl"
    results = {name: accuracy(out / name / "final", held_out, test) for name in ("sft", "rft", "dpo")}
    dpo_rows = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    margins = [r["rewards/margins"] for r in dpo_rows if "rewards/margins" in r]
    for name, value in results.items():
        print(f"{name}: held-out exact-match accuracy {value:.1%} ({test} problems)")
    print(f"dpo: reward margin {margins[0]:.3f} at step 1, {sum(margins[-10:]) / len(margins[-10:]):.3f} "
          "over its last 10 steps")
    print(json.dumps({"accuracy": results, "dpo_margin_first": margins[0],
                      "dpo_margin_last10": sum(margins[-10:]) / len(margins[-10:]),
                      "ratio": round(max(results["rft"], results["dpo"]) / max(results["sft"], 1e-9), 3)}))


if __name__ == "__main__":
    main()
