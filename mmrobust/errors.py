"""User-facing errors.

Anything the user can fix (a bad flag, a malformed file, a missing dataset) raises a subclass of
:class:`MMRobustError`. The CLI prints its message on one line and exits with code 2, without a
traceback; any other exception is a bug in mmrobust and keeps its traceback.
"""

from __future__ import annotations


class MMRobustError(Exception):
    """Base class of errors caused by user input or the environment, not by a bug."""


class ConfigError(MMRobustError, ValueError):
    """An option, flag or configuration value is invalid."""


class DataError(MMRobustError, ValueError):
    """A dataset is malformed, inconsistent or cannot be obtained."""


class RunError(MMRobustError):
    """A run folder is missing, incomplete or corrupt."""
