"""Reward functions: how good a completion is, as a number, for rejection sampling and (next) RL.

A reward function has TRL's signature, so the functions users write for TRL's GRPOTrainer work here:

    def reward(prompts: list, completions: list, **columns) -> list[float]

`prompts[i]` is the i-th prompt (a list of chat messages), `completions[i]` the completion generated for it
(a list with one assistant message, {"role": "assistant", "content": text}), and `columns` the data's other
fields, one list each (the built-in tasks' `answer`). None in the returned list means "cannot score this one".

Built in:
    exact_answer   1.0 if the completion's `#### N` equals the sample's `answer` (data.arithmetic's strict
                   check, lm-evaluation-harness's gsm8k strict-match), else 0.0
    format         1.0 if the completion ends with a `#### N` line at all, else 0.0
A user's function is named `module:function` (the module importable from the working directory or the
Python path): `load_reward_function("myrewards:brevity")`. A directory is a trained reward model (what
`lmforge reward` writes, its LoRA adapter, or a downloaded one), scored by train.reward.RewardScorer.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from lmforge.data.arithmetic import STRICT, is_correct

RewardFunction = Callable[..., list[float | None]]


def completion_text(completion) -> str:
    """The text of a completion: a string, or a list of messages (its assistant contents joined)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


def exact_answer(prompts: list, completions: list, answer: list, **columns) -> list[float]:
    """1.0 where the completion's final `#### N` is the sample's answer, else 0.0."""
    return [float(is_correct(completion_text(c), a)) for c, a in zip(completions, answer)]


def format_reward(prompts: list, completions: list, **columns) -> list[float]:
    """1.0 where the completion gives its answer the way the built-in tasks teach: a `#### N` line."""
    return [float(bool(STRICT.search(completion_text(c)))) for c in completions]


BUILTIN = {"exact_answer": exact_answer, "format": format_reward}


def load_reward_function(spec: str) -> RewardFunction:
    """A built-in reward function by name, a reward model's directory, or a user's function as `module:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if Path(spec).is_dir():
        from lmforge.train.reward import RewardScorer  # torch models: only when a reward model is asked for
        return RewardScorer.load(spec)
    module_name, colon, function_name = spec.partition(":")
    if not colon or not module_name or not function_name:
        raise ValueError(f"reward: '{spec}' is neither a built-in reward ({', '.join(BUILTIN)}), a reward "
                         "model's directory, nor 'module:function'")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # a module beside the user's data, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward: cannot import '{module_name}' ({e})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward: '{module_name}' has no function '{function_name}'")
    return function


def score(function: RewardFunction, prompts: list, completions: list, columns: dict[str, list]) -> list[float | None]:
    """`function` on one batch, its answer checked: one number (or None) per completion."""
    values = list(function(prompts, completions, **columns))
    if len(values) != len(completions):
        raise ValueError(f"reward function {getattr(function, '__name__', function)} gave {len(values)} values "
                         f"for {len(completions)} completions")
    for value in values:
        if value is not None and not isinstance(value, (int, float)):
            raise ValueError(f"reward function {getattr(function, '__name__', function)} gave {value!r:.40}, "
                             "not a number")
    return [None if v is None else float(v) for v in values]
