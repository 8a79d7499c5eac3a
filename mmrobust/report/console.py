"""Terminal output: one rich console and progress bars that vanish when not wanted."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mmrobust.progress import ProgressFn

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def echo(line: str) -> None:
    """One plain line on stderr (no rich markup): training's epoch lines, status lines."""
    console.print(line, markup=False)


class _NullProgress:
    def add_task(self, *args: object, **kwargs: object) -> TaskID:
        return TaskID(0)

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


@contextmanager
def progress_callback(enabled: bool = True) -> Iterator[ProgressFn | None]:
    """A :data:`~mmrobust.eval.results.ProgressFn` drawing one transient bar per description
    (None when disabled or stderr is not a terminal: the core then reports nothing)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True,
    )  # fmt: skip
    tasks: dict[str, TaskID] = {}

    def update(description: str, done: int, total: int) -> None:
        if description not in tasks:
            tasks[description] = bar.add_task(description, total=total)
        bar.update(tasks[description], completed=done, total=total)

    with bar:
        yield update
