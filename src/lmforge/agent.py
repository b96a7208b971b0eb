"""`lmforge agent`: a CodeAct loop (Wang et al. 2024, "Executable Code Actions Elicit Better LLM Agents"):
the model acts by writing Python, a sandboxed interpreter runs it, and the model reads the output before its
next step, until it answers without code or runs out of steps.

    lmforge agent --model runs/codeact/final --prompt "Ava has 347 boxes of 28 marbles. ..."
    lmforge agent --model runs/codeact/final --data runs/tasks/codeact_test.jsonl --out runs/agent.jsonl
    lmforge agent --base-url http://127.0.0.1:8000/v1 --model NAME --prompt "What is 2**100 % 97?"

One step:
1. The model replies to the conversation so far (a model directory in-process through the Engine, or any
   OpenAI-compatible endpoint's /chat/completions).
2. Its action is the first ```python block of the reply, or a `python` tool call: Hermes's
   `<tool_call>{"name": "python", "arguments": {"code": ...}}</tool_call>` in the text (what lmforge's ChatML
   template writes) or an OpenAI `tool_calls` entry. The reply is kept up to the end of its action: a model
   that goes on to imagine the output does not get to keep it.
3. The code runs as the next cell of the conversation's PythonSession (sandbox_session.py: variables
   survive between steps). Its stdout, stderr (a traceback) and what the sandbox did (timeout, restart)
   come back (CellResult.observation), cut to --max-observation-chars, as a `tool` message, which ChatML
   renders as a user turn `<tool_response>...</tool_response>` (a tool call's reply carries its
   tool_call_id). A reply with no action is the final answer; for arithmetic it ends with `#### N`.
Each step is shown in the terminal. --out saves each trajectory as one JSONL line: the messages (in the
format `lmforge sft` reads, so good trajectories are SFT data), the answer, and with --data whether it is
right; --data runs every question of a GSM8K-style JSONL and prints the accuracy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.data.arithmetic import extract_answer, is_correct
from lmforge.data.codeact import SYSTEM_PROMPT
from lmforge.sandbox import SandboxConfig
from lmforge.sandbox_session import PythonSession
from lmforge.settings import parse_args

CODE_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)
HERMES_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)

# A policy: the conversation so far -> the assistant's reply, as an OpenAI message {"role", "content",
# optionally "tool_calls"}.
Policy = Callable[[list[dict]], dict]


@dataclass
class Action:
    code: str
    end: int  # where the action ends in the reply's content (the rest is dropped)
    call: dict | None = None  # an OpenAI tool call, answered by the tool message with its id


@dataclass
class Trajectory:
    messages: list[dict]
    answer: str | None  # the final answer's `#### N`, or None when there was none
    steps: int  # actions run
    finished: bool  # a final answer came before --max-steps
    correct: bool | None = None  # with a reference answer


def find_action(reply: dict) -> Action | None:
    """The reply's first action (see the module's docstring), or None: the reply is a final answer. A call
    whose arguments are not JSON with a string `code` is no action."""
    content = reply.get("content") or ""
    for call in reply.get("tool_calls") or []:
        function = call.get("function", call)
        if function.get("name") == "python" and (code := _code_argument(function.get("arguments"))) is not None:
            return Action(code, len(content), call)
    found = []
    for match in HERMES_CALL.finditer(content):
        call = _json(match.group(1))
        code = _code_argument(call.get("arguments")) if isinstance(call, dict) and call.get("name") == "python" \
            else None
        if code is not None:
            found.append(Action(code, match.end()))
            break
    if match := CODE_BLOCK.search(content):
        found.append(Action(match.group(1), match.end()))
    return min(found, key=lambda action: action.end) if found else None


def _code_argument(arguments) -> str | None:
    """`code` of a call's arguments (a JSON object, or its text as OpenAI sends it), if a string."""
    arguments = _json(arguments) if isinstance(arguments, str) else arguments
    code = arguments.get("code") if isinstance(arguments, dict) else None
    return code if isinstance(code, str) else None


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def run_agent(policy: Policy, question: str, session: PythonSession, max_steps: int = 5,
              system: str | None = SYSTEM_PROMPT, max_observation_chars: int = 2000,
              show: Callable[[dict], None] = lambda message: None) -> Trajectory:
    """The CodeAct loop on one question (see the module's docstring); `show` sees each new message. With
    max_steps 0 the first reply is the answer: the model answers directly, without the sandbox."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    for message in messages:
        show(message)
    steps = 0
    while True:
        reply = policy(messages)
        action = find_action(reply)
        if action is None or steps == max_steps:
            final = {"role": "assistant", "content": reply.get("content") or ""}
            messages.append(final)
            show(final)
            return Trajectory(messages, extract_answer(final["content"]), steps, action is None)
        assistant = {"role": "assistant", "content": (reply.get("content") or "")[:action.end]}
        if action.call is not None:
            assistant["tool_calls"] = [action.call]  # the one answered: OpenAI wants a reply to each
        messages.append(assistant)
        show(assistant)
        result = session.run(action.code)
        steps += 1
        tool = {"role": "tool", "content": result.observation(max_observation_chars)}
        if action.call is not None:
            tool["tool_call_id"] = action.call.get("id", "")
        messages.append(tool)
        show(tool)


# -- policies: a model directory in-process, or an OpenAI-compatible endpoint ------------------------------


def local_policy(model: str, max_tokens: int, temperature: float, seed: int, **engine_options) -> Policy:
    """The model directory through the Engine; the reply's text is the content (a tool call stays in it as
    the template writes it, so the next prompt holds the tokens the model made)."""
    from lmforge.infer.llm import LLM

    llm = LLM.load(model, **engine_options)

    def reply(messages: list[dict]) -> dict:
        return {"role": "assistant", "content": llm.generate(messages, max_tokens=max_tokens, temperature=temperature,
                                                             seed=seed)}

    return reply


def endpoint_policy(base_url: str, model: str, api_key: str, max_tokens: int, temperature: float, seed: int,
                    timeout: float = 600.0) -> Policy:
    """POST /chat/completions to an OpenAI-compatible server (standard library only). A tool message that
    answers a code block (no tool_call_id) goes as the user turn ChatML would render it, which any server
    accepts; one that answers a tool call goes as OpenAI's `tool` message."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    def reply(messages: list[dict]) -> dict:
        sent = [{"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
                if m["role"] == "tool" and "tool_call_id" not in m else m for m in messages]
        body = {"model": model, "messages": sent, "max_tokens": max_tokens, "temperature": temperature,
                "seed": seed}
        request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = json.load(response)
        except urllib.error.HTTPError as e:
            raise ValueError(f"{url}: HTTP {e.code}: {e.read(500).decode('utf-8', 'replace')}") from None
        except urllib.error.URLError as e:
            raise ValueError(f"{url}: {e.reason}") from None
        try:
            message = data["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{url}: not a chat completion: {json.dumps(data)[:200]}") from None
        return {"role": "assistant", "content": message.get("content") or "",
                **({"tool_calls": message["tool_calls"]} if message.get("tool_calls") else {})}

    return reply


# -- the command -------------------------------------------------------------------------------------------


@dataclass
class AgentConfig:
    model: str = field(default="", metadata={
        "help": "a model directory (run in-process), or with --base-url the model's name at the endpoint"})
    base_url: str = field(default="", metadata={
        "help": "an OpenAI-compatible endpoint (http://HOST:PORT/v1) instead of a local model directory"})
    api_key: str = field(default="", metadata={"help": "the endpoint's key (default: $OPENAI_API_KEY, if set)"})
    prompt: str = field(default="", metadata={"help": "one question to solve"})
    data: str = field(default="", metadata={
        "help": "a JSONL of questions (GSM8K's question/answer, e.g. `lmforge tasks --codeact`'s codeact_test.jsonl) "
                "to solve, scored on the answer's `#### N`"})
    limit: int | None = field(default=None, metadata={"help": "at most this many questions of --data", "min": 1})
    out: str = field(default="", metadata={"help": "a JSONL file for the trajectories (one line each)"})
    system: str = field(default=SYSTEM_PROMPT, metadata={"help": "the system prompt ('' for none)"})
    max_steps: int = field(default=5, metadata={
        "help": "most code actions per question (0: the model answers directly, without the sandbox)", "min": 0})
    max_tokens: int = field(default=256, metadata={"help": "most new tokens per reply", "min": 1})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy", "min": 0})
    seed: int = field(default=0, metadata={"help": "the sampling seed"})
    cell_timeout: float = field(default=10.0, metadata={"help": "wall-clock seconds per code action", "min": 0.1})
    cpu_seconds: int = field(default=60, metadata={"help": "CPU seconds of a conversation's interpreter", "min": 1})
    memory_mb: int = field(default=512, metadata={"help": "address space per sandboxed process (MiB)", "min": 64})
    max_observation_chars: int = field(default=2000, metadata={"help": "an observation is cut to this", "min": 100})
    quiet: bool = field(default=False, metadata={"help": "show only the answers, not every step"})


def questions(cfg: AgentConfig) -> list[dict]:
    """The questions to solve, each {"question", "answer" (None without a reference)}."""
    if bool(cfg.prompt) == bool(cfg.data):
        raise ValueError("give one of --prompt (a question) or --data (a JSONL of questions)")
    if cfg.prompt:
        return [{"question": cfg.prompt, "answer": None}]
    items = []
    with open(cfg.data, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                items.append({"question": record["question"], "answer": extract_answer(str(record["answer"]))
                              or str(record["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{cfg.data}, line {number}: not a question/answer record ({e})") from None
            if cfg.limit and len(items) == cfg.limit:
                break
    return items


def show_message(message: dict) -> None:
    label = {"system": "system", "user": "user", "assistant": "model", "tool": "output"}[message["role"]]
    text = message["content"]
    for call in message.get("tool_calls") or []:
        text += f"\n[tool call {call.get('function', call).get('name')}]"
    print(f"--- {label}\n{text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(AgentConfig, argv, prog="lmforge agent",
                     description="A CodeAct agent: the model writes Python, a sandboxed persistent interpreter "
                                 "runs it, the model reads the output, until it answers.")
    items = questions(cfg)
    if not cfg.model:
        raise ValueError("--model: give a model directory, or with --base-url the endpoint's model name")
    if cfg.base_url:
        policy = endpoint_policy(cfg.base_url, cfg.model, cfg.api_key or os.environ.get("OPENAI_API_KEY", ""),
                                 cfg.max_tokens, cfg.temperature, cfg.seed)
    else:
        if not Path(cfg.model).is_dir():
            raise ValueError(f"--model {cfg.model}: not a model directory (an endpoint needs --base-url)")
        policy = local_policy(cfg.model, cfg.max_tokens, cfg.temperature, cfg.seed)
    sandbox = SandboxConfig(timeout=cfg.cell_timeout, cpu_seconds=cfg.cpu_seconds, memory_bytes=cfg.memory_mb << 20)
    right = 0
    with open(cfg.out, "w", encoding="utf-8") if cfg.out else contextlib.nullcontext() as out:
        for index, item in enumerate(items):
            with PythonSession(sandbox) as session:
                trajectory = run_agent(policy, item["question"], session, cfg.max_steps, cfg.system or None,
                                       cfg.max_observation_chars, (lambda m: None) if cfg.quiet else show_message)
            verdict = ""
            if item["answer"] is not None:
                trajectory.correct = trajectory.answer is not None and is_correct(f"#### {trajectory.answer}",
                                                                                  item["answer"])
                right += trajectory.correct
                verdict = " right" if trajectory.correct else f" wrong (expected {item['answer']})"
            print(f"=== [{index + 1}/{len(items)}] answer {trajectory.answer} after {trajectory.steps} "
                  f"step(s){verdict}", flush=True)
            if out:
                out.write(json.dumps({**asdict(trajectory), "question": item["question"],
                                      "reference": item["answer"]}) + "\n")
                out.flush()
    if cfg.data:
        print(f"accuracy {right}/{len(items)} = {right / max(len(items), 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
