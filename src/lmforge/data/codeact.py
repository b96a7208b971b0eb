"""Built-in CodeAct trajectories: arithmetic word problems too big to do in one's head (multi-digit
multiplication, then several steps), each solved by writing Python, reading its real output and answering.

    lmforge tasks --codeact --out runs/tasks [--train 5000 --test 500 --max-ops 3 --seed 0]

A problem starts with boxes of things (two numbers of 2..3 digits to multiply), then 1..max_ops of: buying
more boxes (another product), giving some away, splitting them equally into bags and keeping one:

    Ava has 347 boxes of 28 marbles. She buys 15 more boxes of 64 marbles. Then she gives 1205 marbles to
    a friend. How many marbles does Ava have now?

Its trajectory (a conversation in OpenAI's `messages` format, which `lmforge sft` reads):
    system      SYSTEM_PROMPT, which `lmforge agent` sends too
    user        the question
    assistant   ```python\\nmarbles = 347 * 28\\nmarbles += 15 * 64\\nmarbles -= 1205\\nprint(marbles)\\n```
    tool        the code's output, from running it in a sandbox session, as the agent shows it
                (sandbox_session.CellResult.observation)
    assistant   Ava has 9471 marbles.\\n#### 9471
Only the assistant turns are trained on (the chat template's assistant spans; the tool turn is a user turn
`<tool_response>`). The same problems are also written solved by hand, step by step, for the comparison
with a model that answers directly. Train and held-out problems are split by the question's hash, as the
arithmetic tasks are (arithmetic.is_held_out), so no train set of any size holds a test question.

Files, beside the arithmetic tasks':
    codeact_sft.jsonl           {"messages": the trajectory} for each training problem
    codeact_direct_sft.jsonl    {"messages": [user question, assistant worked steps and `#### N`]}
    codeact_rl.jsonl            {"question", "answer"}: the training problems as RL prompts (`lmforge grpo
                                --sandbox true`)
    codeact_test.jsonl          {"question", "answer"}: held-out problems in GSM8K's format (`lmforge agent
                                --data`, `lmforge eval --tasks gen:FILE`)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.arithmetic import FEMININE, NAMES, THINGS, is_held_out, story
from lmforge.files import write_jsonl_files
from lmforge.sandbox import SandboxConfig
from lmforge.sandbox_session import PythonSession

MAX_COUNT = 999_999
SYSTEM_PROMPT = ("Solve the problem. To run Python, write one ```python code block and stop; you will see "
                 "its output. When you know the answer, reply without code and end with #### followed by "
                 "the number.")


@dataclass
class BoxProblem:
    """`boxes` boxes of `per_box` things, then the operations: ("buy", boxes, per_box) | ("give", n) |
    ("split", bags)."""

    name: str
    things: str
    boxes: int
    per_box: int
    ops: list[tuple]

    @property
    def question(self) -> str:
        she = "She" if self.name in FEMININE else "He"
        events = []
        for op in self.ops:
            if op[0] == "buy":
                events.append(f"{she} buys {op[1]} more boxes of {op[2]} {self.things}.")
            elif op[0] == "give":
                events.append(f"{she} gives {op[1]} {self.things} to a friend.")
            else:
                events.append(f"{she} splits the {self.things} equally into {op[1]} bags and keeps one bag.")
        return story(f"{self.name} has {self.boxes} boxes of {self.per_box} {self.things}.", events, self.name,
                     self.things)

    @property
    def counts(self) -> list[int]:
        """The count at the start and after each operation."""
        counts = [self.boxes * self.per_box]
        for op in self.ops:
            counts.append(_apply(op, counts[-1]))
        return counts

    @property
    def answer(self) -> int:
        return self.counts[-1]

    @property
    def code(self) -> str:
        """The program the assistant writes: the story, one line per sentence."""
        name = self.things
        lines = [f"{name} = {self.boxes} * {self.per_box}"]
        for op in self.ops:
            if op[0] == "buy":
                lines.append(f"{name} += {op[1]} * {op[2]}")
            else:
                lines.append(f"{name} {'-=' if op[0] == 'give' else '//='} {op[1]}")
        return "\n".join(lines + [f"print({name})"])

    @property
    def solution(self) -> str:
        """Worked by hand, one line per step, then `#### N`: what a model answering directly learns."""
        counts = self.counts
        lines = [f"{self.boxes} * {self.per_box} = {counts[0]}."]
        for op, before, after in zip(self.ops, counts, counts[1:]):
            if op[0] == "buy":
                lines.append(f"{op[1]} * {op[2]} = {op[1] * op[2]}; {before} + {op[1] * op[2]} = {after}.")
            elif op[0] == "give":
                lines.append(f"{before} - {op[1]} = {after}.")
            else:
                lines.append(f"{before} / {op[1]} = {after}.")
        return "\n".join(lines + [f"#### {self.answer}"])


def _apply(op: tuple, count: int) -> int:
    if op[0] == "buy":
        return count + op[1] * op[2]
    return count - op[1] if op[0] == "give" else count // op[1]


def _operation(rng: random.Random, count: int) -> tuple | None:
    """An operation that keeps the count a whole number from 1 to MAX_COUNT, or None if none does."""
    kinds = ["buy", "give", "split"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "buy" and count + (n := rng.randint(2, 99)) * (m := rng.randint(10, 999)) <= MAX_COUNT:
            return kind, n, m
        if kind == "give" and count > 10:
            return kind, rng.randint(count // 10, count - 1)
        if kind == "split" and (divisors := [d for d in range(2, 10) if count % d == 0]):
            return kind, rng.choice(divisors)
    return None


def make_problems(count: int, held_out: bool, seed: int = 0, max_ops: int = 3) -> list[BoxProblem]:
    """`count` distinct problems of one split (problem i has 1 + i % max_ops operations), seeded."""
    rng = random.Random(f"codeact-{seed}-{'test' if held_out else 'train'}")
    problems, seen = [], set()
    while len(problems) < count:
        boxes, per_box = rng.randint(12, 999), rng.randint(12, 999)
        ops, counted = [], boxes * per_box
        for _ in range(1 + len(problems) % max_ops):
            if (op := _operation(rng, counted)) is None:
                break
            ops.append(op)
            counted = _apply(op, counted)
        problem = BoxProblem(rng.choice(NAMES), rng.choice(THINGS), boxes, per_box, ops)
        if is_held_out(problem.question) == held_out and problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def trajectory(problem: BoxProblem, session: PythonSession) -> list[dict]:
    """The CodeAct conversation for a problem, with its code's real output from `session`."""
    result = session.run(problem.code)
    if not result.ok or result.stdout.strip() != str(problem.answer):  # the generator and the story disagree
        raise RuntimeError(f"the code for {problem.question!r} printed {result.stdout!r} {result.stderr!r}, "
                           f"expected {problem.answer}")
    output = result.observation()
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": problem.question},
            {"role": "assistant", "content": f"```python\n{problem.code}\n```"},
            {"role": "tool", "content": output},
            {"role": "assistant", "content": f"{problem.name} has {output} {problem.things}.\n#### {output}"}]


def write_codeact(out: str | Path, train: int = 5000, test: int = 500, seed: int = 0, max_ops: int = 3
                  ) -> dict[str, Path]:
    """Write the files of the module's docstring to `out`; returns their paths by name. Every training
    problem's code runs in one sandbox session (a cell each: a fresh interpreter each would take minutes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_set = make_problems(train, held_out=False, seed=seed, max_ops=max_ops)
    test_set = make_problems(test, held_out=True, seed=seed, max_ops=max_ops)
    with PythonSession(SandboxConfig(timeout=30.0, cpu_seconds=600)) as session:
        trajectories = [trajectory(problem, session) for problem in train_set]
    records = {
        "codeact_sft": [{"messages": messages} for messages in trajectories],
        "codeact_direct_sft": [{"messages": [{"role": "user", "content": p.question},
                                             {"role": "assistant", "content": p.solution}]} for p in train_set],
        "codeact_rl": [{"question": p.question, "answer": p.solution} for p in train_set],
        "codeact_test": [{"question": p.question, "answer": p.solution} for p in test_set],
    }
    return write_jsonl_files(out, records)
