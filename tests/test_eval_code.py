"""Code evaluation in HumanEval's format: pass@k against the formula, the built-in problems' canonical
solutions pass and wrong ones fail, completions are cut and unfenced as HumanEval does, and evaluate_code
scores a fake engine's canned completions and a real tiny Engine's, carrying on past code that hangs or
fork-bombs."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from math import comb

import pytest

from lmforge.config import preset
from lmforge.eval.code import (
    CODE_SANDBOX,
    STOP_SEQUENCES,
    CodeProblem,
    builtin_humaneval,
    check,
    evaluate_code,
    pass_at_k,
    program,
    read_humaneval,
    truncate,
)
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.llm import encode_prompts
from lmforge.infer.request import Output
from lmforge.model import build_model
from lmforge.sandbox import SandboxConfig, choose_isolation, protections
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
ADD = CodeProblem("t/add", "from math import fsum\n\n\ndef add(a, b):\n    \"\"\"Sum.\"\"\"\n",
                  "def check(candidate):\n    assert candidate(2, 3) == 5\n", "add", "    return a + b\n")


def exact_pass_at_k(n, c, k):
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (10, 3, 5), (10, 10, 10),
                                   (200, 3, 100), (200, 0, 50), (200, 199, 2), (1000, 7, 1)])
def test_pass_at_k_equals_the_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0  # nothing correct
    assert pass_at_k(10, 10, 1) == 1.0  # everything correct
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw of k holds a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)]:
        with pytest.raises(ValueError, match="pass@k"):
            pass_at_k(n, c, k)


def test_the_builtin_canonical_solutions_pass_and_wrong_ones_fail():
    problems = builtin_humaneval()
    assert len(problems) == 20 and len({p.task_id for p in problems}) == 20
    assert all(p.canonical_solution and p.entry_point in p.prompt for p in problems)
    with ThreadPoolExecutor(2) as pool:
        right = list(pool.map(lambda p: check(p, p.canonical_solution), problems))
        wrong = list(pool.map(lambda p: check(p, "    return None\n"), problems))
    assert [r.ok for r in right] == [True] * 20, [r.stderr for r in right if not r.ok]
    assert [r.ok for r in wrong] == [False] * 20
    assert all(r.returncode == 1 and "Traceback" in r.stderr for r in wrong)  # the tests failed: not a crash


def test_read_humaneval_names_file_and_line(tmp_path):
    good = {"task_id": "a/0", "prompt": "def f():\n", "test": "def check(c):\n    pass\n", "entry_point": "f"}
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "task_id": "a/1", "canonical_solution": "x"}))
    problems = read_humaneval(path)
    assert [p.task_id for p in problems] == ["a/0", "a/1"] and problems[1].canonical_solution == "x"
    cases = [("{oops", "malformed JSON"), ("[1, 2]", "expected a JSON object"),
             (json.dumps({k: v for k, v in good.items() if k != "test"}), "missing field 'test'"),
             (json.dumps({**good, "entry_point": 3}), "field 'entry_point' should be str"),
             (json.dumps(good), "task_id 'a/0' appears twice")]
    for line, message in cases:
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"^{path}, line 2: {message}"):
            read_humaneval(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty file"):
        read_humaneval(path)


def test_completions_are_cut_at_the_stop_sequences():
    body = "    x = 1\n    # a comment in the body stays\n    return x\n"
    for stop in STOP_SEQUENCES:
        assert truncate(body + stop.lstrip("\n") + "more") == body[:-1]  # the stop's newline is the body's last
        assert truncate(body + "\n" + stop.lstrip("\n") + " more") == body
    assert truncate(body) == body
    assert program(ADD, "    return a + b\n\ndef unrelated():\n    1/0\n") == (
        ADD.prompt + "    return a + b\n" + "\n" + ADD.test + "\ncheck(add)\n")


def test_a_chat_reply_is_read_from_its_first_python_block():
    whole = "Here it is:\n```python\ndef add(a, b):\n    return fsum([a, b])\n```\nand\n```python\n1/0\n```"
    code = program(ADD, whole, chat=True)
    assert code.startswith("from math import fsum\ndef add(a, b):") and '"""Sum."""' not in code and "1/0" not in code
    assert check(ADD, whole, chat=True).ok  # the prompt's import came along
    assert program(ADD, "```py\n    return a + b\n```", chat=True).startswith(ADD.prompt + "    return a + b\n")
    assert check(ADD, "```\n    return a + b\n```", chat=True).ok  # a bare fence: a body continuing the prompt
    assert check(ADD, "    return a + b\n", chat=True).ok  # no fence: as a base model's completion
    assert not check(ADD, "```python\ndef add(a, b):\n    return a - b\n```", chat=True).ok


class FakeTokenizer:
    """Characters as token ids, so the fake engine can read its prompts back."""
    max_chars_per_token = 1

    def encode(self, text, add_special_tokens=True):
        return [ord(ch) for ch in text]

    def encode_batch(self, texts, add_special_tokens=True):
        return [self.encode(text) for text in texts]

    def min_tokens(self, text):
        return len(text)


class FakeEngine:
    """Engine.generate's signature and output shape, with canned completions per prompt text."""

    def __init__(self, canned: dict[str, list[str]]):
        self.tokenizer, self.max_len, self.canned, self.params = FakeTokenizer(), 4096, canned, []

    def generate(self, prompts, params):
        self.params += params
        return [[Output(i, text, [], "stop", None) for i, text in enumerate(self.canned["".join(map(chr, p))][:q.n])]
                for p, q in zip(prompts, params)]


