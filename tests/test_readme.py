"""Every command of the README's tour runs as written, in order, each on the output of the ones before it:
the README cannot drift from the CLI. Flags appended to each command make it small and quick (a later
flag overrides an earlier one, as `lmforge <command> --help` says); nothing else is changed."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmforge import cli
from lmforge.data.formats import builtin_shakespeare

ROOT = Path(__file__).parents[1]
QUIET = ["--train.progress", "false", "--train.peak-flops", "1e11", "--train.device", "cpu"]
SMALLER = {  # appended to each command of the tour
    "tokenizer": ["--data", "corpus.txt", "--vocab-size", "300"],
    "prepare": ["--data", "corpus.txt", "--workers", "1"],
    "pretrain": ["--train.steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1", *QUIET],
    "sft": ["--train.steps", "2", "--max-len", "64", "--batch-size", "2", *QUIET],
    "merge": [],
    "generate": ["--max-new-tokens", "3"],
    "chat": ["--max-new-tokens", "3"],
    "serve": [],  # and a free --port
    "eval": ["--limit", "2", "--max-tokens", "4", "--out", "runs/eval"],
}

pytestmark = pytest.mark.usefixtures("one_thread")


def tour_commands() -> list[list[str]]:
    """The `lmforge ...` lines of the README's first shell block after "## A short tour", as argv lists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## A short tour", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split(" #", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("lmforge ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_until_healthy(argv: list[str]) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *argv, "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "lmforge serve did not answer /health within 60 s"
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(30)


def test_the_readme_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    commands = tour_commands()
    assert [argv[0] for argv in commands] == list(SMALLER)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "configs", "configs")
    Path("corpus.txt").write_text(builtin_shakespeare()[0].read_text(encoding="utf-8")[:120_000], encoding="utf-8")
    with open("chats.jsonl", "w") as f:
        for a in range(12):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+1"},
                                             {"role": "assistant", "content": str(a + 1)}]}) + "\n")
    for argv in commands:
        command = argv[0]
        if command == "serve":
            serve_until_healthy(argv)
            continue
        if command == "chat":  # a line to answer, then the end of input
            monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
        assert cli.main(argv + SMALLER[command]) == 0, f"lmforge {shlex.join(argv)}: {capsys.readouterr().err}"
    assert Path("runs/merged/model.safetensors").is_file() and Path("runs/sft-lora/final/adapter_config.json").is_file()
    assert set(json.loads(Path("runs/eval/results.json").read_text())["results"]) == {
        "arithmetic", "shakespeare-cloze", "shakespeare-bpb", "humaneval-mini"}
