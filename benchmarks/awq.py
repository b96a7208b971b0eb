"""AWQ against round-to-nearest at int4: held-out bits-per-byte increase over fp32 of the trained `small` (issue 19).

The model (runs/bench-distill/teacher-small-400/final, saved again in fp32) quantised by `lmforge quantize` with
--method rtn and --method awq (calibration: the built-in Shakespeare less its held-out pieces), int4 in groups
of 32 and 128; also AWQ's scales alone, without its clipping search (awq.apply_awq(clip=False), then
quantize_model), to show each part's share. Quality: bits per byte of the held-out Shakespeare (the val pieces
`prepare` takes at 5%, never calibrated on), over the same disjoint token windows for every model
(quant_vs_llamacpp.py's measure), reported as the increase over fp32; and, more sensitive at these small
increases, the mean KL divergence from the fp32 model's next-token distribution to the quantised model's over the
same held-out tokens (in rows of --seq-len), in nats per token.

Last line: one JSON object; "ratio" = RTN's increase / AWQ's increase at group size 128 (higher is better; above 1:
AWQ loses less), "ratio_g32" the same at 32; "kl_ratio", "kl_ratio_g32" the same for the KL divergences.
--group-sizes 128 (or 32) runs one group size alone.

    cd benchmarks && ../.venv/bin/python awq.py [--quick] [--model DIR] [--samples N] [--calibration-seq-len L]
                                                [--group-sizes 32 128]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.awq import apply_awq, calibration_tokens
from lmforge.checkpoint import load_model, save_model
from lmforge.eval.loglik import (
    builtin_heldout_tokens,
    prefix_token_id,
    rolling_windows,
    score_tokens,
)
from lmforge.quantize import quantize, quantize_model
from lmforge.tokenizer import Tokenizer

TRAINED = Path(__file__).resolve().parent.parent / "runs/bench-distill/teacher-small-400/final"


def bits_per_byte(model, windows, n_bytes: int, seq_len: int) -> float:
    nll = -sum(ll for ll, _ in score_tokens(model, windows, max_length=seq_len, batch_size=8))
    return nll / math.log(2) / n_bytes


@torch.no_grad()
def mean_kl(reference, model, rows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean over tokens of KL(reference's next-token distribution || model's), nats."""
    total = 0.0
    for batch in rows.split(batch_size):
        ref = torch.log_softmax(reference(batch).logits.float(), dim=-1)
        out = torch.log_softmax(model(batch).logits.float(), dim=-1)
        total += float((ref.exp() * (ref - out)).sum())
    return total / rows.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 calibration rows, 4 KB of held-out text")
    parser.add_argument("--model", default=str(TRAINED), help="a model directory with its tokenizer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32, help="calibration rows")
    parser.add_argument("--calibration-seq-len", type=int, default=256, help="tokens per row (the teacher's)")
    parser.add_argument("--seq-len", type=int, default=256, help="the quality windows' length (the teacher's)")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 128], choices=[32, 64, 128])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples, max_bytes = (4, 4000) if args.quick else (args.samples, 48000)
    source = Path(args.model)
    tokenizer = Tokenizer.from_dir(source)
    tokens, n_bytes = builtin_heldout_tokens(tokenizer, max_bytes)
    windows = rolling_windows(tokens, prefix_token_id(tokenizer), args.seq_len)
    results: dict = {"model": str(source), "calibration": f"builtin, {samples} x {args.calibration_seq_len} tokens",
                     "heldout_tokens": len(tokens), "heldout_bytes": n_bytes}
    print(f"model {source}; held-out {len(tokens)} tokens, {n_bytes} bytes; calibration {results['calibration']}; "
          f"{args.threads} threads (the machine may be shared)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(load_model(source, dtype=torch.float32), tmp / "fp32", tokenizer_dir=source, dtype=torch.float32)
        reference = load_model(tmp / "fp32")
        rows = torch.tensor(tokens[: len(tokens) // args.seq_len * args.seq_len]).view(-1, args.seq_len)
        fp32 = bits_per_byte(reference, windows, n_bytes, args.seq_len)
        results["fp32_bpb"] = round(fp32, 5)
        print(f"fp32 bits/byte {fp32:.5f}", flush=True)
        calibration = calibration_tokens(tokenizer, "builtin", samples, args.calibration_seq_len)
        for group in args.group_sizes:
            for method in ("rtn", "awq", "awq-scales-only"):
                start = time.perf_counter()
                if method == "awq-scales-only":
                    model = load_model(tmp / "fp32")
                    apply_awq(model, calibration, 4, group, clip=False)
                    quantize_model(model, 4, group)
                else:
                    out = quantize(tmp / "fp32", "int4", tmp / f"{method}-g{group}", group, method, "builtin",
                                   samples, args.calibration_seq_len)
                    model = load_model(out)
                seconds = time.perf_counter() - start
                bpb = bits_per_byte(model, windows, n_bytes, args.seq_len)
                kl = mean_kl(reference, model, rows)
                results[f"{method}_g{group}"] = {"bits_per_byte": round(bpb, 5), "increase": round(bpb - fp32, 5),
                                                 "kl_nats": float(f"{kl:.4g}"), "quantize_s": round(seconds, 1)}
                print(f"int4 g{group:<3d} {method:16s} bits/byte {bpb:.5f} ({bpb - fp32:+.5f})  KL from fp32 "
                      f"{kl:.3g} nats/token  quantised in {seconds:.0f} s", flush=True)
    for group in args.group_sizes:
        key = "ratio" if group == 128 else f"ratio_g{group}"
        rtn, awq = results[f"rtn_g{group}"]["increase"], results[f"awq_g{group}"]["increase"]
        results[key] = round(rtn / awq, 3) if awq > 0 else None
        results[f"kl_{key}"] = round(results[f"rtn_g{group}"]["kl_nats"] / results[f"awq_g{group}"]["kl_nats"], 3)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
