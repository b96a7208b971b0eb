"""Training-step throughput: lmforge against transformers' LlamaForCausalLM, same config, same weights.

One step = forward, loss, backward, AdamW step, for the `small` preset at batch 8 x 256 (defaults),
in fp32, under bf16 autocast (fp32 weights), and in pure bf16 (bf16 weights and optimizer state).
The baseline runs with both of its attention implementations (sdpa, eager) and the comparison is
against its best configuration. Everyone uses the same AdamW (fused). lmforge's loss is the
Trainer's (`train.objectives.causal_lm_loss`: chunked, never holding the whole batch's fp32 logits);
transformers' is its own `labels=` loss.

The machine may be shared, so the implementations of one precision run in one process with their
steps interleaved (order reversed every round): load from other processes falls on all of them
alike. Besides each one's median tokens/s, "paired_ratio" is the median over rounds of
baseline step time / lmforge step time.

MFU = (training FLOPs per token, `lmforge.model.flops_per_token`: 6N + attention, PaLM appendix B)
x tokens/s, over a *measured* peak: the best rate of large square matmuls in the same dtype.

Peak memory: each configuration is also run alone, for one step, in a fresh process; "peak_rss_mb"
is that process's resident-set high-water mark (VmHWM in /proc/self/status: Python, torch, model,
gradients, optimizer state and activations).

    .venv/bin/python -P benchmarks/train_step.py            # 5 timed steps per configuration
    .venv/bin/python -P benchmarks/train_step.py --quick    # 1 timed step

The last line printed is one JSON object; "ratio" = lmforge's best bf16 tokens/s / the baseline's
best tokens/s over all its configurations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("fp32", "bf16-autocast", "bf16-pure")
# The baseline in each of its attention implementations; its best is what lmforge is compared with.
BASELINES = ("transformers-sdpa", "transformers-eager")
IMPLS = ("lmforge",) + BASELINES


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def matmul_peak(dtype: torch.dtype, sizes: list[int], repeats: int) -> float:
    """Best FLOP/s over n x n x n matmuls of a few sizes (the best is the least disturbed by other load)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def build(impl: str, mode: str, model_dir: str, compile_model: bool):
    """(model, loss_fn(model, input_ids) -> loss, optimizer)."""
    dtype = torch.bfloat16 if mode == "bf16-pure" else torch.float32
    if impl == "lmforge":
        from lmforge.checkpoint import load_model
        from lmforge.train.objectives import causal_lm_loss

        model = load_model(model_dir, dtype=dtype)

        def loss_fn(m, x):
            labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
            return causal_lm_loss(m, {"input_ids": x, "labels": labels})[0]
    else:
        from transformers import AutoModelForCausalLM

        attention = impl.removeprefix("transformers-")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)

        def loss_fn(m, x):
            return m(input_ids=x, labels=x).loss  # shifts the labels itself
    model.train()
    if compile_model:
        model.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    return model, loss_fn, optimizer


