"""POST /v1/completions of `lmforge serve`: a prompt as raw text or token ids, or a batch of them (at most the
server's max_prompts), each an engine request, with OpenAI's legacy `logprobs` and `echo`: the reply begins with
the prompt, whose tokens get their log-probs too (how lm-evaluation-harness scores text; with max_tokens 0 the
prompt is scored alone). The answer is whole or streamed as text_completion events.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace

from fastapi import Request

from lmforge.infer.openai_api import (
    APIError,
    Choice,
    CompletionRequest,
    completion_logprobs,
    echoed_logprobs,
    join_logprobs,
)
from lmforge.infer.request import aiter_all
from lmforge.infer.server import Server, json_answer, sse, token_usage


async def completions(server: Server, http_request: Request):
    req = await server.parse(CompletionRequest, http_request)
    prompts = await asyncio.to_thread(completion_prompts, server, req.prompt)
    requests = submit_completions(server, req, prompts)
    n, k = req.n or 1, req.logprobs or 0
    echoes = echo_texts(server, req, prompts)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
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
                               server.engine.token_text)

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
                yield chunk([], token_usage(prompt_tokens, choices, requests))

        return sse(body(), requests)

    await server.collect(requests, add, http_request)
    return await json_answer(lambda: {
        **meta, "object": "text_completion", "usage": token_usage(prompt_tokens, choices, requests), "choices": [
            {"index": c.index, "text": c.text,
             "logprobs": join_logprobs(echoed(c.index // n), logprobs_of(c.logprobs, c.offsets)),
             "finish_reason": c.finish_reason} for c in choices]})


def completion_prompts(server: Server, prompt) -> list[list[int]]:
    """A completions prompt (text, texts, token ids, or lists of token ids) as token-id lists."""
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not prompts:
        raise APIError(400, "Invalid value for 'prompt': the list of prompts is empty.", "prompt", "invalid_value")
    if len(prompts) > server.max_prompts:
        raise APIError(400, f"Invalid value for 'prompt': {len(prompts)} prompts; this server takes at most "
                       f"{server.max_prompts} in one request (its --max-prompts).", "prompt", "invalid_value")
    if isinstance(prompts[0], str):  # the text as sent, no special tokens added (vLLM's add a Llama BOS)
        prompts = server.encode(prompts, "prompt", add_special_tokens=False)
    for ids in prompts:
        if not ids:
            raise APIError(400, "Invalid value for 'prompt': a prompt is empty.", "prompt", "invalid_value")
        server.check_token_ids("prompt", ids)
    return prompts


def submit_completions(server: Server, req: CompletionRequest, prompts: list[list[int]]) -> list:
    """One engine request per prompt, or none: a prompt the engine refuses cancels those before it. With
    max_tokens 0 and echo (OpenAI's legacy request to score a text) the engine generates one token, whose
    prefill gives the prompt's log-probs; the answer leaves it out."""
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "Invalid value for 'max_tokens': 0 is allowed only with 'echo' (to score the prompt).",
                       "max_tokens", "invalid_value")
    max_tokens = 1 if req.max_tokens == 0 else req.max_tokens
    k = req.logprobs or 0
    scored = k if req.echo and req.logprobs is not None else None  # the echoed prompt's log-probs
    params = [server.params(req, len(p), max_tokens, req.logprobs is not None, k, scored) for p in prompts]
    requests = []
    try:
        for prompt, p in zip(prompts, params):
            requests.append(server.submit(prompt, p))
    except APIError:
        for request in requests:
            request.cancel()
        raise
    return requests


def echo_texts(server: Server, req: CompletionRequest, prompts: list[list[int]]) -> list[str]:
    """The text each choice opens with: with echo, its prompt's (decoded where it was sent as token ids)."""
    if not req.echo:
        return [""] * len(prompts)
    if isinstance(req.prompt, str):
        return [req.prompt]
    return req.prompt if isinstance(req.prompt[0], str) else [server.engine.tokenizer.decode(p) for p in prompts]
