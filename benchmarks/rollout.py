"""Rollout throughput of RL's generation phase (GRPO): lmforge's Engine against transformers' batched `generate`.

A GRPO step samples G completions of each prompt of its batch at temperature 1 before it scores them. Here:
P prompts (random tokens, lengths drawn around --prompt-tokens, as a batch of questions differs), G samples
each, L new tokens per sample, the same random weights on both sides (a preset built by lmforge, saved as a
Hugging Face directory, loaded by AutoModelForCausalLM), the same dtype and thread count, in one process.

- lmforge: one Engine (max_batch_size P*G, no prefix cache), every prompt submitted with
  SamplingParams(n=G, max_tokens=L, temperature=1, seed per prompt, ignore_eos=True), then stepped until
  all are done, as lmforge's own rollouts run (train/distill.py's Sampler): the G samples of a prompt share
  its one prefill, and all P*G rows decode together.
- transformers: `model.generate` on the P prompts left-padded (attention mask; as TRL's GRPOTrainer
  batches them), do_sample=True, temperature 1, top_k 0 and top_p 1 (pure sampling, as lmforge's),
  num_return_sequences=G, max_new_tokens=min_new_tokens=L and no EOS token, so it never stops early.

Both make P*G samples of exactly L tokens (checked). After a warm-up of each, the sides take turns for
--rounds rounds; each reports its best round (the least disturbed: the machine may be shared) and the
median. Where the time goes: lmforge's rollout is timed per engine step (the first step is the prefill of
every prompt and the first token of every sample; each later one a decode step of every running row);
transformers' prefill as a generate of one new token. Then one decode step of lmforge at batch 1, 8, 32,
64 and P*G (the C forward, or the model's if the C decoder does not apply, and the Engine's sampling of
the rows apart), and the compute ceiling: the CPU's matmul rate (large square matmuls, as train_step.py
measures it) / the FLOPs of a generated token (its share of the prefill, its decode step's matmuls and
attention products).

Last line: one JSON object; "ratio" = lmforge's generated tokens/s / transformers' (best rounds; target >= 3).

    python benchmarks/rollout.py [--preset tiny] [--prompts 16] [--num-generations 8] [--max-new-tokens 128]
                                 [--prompt-tokens 60] [--dtype float32|bfloat16] [--rounds 3] [--threads N] [--quick]

--threads defaults to torch's (the machine's cores). On a machine other jobs keep busy, use --threads 1: with
every core taken, each parallel op waits for a descheduled thread, which costs transformers' many small ops far
more than lmforge's one C call a step (BENCHMARKS.md), and the ratio then measures the load, not the code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from train_step import matmul_peak  # benchmarks/, the script's own folder

from lmforge.checkpoint import load_model, save_model
from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.sampling import SamplerState, choose_tokens
from lmforge.model import KVCache, build_model, matmul_params_per_token
from lmforge.tokenizer import train_tokenizer


def make_prompts(vocab_size: int, count: int, mean_length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of random tokens, lengths uniform in mean_length ± 8 (at least 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, mean_length - 8), mean_length + 9, (count,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def sampling(prompts: list[list[int]], generations: int, new_tokens: int, seed: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: G samples of exactly `new_tokens` at temperature 1; prompt i's samples
    use seeds seed + i*G ... (sample j of a request draws with its seed + j)."""
    return [SamplingParams(n=generations, max_tokens=new_tokens, temperature=1.0, seed=seed + i * generations,
                           ignore_eos=True) for i in range(len(prompts))]


def rollout_lmforge(engine: Engine, prompts: list[list[int]], generations: int, new_tokens: int,
                    seed: int) -> tuple[float, list[float]]:
    """(seconds for the whole rollout, seconds of each engine step). Submitted, then stepped in this thread,
    which is what Engine.generate does, with a clock around each step."""
    start = time.perf_counter()
    requests = [engine.submit(p, q) for p, q in zip(prompts, sampling(prompts, generations, new_tokens, seed))]
    steps = []
    while not all(r.done.is_set() for r in requests):
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    for r in requests:
        if r.error is not None:
            raise RuntimeError(f"lmforge rollout failed: {r.error!r}")
        assert len(r.outputs) == generations and all(len(o.token_ids) == new_tokens for o in r.outputs)
        assert generations == 1 or len({tuple(o.token_ids) for o in r.outputs}) > 1, "identical samples"
    return total, steps


