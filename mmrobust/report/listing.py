"""What can be chosen by name: every registry's entries with their description, options and defaults,
as plain text (``mmrobust list``)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

#: the registries a user picks from, in the order they are listed: kind -> (module, registry, what it is)
KINDS: dict[str, tuple[str, str, str]] = {
    "datasets": ("mmrobust.data.registry", "DATASETS", "--data NAME (or a folder path); options: --data-opt KEY=VALUE"),
    "encoders": ("mmrobust.models.encoders", "ENCODERS", "--set model.encoders.MODALITY=NAME"),
    "methods": ("mmrobust.training.base", "METHODS", "--method NAME; options: --method-opt KEY=VALUE"),
    "attacks": ("mmrobust.attacks.base", "ATTACKS", "evaluate --attacks NAME,...; benchmark --suite"),
    "suites": ("mmrobust.eval.suites", "SUITES", "evaluate --suite NAME; options: the evaluate flags"),
    "certifiers": ("mmrobust.certify.base", "CERTIFIERS", "certify --certifier NAME; options: --cert-opt KEY=VALUE"),
}

#: parameters that are inputs, not options (model, data, callbacks)
_NOT_OPTIONS = {
    "self",
    "model",
    "meta",
    "run",
    "split",
    "inputs",
    "labels",
    "seed",
    "options",
    "progress",
    "on_message",
}

_ROLE = re.compile(r":(?:class|func|meth|data|attr|mod):`~?([^`]+)`")


def plain(text: str) -> str:
    """A docstring line without Sphinx markup: ``:class:`X``` -> ``X``, double back-quotes -> none."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "")


def summary(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring, on one line, without markup."""
    doc = inspect.getdoc(obj) or ""
    first = plain(" ".join(doc.split("\n\n", 1)[0].split()))
    return re.split(r"(?<=\.)\s+(?=[A-Z])", first, maxsplit=1)[0]


def _default_text(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def options_of(obj: Any) -> list[tuple[str, str, str]]:
    """``(name, type, default)`` of each option of a registered entry: the fields of its ``Options``
    dataclass if it has one, else its keyword parameters with defaults."""
    opts = getattr(obj, "Options", None)
    if dataclasses.is_dataclass(opts) and isinstance(opts, type):
        hints = typing.get_type_hints(opts)
        out = []
        for f in dataclasses.fields(opts):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = _default_text(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = _default_text(f.default_factory())
            else:
                default = "(required)"
            out.append((f.name, _type_text(hints.get(f.name, f.type)), default))
        return out
    if not callable(obj):
        return []
    try:
        params = inspect.signature(obj).parameters.values()  # a class: its constructor's parameters
    except (TypeError, ValueError):
        return []
    return [
        (p.name, _type_text(p.annotation), _default_text(p.default))
        for p in params
        if p.name not in _NOT_OPTIONS
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is not inspect.Parameter.empty
    ]


def _type_text(t: Any) -> str:
    if t is inspect.Parameter.empty:
        return ""
    text = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return text.replace("typing.", "").replace("collections.abc.", "")


def registry_of(kind: str) -> Any:
    import importlib

    module, name, _ = KINDS[kind]
    return getattr(importlib.import_module(module), name)


def listing(kinds: list[str] | None = None) -> str:
    """The plain-text listing of ``kinds`` (all when None)."""
    lines: list[str] = []
    for kind in kinds or list(KINDS):
        registry = registry_of(kind)
        lines += [f"{kind}  ({KINDS[kind][2]})", ""]
        for name in registry.names():
            obj = registry.get(name)
            extra = ""
            guarantee = getattr(obj, "guarantee", None)
            if guarantee is not None:  # certifiers: what the number means
                extra = f" [{getattr(guarantee, 'value', guarantee)}]"
            lines.append(f"  {name}{extra}: {summary(obj)}")
            if kind == "encoders":  # built by name, sized by model.feature_dim: nothing else to set
                continue
            opts = options_of(obj)
            for opt, type_text, default in opts:
                lines.append(f"      {opt}{f' ({type_text})' if type_text else ''} = {default}")
            if not opts:
                lines.append("      (no options)")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
