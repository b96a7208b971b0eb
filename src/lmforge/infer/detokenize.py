"""Incremental detokenisation for streaming, with stop strings.

Two things make "decode the new token and print it" wrong:
1. Byte-level BPE can split one UTF-8 character over several tokens (an emoji is 4 bytes, often
   2-3 tokens), and a token's text can depend on its neighbours (SentencePiece drops the leading
   space of the first token it decodes). So we decode a short window of recent tokens and emit
   only what the newest tokens added, and only once it no longer ends in U+FFFD (the replacement
   character a decoder writes for an incomplete byte sequence). This is the prefix/read offset
   scheme of Hugging Face's text-generation-inference and vLLM.
2. A stop string can span tokens ("\\n\\nUser" = "\\n\\n" + "User"), and the returned text must not
   contain it. So the text goes through an Aho-Corasick automaton of the stop strings one character
   at a time, and any tail that could still grow into a stop string is held back until it either
   does (cut there) or cannot (emitted).

Each token costs work proportional to its own text (and the window, at most CONTEXT_TOKENS +
MAX_PENDING_TOKENS tokens), never to the text generated so far nor to the stop strings' total size.
"""

from __future__ import annotations

from collections import deque

from lmforge.tokenizer import Tokenizer

# Prompt tokens decoded in front of the output, so the first output token decodes in context.
CONTEXT_TOKENS = 6
# A UTF-8 character is at most 4 bytes and a token holds at least one, so the text's last character
# was begun in the last 3 tokens. Text still ending in U+FFFD after this many tokens (stray continuation
# bytes, which a model or a client's logit_bias can emit forever, or tokens that each end inside a
# character) is released up to that last character, and the window starts again: it never grows past
# CONTEXT_TOKENS + MAX_PENDING_TOKENS tokens.
MAX_PENDING_TOKENS = 4


class StopStrings:
    """The Aho-Corasick automaton of a set of strings (Aho & Corasick 1975, "Efficient string matching:
    an aid to bibliographic search"), fed one character at a time.

    A trie of the strings, where node n stands for the string spelled on its path; `fail[n]` is the
    node of the longest proper suffix of that string that is also in the trie. Invariant after each
    `feed`: `state` is the node of the longest suffix of the text fed so far that begins some stop
    string, so `partial` (its length) is how much of the text could still become one. Each character
    moves one edge down, each failure link at least one level up, so `steps` (edges and links
    followed) is at most twice the characters fed.
    """

    def __init__(self, strings: list[str]):
        self.steps = 0
        self.goto: list[dict[str, int]] = [{}]  # node -> {next character: child node}
        self.depth = [0]
        self.ends = [0]  # node -> length of the longest stop string that is a suffix of its string (0: none)
        for s in strings:
            node = 0
            for char in s:
                if char not in self.goto[node]:
                    self.goto[node][char] = len(self.goto)
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                    self.ends.append(0)
                node = self.goto[node][char]
            self.ends[node] = len(s)
        # Failure links breadth first: a node's link is one level up at least, so it is already final.
        self.fail = [0] * len(self.goto)
        queue = deque(self.goto[0].values())
        while queue:
            node = queue.popleft()
            self.ends[node] = self.ends[node] or self.ends[self.fail[node]]
            for char, child in self.goto[node].items():
                self.fail[child] = self._next(self.fail[node], char) if node else 0
                queue.append(child)
        self.state, self.steps = 0, 0  # steps counts the feeding only

    def _next(self, node: int, char: str) -> int:
        while node and char not in self.goto[node]:
            node = self.fail[node]
            self.steps += 1
        self.steps += 1
        return self.goto[node].get(char, 0)

    def feed(self, char: str) -> int:
        """Read one character; return the length of the longest stop string ending with it (0: none)."""
        self.state = self._next(self.state, char)
        return self.ends[self.state]

    @property
    def partial(self) -> int:
        """Length of the longest suffix of the text that begins some stop string."""
        return self.depth[self.state]


class Detokenizer:
    """Feed token ids with `add`; it returns text that is safe to show. `text` is the full output
    so far (stop string excluded once found); the deltas returned always concatenate to it."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stop: list[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special_tokens
        # Decoded together: ids[prefix_offset:read_offset] are context, their text already taken; the
        # ids after read_offset are pending. `unfinished` (0 or 1): the context's text ends in a character
        # not taken yet (still incomplete when the window last moved on).
        self.ids = list(prompt[-CONTEXT_TOKENS:])
        self.prefix_offset, self.read_offset, self.unfinished = 0, len(self.ids), 0
        self.stops = StopStrings(list(stop)) if stop else None
        self.released: list[str] = []  # the deltas returned so far
        self.held = ""  # decoded text not returned yet: complete characters, a possible stop string's start
        self.stopped = False  # a stop string was found; the text ends just before it

    @property
    def text(self) -> str:
        return "".join(self.released) + self.held

    def add(self, token: int) -> str:
        """Take one new token; return the text that can now be shown ("" if none yet)."""
        self.ids.append(token)
        self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The end of the output: release everything still held back (an incomplete byte sequence
        at the very end decodes to U+FFFD, a whole character)."""
        if not self.stopped:
            self._decode_new(final=True)
        return self._release(final=True)

    def _decode_new(self, final: bool) -> None:
        """Take the text the pending tokens add, once it ends in a complete character (or `final`)."""
        decode, skip = self.tokenizer.decode, self.skip_special
        before = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=skip)
        after = decode(self.ids[self.prefix_offset:], skip_special_tokens=skip)
        # max(..., 0): the context may have no text left (zero-byte tokens, e.g. skipped special ones)
        new = after[max(len(before) - self.unfinished, 0):]
        incomplete = after.endswith("\ufffd")
        if final or (new and not incomplete):
            self._append(new)
            self.unfinished = 0
        elif len(self.ids) - self.read_offset >= MAX_PENDING_TOKENS:
            # Stuck: take all but the last character, which may still complete. Its bytes are in the pending
            # tokens, which become the context, so the next window's context text ends with it.
            self.unfinished = int(incomplete and new != "")
            self._append(new[:len(new) - self.unfinished])
        else:
            return
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _append(self, piece: str) -> None:
        if self.stopped:
            return
        if self.stops is not None:
            for i, char in enumerate(piece):
                if found := self.stops.feed(char):  # the earliest end; the longest string ending there
                    self.held = (self.held + piece[:i + 1])[:-found]
                    self.stopped = True
                    return
        self.held += piece

    def _release(self, final: bool) -> str:
        keep = 0 if final or self.stopped or self.stops is None else self.stops.partial
        delta, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        if delta:
            self.released.append(delta)
        return delta
