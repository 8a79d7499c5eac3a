"""Comparison tables across methods in the CRMT paper's layout, cells as mean ± std over seeds.

Two tables per dataset from the evaluations of every (method, seed):

* ``multimodal``: clean accuracy, then every attack on all modalities jointly;
* ``unimodal``: every attack on one modality alone, then each modality missing.

Each attack setting gives a ``worst`` column (the per-sample worst case over the attack losses: the
number to trust) and one column per loss beside it (``CE``, ``CW``). With the paper's protocol
evaluated as well, its CE-only PGD accuracy gets a column beside the strong attack's. A cell holds
the mean and the sample standard deviation (``n - 1`` in the denominator) over the seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmrobust.eval.results import EvalResult, Setting
from mmrobust.eval.robust import is_masking_gap

_LOSS_COLUMNS = ("ce", "cw", "dlr")


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of one number over seeds (``std`` is None for one seed)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


@dataclass(frozen=True)
class Column:
    """``setting``: the threat setting's label (``clean`` for clean accuracy); ``kind``: ``worst``,
    a loss name, ``paper`` (the paper protocol's CE-only PGD) or ``value`` (a plain number such as
    a training time); ``key``: the setting's
    :attr:`~mmrobust.eval.results.EvalRow.key` (None for clean); ``unit``: what the numbers are."""

    setting: str
    kind: str
    key: tuple | None = None
    unit: str = "accuracy"  # or e.g. "s" for a time

    @property
    def header(self) -> str:
        if self.setting == "clean" or self.kind == "value":
            return self.setting
        if self.kind == "paper":
            return f"{self.setting} paper protocol (CE)"
        return f"{self.setting} {self.kind if self.kind == 'worst' else self.kind.upper()}"


@dataclass
class ComparisonTable:
    """``rows[method][i]`` is the :class:`Stat` of ``columns[i]`` (None where the method has no such number);
    ``masked[method]`` holds the column indexes where some seed's CE accuracy exceeded its CW accuracy by
    more than the gradient-masking threshold under an iterative attack."""

    name: str
    title: str
    dataset: str
    columns: list[Column]
    rows: dict[str, list[Stat | None]]
    notes: list[str] = field(default_factory=list)
    masked: dict[str, set[int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "dataset": self.dataset,
            "columns": [c.header for c in self.columns],
            "rows": {m: [s.to_json() if s else None for s in stats] for m, stats in self.rows.items()},
            "notes": list(self.notes),
            "masked": {m: sorted(cols) for m, cols in self.masked.items() if cols},
        }


def _all_modalities(results: Sequence[EvalResult]) -> tuple[str, ...]:
    mods: dict[str, None] = {}
    for r in results:
        for row in r.rows:
            mods.update(dict.fromkeys(row.modalities))
    return tuple(mods)


def _columns(settings: Sequence[Setting], with_clean: bool) -> list[Column]:
    cols = [Column("clean", "worst")] if with_clean else []
    for s in settings:
        cols.append(Column(s.label, "worst" if s.row.loss else "value", s.row.key))
        cols += [Column(s.label, loss, s.row.key) for loss in _LOSS_COLUMNS if loss in s.acc]
    return cols


def _cell(results: Sequence[EvalResult], col: Column) -> Stat | None:
    """The column's number in each result (one per seed) as a :class:`Stat`."""
    values = []
    for r in results:
        if col.key is None:
            values.append(r.clean_accuracy)
            continue
        found = next((s for s in r.settings() if s.row.key == col.key), None)
        # the paper protocol is CE-only; a setting without losses (a missing modality) has one number
        kind = {"paper": "ce", "value": "worst"}.get(col.kind, col.kind)
        if found is not None and kind in found.acc:
            values.append(found.acc[kind])
    return stat(values)


def _masked(results: Sequence[EvalResult], col: Column) -> bool:
    """Whether any result flags gradient masking on the column's setting (CE above CW by > threshold)."""
    return any(is_masking_gap(s.gap, s.row.steps) for r in results for s in r.settings() if s.row.key == col.key)


def stat(values: Sequence[float | None]) -> Stat | None:
    """The :class:`Stat` of the finite values given (None if there are none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return Stat(tuple(finite)) if finite else None


def comparison_tables(
    dataset: str,
    evals: Mapping[str, Sequence[EvalResult]],
    paper_attack: Mapping[str, Sequence[EvalResult]] | None = None,
    notes: Sequence[str] = (),
) -> list[ComparisonTable]:
    """The ``multimodal`` and ``unimodal`` tables (a table without columns is left out).

    ``evals`` maps a method to its evaluations, one per seed (all from the same suite and settings);
    ``paper_attack`` the same under the paper's CE-only attack settings (its PGD rows become columns).
    """
    every = [r for rs in evals.values() for r in rs]
    if not every:
        return []
    all_mods = _all_modalities(every)
    # the union of settings over all methods and seeds, in order of first appearance
    joint: dict[tuple, Setting] = {}
    single: dict[tuple, Setting] = {}
    paper_joint: dict[tuple, Setting] = {}
    paper_single: dict[tuple, Setting] = {}

    def is_joint(s: Setting) -> bool:
        return set(s.row.modalities) == set(all_mods) and s.row.attack != "missing"

    for r in every:
        for s in r.settings():
            (joint if is_joint(s) else single).setdefault(s.row.key, s)
    for r in (r for rs in (paper_attack or {}).values() for r in rs):
        for s in r.settings():
            if s.row.attack.startswith("pgd"):  # the protocol's FGM equals the strong suite's CE column
                (paper_joint if is_joint(s) else paper_single).setdefault(s.row.key, s)

    tables = []
    for name, title, settings, with_clean, extra in (
        ("multimodal", "Multi-modal attacks (all modalities jointly)", joint, True, paper_joint),
        ("unimodal", "Uni-modal attacks and missing modalities", single, False, paper_single),
    ):
        cols = _columns(list(settings.values()), with_clean)
        cols += [Column(s.label, "paper", key) for key, s in extra.items()]
        if len(cols) <= (1 if with_clean else 0):
            continue
        rows = {
            method: [_cell((paper_attack or {}).get(method, ()) if c.kind == "paper" else evals[method], c)
                     for c in cols]
            for method in evals
        }  # fmt: skip
        masked = {m: {i for i, c in enumerate(cols) if c.kind == "worst" and _masked(evals[m], c)} for m in evals}
        tables.append(ComparisonTable(name, title, dataset, cols, rows, list(notes), masked))
    return tables
