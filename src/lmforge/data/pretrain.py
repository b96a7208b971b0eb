"""Pretraining data: text files -> token shards on disk -> (input, target) batches for the Trainer.

`lmforge prepare --tokenizer DIR --data FILES... --out DIR` writes, nanoGPT style, flat binary shards
of token ids (uint16 when the vocabulary fits, else uint32) that are memory-mapped when read:

    DIR/train_00000.bin ...   every document followed by the end-of-text token
    DIR/val_00000.bin         held-out pieces (every k-th piece, k = 1 / val_fraction)
    DIR/manifest.json         dtype, token and document counts, tokenizer hash, source files

Encoding runs in worker processes (`--workers`, default 2) while the main process reads the files and
writes the shards in order, so the output does not depend on the number of workers. Everything is
written to a temporary directory beside `--out` and renamed at the end: a failure leaves nothing
half-written in `--out`.

`PretrainLoader` reads the shards back as windows of `seq_len + 1` tokens: sequentially or shuffled
(seeded, a new order each epoch), each rank of a distributed job taking its own disjoint share, and
resumable: `state_dict()` after a batch and `load_state_dict()` in a new loader give the same next batch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmforge.data.formats import DataError, DataStats, TextPiece, iter_text_pieces, resolve_files
from lmforge.files import recover_directory, replace_directory, temporary_beside
from lmforge.settings import parse_args
from lmforge.tokenizer import Tokenizer

MANIFEST = "manifest.json"
MIN_PIECE_BYTES = 32  # the smallest piece a small corpus is cut into for its validation split: about a line


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


# ---------------------------------------------------------------------------------------------------
# Encoding in worker processes

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str, single_thread: bool) -> None:
    global _worker_tokenizer
    if single_thread:  # in a worker process: `--workers` then says how many cores encoding uses
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.from_dir(tokenizer_dir)


def _encode_pieces(pieces: list[TextPiece]) -> list[tuple[np.ndarray, TextPiece]]:
    tokenizer = _worker_tokenizer
    dtype = token_dtype(tokenizer.vocab_size)
    eos = [tokenizer.eos_id]
    encoded = tokenizer.encode_batch([p.text for p in pieces])
    # The text is not sent back: the main process only needs the tokens and the piece's bookkeeping.
    return [(np.asarray(ids + eos if piece.ends_document else ids, dtype=dtype),
             TextPiece("", piece.nbytes, piece.ends_document)) for piece, ids in zip(pieces, encoded)]


def _jobs(pieces: Iterator[TextPiece], job_bytes: int = 1 << 18) -> Iterator[list[TextPiece]]:
    # About 256 KB of text per job: big enough that sending it to a worker costs little, small enough
    # that the workers share the work evenly, the progress bar moves and memory stays bounded.
    job, size = [], 0
    for piece in pieces:
        job.append(piece)
        size += piece.nbytes
        if size >= job_bytes:
            yield job
            job, size = [], 0
    if job:
        yield job


def _encode_in_order(jobs: Iterator[list[TextPiece]], pool, workers: int) -> Iterator[list]:
    """Encoded jobs in input order, at most two per worker in flight (Pool.imap would read the whole
    input ahead into memory)."""
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(_encode_pieces, (job,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---------------------------------------------------------------------------------------------------
# Writing shards


@dataclass
class Split:
    """The shards of one split, as recorded in the manifest."""

    shards: list[str] = field(default_factory=list)
    shard_tokens: list[int] = field(default_factory=list)
    tokens: int = 0
    documents: int = 0


class _ShardWriter:
    def __init__(self, out: Path, name: str, max_tokens: int):
        self.out, self.name, self.max_tokens = out, name, max_tokens
        self.split = Split()
        self.file = None

    def write(self, tokens: np.ndarray, ends_document: bool) -> None:
        while len(tokens):
            if self.file is None or self.split.shard_tokens[-1] >= self.max_tokens:
                self._next_shard()
            room = self.max_tokens - self.split.shard_tokens[-1]
            chunk, tokens = tokens[:room], tokens[room:]
            self.file.write(chunk.tobytes())
            self.split.shard_tokens[-1] += len(chunk)
            self.split.tokens += len(chunk)
        self.split.documents += ends_document

    def _next_shard(self) -> None:
        self.close()
        self.split.shards.append(f"{self.name}_{len(self.split.shards):05d}.bin")
        self.split.shard_tokens.append(0)
        self.file = open(self.out / self.split.shards[-1], "wb")  # noqa: SIM115 (open across many writes)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclass
class Manifest:
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer: str
    tokenizer_sha256: str
    sources: list[dict]
    train: Split
    val: Split
    val_fraction: float
    bytes: int
    skipped: int
    seconds: float

    @classmethod
    def load(cls, data_dir: str | Path) -> Manifest:
        """Read and check DIR/manifest.json: every field of the right type, the shards plain file names of
        DIR; `check_shards` then checks the files. Raises DataError naming the file and the field."""
        path = Path(data_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{data_dir}: no {MANIFEST}; create it with `lmforge prepare`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(path, None, f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DataError(path, None, "expected a JSON object")
        names = {f.name for f in fields(cls)}
        if names - set(data):
            raise DataError(path, None, f"missing field '{sorted(names - set(data))[0]}'")
        if data["dtype"] not in ("uint16", "uint32"):
            raise DataError(path, None, f"field 'dtype': {data['dtype']!r:.40} is not uint16 or uint32")
        for key in ("vocab_size", "eos_id"):
            if not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0:
                raise DataError(path, None, f"field '{key}': {data[key]!r:.40} is not a non-negative integer")
        for split in ("train", "val"):
            data[split] = _split(data[split], f"{split}", path)
        return cls(**{k: v for k, v in data.items() if k in names})

    def check_shards(self, data_dir: str | Path, split: str) -> None:
        """Each shard of `split` is there, holding exactly the tokens the manifest says (an empty, cut or
        odd-sized file is named)."""
        itemsize = np.dtype(self.dtype).itemsize
        for name, count in zip(getattr(self, split).shards, getattr(self, split).shard_tokens):
            file = Path(data_dir) / name
            if not file.is_file():
                raise DataError(file, None, f"missing (listed in {MANIFEST})")
            if file.stat().st_size != count * itemsize:
                raise DataError(file, None, f"{file.stat().st_size} bytes, but {MANIFEST} says {count} tokens "
                                            f"of {itemsize} bytes (cut short or not this data set's)")


def _split(value, key: str, path: Path) -> Split:
    """A split of the manifest, checked: shard names are plain file names, one token count per shard."""
    if not isinstance(value, dict):
        raise DataError(path, None, f"field '{key}' should be an object")
    try:
        split = Split(**value)
    except TypeError as e:
        raise DataError(path, None, f"field '{key}': {e}") from None
    shards_ok = isinstance(split.shards, list) and all(
        isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..") for n in split.shards)
    counts_ok = isinstance(split.shard_tokens, list) and len(split.shard_tokens) == len(split.shards or []) and all(
        isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in split.shard_tokens)
    if not shards_ok:
        raise DataError(path, None, f"field '{key}.shards' should list file names in the data directory")
    if not counts_ok:
        raise DataError(path, None, f"field '{key}.shard_tokens' should give a token count per shard")
    return split


def is_held_out_piece(index: int, val_fraction: float) -> bool:
    # Piece i is held out when the rounded running count of held-out pieces, round((i+1) * f), steps up:
    # a fraction f of the pieces, spread evenly over the corpus rather than all taken from its end, and
    # the first one already at piece 1/(2f) so that small corpora get a validation split too.
    return int((index + 1) * val_fraction + 0.5) > int(index * val_fraction + 0.5)


def prepare(tokenizer_dir: str | Path, data, out_dir: str | Path, text_field: str = "text",
            val_fraction: float = 0.01, workers: int = 2, shard_tokens: int = 100_000_000,
            piece_bytes: int = 1 << 16, skip_bad: bool = False, show_progress: bool = True) -> Manifest:
    """Tokenize `data` into train/val shards in `out_dir` (see the module docstring) and return the manifest.

    A piece is a stretch of about `piece_bytes` of a document (a .txt file, a JSONL/Parquet record; a short
    record is one piece), cut where the tokens do not change (data.formats); the validation split takes
    every 1/val_fraction-th piece. A corpus smaller than 1/val_fraction pieces of `piece_bytes` is cut into
    smaller pieces, down to MIN_PIECE_BYTES (about a line), so that a single file of a few KB still holds
    out a stretch. `workers` <= 1 encodes in this process (easier to debug).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} exists and is not a prepared data directory; refusing to overwrite it")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no eos token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    files = resolve_files(data)
    total_bytes = sum(f.stat().st_size for f in files)
    if val_fraction > 0:  # at least about 1/val_fraction pieces, where the text allows
        piece_bytes = min(piece_bytes, max(MIN_PIECE_BYTES, int(total_bytes * val_fraction)))
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(out)
    tmp = temporary_beside(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    stats = DataStats()
    writers = {"train": _ShardWriter(tmp, "train", shard_tokens), "val": _ShardWriter(tmp, "val", shard_tokens)}
    pool = None
    try:
        jobs = _jobs(iter_text_pieces(files, text_field, piece_bytes, skip_bad, stats))
        if workers > 1:
            # fork where the platform has it: workers start at once and need nothing re-imported.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (str(tokenizer_dir), True))
            encoded = _encode_in_order(jobs, pool, workers)
        else:
            _init_worker(str(tokenizer_dir), single_thread=False)  # tokenizers' own threads still run
            encoded = map(_encode_pieces, jobs)
        index = read = 0
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                  disable=not (show_progress and sys.stderr.isatty())) as bar:  # a log file gets the summary line only
            for job in encoded:
                for tokens, piece in job:
                    split = "val" if is_held_out_piece(index, val_fraction) else "train"
                    writers[split].write(tokens, piece.ends_document)
                    index += 1
                    read += piece.nbytes
                    bar.update(piece.nbytes)
        for writer in writers.values():
            writer.close()
        if writers["train"].split.tokens == 0:
            raise DataError(files[0], None, "no training tokens were produced")
        if val_fraction > 0 and writers["val"].split.tokens == 0:
            raise DataError(files[0], None, f"{read} bytes of text make {index} pieces, too few for a validation "
                                            f"split of {val_fraction}: add text, raise --val-fraction, or set it 0")
        seconds = time.perf_counter() - started
        manifest = Manifest(
            dtype=dtype.name, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
            tokenizer=str(tokenizer_dir), tokenizer_sha256=tokenizer.sha256(),
            sources=[{"path": str(f), "bytes": f.stat().st_size} for f in files],
            train=writers["train"].split, val=writers["val"].split, val_fraction=val_fraction,
            bytes=read, skipped=stats.skipped, seconds=round(seconds, 3),
        )
        (tmp / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
        replace_directory(tmp, out)
    finally:
        if pool is not None:
            pool.terminate()
        for writer in writers.values():
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if skip_bad and stats.skipped:
        print(f"skipped bad input: {stats.summary()}")
    return manifest


# ---------------------------------------------------------------------------------------------------
# Reading: the loader


class PretrainLoader:
    """(input, target) LongTensor batches of shape [batch_size, seq_len] from prepared shards.

    The token stream (all shards of a split, in order) is cut into non-overlapping windows of
    `seq_len + 1` tokens, sharing one token at each edge so that every token is a target once; targets
    are inputs shifted by one. Windows cross document boundaries (the end token is between documents),
    as in GPT-2 and nanoGPT pretraining.

    Each epoch visits the windows in order, or in a seeded random order that changes every epoch.
    Rank r of a `world_size`-process job takes windows r, r + world_size, ... of that order (every rank
    the same number), so ranks never see the same window. The iterator runs epoch after epoch; `len()`
    is the number of batches per epoch for this rank. `state_dict()` records the position, so a loader
    given `load_state_dict()` continues with exactly the next batch.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", batch_size: int = 8, seq_len: int = 256,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.manifest = Manifest.load(data_dir)
        self.manifest.check_shards(data_dir, split)
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.shuffle, self.seed = batch_size, seq_len, shuffle, seed
        self.rank, self.world_size = rank, world_size
        info: Split = getattr(self.manifest, split)
        self.shards = [np.memmap(Path(data_dir) / name, dtype=self.manifest.dtype, mode="r")
                       for name, count in zip(info.shards, info.shard_tokens) if count]
        self.shard_starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.windows = (int(self.shard_starts[-1]) - 1) // seq_len
        self.windows_per_rank = self.windows // world_size
        if len(self) == 0:
            raise ValueError(f"{data_dir} ({split}): {self.shard_starts[-1]} tokens make {self.windows} windows of "
                             f"{seq_len + 1}, too few for one batch of {batch_size} on each of {world_size} ranks")
        self.epoch, self.batch_index = 0, 0

    def __len__(self) -> int:
        return self.windows_per_rank // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            order = np.arange(self.windows)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.windows)
        return order[self.rank : self.windows_per_rank * self.world_size : self.world_size]

    def _tokens(self, start: int, length: int) -> np.ndarray:
        """`length` tokens from position `start` of the split, across shard boundaries if need be."""
        parts = []
        shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.shard_starts[shard])
            part = self.shards[shard][offset : offset + length]
            parts.append(part)
            start, length, shard = start + len(part), length - len(part), shard + 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            order = self._order(self.epoch)
            while self.batch_index < len(self):
                windows = order[self.batch_index * self.batch_size : (self.batch_index + 1) * self.batch_size]
                # The position moves before the batch is handed out: a state saved after using this
                # batch must resume with the next one.
                self.batch_index += 1
                batch = np.stack([self._tokens(int(w) * self.seq_len, self.seq_len + 1) for w in windows])
                if batch.max() >= self.manifest.vocab_size:  # an embedding lookup would fail far from here
                    raise DataError(self.data_dir, None, f"token id {batch.max()} in the {self.split} shards is "
                                                         f"outside the vocabulary of {self.manifest.vocab_size}")
                batch = torch.from_numpy(batch.astype(np.int64))
                yield batch[:, :-1], batch[:, 1:]
            self.epoch, self.batch_index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "shuffle", "batch_size", "seq_len", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved loader had {key}={state[key]}, this one "
                                 f"{getattr(self, key)}")
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]


# ---------------------------------------------------------------------------------------------------
# Command line


@dataclass
class PrepareConfig:
    tokenizer: str = field(default="runs/tokenizer", metadata={"help": "tokenizer directory"})
    data: list[str] = field(default_factory=lambda: ["builtin:shakespeare"],
                            metadata={"help": "text files, jsonl, parquet, globs, or builtin:shakespeare"})
    out: str = field(default="runs/data", metadata={"help": "output directory for the shards"})
    text_field: str = field(default="text", metadata={"help": "the text field of jsonl/parquet records"})
    val_fraction: float = field(default=0.01, metadata={
        "help": "fraction held out for validation: every 1/val_fraction-th piece of text (pieces of up to 64 KB, "
                "smaller for a small corpus, so that one file of a few KB still gets a held-out stretch)",
        "min": 0, "max": 0.5})
    workers: int = field(default=2, metadata={"help": "encoding processes (1: encode in this process)",
                                                              "min": 1})
    shard_tokens: int = field(default=100_000_000, metadata={"help": "tokens per shard file", "min": 1})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count bad records instead of stopping"})


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(PrepareConfig, argv, prog="lmforge prepare",
                     description="Tokenize text into memory-mapped pretraining shards.")
    m = prepare(cfg.tokenizer, cfg.data, cfg.out, cfg.text_field, cfg.val_fraction, cfg.workers,
                cfg.shard_tokens, skip_bad=cfg.skip_bad)
    print(f"{m.train.tokens:,} train tokens ({m.train.documents:,} documents, {len(m.train.shards)} shards), "
          f"{m.val.tokens:,} val tokens -> {cfg.out}")
    print(f"{m.bytes / 1e6:.1f} MB in {m.seconds:.1f}s: {m.bytes / 1e6 / max(m.seconds, 1e-9):.1f} MB/s")
    return 0
