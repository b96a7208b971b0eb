"""The built-in verifiable tasks: seeded arithmetic word problems in GSM8K's format, splits that never
overlap, solutions whose every step is right, rejected solutions that are wrong, and the answer checks
of lm-evaluation-harness's gsm8k filters."""

from __future__ import annotations

import json
import random
import re

import pytest

from lmforge import cli
from lmforge.data.arithmetic import extract_answer, is_correct, is_held_out, make_problems, wrong_solution
from lmforge.data.preference import read_pairs
from lmforge.data.prompts import parse_gsm8k_answer, read_prompts
from lmforge.data.sft import SFTDataset

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.$")


def check_steps(solution: str) -> int:
    """Each step's arithmetic is right and starts from the previous result; returns the final answer."""
    lines = solution.splitlines()
    count = int(re.search(r"starts with (\d+)", lines[0]).group(1))
    for line in lines[1:-1]:
        a, op, b, result = STEP.search(line).groups()
        assert int(a) == count, line
        count = {"+": count + int(b), "-": count - int(b), "*": count * int(b), "/": count // int(b)}[op]
        assert op != "/" or int(a) % int(b) == 0, line
        assert count == int(result) and 0 <= count <= 9999, line
    assert lines[-1] == f"#### {count}"
    return count


def test_problems_are_seeded_graded_and_their_solutions_right():
    problems = make_problems(300, held_out=False, seed=3, max_ops=3, max_digits=2)
    assert [p.question for p in problems] == [p.question for p in make_problems(300, False, seed=3)]
    assert [p.question for p in problems] != [p.question for p in make_problems(300, False, seed=4)]
    assert len({p.question for p in problems}) == 300
    assert {len(p.ops) for p in problems} == {1, 2, 3}  # graded difficulty
    assert max(p.answer for p in problems) >= 100  # two-digit numbers, multiplied
    for p in problems:
        assert check_steps(p.solution) == p.answer and p.question.endswith("have now?")
        assert parse_gsm8k_answer(p.solution) == str(p.answer)


def test_train_and_held_out_never_overlap_whatever_the_seed():
    train = {p.question for seed in (0, 1) for p in make_problems(500, held_out=False, seed=seed)}
    test = {p.question for p in make_problems(200, held_out=True, seed=7)}
    assert not train & test
    assert all(is_held_out(q) for q in test) and not any(is_held_out(q) for q in train)


def test_a_rejected_solution_is_wrong_with_a_slip_carried_on():
    rng = random.Random(0)
    for p in make_problems(200, held_out=False, seed=1):
        wrong = wrong_solution(p, rng)
        assert not is_correct(wrong, p.answer) and extract_answer(wrong) is not None
        assert len(wrong.splitlines()) == len(p.solution.splitlines())  # no length cue to learn from
        lines = wrong.splitlines()
        slipped = [line for line, right in zip(lines, p.solution.splitlines()) if line != right]
        assert slipped and all(STEP.search(line) for line in slipped[:-1])  # the steps after the slip carry it


@pytest.mark.parametrize("text, strict, flexible", [
    ("So 3 + 4 = 7.\n#### 7", "7", "7"),
    ("#### 1,234", "1234", "1234"),
    ("The answer is $12.", None, "12"),
    ("I think 5 then 6", None, "6"),
    ("#### -3", "-3", "-3"),
    ("no number here", None, None),
])
def test_answer_extraction_follows_lm_evaluation_harness(text, strict, flexible):
    assert extract_answer(text, strict=True) == strict
    assert extract_answer(text, strict=False) == flexible
    assert is_correct(text, flexible or 0, strict=False) == (flexible is not None)


def test_the_command_writes_what_every_stage_reads(tmp_path, corpus):
    assert cli.main(["tasks", "--out", str(tmp_path), "--train", "40", "--test", "10"]) == 0
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(test) == 10 and all(is_held_out(row["question"]) for row in test)
    prompts = list(read_prompts(tmp_path / "prompts.jsonl"))
    gsm8k = list(read_prompts(tmp_path / "train.jsonl"))  # GSM8K's own format, through the same reader
    assert [p.answer for p in prompts] == [p.answer for p in gsm8k] and len(prompts) == 40
    pairs = list(read_pairs(tmp_path / "preference.jsonl"))
    assert len(pairs) == 40 and all(p.chosen != p.rejected for p in pairs)
    from lmforge.tokenizer import Tokenizer

    samples = list(SFTDataset(str(tmp_path / "sft.jsonl"), Tokenizer.from_dir(corpus[0]), max_len=512))
    assert len(samples) == 40
