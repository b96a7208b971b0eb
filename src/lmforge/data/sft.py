"""Supervised fine-tuning samples: conversations -> token ids with labels -> padded or packed batches.

A sample is the chat rendered by the tokenizer's chat template, with `labels` equal to `input_ids` on
the assistant's replies (their end token included) and -100 elsewhere, so that the loss only teaches
the model to answer, never to write the user's side. Labels are aligned with `input_ids`, as in
Hugging Face: the loss compares the logits at position t with `labels[t + 1]`.

Batches are dicts of LongTensors:
    padded  input_ids, labels                              [B, longest sample], padded on the right
    packed  input_ids, labels, position_ids, document_ids  [B, max_len]
Packing puts several samples in one row (no compute wasted on padding). `position_ids` restart at 0 in
each sample and `document_ids` number the samples within the row (-1 on padding): attention masked to
equal document ids (and causal) keeps each sample to itself, as if it were alone in its row.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import jinja2
import torch

from lmforge.data.formats import DataStats, Record, chat_converter, read_with
from lmforge.tokenizer import Tokenizer

IGNORE_INDEX = -100  # the label of positions without loss (torch.nn.functional.cross_entropy's default)


@dataclass
class SFTSample:
    input_ids: list[int]
    labels: list[int]


@dataclass
class SFTStats(DataStats):
    """Reading stats plus what tokenization did: samples cut to max_len, and samples dropped because the
    cut left no assistant token to learn from."""

    truncated: int = 0
    dropped: int = 0

    def counts(self) -> str:
        return f"{super().counts()}, {self.truncated} truncated to max_len, {self.dropped} dropped (no reply left)"


def keep_last_runs(mask: list[int], runs: int) -> list[int]:
    """Zero all but the last `runs` stretches of ones in `mask`: each stretch is one assistant reply."""
    out = list(mask)
    seen = 0
    position = len(out) - 1
    while position >= 0:
        if out[position] and (position + 1 == len(out) or not out[position + 1]):
            seen += 1  # the end of a stretch, counting from the back
        if seen > runs:
            out[position] = 0
        position -= 1
    return out


def labels_from_mask(ids: list[int], mask: list[int]) -> list[int]:
    return [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask)]


def tokenize_conversation(tokenizer: Tokenizer, messages: list[dict], max_len: int,
                          loss_on: Literal["all", "last"] = "all", tools: list[dict] | None = None,
                          ) -> tuple[SFTSample | None, bool]:
    """(sample, truncated). `loss_on="last"` trains on the final assistant reply only. Samples longer
    than `max_len` keep their first `max_len` tokens (the text is cut to what they can use before it is
    tokenized: a huge conversation costs what its beginning does); the sample is None if no reply token
    is left."""
    ids, mask = tokenizer.encode_chat(messages, tools=tools, max_tokens=max_len + 1)
    if loss_on == "last":
        mask = keep_last_runs(mask, 1)
    elif loss_on != "all":
        raise ValueError(f"loss_on must be 'all' or 'last', got {loss_on!r}")
    truncated = len(ids) > max_len
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask):
        return None, truncated
    return SFTSample(ids, labels_from_mask(ids, mask)), truncated


@dataclass
class SFTDataset:
    """Tokenized SFT samples from chat files (JSONL/Parquet, globs; see data.formats), read lazily.

    Iterate it once per epoch; `stats` then says how many records were read, skipped, truncated, dropped.
    A record the chat template refuses (roles out of order, ...) is a DataError naming its file and line,
    skipped and counted with `skip_bad` like any other bad record.
    """

    files: list[str] | str
    tokenizer: Tokenizer
    max_len: int = 1024
    format: str = "auto"
    loss_on: Literal["all", "last"] = "all"
    skip_bad: bool = False
    stats: SFTStats = field(default_factory=SFTStats)

    def __iter__(self) -> Iterator[SFTSample]:
        self.stats = SFTStats()
        conversation = chat_converter(self.format)

        def tokenized(record: Record) -> tuple[SFTSample | None, bool]:
            messages = conversation(record)
            try:
                return tokenize_conversation(self.tokenizer, messages, self.max_len, self.loss_on)
            except jinja2.TemplateError as e:  # the template's raise_exception, or what it cannot render
                raise record.error(f"the chat template cannot render this conversation: {e}") from None

        for sample, truncated in read_with(self.files, tokenized, self.skip_bad, self.stats):
            self.stats.truncated += truncated
            if sample is None:
                self.stats.dropped += 1
                continue
            yield sample


def shuffled(items: Iterable, buffer_size: int, seed: int) -> Iterator:
    """Items in a seeded random order, holding at most `buffer_size` of them (a streaming shuffle; a
    buffer as large as the data set gives a full shuffle)."""
    rng = random.Random(seed)
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def pad(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """Right-pad lists of ints to one length (the longest, or `length`) as a LongTensor."""
    length = length or max(map(len, rows))
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def collate(samples: list[SFTSample], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded batch: input_ids (pad_id on padding) and labels (-100 on padding)."""
    return {"input_ids": pad([s.input_ids for s in samples], pad_id),
            "labels": pad([s.labels for s in samples], IGNORE_INDEX)}


def pack(samples: Iterable[SFTSample], max_len: int) -> Iterator[list[SFTSample]]:
    """Group samples, in order, into rows of at most `max_len` tokens (a row closes when the next sample
    does not fit; samples are never split)."""
    row, length = [], 0
    for sample in samples:
        if len(sample.input_ids) > max_len:
            raise ValueError(f"a sample of {len(sample.input_ids)} tokens does not fit in max_len={max_len}")
        if length + len(sample.input_ids) > max_len:
            yield row
            row, length = [], 0
        row.append(sample)
        length += len(sample.input_ids)
    if row:
        yield row


def collate_packed(rows: list[list[SFTSample]], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """A packed batch of [len(rows), max_len]: see the module docstring."""
    input_ids, labels, positions, documents = [], [], [], []
    for row in rows:
        ids, lab, pos, doc = [], [], [], []
        for index, sample in enumerate(row):
            ids += sample.input_ids
            # The first token of a sample is never a target: it would be predicted from the previous sample.
            lab += [IGNORE_INDEX] + sample.labels[1:]
            pos += range(len(sample.input_ids))
            doc += [index] * len(sample.input_ids)
        input_ids.append(ids)
        labels.append(lab)
        positions.append(pos)
        documents.append(doc)
    return {"input_ids": pad(input_ids, pad_id, max_len), "labels": pad(labels, IGNORE_INDEX, max_len),
            "position_ids": pad(positions, 0, max_len), "document_ids": pad(documents, -1, max_len)}


def sft_batches(samples: Iterable[SFTSample], batch_size: int, pad_id: int, packed: bool = False,
                max_len: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `batch_size` samples (padded) or of `batch_size` rows of `max_len` tokens (packed).
    The last batch may be smaller."""
    if packed and not max_len:
        raise ValueError("packing needs max_len")
    groups = pack(samples, max_len) if packed else iter(samples)
    while batch := [g for _, g in zip(range(batch_size), groups)]:
        yield collate_packed(batch, pad_id, max_len) if packed else collate(batch, pad_id)
