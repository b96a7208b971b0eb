"""Reward functions: how good a completion is, as a number, for rejection sampling and (next) RL.

A reward function has TRL's signature, so the functions users write for TRL's GRPOTrainer work here:

    def reward(prompts: list, completions: list, **columns) -> list[float]

`prompts[i]` is the i-th prompt (a list of chat messages), `completions[i]` the completion generated for it
(a list with one assistant message, {"role": "assistant", "content": text}), and `columns` the data's other
fields, one list each (the built-in tasks' `answer`). None in the returned list means "cannot score this one".

Built in:
    exact_answer   1.0 if the completion's answer equals the sample's `answer` as a number (or as text, if
                   either is not one), else 0.0: the last `<answer>...</answer>` if the completion has one
                   (the R1 format), else its `#### N` (data.arithmetic's strict check, lm-evaluation-harness's
                   gsm8k strict-match)
    format         1.0 if the completion gives an answer in one of those two forms at all, else 0.0
    length         DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL's get_soft_overlong_punishment):
                   0 up to L_max - L_cache completion tokens, falling linearly to -1 at L_max, -1 beyond; L_max
                   the stage's most new tokens, L_cache a quarter of it
A user's function is named `module:function` (the module importable from the working directory or the
Python path): `load_reward_function("myrewards:brevity")`. A directory is a trained reward model (what
`lmforge reward` writes, its LoRA adapter, or a downloaded one), scored by train.reward.RewardScorer.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from pathlib import Path

from lmforge.data.arithmetic import STRICT, extract_answer

RewardFunction = Callable[..., list[float | None]]


def completion_text(completion) -> str:
    """The text of a completion: a string, or a list of messages (its assistant contents joined)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def given_answer(text: str) -> str | None:
    """The answer a completion gives: inside its last <answer> tags, else after its `#### `; None if neither."""
    tagged = ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip().replace(",", "").replace("$", "").rstrip(".")
    return extract_answer(text, strict=True)


def same_answer(given: str | None, reference) -> bool:
    """Equal as numbers ("14" and "14.0"), or as text where either is not a number."""
    if given is None:
        return False
    try:
        return float(given) == float(reference)
    except ValueError:
        return given.strip() == str(reference).strip()


def exact_answer(prompts: list, completions: list, answer: list, **columns) -> list[float]:
    """1.0 where the completion's answer (given_answer) is the sample's answer, else 0.0."""
    return [float(same_answer(given_answer(completion_text(c)), a)) for c, a in zip(completions, answer)]


def format_reward(prompts: list, completions: list, **columns) -> list[float]:
    """1.0 where the completion gives an answer the way the built-in tasks teach (a `#### N` line) or in
    <answer> tags."""
    return [float(bool(STRICT.search(t) or ANSWER_TAG.search(t))) for t in map(completion_text, completions)]


class SoftOverlongPunishment:
    """DAPO's length reward on `completion_ids` (module docstring), a class so that it has a name to log."""

    __name__ = "length"

    def __init__(self, max_completion_length: int, cache: int):
        self.max_completion_length, self.cache = max_completion_length, max(cache, 1)

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], **columns) -> list[float]:
        soft_start = self.max_completion_length - self.cache
        return [0.0 if len(ids) <= soft_start else -1.0 if len(ids) > self.max_completion_length
                else (soft_start - len(ids)) / self.cache for ids in completion_ids]


BUILTIN = {"exact_answer": exact_answer, "format": format_reward, "length": None}


def load_reward_function(spec: str, max_completion_length: int = 256) -> RewardFunction:
    """A built-in reward function by name, a reward model's directory, or a user's function as `module:function`.
    max_completion_length: the most new tokens of the samples scored (the `length` reward's L_max)."""
    if spec == "length":
        return SoftOverlongPunishment(max_completion_length, max_completion_length // 4)
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