def test_evaluate_code_scores_canned_completions_and_survives_hostile_code():
    problems = builtin_humaneval()[:4]
    hostile = {0: "    while True:\n        pass\n", 1: "    import time\n    time.sleep(60)\n"}
    if "processes" in protections(choose_isolation()):  # only where a fork bomb is contained
        hostile[1] = "    import os\n    while True:\n        os.fork()\n"
    canned = {p.prompt: [hostile.get(i, p.canonical_solution), "    return None\n", p.canonical_solution]
              for i, p in enumerate(problems)}
    engine = FakeEngine(canned)
    sandbox = SandboxConfig(timeout=2.0, cpu_seconds=2)
    result = evaluate_code(engine, problems, n=3, k=(1, 2), temperature=0.8, seed=5, sandbox=sandbox)
    passed = [s["passed"] for s in result["samples"]]
    assert passed == [[False, False, True], [False, False, True], [True, False, True], [True, False, True]]
    assert [s["task_id"] for s in result["samples"]] == [p.task_id for p in problems]
    assert result["samples"][0]["completions"] == canned[problems[0].prompt]
    expected = [sum(pass_at_k(3, sum(p), k) for p in passed) / 4 for k in (1, 2)]
    assert result["metrics"] == pytest.approx({"pass@1": expected[0], "pass@2": expected[1], "n": 4})
    assert [q.seed for q in engine.params] == [5, 8, 11, 14] and engine.params[0].stop == STOP_SEQUENCES
    with pytest.raises(ValueError, match="pass@3"):
        evaluate_code(engine, problems, n=2, k=(3,), temperature=0.8)
    with pytest.raises(ValueError, match="temperature"):
        evaluate_code(engine, problems, n=2)


def test_evaluate_code_with_a_real_tiny_engine(tmp_path):
    text = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n# numbers, strings and lists\n" * 30
    (tmp_path / "corpus.txt").write_text(text)
    tokenizer = train_tokenizer([str(tmp_path / "corpus.txt")], vocab_size=300, out_dir=tmp_path, show_progress=False)
    model = build_model(preset("tiny", vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512), seed=0)
    engine = Engine(model, tokenizer, max_batch_size=2, max_len=512)
    problems = sorted(builtin_humaneval(), key=lambda p: len(p.prompt))[:2]
    result = evaluate_code(engine, problems, max_tokens=12, sandbox=CODE_SANDBOX)
    assert len(result["samples"]) == 2 and all(len(s["completions"]) == 1 for s in result["samples"])
    assert result["metrics"]["pass@1"] == sum(s["passed"][0] for s in result["samples"]) / 2
    greedy = engine.generate(encode_prompts(tokenizer, [problems[1].prompt]),
                             SamplingParams(max_tokens=12, temperature=0.0, stop=STOP_SEQUENCES))
    assert result["samples"][1]["completions"] == [greedy[0][0].text]  # the engine's greedy text, stop excluded
    for sample in result["samples"]:
        assert truncate(sample["completions"][0]) == sample["completions"][0]
