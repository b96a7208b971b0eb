"""What the endpoints of `lmforge serve` share (chat_api.py, completions_api.py, tokenizer_api.py; serve.py
routes to them): the `Server`, holding the engine, the model's public name and the request limits, with the
steps every request takes: the body parsed and checked, prompts encoded (their errors as 400s naming the
parameter), the sampling parameters checked against the context, the engine requests submitted and awaited (a
client that goes away cancels them); and the forms of an answer: JSON built off the event loop, server-sent
events, OpenAI's usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lmforge.infer.engine import Engine
from lmforge.infer.llm import ChatTemplateError, ContextLengthError, Prompt, encode_prompts
from lmforge.infer.openai_api import (
    APIError,
    ChatCompletionRequest,
    Choice,
    SamplingRequest,
    Schema,
    TokenBytes,
    excerpt,
    parse_request,
    sampling_error,
    server_error,
)
from lmforge.infer.request import aiter_all
from lmforge.infer.sampling import SamplingParamError, SamplingParams, parse_logit_bias
from lmforge.tokenizer import TokenizerError
from lmforge.vision.fetch import ImagePolicy

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
DEFAULT_MAX_PROMPTS = 1024  # vLLM's default bound on a completions batch (VLLM_MAX_COMPLETION_PROMPTS)
# Threads that read and preprocess requests' images: their own, so requests whose images are slow to come (a
# web URL that trickles, up to --image-timeout each) never hold up the threads that render other prompts.
IMAGE_THREADS = 4


@dataclass
class Server:
    """What the handlers share: the engine, the model's public name, the bound on a batch of prompts, where
    images may come from."""

    engine: Engine
    model_name: str
    max_prompts: int = DEFAULT_MAX_PROMPTS
    images: ImagePolicy = field(default_factory=ImagePolicy)
    created: int = field(default_factory=lambda: int(time.time()))
    image_threads: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        IMAGE_THREADS, thread_name_prefix="lmforge-images"))

    async def in_image_thread(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on one of the image threads (IMAGE_THREADS), awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.image_threads,
                                                                functools.partial(fn, *args, **kwargs))

    @functools.cached_property
    def token_bytes(self) -> TokenBytes:
        return TokenBytes(self.engine.tokenizer)

    @property
    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "max_model_len": self.engine.max_len}

    async def parse(self, schema: type[Schema], http_request: Request) -> Schema:
        """The request body as `schema`, with the checks every endpoint shares (the tokenizer's may omit `model`)."""
        content_type = http_request.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise APIError(415, "Send the body as JSON, declared with 'Content-Type: application/json' (this "
                           f"request's Content-Type: {excerpt(content_type) or 'none'}).",
                           code="unsupported_media_type")
        req = parse_request(schema, await http_request.body())
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model '{excerpt(req.model)}' does not exist; this server holds "
                           f"'{self.model_name}'.", "model", "model_not_found")
        if isinstance(req, SamplingRequest) and req.stream_options is not None and not req.stream:
            raise APIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                           "stream_options")
        return req

    def params(self, req: SamplingRequest, prompt_len: int, max_tokens: int | None, logprobs: bool,
               top_logprobs: int, prompt_logprobs: int | None = None) -> SamplingParams:
        """Engine sampling parameters from the request, after checking the prompt and reply fit the context."""
        max_len = self.engine.max_len
        if prompt_len >= max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, your prompt "
                           f"is {prompt_len} tokens, which leaves no room for a reply.", "messages"
                           if isinstance(req, ChatCompletionRequest) else "prompt", "context_length_exceeded")
        if max_tokens is None:
            room = max_len - prompt_len
            max_tokens = room if isinstance(req, ChatCompletionRequest) else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
        elif prompt_len + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                           f"completion). Please reduce the prompt or the completion length.", "max_tokens",
                           "context_length_exceeded")
        if (req.n or 1) > self.engine.max_batch_size:
            raise APIError(400, f"Invalid value for 'n': this server decodes at most {self.engine.max_batch_size} "
                           "samples of a request together (its --max-batch-size).", "n", "invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if "" in stop:
            raise APIError(400, "Invalid value for 'stop': a stop sequence cannot be empty.", "stop", "invalid_value")
        self.check_token_ids("stop_token_ids", req.stop_token_ids or [])
        try:
            logit_bias = parse_logit_bias(req.logit_bias or {}, self.engine.vocab_size)
        except SamplingParamError as e:
            raise sampling_error(e) from None
        return SamplingParams(
            max_tokens=max_tokens, stop=stop, n=req.n or 1, seed=req.seed,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=logit_bias, stop_token_ids=list(req.stop_token_ids or []),
            logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=bool(req.ignore_eos),
            prompt_logprobs=prompt_logprobs,
        )

    def check_token_ids(self, param: str, ids: list[int]) -> None:
        """Refuse ids outside the vocabulary, naming the first one (the list may be a megabyte long)."""
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"Invalid value for '{param}': {bad} is not a token id of this model (0 to "
                           f"{vocab - 1}).", param, "invalid_value")

    def submit(self, prompt: list[int], params: SamplingParams, images: list | None = None):
        try:
            return self.engine.submit(prompt, params, images) if images else self.engine.submit(prompt, params)
        except SamplingParamError as e:  # a sampling parameter out of range (its message names it)
            raise sampling_error(e) from None
        except ValueError as e:  # the engine's other checks (its message names the problem)
            raise APIError(400, excerpt(str(e), 200)) from None

    # -- prompts: blocking (template, tokenizer), so the handlers run these in worker threads -------------------

    def encode(self, prompts: list[Prompt], param: str, fit_context: bool = True, **options) -> list[list[int]]:
        """llm.encode_prompts (`options`: its add_special_tokens and add_generation_prompt), its errors as 400s
        naming `param`. With `fit_context`, a text that cannot fit the context is refused from its length
        alone, so a megabyte prompt is refused at once rather than after tokenizing all of it."""
        with self.encoding_errors(param):
            return encode_prompts(self.engine.tokenizer, prompts, max_len=self.engine.max_len if fit_context else None,
                                  **options)

    @contextlib.contextmanager
    def encoding_errors(self, param: str):
        """llm.encode_prompts' errors as 400s naming `param`."""
        try:
            yield
        except (ChatTemplateError, TokenizerError) as e:  # refused by the template, or it does not compile
            raise APIError(400, f"Invalid 'messages': {excerpt(str(e), 250)}", "messages") from None
        except ContextLengthError as e:
            raise APIError(400, f"This model's maximum context length is {self.engine.max_len} tokens. However, your "
                           f"prompt is at least {e.at_least} tokens ({e.chars} characters), which leaves no room for "
                           "a reply.", param, "context_length_exceeded") from None

    # -- waiting on the engine ------------------------------------------------------------------------------

    async def collect(self, requests: list, add, http_request: Request) -> None:
        """Run requests to the end, each event given to `add(request number, event)`; a client that leaves
        cancels them."""
        watcher = asyncio.create_task(cancel_on_disconnect(http_request, requests))
        try:
            async for number, delta in aiter_all(requests):
                add(number, delta)
        finally:
            watcher.cancel()


