"""Reading the small files every stage reads (config.json, tokenizer_config.json, trainer_state.json, ...):
whatever is wrong with one is an error that names it, of the type its reader raises."""

from __future__ import annotations

import json
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
