"""Experiment logs of a training run, written into the run folder as it trains.

``train(..., log=("csv", "tensorboard"))`` (CLI: ``--log csv,tensorboard``) writes ``RUN/logs/``:

* ``csv``: ``logs/metrics.csv``, one row per epoch with every number of the epoch's history row
  (nested values flattened as ``key.sub``), rewritten from the history after each epoch (so a resumed
  run lists each epoch once);
* ``tensorboard``: TensorBoard event files under ``logs/tensorboard/`` (scalars ``epoch/<key>``),
  through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package: ``pip install
  'mmrobust[tensorboard]'``).

Library messages also go to Python's :mod:`logging` (logger ``mmrobust``; silent unless the caller
configures logging).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mmrobust.errors import ConfigError
from mmrobust.io import atomic_write_bytes

#: the experiment loggers a run can write
LOGGERS = ("csv", "tensorboard")


def check_loggers(names: Iterable[str] | str | None) -> tuple[str, ...]:
    """The logger names, validated (unknown names and a missing TensorBoard are one-line errors)."""
    if names is None:
        return ()
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    items = [n for n in items if n]
    unknown = [n for n in items if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"log: unknown logger(s) {unknown}; choose from: {', '.join(LOGGERS)}", param="log")
    if "tensorboard" in items:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "log: tensorboard needs the 'tensorboard' package (pip install 'mmrobust[tensorboard]')", param="log"
            ) from None
    return tuple(dict.fromkeys(items))


def flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a history row, nested keys joined with dots (booleans as 0/1)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
    return out


class EpochLogs:
    """The loggers of one run (``names`` as checked by :func:`check_loggers`); :meth:`update` after
    every epoch with the whole history. ``logged``: epochs a previous attempt already sent to
    TensorBoard (a resumed run starts after them)."""

    def __init__(self, names: tuple[str, ...], folder: Path, logged: int = 0) -> None:
        self.names = names
        self.folder = Path(folder) / "logs"
        self._writer: Any = None
        self._written = logged  # epochs already sent to TensorBoard

    def update(self, history: list[dict[str, Any]]) -> None:
        if not self.names:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        rows = [flatten(r) for r in history]
        if "csv" in self.names:
            columns = list(dict.fromkeys(k for r in rows for k in r))
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: (int(v) if k == "epoch" else v) for k, v in r.items()})
            atomic_write_bytes(self.folder / "metrics.csv", buf.getvalue().encode())
        if "tensorboard" in self.names:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.folder / "tensorboard"))
            for r in rows[self._written :]:
                step = int(r.get("epoch", len(rows)))
                for key, value in r.items():
                    if key != "epoch":
                        self._writer.add_scalar(f"epoch/{key}", value, step)
            self._written = len(rows)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
