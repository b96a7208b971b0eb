"""Tokenizer: train a byte-level BPE, load any Hugging Face tokenizer directory, render chat templates.

`lmforge tokenizer --data F... --vocab-size N --out DIR` trains a byte-level BPE with the Hugging Face
`tokenizers` library (the merges are learned in Rust; nothing here re-implements BPE) and writes
`tokenizer.json` + `tokenizer_config.json`, which `transformers.AutoTokenizer.from_pretrained(DIR)`
loads and encodes identically.

Special tokens of a trained tokenizer (ids 0-2, then the markers at the end of the vocabulary):
    <|endoftext|>       end of a document in pretraining; also the padding token (eos, pad)
    <|im_start|>        ChatML: opens a turn, followed by the role and a newline
    <|im_end|>          ChatML: closes a turn; the end token of every assistant reply
    <think> </think>    around a reasoning block that precedes the answer
    <tool_call> </tool_call>            around a JSON function call made by the assistant
    <tool_response> </tool_response>    around a tool's result, sent back in a user turn
The first three are *special* (decode(skip_special_tokens=True) drops them). The markers are added
tokens that are not special, as in Qwen: always one token each, but kept when decoding, because a
reasoning block or a tool call is content the caller wants to see and parse. There is no BOS token.

Pre-tokenization splits text with Qwen2's regular expression, which keeps every digit a token of its
own (good for arithmetic), then maps bytes to printable characters (GPT-2's byte-level trick), so any
Unicode text round-trips exactly and no input is ever unknown. No normalizer: text is not NFC-folded.

Chat templates are Jinja, rendered here with the same sandbox, options and helpers as transformers.
`encode_chat` also returns the assistant mask without needing `{% generation %}` tags in the
template, so it works for Llama 3, Qwen and other third-party templates (see `assistant_spans`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from lmforge.data.formats import DataStats, iter_text_pieces
from lmforge.files import read_json
from lmforge.settings import parse_args

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKER_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
MODEL_MAX_LENGTH = 32768

# Qwen2's pre-tokenizer pattern: contractions, words with one leading non-letter, single digits,
# punctuation runs with their trailing newlines, newline runs, and other whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as Qwen2.5/3 write it, with a system prompt, tools, reasoning and tool calls. The reply part
# is wrapped in {% generation %} so that transformers' `return_assistant_tokens_mask` (and TRL's
# assistant-only loss) agree with `Tokenizer.encode_chat` on which tokens are the assistant's.
CHATML_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
        'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'
        '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and not loop.first %}
        {{- raise_exception('only the first message may be a system message') }}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for part in message.content %}
                {%- if not loop.first %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if part.type == 'text' %}
                    {{- part.text }}
                {%- elif part.type in ['image', 'image_url'] %}
                    {{- '<image>' }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {%- if message.reasoning_content %}
                {{- '<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
            {%- endif %}
            {{- message.content or '' }}
            {%- for call in message.tool_calls or [] %}
                {%- if call.function %}
                    {%- set call = call.function %}
                {%- endif %}
                {%- if message.content or not loop.first %}
                    {{- '\\n' }}
                {%- endif %}
                {{- '<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}
                {%- if call.arguments is string %}
                    {{- call.arguments }}
                {%- else %}
                    {{- call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker around assistant text, rendered
    as its body (in its own scope, as transformers does). lmforge finds assistant spans without it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Like transformers: plain json.dumps, no HTML escaping (Jinja's own tojson escapes <, >, &).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled the way transformers compiles it, so both render the same text.

    Templates come from model hubs, i.e. they are untrusted code: the immutable sandbox stops them
    from touching anything but the data they are given.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be loaded; the message names the file and the field."""


def _add_declared_tokens(backend: BackendTokenizer, declared: dict, config_file: Path) -> None:
    """Tokens that tokenizer_config.json declares (`added_tokens_decoder`, id -> spec) but tokenizer.json
    lacks are added, each at its id."""
    if not isinstance(declared, dict):
        raise TokenizerError(f"{config_file}: field 'added_tokens_decoder' should be an object")
    entries = []
    for index, spec in declared.items():
        if not (str(index).isdigit() and isinstance(spec, dict) and isinstance(spec.get("content"), str)):
            raise TokenizerError(f"{config_file}: added_tokens_decoder.{str(index):.20} should map a token id "
                                 "to an object with its 'content'")
        entries.append((int(index), spec))
    for index, spec in sorted(entries, key=lambda entry: entry[0]):
        if backend.token_to_id(spec["content"]) is None:
            backend.add_tokens([AddedToken(spec["content"], special=bool(spec.get("special", False)),
                                           normalized=bool(spec.get("normalized", False)))])
            if backend.token_to_id(spec["content"]) != index:
                raise TokenizerError(f"{config_file}: added token {spec['content']!r:.40} should have id {index}")


