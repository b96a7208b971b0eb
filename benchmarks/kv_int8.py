"""The int8 KV cache (Int8KVCache) at 2k tokens of context: its memory, decode speed and quality (issue 19).

The `small` preset (max_position_embeddings 32768), weights fp32 and bf16, each with its own-dtype cache ("auto")
and with the int8 cache; 2 threads.

- Memory: the Engine's cache bytes for one row of 2048 positions (Int8KVCache.nbytes: int8 entries, a fp32 scale
  per head and block of 32 positions, the open block in the weights' dtype).
- Decode: batch 1, greedy, a 1984-token prompt then 63 new tokens (positions 1984..2046), timed per engine step as
  decode.py's time_lmforge, median of several runs, the configurations in turns. Every configuration runs the
  model's PyTorch forward (cpu_decoder=False): the C decoder reads fp caches only, so this compares the caches
  on one path. Besides tokens/s (wall clock), the process's CPU time per decoded token, which a busy shared
  machine disturbs less (it counts only the time this process ran, every thread's).
- Quality, on the built-in Shakespeare's held-out pieces (the val pieces `prepare` takes at 5%):
  1. bits per byte within the model's training context (256 tokens: the teacher was trained at seq_len 256),
     over disjoint windows (rolling_windows, as lmforge.eval.loglik.bits_per_byte);
  2. at 2k: one 2048-token stretch of the same text, the mean and largest per-position KL(fp cache || int8 cache)
     of the next-token distributions, and both caches' bits per byte over it. Past 256 tokens the model is out of
     its training length (its predictions there are poor with either cache); the KL still measures what the
     int8 cache changes.
  Tokens go through the cache 32 at a time (one block), so each token sees what it sees when decoding: the complete
  blocks quantised, its own block in full precision.

The model: runs/bench-distill/teacher-small-400/final (small, trained 400 steps by benchmarks/distill.py) with its
tokenizer, if present; else random weights (then the quality figures mean little). The machine may be shared.

Last line: one JSON object; "ratio" = bf16 cache bytes / int8 cache bytes (bf16 weights), with the speeds and the
quality figures as other keys.

    python benchmarks/kv_int8.py [--quick] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_model
from lmforge.config import preset
from lmforge.eval.loglik import builtin_heldout_tokens, prefix_token_id, rolling_windows
from lmforge.infer import Engine, SamplingParams
from lmforge.model import Int8KVCache, Transformer, build_model
from lmforge.tokenizer import Tokenizer, train_tokenizer

TRAINED = Path(__file__).resolve().parent.parent / "runs/bench-distill/teacher-small-400/final"
CONTEXT = 2048
CONFIGS = [("fp32", torch.float32, "auto"), ("fp32+int8", torch.float32, "int8"),
           ("bf16", torch.bfloat16, "auto"), ("bf16+int8", torch.bfloat16, "int8")]


@torch.inference_mode()
def log_probs_through_cache(model: Transformer, inputs: torch.Tensor, kv_cache_dtype: str) -> torch.Tensor:
    """fp32 log-softmax [rows, T, vocab] of inputs [rows, T], fed through a fresh cache one block at a time."""
    rows, T = inputs.shape
    cache = model.new_cache(rows, T, kv_cache_dtype=kv_cache_dtype)
    out = []
    for start in range(0, T, Int8KVCache.block):
        chunk = inputs[:, start:start + Int8KVCache.block]
        positions = torch.arange(start, start + chunk.shape[1]).expand(rows, -1)
        out.append(model(chunk, position_ids=positions, cache=cache).logits.float().log_softmax(-1))
    return torch.cat(out, 1)


def windows_nll(model: Transformer, windows, seq_len: int, kv_cache_dtype: str) -> float:
    """Summed negative log-likelihood (nats) of every window's continuation, its context before it."""
    total = 0.0
    for context, continuation in windows:
        inputs = (context + continuation)[-(seq_len + 1):][:-1]
        logp = log_probs_through_cache(model, torch.tensor([inputs]), kv_cache_dtype)[0, -len(continuation):]
        total -= logp.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
    return total


