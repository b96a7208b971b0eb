"""`lmforge generate --model DIR --prompt TEXT`: print one completion, and nothing else, to stdout.

Stdout carries only the completion (streamed as it is produced), so the command composes in
scripts: `answer=$(lmforge generate --model runs/sft --prompt "2+2=" --temperature 0)`.
Everything else (load time, speed, and with --logprobs one JSON line per token) goes to stderr.
--prompt-logprobs scores the prompt itself: a JSON line per prompt token (its log-prob given the ones
before it; null for the first), e.g. `--prompt-logprobs 0 --max-new-tokens 1` to score a text.
A vision-language model (a llava directory) is shown images with `--image FILE [FILE ...]`: each stands at
one `<image>` of the prompt, in order; a prompt without any gets them in front of it, one line each. With
--chat the images go before the text in the user message, as training data has them.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

from lmforge.infer.engine import Engine
from lmforge.infer.llm import LLM, encode_chat_images
from lmforge.infer.sampling import SamplingParams, parse_logit_bias
from lmforge.model import KV_CACHE_HELP
from lmforge.settings import OptionError, parse_args
from lmforge.vision.checkpoint import IMAGE_TOKEN
from lmforge.vision.image import ImageError, read_image


@dataclass
class SamplingConfig:
    """Model and sampling flags shared by `generate` and `chat`."""

    model: str = field(default="", metadata={"help": "model directory, or a preset name (random weights)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer directory (default: the model's)"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weights and cache dtype"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, ..."})
    max_len: int | None = field(default=None, metadata={"help": "context length (default min(model's, 2048))"})
    kv_cache: Literal["auto", "int8"] = field(default="auto", metadata={"help": KV_CACHE_HELP})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=1.0, metadata={"help": "0 (below 1e-5) = greedy"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    min_p: float = field(default=0.0, metadata={"help": "drop tokens below min_p x the top probability"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL-style penalty (1 = off)"})
    presence_penalty: float = field(default=0.0, metadata={"help": "OpenAI-style presence penalty"})
    frequency_penalty: float = field(default=0.0, metadata={"help": "OpenAI-style frequency penalty"})
    seed: int | None = field(default=None, metadata={"help": "same seed -> same text"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings (not included in the output)"})
    stop_token_ids: list[int] = field(default_factory=list, metadata={
        "help": "token ids that end the output (not included), besides the end-of-text ones"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep going past end-of-text tokens"})
    logit_bias: list[str] = field(default_factory=list, metadata={
        "help": "TOKEN_ID=BIAS entries added to those tokens' logits (OpenAI's logit_bias, -100 bans one)"})

    def sampling_params(self, vocab_size: int, **extra) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids), ignore_eos=self.ignore_eos,
            logit_bias=self.logit_bias_ids(vocab_size), **extra)

    def logit_bias_ids(self, vocab_size: int) -> dict[int, float]:
        """The --logit-bias TOKEN_ID=BIAS entries as {token id: bias}. Their form is checked here; that each is
        a token id of the vocabulary and a bias in [-100, 100], by sampling.parse_logit_bias (the server's)."""
        entries = {}
        for entry in self.logit_bias:
            token, _, value = entry.partition("=")
            try:
                entries[str(int(token))] = float(value)
            except ValueError:
                raise OptionError(f"--logit-bias {entry!r}: expected TOKEN_ID=BIAS, e.g. 13=-100") from None
        return parse_logit_bias(entries, vocab_size)

    def engine(self) -> Engine:
        """The model's engine; what is wrong with the model directory is an error naming the file
        (`lmforge` prints it as one line)."""
        if not self.model:
            raise OptionError("--model is required (a model directory or a preset name)")
        return Engine.from_pretrained(self.model, dtype=self.dtype, device=self.device,
                                      tokenizer=self.tokenizer, max_batch_size=1, max_len=self.max_len,
                                      kv_cache_dtype=self.kv_cache)


@dataclass
class GenerateConfig(SamplingConfig):
    prompt: str = field(default="", metadata={"help": "the text to continue"})
    chat: bool = field(default=False, metadata={"help": "send the prompt as a user message, in the chat template"})
    image: list[str] = field(default_factory=list, metadata={
        "help": "image files a vision-language model is shown (--image a.png b.png), one per <image> in the prompt, "
                "in order; a prompt without <image> gets them in front, one line each (with --chat: before the text)"})
    logprobs: bool = field(default=False, metadata={
        "help": "after the completion, each token's log-prob as a JSON line on stderr"})
    top_logprobs: int = field(default=0, metadata={"help": "and its k most likely alternatives (implies --logprobs)"})
    prompt_logprobs: int | None = field(default=None, metadata={
        "help": "score the prompt: each prompt token's log-prob given the ones before it, with k alternatives, "
                "as JSON lines on stderr (before the completion's)"})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(GenerateConfig, argv, prog="lmforge generate",
                     description="Print a completion of --prompt (only the completion, on stdout).")
    started = time.perf_counter()
    llm = LLM(cfg.engine())
    engine = llm.engine
    # The prompt as the text API gives it to the model (a Llama tokenizer's BOS in front of a text). A chat
    # template that fails is the model's error (lmforge's one line); the prompt's length, the images and the
    # sampling options are this command's (its usage error, exit 2).
    try:
        images = [read_file(path) for path in cfg.image]
    except ImageError as e:
        print(f"lmforge generate: error: {e}", file=sys.stderr)
        return 2
    prompt = encode_prompt(llm, cfg, images)
    try:
        params = cfg.sampling_params(engine.vocab_size, logprobs=cfg.logprobs or cfg.top_logprobs > 0,
                                     top_logprobs=cfg.top_logprobs, prompt_logprobs=cfg.prompt_logprobs)
        request = engine.submit(prompt, params, images or None)
    except ValueError as e:
        print(f"lmforge generate: error: {e}", file=sys.stderr)
        return 2
    print(f"loaded {cfg.model} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    started = time.perf_counter()
    for delta in request:
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    output = request.outputs[0]
    seconds = time.perf_counter() - started
    print(f"{len(output.token_ids)} tokens in {seconds:.2f}s ({len(output.token_ids) / seconds:.1f} tok/s), "
          f"finish_reason={output.finish_reason}", file=sys.stderr)
    # one line per prompt token (with --prompt-logprobs), then per generated token, OpenAI's field names
    scored = [(token, lp, True) for token, lp in zip(request.prompt, request.prompt_logprobs or [])]
    for token, lp, in_prompt in scored + [(lp.token_id, lp, False) for lp in output.logprobs or []]:
        line = {"token": engine.token_text(token), "id": token, "logprob": None, "top_logprobs": []}
        if lp is not None:
            line.update(logprob=lp.logprob, top_logprobs=[{"token": t, "id": i, "logprob": v} for i, t, v in lp.top])
        print(json.dumps(line | ({"prompt": True} if in_prompt else {}), ensure_ascii=False), file=sys.stderr)
    return 0


def encode_prompt(llm: LLM, cfg: GenerateConfig, images: list) -> list[int]:
    """The token ids of --prompt with one `<image>` per image (see the module's docstring)."""
    if cfg.chat:
        parts = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": cfg.prompt}]
        ids, _ = encode_chat_images(llm.tokenizer, [{"role": "user", "content": parts if images else cfg.prompt}])
        return ids
    prompt = cfg.prompt
    if images and IMAGE_TOKEN not in prompt:
        prompt = f"{IMAGE_TOKEN}\n" * len(images) + prompt
    return llm.encode(prompt)


def read_file(path: str):
    """An --image file; one that is missing or unreadable is an ImageError naming it."""
    try:
        return read_image(path)
    except FileNotFoundError:
        raise ImageError(f"--image {path}: no such file") from None
