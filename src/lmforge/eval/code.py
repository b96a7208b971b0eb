"""Code generation scored by running it, in HumanEval's format (Chen et al. 2021, "Evaluating Large Language
Models Trained on Code").

A problem is a JSONL line with `task_id`, `prompt` (imports, a signature and a docstring), `test` (a
`check(candidate)` function of asserts), `entry_point` (the function's name) and, optionally,
`canonical_solution`. The model continues the prompt; the program checked is

    prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"

run in `lmforge.sandbox` (fresh interpreter, no network, limits, timeout), and it passes iff it exits with 0
in time. Completions are cut as HumanEval cuts a base model's: at the first of STOP_SEQUENCES, a line that
starts at column 0 and is not part of the function. A chat model's reply is read from its first ```python
block: a block that defines the function itself replaces the prompt (whose imports it keeps); any other
block continues it.

pass@k is the unbiased estimator of the paper's section 2.1 over n samples of which c pass.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.formats import read_records
from lmforge.infer.llm import encode_prompts
from lmforge.infer.sampling import SamplingParams
from lmforge.sandbox import SandboxConfig, SandboxResult, run_python

STOP_SEQUENCES = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
FIELDS = ("task_id", "prompt", "test", "entry_point")
BUILTIN = Path(__file__).parent / "data" / "humaneval_mini.jsonl"
# HumanEval's own harness allows 3 s a problem; ours includes the interpreter's start (~0.1 s)
CODE_SANDBOX = SandboxConfig(timeout=5.0, cpu_seconds=5, memory_bytes=512 << 20, max_output_bytes=64 << 10)
FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
CHAT_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python block.\n\n"


@dataclass
class CodeProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None


def read_humaneval(path: str | Path) -> list[CodeProblem]:
    """The problems of a HumanEval-format JSONL file; bad input is a ValueError naming the file and line."""
    problems, seen = [], set()
    for record in read_records(path):
        for name in FIELDS + ("canonical_solution",):
            if name in FIELDS or record.data.get(name) is not None:
                record.get(name)  # present and a string, or a DataError naming the field
        if record.data["task_id"] in seen:
            raise record.error(f"task_id {record.data['task_id']!r} appears twice")
        seen.add(record.data["task_id"])
        problems.append(CodeProblem(*(record.data[name] for name in FIELDS), record.data.get("canonical_solution")))
    return problems


def builtin_humaneval() -> list[CodeProblem]:
    """The built-in set: 20 easy hand-written functions in HumanEval's format, each with a canonical solution."""
    return read_humaneval(BUILTIN)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn from n (c of them correct) is correct:
    1 - C(n-c, k) / C(n, k), as the product 1 - prod(1 - k / i for i in n-c+1..n) (the paper's numerically
    stable form: no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate(completion: str) -> str:
    """A base model's completion up to the first stop sequence (the end of the function's body)."""
    cut = min((i for s in STOP_SEQUENCES if (i := completion.find(s)) >= 0), default=len(completion))
    return completion[:cut]


def program(problem: CodeProblem, completion: str, chat: bool = False) -> str:
    """The program that checks `completion` (see the module's docstring)."""
    code = problem.prompt + truncate(completion)
    if chat and (block := FENCE.search(completion)):
        body = block.group(1)
        if re.search(rf"^def {re.escape(problem.entry_point)}\s*\(", body, re.MULTILINE):
            imports = [line for line in problem.prompt.splitlines() if re.match(r"(import|from)\s", line)]
            code = "\n".join(imports + [body])
        else:
            code = problem.prompt + body
    return f"{code}\n{problem.test}\ncheck({problem.entry_point})\n"


def check(problem: CodeProblem, completion: str, chat: bool = False,
          sandbox: SandboxConfig = CODE_SANDBOX) -> SandboxResult:
    """Run the problem's tests on `completion` in the sandbox; passed iff `result.ok`."""
    return run_python(program(problem, completion, chat), sandbox)


def evaluate_code(engine, problems: list[CodeProblem], *, n: int = 1, k: tuple[int, ...] = (1,),
                  temperature: float = 0.0, max_tokens: int = 256, chat: bool = False, workers: int = 2,
                  seed: int = 0, sandbox: SandboxConfig = CODE_SANDBOX) -> dict:
    """Generate n completions a problem through `engine` (an infer.engine.Engine, all prompts batched), run
    each against the problem's tests in the sandbox (`workers` at a time), and score them:
    {"metrics": {"pass@k" for each k, "n": problems}, "samples": per problem: task_id, completions, passed}."""
    if n > 1 and temperature <= 0:
        raise ValueError(f"n={n} samples at temperature {temperature} would be the same code: set a temperature")
    if any(kk > n for kk in k):
        raise ValueError(f"k: pass@{max(k)} needs at least that many samples; n is {n}")
    texts = [[{"role": "user", "content": CHAT_INSTRUCTION + p.prompt}] if chat else p.prompt for p in problems]
    prompts = encode_prompts(engine.tokenizer, texts, max_len=getattr(engine, "max_len", None))
    params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, stop=[] if chat else STOP_SEQUENCES,
                             seed=seed + i * n) for i in range(len(problems))]
    completions = [[o.text for o in outs] for outs in engine.generate(prompts, params)]
    jobs = [(problem, text) for problem, texts in zip(problems, completions) for text in texts]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # the work is in subprocesses: threads suffice
        passed = list(pool.map(lambda job: check(*job, chat=chat, sandbox=sandbox).ok, jobs))
    samples = [{"task_id": p.task_id, "completions": texts, "passed": passed[i * n:(i + 1) * n]}
               for i, (p, texts) in enumerate(zip(problems, completions))]
    metrics = {f"pass@{kk}": sum(pass_at_k(n, sum(s["passed"]), kk) for s in samples) / len(samples) for kk in k}
    metrics["n"] = len(problems)
    return {"metrics": metrics, "samples": samples}
