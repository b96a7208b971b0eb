"""Decode speed with the most and longest stop strings a request may have, against none (issue 14).

The `tiny` preset (random weights) with a tokenizer trained on the built-in Shakespeare, batch 1, greedy,
a fixed prompt and N new tokens, run twice per round: without stop strings, and with MAX_STOP_STRINGS
strings of MAX_STOP_CHARS characters built to be as costly as possible and never to match: pieces of
the very text the model generates, with a character it never writes at the end (the held-back tail stays
long, the stop-string automaton follows failure links) or at the start (every tail of the text must be
ruled out for them). Both runs must give the same tokens and text. A tiny model decodes fast, so the
stop strings' share of each token shows plainly.

Last line: one JSON object; "ratio" = decode tokens/s with the stop strings / without (1.0: they cost
nothing; higher is better), each the best of its rounds: the rounds alternate on the same engine, and on a
shared machine the best is the one least slowed by others (medians printed too). Also the Detokenizer's
own microseconds a token, the tokens replayed through it without the model.

    python benchmarks/stop_strings.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.config import preset
from lmforge.infer import Engine, Output, SamplingParams
from lmforge.infer.detokenize import Detokenizer
from lmforge.infer.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer


def decode_speed(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[float, Output]:
    """(tokens/s over the tokens after the first, the output), stepping the engine in this thread."""
    request = engine.submit(prompt, params)
    engine.step()  # prefill and the first token
    start = time.perf_counter()
    while not request.done.is_set():
        engine.step()
    seconds = time.perf_counter() - start
    out = request.outputs[0]
    assert len(out.token_ids) == params.max_tokens and out.finish_reason == "length"
    return (params.max_tokens - 1) / seconds, out


def detokenize_us(engine: Engine, prompt: list[int], tokens: list[int], stop: list[str], repeats: int = 5) -> float:
    """Microseconds a token for a Detokenizer (built per request, as the engine does) to take `tokens`:
    the best of `repeats`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        detok = Detokenizer(engine.tokenizer, prompt, stop)
        for token in tokens:
            detok.add(token)
        detok.finish()
        best = min(best, time.perf_counter() - start)
    return best / len(tokens) * 1e6


def adversarial_stops(text: str) -> list[str]:
    """MAX_STOP_STRINGS strings of MAX_STOP_CHARS characters that never match `text`: pieces of it spread
    over it, with a character it does not hold at the end (a long partial match for a while: a long
    held-back tail, failure links to follow) or at the start (never begun: every tail has to be ruled
    out, the worst case of a check that rescans the tail for each string)."""
    never = next(c for c in map(chr, range(0x2500, 0x2600)) if c not in text)
    length = MAX_STOP_CHARS - 1
    starts = [i * max(1, (len(text) - length) // MAX_STOP_STRINGS) for i in range(MAX_STOP_STRINGS)]
    pieces = [text[s:s + length].ljust(length, "x") for s in starts]
    half = MAX_STOP_STRINGS // 2
    return [never + p for p in pieces[:half]] + [p + never for p in pieces[half:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens")
    parser.add_argument("--new-tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    new_tokens, rounds = (200, 2) if args.quick else (args.new_tokens, args.rounds)
    torch.manual_seed(0)
    config = preset("tiny", max_position_embeddings=4096)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(["builtin:shakespeare"], config.vocab_size, Path(tmp) / "tok",
                                    show_progress=False)
    engine = Engine(build_model(config, seed=0), tokenizer, max_batch_size=1, max_len=new_tokens + 64,
                    prefix_cache=False)
    prompt = tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?\n")
    plain = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(2):  # warm-up (the first steps are slow), and the text the stop strings are cut from
        _, expected = decode_speed(engine, prompt, plain)
    stops = adversarial_stops(expected.text)
    runs = {"none": plain, "stops": SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                                                   stop=stops)}
    print(f"tiny preset, {torch.get_num_threads()} threads, {new_tokens} new tokens ({len(expected.text)} "
          f"characters), greedy, batch 1; {len(stops)} stop strings of {MAX_STOP_CHARS} characters; {rounds} rounds")
    speeds: dict[str, list[float]] = {"none": [], "stops": []}
    for i in range(rounds):  # each round runs both, in turn first, so both see the same background load
        for name in sorted(runs, reverse=i % 2 == 1):
            speed, out = decode_speed(engine, prompt, runs[name])
            assert out.text == expected.text, "stop strings changed the output"
            speeds[name].append(speed)
    best = {name: max(values) for name, values in speeds.items()}
    median = {name: statistics.median(values) for name, values in speeds.items()}
    for name, label in (("none", "without stop strings"), ("stops", "with stop strings")):
        print(f"{label:21s} best {best[name]:7.1f} tok/s, median {median[name]:7.1f} "
              f"(rounds: {', '.join(f'{s:.0f}' for s in speeds[name])})")
    # The stop strings' own cost, apart from the model: the tokens replayed through the Detokenizer alone.
    detok_us = {name: detokenize_us(engine, prompt, expected.token_ids, params.stop) for name, params in runs.items()}
    print(f"Detokenizer alone: {detok_us['none']:.1f} us a token without stop strings, {detok_us['stops']:.1f} with")
    print(json.dumps({"benchmark": "stop_strings", "new_tokens": new_tokens, "characters": len(expected.text),
                      "stop_strings": len(stops), "stop_chars": MAX_STOP_CHARS, "tok_s_none": round(best["none"], 1),
                      "tok_s_stops": round(best["stops"], 1), "detok_us_none": round(detok_us["none"], 2),
                      "detok_us_stops": round(detok_us["stops"], 2),
                      "ratio_median": round(median["stops"] / median["none"], 3),
                      "ratio": round(best["stops"] / best["none"], 3)}))

if __name__ == "__main__":
    main()
