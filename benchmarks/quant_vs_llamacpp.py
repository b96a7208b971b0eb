"""Quantised batch-1 decode and quality of the `small` preset: lmforge against llama.cpp at equal bits (issue 19).

One model, one run, side by side: lmforge's Engine in fp32 (its C decoder), int8 (per channel) and int4 (groups of
32, q4_0's block) from `lmforge quantize`, against llama.cpp (llama-cpp-python) on the f32, q8_0 and q4_0 GGUF files
`lmforge export` writes from the same fp32 weights. 2 threads each.

- Decode: greedy, a 128-token prompt then N new tokens (time_lmforge of decode.py for lmforge; for llama.cpp the
  prompt in one `eval`, then token by token `eval` of the argmax of the last logits, only those timed), median of
  several runs, the sides in turns so each sees the same background load. With each: the memory-bandwidth floor,
  tokens/s <= read bandwidth / bytes of weights read per token (every matrix is read once per token; the tied
  embedding is read as the output matrix: fp32 for lmforge's fp32, its int8 copy in the C decoder's quantised
  models, whose int4 matrices it reads two a byte: decoder_bytes), the bandwidth measured between the runs with
  decode.py's read_bandwidth_gbps.
- Quality: held-out bits per byte of the built-in Shakespeare (the val pieces `prepare` takes at 5%), over the same
  disjoint token windows (rolling_windows, as lmforge.eval.loglik.bits_per_byte) for both sides: lmforge through
  score_tokens, llama.cpp through its logits (logits_all=True) on the same inputs; reported as the increase over
  each side's own fp32/f32.

The model: runs/bench-distill/teacher-small-400/final (small, trained 400 steps by benchmarks/distill.py) with its
tokenizer, if present; else random weights (then the quality figures mean little). The machine may be shared.

Last line: one JSON object; "ratio" = lmforge int8 decode tok/s / llama.cpp q8_0 decode tok/s.

    python benchmarks/quant_vs_llamacpp.py [--quick] [--decode-only] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from decode import read_bandwidth_gbps, time_lmforge

from lmforge.checkpoint import load_model, save_model
from lmforge.config import preset
from lmforge.eval.loglik import (
    builtin_heldout_tokens,
    prefix_token_id,
    rolling_windows,
    score_tokens,
)
from lmforge.export import export_gguf
from lmforge.infer import Engine
from lmforge.model import build_model
from lmforge.quantize import quantize
from lmforge.tokenizer import Tokenizer, train_tokenizer

TRAINED = Path(__file__).resolve().parent.parent / "runs/bench-distill/teacher-small-400/final"
PAIRS = [("fp32", "f32"), ("int8", "q8_0"), ("int4", "q4_0")]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors once), the cos/sin tables of RoPE left out."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or "rope" in name or "cos" in name or "sin" in name:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def decoder_bytes(engine: Engine) -> int:
    """Bytes of weights an lmforge decode step reads: the model's (weight_bytes), or, where the C decoder runs a
    quantised model, what it reads instead: its matrices as it holds them (int8 as the QuantLinear layers hold them,
    int4 two a byte, their scales, the int8 copy of the output matrix) and the norms (the embedding is read a row a
    token)."""
    decoder = engine.cpu_decoder
    if decoder is None or decoder.quantized_weights is None:
        return weight_bytes(engine.model)
    norms = [p for name, p in engine.model.named_parameters() if "norm" in name]
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in decoder.quantized_weights + norms}.values())


def gguf_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def llama(path: Path, n_ctx: int, logits_all: bool = False):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_threads=2, n_threads_batch=2, n_ctx=n_ctx, n_batch=n_ctx,
                           logits_all=logits_all, verbose=False)


def time_llama_cpp(llm, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, decode tokens/s over the rest, the greedy tokens): the prompt in one eval, then
    each token's eval after the argmax of the last logits."""
    n_vocab = llm.n_vocab()
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
    first = time.perf_counter()
    out = [token]
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
        out.append(token)
    end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first), out


