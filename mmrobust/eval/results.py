"""Typed evaluation results and their JSON form (``eval.json``), produced here and nowhere else.

A suite returns an :class:`EvalResult`: one :class:`EvalRow` per (threat setting, loss), the
per-setting worst case (:class:`WorstCase`), the gradient-masking report and the warnings.
:meth:`EvalResult.to_json` writes the ``eval.json`` document (the keys are stable: older files stay
readable) and :meth:`EvalResult.from_json` reads one back.

``eval.json`` schema version 2 (:data:`SCHEMA_VERSION`) adds the top-level ``schema_version`` and
names the suite's settings ``parameters``; the same block is still written under its old key
``protocol`` as well, and files without ``schema_version`` (version 1: ``protocol`` only) are read.

Every row with a budget carries its units per modality (``"units": {modality: ...}`` and
``"scales"``, see :class:`~mmrobust.attacks.threat.ThreatModel`); a row read without them is in
standardised units, scale 1 (what every file written before units existed measured).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mmrobust.attacks.autoattack import components_label
from mmrobust.attacks.threat import format_eps
from mmrobust.data.base import STANDARDISED
from mmrobust.errors import RunError

#: version of the ``eval.json`` document written by :meth:`EvalResult.to_json`
SCHEMA_VERSION = 2
#: what identifies a threat setting (everything but the loss and the numbers)
KEY_FIELDS = ("attack", "norm", "modalities", "budget", "eps", "steps", "fill")
_CORE = ("attack", "loss", "norm", "modalities", "budget", "eps", "steps")


@dataclass
class EvalRow:
    """Accuracy under one attack setting with one loss (``loss="worst"``: the per-sample worst case
    over the losses of that setting; ``None`` for settings without a loss such as a missing modality).

    ``eps`` is a float, or a per-modality dict for per-modality budgets with different values;
    ``extra`` keeps attack-specific descriptors (restarts, step size, components, ...).
    """

    attack: str
    loss: str | None
    norm: str | None
    modalities: tuple[str, ...]
    budget: str | None
    eps: float | dict[str, float] | None
    steps: int | None
    accuracy: float
    macro_f1: float
    fill: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_setting(cls, setting: Mapping[str, Any], accuracy: float, macro_f1: float) -> EvalRow:
        """A row from an attack's ``describe()`` dict (its unknown keys go to ``extra``)."""
        s = dict(setting)
        core = {k: s.pop(k, None) for k in _CORE}
        fill = s.pop("fill", None)
        for k in ("accuracy", "macro_f1"):
            s.pop(k, None)
        if core["eps"] is not None and "units" not in s:  # written before units: standardised, scale 1
            mods = list(core["modalities"] or ())
            s["units"], s["scales"] = dict.fromkeys(mods, STANDARDISED), dict.fromkeys(mods, 1.0)
        return cls(
            attack=str(core["attack"]), loss=core["loss"], norm=core["norm"],
            modalities=tuple(core["modalities"] or ()), budget=core["budget"], eps=core["eps"], steps=core["steps"],
            accuracy=float(accuracy), macro_f1=float(macro_f1), fill=fill, extra=s,
        )  # fmt: skip

    def setting(self) -> dict[str, Any]:
        """The setting fields without the numbers (what :meth:`from_setting` takes)."""
        d = self.to_json()
        del d["accuracy"], d["macro_f1"]
        return d

    @property
    def key(self) -> tuple:
        """What identifies the threat setting of this row (rows of different losses share it)."""
        eps = tuple(sorted(self.eps.items())) if isinstance(self.eps, dict) else self.eps
        units = tuple(sorted(self.units.items()))
        return (self.attack, self.norm, self.modalities, self.budget, eps, self.steps, self.fill, units)

    @property
    def units(self) -> dict[str, str]:
        """What the budget of each attacked modality measures (empty for a row without a budget)."""
        return dict(self.extra.get("units") or {})

    @property
    def units_label(self) -> str:
        """``image: pixel intensity in [0, 1]; audio: standardised`` (modalities sharing units together)."""
        by_unit: dict[str, list[str]] = {}
        for m, u in self.units.items():
            by_unit.setdefault(u, []).append(m)
        return "; ".join(f"{', '.join(ms)}: {u}" for u, ms in by_unit.items())

    @property
    def label(self) -> str:
        """A short human label, e.g. ``pgd-l2 audio+image eps 0.5``."""
        mods = "+".join(self.modalities)
        if self.attack == "missing":
            return f"{mods} missing"
        attack = self.attack
        if attack == "autoattack" and self.extra.get("dropped"):
            attack = components_label(list(self.extra.get("components") or []), self.extra["dropped"],
                                      self.extra.get("num_classes"))  # fmt: skip
        parts = [attack, mods]
        if self.budget == "per-modality":
            parts.append("per-modality")
        if self.eps is not None:
            parts.append(f"eps {fmt_eps(self.eps)}")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"attack": self.attack, "loss": self.loss, "norm": self.norm,
                             "modalities": list(self.modalities), "budget": self.budget, "eps": self.eps,
                             "steps": self.steps}  # fmt: skip
        if self.fill is not None:
            d["fill"] = self.fill
        return {**d, **self.extra, "accuracy": self.accuracy, "macro_f1": self.macro_f1}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EvalRow:
        return cls.from_setting(d, d["accuracy"], d.get("macro_f1", float("nan")))


