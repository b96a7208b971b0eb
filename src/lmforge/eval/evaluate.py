"""`lmforge eval`: what a model can do, measured on local task files and built-in tasks.

    lmforge eval --model runs/sft/final --tasks arithmetic shakespeare-cloze shakespeare-bpb humaneval-mini
    lmforge eval --model runs/sft-lora/final --tasks mc:data/arc.jsonl gen:data/gsm8k.jsonl --limit 100
    lmforge eval --model runs/sft/final --tasks lm_eval:arc_easy      # when lm-evaluation-harness is installed

A task is a built-in name or KIND:PATH (nothing is downloaded):
    arithmetic          the held-out arithmetic word problems (`lmforge tasks`' test split): exact match
    shakespeare-bpb     bits per byte on the built-in corpus's held-out plays
    shakespeare-cloze   multiple choice: which line comes next, from held-out Shakespeare (4 choices)
    humaneval-mini      a small hand-written HumanEval-format set of easy functions: pass@k, run sandboxed
    bpb:PATH            bits per byte of a text file or a prepared data directory's validation split
    mc:PATH             multiple choice by log-likelihood (ARC/MMLU/HellaSwag-style JSONL): acc, acc_norm
    gen:PATH            generative exact match (GSM8K-style JSONL: question, answer ending `#### N`)
    code:PATH           HumanEval-format JSONL (prompt, test, entry_point): pass@k in the sandbox
    lm_eval:NAME        an lm-evaluation-harness task, run on the in-process model (needs `lm_eval`)
`--model` takes a Hugging Face model directory or a PEFT adapter directory (on the base model its
adapter_config.json names). A table goes to the terminal; results.json (metrics, settings, timings) and
samples.jsonl (every item's prompt, answer and score) go to --out.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lmforge.checkpoint import CheckpointError, load_model
from lmforge.files import read_json, write_text_atomic
from lmforge.model import KV_CACHE_HELP
from lmforge.settings import parse_args
from lmforge.tokenizer import Tokenizer

BUILTIN = ("arithmetic", "shakespeare-bpb", "shakespeare-cloze", "humaneval-mini")
KINDS = ("bpb", "mc", "gen", "code", "lm_eval")


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "an HF model directory, a PEFT adapter directory or a GGUF "
                                                     "file (dequantised; gguf_read.py)"})
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "shakespeare-cloze"], metadata={
        "help": f"built-in ({', '.join(BUILTIN)}) or KIND:PATH with KIND one of {', '.join(KINDS)}"})
    out: str = field(default="runs/eval", metadata={"help": "directory for results.json and samples.jsonl"})
    limit: int | None = field(default=None, metadata={"help": "at most this many items per task", "min": 1})
    chat: str = field(default="auto", metadata={
        "help": "generative prompts: true (the chat template), false (Question:/Answer:), auto (the template "
                "when the tokenizer has one)"})
    num_fewshot: int = field(default=0, metadata={"help": "solved examples before each question (chat false)",
                                                  "min": 0})
    n: int = field(default=1, metadata={"help": "samples per generative or code problem", "min": 1})
    k: list[int] = field(default_factory=lambda: [1], metadata={"help": "pass@k for these k (each <= n)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy", "min": 0})
    max_tokens: int = field(default=256, metadata={"help": "most new tokens per answer", "min": 1})
    seq_len: int | None = field(default=None, metadata={
        "help": "bits per byte: tokens per scored window (default: the model's context; a model trained on "
                "shorter sequences scores better at its training length)", "min": 2})
    batch_size: int = field(default=16, metadata={"help": "sequences per scoring forward", "min": 1})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16"})
    kv_cache: Literal["auto", "int8"] = field(default="auto", metadata={
        "help": KV_CACHE_HELP + "; used by the tasks that generate (gen, code, arithmetic, humaneval-mini)"})
    seed: int = 0


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Tokenizer
    model_dir: Path  # where the tokenizer and generation config come from (the base, for an adapter)
    engine: object = None  # built on first use (infer.engine.Engine)

    def get_engine(self, kv_cache_dtype: str = "auto"):
        if self.engine is None:
            from lmforge.infer.engine import Engine, default_eos_ids

            self.engine = Engine(self.model, self.tokenizer, max_batch_size=64, kv_cache_dtype=kv_cache_dtype,
                                 eos_ids=default_eos_ids(self.model, self.tokenizer, self.model_dir))
        return self.engine


def load_for_eval(path: str | Path, dtype: str = "float32") -> Loaded:
    """A model directory, a PEFT adapter directory merged into the base model it names, or a GGUF file."""
    from lmforge.checkpoint import DTYPES

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype: {dtype!r} should be float32 or bfloat16")
    path = Path(path)
    if path.suffix == ".gguf":  # weights dequantised, tokenizer rebuilt as llama.cpp splits text (gguf_read)
        from lmforge.gguf_read import load_gguf

        model, tokenizer = load_gguf(path, dtype=DTYPES[dtype])
        return Loaded(model, tokenizer, path)
    if not path.is_dir():
        raise FileNotFoundError(f"model: {path} is not a directory")
    if (path / "adapter_config.json").is_file():
        from lmforge.model.lora import load_adapter, merge_lora

        base = read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not isinstance(base, str) or not Path(base).is_dir():
            raise CheckpointError(f"{path / 'adapter_config.json'}: base_model_name_or_path {base!r:.60} is not a "
                                  "model directory")
        model = load_adapter(load_model(base), path)
        merge_lora(model)
        model_dir = Path(base)
    else:
        model, model_dir = load_model(path), path
    model = model.to(DTYPES[dtype]).eval()
    tokenizer_dir = path if (path / "tokenizer.json").is_file() else model_dir
    return Loaded(model, Tokenizer.from_dir(tokenizer_dir), model_dir)


def use_chat(cfg: EvalConfig, tokenizer: Tokenizer) -> bool:
    if cfg.chat not in ("auto", "true", "false"):
        raise ValueError(f"chat: {cfg.chat!r} should be auto, true or false")
    return tokenizer.chat_template is not None if cfg.chat == "auto" else cfg.chat == "true"


def parse_task(task: str) -> tuple[str, str | None]:
    """(kind or built-in name, path or None); a bad name is one error listing what is accepted."""
    if task in BUILTIN:
        return task, None
    kind, sep, rest = task.partition(":")
    if sep and kind in KINDS and rest:
        if kind != "lm_eval" and not Path(rest).exists():
            raise FileNotFoundError(f"tasks: {task}: no such file or directory {rest}")
        return kind, rest
    raise ValueError(f"tasks: {task!r} is neither a built-in task ({', '.join(BUILTIN)}) nor KIND:PATH with KIND "
                     f"one of {', '.join(KINDS)}")


def run_task(task: str, loaded: Loaded, cfg: EvalConfig) -> dict:
    """{"metrics": {...}, "samples": [...]} of one task."""
    kind, path = parse_task(task)
    model, tokenizer = loaded.model, loaded.tokenizer
    if kind in ("shakespeare-bpb", "bpb"):
        from lmforge.eval.loglik import bits_per_byte

        metrics = bits_per_byte(model, tokenizer, path or "builtin:shakespeare", seq_len=cfg.seq_len,
                                batch_size=cfg.batch_size)
        return {"metrics": metrics, "samples": []}
    if kind in ("shakespeare-cloze", "mc"):
        from lmforge.eval.loglik import multiple_choice, read_multiple_choice, shakespeare_cloze

        items = read_multiple_choice(path, cfg.limit) if path else shakespeare_cloze(cfg.limit or 200, cfg.seed)
        return multiple_choice(model, tokenizer, items, batch_size=cfg.batch_size)
    if kind in ("arithmetic", "gen"):
        from lmforge.eval.generative import builtin_arithmetic, evaluate_generative, read_generative

        items = read_generative(path, cfg.limit) if path else builtin_arithmetic(cfg.limit or 500, cfg.seed)
        engine = loaded.get_engine(cfg.kv_cache)
        return evaluate_generative(engine, items, chat=use_chat(cfg, tokenizer), n=cfg.n, k=tuple(cfg.k),
                                   temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed,
                                   fewshot=[] if not cfg.num_fewshot else fewshot_items(path, cfg))
    if kind in ("humaneval-mini", "code"):
        from lmforge.eval.code import builtin_humaneval, evaluate_code, read_humaneval

        problems = (read_humaneval(path) if path else builtin_humaneval())[:cfg.limit]
        engine = loaded.get_engine(cfg.kv_cache)
        return evaluate_code(engine, problems, n=cfg.n, k=tuple(cfg.k), temperature=cfg.temperature,
                             max_tokens=cfg.max_tokens, chat=cfg.chat == "true")
    from lmforge.eval.harness import run_lm_eval

    return {"metrics": run_lm_eval(model, tokenizer, [path], limit=cfg.limit,
                                   num_fewshot=cfg.num_fewshot or None)[path], "samples": []}


def fewshot_items(path: str | None, cfg: EvalConfig) -> list:
    """The solved examples before each question: the built-in training problems (never held out), or the
    first num_fewshot items of a file named like the task's with `train` for `test` (GSM8K's layout)."""
    from lmforge.data.arithmetic import make_problems
    from lmforge.eval.generative import GenerativeItem, read_generative

    if path is None:
        return [GenerativeItem(p.question, p.solution) for p in make_problems(cfg.num_fewshot, False, cfg.seed, 2, 2)]
    train = Path(path).with_name(Path(path).name.replace("test", "train"))
    if train == Path(path) or not train.is_file():
        raise ValueError(f"num_fewshot: no training file beside {path} to take examples from (expected {train})")
    return read_generative(train, cfg.num_fewshot)


def headline(metrics: dict) -> list[tuple[str, float]]:
    """The numbers a table shows: every float metric but counts."""
    return [(k, v) for k, v in metrics.items() if isinstance(v, float) and not isinstance(v, bool)]


def table(results: dict[str, dict]) -> str:
    rows = [(task, name, value) for task, r in results.items() for name, value in headline(r["metrics"])]
    width = max([len(t) for t, _, _ in rows] + [4])
    metric_width = max([len(m) for _, m, _ in rows] + [6])
    lines = [f"{'task'.ljust(width)}  {'metric'.ljust(metric_width)}  value", "-" * (width + metric_width + 11)]
    lines += [f"{t.ljust(width)}  {m.ljust(metric_width)}  {v:.4f}" for t, m, v in rows]
    return "\n".join(lines)


def write_results(out: Path, cfg: EvalConfig, results: dict[str, dict], seconds: dict[str, float]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": cfg.model, "config": asdict(cfg), "seconds": seconds,
               "results": {task: r["metrics"] for task, r in results.items()}}
    samples = "".join(json.dumps({"task": task, **sample}) + "\n" for task, r in results.items()
                      for sample in r["samples"])
    write_text_atomic(out / "samples.jsonl", samples)
    return write_text_atomic(out / "results.json", json.dumps(payload, indent=2) + "\n")


def evaluate(cfg: EvalConfig, loaded: Loaded | None = None, echo=print) -> dict[str, dict]:
    """Run every task of `cfg` on the model (loaded once), write the results, return {task: metrics}."""
    if not cfg.model and loaded is None:
        raise ValueError("model: give a model directory (--model)")
    for task in cfg.tasks:
        parse_task(task)  # every name checked before any work
    loaded = loaded or load_for_eval(cfg.model, cfg.dtype)
    results, seconds = {}, {}
    for task in cfg.tasks:
        started = time.perf_counter()
        results[task] = run_task(task, loaded, cfg)
        seconds[task] = round(time.perf_counter() - started, 2)
        echo(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in headline(results[task]["metrics"]))
             + f" ({seconds[task]:.0f} s)")
    path = write_results(Path(cfg.out), cfg, results, seconds)
    echo("\n" + table(results) + f"\n\nresults: {path}")
    return {task: r["metrics"] for task, r in results.items()}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(EvalConfig, argv, prog="lmforge eval", description=__doc__)
    torch.manual_seed(cfg.seed)
    evaluate(cfg)
    return 0
