"""Tool calls and structured output in the chat API, as OpenAI's Chat Completions define them.

Requests: `tools` (functions with JSON-schema parameters) go to the model's chat template, as transformers'
apply_chat_template passes them; `tool_choice` is "auto" (the reply is parsed for calls), "none" (it is not),
"required" (the reply is one or more calls) or a named function (a call of that one); assistant messages carry
`tool_calls` and `tool` messages their `tool_call_id`, both rendered by the template. `response_format` is
{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", ...}}.
"required", a named function and the two JSON formats are kept to by constrained decoding (grammar.py): the
reply always parses; the other choices parse what the model wrote.

Replies: the calls in the template's own format, chosen from the template text (`tool_format`):
- "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks after optional text (Hermes,
  Qwen 2.5/3, lmforge's ChatML);
- "llama3_json": the reply is one JSON object `{"name": ..., "parameters": {...}}` (Llama 3.1/3.2's JSON tool
  calling; several separated by ";"), optionally after `<|python_tag|>`.
Text that is not a well-formed call (broken JSON, a name that is not a string, a block never closed) comes back
as plain content, never an error; calls that parse come back as `tool_calls` (id, type "function", name,
arguments as a JSON string) with finish_reason "tool_calls", and any text around them as content. Streaming
sends text as it comes and each call, once its block is complete, as OpenAI's deltas: `{"index", "id", "type",
"function": {"name", "arguments"}}`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmforge.infer.grammar import JSON_LAYOUT, json_grammar, lark_grammar
from lmforge.infer.openai_api import APIError, ResponseFormat, ToolDefinition

# -- the template's format ----------------------------------------------------------------------------------

def tool_format(template: str | None) -> str | None:
    """Which call format a chat template writes: "hermes", "llama3_json", or None (it has no tool calls)."""
    if not template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ("tools" in template and '"parameters"' in template):
        return "llama3_json"
    return None


def _call(name: str, arguments: Any) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments, ensure_ascii=False)}}


def _json_call(text: str, arguments_key: str) -> dict | None:
    """One call from a JSON object {"name": str, <arguments_key>: object}, or None."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", {}))
    return _call(value["name"], arguments) if isinstance(arguments, dict) else None


HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, kind: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of a whole reply; ([text], []) when it holds no well-formed calls."""
    if kind == "hermes":  # every well-formed block is a call; the rest of the text (a broken block too) content
        content, calls, at = [], [], 0
        for block in HERMES.finditer(text):
            call = _json_call(block[1], "arguments")
            if call is not None:
                content.append(text[at:block.start()])
                calls.append(call)
                at = block.end()
        if not calls:
            return text, []
        rest = "".join([*content, text[at:]]).strip()
        return rest or None, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    calls, decoder, at = [], json.JSONDecoder(), 0
    while at < len(body):  # objects, separated by ";"
        try:
            value, at = decoder.raw_decode(body, at)
        except (ValueError, RecursionError):
            return text, []
        calls.append(_json_call(json.dumps(value), "parameters"))
        at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
    if not calls or any(c is None for c in calls):
        return text, []
    return None, calls


@dataclass
class ToolStream:
    """A streamed reply split into content deltas and tool-call deltas as they become certain: text that may
    begin a call is held back until the call closes (then sent as one call delta) or turns out to be text."""

    kind: str
    text: str = ""
    sent: int = 0  # text[:sent] has gone out as content or calls
    calls: int = 0
    deltas: list[dict] = field(default_factory=list)

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        if self.kind == "llama3_json":  # a reply that opens as JSON is held whole, for the end to decide
            head = self.text.lstrip().removeprefix("<|python_tag|>").lstrip()
            if head and not head.startswith("{") and not "<|python_tag|>".startswith(self.text.strip()):
                return self._content(len(self.text))
            return []
        out = []
        while True:
            start = self.text.find("<tool_call>", self.sent)
            if start < 0:  # send all but a tail that may be the start of "<tool_call>"
                keep = next((k for k in range(min(len("<tool_call>") - 1, len(self.text) - self.sent), 0, -1)
                             if "<tool_call>".startswith(self.text[len(self.text) - k:])), 0)
                return out + self._content(len(self.text) - keep)
            out += self._content(start)
            end = self.text.find("</tool_call>", start)
            if end < 0:
                return out
            call = _json_call(self.text[start + len("<tool_call>"):end].strip(), "arguments")
            if call is None:  # not a call after all: its text is content
                out += self._content(end + len("</tool_call>"), strip=False)
                continue
            out.append(self._call_delta(call))
            self.sent = end + len("</tool_call>")

    def finish(self) -> list[dict]:
        """What is left at the end of the reply."""
        if self.kind == "llama3_json" and self.sent < len(self.text):
            content, calls = parse_tool_calls(self.text[self.sent:], self.kind)
            if calls:
                self.sent = len(self.text)
                return [self._call_delta(c) for c in calls]
        return self._content(len(self.text), strip=False)

    def _content(self, upto: int, strip: bool = False) -> list[dict]:
        piece = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        if self.calls and not piece.strip():  # whitespace between calls
            return []
        return [{"content": piece}] if piece else []

    def _call_delta(self, call: dict) -> dict:
        self.calls += 1
        return {"tool_calls": [{"index": self.calls - 1, **call}]}


# -- constrained replies ------------------------------------------------------------------------------------

def _arguments_schema(tool: ToolDefinition) -> dict:
    return tool.function.parameters or {"type": "object"}


def tool_call_grammar(tools: list[ToolDefinition], kind: str, tokens: set[str], only: str | None = None,
                      parallel: bool = True) -> str:
    """The grammar of a reply that is one or more calls (one when `parallel` is false or a function is named
    `only`) in the template's format. `tokens`: the tokenizer's added tokens; `<tool_call>` is referred to as one
    when it is one."""
    chosen = [t for t in tools if only is None or t.function.name == only]
    key = "arguments" if kind == "hermes" else "parameters"
    bodies = [{"type": "object", "additionalProperties": False, "required": ["name", key], "x-guidance": JSON_LAYOUT,
               "properties": {"name": {"const": t.function.name}, key: _arguments_schema(t)}} for t in chosen]
    rules = [f"call{i}: %json {json.dumps(b)}" for i, b in enumerate(bodies)]
    alternatives = " | ".join(f"call{i}" for i in range(len(bodies)))
    if kind == "hermes":
        as_tokens = "<tool_call>" in tokens and "</tool_call>" in tokens  # Lark: <token>, or "text"
        open_, close = ("<tool_call>", "</tool_call>") if as_tokens else ('"<tool_call>"', '"</tool_call>"')
        repeat = "+" if parallel and not only else ""
        head = f'start: block{repeat}\nblock: {open_} "\\n" ({alternatives}) "\\n" {close}'
    else:
        head = f"start: ({alternatives})"
    return lark_grammar("\n".join([head, *rules]))


def response_grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar `response_format` asks for, or None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_grammar({"type": "object"})
    if response_format.json_schema is None:
        raise APIError(400, "'response_format' of type 'json_schema' needs its 'json_schema' field.",
                       "response_format.json_schema")
    return json_grammar(response_format.json_schema.schema_ or {})


@dataclass
class ToolPlan:
    """What a chat request's tools and formats mean for its prompt and its reply."""

    tools: list[dict] | None = None  # for the chat template
    kind: str | None = None  # the reply is parsed for calls in this format (None: not parsed)
    grammar: str | None = None


def plan(tools: list[ToolDefinition] | None, tool_choice, response_format: ResponseFormat | None, template: str | None,
         added_tokens: set[str], parallel: bool = True) -> ToolPlan:
    """A request's ToolPlan, or a 400 APIError naming the field that cannot be honoured."""
    grammar = response_grammar(response_format)
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "'tool_choice' needs 'tools'.", "tool_choice")
        return ToolPlan(grammar=grammar)
    kind = tool_format(template)
    if kind is None:
        raise APIError(400, "This model's chat template has no tool calls ('<tool_call>' or Llama 3.1's JSON), so "
                       "it cannot be given 'tools'.", "tools")
    names = [t.function.name for t in tools]
    if len(set(names)) < len(names):
        raise APIError(400, "'tools' holds two functions of the same name.", "tools")
    rendered = [t.model_dump(by_alias=True, exclude_none=True) for t in tools]
    choice = tool_choice or "auto"
    if choice == "none":
        return ToolPlan(rendered, None, grammar)
    if grammar is not None and choice != "auto":
        raise APIError(400, "'response_format' and a 'tool_choice' that forces a call cannot both hold.",
                       "response_format")
    if choice == "auto":
        return ToolPlan(rendered, kind, grammar)
    only = None if choice == "required" else choice.function.name
    if only is not None and only not in names:
        raise APIError(400, f"'tool_choice' names the function '{only[:64]}', which is not in 'tools'.",
                       "tool_choice")
    return ToolPlan(rendered, kind, tool_call_grammar(tools, kind, added_tokens, only, parallel))


def template_messages(messages) -> list[dict]:
    """Chat messages as the template takes them: text parts joined, tool calls' arguments as objects (the
    template writes them as JSON), OpenAI's `developer` role as `system`. Content with image parts stays a
    list of parts, for llm.encode_chat_images."""
    chat = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            images = any(p.type == "image_url" for p in content)
            content = [p.model_dump(exclude_none=True) for p in content] if images else "".join(p.text for p in content)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments_object(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        chat.append(message)
    return chat


def _arguments_object(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # the template writes a string as it is