def _token_text(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string, null, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


# Normalizers by the most they can shrink a text (its length in bytes, before / after); the others
# (Strip, BertNormalizer, a Replace with nothing, ...) can delete text, so that no bound holds.
_NORMALIZER_SHRINK = {"NFC": 3, "NFD": 3, "NFKC": 3, "NFKD": 3, "Lowercase": 3, "Prepend": 1}
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}


def _normalizer_shrink(spec: dict | None) -> int | None:
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factors = [_normalizer_shrink(s) for s in spec.get("normalizers", [])]
        return None if None in factors else math.prod(factors)
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}).get("String"), spec.get("content") or ""
        if pattern is None or not content:
            return None
        return max(1, math.ceil(len(pattern.encode("utf-8")) / len(content.encode("utf-8"))))
    return _NORMALIZER_SHRINK.get(kind)


def _keeps_text(spec: dict | None) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_keeps_text(s) for s in spec.get("pretokenizers", []))
    return spec.get("type") in _KEEPING_PRE_TOKENIZERS and spec.get("behavior") != "Removed"


def _common_prefix_len(a: str, b: str, block: int = 4096) -> int:
    """How many leading characters a and b share: compared a block at a time (in C), then one character
    at a time within the first block that differs (a chat's history can be megabytes long)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i:i + block] == b[i:i + block]:
        i += block
    i = min(i, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Tokenizer:
    """A `tokenizers` tokenizer plus what tokenizer_config.json says about it (special tokens, chat template).

    Load one with `Tokenizer.from_dir(path)`: our own or any Hugging Face model's tokenizer directory.
    """

    backend: BackendTokenizer = field(repr=False)
    eos_token: str | None = None
    bos_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    model_max_length: int = MODEL_MAX_LENGTH
    config: dict = field(default_factory=dict, repr=False)  # the rest of tokenizer_config.json, for save()

    # -- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer directory. A file that is not what it should be is a TokenizerError naming it (and
        the field); the chat template, code from the model's author, is compiled only when first used."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (is this a tokenizer or model directory?)")
        try:
            backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # tokenizers raises plain Exceptions for files it cannot parse
            raise TokenizerError(f"{path / 'tokenizer.json'}: not a tokenizers file ({e})") from None
        config_file = path / "tokenizer_config.json"
        config = read_json(config_file, TokenizerError) if config_file.is_file() else {}
        tokens_map_file = path / "special_tokens_map.json"  # older checkpoints keep the tokens here
        if tokens_map_file.is_file():
            for key, value in read_json(tokens_map_file, TokenizerError).items():
                if config.get(key) is None:
                    config[key] = value
        _add_declared_tokens(backend, config.get("added_tokens_decoder") or {}, config_file)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = [t for t in template if isinstance(t, dict)]
            template = {t.get("name"): t.get("template") for t in named}.get("default")
        if (path / "chat_template.jinja").is_file():  # transformers >= 4.43 writes it to its own file
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{config_file}: field 'chat_template' should be a string")
        max_length = config.get("model_max_length", MODEL_MAX_LENGTH)
        if isinstance(max_length, bool) or not isinstance(max_length, (int, float)) or not max_length >= 1:
            raise TokenizerError(f"{config_file}: field 'model_max_length': {max_length!r:.40} is not a length")
        special = {}
        for name in ("eos_token", "bos_token", "pad_token"):
            special[name] = _token_text(config.get(name))
            if special[name] is not None and not isinstance(special[name], str):
                raise TokenizerError(f"{config_file}: field '{name}' should be a token (a string)")
        return cls(
            backend=backend, **special, chat_template=template,
            # transformers writes a huge sentinel when a tokenizer has no limit
            model_max_length=int(max_length) if max_length < 1e12 else MODEL_MAX_LENGTH,
            config=config,
        )

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) to `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        added = {
            str(index): {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
                         "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
            for index, token in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config.update(
            tokenizer_class=config.get("tokenizer_class", "PreTrainedTokenizerFast"),
            added_tokens_decoder=added,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            model_max_length=self.model_max_length,
            clean_up_tokenization_spaces=False,
        )
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        (out / "chat_template.jinja").unlink(missing_ok=True)  # it would override the one just written

    def sha256(self) -> str:
        """A fingerprint of the vocabulary and rules, to check that token data matches a tokenizer."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    # -- ids ----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def pad_id(self) -> int:
        """The padding id; the eos id when the tokenizer has no pad token (Llama 3), which is safe
        because padded positions are never attended to nor trained on."""
        pad = self.token_to_id(self.pad_token)
        return self.eos_id if pad is None else pad

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    @cached_property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: eos, and the token the chat template closes a reply with (`<|im_end|>`,
        `<|eot_id|>`), found by encoding a one-turn chat, so it holds for any template."""
        ids = [] if self.eos_id is None else [self.eos_id]
        if self.chat_template:
            tokens, mask = self.encode_chat([{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}])
            end = tokens[max(i for i, keep in enumerate(mask) if keep)]
            if end in self.special_ids and end not in ids:
                ids.append(end)
        return ids

    # -- text <-> ids -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text become their ids (as in transformers);
        `add_special_tokens` applies the tokenizer's post-processor (e.g. Llama's BOS).

        Through `encode_batch_fast`, which releases Python's GIL while Rust encodes (`backend.encode`
        holds it: a 2 MB text would stop every other thread, a server's event loop included, for a
        second); it gives the same ids, without the offsets nobody here reads."""
        return self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for many texts at once, in parallel threads inside `tokenizers`."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def max_chars_per_token(self) -> int | None:
        """The most characters of input text one token can stand for, or None where no bound holds.

        Every token covers at most as many bytes as its longest vocabulary entry, and a character is at
        least a byte, so a text of n characters has at least n / max_chars_per_token tokens (`min_tokens`),
        and its first k tokens lie within its first k * max_chars_per_token characters (`chars_for_tokens`):
        a text that cannot fit a context is refused, or cut to what a sample can use, before tokenizing it.
        That needs a tokenizer that deletes no text: a BPE model without fused unknowns, normalizers that
        shrink text by a bounded factor (Unicode normalization composes at most 3 code points into one)
        and pre-tokenizers that keep every character (byte-level, Metaspace, splits that isolate).
        """
        spec = json.loads(self.backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or (model.get("unk_token") is not None and model.get("fuse_unk")):
            return None
        shrink = _normalizer_shrink(spec.get("normalizer"))
        if shrink is None or not _keeps_text(spec.get("pre_tokenizer")):
            return None
        added = {token.content for token in self.backend.get_added_tokens_decoder().values()}
        byte_level = isinstance(self.backend.decoder, decoders.ByteLevel)  # one vocabulary character per byte
        longest = max((len(piece) if byte_level and piece not in added else len(piece.encode("utf-8"))
                       for piece in self.backend.get_vocab(with_added_tokens=True)), default=1)
        return max(1, longest) * shrink

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) from the text's length alone (0 where none holds)."""
        per_token = self.max_chars_per_token
        return 0 if per_token is None else math.ceil(len(text) / per_token)

    def chars_for_tokens(self, tokens: int) -> int | None:
        """How many leading characters of any text hold its first `tokens` tokens (None: no bound)."""
        per_token = self.max_chars_per_token
        return None if per_token is None else tokens * per_token

    # -- chat ---------------------------------------------------------------------------------------

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template")
        try:
            return compile_template(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"the chat template does not compile: {e.message} (its line {e.lineno})") from None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
                    **template_kwargs) -> str:
        """The chat as text, exactly as transformers' `apply_chat_template(..., tokenize=False)` renders it.

        `template_kwargs` reach the template as variables (e.g. `enable_thinking=False` for Qwen3).
        """
        # As transformers does: keys set to None are dropped (templates test for presence, not None),
        # and the named special tokens are visible to the template (Llama writes {{ bos_token }}).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                   ("pad_token", self.pad_token)) if value is not None}
        return self._template.render(messages=messages, tools=tools, documents=None,
                                     add_generation_prompt=add_generation_prompt, **context, **template_kwargs)

    def assistant_spans(self, messages: list[dict], text: str, tools: list[dict] | None = None,
                        encoding=None, **template_kwargs) -> list[tuple[int, int]]:
        """Character spans of `text` (the rendered chat, or its beginning) that are assistant replies, one per
        assistant message that begins within it. `encoding`: text's encoding, if the caller has it.

        Works on any template, with or without {% generation %} tags:
        1. A reply starts where the chat so far, rendered with the generation prompt, stops matching
           the full text (the longest common prefix), i.e. right after `<|im_start|>assistant\\n`,
           `<|start_header_id|>assistant<|end_header_id|>\\n\\n`, and so on. The common prefix rather
           than an exact prefix, because some templates render history differently (Qwen3 drops old
           reasoning), and a prefix check would then find nothing.
        2. It ends with the first *special* token after that: the end-of-turn token (`<|im_end|>`,
           `<|eot_id|>`, `</s>`), which the model must learn to produce to stop. Markers inside a reply
           (`<think>`, `<tool_call>`) are not special tokens in Qwen's tokenizers nor in ours.
           Whatever a template writes after the end token (ChatML's newline) is not part of the reply.
        """
        encoding = encoding or self.backend.encode_batch([text], add_special_tokens=False)[0]
        specials = [(start, end) for i, (start, end) in zip(encoding.ids, encoding.offsets) if i in self.special_ids]
        spans: list[tuple[int, int]] = []
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render_chat(messages[:index], add_generation_prompt=True, tools=tools,
                                      **template_kwargs) if index else ""
            start = max(_common_prefix_len(prompt, text), spans[-1][1] if spans else 0)
            if start >= len(text):  # text was cut before this reply (and the ones after it)
                break
            end = next((e for s, e in specials if s >= start), None)
            if end is None:  # no end token: the reply runs as far as this turn renders like the full text
                turn = self.render_chat(messages[: index + 1], tools=tools, **template_kwargs)
                end = max(_common_prefix_len(turn, text), start)
            spans.append((start, end))
        return spans

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
                    max_tokens: int | None = None, **template_kwargs) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat (equal to transformers' `apply_chat_template`) and the assistant
        mask: 1 for each token of an assistant reply including its end token, else 0.

        `max_tokens`: keep the first max_tokens only. The rendered text is then cut to what they can use
        before it is tokenized (`chars_for_tokens`), so a conversation of 50 MB costs what its beginning
        does; the ids near such a cut may differ from a whole encoding's in the word it falls in."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                **template_kwargs)
        if max_tokens is not None and (usable := self.chars_for_tokens(max_tokens + 1)) is not None:
            text = text[:usable]
        encoding = self.backend.encode_batch([text], add_special_tokens=False)[0]  # releases the GIL
        spans = self.assistant_spans(messages, text, tools=tools, encoding=encoding, **template_kwargs)
        mask = [0] * len(encoding.ids)
        # A token is the assistant's if it overlaps a reply span (transformers' rule for generation tags).
        # Offsets and spans are both in order, so one pass suffices.
        span = 0
        for position, (start, end) in enumerate(encoding.offsets):
            while span < len(spans) and start >= spans[span][1]:
                span += 1
            if span < len(spans) and end > spans[span][0] and end > start:
                mask[position] = 1
        if max_tokens is not None:
            return encoding.ids[:max_tokens], mask[:max_tokens]
        return encoding.ids, mask


# ---------------------------------------------------------------------------------------------------
# Training


def train_tokenizer(files, vocab_size: int = 6400, out_dir: str | Path | None = None, text_field: str = "text",
                    skip_bad: bool = False, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `files` (txt, jsonl, parquet, globs, builtin:shakespeare).

    Text is streamed: only the word counts that BPE needs are held in memory, never the corpus.
    Saved to `out_dir` when given. `vocab_size` counts every token, special ones included.
    """
    reserved = len(SPECIAL_TOKENS) + len(MARKER_TOKENS) + 256
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must be larger than {reserved} (256 bytes and the special tokens)")
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKER_TOKENS),  # the markers are added after training
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=show_progress and sys.stderr.isatty(),  # its bar redraws with carriage returns
    )
    stats = DataStats()
    texts = (piece.text for piece in iter_text_pieces(files, text_field, skip_bad=skip_bad, stats=stats))
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKER_TOKENS])
    tokenizer = Tokenizer(backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                          chat_template=CHATML_TEMPLATE)
    if skip_bad and stats.skipped:
        print(f"skipped bad input: {stats.summary()}")
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


@dataclass
class TokenizerConfig:
    data: list[str] = field(default_factory=lambda: ["builtin:shakespeare"],
                            metadata={"help": "text files, jsonl, parquet, globs, or builtin:shakespeare"})
    vocab_size: int = field(default=6400, metadata={"help": "number of tokens, special tokens included"})
    out: str = field(default="runs/tokenizer", metadata={"help": "output directory"})
    text_field: str = field(default="text", metadata={"help": "the text field of jsonl/parquet records"})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad records instead of stopping"})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(TokenizerConfig, argv, prog="lmforge tokenizer",
                     description="Train a byte-level BPE tokenizer with chat and tool special tokens.")
    started = time.perf_counter()
    tokenizer = train_tokenizer(cfg.data, cfg.vocab_size, cfg.out, cfg.text_field, cfg.skip_bad)
    print(f"trained a {tokenizer.vocab_size}-token tokenizer in {time.perf_counter() - started:.1f}s -> {cfg.out}")
    return 0
