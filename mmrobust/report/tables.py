"""Rich terminal tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from mmrobust.report.console import out
from mmrobust.report.markdown import fmt


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    table = Table(title=title)
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*(fmt(v) for v in row))
    out.print(table)
