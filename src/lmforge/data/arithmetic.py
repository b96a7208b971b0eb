"""Built-in verifiable tasks: arithmetic word problems with checkable integer answers, in GSM8K's format.

    lmforge tasks --out runs/tasks [--train 5000 --test 500 --max-ops 3 --max-digits 2 --seed 0] [--codeact]

A problem is a short story of 1..max_ops operations on a count of things ("Ava has 12 apples. She buys 5
more. Then she gives 3 to a friend. How many apples does Ava have now?"), with numbers of 1..max_digits
digits; its solution works the steps one line each and ends with GSM8K's `#### N`:

    Ava starts with 12 apples.
    She buys 5 more: 12 + 5 = 17.
    She gives away 3: 17 - 3 = 14.
    #### 14

Every count stays a whole number between 0 and 9999 (a division always divides evenly). The generator is
seeded and deterministic. Train and held-out problems never overlap: a problem is held out when the hash of
its question text says so (one in HELD_OUT_EVERY), whatever seed or count made it, so no train set of any
size holds a test question.

`lmforge tasks` writes what every post-training stage reads (data.formats, data.prompts, data.preference):
    train.jsonl, test.jsonl    {"question", "answer"}: GSM8K's own format, so real GSM8K files are a drop-in
    sft.jsonl                  {"messages": [user question, assistant solution]}
    preference.jsonl           {"prompt", "chosen", "rejected"}: the solution against one with a slip in a step
    prompts.jsonl              {"prompt", "answer"}: RL prompts with the number to reach
and with --codeact, CodeAct trajectories of bigger problems (data/codeact.py): codeact_sft.jsonl,
codeact_direct_sft.jsonl, codeact_test.jsonl.
The answer checks (`extract_answer`) are lm-evaluation-harness's two for GSM8K: strict (the number after
`#### `) and flexible (the last number in the text).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.files import write_jsonl_files
from lmforge.settings import parse_args

HELD_OUT_EVERY = 10  # one problem in this many (by its question's hash) belongs to the held-out set
MAX_COUNT = 9999
NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena", "Max", "Nora",
         "Omar", "Pia", "Ravi", "Sara", "Theo", "Uma", "Zoe"]
THINGS = ["apples", "marbles", "books", "stamps", "coins", "pencils", "cookies", "shells", "cards", "eggs",
          "stickers", "beads"]
# lm-evaluation-harness's gsm8k filters (tasks/gsm8k/gsm8k.yaml): "strict-match" and "flexible-extract"
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


FEMININE = {"Ava", "Chloe", "Emma", "Grace", "Ivy", "Lena", "Nora", "Pia", "Sara", "Uma", "Zoe"}
MULTIPLES = {2: "doubles", 3: "triples", 4: "quadruples"}


@dataclass
class Problem:
    """A start count of things and the operations on it: ("add" | "subtract" | "multiply" | "divide", n)."""

    name: str
    things: str
    start: int
    ops: list[tuple[str, int]]

    @property
    def question(self) -> str:
        she = "She" if self.name in FEMININE else "He"
        her = "her" if self.name in FEMININE else "his"
        events = []
        for kind, n in self.ops:
            if kind == "add":
                events.append(f"{she} buys {n} more.")
            elif kind == "subtract":
                events.append(f"{she} gives {n} to a friend.")
            elif kind == "multiply":
                events.append(f"{she} {MULTIPLES[n]} {her} {self.things}.")
            else:
                events.append(f"{she} splits them equally into {n} bags and keeps one bag.")
        return story(f"{self.name} has {self.start} {self.things}.", events, self.name, self.things)

    @property
    def steps(self) -> list[str]:
        return solution_steps(self)

    @property
    def answer(self) -> int:
        return replay(self.start, self.ops)[-1]

    @property
    def solution(self) -> str:
        """GSM8K's answer field: the worked steps, then `#### N`."""
        return "\n".join(self.steps + [f"#### {self.answer}"])

    @property
    def held_out(self) -> bool:
        return is_held_out(self.question)


def story(opening: str, events: list[str], name: str, things: str) -> str:
    """A problem's text: the opening, the events ("Then ..." from the second on), the question."""
    told = [event if i == 0 else "Then " + event[0].lower() + event[1:] for i, event in enumerate(events)]
    return " ".join([opening, *told, f"How many {things} does {name} have now?"])


