"""Serving throughput: total generated tokens/s of `lmforge serve` with 1, 4 and 16 concurrent streaming clients.

The `small` preset with random weights (and a tokenizer trained on the built-in corpus) is served by the real
command, `lmforge serve`, in a subprocess on 127.0.0.1. Each client is a coroutine (all in one thread, raw
HTTP) that sends streaming /v1/completions requests one after another (each a prompt of its own, random tokens,
so that the server's prefix cache finds nothing to reuse; a fixed number of new tokens via vLLM's `ignore_eos`,
greedy) and counts the tokens the final usage chunk reports. A
round gives every client the same bounded number of requests; throughput = all tokens of the round / its wall
time. The levels take turns (1, 4, 16 clients, then again), so that each sees the same share of the shared
machine's swings in speed, and each reports the median of its rounds.

For the record beside the HTTP figures, the engine alone (in this process, no server) decodes a batch of 1
and of 16, in turns too, which separates what continuous batching gives from what the HTTP layer costs.

And the compute ceiling of the batched level, as decode.py reports the bandwidth floor of batch 1: with many
streams a token costs the multiply-adds of its share of the prefill and of its own decode step, so tokens/s
can not exceed the CPU's matmul rate (measured here, as in train_step.py: large square matmuls in the
served dtype) / FLOPs per generated token. One stream is bound by reading the weights instead, so the
ratio a machine allows is about ceiling / one client's tokens/s ("ratio_ceiling"), and against the engine's
own single stream, without the per-request cost of HTTP, ceiling / the engine's batch-1 tokens/s
("ratio_ceiling_engine").

Last line: one JSON object; "ratio" = tokens/s with 16 clients / tokens/s with 1 client (target >= 6).

    python benchmarks/serve.py [--quick] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from train_step import matmul_peak  # benchmarks/, the script's own folder

from lmforge.checkpoint import save_model
from lmforge.config import preset
from lmforge.infer import Engine, SamplingParams
from lmforge.model import build_model, matmul_params_per_token
from lmforge.tokenizer import train_tokenizer

LEVELS = (1, 4, 16)


def flops_per_generated_token(cfg, prompt_tokens: int, new_tokens: int) -> float:
    """Matmul FLOPs of one request / its new tokens: the prompt's forward (the output projection for its last
    token only, as the engine computes it), then a decode step for each new token after the first. Attention's
    own products (~2% here) are left out."""
    per_token, head = matmul_params_per_token(cfg), cfg.vocab_size * cfg.hidden_size
    return 2 * (prompt_tokens * (per_token - head) + head + (new_tokens - 1) * per_token) / new_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stream_completion(port: int, body: bytes) -> int:
    """Send one streaming request over a raw HTTP/1.1 connection and read it to the end; the number of
    tokens its usage chunk reports. Raw asyncio rather than an HTTP client library: the clients share
    the server's 2 cores, and 16 httpx client threads took ~0.6 of them at ~2700 tok/s (measured),
    which the server then lacked. The body is parsed once, after the stream ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    chunks = []
    while data := await reader.read(1 << 16):
        chunks.append(data)
    writer.close()
    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    payload = bytearray()  # undo the chunked transfer encoding
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        size = int(size, 16)
        payload += rest[:size]
        rest = rest[size + 2:]
    events = [line[len(b"data: "):] for line in payload.split(b"\n") if line.startswith(b"data: {")]
    usage = [json.loads(e)["usage"] for e in events if b'"usage": {' in e]
    if payload.rstrip().split(b"\n")[-1] != b"data: [DONE]" or not usage:
        raise RuntimeError("stream did not end with a usage chunk and [DONE]")
    return usage[-1]["completion_tokens"]


def prompts(cfg, length: int):
    """Distinct prompts of random tokens, an endless supply (seeded: every run sends the same ones)."""
    generator = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, cfg.vocab_size, (length,), generator=generator).tolist()


def run_round(port: int, clients: int, requests_per_client: int, body: dict, next_prompt) -> float:
    """Every client sends its requests in turn, each with the next prompt; returns total generated tokens /
    wall seconds."""
    bodies = [json.dumps({**body, "prompt": next(next_prompt)}).encode() for _ in range(clients * requests_per_client)]

    async def client(c: int) -> int:
        mine = bodies[c * requests_per_client:(c + 1) * requests_per_client]
        return sum([await stream_completion(port, raw) for raw in mine])

    async def all_clients() -> tuple[int, float]:
        start = time.perf_counter()
        counts = await asyncio.gather(*(client(c) for c in range(clients)))
        return sum(counts), time.perf_counter() - start

    tokens, elapsed = asyncio.run(all_clients())
    expected = clients * requests_per_client * body["max_tokens"]
    assert tokens == expected, f"{tokens} tokens generated, {expected} asked for"
    return tokens / elapsed


