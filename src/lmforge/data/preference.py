"""Preference data for DPO-family and KTO training.

Pairs (one prompt, a chosen and a rejected completion), from JSONL/Parquet records of either shape:
    {"chosen": [messages...], "rejected": [messages...]}       MiniMind / TRL, prompt shared implicitly:
                                                                the longest common leading messages
    {"prompt": str or [messages], "chosen": str or [messages], "rejected": str or [messages]}
Unpaired, for KTO: {"prompt": ..., "completion": ..., "label": true|false} (desirable or not).

Tokenized, each completion gets labels on its own assistant tokens only (the prompt's earlier assistant
turns, if any, are context). A pair batch holds `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`,
`rejected_labels`, all padded to one length so that chosen and rejected can run as one batch of 2B.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmforge.data.formats import DataStats, Record, check_messages, read_with
from lmforge.data.sft import IGNORE_INDEX, keep_last_runs, labels_from_mask, pad
from lmforge.tokenizer import Tokenizer


@dataclass
class PreferencePair:
    prompt: list[dict]
    chosen: list[dict]  # the completion's messages only
    rejected: list[dict]


@dataclass
class KTOSample:
    prompt: list[dict]
    completion: list[dict]
    label: bool  # True: a desirable completion


def _messages(record: Record, key: str, role: str) -> list[dict]:
    value = record.get(key, (str, list))
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(record, value, key)


def _check_completion(record: Record, messages: list[dict], key: str) -> None:
    if not messages or messages[-1]["role"] != "assistant":
        raise record.error(f"'{key}' should end with an assistant reply after the prompt")


def to_pair(record: Record) -> PreferencePair:
    """A preference pair from one record of either shape (see the module docstring)."""
    if "prompt" in record.data:
        prompt = _messages(record, "prompt", "user")
        chosen = _messages(record, "chosen", "assistant")
        rejected = _messages(record, "rejected", "assistant")
    else:
        full_chosen = _messages(record, "chosen", "assistant")
        full_rejected = _messages(record, "rejected", "assistant")
        shared = 0
        while (shared < min(len(full_chosen), len(full_rejected)) - 1
               and full_chosen[shared] == full_rejected[shared]):
            shared += 1
        if shared == 0:
            raise record.error("'chosen' and 'rejected' share no prompt messages")
        prompt, chosen, rejected = full_chosen[:shared], full_chosen[shared:], full_rejected[shared:]
    _check_completion(record, chosen, "chosen")
    _check_completion(record, rejected, "rejected")
    return PreferencePair(prompt, chosen, rejected)


def to_kto(record: Record) -> KTOSample:
    prompt = _messages(record, "prompt", "user")
    completion = _messages(record, "completion", "assistant")
    _check_completion(record, completion, "completion")
    return KTOSample(prompt, completion, record.get("label", bool))


def read_pairs(files, skip_bad: bool = False, stats: DataStats | None = None) -> Iterator[PreferencePair]:
    return read_with(files, to_pair, skip_bad, stats)


def read_kto(files, skip_bad: bool = False, stats: DataStats | None = None) -> Iterator[KTOSample]:
    return read_with(files, to_kto, skip_bad, stats)


def tokenize_completion(tokenizer: Tokenizer, prompt: list[dict], completion: list[dict],
                        max_len: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of prompt + completion, with labels on the completion's assistant replies.
    Cut to `max_len`; None if nothing of the completion is left to score."""
    ids, mask = tokenizer.encode_chat(prompt + completion)
    mask = keep_last_runs(mask, sum(m["role"] == "assistant" for m in completion))
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask):
        return None
    return ids, labels_from_mask(ids, mask)


def tokenize_pair(tokenizer: Tokenizer, pair: PreferencePair, max_len: int) -> dict[str, list[int]] | None:
    chosen = tokenize_completion(tokenizer, pair.prompt, pair.chosen, max_len)
    rejected = tokenize_completion(tokenizer, pair.prompt, pair.rejected, max_len)
    if chosen is None or rejected is None:
        return None
    return {"chosen_input_ids": chosen[0], "chosen_labels": chosen[1],
            "rejected_input_ids": rejected[0], "rejected_labels": rejected[1]}


def collate_pairs(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded pair batch; chosen and rejected share one length so they can be concatenated."""
    length = max(len(item[key]) for item in items for key in ("chosen_input_ids", "rejected_input_ids"))
    batch = {}
    for side in ("chosen", "rejected"):
        batch[f"{side}_input_ids"] = pad([item[f"{side}_input_ids"] for item in items], pad_id, length)
        batch[f"{side}_labels"] = pad([item[f"{side}_labels"] for item in items], IGNORE_INDEX, length)
    return batch


def collate_kto(samples: list[KTOSample], tokenizer: Tokenizer, max_len: int) -> dict[str, torch.Tensor]:
    """KTO batch: input_ids, labels and `kto_label` (1 desirable, 0 undesirable). Samples cut so far that
    no completion token is left are left out."""
    rows, labels = [], []
    for sample in samples:
        tokenized = tokenize_completion(tokenizer, sample.prompt, sample.completion, max_len)
        if tokenized is not None:
            rows.append(tokenized)
            labels.append(int(sample.label))
    if not rows:
        raise ValueError(f"no sample of this batch has completion tokens within max_len={max_len}")
    return {"input_ids": pad([r[0] for r in rows], tokenizer.pad_id), "labels": pad([r[1] for r in rows], IGNORE_INDEX),
            "kto_label": torch.tensor(labels, dtype=torch.long)}
