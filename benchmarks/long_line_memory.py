"""Peak memory of `lmforge tokenizer` and `lmforge prepare` on a text file that is one single line, at two
sizes side by side: memory that stays bounded is the same for the larger file (ratio ~1.0).

    .venv/bin/python benchmarks/long_line_memory.py                  # 10 MB and 100 MB
    .venv/bin/python benchmarks/long_line_memory.py --mb 100 1000    # the issue's 1 GB line

The line is the built-in Shakespeare with its newlines made spaces, repeated. Each command runs in its own
process; its peak resident memory is the child's ru_maxrss. Last line: one JSON object, "ratio" = the
smaller file's peak / the larger file's peak, the worse of the two commands (1.0: memory does not grow
with the line; a reader holding the line would give about small / large).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.data.formats import builtin_shakespeare


def one_line_file(path: Path, megabytes: int) -> None:
    text = " ".join(p.read_text(encoding="utf-8") for p in builtin_shakespeare()).replace("\n", " ").encode()
    with open(path, "wb") as f:
        written = 0
        while written < megabytes << 20:
            f.write(text)
            written += len(text)


def peak_of(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of `lmforge ARGS` run in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmforge.cli", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:  # ru_maxrss is the largest child so far: run the smaller file first
        print("warning: this child's peak is hidden by an earlier, larger one", file=sys.stderr)
    return peak / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, nargs=2, default=[10, 100], help="the two sizes, smaller first")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mb in args.mb:
            one_line_file(tmp / f"line{mb}.txt", mb)
        for mb in args.mb:
            tokenizer = tmp / f"tok{mb}"
            rss, seconds = peak_of(["tokenizer", "--data", str(tmp / f"line{mb}.txt"), "--vocab-size", "2000",
                                    "--out", str(tokenizer)])
            results[f"tokenizer_{mb}mb"] = {"peak_mb": round(rss), "seconds": round(seconds, 1)}
            print(f"tokenizer, {mb} MB on one line: peak {rss:.0f} MB, {seconds:.1f} s", flush=True)
        for mb in args.mb:
            rss, seconds = peak_of(["prepare", "--tokenizer", str(tmp / f"tok{args.mb[0]}"), "--data",
                                    str(tmp / f"line{mb}.txt"), "--out", str(tmp / f"data{mb}")])
            results[f"prepare_{mb}mb"] = {"peak_mb": round(rss), "seconds": round(seconds, 1)}
            print(f"prepare, {mb} MB on one line: peak {rss:.0f} MB, {seconds:.1f} s", flush=True)
    small, large = args.mb
    ratios = {command: results[f"{command}_{small}mb"]["peak_mb"] / results[f"{command}_{large}mb"]["peak_mb"]
              for command in ("tokenizer", "prepare")}
    print(json.dumps({**results, "ratio_tokenizer": round(ratios["tokenizer"], 3),
                      "ratio_prepare": round(ratios["prepare"], 3), "ratio": round(min(ratios.values()), 3)}))


if __name__ == "__main__":
    main()
