"""Incremental detokenisation for streaming, with stop strings.

Two things make "decode the new token and print it" wrong:
1. Byte-level BPE can split one UTF-8 character over several tokens (an emoji is 4 bytes, often
   2-3 tokens), and a token's text can depend on its neighbours (SentencePiece drops the leading
   space of the first token it decodes). So we decode a short window of recent tokens and emit
   only what the newest token added, and only once it no longer ends in U+FFFD (the replacement
   character a decoder writes for an incomplete byte sequence). This is the prefix/read offset
   scheme of Hugging Face's text-generation-inference and vLLM.
2. A stop string can span tokens ("\\n\\nUser" = "\\n\\n" + "User"), and the returned text must not
   contain it. So the text is searched as a whole, and any tail that could still grow into a stop
   string is held back until it either does (cut there) or cannot (emitted).
"""

from __future__ import annotations

from lmforge.tokenizer import Tokenizer

# Prompt tokens decoded in front of the output, so the first output token decodes in context.
CONTEXT_TOKENS = 6


class Detokenizer:
    """Feed token ids with `add`; it returns text that is safe to show. `text` is the full output
    so far (stop string excluded once found); the deltas returned always concatenate to it."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stop: list[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special_tokens
        self.ids = list(prompt[-CONTEXT_TOKENS:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stop = list(stop)
        self.text = ""  # decoded output: complete characters only
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False  # a stop string was found; `text` ends just before it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token: int) -> str:
        """Take one new token; return the text that can now be shown ("" if none yet)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._append(after[len(before):])
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the output: release everything still held back (an incomplete byte sequence
        at the very end decodes to U+FFFD, a whole character)."""
        if not self.stopped:
            before = self._decode(self.ids[self.prefix_offset:self.read_offset])
            after = self._decode(self.ids[self.prefix_offset:])
            if len(after) > len(before):
                self._append(after[len(before):])
        return self._release(final=True)

    def _append(self, piece: str) -> None:
        if self.stopped:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._stop_prefix_len()
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted += len(delta)
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
