"""Generative exact match (lmforge.eval.generative) against lm-evaluation-harness's own GSM8K filters and
metric, on the same strings; the evaluator on canned answers and on a real tiny Engine; `lmforge eval` end to
end on the built-in arithmetic task."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lmforge.eval.generative import (
    GenerativeItem,
    build_prompts,
    evaluate_generative,
    exact_match,
    extract,
    read_generative,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# lm-eval's gsm8k.yaml: the two filters and exact_match's settings
STRICT = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]

CASES = [  # (completion, reference)
    ("She has 5 + 3 = 8 apples.\n#### 8", "Ava has 5 apples...\n#### 8"),
    ("#### 1,234", "#### 1234"),
    ("The total is $1,234.", "#### 1234"),
    ("He owes -12 now.\n#### -12", "#### -12"),
    ("#### -12", "#### 12"),
    ("First 4, then 9, then 16", "#### 16"),
    ("First 4, then 9, then 16", "#### 4"),
    ("#### 14.0", "#### 14"),  # as strings, as the harness scores it: not a match
    ("#### 7\nand later #### 9", "#### 7"),
    ("no number here", "#### 3"),
    ("The answer is 42.", "#### 42"),
    ("#### $5", "#### 5"),
    ("  #### 10  ", "#### 10"),
    ("3.5 and 2.", "#### 2"),
    ("", "#### 0"),
]


def lm_eval_scores(completion: str, reference: str) -> tuple[bool, bool]:
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    scores = []
    for pattern, group in ((STRICT, 0), (FLEXIBLE, -1)):
        found = RegexFilter(pattern, group).apply([[completion]], [{}])[0][0]
        scores.append(bool(exact_match_hf_evaluate([found], [reference], regexes_to_ignore=IGNORE,
                                                   ignore_case=True)["exact_match"]))
    return scores[0], scores[1]


@pytest.mark.parametrize("completion,reference", CASES)
def test_exact_match_equals_lm_eval(completion, reference):
    assert (exact_match(completion, reference, True), exact_match(completion, reference, False)) \
        == lm_eval_scores(completion, reference)


def test_extraction_cases():
    assert extract("#### 1,234", True) == "1,234"
    assert extract("a $1,234. b", False) == "$1,234."
    assert extract("x -7 y", False) == "-7"
    assert extract("2 then 3 then 40", False) == "40"
    assert extract("nothing", True) == "[invalid]"


class CannedEngine:
    """Engine.generate's shape: one list of n Outputs per prompt, here answers fixed in advance."""

    max_len = 512

    def __init__(self, tokenizer, answers: list[list[str]]):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [[SimpleNamespace(text=text, token_ids=[]) for text in answers] for answers in self.answers]


@pytest.fixture(scope="module")
def tokenizer(base_model):
    from lmforge.tokenizer import Tokenizer

    return Tokenizer.from_dir(base_model)


def test_scores_and_pass_at_k(tokenizer):
    items = [GenerativeItem("q1", "#### 3"), GenerativeItem("q2", "#### 10")]
    engine = CannedEngine(tokenizer, [["#### 3", "the answer: 3", "#### 4"], ["#### 9", "#### 9", "10"]])
    result = evaluate_generative(engine, items, n=3, k=(1, 2, 3), temperature=1.0)
    m = result["metrics"]
    assert m["exact_match,strict-match"] == pytest.approx(1 / 6)
    assert m["exact_match,flexible-extract"] == pytest.approx(3 / 6)
    # pass@k over the strict filter: item 1 has c=1 of n=3, item 2 has c=0
    assert m["pass@1"] == pytest.approx((1 / 3) / 2)
    assert m["pass@2"] == pytest.approx((1 - 1 / 3) / 2)  # 1 - C(2,2)/C(3,2)
    assert m["pass@3"] == pytest.approx(0.5)
    assert result["samples"][0]["strict"] == [True, False, False]
    params = engine.calls[0][1]
    assert [p.seed for p in params] == [0, 3] and all(p.n == 3 and p.temperature == 1.0 for p in params)


def test_prompt_formats(tokenizer):
    items = [GenerativeItem("How many?", "#### 2")]
    chat = tokenizer.decode(build_prompts(tokenizer, items, True, [])[0])
    assert "How many?" in chat and chat != "How many?"
    shots = [GenerativeItem("One?", "1 + 0 = 1\n#### 1")]
    plain = tokenizer.decode(build_prompts(tokenizer, items, False, shots)[0])
    assert plain.endswith("Question: One?\nAnswer: 1 + 0 = 1\n#### 1\n\nQuestion: How many?\nAnswer:")
    engine = CannedEngine(tokenizer, [["#### 2"]])
    evaluate_generative(engine, items, chat=False)
    assert "Question:" in engine.calls[0][1][0].stop  # base-model prompts stop where lm-eval's do


def test_bad_settings(tokenizer):
    items = [GenerativeItem("q", "#### 1")]
    with pytest.raises(ValueError, match="temperature"):
        evaluate_generative(CannedEngine(tokenizer, [["1"]]), items, n=2, k=(1,))
    with pytest.raises(ValueError, match="pass@4"):
        evaluate_generative(CannedEngine(tokenizer, [["1"]]), items, n=2, k=(4,), temperature=1.0)


def test_read_generative(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "a?", "answer": "#### 1"}\n\n'
                    '{"prompt": [{"role": "user", "content": "b?"}], "answer": 2}\n')
    assert read_generative(path) == [GenerativeItem("a?", "#### 1"), GenerativeItem("b?", "2")]
    path.write_text('{"question": "a?", "answer": "#### 1"}\n{"question": "b?"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl, line 2: field 'answer'"):
        read_generative(path)
    path.write_text('{"question": "a?", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"t.jsonl, line 2: malformed JSON"):
        read_generative(path)


def test_real_engine_greedy(base_model, tokenizer):
    """A real tiny Engine: greedy answers are deterministic, and the score is the strict filter of them."""
    from lmforge.checkpoint import load_model
    from lmforge.eval.generative import builtin_arithmetic
    from lmforge.infer.engine import Engine

    engine = Engine(load_model(base_model).eval(), tokenizer, max_batch_size=8)
    items = builtin_arithmetic(4)
    items[0] = GenerativeItem(items[0].question, "#### 7")
    first = evaluate_generative(engine, items, max_tokens=12)
    again = evaluate_generative(engine, items, max_tokens=12)
    assert first["samples"] == again["samples"]
    texts = [s["completions"][0] for s in first["samples"]]
    expected = sum(exact_match(t, i.answer) for t, i in zip(texts, items)) / 4
    assert first["metrics"]["exact_match,strict-match"] == expected and first["metrics"]["n"] == 4


def test_cli_arithmetic(base_model, tmp_path, capsys):
    from lmforge import cli

    out = tmp_path / "eval"
    code = cli.main(["eval", "--model", str(base_model), "--tasks", "arithmetic", "--limit", "3", "--max-tokens",
                     "8", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["arithmetic"]["n"] == 3
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3
    assert "exact_match,strict-match" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(base_model), "--tasks", "nope", "--out", str(out)]) == 1
    assert "'nope' is neither a built-in task" in capsys.readouterr().err