def engine_alone(model_dir: Path, dtype: str, next_prompt, new_tokens: int, batches: tuple[int, ...],
                 repeats: int) -> dict[int, float]:
    """Tokens/s of the engine itself, per batch size b of `batches`, generating for b new prompts at once
    (prefill included, no HTTP), stepped by its background thread as under the server; the batch sizes
    take turns, the median of `repeats` each."""
    prompt = next(next_prompt)
    engine = Engine.from_pretrained(model_dir, dtype=dtype, max_batch_size=max(batches),
                                    max_len=len(prompt) + new_tokens + 1)
    engine.start()  # its own thread, as under the server
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    speeds: dict[int, list[float]] = {batch: [] for batch in batches}
    try:
        engine.generate([prompt], params)  # warm-up
        for _ in range(repeats):
            for batch in batches:
                start = time.perf_counter()
                engine.generate([next(next_prompt) for _ in range(batch)], params)
                speeds[batch].append(batch * new_tokens / (time.perf_counter() - start))
    finally:
        engine.stop()
    return {batch: statistics.median(s) for batch, s in speeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter replies, fewer rounds")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the served weights")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    new_tokens = 24 if args.quick else args.new_tokens
    requests_per_client = {1: 4, 4: 2, 16: 1} if args.quick else {1: 8, 4: 4, 16: 2}
    cfg = preset("small")
    print(f"small preset, random weights, {args.dtype} on the CPU, {torch.get_num_threads()} threads; prompt "
          f"{args.prompt_tokens} tokens, {new_tokens} new tokens (greedy, ignore_eos), streaming /v1/completions; "
          f"median of {rounds} rounds (shared machine: noisy)", flush=True)
    results: dict[str, float] = {}
    dtype = getattr(torch, args.dtype)
    peak = matmul_peak(dtype, [1024, 2048], 3)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(["builtin:shakespeare"], cfg.vocab_size, Path(tmp) / "tok", show_progress=False)
        model_dir = save_model(build_model(cfg, seed=0), Path(tmp) / "small", tokenizer_dir=Path(tmp) / "tok")
        next_prompt = prompts(cfg, args.prompt_tokens)
        body = {"model": "small", "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(model_dir),
                                   "--port", str(port), "--dtype", args.dtype, "--max-batch-size", str(max(LEVELS)),
                                   "--max-len", str(args.prompt_tokens + new_tokens + 16)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("lmforge serve did not start")
                time.sleep(0.2)
            run_round(port, 4, 1, body, next_prompt)  # warm-up: first forwards, thread pools, connections
            speeds: dict[int, list[float]] = {clients: [] for clients in LEVELS}
            for _ in range(rounds):
                for clients in LEVELS:
                    speeds[clients].append(run_round(port, clients, requests_per_client[clients], body, next_prompt))
            for clients, runs in speeds.items():
                results[f"clients_{clients}_tok_s"] = round(statistics.median(runs), 1)
                print(f"{clients:2d} clients  {statistics.median(runs):7.1f} tok/s  "
                      f"(rounds: {', '.join(f'{s:.1f}' for s in runs)})", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=60)

        for batch, speed in engine_alone(model_dir, args.dtype, next_prompt, new_tokens, (1, 16), rounds).items():
            results[f"engine_batch_{batch}_tok_s"] = round(speed, 1)
            print(f"engine alone, batch {batch:2d}  {speed:7.1f} tok/s", flush=True)
    peak = max(peak, matmul_peak(dtype, [1024, 2048], 3))  # the best of two: the less disturbed
    flops = flops_per_generated_token(cfg, args.prompt_tokens, new_tokens)
    ceiling = peak / flops
    results["matmul_peak_gflops"] = round(peak / 1e9, 1)
    results["ceiling_tok_s"] = round(ceiling, 1)
    results["clients_16_of_ceiling"] = round(results["clients_16_tok_s"] / ceiling, 3)
    results["ratio_ceiling"] = round(ceiling / results["clients_1_tok_s"], 2)
    results["ratio_ceiling_engine"] = round(ceiling / results["engine_batch_1_tok_s"], 2)
    print(f"compute ceiling: {peak / 1e9:.0f} GFLOP/s ({args.dtype} matmuls) / {flops / 1e6:.1f} MFLOP per generated "
          f"token = {ceiling:.0f} tok/s; 16 clients reach {results['clients_16_of_ceiling']:.0%} of it; the ceiling "
          f"/ 1 client allows {results['ratio_ceiling']:.2f}x, the ceiling / the engine's batch 1 "
          f"{results['ratio_ceiling_engine']:.2f}x")
    results["ratio"] = round(results["clients_16_tok_s"] / results["clients_1_tok_s"], 2)
    results["engine_ratio"] = round(results["engine_batch_16_tok_s"] / results["engine_batch_1_tok_s"], 2)
    print(f"16 clients / 1 client: {results['ratio']:.2f}x (target 6x); engine alone, batch 16 / batch 1: "
          f"{results['engine_ratio']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
