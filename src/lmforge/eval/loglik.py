"""Scoring by log-likelihood: lm-evaluation-harness's `loglikelihood`, bits per byte, multiple choice, a cloze.

Every number here is a sum of log-probabilities of given tokens, computed the way lm-evaluation-harness's
Hugging Face model (`lm_eval.models.huggingface.HFLM`) computes it, so that the same model gives the same
numbers in both:

- `loglikelihoods(pairs)`: log p(continuation | context) and whether the continuation is the greedy one.
  Tokenised as lm-eval's `TemplateLM.loglikelihood` does for a causal model: trailing spaces of the context
  move to the continuation, context + continuation is encoded whole (the tokenizer's special tokens added,
  Llama's BOS say) and the continuation is what follows the context's own tokens; an empty context is the
  BOS token (EOS when there is none). The input is left-truncated to the model's length: the last
  max_length + 1 tokens, minus the last (HFLM's "CTX|CONT" diagram).
- `rolling_loglikelihoods(texts)`: lm-eval's `loglikelihood_rolling`, for perplexity: the text's tokens in
  disjoint windows of max_length predicted tokens, the first conditioned on BOS/EOS, each later one on the
  token before it (the last, shorter one on as many earlier tokens as fit); `rolling_windows` are exactly
  lm-eval's `get_rolling_token_windows(context_len=1)` made disjoint.
- `bits_per_byte(source)`: those windows over a text file, a prepared data directory's split, or
  `builtin:shakespeare` (the stretches of the built-in corpus that `prepare` holds out for validation).
- `multiple_choice(items)`: acc and acc_norm as lm-eval's `multiple_choice` output type defines them (one
  request (prompt, " " + choice) per choice; acc_norm divides by the choice's length in characters).
- `shakespeare_cloze()`: a built-in multiple-choice task from the held-out text: which word ends the line.

Batches are right-padded: in a causal model a real token never attends to the padding after it.
"""

from __future__ import annotations

import bisect
import functools
import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.formats import DataError, TextPiece, iter_text_pieces, read_records, resolve_files
from lmforge.data.pretrain import MIN_PIECE_BYTES, Manifest, is_held_out_piece
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer

QA_TEMPLATE = "Question: {question}\nAnswer:"  # lm-eval's ARC / MMLU-style doc_to_text
BUILTIN_VAL_FRACTION = 0.05  # the validation share `lmforge quickstart` prepares the built-in corpus with
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ---------------------------------------------------------------------------------------------------
# Token-level scoring


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the model's mode is restored after."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)


def score_tokens(model: Transformer, requests: list[tuple[list[int], list[int]]], *, max_length: int | None = None,
                 batch_size: int = 16) -> list[tuple[float, bool]]:
    """(sum of log p(continuation token | everything before it), is_greedy) for each (context ids,
    continuation ids): HFLM._loglikelihood_tokens. The model reads the last max_length + 1 tokens of
    context + continuation minus the last one (default max_length: the model's max_position_embeddings);
    is_greedy says every continuation token is the argmax of its logits. Longest first, so a batch pads little."""
    max_length = max_length or model.config.max_position_embeddings
    inputs = []
    for context, continuation in requests:
        if not context or not continuation:
            raise ValueError(f"score_tokens: {len(context)} context and {len(continuation)} continuation tokens; "
                             "both must be non-empty")
        if len(continuation) > max_length:
            raise ValueError(f"score_tokens: a continuation of {len(continuation)} tokens is longer than the "
                             f"model's {max_length}")
        inputs.append((context + continuation)[-(max_length + 1):][:-1])
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    device = model.output_weight.device
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = torch.zeros(len(rows), len(inputs[rows[0]]), dtype=torch.long)
            for row, i in enumerate(rows):
                batch[row, :len(inputs[i])] = torch.tensor(inputs[i])
            hidden = model(batch.to(device), return_hidden=True).hidden
            for row, i in enumerate(rows):
                target = torch.tensor(requests[i][1], device=device)
                end = len(inputs[i])
                logprobs = torch.log_softmax(model.logits(hidden[row, end - len(target):end]).float(), dim=-1)
                results[i] = (logprobs.gather(-1, target[:, None]).sum().item(),
                              bool((logprobs.argmax(-1) == target).all()))
    return results


