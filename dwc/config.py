"""Plain dataclasses from plain dicts, validated with the field path in every error.

One small mechanism serves the build file, the targets and every pass's options: each
field's type is checked (int, float, str, bool, Path, Optional, list, dict, Literal,
nested dataclasses), unknown keys are refused by name, and a class may add a
`validate(self, path)` method for range checks. Describe every field with
`field(metadata={"help": ...})` (see `option`); `dwc passes` prints those descriptions.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from dwc.errors import BuildFileError

SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def option(default: Any = dataclasses.MISSING, help: str = "", **kw):  # noqa: A002
    """A dataclass field with a description (shown by `dwc passes`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def describe(cls) -> list[dict]:
    """Name, type, default and description of each field, for help output."""
    hints = get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": default,
                     "help": f.metadata.get("help", "")})
    return rows


def options_dict(options) -> dict:
    """A dataclass as a JSON-able dict (paths as strings), for manifests and cache keys."""
    return {k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(options).items()}


def from_dict(cls, data: Any, path: str, base_dir: Path | None = None,
              error=BuildFileError):
    """Build `cls` from `data`; `path` is the dotted location used in error messages."""
    if not isinstance(data, dict):
        raise error(f"{path or 'file'}: expected a mapping, got {_kind(data)}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise error(f"{_join(path, key)}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for f in dataclasses.fields(cls):
        where = _join(path, f.name)
        if f.name in data:
            values[f.name] = _convert(hints[f.name], data[f.name], where, base_dir, error)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"{where}: required key is missing")
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(path)
    return obj


def _convert(tp, value, where: str, base_dir: Path | None, error):
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise error
            return _convert(options[0], value, where, base_dir, error)
        for opt in options:
            try:
                return _convert(opt, value, where, base_dir, error)
            except error:
                continue
        raise error(f"{where}: expected {_type_name(tp)}, got {_kind(value)}")
    if origin is Literal:
        if value not in args:
            raise error(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise error(f"{where}: expected a list, got {_kind(value)}")
        return [_convert(args[0], v, f"{where}[{i}]", base_dir, error) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {_kind(value)}")
        return {str(k): _convert(args[1], v, _join(where, k), base_dir, error)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, base_dir, error)
    return _scalar(tp, value, where, base_dir, error)


def _scalar(tp, value, where: str, base_dir: Path | None, error):
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and SCIENTIFIC.match(value):
            return float(value)  # YAML 1.1 reads 1e-7 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            return (base_dir / p).resolve() if base_dir and not p.is_absolute() else p.resolve()
    else:
        raise TypeError(f"config type {tp!r} is not supported")  # a bug in dwc, not input
    raise error(f"{where}: expected {_type_name(tp)}, got {_kind(value)} {value!r}")


def _type_name(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "mapping"
    if tp is Path:
        return "path"
    return getattr(tp, "__name__", str(tp))


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(
                type(value), type(value).__name__)


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def positive(obj, path: str, *names: str, error=BuildFileError) -> None:
    """Range check used by `validate` methods: each named field must be > 0 when set."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise error(f"{_join(path, name)}: must be greater than 0, got {value}")