def left_padded(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def rollout_transformers(model, ids: torch.Tensor, mask: torch.Tensor, generations: int, new_tokens: int,
                         seed: int) -> float:
    """Seconds for one batched generate of G samples of each prompt, `new_tokens` each, never stopping early."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             num_return_sequences=generations, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        seconds = time.perf_counter() - start
    assert out.shape == (ids.shape[0] * generations, ids.shape[1] + new_tokens), out.shape
    return seconds


def decode_step_parts(model, engine: Engine, batches: list[int], context: int, repeats: int) -> dict[int, dict]:
    """One decode step of lmforge at each batch size, `context` tokens already in the cache: the forward
    (engine.cpu_decoder, else the model's forward as the Engine runs it) and the Engine's choice of the next
    tokens (choose_tokens over fp32 logits, each row with its own SamplerState at temperature 1) apart, in
    milliseconds, medians of `repeats`."""
    cfg, dtype = model.config, next(model.parameters()).dtype
    params = SamplingParams(temperature=1.0, ignore_eos=True)
    out = {}
    with torch.inference_mode():
        for B in batches:
            cache = KVCache(cfg, B, context + repeats + 1, dtype=dtype)
            prompt = torch.randint(0, cfg.vocab_size, (B, context), generator=torch.Generator().manual_seed(B))
            model(prompt, cache=cache, return_hidden=True)
            tokens = prompt[:, -1].tolist()
            states = [SamplerState(params, [], cfg.vocab_size, seed) for seed in range(B)]
            forward, choose = [], []
            for position in range(context, context + repeats):
                t = time.perf_counter()
                if engine.cpu_decoder is not None:
                    logits = engine.cpu_decoder(tokens, [position] * B, cache)
                else:
                    hidden = model(torch.tensor(tokens)[:, None], position_ids=torch.full((B, 1), position),
                                   cache=cache, return_hidden=True).hidden
                    logits = model.logits(hidden[:, -1]).float()
                forward.append(time.perf_counter() - t)
                t = time.perf_counter()
                tokens = choose_tokens(logits, states)
                choose.append(time.perf_counter() - t)
            out[B] = {"forward_ms": round(statistics.median(forward) * 1e3, 3),
                      "sampling_ms": round(statistics.median(choose) * 1e3, 3)}
    return out


def flops_per_generated_token(cfg, prompts: list[list[int]], generations: int, new_tokens: int) -> float:
    """FLOPs of the whole rollout / its generated tokens, as lmforge runs it: each prompt's forward once (the
    output projection for its last token only), then a decode step per sample for each new token after the
    first; matmuls and attention's two products (QK^T and PV: 4 * heads * head_dim per key attended)."""
    per_token, head = matmul_params_per_token(cfg), cfg.vocab_size * cfg.hidden_size
    attend = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim  # FLOPs per key attended
    total = 0.0
    for p in prompts:
        n = len(p)
        total += 2 * (n * (per_token - head) + head) + attend * n * (n + 1) / 2
        total += generations * sum(2 * per_token + attend * (n + i + 1) for i in range(1, new_tokens))
    return total / (len(prompts) * generations * new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="lmforge preset (random weights): tiny, small, ...")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per rollout batch")
    parser.add_argument("--num-generations", type=int, default=8, help="samples per prompt (GRPO's G)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens of every sample (no early stop)")
    parser.add_argument("--prompt-tokens", type=int, default=60, help="mean prompt length (each within ± 8)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, both sides (1 on a busy machine: a descheduled thread stalls every "
                             "parallel op)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each side, in turns")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 32 new tokens: a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    new_tokens = 32 if args.quick else args.max_new_tokens
    P, G, dtype = args.prompts, args.num_generations, getattr(torch, args.dtype)
    samples, tokens = P * G, P * G * new_tokens

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = preset(args.preset)
    prompts = make_prompts(cfg.vocab_size, P, args.prompt_tokens)
    lengths = list(map(len, prompts))
    print(f"{args.preset} preset, random weights, {args.dtype}, {torch.get_num_threads()} threads both sides; "
          f"{P} prompts of {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}) x {G} "
          f"samples x {new_tokens} new tokens = {samples} samples, {tokens} tokens; temperature 1, no EOS stop; "
          f"best of {rounds} rounds each, in turns (a shared machine: noisy)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(["builtin:shakespeare"], cfg.vocab_size, Path(tmp) / "tok", show_progress=False)
        model_dir = save_model(build_model(cfg, seed=0), Path(tmp) / args.preset, tokenizer_dir=Path(tmp) / "tok")
        model = load_model(model_dir, dtype=dtype)
        engine = Engine(model, tokenizer, max_batch_size=samples, max_len=max(lengths) + new_tokens + 1,
                        prefix_cache=False)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ids, mask = left_padded(prompts)

    # warm-up: first calls, thread pools, allocations, at the full batch
    rollout_lmforge(engine, prompts, G, 8, seed=10_000)
    rollout_transformers(hf, ids, mask, G, 8, seed=10_000)
    runs: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    steps_of_best: list[float] = []
    hf_prefill: list[float] = []
    for r in range(rounds):
        order = ["lmforge", "transformers"] if r % 2 == 0 else ["transformers", "lmforge"]
        for side in order:
            if side == "lmforge":
                seconds, steps = rollout_lmforge(engine, prompts, G, new_tokens, seed=r * samples)
                if not runs["lmforge"] or seconds < min(runs["lmforge"]):
                    steps_of_best = steps
            else:
                seconds = rollout_transformers(hf, ids, mask, G, new_tokens, seed=r)
                hf_prefill.append(rollout_transformers(hf, ids, mask, G, 1, seed=r))  # prefill + 1 token
            runs[side].append(seconds)
            print(f"round {r + 1}  {side:12s}  {seconds:6.2f} s  {samples / seconds:7.1f} samples/s  "
                  f"{tokens / seconds:8.1f} tok/s", flush=True)

    results: dict = {"preset": args.preset, "dtype": args.dtype, "threads": torch.get_num_threads(),
                     "prompts": P, "num_generations": G, "max_new_tokens": new_tokens,
                     "prompt_tokens_mean": round(statistics.mean(lengths), 1), "rounds": rounds,
                     "torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(),
                     "c_decoder": engine.cpu_decoder is not None}
    for side, times in runs.items():
        best = min(times)
        results[f"{side}_s"] = round(best, 3)
        results[f"{side}_samples_s"] = round(samples / best, 1)
        results[f"{side}_tok_s"] = round(tokens / best, 1)
        results[f"{side}_tok_s_median"] = round(tokens / statistics.median(times), 1)
        print(f"{side:12s}  best {best:6.2f} s: {samples / best:7.1f} samples/s, {tokens / best:8.1f} generated "
              f"tok/s (median {tokens / statistics.median(times):8.1f})")

    # where the time goes
    prefill_lm, decode_lm = steps_of_best[0], steps_of_best[1:]
    prefill_hf = min(hf_prefill)
    decode_hf = (min(runs["transformers"]) - prefill_hf) / (new_tokens - 1)
    results["lmforge_prefill_ms"] = round(prefill_lm * 1e3, 1)
    results["lmforge_decode_step_ms"] = round(statistics.median(decode_lm) * 1e3, 2)
    results["lmforge_steps"] = len(steps_of_best)
    results["transformers_prefill_ms"] = round(prefill_hf * 1e3, 1)
    results["transformers_decode_step_ms"] = round(decode_hf * 1e3, 2)
    print(f"lmforge       prefill of {P} prompts + first tokens {prefill_lm * 1e3:7.1f} ms, then "
          f"{len(decode_lm)} decode steps at batch {samples}: median {statistics.median(decode_lm) * 1e3:6.2f} ms "
          f"(first {decode_lm[0] * 1e3:.2f}, last {decode_lm[-1] * 1e3:.2f}), "
          f"{sum(decode_lm) / sum(steps_of_best):.0%} of the rollout")
    print(f"transformers  prefill of {P}x{G} expanded rows + first tokens {prefill_hf * 1e3:7.1f} ms, then "
          f"{decode_hf * 1e3:6.2f} ms per decode step (mean)")
    batches = sorted({b for b in (1, 8, 32, 64) if b < samples} | {samples})
    parts = decode_step_parts(model, engine, batches, round(statistics.mean(lengths)) + new_tokens // 2,
                              repeats=5 if args.quick else 20)
    results["lmforge_decode_parts_ms"] = parts
    for B, part in parts.items():
        step = part["forward_ms"] + part["sampling_ms"]
        print(f"lmforge decode step at batch {B:4d}: forward {part['forward_ms']:7.3f} ms + sampling "
              f"{part['sampling_ms']:7.3f} ms = {B / step * 1e3:8.1f} tok/s "
              f"(sampling {part['sampling_ms'] / step:.0%})")
    peak = matmul_peak(dtype, [1024, 2048], 3)
    flops = flops_per_generated_token(cfg, prompts, G, new_tokens)
    ceiling = peak / flops
    results["matmul_peak_gflops"] = round(peak / 1e9, 1)
    results["ceiling_tok_s"] = round(ceiling, 1)
    results["lmforge_of_ceiling"] = round(results["lmforge_tok_s"] / ceiling, 3)
    results["ratio_ceiling"] = round(ceiling / results["transformers_tok_s"], 2)
    print(f"compute ceiling: {peak / 1e9:.0f} GFLOP/s ({args.dtype} matmuls) / {flops / 1e6:.2f} MFLOP per "
          f"generated token = {ceiling:.0f} tok/s; lmforge reaches {results['lmforge_of_ceiling']:.0%} of it; "
          f"the ceiling / transformers = {results['ratio_ceiling']:.2f}x")
    results["ratio"] = round(results["lmforge_tok_s"] / results["transformers_tok_s"], 2)
    results["ratio_median"] = round(results["lmforge_tok_s_median"] / results["transformers_tok_s_median"], 2)
    print(f"lmforge / transformers: {results['ratio']:.2f}x generated tok/s (target 3x)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