def prefix_token_id(tokenizer: Tokenizer) -> int:
    """What an empty context and the first rolling window are conditioned on: BOS, else EOS (HFLM.prefix_token_id)."""
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """HFLM.tok_encode: the tokenizer's special tokens added (BOS), unless the text already starts with the
    prefix token's text."""
    already = text.startswith(tokenizer.decode([prefix_token_id(tokenizer)]))
    return tokenizer.encode(text, add_special_tokens=not already)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's TemplateLM.loglikelihood and _encode_pair make them for a
    causal model (see the module docstring)."""
    if context == "":
        ids = tokenizer.encode(continuation)
        if not ids:
            raise ValueError("loglikelihood: the context and the continuation are both empty")
        prefix = prefix_token_id(tokenizer)
        return ([prefix], ids) if ids[0] != prefix else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode_text(tokenizer, context + continuation)
    context_ids = encode_text(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def loglikelihoods(model: Transformer, tokenizer: Tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                   max_length: int | None = None) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood` contract: for each (context, continuation) of text, (log p(continuation |
    context) in nats, is_greedy), tokenised and truncated as HFLM does (the module docstring)."""
    requests = [encode_pair(tokenizer, context, continuation) for context, continuation in pairs]
    return score_tokens(model, requests, max_length=max_length, batch_size=batch_size)


