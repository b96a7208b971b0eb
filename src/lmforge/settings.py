"""Typed options for every command: a dataclass, filled from an optional YAML file and
from command-line flags.

    @dataclass
    class Optim:
        lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})

    @dataclass
    class PretrainConfig:
        out_dir: str = "runs/pretrain"
        optim: Optim = field(default_factory=Optim)

    cfg = parse_args(PretrainConfig, ["--config", "c.yaml", "--optim.lr", "1e-3"], prog="lmforge pretrain")

Flags use dotted paths into nested dataclasses; dashes and underscores are the same
(`--max-new-tokens` = `--max_new_tokens`). A list field takes every value up to the next
flag (`--data a.txt b.txt`). A bool flag given alone means true. An unknown key, in the
YAML file or on the command line, is an error that names it; `--help` prints every option
with its type and default. A number field may give its range in its metadata (`"min"`, `"max"`,
inclusive); a value outside it is an error naming the option (`check_ranges`).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class OptionError(ValueError):
    """A bad option of a command (a field of its config dataclass, from a flag or a YAML file): the message
    names the key (and the file, when it came from one). A model's config.json is config.ModelConfigError's."""


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _unwrap_optional(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(inner) or (str,)
        name = f"list[{getattr(arg, '__name__', str(arg))}]"
    elif origin is typing.Literal:
        name = "|".join(str(a) for a in typing.get_args(inner))
    else:
        name = getattr(inner, "__name__", str(inner))
    return name + (" or null" if optional else "")


def _convert(value: Any, tp, key: str):
    """Coerce a YAML or command-line value to the field's type; raise OptionError naming the key."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or inner is Any:
            return None
        raise OptionError(f"{key}: null is not allowed (expected {_type_name(tp)})")
    origin = typing.get_origin(inner)
    try:
        if inner is Any:
            return value
        if origin is typing.Literal:
            choices = typing.get_args(inner)
            for c in choices:
                if value == c or str(value) == str(c):
                    return c
            raise OptionError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        if origin in (list, tuple):
            (arg, *_) = typing.get_args(inner) or (str,)
            if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
                value = value[0]  # one command-line word: "a,b" is two items
            if isinstance(value, str):
                value = [v for v in value.split(",") if v] if "," in value else [value]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_convert(v, arg, key) for v in value]
        if origin is dict or inner is dict:
            if not isinstance(value, dict):
                raise OptionError(f"{key}: expected a mapping, got {value!r}")
            return value
        if inner is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise OptionError(f"{key}: {value!r} is not a boolean")
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise OptionError(f"{key}: {value!r} is not an integer")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if inner is float:
            if isinstance(value, bool):
                raise OptionError(f"{key}: {value!r} is not a number")
            return float(value)
        if inner is str:
            if isinstance(value, (dict, list)):
                raise OptionError(f"{key}: expected a string, got {value!r}")
            return str(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, OptionError):
            raise
        raise OptionError(f"{key}: {value!r} is not a valid {_type_name(tp)}") from None
    return value


