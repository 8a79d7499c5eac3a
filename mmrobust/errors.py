"""User-facing errors.

Anything the user can fix (a bad option, a malformed file, a missing dataset) raises a subclass of
:class:`MMRobustError`. The library speaks Python: a message names the Python parameter (e.g.
``max_samples must be >= 1, got 0``) and carries its name as data in ``param``; the CLI maps that
name to its flag (``--max-samples must be >= 1, got 0``), prints the message on one line and exits
with code 2, without a traceback. Any other exception is a bug in mmrobust and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class MMRobustError(Exception):
    """Base class of errors caused by user input or the environment, not by a bug.

    ``param`` is the name of the Python parameter or option the message is about (as written in
    the message), a tuple of names when it is about several, or None; front ends use it to speak
    their own words (a CLI flag). ``name=True`` in a message reads as "pass ``name``".
    """

    def __init__(self, message: str = "", *, param: str | tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.param = param

    @property
    def params(self) -> tuple[str, ...]:
        """The parameter names the message is about (empty when none)."""
        if self.param is None:
            return ()
        return (self.param,) if isinstance(self.param, str) else tuple(self.param)

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``param`` across pickling (worker processes)
        return (_rebuild, (type(self), str(self), self.param))


def _rebuild(cls: type[MMRobustError], message: str, param: str | tuple[str, ...] | None) -> MMRobustError:
    return cls(message, param=param)


class ConfigError(MMRobustError, ValueError):
    """An option, flag or configuration value is invalid."""


class DataError(MMRobustError, ValueError):
    """A dataset is malformed, inconsistent or cannot be obtained."""


class RunError(MMRobustError):
    """A run folder is missing, incomplete or corrupt."""