def apply(kind: str, count: int, n: int) -> int:
    return {"add": count + n, "subtract": count - n, "multiply": count * n, "divide": count // n}[kind]


def replay(start: int, ops: list[tuple[str, int]], slip: tuple[int, int] | None = None) -> list[int]:
    """The count after each operation (the start first); `slip` = (step, error): that step's result is off by
    `error`, and the steps after it carry the wrong count on."""
    counts = [start]
    for i, (kind, n) in enumerate(ops):
        counts.append(apply(kind, counts[-1], n) + (slip[1] if slip and slip[0] == i else 0))
    return counts


def solution_steps(problem: Problem, slip: tuple[int, int] | None = None) -> list[str]:
    counts = replay(problem.start, problem.ops, slip)
    symbol = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}
    lines = [f"{problem.name} starts with {problem.start} {problem.things}."]
    for (kind, n), before, after in zip(problem.ops, counts, counts[1:]):
        what = {"add": "Buys {n} more", "subtract": "Gives away {n}", "multiply": "{times} them",
                "divide": "One bag of {n}"}[kind].format(n=n, times=MULTIPLES.get(n, "").capitalize())
        lines.append(f"{what}: {before} {symbol[kind]} {n} = {after}.")
    return lines


def is_held_out(question: str) -> bool:
    """Whether a question belongs to the held-out split: by its text alone, so the splits never overlap."""
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % HELD_OUT_EVERY == 0


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _operation(rng: random.Random, count: int, digits: int) -> tuple[str, int] | None:
    """An operation on `count` that keeps it a whole number from 0 to MAX_COUNT, or None if none does."""
    kinds = ["add", "subtract", "multiply", "divide"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "add" and count + (n := _number(rng, digits)) <= MAX_COUNT:
            return kind, n
        if kind == "subtract" and (n := _number(rng, digits)) <= count:
            return kind, n
        if kind == "multiply" and count * (n := rng.choice(list(MULTIPLES))) <= MAX_COUNT:
            return kind, n
        if kind == "divide" and (divisors := [d for d in range(2, 10) if count % d == 0 and count // d > 0]):
            return kind, rng.choice(divisors)
    return None


def make_problem(rng: random.Random, ops: int, digits: int) -> Problem:
    """A problem of up to `ops` operations on numbers of up to `digits` digits."""
    start = max(2, _number(rng, digits))  # "has 2 apples": never a singular
    steps, count = [], start
    for _ in range(ops):
        if (op := _operation(rng, count, rng.randint(1, digits))) is None:
            break
        steps.append(op)
        count = apply(op[0], count, op[1])
    return Problem(rng.choice(NAMES), rng.choice(THINGS), start, steps)


def make_problems(count: int, held_out: bool, seed: int = 0, max_ops: int = 3, max_digits: int = 2
                  ) -> list[Problem]:
    """`count` distinct problems of one split, difficulty graded evenly over 1..max_ops operations and
    1..max_digits digits (problem i has 1 + i % max_ops operations), in a seeded order."""
    if max_ops < 1 or max_digits < 1:
        raise ValueError("max_ops and max_digits must be at least 1")
    rng = random.Random(f"{seed}-{'test' if held_out else 'train'}")
    problems, seen, tries = [], set(), 0
    while len(problems) < count:
        tries += 1
        if tries > 1000 * (count + 10):
            raise ValueError(f"only {len(problems)} distinct problems of this difficulty could be made; ask for "
                             "fewer, or raise max_ops or max_digits")
        level = len(problems)
        problem = make_problem(rng, 1 + level % max_ops, 1 + (level // max_ops) % max_digits)
        if problem.held_out == held_out and problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def wrong_solution(problem: Problem, rng: random.Random) -> str:
    """The solution with a slip in one step (its result off by 1 to 3), carried on through the later steps
    to a wrong final answer, as long as the right one: the rejected side of a preference pair, wrong the way
    a weak model is. A slip that a later division could not carry on goes to the last step instead."""
    error = rng.choice([-1, 1]) * rng.randint(1, 3)
    for step in ([rng.randrange(len(problem.ops))] if problem.ops else []) + [len(problem.ops) - 1]:
        counts = replay(problem.start, problem.ops, (step, error))
        carried = all(kind != "divide" or before % n == 0
                      for (kind, n), before in zip(problem.ops[step + 1:], counts[step + 1:]))
        if step >= 0 and carried and min(counts) >= 0:
            return "\n".join(solution_steps(problem, (step, error)) + [f"#### {counts[-1]}"])
    return "\n".join(problem.steps + [f"#### {problem.answer + abs(error)}"])  # no operation: the count is off


def extract_answer(text: str, strict: bool = True) -> str | None:
    """The answer a completion gives: strict, the number after `#### `; flexible, the last number in the
    text (lm-evaluation-harness's gsm8k filters); commas, `$` and a trailing `.` removed. None if none."""
    if strict:
        match = STRICT.search(text)
        found = match.group(1) if match else None
    else:
        matches = FLEXIBLE.findall(text)
        found = next((g for g in matches[-1] if g), None) if matches else None
    if found is None:
        return None
    return found.replace(",", "").replace("$", "").rstrip(".") or None


def is_correct(completion: str, answer: int | str, strict: bool = True) -> bool:
    """Whether the completion's extracted answer equals `answer` as a number (so "14" and "14.0" agree)."""
    found = extract_answer(completion, strict)
    try:
        return found is not None and float(found) == float(answer)
    except ValueError:
        return False


def write_tasks(out: str | Path, train: int = 5000, test: int = 500, seed: int = 0, max_ops: int = 3,
                max_digits: int = 2) -> dict[str, Path]:
    """Write the task files (see the module docstring) to `out`; returns their paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_set = make_problems(train, held_out=False, seed=seed, max_ops=max_ops, max_digits=max_digits)
    test_set = make_problems(test, held_out=True, seed=seed, max_ops=max_ops, max_digits=max_digits)
    rng = random.Random(f"{seed}-rejected")
    records = {
        "train": [{"question": p.question, "answer": p.solution} for p in train_set],
        "test": [{"question": p.question, "answer": p.solution} for p in test_set],
        "sft": [{"messages": [{"role": "user", "content": p.question},
                              {"role": "assistant", "content": p.solution}]} for p in train_set],
        "preference": [{"prompt": [{"role": "user", "content": p.question}],
                        "chosen": [{"role": "assistant", "content": p.solution}],
                        "rejected": [{"role": "assistant", "content": wrong_solution(p, rng)}]} for p in train_set],
        "prompts": [{"prompt": [{"role": "user", "content": p.question}], "answer": str(p.answer)}
                    for p in train_set],
    }
    return write_jsonl_files(out, records)


@dataclass
class TasksConfig:
    out: str = field(default="runs/tasks", metadata={"help": "directory for the JSONL files"})
    train: int = field(default=5000, metadata={"help": "training problems", "min": 0})
    test: int = field(default=500, metadata={"help": "held-out problems (never in the training set)", "min": 0})
    seed: int = field(default=0, metadata={"help": "the generator's seed"})
    max_ops: int = field(default=3, metadata={"help": "most operations in a problem (1..max_ops)", "min": 1,
                                              "max": 8})
    max_digits: int = field(default=2, metadata={"help": "most digits in a number (1..max_digits)", "min": 1,
                                                 "max": 4})
    codeact: bool = field(default=False, metadata={
        "help": "also write CodeAct trajectories (data/codeact.py): bigger problems (multi-digit products, "
                "--max-ops more steps) solved by code run in the sandbox, as many as --train and --test"})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(TasksConfig, argv, prog="lmforge tasks",
                     description="Write the built-in arithmetic word problems (GSM8K format) and what post-training "
                                 "reads of them: SFT conversations, preference pairs, RL prompts.")
    paths = write_tasks(cfg.out, cfg.train, cfg.test, cfg.seed, cfg.max_ops, cfg.max_digits)
    if cfg.codeact:
        from lmforge.data.codeact import write_codeact

        paths |= write_codeact(cfg.out, cfg.train, cfg.test, cfg.seed, cfg.max_ops)
    for name, path in paths.items():
        print(f"{name:10s} {len(path.read_text(encoding='utf-8').splitlines()):6d} records -> {path}")
    return 0
