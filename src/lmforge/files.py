"""Files every stage reads and writes: the small JSON files (config.json, tokenizer_config.json,
trainer_state.json, ...), whatever is wrong with one an error that names it; and directories written
whole (a model, an adapter, a training checkpoint, prepared shards), which appear in one rename."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_json(path: Path, error: type[Exception] = ValueError, kind: type | None = dict) -> Any:
    """The JSON value in `path`, of type `kind` (None: any). A file that is missing, not UTF-8, not JSON or
    not a `kind` raises `error("PATH: what is wrong")`."""
    if not path.is_file():
        raise error(f"{path}: missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be read") from None
    if kind is not None and not isinstance(value, kind):
        raise error(f"{path}: expected a JSON {'object' if kind is dict else kind.__name__}")
    return value


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a hidden sibling and one rename: a reader sees the old file or the whole
    new one (a report, results.json), never half of it."""
    tmp = temporary_beside(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_jsonl_files(out: Path, records: dict[str, list[dict]]) -> dict[str, Path]:
    """Each list of records as `out/NAME.jsonl`, one JSON object a line; returns the files by name."""
    paths = {}
    for name, rows in records.items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


# -- directories written whole: a crash at any moment leaves the old one or the new one, never a mix ----------

def temporary_beside(path: Path, shared: bool = False) -> Path:
    """Where to write what will become `path`: a hidden sibling (so a listing of the parent never shows it,
    and renaming it into place stays on one file system). One per process, or with `shared` one name that
    every process of a distributed job agrees on."""
    return path.with_name(f".{path.name}.tmp" if shared else f".{path.name}.tmp-{os.getpid()}")


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to the disk, so that the rename that publishes it never precedes its data."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def replace_directory(finished: Path, path: Path) -> Path:
    """Make the finished directory appear at `path` in one step: its files flushed, whatever is at `path`
    moved aside to .NAME.old, `finished` renamed into place, the old one deleted. A crash between the two
    renames leaves the previous directory at .NAME.old, which `recover_directory` puts back."""
    fsync_tree(finished)
    backup = path.with_name(f".{path.name}.old")
    if backup.exists():
        shutil.rmtree(backup)
    if path.exists():
        path.rename(backup)
    finished.rename(path)
    if backup.exists():
        shutil.rmtree(backup)
    return path


def recover_directory(path: Path) -> None:
    """Finish a `replace_directory` that crashed between its renames: put the previous directory back."""
    backup = path.with_name(f".{path.name}.old")
    if backup.exists():
        if path.exists():
            shutil.rmtree(backup)
        else:
            backup.rename(path)


def atomic_directory_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp_dir), then make tmp_dir appear at `path` in one step; on any error the temporary
    directory is removed and whatever was at `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = temporary_beside(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_directory(tmp, path)


def remove_directory(path: Path) -> None:
    """Delete a directory so that a crash midway never leaves it half-deleted under its own name."""
    doomed = path.with_name(f".{path.name}.deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    shutil.rmtree(doomed)