def train_step(model, loss_fn, optimizer, x, autocast: bool) -> tuple[float, float]:
    """One step; returns (seconds, loss)."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, loss.item()


def worker(spec: dict) -> dict:
    """'peak': matmul peaks. 'time': every implementation in one process, steps interleaved (the order
    reversed every round), so that load from other processes falls on all of them alike. 'memory': one
    implementation alone for one step (gradients and optimizer state exist after it), for its peak RSS.
    Every worker first applies the Trainer's CPU malloc setting (`keep_freed_memory`): it is
    process-wide, so the baseline runs with it too."""
    from lmforge.train.environment import keep_freed_memory

    keep_freed_memory()
    torch.manual_seed(0)
    if spec["kind"] == "peak":
        return {name: matmul_peak(dtype, spec["sizes"], spec["repeats"])
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    autocast = spec["mode"] == "bf16-autocast"
    x = torch.randint(0, 6400, (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(1))
    if spec["kind"] == "memory":
        runner = build(spec["impl"], spec["mode"], spec["model_dir"], spec["compile"])
        train_step(*runner, x, autocast)
        return {"peak_rss_mb": peak_rss_mb()}
    runners = {impl: build(impl, spec["mode"], spec["model_dir"], spec["compile"]) for impl in IMPLS}
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    losses: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for step in range(spec["warmup"] + spec["steps"]):
        for impl in (IMPLS if step % 2 == 0 else IMPLS[::-1]):
            seconds, loss = train_step(*runners[impl], x, autocast)
            losses[impl].append(loss)
            if step >= spec["warmup"]:
                times[impl].append(seconds)
    return {impl: {"step_s": statistics.median(times[impl]), "step_s_all": [round(t, 3) for t in times[impl]],
                   "tokens_per_s": spec["batch"] * spec["seq"] / statistics.median(times[impl]),
                   "paired_ratio": statistics.median(b / a for a, b in zip(times["lmforge"], times[impl])),
                   "first_loss": losses[impl][0], "last_loss": losses[impl][-1]} for impl in IMPLS}


def run_worker(spec: dict) -> dict:
    # -P: the script's folder stays off sys.path, so a file in benchmarks/ never shadows a module.
    out = subprocess.run([sys.executable, "-P", __file__, "--worker", json.dumps(spec)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--quick", action="store_true", help="1 warmup + 1 timed step per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.steps, args.warmup = 1, 1

    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.model import build_model, flops_per_token, num_parameters

    cfg = preset(args.preset)
    if cfg.vocab_size != 6400:
        raise SystemExit("the benchmark's random tokens assume the presets' vocabulary of 6400")
    flops = flops_per_token(cfg, args.seq)
    peak_spec = {"kind": "peak", "sizes": [1024, 2048] if args.quick else [1024, 2048, 4096],
                 "repeats": 3 if args.quick else 5}
    peak = run_worker(peak_spec)
    results: dict[str, dict] = {impl: {} for impl in IMPLS}
    with tempfile.TemporaryDirectory() as model_dir:
        model = build_model(cfg, seed=0)
        n_params = num_parameters(model)
        save_model(model, model_dir)
        del model
        common = {"model_dir": model_dir, "batch": args.batch, "seq": args.seq, "compile": args.compile}
        for mode in args.modes:
            timed = run_worker({"kind": "time", "mode": mode, "steps": args.steps, "warmup": args.warmup, **common})
            for impl in IMPLS:
                r = timed[impl]
                r.update(run_worker({"kind": "memory", "impl": impl, "mode": mode, **common}))
                results[impl][mode] = r
                print(f"{impl:>18} {mode:<14} {r['tokens_per_s']:8.0f} tok/s  step {r['step_s']:.3f}s  "
                      f"lmforge/this {r['paired_ratio']:.3f}  peak RSS {r['peak_rss_mb']:6.0f} MB", flush=True)
    # The peak is measured again at the end and the best kept: one measured while other processes
    # load the machine would be too low and inflate every MFU.
    peak = {k: max(v, run_worker(peak_spec)[k]) for k, v in peak.items()}
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    for impl, rs in results.items():
        for mode, r in rs.items():
            r["mfu"] = flops * r["tokens_per_s"] / peak["fp32" if mode == "fp32" else "bf16"]
            print(f"{impl:>18} {mode:<14} MFU {100 * r['mfu']:5.1f}%  loss {r['first_loss']:.3f} -> "
                  f"{r['last_loss']:.3f}")

    ours_bf16 = {m: r for m, r in results["lmforge"].items() if m != "fp32"}
    ours_mode = max(ours_bf16, key=lambda m: ours_bf16[m]["tokens_per_s"]) if ours_bf16 else None
    base_impl, base_mode = max(((i, m) for i in BASELINES for m in results[i]),
                               key=lambda im: results[im[0]][im[1]]["tokens_per_s"])
    base = results[base_impl][base_mode]["tokens_per_s"]
    summary = {
        "benchmark": "train_step", "preset": args.preset, "parameters": n_params, "batch": args.batch,
        "seq": args.seq, "threads": torch.get_num_threads(), "compile": args.compile, "steps": args.steps,
        "flops_per_token": flops, "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "tokens_per_s": {impl: {m: round(r["tokens_per_s"], 1) for m, r in rs.items()} for impl, rs in results.items()},
        "mfu": {impl: {m: round(r["mfu"], 4) for m, r in rs.items()} for impl, rs in results.items()},
        "paired_ratio": {impl: {m: round(r["paired_ratio"], 3) for m, r in rs.items()}
                         for impl, rs in results.items() if impl != "lmforge"},
        "peak_rss_mb": {impl: {m: round(r["peak_rss_mb"]) for m, r in rs.items()} for impl, rs in results.items()},
        "lmforge_bf16_mode": ours_mode, "baseline_best": f"{base_impl} {base_mode}",
        "lmforge_bf16_mfu": round(results["lmforge"][ours_mode]["mfu"], 4) if ours_mode else None,
        "ratio": round(results["lmforge"][ours_mode]["tokens_per_s"] / base, 3) if ours_mode else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
