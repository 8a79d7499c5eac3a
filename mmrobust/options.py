"""Typed options at the boundary: build an options dataclass from CLI strings, YAML or JSON values.

One strict rule set for every ``KEY=VALUE`` flag and config section: unknown keys are refused
(the message lists the valid ones), strings are parsed to the declared field type, values of the
wrong type are refused rather than coerced (``true`` is not an int, ``1.5`` is not an int,
``flase`` is not a bool), and floats must be finite. Ranges are checked by each dataclass's own
``__post_init__``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from typing import Any, TypeVar

from mmrobust.errors import ConfigError

T = TypeVar("T")

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _type_name(declared: Any) -> str:
    if isinstance(declared, str):
        return declared.replace(" ", "")
    return getattr(declared, "__name__", str(declared)).replace(" ", "")


def coerce(value: Any, declared: Any, what: str) -> Any:
    """Return ``value`` as the declared type (``int``, ``float``, ``bool``, ``str``, or one of them
    ``| None``, where the string ``none`` gives None), or raise.

    Strings are parsed; other values must already have the right type (an int is accepted for a
    float). Types other than these four (e.g. ``str | list[str]``) pass through unchanged for the
    dataclass to check.
    """
    t = _type_name(declared)
    if t.endswith("|None") and t[: -len("|None")] in ("int", "float", "bool", "str"):  # optional: "none" -> None
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        t = t[: -len("|None")]
    if t not in ("int", "float", "bool", "str"):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            if t == "int":
                return int(text)
            if t == "float":
                out = float(text)
                if not math.isfinite(out):
                    raise ConfigError(f"option '{what}' must be a finite number, got {value!r}")
                return out
            if t == "bool":
                if text.lower() in _TRUE:
                    return True
                if text.lower() in _FALSE:
                    return False
                raise ValueError(text)
        except ValueError:
            raise ConfigError(f"option '{what}' expects {t}, got {value!r}") from None
        return value
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": False,
    }[t]
    if not ok:
        raise ConfigError(f"option '{what}' expects {t}, got {type(value).__name__} {value!r}")
    if t == "float":
        if not math.isfinite(value):
            raise ConfigError(f"option '{what}' must be a finite number, got {value}")
        return float(value)
    return value


def build_options(cls: type[T], values: dict[str, Any], what: str) -> T:
    """Instantiate the options dataclass ``cls`` from ``values``, strictly (see module docstring)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{what}: options must be a mapping of KEY: VALUE, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]  # derived fields are not options
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{what}: unknown option(s) {unknown}; valid: {valid}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: coerce(value, hints.get(name, fields[name].type), f"{what}.{name}") for name, value in values.items()
    }
    return cls(**kwargs)


def check_types(obj: Any, where: str) -> None:
    """Check every field of the dataclass instance ``obj`` against its declared type, strictly.

    For values that arrive already typed (YAML, JSON, Python): an int is not accepted for a bool
    (nor a bool for an int), a string is never parsed here, floats must be finite. Fields of other
    declared types (unions, nested dataclasses) are left to the dataclass's own checks, except
    ``dict[...]`` fields, which must hold mappings.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        t = _type_name(hints.get(f.name, f.type))
        what = f"{where}.{f.name}"
        if t in ("int", "float", "bool"):
            if isinstance(value, str):
                raise ConfigError(f"option '{what}' expects {t}, got the string {value!r}")
            coerce(value, t, what)
        elif t == "str" and not isinstance(value, str):
            raise ConfigError(f"option '{what}' expects a string, got {type(value).__name__} {value!r}")
        elif t.startswith("dict[") and not isinstance(value, dict):
            raise ConfigError(f"option '{what}' expects a mapping, got {type(value).__name__} {value!r}")


def check_range(value: float, low: float | None, high: float | None, what: str, *, low_open: bool = False) -> None:
    """Raise a one-line :class:`ConfigError` unless ``low <= value <= high`` (``low < value`` if ``low_open``)."""
    ok = (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        bracket = "(" if low_open else "["
        raise ConfigError(f"option '{what}' must be in {bracket}{lo}, {hi}], got {value}")


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML would type it, minus YAML's surprises: ``true``/``false`` ->
    bool, ``none``/``null`` -> None, an integer -> int, any other number (``1e-3`` too) -> float,
    anything else -> the string. Non-finite numbers are returned as floats for the checks to refuse."""
    value = text.strip()
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def apply_overrides(
    tree: dict[str, Any], items: list[str] | None, sections: tuple[str, ...], what: str = "set"
) -> dict[str, Any]:
    """``tree`` (a config as nested dicts) with each ``SECTION.KEY[.KEY...]=VALUE`` of ``items`` set.

    The first part must be one of ``sections``; intermediate parts must be mappings (or absent: a
    new mapping, e.g. a method option); values are typed by :func:`parse_scalar`. The result goes
    through the config's own strict validation (unknown keys and wrong types are refused there).
    """
    out = copy.deepcopy(tree)
    for item in items or []:
        path, sep, text = item.partition("=")
        keys = [k.strip() for k in path.split(".")]
        if not sep or len(keys) < 2 or not all(keys):
            raise ConfigError(
                f"{what} '{item}' must look like SECTION.KEY=VALUE (e.g. train.optim.lr=0.01)", param=what
            )
        if keys[0] not in sections:
            raise ConfigError(
                f"{what} '{item}': unknown section '{keys[0]}'; choose from: {', '.join(sections)}", param=what
            )
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{what} '{item}': '{'.'.join(keys[: i + 1])}' is a value, not a section", param=what)
            node = child
        node[keys[-1]] = parse_scalar(text)
    return out
