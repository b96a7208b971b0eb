"""Batch-1 decode speed of the `small` preset quantised by `lmforge quantize` (int8 per channel, int4 in groups of
128) against the same weights in fp32, through the Engine on the CPU (2 threads unless told otherwise).

fp32 runs twice: as the Engine runs it (its C decoder) and through PyTorch (cpu_decoder=False), the path a
quantised model takes (QuantLinear's packed kernels; the C decoder reads float weights only). Random weights, greedy,
a 128-token prompt and 128 new tokens, median of several runs (time_lmforge of decode.py); the machine is shared,
so expect noise. Also: the weights file's size, and how many greedy tokens equal fp32's.

Last line: one JSON object; "ratio" = int8 decode tok/s / fp32 decode tok/s (the Engine's fp32, C decoder).

    python benchmarks/quantize.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from decode import time_lmforge

from lmforge.checkpoint import load_model, save_model
from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams
from lmforge.model import build_model
from lmforge.quantize import quantize
from lmforge.tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs of 32 tokens")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, new_tokens = (3, 32) if args.quick else (5, 128)
    cfg = preset("small")
    print(f"small preset, threads={args.threads}, 128-token prompt, {new_tokens} new tokens, greedy, "
          f"median of {repeats} runs (shared machine: noisy)")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = train_tokenizer(["builtin:shakespeare"], cfg.vocab_size, tmp / "tok", show_progress=False)
        save_model(build_model(cfg, seed=0), tmp / "fp32", tokenizer_dir=tmp / "tok")
        quantize(tmp / "fp32", "int8", tmp / "int8")
        quantize(tmp / "fp32", "int4", tmp / "int4", group_size=128)
        prompt = torch.randint(0, cfg.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
        engines = {
            "fp32": Engine(load_model(tmp / "fp32"), tokenizer, max_batch_size=1, max_len=512, prefix_cache=False),
            "fp32_pytorch": Engine(load_model(tmp / "fp32"), tokenizer, max_batch_size=1, max_len=512,
                                   prefix_cache=False, cpu_decoder=False),
            "int8": Engine(load_model(tmp / "int8"), tokenizer, max_batch_size=1, max_len=512, prefix_cache=False),
            "int4": Engine(load_model(tmp / "int4"), tokenizer, max_batch_size=1, max_len=512, prefix_cache=False),
        }
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        greedy = {name: engine.generate([prompt], params)[0][0].token_ids for name, engine in engines.items()}
        runs: dict[str, list] = {name: [] for name in engines}
        for _ in range(repeats):  # interleaved, so every side sees the same background load
            for name, engine in engines.items():
                runs[name].append(time_lmforge(engine, prompt, new_tokens))
        for name, timings in runs.items():
            speed = statistics.median(s for _, s in timings)
            ttft = statistics.median(t for t, _ in timings)
            directory = tmp / name.removesuffix("_pytorch")
            size = (directory / "model.safetensors").stat().st_size
            same = sum(a == b for a, b in zip(greedy[name], greedy["fp32"])) / new_tokens
            results[name] = {"decode_tok_s": round(speed, 1), "ttft_ms": round(ttft * 1000, 1),
                             "file_mb": round(size / 1e6, 2), "same_greedy_tokens_as_fp32": same}
            print(f"{name:13s} decode {speed:7.1f} tok/s   first token {ttft * 1000:6.1f} ms   "
                  f"file {size / 1e6:6.2f} MB   greedy tokens equal to fp32's: {same:.0%}")
    results["ratio"] = round(results["int8"]["decode_tok_s"] / results["fp32"]["decode_tok_s"], 3)
    results["ratio_int8_vs_fp32_pytorch"] = round(
        results["int8"]["decode_tok_s"] / results["fp32_pytorch"]["decode_tok_s"], 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
