"""lm-evaluation-harness on the in-process lmforge model: its tasks, our model, no HTTP server in between.

    from lmforge.eval.harness import run_lm_eval
    run_lm_eval("runs/sft/final", None, ["arc_easy"], limit=100)      # {"arc_easy": {"acc": ..., ...}}

`harness_lm(model, tokenizer)` is an `lm_eval.api.model.LM` whose three request types are lmforge's:
`loglikelihood` and `loglikelihood_rolling` are eval/loglik.py's (tokenised and truncated as lm-eval's own
Hugging Face model does, so the numbers match it), `generate_until` runs greedily (or sampled when a task
asks for `do_sample`) through the Engine, stopping at the task's `until` strings and `max_gen_toks`.

lm_eval is optional: it is imported when these functions run. Tasks come from lm_eval's own task
directory or `include_path` (a folder of task YAMLs); nothing here downloads, so a task's data must be
local (`dataset_path: json` with `dataset_kwargs: {data_files: ...}`) or already in the datasets cache.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from lmforge.eval.loglik import encode_text, loglikelihoods, rolling_loglikelihoods
from lmforge.infer.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ImportError("lm-evaluation-harness is not installed: pip install lm_eval") from None
    return lm_eval


@functools.cache
def _lm_class():
    """The LM subclass, defined on first use so that lm_eval is imported only then."""
    _require_lm_eval()
    from lm_eval.api.model import LM

    class LMForgeLM(LM):
        def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 16):
            super().__init__()
            self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
            self.engine = None

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return loglikelihoods(self.model, self.tokenizer, [r.args for r in requests], self.batch_size)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return rolling_loglikelihoods(self.model, self.tokenizer, [r.args[0] for r in requests], self.batch_size)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """The requests grouped by their generation options (a task's are all the same), each group batched."""
            groups: dict[str, tuple[dict, list[int]]] = {}
            for index, request in enumerate(requests):
                options = request.args[1]
                groups.setdefault(repr(sorted(options.items())), (options, []))[1].append(index)
            texts = [""] * len(requests)
            for options, indices in groups.values():
                outputs = generate_until(self._engine(), [requests[i].args[0] for i in indices], options)
                for index, text in zip(indices, outputs):
                    texts[index] = text
            return texts

        def _engine(self):
            if self.engine is None:
                from lmforge.infer.engine import Engine

                self.engine = Engine(self.model, self.tokenizer, max_batch_size=self.batch_size)
            return self.engine

        @property
        def tokenizer_name(self) -> str:
            return self.tokenizer.sha256()[:16]

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.tokenizer.chat_template if chat_template else None

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return self.tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    return LMForgeLM


def harness_lm(model: Transformer, tokenizer: Tokenizer, batch_size: int = 16):
    """An lm_eval.api.model.LM over an lmforge model and tokenizer (see the module docstring)."""
    return _lm_class()(model, tokenizer, batch_size)


def generate_until(engine, contexts: list[str], options: dict) -> list[str]:
    """lm-eval `generate_until` requests sharing their options, as HFLM answers them: each context encoded
    with special tokens and left-truncated to leave room for max_gen_toks (default 256), greedy unless
    do_sample (then `temperature`, default 1), the text cut before the first `until` string (the engine
    stops there too)."""
    until = options.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_tokens = int(options.get("max_gen_toks", 256))
    sampled = bool(options.get("do_sample", False))
    room = max(engine.max_len - max_tokens, 1)
    prompts = [encode_text(engine.tokenizer, context)[-room:] for context in contexts]
    stops = [s for s in until if 0 < len(s) <= MAX_STOP_CHARS][:MAX_STOP_STRINGS]
    params = SamplingParams(max_tokens=max_tokens, stop=stops, seed=0,
                            temperature=float(options.get("temperature", 1.0)) if sampled else 0.0)
    texts = []
    for outputs in engine.generate(prompts, params):
        text = outputs[0].text
        for stop in until:
            text = text.split(stop)[0] if stop else text
        texts.append(text)
    return texts


def run_lm_eval(model_dir_or_model: str | Path | Transformer, tokenizer: Tokenizer | str | Path | None,
                tasks: list[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
                include_path: str | Path | None = None, batch_size: int = 16) -> dict[str, dict]:
    """Run lm-evaluation-harness tasks on the model in this process; {task: {metric: value, ..., "n": items}}
    as lm_eval.simple_evaluate reports them (metric names as lm-eval writes them, less the ",none" of the
    unfiltered ones: "acc", "acc_stderr", "exact_match,strict-match"). `tokenizer`: a Tokenizer or its
    directory, or None for the model directory's own. A task is a name, or the path of a task YAML (reported
    under that path); `include_path`: a folder of local task YAMLs. When every task is a path or in
    include_path, lm-eval's own task index (thousands of files, ~10 s to read) is not read."""
    lm_eval = _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if isinstance(model_dir_or_model, Transformer):
        if tokenizer is None:
            raise ValueError("run_lm_eval: a model object needs its tokenizer (a Tokenizer or a directory)")
        model = model_dir_or_model
    else:
        from lmforge.checkpoint import load_model

        model = load_model(model_dir_or_model)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_dir(tokenizer if tokenizer is not None else model_dir_or_model)
    # A task YAML named by its path reports under that path (lm-eval reports it under the name inside).
    names = {_yaml_task_name(task) or task: task for task in tasks}
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=False)
    if not all(name in manager.all_tasks or name != task for name, task in names.items()):
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    results = lm_eval.simple_evaluate(model=harness_lm(model, tokenizer, batch_size), tasks=tasks, limit=limit,
                                      num_fewshot=num_fewshot, task_manager=manager, log_samples=False)
    report = {}
    for name, metrics in results["results"].items():
        task = names.get(name, name)
        report[task] = {key.removesuffix(",none"): value for key, value in metrics.items()
                        if key not in ("alias", "name")}
        if name in results.get("n-samples", {}):
            report[task]["n"] = results["n-samples"][name]["effective"]
    return report


def _yaml_task_name(task: str) -> str | None:
    """The `task:` name inside a task YAML file that `task` names, else None. Read as a line, not parsed: lm-eval's
    YAML has tags of its own (`!function`) that a plain YAML loader refuses."""
    if not task.endswith((".yaml", ".yml")) or not Path(task).is_file():
        return None
    found = re.search(r"^task:\s*[\"']?([^\"'\s#]+)", Path(task).read_text(encoding="utf-8"), re.MULTILINE)
    return found.group(1) if found else None
