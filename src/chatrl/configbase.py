"""Typed config machinery: dataclasses loaded from YAML with `section.field=value` overrides.

Every field is declared once with `opt(default, "help")`; the help text feeds `--help`, unknown keys
and wrong types fail before any work starts, and each step config's `check()` adds cross-field rules.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from chatrl.errors import ChatrlError

T = TypeVar("T")


def opt(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at call sites
    """A config field with a default and a help text (lists/dicts get a fresh copy per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def sub(cls: type, **defaults: Any) -> Any:
    """A nested sub-config section (`defaults` change some of its field defaults for this use)."""
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata={"help": cls.__doc__ or ""})


# ----------------------------------------------------------------------------- type coercion


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a CLI string) to type `tp`, or raise naming the key."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ChatrlError:
                continue
        raise ChatrlError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str):
            for c in choices:
                if str(c) == value:
                    return c
        raise ChatrlError(f"config key '{key}': got {value!r}, expected one of {list(choices)}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ChatrlError(f"config key '{key}': got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ChatrlError(f"config key '{key}': got {value!r}, expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ChatrlError(f"config key '{key}': got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ChatrlError(f"config key '{key}': got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ChatrlError(f"config key '{key}': got {value!r}, expected a string")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            loaded = yaml.safe_load(value)
            if isinstance(loaded, dict):
                return loaded
        raise ChatrlError(f"config key '{key}': got {value!r}, expected a mapping")
    raise ChatrlError(f"config key '{key}': unsupported type {tp}")


# ----------------------------------------------------------------------------- building


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, mapping: dict[str, Any], prefix: str) -> None:
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = ", ".join(sorted(names))
            raise ChatrlError(f"unknown config key '{full}'. Valid keys at this level: {close}")
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ChatrlError(f"config key '{full}' is a section; set its fields, e.g. {full}.<field>=...")
            _apply(current, value, f"{full}.")
        elif isinstance(current, dict) and isinstance(value, dict):  # free-form section: merge, checked later
            setattr(obj, key, deep_merge(current, value))
        else:
            setattr(obj, key, _coerce(value, tp, full))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, recursing into nested mappings."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ChatrlError(f"override '{item}' is not of the form section.field=value")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value))
    return pairs


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> T:
    """Build `cls` from defaults, then a YAML file, then `extra` (a dict), then dotted overrides; check it."""
    cfg = cls()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ChatrlError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ChatrlError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ChatrlError(f"config file {p} must hold a mapping of sections at the top level")
        _apply(cfg, loaded, "")
    if extra:
        _apply(cfg, extra, "")
    for key, value in parse_overrides(overrides or []):
        _apply(cfg, _nest(key, value), "")
    check = getattr(cfg, "check", None)
    if callable(check):
        check()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def help_lines(cls_or_obj: Any, prefix: str = "") -> list[str]:
    """One line per field: dotted key, type, default and help text (for `--help`)."""
    lines = []
    obj = cls_or_obj() if isinstance(cls_or_obj, type) else cls_or_obj
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(f"\n  [{key}]  {f.metadata.get('help', '').strip()}")
            lines.extend(help_lines(value, f"{key}."))
        else:
            lines.append(f"  {key} ({_type_name(hints[f.name])}, default {value!r}): {f.metadata.get('help', '')}")
    return lines
