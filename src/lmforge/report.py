"""The report card of a run: RUN/report.md (readable in any markdown viewer) and RUN/report.json (the same data).

One table of metric x stage (base, SFT, DPO, RL: every task evaluated on every stage's model), each stage's
wall time, steps and training tokens/s, its curves (the PNGs the stages drew, linked by relative path), a
sample generation per stage, and the environment (lmforge version and commit, torch, CPU/GPU). nanochat's
report.md, removed from it in 2026, had the same table (metric x BASE/SFT/RL); this one is written by the
quickstart from the results it gathered, nothing parsed back from logs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import lmforge
from lmforge.files import write_text_atomic


@dataclass
class StageReport:
    name: str  # "base", "sft", "dpo", "rl"
    title: str  # what the stage did, one line
    seconds: float
    steps: int | None = None
    tokens_per_s: float | None = None
    metrics: dict[str, list] = field(default_factory=dict)  # its own metric(s): label -> [before, after]
    curves: list[str] = field(default_factory=list)  # PNG paths relative to the report
    sample: str | None = None  # a generation of the stage's model
    model: str | None = None  # its model directory, relative to the report


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit (with "-dirty" when files differ), None outside a git checkout."""
    root = Path(lmforge.__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"lmforge": lmforge.__version__, "commit": git_commit(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": accelerator, "platform": platform.platform()}


PERCENT = ("acc", "exact_match", "exact match", "pass@", "accuracy")  # metrics shown as percentages


def fmt(value, name: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if any(p in name for p in PERCENT) else f"{value:.3f}"
    return str(value)


def metric_table(evals: dict[str, dict[str, dict[str, float]]], shown: dict[str, list[str]]) -> list[str]:
    """Markdown rows: one per (task, metric) of `shown`, one column per stage of `evals` ({stage: {task:
    metrics}}); a value the stage has not is a dash."""
    stages = list(evals)
    lines = ["| task | metric | " + " | ".join(stages) + " |", "|---|---|" + "---:|" * len(stages)]
    for task, names in shown.items():
        for name in names:
            cells = [fmt(evals[s].get(task, {}).get(name), name) for s in stages]
            lines.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    return lines


def stage_lines(stages: list[StageReport]) -> list[str]:
    lines = ["| stage | what it did | its own metric | wall time | steps | tokens/s |", "|---|---|---|---:|---:|---:|"]
    for s in stages:
        own = "; ".join(f"{k}: {fmt(before, k)} → {fmt(after, k)}" for k, (before, after) in s.metrics.items())
        rate = f"{s.tokens_per_s:,.0f}" if s.tokens_per_s else "—"
        lines.append(f"| {s.name} | {s.title} | {own or '—'} | {s.seconds:.0f} s | {fmt(s.steps)} | {rate} |")
    return lines


def write_report(out: str | Path, stages: list[StageReport], evals: dict[str, dict[str, dict[str, float]]],
                 shown: dict[str, list[str]], commands: list[str], title: str = "lmforge run") -> Path:
    """report.md and report.json in `out`; returns report.md's path."""
    out = Path(out)
    total = sum(s.seconds for s in stages)
    env = environment()
    md = [f"# {title}", "", f"Total wall time {total / 60:.1f} min. " + ", ".join(
        f"{k} {v}" for k, v in env.items() if v is not None) + ".", "", "## Every stage's model on the same tasks", ""]
    md += metric_table(evals, shown)
    md += ["", "## Stages", ""] + stage_lines(stages)
    for s in stages:
        if s.curves or s.sample:
            md += ["", f"### {s.name}: {s.title}", ""]
            md += [f"![{Path(c).stem}]({c})" for c in s.curves]
            if s.sample:
                md += ["", "Sample:", "", "```text", s.sample.strip(), "```"]
    md += ["", "## Use the result", "", "```sh"] + commands + ["```", ""]
    payload = {"title": title, "seconds": total, "environment": env, "stages": [asdict(s) for s in stages],
               "evals": evals, "commands": commands}
    write_text_atomic(out / "report.json", json.dumps(payload, indent=2) + "\n")
    return write_text_atomic(out / "report.md", "\n".join(md))


def terminal_table(evals: dict[str, dict[str, dict[str, float]]], shown: dict[str, list[str]]) -> str:
    """The metric x stage table as plain text for the terminal."""
    stages = list(evals)
    rows = [(f"{task} {name}", [fmt(evals[s].get(task, {}).get(name), name) for s in stages])
            for task, names in shown.items() for name in names]
    width = max([len(r[0]) for r in rows] + [6])
    cols = [max(len(s), *(len(r[1][i]) for r in rows)) for i, s in enumerate(stages)] if rows else []
    lines = ["metric".ljust(width) + "  " + "  ".join(s.rjust(c) for s, c in zip(stages, cols))]
    lines += [name.ljust(width) + "  " + "  ".join(v.rjust(c) for v, c in zip(values, cols)) for name, values in rows]
    return "\n".join(lines)
