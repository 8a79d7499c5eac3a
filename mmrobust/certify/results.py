"""What ``mmrobust certify`` computed, typed, and its JSON form (one ``certify.json`` entry).

:class:`CertifyResult` wraps one :class:`~mmrobust.certify.base.Certificate` with the radius grid,
the split name and the optional soundness check; certified accuracy and the radius summary are
derived from the per-sample radii. :meth:`CertifyResult.to_json` is the only place the entry is
built; the keys of older files (``estimator``, ``guarantee``, ``certified_accuracy``, ``radii``,
``vulnerability``, ...) are kept. The document (:meth:`CertifyResult.document`) has a
``schema_version`` (:data:`SCHEMA_VERSION`); its per-certifier entries are under ``certifiers`` and,
for one release, also under the older key ``estimators``. :func:`normalize_certify` reads any version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from mmrobust.certify.base import Certificate, Guarantee
from mmrobust.certify.radius import certified_accuracy
from mmrobust.certify.tightness import Tightness
from mmrobust.data.base import STANDARDISED
from mmrobust.errors import ConfigError
from mmrobust.runs import Run

#: version of the ``certify.json`` layout (2: entries under ``certifiers``, ``estimators`` kept beside it)
SCHEMA_VERSION = 2

#: default radius grid (l2, in the model's input space) for certified accuracy
DEFAULT_RADII = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _median(x: torch.Tensor) -> float | None:
    return float(x.double().median()) if x.numel() else None


@dataclass(frozen=True)
class AccuracyCurve(Sequence[float]):
    """Certified accuracy against the radius: ``accuracy[i]`` at ``radii[i]`` (l2 norms of
    ``delta_m / scales[m]`` in ``units[m]``), for ``threat`` (``joint`` or one modality) and the
    certifier named in ``label``. Iterates, indexes and compares like the list of accuracies."""

    radii: tuple[float, ...]
    accuracy: tuple[float, ...]
    threat: str
    label: str
    units: dict[str, str] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    @overload
    def __getitem__(self, i: int) -> float: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[float]: ...
    def __getitem__(self, i: int | slice) -> float | Sequence[float]:
        return self.accuracy[i]

    def __len__(self) -> int:
        return len(self.accuracy)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AccuracyCurve):
            return (self.radii, self.accuracy, self.threat) == (other.radii, other.accuracy, other.threat)
        return isinstance(other, list | tuple) and list(self.accuracy) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def at(self, radius: float) -> float:
        """The certified accuracy at a grid radius (a radius not on the grid is refused)."""
        if radius not in self.radii:
            raise ConfigError(f"radius {radius:g} is not on the grid {list(self.radii)}", param="radius")
        return self.accuracy[self.radii.index(radius)]


@dataclass
class CertifyResult:
    """One certifier's result on one split.

    ``options``: the certifier's options as used (JSON-able); ``fit_split``: the split its
    ``fit_data`` came from, if it read any; ``soundness``: the attack check of
    :func:`~mmrobust.certify.soundness.soundness_check`, if run.
    """

    certificate: Certificate
    split: str
    grid: list[float]
    options: dict[str, Any] = field(default_factory=dict)
    fit_split: str | None = None
    soundness: dict[str, Any] | None = None
    tightness: Tightness | None = None  # certified vs smallest attack radius (joint l2), if measured
    #: what each modality's radius measures, and its scale (radii are l2 norms of ``delta_m / scale_m``);
    #: the certifiers measure in the model's input space: the stored units, scale 1
    units: dict[str, str] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    def radius_units(self) -> dict[str, Any]:
        """``{"units": ..., "scales": ...}`` per modality (standardised, scale 1 where not recorded)."""
        mods = list(self.certificate.radii.unimodal)
        return {"units": {m: self.units.get(m, STANDARDISED) for m in mods},
                "scales": {m: self.scales.get(m, 1.0) for m in mods}}  # fmt: skip

    @property
    def name(self) -> str:
        return self.certificate.certifier

    @property
    def key(self) -> str:
        """The ``certify.json`` entry name: the certifier, plus ``@<theorem>`` for a non-default theorem."""
        theorem = self.options.get("theorem", "auto")
        return self.name if theorem == "auto" else f"{self.name}@{theorem}"

    @property
    def is_guarantee(self) -> bool:
        """Only a sound certificate is a guarantee; a probabilistic one holds except with probability alpha."""
        return self.certificate.guarantee is Guarantee.SOUND

    @property
    def n(self) -> int:
        return int(self.certificate.labels.numel())

    @property
    def clean_accuracy(self) -> float:
        return float(self.certificate.radii.correct.double().mean())

    def accuracy_curve(self, threat: str = "joint") -> AccuracyCurve:
        """Certified accuracy at every grid radius for ``joint`` or one modality alone, with its radii,
        label and units (it reads like the list of accuracies)."""
        r = self.certificate.radii
        if threat != "joint" and threat not in r.unimodal:
            choices = ", ".join(["joint", *r.unimodal])
            raise ConfigError(f"unknown threat '{threat}'; choose from: {choices}", param="threat")
        acc = certified_accuracy(r.joint if threat == "joint" else r.unimodal[threat], self.grid)
        c = self.certificate
        kind = c.guarantee.value + (f", alpha={c.alpha:g}" if c.alpha is not None else "")
        mods = list(r.unimodal) if threat == "joint" else [threat]
        units = self.radius_units()
        return AccuracyCurve(
            radii=tuple(self.grid), accuracy=tuple(acc), threat=threat, label=f"{c.certifier} ({kind}), {threat} l2",
            units={m: units["units"].get(m, STANDARDISED) for m in mods},
            scales={m: units["scales"].get(m, 1.0) for m in mods},
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        c, r = self.certificate, self.certificate.radii
        correct = r.correct.bool()
        info = dict(c.info)
        if "lipschitz" in info:  # where the Lipschitz estimate was fitted (None: it reads no data)
            info["lipschitz"] = {
                **info["lipschitz"],
                "info": {**info["lipschitz"].get("info", {}), "data_split": self.fit_split},
            }
        units = self.radius_units()
        d: dict[str, Any] = {
            "certifier": c.certifier,
            "estimator": c.certifier,  # the name before schema 2: kept for one release
            "guarantee": self.is_guarantee,
            "guarantee_kind": c.guarantee.value,
            "alpha": c.alpha,
            "norm": c.norm,
            "options": dict(self.options),
            "n": self.n,
            "clean_accuracy": self.clean_accuracy,
            **units,
            "summary": {
                "median_joint_radius_correct": _median(r.joint[correct]),
                "median_unimodal_radius_correct": {m: _median(v[correct]) for m, v in r.unimodal.items()},
                **units,
            },
            "certified_accuracy": {
                **units,
                "radii": list(self.grid),
                "joint": list(self.accuracy_curve("joint")),
                "unimodal": {m: list(self.accuracy_curve(m)) for m in r.unimodal},
            },
            "radii": {"joint": r.joint.tolist(), "unimodal": {m: v.tolist() for m, v in r.unimodal.items()}},
            "labels": c.labels.tolist(),
            "correct": r.correct.tolist(),
            "seconds": c.seconds,
            **info,
            "split": self.split,
        }
        if self.soundness is not None:
            d["soundness"] = self.soundness
        if self.tightness is not None:
            t = self.tightness
            d["tightness"] = {
                **units,
                "threat": t.threat,
                "samples": int(t.indices.numel()),
                "median_ratio": t.median_ratio,
                "violations": t.violations,
                "indices": t.indices.tolist(),
                "certified": t.certified.tolist(),
                "attack_radius": t.attack_radius.tolist(),
                "ratio": t.ratio.tolist(),
            }
        return d

    def document(self, run: Run, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``certify.json`` document of ``run`` with this result's entry merged into ``previous``
        (the entries of other certifiers are kept; ``previous`` may be of any schema version)."""
        entries = {**certify_entries(previous or {}), self.key: self.to_json()}
        return {
            "schema_version": SCHEMA_VERSION,
            "run": str(run.path),
            "head": run.config.model.head,
            "modalities": run.model.modalities,
            "class_names": run.meta.class_names,
            "certifiers": entries,
            "estimators": entries,  # the key before schema 2 (same entries): kept for one release
        }


def certify_entries(doc: dict[str, Any]) -> dict[str, Any]:
    """The per-certifier entries of a ``certify.json`` document of any schema version
    (``certifiers`` since schema 2, ``estimators`` before; empty if it has neither)."""
    entries = doc.get("certifiers", doc.get("estimators", {}))
    return dict(entries) if isinstance(entries, dict) else {}


def normalize_certify(doc: dict[str, Any]) -> dict[str, Any]:
    """A ``certify.json`` document read from disk, with both keys of the entries (``certifiers``
    and the older ``estimators``) and every entry's ``certifier`` (older files: ``estimator`` only)."""
    entries = {
        key: ({"certifier": e.get("estimator"), **_with_units(e)} if isinstance(e, dict) else e)
        for key, e in certify_entries(doc).items()
    }
    return {**doc, "schema_version": doc.get("schema_version", 1), "certifiers": entries, "estimators": entries}


def _with_units(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry written before radii carried units: standardised, scale 1 (what they measured)."""
    if "units" in entry or "radii" not in entry:
        return entry
    mods = list((entry.get("radii") or {}).get("unimodal") or {})
    return {**entry, "units": dict.fromkeys(mods, STANDARDISED), "scales": dict.fromkeys(mods, 1.0)}