def rolling_windows(tokens: list[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that score every token once: lm-eval's get_rolling_token_windows with
    context_len=1, then make_disjoint_window. Window k predicts tokens[k*L:(k+1)*L]; the first is conditioned
    on `prefix_id`, a later one on the tokens before it that fit in L + 1 (one, unless it is the short last)."""
    windows = []
    for start in range(0, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        context = [prefix_id] if start == 0 else tokens[max(end - max_length - 1, 0):start]
        windows.append((context, tokens[start:end]))
    return windows


def rolling_loglikelihoods(model: Transformer, tokenizer: Tokenizer, texts: list[str], batch_size: int = 16,
                           max_length: int | None = None) -> list[float]:
    """lm-eval's `loglikelihood_rolling`: each text's total log-likelihood (nats) over `rolling_windows` of
    its tokens (encoded as HFLM.tok_encode does). An empty text scores 0."""
    max_length = max_length or model.config.max_position_embeddings
    windows, owner = [], []
    for index, text in enumerate(texts):
        for window in rolling_windows(encode_text(tokenizer, text), prefix_token_id(tokenizer), max_length):
            windows.append(window)
            owner.append(index)
    totals = [0.0] * len(texts)
    for index, (ll, _) in zip(owner, score_tokens(model, windows, max_length=max_length, batch_size=batch_size)):
        totals[index] += ll
    return totals


# ---------------------------------------------------------------------------------------------------
# Bits per byte


def heldout_pieces(files, val_fraction: float = BUILTIN_VAL_FRACTION, piece_bytes: int = 1 << 16) -> list[TextPiece]:
    """The text pieces `data.pretrain.prepare(..., files, val_fraction=, piece_bytes=)` puts in its val
    split, in order: the same cut into pieces (shrunk for a small corpus as prepare shrinks it) and the same
    every-k-th choice (`is_held_out_piece`)."""
    if not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction: {val_fraction} should be in (0, 0.5]")
    files = resolve_files(files)
    total = sum(f.stat().st_size for f in files)
    piece_bytes = min(piece_bytes, max(MIN_PIECE_BYTES, int(total * val_fraction)))
    pieces = iter_text_pieces(files, piece_bytes=piece_bytes)
    return [piece for index, piece in enumerate(pieces) if is_held_out_piece(index, val_fraction)]


@functools.lru_cache(maxsize=4)
def _builtin_heldout(val_fraction: float) -> tuple[TextPiece, ...]:
    return tuple(heldout_pieces("builtin:shakespeare", val_fraction))


def builtin_heldout_tokens(tokenizer: Tokenizer, max_bytes: int | None = None,
                           val_fraction: float = BUILTIN_VAL_FRACTION) -> tuple[list[int], int]:
    """The built-in corpus's held-out text (what `prepare` holds out) as `prepare` tokenizes it, cut to the first
    `max_bytes` bytes; and that text's byte count. What `shakespeare-bpb` scores, and the benchmarks too."""
    return _pieces_tokens(tokenizer, _builtin_heldout(val_fraction), max_bytes)


def _pieces_tokens(tokenizer: Tokenizer, pieces, max_bytes: int | None) -> tuple[list[int], int]:
    """The token stream prepare writes for these pieces (each encoded alone, EOS after a document's last), cut
    to the first `max_bytes` bytes of text; and that text's UTF-8 byte count."""
    tokens, count = [], 0
    for piece in pieces:
        text = piece.text
        if max_bytes is not None and count + len(text.encode("utf-8")) > max_bytes:
            text = text.encode("utf-8")[:max_bytes - count].decode("utf-8", errors="ignore")
        tokens += tokenizer.encode(text) + ([tokenizer.eos_id] if piece.ends_document and text == piece.text else [])
        count += len(text.encode("utf-8"))
        if max_bytes is not None and count >= max_bytes:
            break
    return tokens, count


def _split_tokens(tokenizer: Tokenizer, data_dir: Path, split: str, max_bytes: int | None) -> tuple[list[int], int]:
    """A prepared split's token stream (every shard in order) and its UTF-8 bytes, special tokens counting as
    none (as the pretraining validation counts them); with max_bytes, the longest start of it within that."""
    manifest = Manifest.load(data_dir)
    if split not in ("train", "val"):
        raise ValueError(f"split: {split!r} should be train or val")
    manifest.check_shards(data_dir, split)
    # Every token but the EOS between documents is at least one byte: 2 * max_bytes + 1 tokens are enough.
    limit = -1 if max_bytes is None else 2 * max_bytes + 1
    tokens: list[int] = []
    for name in getattr(manifest, split).shards:
        if len(tokens) != limit:
            count = -1 if max_bytes is None else limit - len(tokens)
            tokens += np.fromfile(data_dir / name, dtype=manifest.dtype, count=count).tolist()
    if not tokens:
        raise DataError(data_dir, None, f"the {split} split holds no tokens")

    def byte_count(n: int) -> int:
        return len(tokenizer.decode(tokens[:n], skip_special_tokens=True).encode("utf-8"))

    if max_bytes is not None:
        tokens = tokens[:bisect.bisect_right(range(len(tokens) + 1), max_bytes, key=byte_count) - 1]
    return tokens, byte_count(len(tokens))


def bits_per_byte(model: Transformer, tokenizer: Tokenizer, source: str | Path, *, split: str = "val",
                  seq_len: int | None = None, max_bytes: int | None = None, batch_size: int = 8,
                  val_fraction: float = BUILTIN_VAL_FRACTION) -> dict:
    """Bits per UTF-8 byte and per-token perplexity of `source` under the model:

    - a text file: one document, tokenised and windowed as lm-eval's `loglikelihood_rolling` does, so the
      number equals lm-eval's `bits_per_byte` of a task holding that text;
    - a data directory from `lmforge prepare`: its `split`'s token stream, EOS between documents;
    - `builtin:shakespeare`: the held-out stretches `prepare` takes from the built-in corpus at
      `val_fraction` (default: the quickstart's), as the stream prepare writes for them.

    Windows (`rolling_windows`) are disjoint, seq_len tokens each (default: the model's length, as lm-eval):
    each token is predicted once, given the tokens before it in its window (the first window: BOS/EOS). A
    pretraining run's validation windows have the same shape, one token later (it never predicts the first
    token) and only its first eval_batches of them. Give a model trained on shorter windows than its
    max_position_embeddings its training seq_len: RoPE past the trained length costs (a tiny model trained
    at 256: 2.10 bits per byte at seq_len 256, 2.31 at its 2048). bits_per_byte = total NLL / ln 2 / bytes,
    special tokens (the EOS) counting as no bytes; perplexity = exp(total NLL / tokens). `max_bytes`: score
    only the first that many bytes of text.
    """
    path = Path(source)
    if str(source) == "builtin:shakespeare":
        tokens, n_bytes = builtin_heldout_tokens(tokenizer, max_bytes, val_fraction)
    elif path.is_dir():
        tokens, n_bytes = _split_tokens(tokenizer, path, split, max_bytes)
    elif path.is_file():
        with open(path, "rb") as f:
            raw = f.read(-1 if max_bytes is None else max_bytes)
        try:  # a character cut by max_bytes is dropped
            text = raw.decode("utf-8", errors="strict" if max_bytes is None else "ignore")
        except UnicodeDecodeError as e:
            raise DataError(path, None, f"not UTF-8 text (byte {e.start})") from None
        tokens, n_bytes = encode_text(tokenizer, text), len(text.encode("utf-8"))
    else:
        raise FileNotFoundError(f"bits_per_byte: {source} is neither a text file, a prepared data directory "
                                "nor builtin:shakespeare")
    if not tokens or not n_bytes:
        raise ValueError(f"bits_per_byte: {source} holds no text to score")
    seq_len = seq_len or model.config.max_position_embeddings
    windows = rolling_windows(tokens, prefix_token_id(tokenizer), seq_len)
    nll = -sum(ll for ll, _ in score_tokens(model, windows, max_length=seq_len, batch_size=batch_size))
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "perplexity": math.exp(nll / len(tokens)),
            "tokens": len(tokens), "bytes": n_bytes, "windows": len(windows), "seq_len": seq_len}


# ---------------------------------------------------------------------------------------------------
# Multiple choice


@dataclass
class MultipleChoiceItem:
    """A question, its choices and the index of the right one. `template`: how the question is put to the model
    when the item's task has a format of its own (HellaSwag's and the cloze's context is the prompt itself:
    "{question}"); None: `multiple_choice`'s template."""

    question: str
    choices: list[str]
    answer: int
    template: str | None = None

    def __post_init__(self):
        if not isinstance(self.question, str):
            raise ValueError(f"field 'question' should be a string, got {type(self.question).__name__}")
        if not isinstance(self.choices, list) or len(self.choices) < 2:
            raise ValueError("field 'choices' should be a list of at least 2 choices")
        for i, choice in enumerate(self.choices):
            if not isinstance(choice, str) or not choice:
                raise ValueError(f"field 'choices': choice {i} should be a non-empty string, got {choice!r:.40}")
        index = isinstance(self.answer, int) and not isinstance(self.answer, bool)
        if not index or not 0 <= self.answer < len(self.choices):
            raise ValueError(f"field 'answer': {self.answer!r:.40} is not a choice index (0-{len(self.choices) - 1})")


def _answer_index(value, choices: list[str], labels: list[str] | None) -> int:
    """An answer given as an index, a label ("B", or the record's own labels: ARC's "1".."4"), a digit string
    (HellaSwag's "3") or the text of a choice."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        labels = labels or list(LABELS[:len(choices)])
        if value.strip() in labels:
            return labels.index(value.strip())
        if value.strip().isdigit():
            return int(value.strip())
        if value in choices:
            return choices.index(value)
    raise ValueError(f"field 'answer': {value!r:.60} is neither a choice index, a label nor the text of a choice")


def _item(data: dict) -> MultipleChoiceItem:
    """One record in any accepted layout (see read_multiple_choice)."""
    template = labels = None
    question, choices = data.get("question"), data.get("choices")
    answer = next((data[k] for k in ("answer", "answerKey", "label") if data.get(k) is not None), None)
    if isinstance(question, dict):  # ARC's original JSONL: {"question": {"stem", "choices": [{label, text}]}}
        question, choices = question.get("stem"), question.get("choices")
    elif question is None and "ctx" in data:  # HellaSwag: the context is the prompt, the endings the choices
        question, choices, template = data["ctx"], data.get("endings"), "{question}"
    if isinstance(choices, dict):  # ARC on the Hub: {"text": [...], "label": [...]}
        choices, labels = choices.get("text"), choices.get("label")
    elif isinstance(choices, list) and choices and all(isinstance(c, dict) for c in choices):
        choices, labels = [c.get("text") for c in choices], [str(c.get("label")) for c in choices]
    for name, value in (("question", question), ("choices", choices), ("answer", answer)):
        if value is None:
            raise ValueError(f"missing field '{name}'")
    if not isinstance(choices, list):
        raise ValueError(f"field 'choices' should be a list, got {type(choices).__name__}")
    return MultipleChoiceItem(question, choices, _answer_index(answer, choices, labels), template)


def read_multiple_choice(path: str | Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    """Multiple-choice items from JSONL (or Parquet), one per record, in any of these layouts:

        {"question": str, "choices": [str, ...], "answer": 1 | "B" | "the text of a choice"}   (MMLU)
        {"question": {"stem": str, "choices": [{"label": "A", "text": str}, ...]}, "answerKey": "A"}   (ARC)
        {"question": str, "choices": {"text": [...], "label": [...]}, "answerKey": "A"}   (ARC on the Hub)
        {"ctx": str, "endings": [str, ...], "label": 0 | "0"}   (HellaSwag: the context is the whole prompt)

    A bad record raises DataError naming the file, the line and the field. `limit`: the first that many."""
    items = []
    for record in read_records(path, limit):
        try:
            items.append(_item(record.data))
        except ValueError as e:
            raise record.error(str(e)) from None
    return items


def _argmax(values: list[float]) -> int:
    """The index of the largest value, the first on a tie (as np.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def multiple_choice(model: Transformer, tokenizer: Tokenizer, items: list[MultipleChoiceItem], *,
                    template: str | None = None, batch_size: int = 16) -> dict:
    """Score each choice as lm-eval's multiple_choice output type does: the request (prompt, " " + choice)
    (" ": its default target_delimiter), prompt = template.format(question=...) with the item's own
    template, else `template`, else "Question: {question}\\nAnswer:". Per item (lm-eval's api/task.py,
    process_results): pred = argmax of the log-likelihoods, pred_norm = argmax of log-likelihood /
    len(choice) (characters of the choice, without the " "), the first index on a tie.

    metrics: acc and acc_norm (means of pred == answer and pred_norm == answer), chance = the mean of
    1/len(choices), acc_chance_corrected = (acc - chance) / (1 - chance): 0 for guessing, 1 for all right;
    n. samples: per item its question, choices, loglikelihoods, pred, pred_norm and answer."""
    pairs = [((item.template or template or QA_TEMPLATE).format(question=item.question), " " + choice)
             for item in items for choice in item.choices]
    scores = iter(loglikelihoods(model, tokenizer, pairs, batch_size=batch_size))
    samples = []
    for item in items:
        lls = [next(scores)[0] for _ in item.choices]
        samples.append({"question": item.question, "choices": item.choices, "loglikelihoods": lls,
                        "pred": _argmax(lls), "pred_norm": _argmax([ll / len(c) for ll, c in zip(lls, item.choices)]),
                        "answer": item.answer})
    n = len(items)
    acc = sum(s["pred"] == s["answer"] for s in samples) / max(n, 1)
    chance = sum(1 / len(item.choices) for item in items) / max(n, 1)
    metrics = {"acc": acc, "acc_norm": sum(s["pred_norm"] == s["answer"] for s in samples) / max(n, 1),
               "acc_chance_corrected": (acc - chance) / (1 - chance) if n else 0.0, "chance": chance, "n": n}
    return {"metrics": metrics, "samples": samples}


# ---------------------------------------------------------------------------------------------------
# The built-in cloze


def _is_verse(line: str) -> bool:
    """A line of a speech: not blank, not a speaker's name (no lowercase: "ROMEO."), not a stage direction."""
    return 20 <= len(line) <= 80 and any(c.islower() for c in line) and line[0] not in "[_"


def shakespeare_cloze(n: int = 200, seed: int = 0, *, val_fraction: float = BUILTIN_VAL_FRACTION
                      ) -> list[MultipleChoiceItem]:
    """`n` items of "which word ends the line", LAMBADA-style, from the built-in corpus's held-out stretches
    (`heldout_pieces` at `val_fraction`: the text pretraining validates on, never trained on). The question
    is two lines of a speech and the next line less its last word; the choices are that word and 3 last
    words of other held-out lines, all four of one length in characters (so neither a choice's length nor
    its token count gives the answer away, and acc_norm ranks as acc does); all seeded.

    Why a word and not the whole next line: with lines as choices, each line's own likelihood (how common
    its words are) swamps what the context says about it. On 150 items, tiny models pretrained on the
    corpus (validation 2.09 bits per byte) picked the right line 22% of the time, a random-init one 22%;
    on these last words the pretrained one is right 40% of the time, the random-init one 24% (chance 25%)."""
    rng = random.Random(seed)
    lines = [line.strip() for piece in _builtin_heldout(val_fraction) for line in piece.text.split("\n")]
    starts = [i for i in range(len(lines) - 2) if all(_is_verse(line) for line in lines[i:i + 3])]
    by_length: dict[int, set[str]] = {}
    for line in lines:
        if _is_verse(line):
            by_length.setdefault(len(line.split()[-1]), set()).add(line.split()[-1])
    same_length = {length: sorted(words) for length, words in by_length.items()}
    rng.shuffle(starts)
    items = []
    for start in starts:
        head, last = lines[start + 2].rsplit(maxsplit=1)
        if len(same_length[len(last)]) < 4:
            continue
        choices = [last, *rng.sample([w for w in same_length[len(last)] if w != last], 3)]
        rng.shuffle(choices)
        question = "\n".join([*lines[start:start + 2], head])
        items.append(MultipleChoiceItem(question, choices, choices.index(last), template="{question}"))
        if len(items) == n:
            return items
    raise ValueError(f"shakespeare_cloze: the held-out text makes {len(items)} items, fewer than n={n}")