def apply_dict(obj, data: dict, prefix: str = "", source: str = "") -> None:
    """Set fields of dataclass `obj` from a nested dict, checking every key."""
    where = f" in {source}" if source else ""
    if not isinstance(data, dict):
        raise OptionError(f"{prefix.rstrip('.') or 'config'}{where}: expected a mapping, got {data!r}")
    fields = _fields(type(obj))
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        path = prefix + key
        if key not in fields:
            raise OptionError(f"unknown option '{path}'{where}; valid here: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply_dict(current, value, path + ".", source)
        else:
            try:
                setattr(obj, key, _convert(value, fields[key].type, path))
            except OptionError as e:
                raise OptionError(f"{e}{where}") from None


def set_path(obj, dotted: str, value: Any, source: str = "") -> None:
    """Set one dotted option (`optim.lr`) from a string or parsed value."""
    *parents, leaf = dotted.replace("-", "_").split(".")
    target, walked = obj, ""
    for p in parents:
        fields = _fields(type(target))
        if p not in fields or not dataclasses.is_dataclass(getattr(target, p)):
            raise OptionError(f"unknown option '{walked + p}'" + (f" in {source}" if source else ""))
        target, walked = getattr(target, p), walked + p + "."
    apply_dict(target, {leaf: value}, walked, source)


def _range_text(f: dataclasses.Field) -> str:
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and high is not None:
        return f"from {low} to {high}"
    return f"at least {low}" if low is not None else f"at most {high}" if high is not None else ""


def check_ranges(obj, prefix: str = "") -> None:
    """Every number within the range its field's metadata gives; raises OptionError naming the option."""
    for name, f in _fields(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, prefix + name + ".")
            continue
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if value is None or (low is None and high is None):
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            raise OptionError(f"{prefix}{name}: {value} is out of range ({_range_text(f)})")


def format_help(cls, prog: str, description: str = "") -> str:
    lines = [f"usage: {prog} [--config YAML] [--option VALUE ...]", ""]
    if description:
        lines += [description.strip(), ""]
    lines.append("options (YAML keys or --dotted.flags; defaults shown):")
    lines.append("  --config YAML    read options from a YAML file first; flags override it")

    def walk(inst, prefix: str):
        # Walk instances, not classes: a parent's default_factory may set a nested section's defaults.
        for name, f in _fields(type(inst)).items():
            default = getattr(inst, name)
            flag = "--" + prefix + name.replace("_", "-")
            if dataclasses.is_dataclass(default):
                walk(default, prefix + name + ".")
                continue
            help_text = f.metadata.get("help", "")
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            limits = _range_text(f)
            line = f"  {flag} {_type_name(f.type).upper()}  (default: {shown}{'; ' + limits if limits else ''})"
            lines.append(line + (f"  {help_text}" if help_text else ""))

    walk(cls(), "")
    for alias, dotted in _aliases(cls).items():
        lines.append(f"  --{alias.replace('_', '-')}  the same as --{dotted.replace('_', '-')}")
    return "\n".join(lines)


def _aliases(cls) -> dict[str, str]:
    """A config class's short names for nested options (`ALIASES = {"resume": "train.resume"}`), accepted
    as flags and as top-level YAML keys."""
    return getattr(cls, "ALIASES", {})


def parse_args(cls, argv: list[str] | None = None, prog: str = "lmforge", description: str = ""):
    """Build a `cls` from `--config YAML` and `--dotted.key VALUE` flags. Exits with status 2 and a
    message naming the key on error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help(cls, prog, description))
        raise SystemExit(0)
    try:
        return parse_args_or_raise(cls, argv)
    except OptionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_args_or_raise(cls, argv: list[str]):
    cfg = cls()
    argv = list(argv)  # the caller's list stays as it was (a script may parse it again, or print it)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise OptionError("--config needs a YAML file")
        path = Path(argv[i + 1])
        del argv[i : i + 2]
        if not path.is_file():
            raise OptionError(f"--config: no such file: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise OptionError(f"{path}: invalid YAML: {e}") from None
        if isinstance(data, dict):
            for alias, dotted in _aliases(cls).items():
                if alias in data:
                    set_path(cfg, dotted, data.pop(alias), source=str(path))
        apply_dict(cfg, data, source=str(path))
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise OptionError(f"unexpected argument '{arg}' (options are --name VALUE)")
        key = arg[2:]
        value: str | None = None
        if "=" in key:
            key, value = key.split("=", 1)
        key = _aliases(cls).get(key.replace("-", "_"), key)
        values = []
        if value is not None:
            values = [value]
        else:
            j = i + 1
            while j < len(argv) and not (argv[j].startswith("--") and len(argv[j]) > 2):
                values.append(argv[j])
                j += 1
            i = j - 1
        i += 1
        field_type = _field_type(cfg, key)
        inner, _ = _unwrap_optional(field_type)
        if typing.get_origin(inner) in (list, tuple):
            set_path(cfg, key, values)
        elif not values:
            if inner is not bool:
                raise OptionError(f"--{key} needs a value")
            set_path(cfg, key, True)
        elif len(values) > 1:
            raise OptionError(f"--{key} takes one value, got {len(values)}: {' '.join(values)}")
        else:
            set_path(cfg, key, values[0])
    check_ranges(cfg)
    return cfg


def _field_type(cfg, dotted: str):
    *parents, leaf = dotted.replace("-", "_").split(".")
    target = cfg
    for p in parents:
        target = getattr(target, p, None)
        if not dataclasses.is_dataclass(target):
            raise OptionError(f"unknown option '--{dotted}'")
    fields = _fields(type(target))
    if leaf not in fields:
        raise OptionError(f"unknown option '--{dotted}'; valid here: {', '.join(fields)}")
    return fields[leaf].type
