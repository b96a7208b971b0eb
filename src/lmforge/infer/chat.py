"""`lmforge chat --model DIR`: a terminal chat that streams replies.

Commands typed at the prompt:
    /reset          forget the conversation (the system prompt stays)
    /system TEXT    set the system prompt (empty TEXT removes it) and start over
    /image PATH     show a vision-language model an image with your next message (repeat for several)
    /exit           leave (so does end of input, Ctrl-D)
After each reply a line gives its speed: tokens, decode tokens/s, time to the first token, and the
prompt's tokens with how many of them the engine's prefix cache held.
The whole conversation is rendered with the model's own chat template every turn (the engine finds
the earlier turns in its prefix cache and prefills only the new message); when it no longer fits in
the context, the oldest exchanges are dropped (with their images).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from lmforge.infer.engine import Engine
from lmforge.infer.generate import SamplingConfig
from lmforge.infer.llm import encode_chat_images
from lmforge.infer.sampling import SamplingParams
from lmforge.settings import parse_args
from lmforge.vision.image import ImageError, read_image


@dataclass
class ChatConfig(SamplingConfig):
    system: str | None = field(default=None, metadata={"help": "system prompt"})
    max_new_tokens: int = field(default=512, metadata={"help": "most tokens per reply"})
    temperature: float = field(default=0.7, metadata={"help": "0 (below 1e-5) = greedy"})


def fit_prompt(engine: Engine, system: str | None, history: list[dict],
               max_new_tokens: int) -> tuple[list[int], list] | None:
    """(token ids, images) of the chat with the generation prompt, dropping the oldest exchanges until it
    leaves room for a reply (at least a quarter of the context, at most max_new_tokens); None if nothing fits.
    Each image is one `<image>` token here, and as many as the engine expands it to in the count."""
    room = min(max_new_tokens, engine.max_len // 4)
    head = [{"role": "system", "content": system}] if system else []
    for start in range(0, len(history), 2):
        ids, images = encode_chat_images(engine.tokenizer, head + history[start:])
        image_tokens = len(images) * (engine.vision.config.image_seq_length - 1) if images else 0
        if len(ids) + image_tokens + room <= engine.max_len:
            return ids, images
    return None


def user_message(text: str, images: list) -> dict:
    """The user's turn: its images (as training data has them, before the text), then the text."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": image} for image in images]
            + [{"type": "text", "text": text}]}


def attach(engine: Engine, path: str, images: list) -> str:
    """/image PATH: read the image for the next message; what happened, as the line to print."""
    if engine.vision is None:
        return "(this model has no vision tower: it cannot take images)"
    if not path:
        return "(usage: /image PATH)"
    try:
        images.append(read_image(path))
    except FileNotFoundError:
        return f"({path}: no such file)"
    except ImageError as e:
        return f"({e})"
    return f"({path} attached to your next message: {len(images)} image{'s' * (len(images) > 1)})"


def reply(engine: Engine, prompt: list[int], params: SamplingParams, images: list | None = None) -> str:
    """Stream one reply to stdout; then print its speed line."""
    started = time.perf_counter()
    first = None
    request = engine.submit(prompt, params, images or None)
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
          f"prompt {len(request.prompt)} tokens ({request.cached_tokens} cached), {output.finish_reason}]")
    return output.text


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(ChatConfig, argv, prog="lmforge chat",
                     description="Chat with a model in the terminal (/reset, /system TEXT, /image PATH, /exit).")
    engine = cfg.engine()
    params = cfg.sampling_params(engine.vocab_size)
    system, history, images = cfg.system, [], []
    commands = "/reset, /system TEXT, " + ("/image PATH, " if engine.vision is not None else "") + "/exit"
    print(f"chatting with {cfg.model} ({engine.max_len}-token context). {commands}", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history, images = [], []
            print("(conversation cleared)")
            continue
        if text == "/system" or text.startswith("/system "):
            system, history, images = text[len("/system"):].strip() or None, [], []
            print(f"(system prompt {'set' if system else 'removed'}; conversation cleared)")
            continue
        if text == "/image" or text.startswith("/image "):
            print(attach(engine, text[len("/image"):].strip(), images))
            continue
        if not text:
            continue
        history.append(user_message(line, images))
        fitted = fit_prompt(engine, system, history, params.max_tokens)
        if fitted is None:
            print("(that message is too long for the context; try a shorter one)")
            history.pop()
            continue
        prompt, shown = fitted
        images = []
        sys.stdout.write("assistant> ")
        history.append({"role": "assistant", "content": reply(engine, prompt, params, shown)})
    return 0
