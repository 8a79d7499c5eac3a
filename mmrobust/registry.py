"""One name -> object registry, shared by datasets, encoders, heads, methods, attacks, certifiers,
suites and calibration examples.

The registry key is the only place a name is written: registering a class sets its ``name``
attribute to the key (classes do not repeat it). A registry lists the modules whose import registers
its built-in entries and imports them on the first look-up, so there is one way to make a name
known: import the module that defines it (built-ins are imported lazily; user code is imported by
the user or by a plug-in).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from mmrobust.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually classes or factories) of one kind.

    ``modules`` are imported on the first look-up (their import registers the built-in entries).
    Looking up an unknown name raises :class:`ConfigError` listing the valid names, so typos in a
    CLI flag or a YAML file get a one-line answer instead of a ``KeyError``.
    """

    def __init__(self, kind: str, modules: Sequence[str] = ()) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._modules = tuple(modules)
        self._loaded = not self._modules

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # before importing: a module may look a name up while it registers
        for module in self._modules:
            importlib.import_module(module)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a class gets ``obj.name = name``.

        Registering the same object under the same name again is a no-op (a module imported twice
        under two names); another object under a taken name is refused.
        """

        def decorator(obj: T) -> T:
            if name in self._items and not _same(self._items[name], obj):
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            # a new name, the same object again, or its definition from a module imported again
            if isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            from mmrobust.plugins import load_installed

            load_installed()  # installed plug-ins register on import: once, on the first miss
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items))
            raise ConfigError(
                f"unknown {self.kind} '{name}'; choose from: {choices} (a plug-in's names need plugin=MODULE)",
                param="plugin",
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _same(a: object, b: object) -> bool:
    """One registration target: the same object, or the same definition from a re-imported module."""
    if a is b:
        return True
    key = ("__module__", "__qualname__")
    return all(getattr(a, k, None) is not None and getattr(a, k, None) == getattr(b, k, None) for k in key)
