"""Terminal output: one rich console and progress bars that vanish when not wanted."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

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


def _console(stream: TextIO, stderr: bool) -> Console:
    """A console that never wraps a line when the stream is not a terminal (a log file or a pipe gets
    paths and table rows whole; a terminal keeps rich's layout at its own width)."""
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=_PIPE_WIDTH)


#: the layout width when output goes to a file or a pipe (tables take only the width they need)
_PIPE_WIDTH = 1000
console = _console(sys.stderr, stderr=True)
out = _console(sys.stdout, stderr=False)


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
