"""Typed configs: plain dataclass trees filled from YAML plus `--set a.b=c` overrides.

Every error names where the bad value came from (the file or the `--set` override), the dotted key,
what was expected and what was given, so a user can fix it without reading this module.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from vgen.errors import ConfigError
from vgen.manifest import read_yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class _Invalid(Exception):
    """A schema mismatch at a key path; turned into a ConfigError once its source is known.
    `section`: the error is about a combination of the keys under `path` (a __post_init__ check)."""

    def __init__(self, path: str, message: str, section: bool = False):
        super().__init__(message)
        self.path, self.message, self.section = path, message, section


def bounded(default: Any = _MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, **kwargs: Any) -> Any:
    """A dataclass field whose value (each item, for a list or tuple) must lie within the bounds;
    checked when a config is built, and reported with its key path and where it was set."""
    metadata = {"bounds": (ge, gt, le, lt)}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def chosen_by(key: str, registry: dict[str, type], default: str) -> Any:
    """A dataclass field holding one of several config classes, picked by the value of its `key`
    (e.g. `network.type: unet` -> the UNet's config); `registry` maps each name to its class."""
    return dataclasses.field(default_factory=lambda: registry[default](),
                             metadata={"chosen_by": (key, registry)})


def check_bounds(instance: Any) -> None:
    """Check the bounded fields of a config built in Python (from_dict checks them with their key
    paths before construction); call it from __post_init__."""
    for f in dataclasses.fields(instance):
        if "bounds" in f.metadata:
            try:
                _check_bounds(f.name, getattr(instance, f.name), f.metadata["bounds"])
            except _Invalid as e:
                raise ValueError(e.message) from None


def _bounds_text(ge, gt, le, lt) -> str:
    low = f">= {ge:g}" if ge is not None else f"> {gt:g}" if gt is not None else ""
    high = f"<= {le:g}" if le is not None else f"< {lt:g}" if lt is not None else ""
    return " and ".join(part for part in (low, high) if part)


def _check_bounds(path: str, value: Any, bounds: tuple) -> None:
    ge, gt, le, lt = bounds
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item is None or isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if (ge is not None and item < ge) or (gt is not None and item <= gt) or \
                (le is not None and item > le) or (lt is not None and item >= lt):
            raise _Invalid(path, f"{path}: expected a value {_bounds_text(*bounds)}, got {item!r}")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: object) -> str:
    if value is None:
        return "null"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    """The schema type in words a YAML writer understands."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is tuple:
        return f"list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if tp is Path:
        return "path"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str, base: Any = None) -> Any:
    """Check `value` against the schema type `tp`; `base` is a dataclass default to fill gaps from."""
    origin, args = get_origin(tp) or tp, get_args(tp)
    expected = _Invalid(path, f"{path}: expected {_type_name(tp)}, got {_show(value)}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: keep X's error when it is about a nested key
            try:
                return _coerce(options[0], value, path, base)
            except _Invalid as e:
                raise e if e.path != path or isinstance(value, dict) else expected from None
        for option in options:
            try:
                return _coerce(option, value, path)
            except _Invalid:
                pass
        raise expected
    if origin is Literal:
        # type() check so that `true` does not pass for Literal[1], nor 1 for Literal[1.0]
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise expected
    if dataclasses.is_dataclass(origin):
        if not isinstance(value, dict):
            raise expected
        return _build(origin, value, path, base if isinstance(base, origin) else None)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise expected
        if origin is list or not args or (len(args) == 2 and args[1] is Ellipsis):
            item_types = [args[0] if args else Any] * len(value)
        elif len(value) == len(args):
            item_types = list(args)
        else:
            raise expected
        items = [_coerce(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise expected
        key_type, value_type = args or (Any, Any)
        return {_coerce(key_type, k, path): _coerce(value_type, v, _join(path, k)) for k, v in value.items()}
    if origin in (bool, int, str):
        # bool is a subclass of int, and `true` must not pass for an int
        if isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
            return value
        raise expected
    if origin is float:
        # YAML 1.1 (safe_load) reads `3e-4` as a string: it wants a dot and a signed exponent.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):  # .nan / .inf: never a setting
            raise _Invalid(path, f"{path}: expected a finite number, got {_show(value)}")
        if number is not None:
            return number
        raise expected
    if origin is Path:
        if isinstance(value, Path) or (isinstance(value, str) and value):  # Path("") would be "."
            return Path(value)
        raise expected
    raise TypeError(f"config schema: unsupported field type {tp!r} at {path!r}")


def yaml_key(f: dataclasses.Field) -> str:
    """The key a field is written under in YAML: its name, or `metadata["key"]` for a name Python
    reserves (`init.from` is the field `source`)."""
    return f.metadata.get("key", f.name)


def _build(cls: type[T], data: dict, path: str, base: T | None = None) -> T:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [yaml_key(f) for f in fields]
    for key in data:
        if key not in names:
            full = _join(path, key)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{_join(path, close[0])}'?)" if close else ""
            under = f" under '{path}'" if path else ""
            raise _Invalid(full, f"unknown key '{full}'{hint}; valid keys{under}: {', '.join(names)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields:
        name = yaml_key(f)
        key = _join(path, name)
        # A partial section keeps the rest of its default, including a default_factory's values.
        if base is not None:
            default = getattr(base, f.name)
        elif f.default_factory is not _MISSING:
            default = f.default_factory()
        else:
            default = f.default
        if name in data and "chosen_by" in f.metadata:
            kwargs[f.name] = _choose(f.metadata["chosen_by"], data[name], key, default)
        elif name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[name], key, default)
            if "bounds" in f.metadata:
                _check_bounds(key, kwargs[f.name], f.metadata["bounds"])
        elif default is not _MISSING:
            kwargs[f.name] = default
        else:
            raise _Invalid(key, f"missing required key '{key}' ({_type_name(hints[f.name])})")
    try:
        return cls(**kwargs)
    except ValueError as e:  # checks in __post_init__ (combinations of keys) read like type errors
        raise _Invalid(path, f"{path}: {e}" if path else str(e), section=True) from None


def _choose(chosen_by: tuple[str, dict[str, type]], value: Any, path: str, default: Any) -> Any:
    """Build the config class that `value[key]` names (the default's kind when it names none)."""
    key, registry = chosen_by
    if not isinstance(value, dict):
        raise _Invalid(path, f"{path}: expected a mapping, got {_show(value)}")
    name = value.get(key, getattr(default, key))
    if not isinstance(name, str) or name not in registry:
        raise _Invalid(_join(path, key), f"{_join(path, key)}: expected one of {', '.join(map(repr, registry))}, "
                                         f"got {_show(name)}")
    cls = registry[name]
    return _build(cls, {**value, key: name}, path, default if isinstance(default, cls) else None)


def parse_override(text: str) -> tuple[str, Any]:
    """Split `train.lr=3e-4` into ("train.lr", value), the value read as YAML (`true`, `[1, 2]`, `null`)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected the form key.path=value, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: value is not valid YAML: {getattr(e, 'problem', e)}") from None
    return key, value


def apply_overrides(data: dict, overrides: Sequence[str], *, source: str = "<config>") -> dict:
    """Return a copy of `data` with each `key.path=value` set, creating sections; no schema check."""
    data = dict(data)
    for text in overrides:
        key, value = parse_override(text)
        *parents, leaf = key.split(".")
        node, walked = data, ""
        for part in parents:
            walked = _join(walked, part)
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{walked}' in {source} is {_show(child)}, not a section")
            node[part] = node = dict(child)  # copy: the caller's dict stays as it was
        node[leaf] = value
    return data


def from_dict(cls: type[T], data: dict, *, source: str = "<config>", overrides: Sequence[str] = ()) -> T:
    """Build and type-check a `cls` tree from plain data, after applying `--set` overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {_show(data)}")
    data = apply_overrides(data, overrides, source=source)
    try:
        return _build(cls, data, "")
    except _Invalid as e:
        # Blame the last override that set this key or a section above it (or, for a check of a
        # section's keys together, a key inside it), else the file.
        for text in reversed(overrides):
            key = parse_override(text)[0]
            if e.path == key or e.path.startswith((key + ".", key + "[")) or \
                    (e.section and (not e.path or key.startswith(e.path + "."))):
                source = f"--set {text}"
                break
        raise ConfigError(f"{source}: {e.message}") from None


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read a YAML config file, apply `--set` overrides and build a checked `cls`."""
    data = read_yaml(path, "config file", ConfigError)
    return from_dict(cls, {} if data is None else data, source=str(Path(path)), overrides=overrides)


def to_dict(instance: Any) -> Any:
    """Plain YAML-safe data (paths as str, tuples as lists); `from_dict(cls, to_dict(x)) == x`."""
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        return {yaml_key(f): to_dict(getattr(instance, f.name)) for f in dataclasses.fields(instance) if f.init}
    if isinstance(instance, Path):
        return str(instance)
    if isinstance(instance, (list, tuple)):
        return [to_dict(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_dict(v) for k, v in instance.items()}
    return instance
