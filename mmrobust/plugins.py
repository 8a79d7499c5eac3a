"""User code that registers encoders, datasets, methods, certifiers, attacks or layer rules.

A plug-in is a Python module whose import registers things in mmrobust's registries (with
``@ENCODERS.register("my-encoder")`` and the like). It reaches mmrobust in two ways:

* named on the command line (``--plugin MODULE``, repeatable, on every command) or in Python
  (:func:`import_plugin`); a run records the plug-ins it was trained with and re-imports them
  when it is loaded;
* installed as a package that declares an entry point in the ``mmrobust.plugins`` group (in its
  ``pyproject.toml``: ``[project.entry-points."mmrobust.plugins"] mine = "mypkg.mmrobust_plugin"``).
  Installed plug-ins are imported lazily, the first time a registry misses a name, and one that
  fails to import is reported as a warning: a broken third-party package does not break every
  command.

:func:`load_object` is the one importer of ``MODULE:NAME`` specifications (the ``calibrate``
command's encoder factories use it too).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

from mmrobust.errors import ConfigError

#: the entry-point group installed plug-ins declare
ENTRY_POINT_GROUP = "mmrobust.plugins"

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_installed_loaded = False


def import_plugin(module: str) -> ModuleType:
    """Import the plug-in ``module`` (a dotted module name, importable from ``sys.path`` or the
    current folder); importing it again is a no-op. Errors name the module in one line."""
    if not isinstance(module, str) or not _MODULE.fullmatch(module.strip()):
        raise ConfigError(f"plugin: {module!r} is not a module name like 'mypkg.plugin'", param="plugin")
    module = module.strip()
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))  # `--plugin my_encoders` finds my_encoders.py in the current folder
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"plugin '{module}': cannot import it ({exc})", param="plugin") from None
    except Exception as exc:  # the plug-in's own code failed: say where, in one line
        raise ConfigError(
            f"plugin '{module}': importing it raised {type(exc).__name__}: {exc}", param="plugin"
        ) from None
    return loaded


def import_plugins(modules: list[str] | tuple[str, ...]) -> list[ModuleType]:
    return [import_plugin(m) for m in modules]


def load_installed() -> list[str]:
    """Import every installed plug-in (entry-point group ``mmrobust.plugins``) once; a plug-in that
    fails to import gives a warning naming it and is skipped. Returns the modules imported."""
    global _installed_loaded
    if _installed_loaded:
        return []
    _installed_loaded = True
    done = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # one broken package must not break every command
            warnings.warn(
                f"installed mmrobust plug-in '{ep.name}' ({ep.value}) failed to import and is skipped: "
                f"{type(exc).__name__}: {exc}",
                stacklevel=2,
            )
            continue
        done.append(ep.value)
    return done


def load_object(spec: str, what: str = "object", param: str | None = None) -> Any:
    """The object named by ``"MODULE:NAME"`` (``NAME`` may be dotted: ``mod:Class.factory``)."""
    module, sep, name = spec.strip().rpartition(":")
    if not sep or not module or not name or not _MODULE.fullmatch(name):
        raise ConfigError(f"{what} '{spec}' must look like MODULE:NAME", param=param)
    if not _MODULE.fullmatch(module):
        raise ConfigError(f"{what} '{spec}': {module!r} is not a module name", param=param)
    obj: Any = import_plugin(module)
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} '{spec}': module '{module}' has no '{name}'", param=param)
        obj = getattr(obj, part)
    return obj
