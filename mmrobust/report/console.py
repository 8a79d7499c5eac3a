"""Terminal output: one rich console and progress bars that vanish when not wanted."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class _NullProgress:
    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        pass

    def advance(self, *args: object, **kwargs: object) -> None:
        pass


@contextmanager
def progress(enabled: bool = True) -> Iterator[Progress | _NullProgress]:
    """A transient progress bar on stderr; a no-op when disabled or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield _NullProgress()
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )  # fmt: skip
    with bar:
        yield bar
