"""Generative exact match, as lm-evaluation-harness scores GSM8K (its gsm8k.yaml), batched through the Engine.

An item is a question and a reference answer (GSM8K's JSONL: `{"question": ..., "answer": "... #### 72"}`;
the built-in arithmetic problems have the same layout). The model answers each question, greedy or sampled;
two filters pull a number out of the answer, each scored on its own:
- `strict-match`: the number after `#### ` (the regex `#### (\\-?[0-9\\.\\,]+)`, its first match);
- `flexible-extract`: the last number in the text (`(-?[$0-9.,]{2,})|(-?[0-9]+)`, the last match's first
  non-empty group).
The extracted string and the reference are compared as lm-eval's `exact_match` does with the task's
`ignore_case` and `regexes_to_ignore` (`,` `$` `(?s).*#### ` and one trailing `.`): as strings, so "14.0" is
not "14", exactly as the harness scores it. A text with no number is lm-eval's "[invalid]", never right.

With `n` samples per question (temperature > 0), `pass@k` is the unbiased estimator of Chen et al. 2021
(section 2.1) over the strict filter, and exact match is the mean over all samples.

Prompts: with `chat`, the question is the user's message in the model's chat template (how the built-in
SFT data teaches it); otherwise lm-eval's "Question: {question}\\nAnswer:" with `num_fewshot` solved
examples before it, generation stopping at "Question:" as the harness does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.arithmetic import FLEXIBLE, STRICT, make_problems
from lmforge.data.formats import read_records
from lmforge.infer.llm import encode_prompts
from lmforge.infer.sampling import SamplingParams

IGNORE = [re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$")]
INVALID = "[invalid]"
STOP = ["Question:", "</s>", "<|im_end|>"]


@dataclass
class GenerativeItem:
    question: str
    answer: str  # the reference as written (a worked solution ending in `#### N`, or just N)


def normalize(text: str) -> str:
    """lm-eval's exact_match preprocessing for GSM8K: the ignored patterns removed in order, lower case,
    surrounding whitespace kept as the harness keeps it (neither side has any after the filters)."""
    for pattern in IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def extract(text: str, strict: bool) -> str:
    """The filtered answer: strict-match's first `#### N`, or flexible-extract's last number; "[invalid]"."""
    if strict:
        match = STRICT.search(text)
        return match.group(1) if match else INVALID
    matches = FLEXIBLE.findall(text)
    if not matches:
        return INVALID
    return next((group for group in matches[-1] if group), INVALID)


def exact_match(completion: str, reference: str, strict: bool = True) -> bool:
    found = extract(completion, strict)
    return found != INVALID and normalize(found) == normalize(reference)


def read_generative(path: str | Path, limit: int | None = None) -> list[GenerativeItem]:
    """GSM8K-layout JSONL (or Parquet): `question` and `answer` strings on each line (an RL prompt file's
    `{"prompt": [{"role": "user", ...}], "answer": ...}` is read too: its last user message is the question)."""
    items = []
    for record in read_records(path, limit):
        question, answer = record.data.get("question"), record.data.get("answer")
        if question is None and isinstance(record.data.get("prompt"), list):
            users = [m.get("content") for m in record.data["prompt"] if isinstance(m, dict) and m.get("role") == "user"]
            question = users[-1] if users else None
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)
        for name, value in (("question", question), ("answer", answer)):
            if not isinstance(value, str) or not value.strip():
                raise record.error(f"field '{name}' should be a non-empty string")
        items.append(GenerativeItem(question, answer))
    return items


def builtin_arithmetic(count: int = 500, seed: int = 0, max_ops: int = 3, max_digits: int = 2
                       ) -> list[GenerativeItem]:
    """The held-out arithmetic problems (`lmforge tasks`' test.jsonl with the same settings: the same
    problems, none of them in any training split)."""
    return [GenerativeItem(p.question, p.solution) for p in make_problems(count, True, seed, max_ops, max_digits)]


def build_prompts(tokenizer, items: list[GenerativeItem], chat: bool, fewshot: list[GenerativeItem]
                  ) -> list[list[int]]:
    if chat:
        return encode_prompts(tokenizer, [[{"role": "user", "content": item.question}] for item in items])
    shots = "".join(f"Question: {s.question}\nAnswer: {s.answer}\n\n" for s in fewshot)
    return encode_prompts(tokenizer, [f"{shots}Question: {item.question}\nAnswer:" for item in items])


def evaluate_generative(engine, items: list[GenerativeItem], *, chat: bool = True, n: int = 1,
                        k: tuple[int, ...] = (1,), temperature: float = 0.0, max_tokens: int = 256,
                        fewshot: list[GenerativeItem] = (), seed: int = 0) -> dict:
    """Answer every item through `engine` (an infer.engine.Engine: all prompts batched) and score them:
    {"metrics": {"exact_match,strict-match", "exact_match,flexible-extract", "pass@k" (n > 1), "n"},
    "samples": one dict per item}."""
    from lmforge.eval.code import pass_at_k

    if n > 1 and temperature <= 0:
        raise ValueError(f"n={n} samples at temperature {temperature} would be the same answer: set a temperature")
    if any(kk > n for kk in k):
        raise ValueError(f"k: pass@{max(k)} needs at least that many samples; n is {n}")
    room = engine.max_len - max_tokens  # a longer prompt keeps its end, as lm-eval left-truncates contexts
    if room < 1:
        raise ValueError(f"max_tokens: {max_tokens} leaves no room for a prompt in the context of {engine.max_len}")
    prompts = [p[-room:] for p in build_prompts(engine.tokenizer, items, chat, list(fewshot))]
    params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, stop=[] if chat else STOP,
                             seed=seed + i * n) for i in range(len(items))]
    outputs = engine.generate(prompts, params)
    samples, strict_right, flexible_right, pass_k = [], 0, 0, {kk: 0.0 for kk in k}
    for item, outs in zip(items, outputs):
        strict = [exact_match(o.text, item.answer, True) for o in outs]
        flexible = [exact_match(o.text, item.answer, False) for o in outs]
        strict_right += sum(strict)
        flexible_right += sum(flexible)
        for kk in k:
            pass_k[kk] += pass_at_k(n, sum(strict), kk)
        samples.append({"question": item.question, "reference": normalize(item.answer),
                        "completions": [o.text for o in outs], "strict": strict, "flexible": flexible})
    total = n * len(items)
    metrics = {"exact_match,strict-match": strict_right / total, "exact_match,flexible-extract": flexible_right / total}
    if n > 1:
        metrics.update({f"pass@{kk}": value / len(items) for kk, value in pass_k.items()})
    metrics["n"] = len(items)
    return {"metrics": metrics, "samples": samples}
