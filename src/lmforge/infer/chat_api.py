"""POST /v1/chat/completions of `lmforge serve`: a chat's messages rendered into a prompt with the model's own
chat template (images from `image_url` parts in user messages, at most MAX_IMAGES, read under the server's image
policy; tools, tool_choice and response_format as tools.py plans them, with a grammar for constrained decoding),
then the reply: whole, with its tool calls parsed out, or streamed as OpenAI's chat.completion.chunk events.
The tokenizer's endpoint (serve.py) renders `messages` through the same image_chat_prompt.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request

from lmforge.infer.grammar import GrammarError
from lmforge.infer.llm import encode_chat_images
from lmforge.infer.openai_api import APIError, ChatCompletionRequest, ChatMessage, Choice, chat_logprobs, excerpt
from lmforge.infer.request import aiter_all
from lmforge.infer.server import Server, json_answer, sse, token_usage
from lmforge.infer.tools import ToolPlan, ToolStream, parse_tool_calls, plan, template_messages
from lmforge.vision.fetch import fetch_image
from lmforge.vision.image import ImageError, pillow, resize

# Images in one chat request: each may decode to up to image.MAX_PIXELS (150 MB as RGB) before it is resized,
# one at a time.
MAX_IMAGES = 8


async def chat(server: Server, http_request: Request):
    req = await server.parse(ChatCompletionRequest, http_request)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "'logprobs' must be true when 'top_logprobs' is set.", "logprobs")
    tools = await asyncio.to_thread(tool_plan, server, req)  # compiles a grammar: not on the event loop
    # a chat that shows images reads them (files, web URLs) on the server's image threads, the others on asyncio's
    in_thread = server.in_image_thread if image_places(req.messages) else asyncio.to_thread
    prompt, images = await in_thread(image_chat_prompt, server, req.messages, tools=tools.tools)
    params = server.params(req, prompt_length(server, prompt, images),
                           req.max_completion_tokens or req.max_tokens, bool(req.logprobs), req.top_logprobs or 0)
    params.grammar = tools.grammar
    # The engine preprocesses images in the caller's thread: a large one takes a while, so not on the event loop.
    request = (await server.in_image_thread(server.submit, prompt, params, images) if images
               else server.submit(prompt, params))
    prompt = request.prompt  # with the images' tokens
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
    choices = [Choice(i) for i in range(params.n)]
    k = params.top_logprobs

    def logprobs_of(entries):
        return chat_logprobs(entries, k, server.token_bytes) if params.logprobs else None

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choice_list, usage=None):
            return {**meta, "object": "chat.completion.chunk", "choices": choice_list,
                    **({"usage": usage} if include_usage else {})}

        return sse(chat_stream(request, choices, tools.kind, chunk, logprobs_of, len(prompt), include_usage),
                   [request])

    await server.collect([request], lambda number, delta: choices[delta.index].add(delta), http_request)
    return await json_answer(lambda: {
        **meta, "object": "chat.completion", "usage": token_usage(len(prompt), choices, [request]), "choices": [
            {"index": c.index, **reply_message(c.text, c.finish_reason, tools.kind),
             "logprobs": logprobs_of(c.logprobs)} for c in choices]})


async def chat_stream(request, choices: list[Choice], kind: str | None, chunk, logprobs_of,
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
        yield chunk([], token_usage(prompt_tokens, choices, [request]))


def reply_message(text: str, finish_reason: str | None, kind: str | None) -> dict:
    """A whole reply's `message` and `finish_reason`: with tools (`kind`), its calls parsed out (tools.py)."""
    content, calls = parse_tool_calls(text, kind) if kind else (text, [])
    if calls and finish_reason == "stop":
        return {"message": {"role": "assistant", "content": content, "refusal": None, "tool_calls": calls},
                "finish_reason": "tool_calls"}
    return {"message": {"role": "assistant", "content": text, "refusal": None}, "finish_reason": finish_reason}


# -- the prompt: blocking (template, tokenizer, reading images), so the handler runs these in worker threads


def chat_prompt(server: Server, messages: list[ChatMessage], add_generation_prompt: bool = True,
                fit_context: bool = True, tools: list[dict] | None = None) -> list[int]:
    """Token ids of a chat rendered with the model's own template (transformers' apply_chat_template's)."""
    return server.encode([template_messages(messages)], "messages", fit_context,
                         add_generation_prompt=add_generation_prompt, tools=tools)[0]


def image_chat_prompt(server: Server, messages: list[ChatMessage], add_generation_prompt: bool = True,
                      fit_context: bool = True, tools: list[dict] | None = None,
                      read: bool = True) -> tuple[list[int], list]:
    """(token ids, images) of a chat that may show images: one `<image>` token per image (the engine expands
    it), each image read under the server's policy (vision/fetch.py), a refusal a 400 naming the part's url.
    `read` False (/tokenize): the images are not read, only their placeholders counted."""
    places = image_places(messages)
    if not places:
        return chat_prompt(server, messages, add_generation_prompt, fit_context, tools), []
    if server.engine.vision is None:
        raise APIError(400, f"Invalid value for '{places[0]}': the model '{server.model_name}' has no vision tower, "
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
            # resized at once, as the engine's preprocessing resizes it (the same pixels, PIL's resize to the size
            # an image has is a copy), so a request holds one full-size decoded image at a time, not MAX_IMAGES
            return pillow().fromarray(resize(fetch_image(url, server.images), server.engine.image_config))
        except ImageError as e:
            raise APIError(400, f"Invalid value for '{place}': {excerpt(str(e), 300)}", place,
                           "invalid_value") from None

    with server.encoding_errors("messages"):
        return encode_chat_images(server.engine.tokenizer, template_messages(messages), read_image,
                                  add_generation_prompt=add_generation_prompt, tools=tools,
                                  max_len=server.engine.max_len if fit_context else None)


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


def prompt_length(server: Server, prompt: list[int], images: list) -> int:
    """The prompt's tokens once the engine has expanded each image's placeholder to the image's tokens."""
    return len(prompt) + len(images) * (server.engine.vision.config.image_seq_length - 1) if images else len(prompt)


def tool_plan(server: Server, req: ChatCompletionRequest) -> ToolPlan:
    """The request's tools, tool_choice and response_format as a ToolPlan (tools.py), or a 400."""
    tokenizer = server.engine.tokenizer
    added = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}
    try:
        tools = plan(req.tools, req.tool_choice, req.response_format, tokenizer.chat_template, added,
                     parallel=req.parallel_tool_calls is not False)
        if tools.grammar is not None:
            server.engine.grammars.check(tools.grammar)
        return tools
    except GrammarError as e:
        raise APIError(400, f"Invalid schema: {excerpt(str(e), 300)}",
                       "tools" if req.tools else "response_format") from None