def llama_cpp_nll(llm, windows: list[tuple[list[int], list[int]]], max_length: int) -> float:
    """Total NLL (nats) of each window's continuation, the inputs built as score_tokens builds them."""
    total = 0.0
    for context, continuation in windows:
        inputs = (context + continuation)[-(max_length + 1):][:-1]
        llm.reset()
        llm.eval(inputs)
        logits = torch.from_numpy(np.array(llm.scores[len(inputs) - len(continuation):len(inputs)], dtype=np.float32))
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        total -= logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 runs of 32 tokens, 4 KB of held-out text")
    parser.add_argument("--model", default=str(TRAINED), help="a small model directory with its tokenizer "
                        "(default: benchmarks/distill.py's teacher; random weights if it is missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256, help="the quality windows' length (the teacher's)")
    parser.add_argument("--decode-only", action="store_true", help="skip the quality figures (minutes of scoring), "
                        "for the decode figures of a quiet moment on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, new_tokens, max_bytes = (2, 32, 4000) if args.quick else (5, 128, 48000)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = Path(args.model)
        if (source / "config.json").is_file():
            tokenizer = Tokenizer.from_dir(source)
            save_model(load_model(source, dtype=torch.float32), tmp / "fp32", tokenizer_dir=source,
                       dtype=torch.float32)
            results["model"] = str(source.relative_to(TRAINED.parents[2]) if source.is_relative_to(TRAINED.parents[2])
                                   else source)
        else:
            cfg = preset("small")
            tokenizer = train_tokenizer(["builtin:shakespeare"], cfg.vocab_size, tmp / "tok", show_progress=False)
            save_model(build_model(cfg, seed=0), tmp / "fp32", tokenizer_dir=tmp / "tok")
            results["model"] = "random weights (quality figures mean little)"
        quantize(tmp / "fp32", "int8", tmp / "int8")
        quantize(tmp / "fp32", "int4", tmp / "int4", group_size=32)
        for _, kind in PAIRS:
            export_gguf(tmp / "fp32", tmp / f"{kind}.gguf", kind)
        print(f"model: {results['model']}; threads={args.threads}, 128-token prompt, {new_tokens} new tokens, "
              f"greedy, median of {repeats} runs (the machine may be shared: noisy)", flush=True)

        # ---- quality: the same windows on both sides
        tokens, n_bytes = builtin_heldout_tokens(tokenizer, max_bytes)
        windows = rolling_windows(tokens, prefix_token_id(tokenizer), args.seq_len)
        bpb: dict[str, float] = {}
        models = {name: load_model(tmp / name) for name, _ in PAIRS}
        for name, kind in [] if args.decode_only else PAIRS:
            nll = -sum(ll for ll, _ in score_tokens(models[name], windows, max_length=args.seq_len, batch_size=8))
            bpb[name] = nll / math.log(2) / n_bytes
            llm = llama(tmp / f"{kind}.gguf", args.seq_len + 1, logits_all=True)
            bpb[kind] = llama_cpp_nll(llm, windows, args.seq_len) / math.log(2) / n_bytes
            del llm
            print(f"bits per byte ({len(tokens)} tokens, {n_bytes} bytes): lmforge {name} {bpb[name]:.4f}   "
                  f"llama.cpp {kind} {bpb[kind]:.4f}", flush=True)
        results["heldout_tokens"], results["heldout_bytes"] = len(tokens), n_bytes

        # ---- decode
        prompt = torch.randint(0, tokenizer.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
        engines = {name: Engine(models[name], tokenizer, max_batch_size=1, max_len=512, prefix_cache=False)
                   for name, _ in PAIRS}
        llms = {kind: llama(tmp / f"{kind}.gguf", 512) for _, kind in PAIRS}
        nbytes = {name: decoder_bytes(engines[name]) for name, _ in PAIRS}
        nbytes.update({kind: gguf_bytes(tmp / f"{kind}.gguf") for _, kind in PAIRS})
        buffer = torch.empty(nbytes["fp32"] // 4, dtype=torch.float32).uniform_()
        runs: dict[str, list] = {name: [] for pair in PAIRS for name in pair}
        gbps, greedy = [], {}
        for _ in range(repeats):
            for name, kind in PAIRS:
                runs[name].append(time_lmforge(engines[name], prompt, new_tokens))
                ttft, speed, greedy[kind] = time_llama_cpp(llms[kind], prompt, new_tokens)
                runs[kind].append((ttft, speed))
            gbps.append(read_bandwidth_gbps(buffer))
        del buffer
        bandwidth = statistics.median(gbps)
        results["read_bandwidth_GBps"] = round(bandwidth, 1)
        print(f"read bandwidth {bandwidth:.1f} GB/s (runs: {', '.join(f'{g:.0f}' for g in gbps)})")
        for name, kind in PAIRS:
            for side, key, ref in (("lmforge", name, "fp32"), ("llama.cpp", kind, "f32")):
                speed = statistics.median(s for _, s in runs[key])
                ttft = statistics.median(t for t, _ in runs[key])
                floor = bandwidth * 1e9 / nbytes[key]
                results[key] = {"decode_tok_s": round(speed, 1), "ttft_ms": round(ttft * 1000, 1),
                                "weight_mb": round(nbytes[key] / 1e6, 2), "floor_tok_s": round(floor, 1),
                                "floor_reached": round(speed / floor, 3)}
                quality = ""
                if not args.decode_only:
                    results[key].update(bits_per_byte=round(bpb[key], 5),
                                        bpb_increase=round(bpb[key] - bpb[ref], 5) + 0.0)
                    quality = f"  bits/byte {bpb[key]:.5f} ({bpb[key] - bpb[ref]:+.5f})"
                print(f"{side:9s} {key:5s} decode {speed:7.1f} tok/s  first token {ttft * 1000:6.1f} ms  "
                      f"weights {nbytes[key] / 1e6:6.1f} MB  floor {floor:6.0f} tok/s ({speed / floor:.0%}){quality}")
            ratio = results[name]["decode_tok_s"] / results[kind]["decode_tok_s"]
            print(f"  lmforge {name} / llama.cpp {kind}: {ratio:.2f}x")
    results["ratio"] = round(results["int8"]["decode_tok_s"] / results["q8_0"]["decode_tok_s"], 3)
    results["ratio_int4_vs_q4_0"] = round(results["int4"]["decode_tok_s"] / results["q4_0"]["decode_tok_s"], 3)
    results["ratio_fp32_vs_f32"] = round(results["fp32"]["decode_tok_s"] / results["f32"]["decode_tok_s"], 3)
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
