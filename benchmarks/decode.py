"""Batch-1 decode speed of the `small` preset on the CPU: lmforge's Engine vs transformers' `generate`.

Same random weights on both sides (saved with lmforge, loaded by AutoModelForCausalLM), greedy,
a 128-token prompt and 128 new tokens, in fp32 and bf16. For each: time to first token (prefill +
first token) and decode tokens/s (the other 127 tokens). Also the memory-bandwidth floor: decoding
one token at batch 1 reads every weight it multiplies once, so tokens/s can not exceed
read bandwidth / weight bytes per token, the bandwidth measured by reading a buffer as large as the
weights (a CPU whose cache holds them reads them faster than from DRAM).

Each figure is the median of several runs; the machine is shared, so expect noise.
Last line: one JSON object; "ratio" = lmforge's best decode tok/s (fp32 or bf16) / transformers'
best; "ratio_fp32" and "ratio_bf16" compare each precision alone.

    python benchmarks/decode.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_model, save_model
from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams
from lmforge.model import build_model, matmul_params_per_token
from lmforge.tokenizer import train_tokenizer


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads for both sides (1 avoids oversubscription on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else 5
    new_tokens = 32 if args.quick else args.new_tokens
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = preset("small")
    print(f"small preset, threads={torch.get_num_threads()}, prompt {args.prompt_tokens} tokens, "
          f"{new_tokens} new tokens, greedy, median of {repeats} runs (shared machine: noisy)")
    results: dict[str, float] = {}
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
    print(json.dumps(results))


if __name__ == "__main__":
    main()
