"""`lmforge quickstart`: the whole life cycle of a small chat model on a laptop CPU, with a report card.

    1. data: a BPE tokenizer trained on the built-in corpus (the works of Shakespeare), the corpus tokenized into
       pretraining shards (5% held out), and the built-in arithmetic word problems (`lmforge tasks`)
    2. pretrain `tiny` from scratch on the corpus (validation bits per byte; the best checkpoint kept)
    3. SFT it on the problems' worked solutions (held-out exact-match accuracy; a chat transcript)
    4. DPO on pairs of the SFT model's own right and wrong answers (`lmforge rejection --pairs-out`)
    5. GRPO from there, rewarded for the right `#### N` (held-out accuracy before and after)
    6. evaluate every stage's model, and the exported q8_0 GGUF file, on the same tasks (`lmforge eval`):
       Shakespeare bits per byte and next-line multiple choice, arithmetic exact match
    7. export the final model (a Hugging Face directory with its tokenizer and chat template, and a q8_0 GGUF
       file with an Ollama Modelfile) and print the commands that chat with and serve it; report.md /
       report.json in --out-dir hold every number.

Each stage is also a command of its own, printed as `$ lmforge ...` before it runs: this file only strings
them together. A stage whose output exists is skipped, so an interrupted run continues where it stopped.
`--minutes` is the whole run's budget: each training stage gets a share (68% in all, through
`--train.max-minutes`), and data, sampling, evaluation and export take the rest;
`--smoke` runs the same chain with a few steps of each in about a minute (CI runs it).
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge import cli
from lmforge.files import atomic_directory_write, write_text_atomic
from lmforge.report import StageReport, terminal_table, write_report
from lmforge.settings import parse_args

# Each training stage's share of --minutes; the rest (about 30%) is data, sampling, evaluation and export.
SHARES = {"pretrain": 0.22, "sft": 0.26, "dpo": 0.05, "rl": 0.15}
MIN_PAIRS = 40  # DPO's pairs: the model's own, topped up with built-in ones to at least this many
# What the report's table shows of each task (lmforge eval's metric names).
SHOWN = {"shakespeare-bpb": ["bits_per_byte"], "shakespeare-cloze": ["acc", "acc_norm"],
         "arithmetic": ["exact_match,strict-match", "exact_match,flexible-extract"]}


@dataclass
class QuickstartConfig:
    out_dir: str = field(default="runs/quickstart", metadata={"help": "where every stage writes"})
    minutes: float = field(default=10.0, metadata={
        "help": "the run's wall-clock budget: the training stages get 68% of it", "min": 0.1})
    smoke: bool = field(default=False, metadata={"help": "a few steps of every stage (about a minute)"})
    preset: str = field(default="tiny", metadata={"help": "model size to build and pretrain"})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary size", "min": 256})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 (autocast) for the training stages"})
    eval_items: int = field(default=200, metadata={"help": "held-out problems / cloze items per evaluation",
                                                   "min": 1})
    seed: int = 0


@dataclass
class Run:
    cfg: QuickstartConfig
    out: Path
    stages: list[StageReport] = field(default_factory=list)
    evals: dict[str, dict] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def budget(self, stage: str) -> list[str]:
        """A training stage's length: a few steps in a smoke run, else its share of --minutes."""
        if self.cfg.smoke:
            steps = {"pretrain": 30, "sft": 30, "dpo": 4, "rl": 3}[stage]
            return ["--train.steps", str(steps)]
        return ["--train.steps", "100000", "--train.max-minutes", f"{SHARES[stage] * self.cfg.minutes:.3f}"]


def lmforge(*args: str) -> float:
    """Run one lmforge command as a user would type it (printed first); its wall time in seconds."""
    print(f"\n$ lmforge {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    code = cli.main(list(args))
    if code:
        raise RuntimeError(f"lmforge {args[0]} failed (exit status {code}); its message is above")
    return time.perf_counter() - started


def stage_done(run: Run, name: str) -> StageReport | None:
    """The report of a stage an earlier run finished (RUN/stages/NAME.json), or None."""
    file = run.path("stages", f"{name}.json")
    if not file.is_file():
        return None
    report = StageReport(**json.loads(file.read_text()))
    report.metrics = {k: v for k, v in report.metrics.items() if isinstance(v, list) and len(v) == 2}
    print(f"\n[{name}] done by an earlier run ({file}): skipped", flush=True)
    run.stages.append(report)
    return report


def finish(run: Run, report: StageReport) -> StageReport:
    run.path("stages").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.path("stages", f"{report.name}.json"), json.dumps(asdict(report), indent=2))
    run.stages.append(report)
    return report


