"""The Engine's choice of next tokens at a rollout's batch: choose_tokens (sampled rows batched) against the
row-by-row path (choose_one_by_one: choose_token on each row, what choose_tokens ran for every sampled row
before).

Random fp32 logits [batch, vocab] (normal, scale 3: at temperature 0.7 a row's 256 most likely tokens hold
95-99.9% of it at vocabulary 6400, so top_p 0.9 sorts no whole row), every row with its own seeded
SamplerState, the same seeds on both sides; each round times both on the same logits, in turns, and checks
that they chose the same tokens and drew as many numbers from each generator. Settings: pure sampling at
temperature 1 (RL rollouts, GRPO's default), temperature 0.7 with top_p 0.9, top_k 50, min_p 0.05, and a
repetition penalty (its logits transform stays row by row; the rest is batched).

Last line: one JSON object; per vocabulary and setting, the milliseconds of one call (best round, median in
brackets in the printed table) and "speedup" = row by row / batched.

    python benchmarks/sampling.py [--batch 128] [--vocab 2048 6400] [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmforge.infer.sampling import SamplerState, SamplingParams, choose_one_by_one, choose_tokens

SETTINGS = {
    "temperature 1": {},
    "temperature 0.7, top_p 0.9": dict(temperature=0.7, top_p=0.9),
    "top_k 50": dict(top_k=50),
    "min_p 0.05": dict(min_p=0.05),
    "repetition penalty 1.1": dict(repetition_penalty=1.1),
}


def compare(batch: int, vocab: int, params: SamplingParams, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of each round, row by row and batched; raises if the two ever choose differently."""
    prompt = list(range(0, vocab, max(1, vocab // 60)))  # what the penalties count as seen
    sides = [[SamplerState(params, prompt, vocab, seed=i) for i in range(batch)] for _ in range(2)]
    g = torch.Generator().manual_seed(vocab)
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds + 1):  # round 0 warms up
        logits = torch.randn(batch, vocab, generator=g) * 3
        chosen = []
        for side, (choose, states) in enumerate(zip((choose_one_by_one, choose_tokens), sides)):
            t = time.perf_counter()
            chosen.append(choose(logits, states))
            if r:
                times[side].append(time.perf_counter() - t)
        if chosen[0] != chosen[1]:
            raise AssertionError(f"vocab {vocab}, {params}: the batched path chose other tokens")
        for states in sides:
            for state, token in zip(states, chosen[0]):
                state.observe(token)
    for a, b in zip(*sides):
        assert a.generator is None or torch.equal(a.generator.get_state(), b.generator.get_state())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="rows (GRPO: prompts x samples)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[2048, 6400], help="vocabulary sizes")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as the Engine samples)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"choose_tokens at batch {args.batch}, {args.threads} thread(s), torch {torch.__version__}: "
          f"best of {args.rounds} rounds (median), same tokens checked every round")
    results = []
    for vocab in args.vocab:
        for name, options in SETTINGS.items():
            slow, fast = compare(args.batch, vocab, SamplingParams(**options), args.rounds)
            row = {"vocab": vocab, "setting": name, "row_by_row_ms": round(min(slow) * 1e3, 3),
                   "batched_ms": round(min(fast) * 1e3, 3), "speedup": round(min(slow) / min(fast), 2)}
            results.append(row)
            print(f"vocab {vocab:6d}  {name:28s} row by row {row['row_by_row_ms']:7.2f} ms "
                  f"({statistics.median(slow) * 1e3:7.2f})   batched {row['batched_ms']:7.2f} ms "
                  f"({statistics.median(fast) * 1e3:7.2f})   {row['speedup']:.2f}x", flush=True)
    print(json.dumps({"batch": args.batch, "threads": args.threads, "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
