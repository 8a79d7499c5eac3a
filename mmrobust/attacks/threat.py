"""The threat model: what an attacker may change, by how much, measured in which units.

:class:`ThreatModel` is the one value every attack, the AutoAttack protocol, the evaluation suites
and adversarial training take. It is parsed and validated once, here (:meth:`ThreatModel.parse`
accepts the strings users type: ``"0.5"``, ``"8/255"``, ``"image=8/255,audio=0.1"``), and the one
eps validator (:func:`check_eps`, :func:`parse_eps_value`, :func:`parse_eps_list`) lives here too.

Units (the convention; see docs/attacks.md, "Threat models and units"):

* **l-inf** budgets are per modality in each modality's *stored* units (``ModalitySpec.units``):
  ``image=8/255`` is 8/255 of the pixel range once images are stored as pixels in [0, 1]. One
  l-inf eps over several modalities means that eps in each one's units.
* **joint l2** budgets bound ``sum_m ||delta_m / s_m||^2 <= eps^2`` with per-modality scales
  ``s_m``; the default scale is the modality's normalization std (so a joint eps keeps its meaning
  in standardised space), 1 for data stored already standardised.
* **per-modality l2** radii are in stored units where the normalization is one scalar (images), and
  in standardised units (scale = std) where it is one value per coefficient.

The scales are applied by the packing (:class:`mmrobust.attacks.base.Packed` divides each
modality by its scale and multiplies back), so every attack algorithm runs unchanged in scaled
coordinates. A document without units reads as standardised (scales 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from mmrobust.data.base import STANDARDISED, DatasetMeta
from mmrobust.errors import ConfigError

NORMS = ("l2", "linf")
BUDGETS = ("joint", "per-modality")
#: the units of a modality when nothing (no dataset metadata) says what its values measure
INPUT_UNITS = "model input units"

Range = tuple[float, float]


# --- the one eps validator -------------------------------------------------------------------------
def check_eps(value: Any, param: str = "eps", what: str | None = None) -> float:
    """``value`` as a finite float >= 0, or a :class:`ConfigError` about ``param``."""
    what = what or param
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what}: eps must be a number, got {value!r}", param=param)
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{what}: eps must be finite and >= 0, got {value!r}", param=param)
    return v


def parse_eps_value(value: Any, param: str = "eps", what: str | None = None) -> float:
    """One eps: a number, or a string ``"0.5"`` / ``"8/255"``; checked by :func:`check_eps`."""
    what = what or param
    if isinstance(value, str):
        text = value.strip()
        try:
            v: Any = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"{what}: '{text}' is not a number or a fraction like 8/255", param=param) from None
        return check_eps(v, param, what)
    return check_eps(value, param, what)


def parse_eps_list(value: Any, param: str = "eps", what: str | None = None) -> list[float] | None:
    """``"2/255,4/255,0.5"`` (or a number, or a sequence) -> a list of eps; None stays None."""
    if value is None:
        return None
    items: Sequence[Any] = (
        value.split(",") if isinstance(value, str) else (value if isinstance(value, Sequence) else [value])
    )
    out = [parse_eps_value(item, param, what) for item in items if not (isinstance(item, str) and not item.strip())]
    if not out:
        raise ConfigError(f"{what or param}: no eps value given", param=param)
    return out


def parse_modality_eps(value: Any, known: Sequence[str] | None, param: str = "eps") -> dict[str, float] | None:
    """``"image=8/255,audio=0.1"`` or ``{"image": "8/255"}`` -> ``{modality: eps}``; None where
    ``value`` names no modality (a plain eps). Mixing ``name=eps`` and bare numbers is an error."""
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str) and "=" in value:
        parts = [t.strip() for t in value.split(",") if t.strip()]
        if any("=" not in t for t in parts):
            raise ConfigError(
                f"{param}: '{value}' mixes name=eps and bare values; give every modality as name=eps", param=param
            )
        items = [(t.partition("=")[0].strip(), t.partition("=")[2].strip()) for t in parts]
    else:
        return None
    if not items:
        raise ConfigError(f"{param}: no modality given", param=param)
    out: dict[str, float] = {}
    for name, v in items:
        if known and name not in known:
            raise ConfigError(f"{param}: unknown modality '{name}'; the model has: {', '.join(known)}", param=param)
        if name in out:
            raise ConfigError(f"{param}: modality '{name}' given twice", param=param)
        if isinstance(v, str) and "," in v:
            raise ConfigError(f"{param}: '{name}' takes one eps, got '{v}'", param=param)
        out[name] = parse_eps_value(v, param, f"{param} {name}")
    return out


def format_eps(eps: float | Mapping[str, float] | str) -> str:
    """``8/255`` for l-inf-style fractions, ``0.5`` otherwise, ``a=1,b=2`` for per-modality dicts."""
    if isinstance(eps, Mapping):
        return ",".join(f"{k}={format_eps(v)}" for k, v in eps.items())
    if isinstance(eps, int | float) and not isinstance(eps, bool):
        eps = float(eps)
        k = eps * 255
        if abs(k - round(k)) < 1e-6 and eps < 1 and round(k) != 0:
            return f"{round(k)}/255"
        return f"{eps:g}"
    return str(eps)


def _check_modalities(names: Sequence[str], known: Sequence[str] | None) -> tuple[str, ...]:
    names = [str(m) for m in names]
    if not names:
        raise ConfigError("modalities: no modality to attack", param="modalities")
    if len(set(names)) != len(names):
        raise ConfigError(f"modalities: modality listed twice in {names}", param="modalities")
    for m in names:
        if known and m not in known:
            raise ConfigError(f"modalities: unknown modality '{m}'; the model has: {', '.join(known)}",
                              param="modalities")  # fmt: skip
    return tuple(names)


def _scale_json(values: tuple[float, ...]) -> float | list[float]:
    return values[0] if len(values) == 1 else list(values)


@dataclass(frozen=True)
class ThreatModel:
    """A validated threat model (validated again on direct construction).

    Attributes:
        norm: ``"l2"`` or ``"linf"``.
        budget: ``"joint"`` (one eps over the attacked modalities together) or ``"per-modality"``.
        eps: a float (joint), or ``{modality: eps}`` for every attacked modality (per-modality).
        modalities: the attacked modalities; the others stay bit-identical.
        scales: per attacked modality, one scale or one per entry along ``scale_axes[m]``: the
            budget is measured on ``x_m / scale_m`` (1: in stored units).
        units: per attacked modality, what the budget of that modality measures.
        ranges: per attacked modality, the valid range in stored units (None: unbounded).
        scale_axes: the per-sample axis of multi-valued scales.
    """

    norm: str
    budget: str
    eps: float | Mapping[str, float]
    modalities: tuple[str, ...]
    scales: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    units: Mapping[str, str] = field(default_factory=dict)
    ranges: Mapping[str, Range | None] = field(default_factory=dict)
    scale_axes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"norm: unknown norm '{self.norm}'; choose from: {', '.join(NORMS)}", param="norm")
        if self.budget not in BUDGETS:
            raise ConfigError(f"budget: unknown budget '{self.budget}'; choose from: {', '.join(BUDGETS)}",
                              param="budget")  # fmt: skip
        mods = _check_modalities(list(self.modalities), None)
        set_ = object.__setattr__
        set_(self, "modalities", mods)
        if isinstance(self.eps, Mapping):
            if self.budget == "joint":
                raise ConfigError(
                    f"eps: a joint budget takes one eps, got {dict(self.eps)}; use budget='per-modality'", param="eps"
                )
            extra = [m for m in self.eps if m not in mods]
            if extra:
                raise ConfigError(f"eps: eps given for modality {extra} that is not attacked ({list(mods)})",
                                  param="eps")  # fmt: skip
            lacking = [m for m in mods if m not in self.eps]
            if lacking:
                raise ConfigError(f"eps: no eps for attacked modality {lacking}", param="eps")
            set_(self, "eps", {m: check_eps(self.eps[m], "eps", f"eps {m}") for m in mods})
        else:
            eps = check_eps(self.eps)
            set_(self, "eps", dict.fromkeys(mods, eps) if self.budget == "per-modality" else eps)
        scales: dict[str, tuple[float, ...]] = {}
        for m in mods:
            raw = self.scales.get(m, (1.0,))
            values = tuple(float(v) for v in (raw if isinstance(raw, Sequence) else (raw,)))
            if not values or not all(math.isfinite(v) and v > 0 for v in values):
                raise ConfigError(f"scales: the scale of '{m}' must be finite and > 0, got {raw!r}", param="scales")
            scales[m] = values
        unknown = [m for d in (self.scales, self.units, self.ranges) for m in d if m not in mods]
        if unknown:
            raise ConfigError(f"modalities: settings given for modality {sorted(set(unknown))} that is not attacked "
                              f"({list(mods)})", param="modalities")  # fmt: skip
        set_(self, "scales", scales)
        set_(self, "units", {m: str(self.units.get(m, STANDARDISED)) for m in mods})
        ranges: dict[str, Range | None] = {}
        for m in mods:
            r = self.ranges.get(m)
            ranges[m] = None if r is None else (float(r[0]), float(r[1]))
        set_(self, "ranges", ranges)
        set_(self, "scale_axes", {m: int(self.scale_axes.get(m, 0)) for m in mods if len(scales[m]) > 1})

    # --- construction from what users type ----------------------------------------------------
    @classmethod
    def parse(
        cls,
        meta: DatasetMeta | None,
        *,
        eps: Any,
        norm: str | None = None,
        budget: str | None = None,
        modalities: str | Sequence[str] | None = None,
        valid_range: Mapping[str, Range | None] | None = None,
        known: Sequence[str] | None = None,
        default_norm: str = "l2",
    ) -> ThreatModel:
        """The threat model of ``eps`` (``0.5``, ``"8/255"``, ``"image=8/255,audio=0.1"`` or a dict)
        on the dataset ``meta`` (its modalities, units, normalisations and valid ranges).

        ``budget`` defaults to ``per-modality`` for a per-modality eps, else ``joint``;
        ``modalities`` (a list or ``"audio,image"``) to the eps keys, else every modality; ``norm``
        to ``default_norm``. Without ``meta``, ``known`` names the modalities (units then read
        :data:`INPUT_UNITS`, scales 1). ``valid_range`` overrides the ranges of ``meta``.
        """
        norm = norm or default_norm
        if norm not in NORMS:
            raise ConfigError(f"norm: unknown norm '{norm}'; choose from: {', '.join(NORMS)}", param="norm")
        names = list(meta.modality_names) if meta is not None else list(known or [])
        per = parse_modality_eps(eps, names)
        if isinstance(modalities, str):
            modalities = [s.strip() for s in modalities.split(",") if s.strip()]
            if not modalities:
                raise ConfigError("modalities: no modality given", param="modalities")
        if budget is None:
            budget = "per-modality" if per is not None else "joint"
        if budget not in BUDGETS:
            raise ConfigError(f"budget: unknown budget '{budget}'; choose from: {', '.join(BUDGETS)}", param="budget")
        if per is not None:
            if budget == "joint":
                raise ConfigError(f"eps: a joint budget takes one eps, got {format_eps(per)}; use a per-modality "
                                  "budget", param="eps")  # fmt: skip
            if modalities is not None and set(modalities) != set(per):
                raise ConfigError(f"modalities {','.join(modalities)} differ from the modalities in eps "
                                  f"({','.join(per)}); give one of them", param="modalities")  # fmt: skip
            mods = _check_modalities(list(modalities) if modalities is not None else list(per), names)
            value: float | dict[str, float] = {m: per[m] for m in mods}
        else:
            value = parse_eps_value(eps)
            if modalities is None and not names:
                raise ConfigError("modalities: name the attacked modalities (no dataset metadata gives them)",
                                  param="modalities")  # fmt: skip
            mods = _check_modalities(list(modalities) if modalities is not None else names, names)
        if valid_range is not None:
            _check_modalities(list(valid_range), names or None)
        scales: dict[str, tuple[float, ...]] = {}
        axes: dict[str, int] = {}
        units: dict[str, str] = {}
        ranges: dict[str, Range | None] = {}
        for m in mods:
            spec = meta.spec(m) if meta is not None else None
            stored = spec.units if spec is not None else INPUT_UNITS
            normalization = spec.normalization if spec is not None else None
            scaled = normalization is not None and norm == "l2" and (budget == "joint" or not normalization.scalar)
            if scaled and normalization is not None:
                scales[m], axes[m] = tuple(normalization.std), normalization.axis
                units[m] = f"{STANDARDISED} ({stored} / std)"
            else:
                scales[m], units[m] = (1.0,), stored
            ranges[m] = spec.valid_range if spec is not None else None
            if valid_range is not None and m in valid_range:
                ranges[m] = valid_range[m]
        return cls(norm, budget, value, mods, scales, units, ranges, axes)

    @classmethod
    def coerce(
        cls,
        threat: ThreatModel | Any,
        meta: DatasetMeta | None = None,
        *,
        known: Sequence[str] | None = None,
        default_norm: str = "l2",
        **options: Any,
    ) -> ThreatModel:
        """``threat`` itself, or the threat model of an eps given with ``norm``/``budget``/
        ``modalities``/``valid_range`` (the keywords of earlier versions, parsed by :meth:`parse`)."""
        if isinstance(threat, ThreatModel):
            given = sorted(k for k, v in options.items() if v is not None)
            if given:
                raise ConfigError(f"{', '.join(given)}: already set by the threat model; give one or the other",
                                  param=given[0])  # fmt: skip
            return threat
        bad = sorted(set(options) - {"norm", "budget", "modalities", "valid_range"})
        if bad:
            raise ConfigError(f"unknown threat setting {', '.join(bad)}", param=bad[0])
        if threat is None:
            raise ConfigError("eps: no budget given", param="eps")
        return cls.parse(meta, eps=threat, known=known, default_norm=default_norm, **options)

    # --- derived views ------------------------------------------------------------------------
    @property
    def eps_map(self) -> dict[str, float]:
        """The eps of every attacked modality."""
        if isinstance(self.eps, Mapping):
            return dict(self.eps)
        return dict.fromkeys(self.modalities, float(self.eps))

    @property
    def eps_value(self) -> float | dict[str, float]:
        """One float where every attacked modality has the same eps, else the dict (what rows store)."""
        values = self.eps_map
        return next(iter(values.values())) if len(set(values.values())) == 1 else values

    @property
    def scaled(self) -> bool:
        """Whether any attacked modality is measured in other than its stored units."""
        return any(v != 1.0 for s in self.scales.values() for v in s)

    def with_eps(self, eps: Any) -> ThreatModel:
        """The same threat model with another eps (a number, a string or a per-modality dict)."""
        if isinstance(eps, Mapping) or (isinstance(eps, str) and "=" in eps):
            per = parse_modality_eps(eps, list(self.modalities))
            assert per is not None
            return replace(self, budget="per-modality" if self.budget == "joint" else self.budget, eps=per)
        return replace(self, eps=parse_eps_value(eps))

    def restrict(self, modalities: Sequence[str]) -> ThreatModel:
        """The same threat model on a subset of its modalities."""
        keep = [m for m in self.modalities if m in modalities]
        eps = {m: self.eps_map[m] for m in keep} if isinstance(self.eps, Mapping) else self.eps
        return ThreatModel(self.norm, self.budget, eps, tuple(keep), {m: self.scales[m] for m in keep},
                           {m: self.units[m] for m in keep}, {m: self.ranges[m] for m in keep},
                           {m: a for m, a in self.scale_axes.items() if m in keep})  # fmt: skip

    def describe(self) -> str:
        """A label stating the units, e.g. ``l-inf 8/255 (image: pixel intensity in [0, 1])``."""
        norm = "l-inf" if self.norm == "linf" else "l2"
        parts = [norm]
        if len(self.modalities) > 1 or self.budget == "per-modality":
            parts.append(self.budget)
        parts.append(format_eps(self.eps_value))
        by_unit: dict[str, list[str]] = {}
        for m in self.modalities:
            unit = self.units[m]
            s = self.scales[m]
            if s != (1.0,) and "/ std" not in unit:
                unit += f" / {format_eps(s[0]) if len(s) == 1 else 'per-coefficient scale'}"
            by_unit.setdefault(unit, []).append(m)
        parts.append("(" + "; ".join(f"{', '.join(ms)}: {u}" for u, ms in by_unit.items()) + ")")
        return " ".join(parts)

    @property
    def label(self) -> str:
        return self.describe()

    def units_fields(self) -> dict[str, Any]:
        """``{"units": {m: ...}, "scales": {m: ...}}``: what every budget field in a result carries."""
        out: dict[str, Any] = {"units": dict(self.units),
                               "scales": {m: _scale_json(s) for m, s in self.scales.items()}}  # fmt: skip
        if self.scale_axes:
            out["scale_axes"] = dict(self.scale_axes)
        return out

    # --- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        eps: Any = dict(self.eps) if isinstance(self.eps, Mapping) else self.eps
        return {"norm": self.norm, "budget": self.budget, "eps": eps, "modalities": list(self.modalities),
                **self.units_fields(),
                "ranges": {m: None if r is None else list(r) for m, r in self.ranges.items()}}  # fmt: skip

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ThreatModel:
        """Read :meth:`to_json` back; a document without units/scales reads as standardised, scale 1."""
        scales = {m: tuple(v) if isinstance(v, list | tuple) else (float(v),) for m, v in d.get("scales", {}).items()}
        ranges = {m: None if r is None else (float(r[0]), float(r[1])) for m, r in d.get("ranges", {}).items()}
        return cls(str(d["norm"]), str(d["budget"]), d["eps"], tuple(d["modalities"]), scales,
                   dict(d.get("units", {})), ranges, dict(d.get("scale_axes", {})))  # fmt: skip


def units_of(
    meta: DatasetMeta | None, modalities: Sequence[str], norm: str | None, budget: str | None
) -> dict[str, Any]:
    """The ``units``/``scales`` fields of a budget on ``modalities`` (as :meth:`ThreatModel.parse` sets them)."""
    if not modalities or norm is None:
        return {}
    known = meta.modality_names if meta is not None else list(modalities)
    return ThreatModel.parse(meta, eps=0.0, norm=norm, budget=budget or "joint", modalities=list(modalities),
                             known=known).units_fields()  # fmt: skip