async def cancel_on_disconnect(http_request: Request, requests: list) -> None:
    """Once the body is read, the next ASGI message is the disconnect: cancel the engine work then."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass
    for request in requests:
        if not request.done.is_set():
            request.cancel()


# -- answers --------------------------------------------------------------------------------------


async def json_answer(build) -> JSONResponse:
    """The answer `build()` gives, built and serialized in a worker thread: an echoed batch of prompts with
    their tokens' alternatives is millions of values (FastAPI's own encoding of a returned dict would also
    walk them on the event loop)."""
    return await asyncio.to_thread(lambda: JSONResponse(build()))


def token_usage(prompt_tokens: int, choices: list[Choice], requests: list) -> dict:
    """OpenAI's usage, with the prompt tokens the prefix cache held (prompt_tokens_details.cached_tokens)."""
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in requests)}}


def sse(chunks, requests: list) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`. The status line has gone out with the
    first chunk, so a generation that fails midway is reported as an error event (in OpenAI's error schema, as
    OpenAI's and vLLM's streams do). If the client disconnects, Starlette cancels this generator mid-await;
    `finally` then cancels the engine requests so their slots free up."""

    async def body():
        try:
            try:
                async for item in chunks:
                    yield f"data: {json.dumps(item, ensure_ascii=False)}\n\n"
            except Exception as error:
                log.exception("generation failed mid-stream")
                yield f"data: {json.dumps(server_error(error).body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for request in requests:
                if not request.done.is_set():
                    request.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
