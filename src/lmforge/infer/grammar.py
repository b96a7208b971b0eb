"""Constrained decoding: output that always parses, by masking the logits of every token that would break a grammar.

A request's grammar (SamplingParams.grammar) is llguidance's serialised form of a JSON schema (`json_grammar`:
`response_format` and tool arguments) or of a Lark grammar (`lark_grammar`: a tool call in the chat template's
format, tools.py). The Engine gives each of the request's samples a matcher; every step, before the sampler
chooses, each such row's logits outside the matcher's allowed tokens become -inf, and the chosen token advances
the matcher. When the grammar is complete the only tokens left are the end-of-output ones (the Engine's eos ids),
so a reply ends there, or on its own once the matcher stops.

llguidance (Microsoft's engine, used by llama.cpp and vLLM) was chosen by measurement (benchmarks/grammar.py,
BENCHMARKS.md): of the three engines on the package index, one request costs about as much CPU with it as with
xgrammar (it masks a token slower, ~10 microseconds, a few thousandths of a decode step here, and compiles a schema
faster) and ~10x less than with outlines-core; it covers JSON Schema best, and it installs in 8 MB with nothing else
(xgrammar pulls in triton: a gigabyte). It is an optional dependency (`pip install lmforge[serve]`), imported
when a request first asks for a grammar.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

MAX_GRAMMAR_BYTES = 1 << 20  # a schema or Lark grammar larger than this is refused before it is compiled
# JSON as json.dumps writes it (", " and ": ", no other whitespace): with whitespace free, a small model can spend
# its whole budget on spaces and newlines between two tokens of a document that then never closes.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar llguidance refuses (the message is its own), or llguidance missing."""


def _llguidance():
    try:
        import llguidance
        import llguidance.torch
    except ImportError:
        raise GrammarError("constrained decoding (response_format, tool_choice 'required') needs llguidance: "
                           "pip install llguidance") from None
    return llguidance


def json_grammar(schema: dict) -> str:
    """The grammar of the JSON documents `schema` allows (JSON Schema, as OpenAI's structured outputs take it)."""
    text = json.dumps(schema)
    if len(text) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the schema is {len(text)} bytes; at most {MAX_GRAMMAR_BYTES} are compiled")
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
    except ValueError as e:
        raise GrammarError(f"the schema is not one llguidance compiles: {e}") from None


def lark_grammar(text: str) -> str:
    """The grammar of a Lark text in llguidance's dialect (`%json {schema}` rules, `<token>` references)."""
    if len(text) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is {len(text)} bytes; at most {MAX_GRAMMAR_BYTES} are compiled")
    return _llguidance().LLMatcher.grammar_from_lark(text)


class Grammars:
    """One Engine's grammar machinery: llguidance's view of its tokenizer (built once, on first use: a few
    hundred milliseconds for a large vocabulary), and the matchers and masks of the running samples."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        self.llg = _llguidance()
        self.vocab_size = vocab_size
        self.tokenizer = self.llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                              eos_token=sorted(i for i in eos_ids if i < vocab_size))
        self.mask = self.llg.torch.allocate_token_bitmask(1, vocab_size)
        assert sys.byteorder == "little", "the mask's bits are read as little-endian int32 words"

    def check(self, grammar: str) -> None:
        """GrammarError, with llguidance's message, for a grammar it cannot run on this tokenizer. llguidance's
        default parser limits hold for every grammar, so no schema makes a step of the engine take long."""
        if not isinstance(grammar, str) or len(grammar) > MAX_GRAMMAR_BYTES:
            raise GrammarError("grammar: not a grammar string of at most 1 MiB")
        try:
            is_error, messages = self.llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        except ValueError as e:
            is_error, messages = True, [str(e)]
        if is_error:
            first = (messages[0] if messages else "refused").strip().splitlines()
            raise GrammarError(f"grammar: {first[0] if first else 'refused'}")

    def matcher(self, grammar: str):
        return self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list) -> None:
        """Each of `rows` of logits [B, vocab] keeps only what its matcher allows (the others become -inf)."""
        for row, matcher in zip(rows, matchers):
            self.llg.torch.fill_next_token_bitmask(matcher, self.mask, 0)
            logits[row].masked_fill_(~self.allowed(logits.shape[-1]), float("-inf"))

    def allowed(self, vocab: int) -> torch.Tensor:
        """The mask just filled, as one bool per token: bit i of int32 word j is token 32 j + i. (llguidance's own
        apply_token_bitmask_inplace is a torch.compile kernel, ~30 ms a call on a CPU: 100x a decode step.)"""
        bits = np.unpackbits(self.mask.numpy().view(np.uint8), bitorder="little")[:vocab]
        return torch.from_numpy(bits.astype(bool))

    @staticmethod
    def advance(matcher, token: int) -> bool:
        """Consume the chosen token; True when the grammar has ended (nothing more may follow)."""
        matcher.consume_token(token)
        return matcher.is_stopped()