def train_summary(run_dir: Path) -> dict:
    """Steps, mean training tokens/s and the last validation row from a stage's metrics.jsonl."""
    from lmforge.train.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    trained = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    vals = [r for r in rows if any(k.startswith("val_") for k in r)]
    rates = [r["tokens_per_s"] for r in trained[len(trained) // 10:]]  # past the first steps' warm-up
    return {"steps": trained[-1]["step"] if trained else None,
            "tokens_per_s": sum(rates) / len(rates) if rates else None,
            "first_val": vals[0] if vals else {}, "last_val": vals[-1] if vals else {}}


def curves(run: Run, run_dir: Path) -> list[str]:
    return [str(p.relative_to(run.out)) for name in ("loss.png", "reward.png", "accuracy.png")
            if (p := run_dir / name).is_file()]


def quiet(run: Run) -> list[str]:
    return ["--train.precision", run.cfg.precision, "--train.seed", str(run.cfg.seed), "--train.save-every", "0"]


def data_stage(run: Run) -> None:
    if stage_done(run, "data"):
        return
    started = time.perf_counter()
    smoke = run.cfg.smoke
    lmforge("tokenizer", "--data", "builtin:shakespeare", "--vocab-size", str(run.cfg.vocab_size), "--out",
            str(run.path("tokenizer")))
    lmforge("prepare", "--tokenizer", str(run.path("tokenizer")), "--data", "builtin:shakespeare", "--out",
            str(run.path("data")), "--val-fraction", "0.05")
    lmforge("tasks", "--out", str(run.path("tasks")), "--max-ops", "2", "--train", "400" if smoke else "5000",
            "--test", str(run.cfg.eval_items), "--seed", str(run.cfg.seed))
    finish(run, StageReport("data", "tokenizer, pretraining shards, arithmetic tasks", time.perf_counter() - started))


def pretrain_stage(run: Run) -> None:
    if stage_done(run, "base"):
        return
    from lmforge.infer.llm import LLM

    run_dir = run.path("pretrain")
    seconds = lmforge("pretrain", "--model", run.cfg.preset, "--data", str(run.path("data")), "--tokenizer",
                      str(run.path("tokenizer")), "--seq-len", "256", "--batch-size", "8", "--train.run-dir",
                      str(run_dir), "--train.optim.lr", "3e-3", "--train.optim.warmup-steps", "10" if run.cfg.smoke
                      else "50", "--train.eval-every", "10" if run.cfg.smoke else "100", "--train.keep-best", "true",
                      *run.budget("pretrain"), *quiet(run))
    summary = train_summary(run_dir)
    sample = LLM.load(run_dir / "final").generate("ROMEO:\n", max_tokens=60, temperature=0.8, top_k=50,
                                                  seed=run.cfg.seed)
    finish(run, StageReport("base", f"pretrain '{run.cfg.preset}' on the corpus", seconds, summary["steps"],
                            summary["tokens_per_s"], {},
                            curves(run, run_dir), "ROMEO:\n" + sample, "pretrain/final"))


# The stages whose own metric is a column of the table: (the stage before, task, metric, label).
OWN = {"base": ("init", "shakespeare-bpb", "bits_per_byte", "held-out bits per byte"),
       "sft": ("base", "arithmetic", "exact_match,strict-match", "held-out exact match"),
       "rl": ("dpo", "arithmetic", "exact_match,strict-match", "held-out exact match")}


def own_metrics(run: Run) -> None:
    """Each stage's own metric before and after it, from the evaluations (DPO's is its held-out pair loss)."""
    for stage in run.stages:
        if stage.name in OWN and stage.name in run.evals:
            before, task, metric, label = OWN[stage.name]
            stage.metrics[label] = [run.evals[before][task].get(metric), run.evals[stage.name][task].get(metric)]


def chat_sample(model_dir: Path, question: str, seed: int) -> str:
    from lmforge.infer.llm import LLM

    answer = LLM.load(model_dir).generate([{"role": "user", "content": question}], max_tokens=96, temperature=0.0,
                                          seed=seed)
    return f"user: {question}\nassistant: {answer}"


def held_out_question(run: Run) -> str:
    return json.loads(run.path("tasks", "test.jsonl").read_text().splitlines()[0])["question"]


def sft_stage(run: Run) -> None:
    if stage_done(run, "sft"):
        return
    run_dir = run.path("sft")
    seconds = lmforge("sft", "--model", str(run.path("pretrain", "final")), "--data",
                      str(run.path("tasks", "sft.jsonl")),
                      "--max-len", "160", "--batch-size", "32", "--packed", "--train.run-dir", str(run_dir),
                      "--train.optim.lr", "3e-3", "--train.optim.warmup-steps", "10" if run.cfg.smoke else "50",
                      "--train.eval-every", "0", *run.budget("sft"), *quiet(run))
    summary = train_summary(run_dir)
    finish(run, StageReport("sft", "SFT on the arithmetic problems' worked solutions", seconds, summary["steps"],
                            summary["tokens_per_s"], {}, curves(run, run_dir),
                            chat_sample(run_dir / "final", held_out_question(run), run.cfg.seed), "sft/final"))


def preference_pairs(run: Run) -> tuple[Path, Path, int]:
    """The SFT model's own right and wrong answers as pairs (lmforge rejection), 10% held out for DPO's
    validation; topped up with the built-in pairs (a right solution and one with a slip) when the model has
    too few prompts with both a right and a wrong answer among its samples."""
    out = run.path("rejection")
    prompts = "32" if run.cfg.smoke else "600"
    lmforge("rejection", "--model", str(run.path("sft", "final")), "--prompts", str(run.path("tasks", "prompts.jsonl")),
            "--max-prompts", prompts, "--n", "4", "--temperature", "0.8", "--max-new-tokens", "96", "--out",
            str(out / "sft.jsonl"), "--pairs-out", str(out / "pairs.jsonl"), "--seed", str(run.cfg.seed))
    own_pairs = (out / "pairs.jsonl").read_text().splitlines()
    pairs = list(own_pairs)
    if len(pairs) < MIN_PAIRS:
        builtin = run.path("tasks", "preference.jsonl").read_text().splitlines()
        pairs += builtin[:MIN_PAIRS - len(pairs)]
        print(f"  {len(own_pairs)} pairs of the model's own answers, {MIN_PAIRS - len(own_pairs)} built-in ones added")
    cut = max(1, len(pairs) // 10)
    train, val = out / "dpo_train.jsonl", out / "dpo_val.jsonl"
    train.write_text("\n".join(pairs[cut:]) + "\n")
    val.write_text("\n".join(pairs[:cut]) + "\n")
    return train, val, len(own_pairs)


def dpo_stage(run: Run) -> None:
    if stage_done(run, "dpo"):
        return
    started = time.perf_counter()
    train, val, own_pairs = preference_pairs(run)
    run_dir = run.path("dpo")
    # two epochs over the pairs at most: more widens the margin on them and costs held-out accuracy
    # (BENCHMARKS.md, "Post-training on the built-in tasks"); the budget may stop it sooner
    epochs = ["--train.steps", str(max(1, math.ceil(2 * len(train.read_text().splitlines()) / 16)))]
    lmforge("dpo", "--model", str(run.path("sft", "final")), "--data", str(train), "--val-data", str(val),
            "--beta", "0.1", "--max-len", "160", "--batch-size", "16", "--train.run-dir", str(run_dir),
            "--train.optim.lr", "2e-5", "--train.eval-every", "2" if run.cfg.smoke else "10", *run.budget("dpo"),
            *([] if run.cfg.smoke else epochs), *quiet(run))
    summary = train_summary(run_dir)
    # at step 0 the policy is its reference: every pair's loss is ln 2
    metrics = {"held-out pair loss": [math.log(2), summary["last_val"].get("val_loss")]}
    title = f"DPO on {own_pairs} pairs of the SFT model's own right and wrong answers" + (
        f" (+ {MIN_PAIRS - own_pairs} built-in pairs)" if own_pairs < MIN_PAIRS else "")
    finish(run, StageReport("dpo", title, time.perf_counter() - started,
                            summary["steps"], summary["tokens_per_s"], metrics, curves(run, run_dir),
                            chat_sample(run_dir / "final", held_out_question(run), run.cfg.seed), "dpo/final"))


def rl_stage(run: Run) -> None:
    if stage_done(run, "rl"):
        return
    run_dir = run.path("rl")
    seconds = lmforge("grpo", "--model", str(run.path("dpo", "final")), "--prompts",
                      str(run.path("tasks", "prompts.jsonl")), "--val-prompts", str(run.path("tasks", "test.jsonl")),
                      "--reward-funcs", "exact_answer", "--num-generations", "8", "--batch-size", "32",
                      "--max-completion-length", "96", "--train.run-dir", str(run_dir), "--train.optim.lr", "2e-5",
                      "--train.optim.warmup-steps", "0", "--train.eval-every", "0", *run.budget("rl"), *quiet(run))
    summary = train_summary(run_dir)
    finish(run, StageReport("rl", "GRPO with the exact-answer reward", seconds, summary["steps"],
                            summary["tokens_per_s"], {},
                            curves(run, run_dir), chat_sample(run_dir / "final", held_out_question(run),
                                                              run.cfg.seed), "rl/final"))


def eval_stage(run: Run, name: str, model_dir: Path) -> float:
    """`lmforge eval` of one stage's model on the run's tasks (skipped when its results exist); the seconds
    its tasks took (when it ran, or in the earlier run that wrote them)."""
    out = run.path("eval", name)
    tasks = eval_tasks(run)
    if not (out / "results.json").is_file():
        lmforge("eval", "--model", str(model_dir), "--tasks", *tasks, "--limit", str(run.cfg.eval_items),
                "--max-tokens", "96", "--seq-len", "256", "--out", str(out), "--seed", str(run.cfg.seed))
    saved = json.loads((out / "results.json").read_text())
    run.evals[name] = {label: saved["results"][task] for label, task in zip(SHOWN, tasks)}
    return sum(saved["seconds"].values())


def eval_tasks(run: Run) -> list[str]:
    """The report's tasks as `lmforge eval` names them: the held-out shards the pretraining validated on,
    the built-in cloze, and this run's held-out problems."""
    return [f"bpb:{run.path('data')}", "shakespeare-cloze", f"gen:{run.path('tasks', 'test.jsonl')}"]


def init_model(run: Run) -> Path:
    """The preset as pretraining starts it (its seed), saved so the table shows what pretraining added."""
    from lmforge.checkpoint import save_model
    from lmforge.config import preset
    from lmforge.model import build_model
    from lmforge.tokenizer import Tokenizer

    path = run.path("init")
    if not (path / "config.json").is_file():
        tokenizer = Tokenizer.from_dir(run.path("tokenizer"))
        cfg = preset(run.cfg.preset, vocab_size=tokenizer.vocab_size)
        save_model(build_model(cfg, seed=run.cfg.seed), path, tokenizer_dir=run.path("tokenizer"))
    return path


def export_stage(run: Run) -> Path:
    """The final model as a self-contained Hugging Face directory (weights, config, tokenizer, chat template)."""
    final = run.path("model")
    if not final.is_dir():
        source = run.path("rl", "final").resolve()
        atomic_directory_write(final, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))
    return final


def gguf_stage(run: Run, model: Path) -> Path:
    """The final model as a q8_0 GGUF file for llama.cpp, with an Ollama Modelfile beside it."""
    out = run.path("gguf", "model-q8_0.gguf")
    if not out.is_file():
        lmforge("export", "--model", str(model), "--format", "ollama", "--type", "q8_0", "--out", str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(QuickstartConfig, argv, prog="lmforge quickstart", description=__doc__)
    run = Run(cfg, Path(cfg.out_dir))
    run.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_stage(run)
    pretrain_stage(run)
    sft_stage(run)
    dpo_stage(run)
    rl_stage(run)
    model = export_stage(run)
    gguf = gguf_stage(run, model)
    seconds = eval_stage(run, "init", init_model(run))
    for stage in run.stages[1:]:
        seconds += eval_stage(run, stage.name, run.path(stage.model))
    seconds += eval_stage(run, "q8_0.gguf", gguf)  # the exported file, read back as llama.cpp holds it
    run.stages.append(StageReport("eval", "every stage's model, and the q8_0 GGUF, on the same tasks", seconds))
    own_metrics(run)
    q, g = shlex.quote(str(model)), shlex.quote(str(gguf))
    commands = [f"lmforge chat --model {q}", f"lmforge serve --model {q} --port 8000   # OpenAI API + web chat",
                f"lmforge generate --model {q} --prompt 'ROMEO:' --max-new-tokens 100",
                f"lmforge eval --model {q} --tasks arithmetic shakespeare-cloze humaneval-mini",
                f"ollama create lmforge-quickstart -f {shlex.quote(str(gguf.parent / 'Modelfile'))}   # {g}, q8_0"]
    report = write_report(run.out, run.stages, run.evals, SHOWN, commands, title="lmforge quickstart")
    print("\n" + terminal_table(run.evals, SHOWN))
    print(f"\nthe final model: {model}\n" + "\n".join(f"    {c}" for c in commands))
    print(f"\nreport: {report}\nquickstart done in {time.perf_counter() - started:.0f} s "
          f"(stages reused from an earlier run count their first run's time in the report)")
    return 0
