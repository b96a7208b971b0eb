"""OpenAI's HTTP API as `lmforge serve` speaks it: the request schemas (with vLLM's extensions), the error
schema, and the choices of answers with their log-probs. The server (serve.py, and the endpoints' modules it
routes to) holds the routes; this module holds what they parse, how they word what went wrong, and what they
answer.

Parsing is strict: JSON types are not coerced ("1" is not a number, true is not 1), and an unknown field is an
error naming it, as OpenAI's API answers "Unrecognized request argument supplied: ...". `None` means "not
given", because OpenAI's schema lets clients send null for any optional parameter.

A body is at most `--max-body-bytes`, but a few MB of JSON can hold a million values, so parsing reports one
error, never one per value: lists stop at their first bad item (`fail_fast`), a model at its first unknown
field, and `logit_bias` is checked entry by entry, after parsing (`sampling.parse_logit_bias`): pydantic's
list of errors is built on the event loop, while no other request is served, in time in proportion to the
errors. Error messages quote the request only in short excerpts (`excerpt`), so a huge field is never
echoed back.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from tokenizers import decoders

from lmforge.infer.request import Delta, TokenLogprob
from lmforge.infer.sampling import SamplingParamError, excerpt

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; an impossible token reports this instead (as vLLM does)
# The engine checks a request's sampling parameters once per prompt of a batch, so their lists are bounded:
# logit_bias by OpenAI's own limit, stop_token_ids alike (each of up to --max-prompts prompts carries a copy,
# so the work grows with prompts x entries).
MAX_LOGIT_BIAS = 300
MAX_STOP_TOKEN_IDS = 300


MAX_TOOLS = 128  # functions in one request, calls in one message

# -- request schemas ------------------------------------------------------------------------------------------


def listed(item, **constraints):
    """A JSON array of `item` whose validation stops at its first bad item (see the module's docstring)."""
    return Annotated[list[item], Field(fail_fast=True, **constraints)]


class Schema(BaseModel):
    # Unknown fields are kept (no error each) and refused after, the first one alone.
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def refuse_unknown_fields(self):
        if self.model_extra:
            raise PydanticCustomError("extra_forbidden", "Extra inputs are not permitted",
                                      {"field": next(iter(self.model_extra))})
        return self


class TextPart(Schema):
    type: Literal["text"]
    text: str


class ImageURL(Schema):
    url: str  # a data URL, a local file or an http(s) URL: what the server reads is its policy (vision/fetch.py)
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's resolution hint: one resolution here


class ImagePart(Schema):
    type: Literal["image_url"]
    image_url: ImageURL



def _part_kind(value) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else None
    return {"text": "text_part", "image_url": "image_part"}.get(kind)


# Content is a text or a list of parts, and a part is told by its `type`: discriminators pick the branch, so a
# bad part is reported as itself (not as "should be a valid string" from the other branch). Their tags are
# names validation_error drops from an error's location.
ContentPart = Annotated[Annotated[TextPart, Tag("text_part")] | Annotated[ImagePart, Tag("image_part")],
                        Discriminator(_part_kind, custom_error_type="invalid_value", custom_error_message=(
                            'a content part is {"type": "text", "text": ...} or {"type": "image_url", '
                            '"image_url": {"url": ...}}'))]
MessageContent = Annotated[Annotated[str, Tag("str")] | Annotated[listed(ContentPart), Tag("list")],
                           Discriminator(lambda value: "str" if isinstance(value, str) else "list")]


# tools and structured output (tools.py)

class FunctionDefinition(Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(Schema):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Schema):
    name: str


class NamedToolChoice(Schema):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(Schema):
    name: str
    arguments: str


class ToolCall(Schema):
    id: str
    type: Literal["function"]
    function: FunctionCall


class JSONSchemaFormat(Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None




class ChatMessage(Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent | None = None  # image parts: a user's only (chat_api.py)
    tool_calls: listed(ToolCall, max_length=MAX_TOOLS) | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None


class StreamOptions(Schema):
    include_usage: bool | None = None


class SamplingRequest(Schema):
    """The sampling parameters chat and completions share."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    stop: str | listed(str) | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what torch.Generator.manual_seed takes
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # token id (a string) -> bias in [-100, 100], checked entry by entry by sampling.parse_logit_bias
    logit_bias: Annotated[dict[str, Any], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None  # an end-user id for the operator's logs; generation does not depend on it
    # vLLM's extensions (its names and meanings): top_k -1 or 0 is off; stop_token_ids end the reply like eos
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: listed(int, max_length=MAX_STOP_TOKEN_IDS) | None = None
    ignore_eos: bool | None = None  # run to max_tokens (benchmarks want fixed lengths)


class ChatCompletionRequest(SamplingRequest):
    messages: listed(ChatMessage, min_length=1)
    tools: listed(ToolDefinition, max_length=MAX_TOOLS) | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: a forced reply is one call (tools.tool_call_grammar)
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(SamplingRequest):
    prompt: str | listed(str) | listed(int) | listed(listed(int))  # a text, texts, token ids, lists of them
    logprobs: int | None = Field(None, ge=0, le=20)  # legacy API: the number of alternatives per token
    echo: bool | None = None  # the prompt in front of the reply (and its tokens' log-probs with `logprobs`)
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: the prompt scored, nothing generated


class TokenizeRequest(Schema):  # vLLM's /tokenize: a text (its completions form) or a chat (its chat form)
    model: str | None = None
    prompt: str | None = None
    messages: listed(ChatMessage, min_length=1) | None = None
    add_special_tokens: bool = True  # a text's: the tokenizer's post-processor (e.g. a BOS); a chat has its template
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Schema):
    model: str | None = None
    tokens: listed(int)


# -- errors -----------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's schema."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def server_error(error: Exception) -> APIError:
    return APIError(500, f"The server had an error while processing your request: {type(error).__name__}: "
                    f"{excerpt(str(error), 500)}", type="server_error")


def sampling_error(error: SamplingParamError) -> APIError:
    """A sampling parameter out of range (sampling.py's checks), naming it as `param`."""
    return APIError(400, f"Invalid value for '{error.field}': {excerpt(str(error), 200)}", error.field,
                    "invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "text_part", "image_part"}


def validation_error(error: ValidationError) -> APIError:
    """The first problem pydantic found, worded as OpenAI words it, naming the parameter."""
    first = error.errors(include_url=False, include_input=False)[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request: {first['msg']}")
    # Drop the union-branch tags pydantic puts in the location (`prompt.list[int].1` -> `prompt.1`).
    loc = [excerpt(str(p)) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p.lower() in _TYPE_TAGS))]
    if first["type"] == "extra_forbidden":
        param = ".".join([*loc, excerpt(first["ctx"]["field"])])
        return APIError(400, f"Unrecognized request argument supplied: {param}", param)
    param = ".".join(loc) or None
    if first["type"] == "model_type" and not loc:
        return APIError(400, "The request body must be a JSON object.")
    if first["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param)
    return APIError(400, f"Invalid value for '{param}': {excerpt(first['msg'], 200)}.", param, "invalid_value")


def parse_request(schema: type[Schema], body: bytes) -> Schema:
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


# -- answers: choices and their log-probs ----------------------------------------------------------------------


@dataclass
class Choice:
    """What one sample has produced so far; `offsets[i]` is where token i starts in `text`."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> list[int]:
        """Append one engine event; returns the text offsets of its tokens. A token's text may be held back
        (an incomplete UTF-8 character), so offsets advance by each token's text but never past the event's."""
        start, offsets, used = len(self.text), [], 0
        for entry in delta.logprobs or []:
            offsets.append(start + min(used, len(delta.text)))
            used += len(entry.text)
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.offsets += offsets
        self.finish_reason = delta.finish_reason or self.finish_reason
        return offsets


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: byte-level BPE vocabularies (GPT-2, Llama 3, Qwen, ours)
    spell each byte as one printable character; printable bytes stand for themselves, the other 68 are
    shifted to chr(256 + i) in byte order (Radford et al. 2019, openai/gpt-2 encoder.py bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


@dataclass
class TokenBytes:
    """The exact bytes of each token, for the `bytes` field of chat log-probs: a token may be part of a
    UTF-8 character, whose decoded text is then only a replacement character."""

    tokenizer: object

    @functools.cached_property
    def _byte_level(self) -> bool:
        return isinstance(self.tokenizer.backend.decoder, decoders.ByteLevel)

    @functools.cached_property
    def _added(self) -> frozenset[int]:
        return frozenset(self.tokenizer.backend.get_added_tokens_decoder())

    def __call__(self, token_id: int, text: str) -> list[int]:
        piece = self.tokenizer.backend.id_to_token(token_id)
        table = _byte_level_decoder()
        if self._byte_level and token_id not in self._added and piece and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(text.encode("utf-8"))


def _logprob(value: float) -> float:
    return value if math.isfinite(value) else LOGPROB_FLOOR


def chat_logprobs(entries: list[TokenLogprob], k: int, token_bytes: TokenBytes) -> dict:
    """OpenAI chat schema: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    content = [
        {"token": e.text, "logprob": _logprob(e.logprob), "bytes": token_bytes(e.token_id, e.text),
         "top_logprobs": [{"token": text, "logprob": _logprob(lp), "bytes": token_bytes(tid, text)}
                          for tid, text, lp in e.top[:k]]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], offsets: list[int], k: int) -> dict:
    """Legacy completions schema: parallel lists, `top_logprobs` one {text: logprob} dict per token holding
    the k most likely tokens and the chosen one ("up to logprobs+1 elements", OpenAI's API reference)."""
    top = []
    for e in entries:
        alternatives = {text: _logprob(lp) for _, text, lp in e.top[:k]}
        alternatives.setdefault(e.text, _logprob(e.logprob))
        top.append(alternatives)
    return {"tokens": [e.text for e in entries], "token_logprobs": [_logprob(e.logprob) for e in entries],
            "top_logprobs": top, "text_offset": offsets}


def echoed_logprobs(prompt: list[int], entries: list[TokenLogprob | None], text: str, k: int, token_text) -> dict:
    """The legacy schema's lists for an echoed prompt (the engine's prompt_logprobs): the first token has no
    log-prob (null, as in OpenAI's and vLLM's echo); offsets advance by each token's text, capped at `text`."""
    first = {"tokens": [token_text(prompt[0])], "token_logprobs": [None], "top_logprobs": [None]}
    rest = completion_logprobs(entries[1:], [], k)
    offsets, used = [], 0
    for token in first["tokens"] + rest["tokens"]:
        offsets.append(min(used, len(text)))
        used += len(token)
    return {key: first[key] + rest[key] for key in first} | {"text_offset": offsets}


def join_logprobs(head: dict | None, tail: dict | None) -> dict | None:
    """Two of the legacy schema's logprobs objects as one (an echoed prompt's, then the reply's)."""
    return tail if head is None else {key: head[key] + tail[key] for key in head}
