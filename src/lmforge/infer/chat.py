"""`lmforge chat --model DIR`: a terminal chat that streams replies.

Commands typed at the prompt:
    /reset          forget the conversation (the system prompt stays)
    /system TEXT    set the system prompt (empty TEXT removes it) and start over
    /exit           leave (so does end of input, Ctrl-D)
After each reply a line gives its speed: tokens, decode tokens/s, time to the first token, and the
prompt's tokens with how many of them the engine's prefix cache held.
The whole conversation is rendered with the model's own chat template every turn (the engine finds
the earlier turns in its prefix cache and prefills only the new message); when it no longer fits in
the context, the oldest exchanges are dropped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from lmforge.infer.engine import Engine
from lmforge.infer.generate import SamplingConfig
from lmforge.infer.llm import encode_prompts
from lmforge.infer.sampling import SamplingParams
from lmforge.settings import parse_args


@dataclass
class ChatConfig(SamplingConfig):
    system: str | None = field(default=None, metadata={"help": "system prompt"})
    max_new_tokens: int = field(default=512, metadata={"help": "most tokens per reply"})
    temperature: float = field(default=0.7, metadata={"help": "0 (below 1e-5) = greedy"})


def fit_prompt(engine: Engine, system: str | None, history: list[dict], max_new_tokens: int) -> list[int] | None:
    """Token ids of the chat with the generation prompt, dropping the oldest exchanges until it leaves
    room for a reply (at least a quarter of the context, at most max_new_tokens); None if nothing fits."""
    room = min(max_new_tokens, engine.max_len // 4)
    head = [{"role": "system", "content": system}] if system else []
    for start in range(0, len(history), 2):
        (ids,) = encode_prompts(engine.tokenizer, [head + history[start:]])
        if len(ids) + room <= engine.max_len:
            return ids
    return None


def reply(engine: Engine, prompt: list[int], params: SamplingParams) -> str:
    """Stream one reply to stdout; then print its speed line."""
    started = time.perf_counter()
    first = None
    request = engine.submit(prompt, params)
    for delta in request:
        if first is None:
            first = time.perf_counter()
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    ended = time.perf_counter()
    output = request.outputs[0]
    tokens = len(output.token_ids)
    decode_speed = (tokens - 1) / (ended - first) if tokens > 1 and ended > first else 0.0
    print(f"\n[{tokens} tokens, {decode_speed:.1f} tok/s, first token {(first - started) * 1000:.0f} ms, "
          f"prompt {len(prompt)} tokens ({request.cached_tokens} cached), {output.finish_reason}]")
    return output.text


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(ChatConfig, argv, prog="lmforge chat",
                     description="Chat with a model in the terminal (/reset, /system TEXT, /exit).")
    engine = cfg.engine()
    params = cfg.sampling_params(engine.vocab_size)
    system, history = cfg.system, []
    print(f"chatting with {cfg.model} ({engine.max_len}-token context). /reset, /system TEXT, /exit", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if text == "/system" or text.startswith("/system "):
            system, history = text[len("/system"):].strip() or None, []
            print(f"(system prompt {'set' if system else 'removed'}; conversation cleared)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        prompt = fit_prompt(engine, system, history, params.max_tokens)
        if prompt is None:
            print("(that message is too long for the context; try a shorter one)")
            history.pop()
            continue
        sys.stdout.write("assistant> ")
        history.append({"role": "assistant", "content": reply(engine, prompt, params)})
    return 0
