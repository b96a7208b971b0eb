"""Batch-1 decode speed of the `small` preset on the CPU: lmforge's Engine vs transformers' `generate`;
then one decode step through each of lmforge's paths: C, PyTorch eager, torch.compile.

Same random weights on both sides (saved with lmforge, loaded by AutoModelForCausalLM), greedy,
a 128-token prompt and 128 new tokens, in fp32 and bf16. For each: time to first token (prefill +
first token) and decode tokens/s (the other 127 tokens). Also the memory-bandwidth floor: decoding
one token at batch 1 reads every weight it multiplies once, so tokens/s can not exceed
read bandwidth / weight bytes per token, the bandwidth measured by reading a buffer as large as the
weights (a CPU whose cache holds them reads them faster than from DRAM).

The paths (`"paths"` in the JSON): one decode step at batch 1 and 16 after a 128-token prompt,
through the C decoder (`CPUDecoder`), PyTorch eager (the model's forward as the Engine runs it when
the decoder is off) and `torch.compile` (dynamic=False) of the same layers over a cache of fixed
shape (`static_decode_step`; the model's own KVCache slices to the longest position, a shape that
changes every step; Inductor's `freezing` on, as PyTorch advises for CPU inference), the paths in
turns, tok/s = batch / median step time; compile time apart, from an empty Inductor cache. Twice,
each in a fresh process: the machine as it is ("native"), and with AVX-512 and AMX off for all
three ("avx2": the C file built with -mno-avx512f, so its portable loops; PyTorch and Inductor
limited to AVX2 through ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS), as on
a CPU with AVX2 only. CPUDecoder.create uses the C decoder where it is the fastest of the three.

Each figure is the median of several runs; the machine is shared, so expect noise.
Last line: one JSON object; "ratio" = lmforge's best decode tok/s (fp32 or bf16) / transformers'
best; "ratio_fp32" and "ratio_bf16" compare each precision alone.

    python benchmarks/decode.py [--quick] [--skip-engine] [--skip-paths]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams, cpu_decode
from lmforge.model import KVCache, build_model, matmul_params_per_token
from lmforge.model.rope import rope_cos_sin
from lmforge.tokenizer import train_tokenizer

# The environment of each run of the paths: the machine as it is, and without AVX-512 and AMX.
PROFILES = {
    "native": {},
    "avx2": {"LMFORGE_CFLAGS": "-mno-avx512f", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def read_bandwidth_gbps(src: torch.Tensor, repeats: int = 5) -> float:
    """Read the buffer `src` (summing it): GB per second, median of `repeats`. Measured between the decode
    runs, because this machine's bandwidth swings with its neighbours' load (seen: 31 to 100 GB/s for the
    same 52 MB buffer within an hour)."""
    src.sum()
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        speeds.append(src.numel() * src.element_size() / (time.perf_counter() - start) / 1e9)
    return statistics.median(speeds)


def time_lmforge(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s over the rest). Timed per engine step rather than per
    streamed Delta, because a random model's text may be held back (broken UTF-8) for many tokens."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    request = engine.submit(prompt, params)
    engine.step()  # prefill and the first token
    first = time.perf_counter()
    while not request.done.is_set():
        engine.step()  # one token
    end = time.perf_counter()
    assert len(request.outputs[0].token_ids) == new_tokens
    return first - start, (new_tokens - 1) / (end - first)


def time_transformers(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        total = time.perf_counter() - start
    assert out.shape[1] == len(prompt) + new_tokens
    return ttft, (new_tokens - 1) / (total - ttft)


class StaticCache:
    """The buffers of a KVCache, for torch.compile: each step writes its tokens' keys and values at
    their positions and returns the whole buffers (attention masks the positions past each token)."""

    def __init__(self, cache: KVCache):
        self.layers, self.max_len = cache.layers, cache.max_len
        self.rows = torch.arange(cache.batch_size)[:, None]
        self.positions = torch.zeros(cache.batch_size, 1, dtype=torch.long)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        for buf, new in zip(self.layers[layer], (k, v)):
            buf[self.rows, :, self.positions] = new.transpose(1, 2).to(buf.dtype)
        return self.layers[layer]


def static_decode_step(model, cache: StaticCache, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's decode step (ids, positions [B, 1] -> fp32 logits [B, vocab]) through its own layers,
    with every shape fixed: what torch.compile(dynamic=False) compiles once for all positions."""
    x = model.model.embed_tokens(ids)
    cos, sin = rope_cos_sin(model.inv_freq, model.rope_scale, positions, x.dtype)
    cache.positions = positions
    mask = (torch.arange(cache.max_len)[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, 1, max_len]
    for layer in model.model.layers:
        x, _ = layer(x, cos, sin, mask, cache)
    return model.logits(model.model.norm(x)[:, -1]).float()


def time_paths(model, decoder, B: int, rounds: int, steps: int, prompt_tokens: int) -> dict:
    """Decode steps at batch B after a prompt of prompt_tokens through C, eager and compiled PyTorch,
    `steps` positions per turn, the paths in turns: tok/s of each, compile seconds, and how far the
    compiled step's logits are from eager's (relative to their largest)."""
    import torch._dynamo
    import torch._inductor.config

    cfg, dtype = model.config, next(model.parameters()).dtype
    prompt = torch.randint(0, cfg.vocab_size, (B, prompt_tokens), generator=torch.Generator().manual_seed(0))
    caches = {path: KVCache(cfg, B, prompt_tokens + steps, dtype=dtype) for path in ("c", "eager", "compile")}
    ids, tokens = prompt[:, -1:], prompt[:, -1].tolist()
    static = StaticCache(caches["compile"])
    torch._dynamo.reset()
    compiled = torch.compile(lambda ids, pos: static_decode_step(model, static, ids, pos), dynamic=False)

    def eager(position: int) -> torch.Tensor:  # as Engine._last_logits
        hidden = model(ids, position_ids=torch.full((B, 1), position), cache=caches["eager"], return_hidden=True)
        return model.logits(hidden.hidden[:, -1]).float()

    step = {"c": lambda position: decoder(tokens, [position] * B, caches["c"]), "eager": eager,
            "compile": lambda position: compiled(ids, torch.full((B, 1), position))}
    with torch.inference_mode():
        for cache in caches.values():
            model(prompt, cache=cache, return_hidden=True)
        start = time.perf_counter()
        with torch._inductor.config.patch(freezing=True):  # weights as constants: PyTorch's advice for CPU inference
            first = step["compile"](prompt_tokens)
        compile_s = time.perf_counter() - start
        reference = eager(prompt_tokens)
        error = ((first - reference).abs().max() / reference.abs().max()).item()
        speeds: dict[str, list[float]] = {path: [] for path in step}
        with torch._dynamo.config.patch(error_on_recompile=True):  # one graph for every position
            for r in range(rounds):
                for path in list(step)[r % 3:] + list(step)[:r % 3]:
                    times = []
                    for position in range(prompt_tokens, prompt_tokens + steps):
                        t = time.perf_counter()
                        step[path](position)
                        times.append(time.perf_counter() - t)
                    speeds[path].append(B / statistics.median(times))
    return {**{path: round(statistics.median(s), 1) for path, s in speeds.items()},
            "compile_s": round(compile_s, 1), "compile_rel_error": float(f"{error:.2g}")}


def compare_paths(batches: list[int], rounds: int, steps: int, prompt_tokens: int) -> dict:
    """time_paths per dtype and batch (this process's environment chooses the instruction sets)."""
    results = {}
    for dtype_name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        model = build_model(preset("small"), seed=0).to(dtype).eval()
        decoder = cpu_decode.CPUDecoder(model, cpu_decode._library())  # whatever create's rule says
        for B in batches:
            results[f"{dtype_name}_b{B}"] = time_paths(model, decoder, B, rounds, steps, prompt_tokens)
    return {"isa": torch.backends.cpu.get_cpu_capability(),
            "c_fast_matvec": [decoder.lib.fast_matvec(0), decoder.lib.fast_matvec(1)], **results}


def run_paths(args, repeats: int) -> dict:
    """compare_paths in a fresh process per profile (the instruction-set limits apply from the start)."""
    out = {}
    for profile, env in PROFILES.items():
        with tempfile.TemporaryDirectory() as inductor_cache:  # compile time from an empty cache
            cmd = [sys.executable, __file__, "--paths-worker", "--threads", str(args.threads),
                   "--prompt-tokens", str(args.prompt_tokens), "--rounds", str(repeats)] + (["--quick"] * args.quick)
            done = subprocess.run(cmd, env={**os.environ, **env, "TORCHINDUCTOR_CACHE_DIR": inductor_cache},
                                  capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{profile}: {done.stderr[-3000:]}")
        out[profile] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{profile} ({out[profile]['isa']}; C matvecs fast_matvec fp32/bf16 {out[profile]['c_fast_matvec']}):")
        for key, row in out[profile].items():
            if isinstance(row, dict):
                best = max(("c", "eager", "compile"), key=lambda p: row[p])
                print(f"  {key:9s} tok/s  C {row['c']:7.1f}  eager {row['eager']:7.1f}  compile {row['compile']:7.1f}"
                      f"  (compiled in {row['compile_s']:.0f} s; C / best other "
                      f"{row['c'] / max(row['eager'], row['compile']):.2f}; fastest: {best})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for both sides (1 avoids oversubscription on a busy machine)")
    parser.add_argument("--skip-engine", action="store_true", help="only the paths: no Engine vs transformers")
    parser.add_argument("--skip-paths", action="store_true", help="only the Engine vs transformers")
    parser.add_argument("--paths-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 5
    new_tokens = 32 if args.quick else args.new_tokens
    if args.paths_worker:
        print(json.dumps(compare_paths([1] if args.quick else [1, 16], args.rounds, 16 if args.quick else 32,
                                       args.prompt_tokens)))
        return
    results: dict = {}
    if not args.skip_engine:
        results.update(engine_against_transformers(args, repeats, new_tokens))
    if not args.skip_paths:
        results["paths"] = run_paths(args, repeats)
    print(json.dumps(results))


def engine_against_transformers(args, repeats: int, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = preset("small")
    print(f"small preset, threads={torch.get_num_threads()}, prompt {args.prompt_tokens} tokens, "
          f"{new_tokens} new tokens, greedy, median of {repeats} runs (shared machine: noisy)")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(["builtin:shakespeare"], cfg.vocab_size, Path(tmp) / "tok", show_progress=False)
        save_model(build_model(cfg, seed=0), Path(tmp) / "small", tokenizer_dir=Path(tmp) / "tok")
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
        prompt = prompt.tolist()
        for dtype_name, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16)]:
            # no prefix cache: every run prefills the whole prompt, as transformers' generate does
            engine = Engine(load_model(Path(tmp) / "small", dtype=dtype), tokenizer, max_batch_size=1, max_len=512,
                            prefix_cache=False)
            hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "small", dtype=dtype).eval()
            (ours,), = engine.generate([prompt], SamplingParams(max_tokens=new_tokens, temperature=0.0,
                                                                ignore_eos=True))
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            same = sum(a == b for a, b in zip(ours.token_ids, theirs)) / new_tokens
            runs = {"lmforge": [], "transformers": []}
            weight_bytes = matmul_params_per_token(cfg) * dtype.itemsize
            buffer, gbps = torch.empty(weight_bytes // 4, dtype=torch.float32).uniform_(), []
            for _ in range(repeats):  # interleaved, so both sides and the floor see the same background load
                runs["lmforge"].append(time_lmforge(engine, prompt, new_tokens))
                gbps.append(read_bandwidth_gbps(buffer))
                runs["transformers"].append(time_transformers(hf, prompt, new_tokens))
            del buffer
            for side, timings in runs.items():
                ttft = statistics.median(t for t, _ in timings)
                speed = statistics.median(s for _, s in timings)
                results[f"{side}_{dtype_name}_tok_s"] = round(speed, 1)
                results[f"{side}_{dtype_name}_ttft_ms"] = round(ttft * 1000, 1)
                print(f"{dtype_name}  {side:12s}  decode {speed:7.1f} tok/s   "
                      f"time to first token {ttft * 1000:6.1f} ms")
            print(f"{dtype_name}  greedy tokens equal to transformers': {same:.0%}")
            results[f"{dtype_name}_same_tokens"] = same
            # the floor of each run from the bandwidth measured right after it; reported: the medians
            floors = [g * 1e9 / weight_bytes for g in gbps]
            reached = statistics.median(s / f for (_, s), f in zip(runs["lmforge"], floors))
            results[f"read_bandwidth_{dtype_name}_GBps"] = round(statistics.median(gbps), 1)
            results[f"floor_{dtype_name}_tok_s"] = round(statistics.median(floors), 1)
            results[f"floor_{dtype_name}_reached"] = round(reached, 3)
            print(f"{dtype_name}  floor: {weight_bytes / 1e6:.0f} MB of weights per token / "
                  f"{statistics.median(gbps):.1f} GB/s read bandwidth (runs: {', '.join(f'{g:.0f}' for g in gbps)}) = "
                  f"{statistics.median(floors):.0f} tok/s; lmforge reaches {reached:.0%} (median over the runs)")
    best = {side: max(("fp32", "bf16"), key=lambda d: results[f"{side}_{d}_tok_s"])
            for side in ("lmforge", "transformers")}
    results["best"] = {side: d for side, d in best.items()}
    results["ratio_fp32"] = round(results["lmforge_fp32_tok_s"] / results["transformers_fp32_tok_s"], 2)
    results["ratio_bf16"] = round(results["lmforge_bf16_tok_s"] / results["transformers_bf16_tok_s"], 2)
    results["ratio"] = round(results[f"lmforge_{best['lmforge']}_tok_s"]
                             / results[f"transformers_{best['transformers']}_tok_s"], 2)
    return results


if __name__ == "__main__":
    main()