def fmt_eps(eps: float | dict[str, float] | str) -> str:
    """``8/255`` for l-inf-style fractions, ``0.5`` otherwise, ``a=1,b=2`` for per-modality dicts."""
    return format_eps(eps)


@dataclass
class SettingWorst:
    """The worst accuracy over the rows of one threat setting, and each loss's accuracy beside it."""

    setting: str
    accuracy: float
    by_loss: dict[str, float] = field(default_factory=dict)


@dataclass
class WorstCase:
    """Lowest accuracy over all rows (``accuracy``), per attack name and per threat setting."""

    accuracy: float | None
    by_attack: dict[str, float]
    by_setting: list[SettingWorst]

    @classmethod
    def of(cls, rows: list[EvalRow]) -> WorstCase:
        by_attack: dict[str, float] = {}
        settings: dict[tuple, SettingWorst] = {}
        for r in rows:
            by_attack[r.attack] = min(by_attack.get(r.attack, 1.0), r.accuracy)
            s = settings.setdefault(r.key, SettingWorst(r.label, 1.0))
            s.accuracy = min(s.accuracy, r.accuracy)
            if r.loss:
                s.by_loss[r.loss] = r.accuracy
        return cls(min(by_attack.values()) if by_attack else None, by_attack, list(settings.values()))

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "by_attack": dict(self.by_attack),
            "by_setting": [{"setting": s.setting, "accuracy": s.accuracy, **s.by_loss} for s in self.by_setting],
        }


@dataclass
class Underflow:
    """Share of correctly classified samples whose CE input gradient is exactly zero."""

    share: float
    zero_gradient: int
    correct: int
    median_max_abs_logit: float | None


@dataclass
class MaskingGap:
    setting: str
    ce: float
    cw: float
    gap: float
    flagged: bool


