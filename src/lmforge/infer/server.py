"""`lmforge serve`: an OpenAI-compatible HTTP API and a web chat, both over one continuously batched Engine.

    lmforge serve --model runs/sft [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints (the request and response schemas are OpenAI's, so the official `openai` client works unchanged):
    GET  /v1/models              the one model this server holds (and /v1/models/{id}: that model)
    POST /v1/chat/completions    prompt = the model's own chat template over `messages`
    POST /v1/completions         prompt = raw text or token ids (one prompt or a batch of them)
    GET  /health                 200 while the engine runs, else 503 (no API key needed)
    POST /tokenize, /detokenize  vLLM's tokenizer endpoints: a text or a chat to token ids and back
    GET  /tokenizer_info         vLLM's: the special tokens and chat template (lm-evaluation-harness finds these
                                 three and then needs no copy of the tokenizer; like vLLM's, outside /v1: no API key)
    GET  /                       the web chat (web/index.html, plain HTML/JS, no build step)

Request fields: stream (+ stream_options.include_usage), n, stop, max_tokens / max_completion_tokens,
temperature, top_p, seed, presence_penalty, frequency_penalty, logit_bias, logprobs / top_logprobs, user
(ignored), and vLLM's extensions of the sampling parameters (the `openai` client sends them in
`extra_body`): top_k, min_p, repetition_penalty, stop_token_ids and ignore_eos. Chat also takes tools,
tool_choice, tool messages and response_format (tools.py: calls parsed in the chat template's format, and
constrained decoding for "required", a named function and JSON output, grammar.py). Others of OpenAI's
(best_of, audio, ...) are refused by name rather than silently ignored. A vision-language model's chat takes
`image_url` content parts in user messages (at most MAX_IMAGES): data URLs always, local files under
`--image-dir` (default: the working directory), http(s) URLs only with `--image-urls true`, each within
`--image-max-bytes` and the decompression-bomb pixel limit (vision/fetch.py has the whole policy); a text-only
model given an image answers 400, as does an image it may not read, naming the part's url. `usage` also gives
prompt_tokens_details.cached_tokens: the prompt tokens the engine's prefix cache held (a chat's history).
The schemas, the wording of errors and the answers' pieces are in openai_api.py. Prompts become token ids
through llm.encode_prompts, as for `lmforge generate` and the Python API: a chat through the model's template
(transformers' apply_chat_template ids), a completions text as the text alone (no special tokens added).

Completions also take `echo`: the reply begins with the prompt, and with `logprobs` the prompt's tokens get
theirs (the first one null), which is how lm-evaluation-harness scores text; with max_tokens 0 the prompt
is scored alone.

Every request becomes one engine Request (`n` samples share one prefill); the engine's background thread
steps all running requests together, so concurrent clients share each decode step (continuous batching).
The HTTP side is asyncio: handlers await the engine's events without blocking the loop, and a client
that goes away mid-request cancels its engine request, which frees the batch slot at the next step.
Rendering a chat, tokenizing and building a JSON answer run in worker threads (the tokenizer releases the
GIL), so a request of megabytes never holds up the other streams.

What the server refuses (guard.py's `Guard` before routing, then the handlers before any generation):
- a Host header other than a loopback name while bound to a loopback address (403): a web page on another
  name could otherwise reach the key-less server by DNS rebinding (as Jupyter and Ollama refuse it);
  `--allowed-hosts` names more;
- without the `--api-key`, any /v1 path (401, before 404 or 405, as vLLM answers);
- a body over `--max-body-bytes` (413), declared or counted as it arrives;
- a POST body not declared `Content-Type: application/json` (415): a web page may send a text/plain body
  to any address, never a JSON one without a CORS preflight (which this server never grants);
- a text that cannot fit the context, from its length alone (`Tokenizer.min_tokens`), before tokenizing it;
  more than `--max-prompts` prompts in one completions request, and more than 300 entries in logit_bias or
  stop_token_ids (openai_api.py: each prompt of a batch carries them).

Errors use OpenAI's schema, {"error": {"message", "type", "param", "code"}}, with 400 for anything wrong
in the request (malformed JSON, a wrong type, an unknown field, an out-of-range value, too long a prompt),
401 for a missing or wrong API key, 403 for a Host not allowed, 404 for an unknown model or route, 413 for
too large a body, 415 for a body that is not declared JSON, 500 if generation fails (during a stream: an
error event, since the 200 status has already gone out).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # an optional extra: only this command needs it
    raise ImportError(f"lmforge serve needs the `serve` extra: pip install 'lmforge[serve]' ({e})") from None

from lmforge.infer.agent_api import AgentSettings, add_agent_routes
from lmforge.infer.engine import Engine
from lmforge.infer.grammar import GrammarError
from lmforge.infer.guard import Guard, allowed_host_names
from lmforge.infer.llm import ChatTemplateError, ContextLengthError, Prompt, encode_chat_images, encode_prompts
from lmforge.infer.openai_api import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    CompletionRequest,
    DetokenizeRequest,
    SamplingRequest,
    Schema,
    TokenBytes,
    TokenizeRequest,
    chat_logprobs,
    completion_logprobs,
    echoed_logprobs,
    excerpt,
    join_logprobs,
    parse_request,
    sampling_error,
    server_error,
)
from lmforge.infer.request import aiter_all
from lmforge.infer.sampling import SamplingParamError, SamplingParams, parse_logit_bias
from lmforge.infer.tools import ToolPlan, ToolStream, parse_tool_calls, plan, template_messages
from lmforge.model import KV_CACHE_HELP
from lmforge.settings import parse_args
from lmforge.tokenizer import TokenizerError
from lmforge.vision.fetch import ImagePolicy, fetch_image
from lmforge.vision.image import ImageError

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# A 128K-token prompt is ~0.5 MB of English, and at most ~1.5 MB as token ids or as JSON-escaped (\uXXXX) CJK
# text. Parsing a body holds the interpreter, and tokenizing it takes memory, in proportion to its size
# (README's security notes give figures), so the cap bounds both.
DEFAULT_MAX_BODY_BYTES = 2 * 2**20
DEFAULT_MAX_PROMPTS = 1024  # vLLM's default bound on a completions batch (VLLM_MAX_COMPLETION_PROMPTS)
# Images in one chat request: each may decode to up to image.MAX_PIXELS (150 MB as RGB) before it is resized.
MAX_IMAGES = 8


# -- waiting on the engine ------------------------------------------------------------------------


async def _cancel_on_disconnect(http_request: Request, requests: list) -> None:
    """Once the body is read, the next ASGI message is the disconnect: cancel the engine work then."""
    while (await http_request.receive())["type"] != "http.disconnect":
        pass
    for request in requests:
        if not request.done.is_set():
            request.cancel()


# -- the app --------------------------------------------------------------------------------------


@dataclass
class Server:
    """What the handlers share: the engine, the model's public name, the bound on a batch of prompts, where
    images may come from."""

    engine: Engine
    model_name: str
    max_prompts: int = DEFAULT_MAX_PROMPTS
    images: ImagePolicy = field(default_factory=ImagePolicy)
    created: int = field(default_factory=lambda: int(time.time()))

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

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True, fit_context: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """Token ids of a chat rendered with the model's own template (transformers' apply_chat_template's)."""
        return self.encode([template_messages(messages)], "messages", fit_context,
                           add_generation_prompt=add_generation_prompt, tools=tools)[0]

    def image_chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                          fit_context: bool = True, tools: list[dict] | None = None,
                          read: bool = True) -> tuple[list[int], list]:
        """(token ids, images) of a chat that may show images: one `<image>` token per image (the engine expands
        it), each image read under the server's policy (vision/fetch.py), a refusal a 400 naming the part's url.
        `read` False (/tokenize): the images are not read, only their placeholders counted."""
        places = image_places(messages)
        if not places:
            return self.chat_prompt(messages, add_generation_prompt, fit_context, tools), []
        if self.engine.vision is None:
            raise APIError(400, f"Invalid value for '{places[0]}': the model '{self.model_name}' has no vision tower, "
                           "so it cannot take images.", places[0], "invalid_value")
        if len(places) > MAX_IMAGES:
            raise APIError(400, f"Invalid value for '{places[MAX_IMAGES]}': at most {MAX_IMAGES} images in one "
                           "request.", places[MAX_IMAGES], "invalid_value")
        pending = iter(places)

        def read_image(url: str):
            place = next(pending)
            if not read:
                return None
            try:
                return fetch_image(url, self.images)
            except ImageError as e:
                raise APIError(400, f"Invalid value for '{place}': {excerpt(str(e), 300)}", place,
                               "invalid_value") from None

        with self.encoding_errors("messages"):
            return encode_chat_images(self.engine.tokenizer, template_messages(messages), read_image,
                                      add_generation_prompt=add_generation_prompt, tools=tools,
                                      max_len=self.engine.max_len if fit_context else None)

    def prompt_length(self, prompt: list[int], images: list) -> int:
        """The prompt's tokens once the engine has expanded each image's placeholder to the image's tokens."""
        return len(prompt) + len(images) * (self.engine.vision.config.image_seq_length - 1) if images else len(prompt)

    def tool_plan(self, req: ChatCompletionRequest) -> ToolPlan:
        """The request's tools, tool_choice and response_format as a ToolPlan (tools.py), or a 400."""
        tokenizer = self.engine.tokenizer
        added = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
        try:
            tools = plan(req.tools, req.tool_choice, req.response_format, tokenizer.chat_template, added,
                         parallel=req.parallel_tool_calls is not False)
            if tools.grammar is not None:
                self.engine.grammars.check(tools.grammar)
            return tools
        except GrammarError as e:
            raise APIError(400, f"Invalid schema: {excerpt(str(e), 300)}",
                           "tools" if req.tools else "response_format") from None

    def completion_prompts(self, prompt) -> list[list[int]]:
        """A completions prompt (text, texts, token ids, or lists of token ids) as token-id lists."""
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts:
            raise APIError(400, "Invalid value for 'prompt': the list of prompts is empty.", "prompt", "invalid_value")
        if len(prompts) > self.max_prompts:
            raise APIError(400, f"Invalid value for 'prompt': {len(prompts)} prompts; this server takes at most "
                           f"{self.max_prompts} in one request (its --max-prompts).", "prompt", "invalid_value")
        if isinstance(prompts[0], str):  # the text as sent, no special tokens added (vLLM's add a Llama BOS)
            prompts = self.encode(prompts, "prompt", add_special_tokens=False)
        for ids in prompts:
            if not ids:
                raise APIError(400, "Invalid value for 'prompt': a prompt is empty.", "prompt", "invalid_value")
            self.check_token_ids("prompt", ids)
        return prompts

    # -- the tokenizer (vLLM's endpoints) ------------------------------------------------------------

    async def tokenize(self, http_request: Request):
        req = await self.parse(TokenizeRequest, http_request)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "Give either 'prompt' (a text) or 'messages' (a chat) to tokenize.", "prompt")
        return await asyncio.to_thread(self.tokenize_answer, req)

    def tokenize_answer(self, req: TokenizeRequest) -> JSONResponse:
        """Any text the body holds, even one longer than the context (as vLLM's: lm-evaluation-harness
        tokenizes whole documents, then cuts them into windows); its JSON too is built here, in a worker
        thread: a 2 MB text's answer holds a million ids."""
        if req.prompt is not None:
            (tokens,) = self.encode([req.prompt], "prompt", False, add_special_tokens=req.add_special_tokens)
        else:
            tokens, _ = self.image_chat_prompt(req.messages, req.add_generation_prompt, fit_context=False, read=False)
        backend = self.engine.tokenizer.backend
        strings = [backend.id_to_token(t) for t in tokens] if req.return_token_strs else None
        return JSONResponse({"count": len(tokens), "max_model_len": self.engine.max_len, "tokens": tokens,
                             "token_strs": strings})

    async def detokenize(self, http_request: Request):
        req = await self.parse(DetokenizeRequest, http_request)
        return await asyncio.to_thread(self.detokenize_answer, req)

    def detokenize_answer(self, req: DetokenizeRequest) -> JSONResponse:
        self.check_token_ids("tokens", req.tokens)
        return JSONResponse({"prompt": self.engine.tokenizer.decode(req.tokens)})

    def tokenizer_info(self) -> dict:
        tokenizer = self.engine.tokenizer
        return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "chat_template": tokenizer.chat_template, "model_max_length": self.engine.max_len,
                "vocab_size": tokenizer.vocab_size}

    # -- chat --------------------------------------------------------------------------------------

    async def chat(self, http_request: Request):
        req = await self.parse(ChatCompletionRequest, http_request)
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "'logprobs' must be true when 'top_logprobs' is set.", "logprobs")
        tools = await asyncio.to_thread(self.tool_plan, req)  # compiles a grammar: not on the event loop
        prompt, images = await asyncio.to_thread(self.image_chat_prompt, req.messages, tools=tools.tools)
        params = self.params(req, self.prompt_length(prompt, images), req.max_completion_tokens or req.max_tokens,
                             bool(req.logprobs), req.top_logprobs or 0)
        params.grammar = tools.grammar
        # The engine preprocesses images in the caller's thread: a large one takes a while, so not on the event loop.
        request = (await asyncio.to_thread(self.submit, prompt, params, images) if images
                   else self.submit(prompt, params))
        prompt = request.prompt  # with the images' tokens
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        choices = [Choice(i) for i in range(params.n)]
        k = params.top_logprobs

        def logprobs_of(entries):
            return chat_logprobs(entries, k, self.token_bytes) if params.logprobs else None

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choice_list, usage=None):
                return {**meta, "object": "chat.completion.chunk", "choices": choice_list,
                        **({"usage": usage} if include_usage else {})}

            return _sse(self.chat_stream(request, choices, tools.kind, chunk, logprobs_of, len(prompt),
                                         include_usage), [request])

        await self._collect([request], lambda number, delta: choices[delta.index].add(delta), http_request)
        return await _json_answer(lambda: {
            **meta, "object": "chat.completion", "usage": _usage(len(prompt), choices, [request]), "choices": [
                {"index": c.index, **reply_message(c.text, c.finish_reason, tools.kind),
                 "logprobs": logprobs_of(c.logprobs)} for c in choices]})

    async def chat_stream(self, request, choices: list[Choice], kind: str | None, chunk, logprobs_of,
                          prompt_tokens: int, include_usage: bool):
        """The chat's server-sent events: each choice opens with its role, as OpenAI's stream does; then its text,
        and with tools (`kind`) its calls as tool-call deltas once each is complete (tools.ToolStream)."""
        streams = [ToolStream(kind) if kind else None for _ in choices]
        for choice in choices:
            yield chunk([{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        async for _, delta in aiter_all([request]):
            choices[delta.index].add(delta)
            stream, reason = streams[delta.index], delta.finish_reason
            parts = ([{"content": delta.text}] if delta.text else []) if stream is None else stream.feed(delta.text)
            if reason and stream is not None:
                parts += stream.finish()
                reason = "tool_calls" if stream.calls and reason == "stop" else reason
            logprobs = logprobs_of(delta.logprobs or []) if delta.logprobs else None
            for i, part in enumerate(parts or [{}]):
                last = i == max(len(parts), 1) - 1
                yield chunk([{"index": delta.index, "delta": part, "logprobs": logprobs if i == 0 else None,
                              "finish_reason": reason if last else None}])
        if include_usage:
            yield chunk([], _usage(prompt_tokens, choices, [request]))

    # -- completions -------------------------------------------------------------------------------

    async def completions(self, http_request: Request):
        req = await self.parse(CompletionRequest, http_request)
        prompts = await asyncio.to_thread(self.completion_prompts, req.prompt)
        requests = self.submit_completions(req, prompts)
        n, k = req.n or 1, req.logprobs or 0
        echoes = self.echoes(req, prompts)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}
        # Choice i*n + j is sample j of prompt i, OpenAI's order for a batch of prompts. An echoed prompt's
        # text starts the choice, so the reply's text offsets count from the prompt's start.
        choices = [Choice(i, text=echoes[i // n]) for i in range(len(prompts) * n)]
        prompt_tokens = sum(map(len, prompts))

        def logprobs_of(entries, offsets):
            return completion_logprobs(entries, offsets, k) if req.logprobs is not None else None

        def add(number, delta):  # an event of prompt `number` into its choice: (choice, event, text offsets)
            if req.max_tokens == 0:  # scoring the prompt alone: the one token generated is left out
                delta = replace(delta, text="", token_ids=[], logprobs=[])
            choice = choices[number * n + delta.index]
            return choice, delta, choice.add(delta)

        def echoed(number):  # the legacy logprobs of prompt `number`, if echoed and asked for
            if not (req.echo and req.logprobs is not None):
                return None
            return echoed_logprobs(prompts[number], requests[number].prompt_logprobs, echoes[number], k,
                                   self.engine.token_text)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choice_list, usage=None):
                return {**meta, "object": "text_completion", "choices": choice_list,
                        **({"usage": usage} if include_usage else {})}

            async def body():
                started = set()  # choices whose first chunk (with the echoed prompt, if any) has gone out
                async for number, event in aiter_all(requests):
                    choice, delta, offsets = add(number, event)
                    text, logprobs = delta.text, logprobs_of(delta.logprobs or [], offsets)
                    if choice.index not in started:
                        started.add(choice.index)
                        text, logprobs = echoes[number] + text, join_logprobs(echoed(number), logprobs)
                    yield chunk([{"index": choice.index, "text": text, "logprobs": logprobs,
                                  "finish_reason": delta.finish_reason}])
                if include_usage:
                    yield chunk([], _usage(prompt_tokens, choices, requests))

            return _sse(body(), requests)

        await self._collect(requests, add, http_request)
        return await _json_answer(lambda: {
            **meta, "object": "text_completion", "usage": _usage(prompt_tokens, choices, requests), "choices": [
                {"index": c.index, "text": c.text,
                 "logprobs": join_logprobs(echoed(c.index // n), logprobs_of(c.logprobs, c.offsets)),
                 "finish_reason": c.finish_reason} for c in choices]})

    def submit_completions(self, req: CompletionRequest, prompts: list[list[int]]) -> list:
        """One engine request per prompt, or none: a prompt the engine refuses cancels those before it. With
        max_tokens 0 and echo (OpenAI's legacy request to score a text) the engine generates one token, whose
        prefill gives the prompt's log-probs; the answer leaves it out."""
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "Invalid value for 'max_tokens': 0 is allowed only with 'echo' (to score the prompt).",
                           "max_tokens", "invalid_value")
        max_tokens = 1 if req.max_tokens == 0 else req.max_tokens
        k = req.logprobs or 0
        scored = k if req.echo and req.logprobs is not None else None  # the echoed prompt's log-probs
        params = [self.params(req, len(p), max_tokens, req.logprobs is not None, k, scored) for p in prompts]
        requests = []
        try:
            for prompt, p in zip(prompts, params):
                requests.append(self.submit(prompt, p))
        except APIError:
            for request in requests:
                request.cancel()
            raise
        return requests

    def echoes(self, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
        """The text each choice opens with: with echo, its prompt's (decoded where it was sent as token ids)."""
        if not req.echo:
            return [""] * len(prompts)
        if isinstance(req.prompt, str):
            return [req.prompt]
        return req.prompt if isinstance(req.prompt[0], str) else [self.engine.tokenizer.decode(p) for p in prompts]

    async def _collect(self, requests: list, add, http_request: Request) -> None:
        """Run requests to the end, each event given to `add(request number, event)`; a client that leaves
        cancels them."""
        watcher = asyncio.create_task(_cancel_on_disconnect(http_request, requests))
        try:
            async for number, delta in aiter_all(requests):
                add(number, delta)
        finally:
            watcher.cancel()


def image_places(messages: list[ChatMessage]) -> list[str]:
    """Where each image part of a chat is, in order, as errors name it (`messages.1.content.0.image_url.url`).
    Images are a user's only, as in OpenAI's API."""
    places = []
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type == "image_url":
                place = f"messages.{i}.content.{j}.image_url.url"
                if message.role != "user":
                    raise APIError(400, f"Invalid value for '{place}': images are allowed in user messages only "
                                   f"(this is a {message.role} message).", place, "invalid_value")
                places.append(place)
    return places


def reply_message(text: str, finish_reason: str | None, kind: str | None) -> dict:
    """A whole reply's `message` and `finish_reason`: with tools (`kind`), its calls parsed out (tools.py)."""
    content, calls = parse_tool_calls(text, kind) if kind else (text, [])
    if calls and finish_reason == "stop":
        return {"message": {"role": "assistant", "content": content, "refusal": None, "tool_calls": calls},
                "finish_reason": "tool_calls"}
    return {"message": {"role": "assistant", "content": text, "refusal": None}, "finish_reason": finish_reason}


async def _json_answer(build) -> JSONResponse:
    """The answer `build()` gives, built and serialized in a worker thread: an echoed batch of prompts with
    their tokens' alternatives is millions of values (FastAPI's own encoding of a returned dict would also
    walk them on the event loop)."""
    return await asyncio.to_thread(lambda: JSONResponse(build()))


def _usage(prompt_tokens: int, choices: list[Choice], requests: list) -> dict:
    """OpenAI's usage, with the prompt tokens the prefix cache held (prompt_tokens_details.cached_tokens)."""
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in requests)}}


def _sse(chunks, requests: list) -> StreamingResponse:
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


def create_app(engine: Engine, model_name: str, api_key: str | None = None, *, host: str = "127.0.0.1",
               allowed_hosts: list[str] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_prompts: int = DEFAULT_MAX_PROMPTS, agent: AgentSettings | None = None,
               images: ImagePolicy | None = None) -> FastAPI:
    """The FastAPI app over a started `engine`, to be served on `host` (the address bound decides the Host
    check, see Guard). The caller owns the engine (starts and stops it). `agent`: the web chat's agent mode,
    the sandbox behind /v1/agent (agent_api.py); its sessions are `app.state.agent_sessions`. `images`: where
    a chat's images may come from (default: data URLs only)."""
    server = Server(engine, model_name, max_prompts, images or ImagePolicy())
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_host_names(host, list(allowed_hosts)),
                       max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, error: StarletteHTTPException):
        return APIError(error.status_code, str(error.detail), type="invalid_request_error",
                        code="not_found" if error.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def internal_error(_, error: Exception):
        log.exception("request failed")
        return server_error(error).response()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [server.model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):  # OpenAI's "retrieve model"
        if model_id != model_name:
            raise APIError(404, f"The model '{excerpt(model_id)}' does not exist; this server holds '{model_name}'.",
                           "model", "model_not_found")
        return server.model_card

    app.state.agent_sessions = add_agent_routes(app, agent)
    app.post("/v1/chat/completions")(server.chat)
    app.post("/v1/completions")(server.completions)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.get("/tokenizer_info")(server.tokenizer_info)

    @app.get("/health")
    async def health():
        status = "ok" if engine.running else "stopped"
        return JSONResponse({"status": status, "model": model_name, "active_requests": engine.num_active},
                            status_code=200 if engine.running else 503)

    @app.get("/")
    async def index():
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app


# -- command line ---------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    model: str = field(default="", metadata={"help": "model directory (HF format, with its tokenizer)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 exposes it to the network"})
    port: int = field(default=8000, metadata={"help": "TCP port", "min": 0, "max": 65535})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: Bearer KEY' on /v1"})
    name: str | None = field(default=None, metadata={"help": "model id clients send (default: directory name)"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "weight dtype"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    max_batch_size: int = field(default=16, metadata={"help": "requests decoded together (engine slots)", "min": 1})
    max_len: int | None = field(default=None, metadata={"help": "context length of each slot (default: engine's)",
                                                         "min": 2})
    prefix_cache: bool = field(default=True, metadata={
        "help": "reuse the cached keys and values of an earlier request a prompt begins with (a chat's history)"})
    kv_cache: Literal["auto", "int8"] = field(default="auto", metadata={"help": KV_CACHE_HELP})
    allowed_hosts: list[str] = field(default_factory=list, metadata={
        "help": "Host header names answered besides localhost, 127.x.x.x and [::1] ('*': any). Bound to a "
                "loopback address the server answers only those, so a web page on another name cannot reach it "
                "by DNS rebinding; bound to another address it checks the Host only if this is given"})
    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata={
        "help": "largest request body, in bytes (413 beyond). A 128K-token prompt is at most ~1.5 MB of JSON "
                "(token ids, or escaped CJK text); parsing and tokenizing a body cost time and memory in "
                "proportion, so the cap bounds what one request can take", "min": 1})
    max_prompts: int = field(default=DEFAULT_MAX_PROMPTS, metadata={
        "help": "most prompts in one /v1/completions request (each is an engine request); vLLM's default",
        "min": 1})
    agent: bool = field(default=False, metadata={
        "help": "the web chat's agent mode: the model's ```python blocks run in a sandboxed interpreter per "
                "conversation (/v1/agent, guarded by --api-key) and the page shows the code and its output"})
    agent_max_steps: int = field(default=5, metadata={"help": "agent: code actions per message", "min": 1})
    agent_cell_timeout: float = field(default=10.0, metadata={"help": "agent: seconds a code cell may run",
                                                              "min": 0.1})
    image_dir: str | None = field(default=".", metadata={
        "help": "a vision-language model's image_url parts may name local files (a path, relative to DIR, or a "
                "file:// URL) only under this directory, after resolving .. and links (default: the working "
                "directory); none: no local files. Data URLs are always taken"})
    image_urls: bool = field(default=False, metadata={
        "help": "fetch http(s) image URLs: at most --image-max-bytes, within --image-timeout seconds, redirects "
                "to http(s) only, from public addresses only (not loopback, private or link-local ones)"})
    image_urls_private: bool = field(default=False, metadata={
        "help": "with --image-urls: also fetch from loopback, private and link-local addresses (this server's "
                "own network, its cloud's metadata service: only if every client may read those)"})
    image_max_bytes: int = field(default=20 * 2**20, metadata={
        "help": "largest image, in encoded bytes (a web URL's download stops there)", "min": 1})
    image_timeout: float = field(default=10.0, metadata={"help": "seconds a web image may take, all of it",
                                                         "min": 0.1})

    def image_policy(self) -> ImagePolicy:
        return ImagePolicy(files=None if self.image_dir is None else Path(self.image_dir).resolve(),
                           web=self.image_urls, private_hosts=self.image_urls_private,
                           max_bytes=self.image_max_bytes, timeout=self.image_timeout)


def served_name(model: str) -> str:
    """The model id clients send by default: the directory's name as given, links not followed, so
    `--model runs/pretrain/final` serves "final" (not the checkpoint-NNNNNN it links to)."""
    return Path(os.path.abspath(model)).name


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(ServeConfig, argv, prog="lmforge serve",
                     description="Serve a model over OpenAI's HTTP API, with a web chat at /.")
    if not cfg.model:
        print("lmforge serve: error: --model DIR is required", file=sys.stderr)
        return 2
    engine = Engine.from_pretrained(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                    max_batch_size=cfg.max_batch_size, max_len=cfg.max_len,
                                    prefix_cache=cfg.prefix_cache, kv_cache_dtype=cfg.kv_cache)
    name = cfg.name or served_name(cfg.model)
    app = create_app(engine, name, cfg.api_key, host=cfg.host, allowed_hosts=cfg.allowed_hosts,
                     max_body_bytes=cfg.max_body_bytes, max_prompts=cfg.max_prompts,
                     agent=AgentSettings(max_steps=cfg.agent_max_steps, cell_timeout=cfg.agent_cell_timeout)
                     if cfg.agent else None, images=cfg.image_policy())
    engine.start()
    try:
        print(f"serving '{name}' at http://{cfg.host}:{cfg.port}  (web chat: /, OpenAI API: /v1)", flush=True)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        engine.stop()
        if app.state.agent_sessions is not None:
            app.state.agent_sessions.close_all()
    return 0