def time_decode(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, float, float]:
    """(seconds to the first token, decode tokens/s over the rest, CPU milliseconds per decoded token): decode.py's
    time_lmforge, with the process's CPU time too."""
    request = engine.submit(prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    engine.step()  # prefill and the first token
    first, cpu = time.perf_counter(), time.process_time()
    while not request.done.is_set():
        engine.step()  # one token
    end, cpu = time.perf_counter(), time.process_time() - cpu
    assert len(request.outputs[0].token_ids) == new_tokens
    return first - start, (new_tokens - 1) / (end - first), cpu * 1000 / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 runs, 8 KB of held-out text for the 256 windows")
    parser.add_argument("--model", default=str(TRAINED), help="a small model directory with its tokenizer "
                        "(default: benchmarks/distill.py's teacher; random weights if it is missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256, help="the quality windows' length (the teacher's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, max_bytes = (2, 8000) if args.quick else (3, 48000)
    source = Path(args.model)
    if (source / "config.json").is_file():
        tokenizer, fp32 = Tokenizer.from_dir(source), load_model(source, dtype=torch.float32)
        name = str(source.relative_to(TRAINED.parents[2]) if source.is_relative_to(TRAINED.parents[2]) else source)
    else:
        cfg = preset("small")
        tokenizer = train_tokenizer(["builtin:shakespeare"], cfg.vocab_size, "/tmp/kv_int8_tok", show_progress=False)
        fp32, name = build_model(cfg, seed=0), "random weights (quality figures mean little)"
    fp32.eval()
    models = {torch.float32: fp32, torch.bfloat16: build_model(fp32.config, dtype=torch.bfloat16, init=False)}
    models[torch.bfloat16].load_state_dict(fp32.state_dict())
    models[torch.bfloat16].eval()
    results: dict = {"model": name, "context": CONTEXT, "threads": args.threads}
    print(f"model: {name}; context {CONTEXT}, threads={args.threads} (the machine may be shared: noisy)", flush=True)

    # ---- memory: one row of CONTEXT positions
    for label, dtype, kv in CONFIGS:
        cache = models[dtype].new_cache(1, CONTEXT, kv_cache_dtype=kv)
        results[label] = {"cache_bytes": cache.nbytes}
        print(f"{label:10s} cache {cache.nbytes / 2**20:7.3f} MiB per row of {CONTEXT} positions")

    # ---- quality 1: held-out bits per byte within the training context
    tokens, n_bytes = builtin_heldout_tokens(tokenizer, max_bytes)
    windows = rolling_windows(tokens, prefix_token_id(tokenizer), args.seq_len)
    for label, dtype, kv in CONFIGS:
        bpb = windows_nll(models[dtype], windows, args.seq_len, kv) / math.log(2) / n_bytes
        results[label][f"bpb_{args.seq_len}"] = round(bpb, 5)
    results["heldout_tokens"], results["heldout_bytes"] = len(tokens), n_bytes
    for label, dtype, _ in CONFIGS:
        base = "fp32" if dtype == torch.float32 else "bf16"
        increase = results[label][f"bpb_{args.seq_len}"] - results[base][f"bpb_{args.seq_len}"]
        results[label][f"bpb_{args.seq_len}_increase"] = round(increase, 6) + 0.0
        print(f"{label:10s} bits per byte {results[label][f'bpb_{args.seq_len}']:.5f} ({increase:+.6f}) over "
              f"{len(tokens)} held-out tokens ({n_bytes} bytes) in windows of {args.seq_len}", flush=True)

    # ---- quality 2: KL and bits per byte over one CONTEXT-token stretch
    stream, stream_bytes = builtin_heldout_tokens(tokenizer, 5 * CONTEXT)
    stream = [prefix_token_id(tokenizer)] + stream[:CONTEXT]
    inputs, targets = torch.tensor([stream[:-1]]), torch.tensor(stream[1:])
    text_bytes = len(tokenizer.decode(stream[1:]).encode("utf-8"))
    for dtype, base, quantised in ((torch.float32, "fp32", "fp32+int8"), (torch.bfloat16, "bf16", "bf16+int8")):
        ref = log_probs_through_cache(models[dtype], inputs, "auto")[0]
        got = log_probs_through_cache(models[dtype], inputs, "int8")[0]
        kl = (ref.exp() * (ref - got)).sum(-1)  # [T]
        for label, logp in ((base, ref), (quantised, got)):
            nll = -logp.gather(-1, targets[:, None]).sum().item()
            results[label][f"bpb_{CONTEXT}"] = round(nll / math.log(2) / text_bytes, 5)
        results[quantised][f"kl_{CONTEXT}_mean"] = float(f"{kl.mean().item():.3g}")
        results[quantised][f"kl_{CONTEXT}_max"] = float(f"{kl.max().item():.3g}")
        results[quantised][f"kl_past_{args.seq_len}_mean"] = float(f"{kl[args.seq_len:].mean().item():.3g}")
        agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        results[quantised][f"top1_agree_{CONTEXT}"] = round(agree, 4)
        print(f"{quantised:10s} over {CONTEXT} tokens: KL(fp || int8) mean {kl.mean():.2e} max {kl.max():.2e} "
              f"(past {args.seq_len}: {kl[args.seq_len:].mean():.2e}), top-1 agreement {agree:.2%}, bits per byte "
              f"{results[quantised][f'bpb_{CONTEXT}']:.5f} vs {results[base][f'bpb_{CONTEXT}']:.5f}", flush=True)

    # ---- decode speed at CONTEXT
    prompt = torch.randint(0, tokenizer.vocab_size, (CONTEXT - 64,), generator=torch.Generator().manual_seed(0))
    engines = {label: Engine(models[dtype], tokenizer, max_batch_size=1, max_len=CONTEXT, prefix_cache=False,
                             cpu_decoder=False, kv_cache_dtype=kv) for label, dtype, kv in CONFIGS}
    runs: dict[str, list] = {label: [] for label, _, _ in CONFIGS}
    for _ in range(repeats):
        for label, _, _ in CONFIGS:
            runs[label].append(time_decode(engines[label], prompt.tolist(), 63))
    for label, _, _ in CONFIGS:
        ttft, speed, cpu_ms = (statistics.median(run[i] for run in runs[label]) for i in range(3))
        results[label].update(decode_tok_s=round(speed, 1), decode_cpu_ms=round(cpu_ms, 2), prefill_s=round(ttft, 2))
        speeds = ", ".join(f"{s:.1f}" for _, s, _ in runs[label])
        print(f"{label:10s} decode {speed:6.1f} tok/s (runs: {speeds}), {cpu_ms:6.2f} CPU ms a token, at positions "
              f"{CONTEXT - 64}..{CONTEXT - 2}; prompt + first token {ttft:.2f} s", flush=True)

    results["ratio"] = round(results["bf16"]["cache_bytes"] / results["bf16+int8"]["cache_bytes"], 3)
    results["ratio_fp32_cache"] = round(results["fp32"]["cache_bytes"] / results["fp32+int8"]["cache_bytes"], 3)
    results["speed_int8_vs_bf16"] = round(results["bf16+int8"]["decode_tok_s"] / results["bf16"]["decode_tok_s"], 3)
    results["speed_int8_vs_fp32"] = round(results["fp32+int8"]["decode_tok_s"] / results["fp32"]["decode_tok_s"], 3)
    for dtype in ("bf16", "fp32"):
        results[f"cpu_time_int8_vs_{dtype}"] = round(results[f"{dtype}+int8"]["decode_cpu_ms"]
                                                     / results[dtype]["decode_cpu_ms"], 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