@dataclass
class MaskingReport:
    """Both gradient-masking signals: CE-vs-CW gaps per setting and CE-gradient underflow."""

    suspected: bool
    underflow: Underflow | None
    gaps: list[MaskingGap]
    gap_threshold: float
    underflow_threshold: float

    @property
    def max_ce_cw_gap(self) -> float | None:
        return max((g.gap for g in self.gaps), default=None)

    def to_json(self) -> dict[str, Any]:
        u = self.underflow
        return {
            "suspected": self.suspected,
            "ce_gradient_underflow": None if u is None else vars(u).copy(),
            "max_ce_cw_gap": self.max_ce_cw_gap,
            "gap_threshold": self.gap_threshold,
            "underflow_threshold": self.underflow_threshold,
            "gaps": [vars(g).copy() for g in self.gaps],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MaskingReport:
        u = d.get("ce_gradient_underflow")
        return cls(
            bool(d["suspected"]), Underflow(**u) if u else None, [MaskingGap(**g) for g in d.get("gaps", [])],
            d["gap_threshold"], d["underflow_threshold"],
        )  # fmt: skip


@dataclass
class Curves:
    """Accuracy vs eps: ``targets[label][loss]`` lists one accuracy per ``eps`` (0 = clean);
    ``units[label]`` the units and scales of the eps of that target (standardised where absent)."""

    attack: str
    norm: str
    eps: list[float]
    clean_accuracy: float
    targets: dict[str, dict[str, list[float]]]
    units: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label in self.targets:
            if label not in self.units:
                mods = label.split("+")
                self.units[label] = {"units": dict.fromkeys(mods, STANDARDISED), "scales": dict.fromkeys(mods, 1.0)}

    def to_json(self) -> dict[str, Any]:
        return {"attack": self.attack, "norm": self.norm, "eps": list(self.eps), "units": dict(self.units),
                "clean_accuracy": self.clean_accuracy, "targets": self.targets}  # fmt: skip


@dataclass
class Setting:
    """One threat setting of an evaluation: its first row, and the accuracy per loss (``worst`` always
    present: the row of that name, else the lowest of the setting's rows, e.g. its only one)."""

    label: str
    row: EvalRow
    acc: dict[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """CE minus CW accuracy, where both ran."""
        return self.acc["ce"] - self.acc["cw"] if "ce" in self.acc and "cw" in self.acc else None


@dataclass
class EvalResult:
    """What an evaluation suite computed on one split.

    ``parameters`` records the settings the suite ran with (eps grid, steps, losses, seed, samples;
    ``protocol`` in ``eval.json`` files of schema version 1); ``plots`` names PNG files a presenter
    wrote beside the result (empty from the core).
    """

    suite: str
    split: str
    clean_accuracy: float
    clean_macro_f1: float
    rows: list[EvalRow]
    masking: MaskingReport
    warnings: list[str]
    parameters: dict[str, Any]
    curves: Curves | None = None
    plots: list[str] = field(default_factory=list)

    @property
    def worst_case(self) -> WorstCase:
        return WorstCase.of(self.rows)

    @property
    def protocol(self) -> dict[str, Any]:
        """Old name of :attr:`parameters` (read-only; kept for callers written before schema version 2)."""
        return self.parameters

    @property
    def samples(self) -> int:
        return int(self.parameters.get("samples", 0))

    def settings(self) -> list[Setting]:
        """The rows grouped by threat setting, in the order of the rows (a row without a loss, such as
        a missing modality, files its accuracy under ``worst``: it is the only number for that setting)."""
        groups: dict[tuple, Setting] = {}
        for r in self.rows:
            groups.setdefault(r.key, Setting(r.label, r)).acc[r.loss or "worst"] = r.accuracy
        for g in groups.values():
            g.acc.setdefault("worst", min(g.acc.values()))
        return list(groups.values())

    def to_json(self) -> dict[str, Any]:
        """The ``eval.json`` document."""
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "suite": self.suite,
            "split": self.split,
            "clean_accuracy": self.clean_accuracy,
            "clean_macro_f1": self.clean_macro_f1,
            "results": [r.to_json() for r in self.rows],
            "worst_case": self.worst_case.to_json(),
            "warnings": list(self.warnings),
            "gradient_masking": self.masking.to_json(),
            "parameters": dict(self.parameters),
            "protocol": dict(self.parameters),  # the old key, for readers of schema version 1
        }
        if self.curves is not None:
            d["curves"] = self.curves.to_json()
        if self.plots:
            d["plots"] = list(self.plots)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EvalResult:
        """Read an ``eval.json`` document back (the derived ``worst_case`` block is recomputed); files of
        schema version 1 (no ``schema_version``, the settings under ``protocol``) are read as well."""
        version = d.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise RunError(
                f"eval.json: schema_version {version!r} is newer than this mmrobust reads ({SCHEMA_VERSION})"
            )
        c = d.get("curves")
        parameters = d.get("parameters", d.get("protocol", {}))
        return cls(
            suite=d["suite"], split=d["split"], clean_accuracy=d["clean_accuracy"],
            clean_macro_f1=d.get("clean_macro_f1", float("nan")), rows=[EvalRow.from_json(r) for r in d["results"]],
            masking=MaskingReport.from_json(d["gradient_masking"]), warnings=list(d.get("warnings", [])),
            parameters=dict(parameters), curves=Curves(**c) if c else None, plots=list(d.get("plots", [])),
        )  # fmt: skip
