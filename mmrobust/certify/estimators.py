"""The two Lipschitz certifiers of CRMT's bound, registered in ``CERTIFIERS``.

``empirical``: max over data of the local gradient norm of each uni-modal margin (what the paper
does) — an *estimate*, not a guarantee. ``sound``: a true upper bound from
:mod:`mmrobust.certify.sound`. Both turn their per-modality ``tau`` into the ``(K, K)`` matrices
``L^m[y, k]`` of :func:`mmrobust.certify.radius.certified_radii` (Theorem 3.3 for a concat head,
3.5 for an orthogonal one) and return a :class:`~mmrobust.certify.base.Certificate` whose ``info``
also carries the vulnerability indicators ``eta``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mmrobust.certify.agnostic import agnostic_certificate
from mmrobust.certify.base import (
    CERTIFIERS,
    UNSET,
    Certificate,
    Certifier,
    CertifyContext,
    Guarantee,
    Radii,
    resolve_alias,
)
from mmrobust.certify.lipschitz import empirical_lipschitz, lipschitz_batch, score_jacobian
from mmrobust.certify.radius import (
    certified_radii,
    concat_pair_lipschitz,
    eta_summary,
    orthogonal_pair_lipschitz,
    pair_matrix,
    pair_rows,
)
from mmrobust.certify.sound import chain_lipschitz, chain_units, sound_row_lipschitz
from mmrobust.data.base import DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import LateFusionModel
from mmrobust.models.heads import FusionHead, OrthogonalHead, RowNormalizedHead


@dataclass
class HeadLipschitz:
    """What a Lipschitz certifier produced: ``pair_lip`` modality -> ``(K, K)``, ``tau`` modality -> ``(K, K)``
    (concat: per class pair) or ``(K,)`` (orthogonal: per class), and whether it is a guarantee."""

    certifier: str
    guarantee: bool
    theorem: str
    pair_lip: dict[str, torch.Tensor]
    tau: dict[str, torch.Tensor]
    info: dict[str, Any]

    @property
    def estimator(self) -> str:
        """Deprecated name of :attr:`certifier` (kept for one release)."""
        return self.certifier


THEOREMS = ("auto", "3.3", "3.5")


def resolve_theorem(model: LateFusionModel, theorem: str = "auto") -> bool:
    """Whether to use the orthogonal-head form (Theorem 3.5) for ``model``.

    ``auto``: 3.5 for an orthogonal head (the type :class:`OrthogonalHead`, so never for the reference
    code's :class:`~mmrobust.models.heads.RowNormalizedHead`, whose rows are unit-norm but not mutually
    orthogonal), 3.3 otherwise. ``3.3`` works for every additive head (on an
    orthogonal head it uses ``W = a * W~`` row by row and is never looser than 3.5, since
    ``||a_y W~_y - a_k W~_k|| = sqrt(a_y^2 + a_k^2) <= |a_y| + |a_k|`` for orthonormal rows).
    """
    _check_theorem(theorem)
    orth = isinstance(model.head, OrthogonalHead)
    if theorem == "3.5" and not orth:
        raise ConfigError(
            f"Theorem 3.5 needs an orthogonal head (train with a CRMT method or method 'ojt'), this model has "
            f"{type(model.head).__name__} (the reference code's row-normalised head is not orthogonal); use theorem='3.3'",
            param="theorem",
        )
    return orth and theorem != "3.3"


def _head(model: LateFusionModel) -> FusionHead:
    head = model.head
    if not isinstance(head, FusionHead):
        raise ConfigError(f"CRMT's bound needs an additive fusion head, got {type(head).__name__}")
    return head


def _orth_head(model: LateFusionModel) -> OrthogonalHead:
    head = model.head
    assert isinstance(head, OrthogonalHead)  # resolve_theorem chose 3.5 only for this head
    return head


def _head_rows(
    model: LateFusionModel, orth: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """Per modality: rows whose score Lipschitz constants we need (+ c and pair index for concat)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
    for m in model.modalities:
        if orth:
            out[m] = (_orth_head(model).basis(m).detach(), None, None)
        else:
            out[m] = pair_rows(_head(model).modality_weight(m))
    return out


def _plain(obj: Any) -> Any:
    """Tensors -> nested lists, recursively (a certificate's ``info`` holds JSON-able values only)."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _tensor(value: object) -> torch.Tensor:
    assert isinstance(value, torch.Tensor)
    return value


def _tensors(value: object) -> dict[str, torch.Tensor]:
    assert isinstance(value, dict)
    return {str(k): _tensor(v) for k, v in value.items()}


def _check_theorem(theorem: str) -> None:
    if theorem not in THEOREMS:
        raise ConfigError(f"unknown theorem '{theorem}'; choose from: {', '.join(THEOREMS)}")


class LipschitzCertifier(Certifier):
    """CRMT's bound (Theorem 3.3 / 3.5) with per-modality Lipschitz constants from :meth:`tau`.

    ``info`` of the certificate: ``theorem``, ``note``, ``lipschitz`` (``tau`` and the estimator's
    own details), the per-sample ``eta`` / ``runner_up`` / ``margin`` and the ``vulnerability`` summary
    (:func:`~mmrobust.certify.radius.eta_summary`), and ``timing``.
    """

    #: whether :meth:`tau` reads ``CertifyContext.fit_data`` (the empirical estimator does)
    uses_fit_data: ClassVar[bool] = False

    def tau(
        self, model: LateFusionModel, meta: DatasetMeta, data: Split | None, orth: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Per modality: ``(K, K)`` tau per class pair (concat form) or ``(K,)`` per class (orthogonal)."""
        raise NotImplementedError

    def head_lipschitz(self, model: LateFusionModel, meta: DatasetMeta, data: Split | None = None) -> HeadLipschitz:
        """Run :meth:`tau` and turn it into the pair matrices ``L^m[y, k]``."""
        orth = resolve_theorem(model, self.options.theorem)
        model.eval()
        tau, info = self.tau(model, meta, data, orth)
        pair_lip = {}
        for m in model.modalities:
            if orth:
                pair_lip[m] = orthogonal_pair_lipschitz(_orth_head(model).a[m], tau[m])
            else:
                _, c, _ = pair_rows(_head(model).modality_weight(m))
                pair_lip[m] = concat_pair_lipschitz(c, tau[m])
        if orth:
            name = "3.5 (orthogonal head)"
        else:
            name = "3.3 (concat form" + (
                ", orthogonal head with W = a * W~)" if isinstance(model.head, OrthogonalHead)
                else ", reference row-normalised head with W = a * W^)" if isinstance(model.head, RowNormalizedHead)
                else ")"
            )  # fmt: skip
        return HeadLipschitz(self.name, self.guarantee is Guarantee.SOUND, name, pair_lip, tau, info)

    def certify(self, model: torch.nn.Module, meta: DatasetMeta, split: Split, ctx: CertifyContext) -> Certificate:
        if not isinstance(model, LateFusionModel):
            if isinstance(self.options, EmpiricalOptions):  # any model: the model-agnostic estimate
                return agnostic_certificate(model, meta, split, ctx, self.options.fit_samples, self.name)
            raise ConfigError(
                f"certifier '{self.name}' needs an additive late-fusion model (LateFusionModel: one encoder per "
                f"modality and a linear fusion head; see LateFusionModel.from_modules), got {type(model).__name__}; "
                "certifier='empirical' estimates radii of any model, certifier='smoothing' certifies any model "
                "probabilistically",
                param="certifier",
            )
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(inputs) for inputs, _ in iterate_batches(split, ctx.batch_size)])
        t1 = time.perf_counter()
        hl = self.head_lipschitz(model, meta, ctx.fit_data if ctx.fit_data is not None else split)
        t2 = time.perf_counter()
        res = certified_radii(logits, split.labels, hl.pair_lip)
        joint, correct, runner_up, margin = (_tensor(res[k]) for k in ("joint", "correct", "runner_up", "margin"))
        unimodal, eta = _tensors(res["unimodal"]), _tensors(res["eta"])
        vul = eta_summary(eta, correct, hl.pair_lip)
        t3 = time.perf_counter()
        info = {
            "theorem": hl.theorem,
            "note": hl.info["note"],
            "vulnerability": _plain(vul),
            "lipschitz": {"tau": _plain(hl.tau), "info": _plain({k: v for k, v in hl.info.items() if k != "note"})},
            "eta": _plain(eta),
            "runner_up": runner_up.tolist(),
            "margin": margin.tolist(),
            "timing": {"forward_s": t1 - t0, "lipschitz_s": t2 - t1, "radii_s": t3 - t2, "total_s": t3 - t0},
        }
        return Certificate(
            certifier=self.name, guarantee=self.guarantee, norm="l2",
            radii=Radii(joint, unimodal, correct), labels=split.labels, seconds=t3 - t0, info=info,
        )  # fmt: skip


#: default of the empirical certifier's ``fit_samples``
FIT_SAMPLES = 512


@dataclass
class EmpiricalOptions:
    """``fit_samples``: samples of the fit data the maximum runs over (None = all, default
    :data:`FIT_SAMPLES`); ``theorem``: see :func:`resolve_theorem`; ``batch_size``: samples per
    Jacobian batch (0 = sized to the memory budget, :mod:`mmrobust.memory`).

    ``max_samples`` is the deprecated name of ``fit_samples``, accepted for one release (read
    ``fit_samples``: after construction ``max_samples`` is unset again). Elsewhere ``max_samples``
    means evaluated samples.
    """

    fit_samples: int | None = UNSET
    theorem: str = "auto"
    batch_size: int = 0
    max_samples: int | None = field(default=UNSET, repr=False)  # deprecated alias of fit_samples

    #: deprecated option names -> the option they stand for (left out of the options a result records)
    aliases: ClassVar[dict[str, str]] = {"max_samples": "fit_samples"}

    def __post_init__(self) -> None:
        where = "certifier 'empirical'"
        n, key = resolve_alias("fit_samples", self.fit_samples, "max_samples", self.max_samples, FIT_SAMPLES, where)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"{where}: {key} must be an integer >= 1, got {n!r}", param=key)
        self.fit_samples, self.max_samples = n, UNSET  # UNSET again: dataclasses.replace() keeps working
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 0:
            raise ConfigError(f"{where}: batch_size must be an integer >= 0 (0 = auto), got {self.batch_size!r}")
        _check_theorem(self.theorem)


@CERTIFIERS.register("empirical")
class EmpiricalCertifier(LipschitzCertifier):
    """Max over data of per-sample gradient norms of each uni-modal margin: an estimate, not a bound."""

    guarantee = Guarantee.ESTIMATE
    Options = EmpiricalOptions
    uses_fit_data = True

    def tau(
        self, model: LateFusionModel, meta: DatasetMeta, data: Split | None, orth: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if data is None:
            raise ConfigError("certifier 'empirical' needs data to maximise the gradient norm over")
        if self.options.fit_samples is not None:
            data = data.subset(slice(0, self.options.fit_samples))
        k, bs = meta.num_classes, self.options.batch_size
        tau: dict[str, torch.Tensor]
        if orth:
            rows = {m: _orth_head(model).basis(m).detach() for m in model.modalities}
            tau = {m: t.double() for m, t in empirical_lipschitz(model, data, rows, batch_size=bs or None).items()}
        else:
            # One Jacobian of the K head rows per sample gives every pair: grad of the normalised pair
            # margin is (G_y - G_k) / c_yk with G = W J; its norm comes from the Gram matrix of G.
            head = _head(model)
            tau = {m: torch.zeros(k, k, dtype=torch.float64) for m in model.modalities}
            if not bs:
                weights = {m: head.modality_weight(m).detach() for m in model.modalities}
                bs = lipschitz_batch(model, data, weights)[0].batch_size
            for inputs, _ in iterate_batches(data, bs):
                for m in model.modalities:
                    g = score_jacobian(model, inputs, m, head.modality_weight(m).detach()).flatten(2).double()
                    gram = g @ g.transpose(1, 2)
                    diag = gram.diagonal(dim1=1, dim2=2)
                    sq = (diag[:, :, None] + diag[:, None, :] - 2 * gram).clamp_min(0.0)
                    tau[m] = torch.maximum(tau[m], sq.sqrt().max(0).values)
            for m in model.modalities:
                _, c, _ = pair_rows(head.modality_weight(m))
                tau[m] = torch.where(c > 0, tau[m] / c.clamp_min(1e-30), torch.zeros_like(c))
        info = {
            "samples": len(data),
            "note": "estimate: max local gradient norm over the data, NOT an upper bound; radii are not guarantees",
        }
        return tau, info


@dataclass
class SoundOptions:
    """``theorem``: see :func:`resolve_theorem`."""

    theorem: str = "auto"

    def __post_init__(self) -> None:
        _check_theorem(self.theorem)


@CERTIFIERS.register("sound")
class SoundCertifier(LipschitzCertifier):
    """Guaranteed upper bounds: spectral norms composed through each encoder (row-aware at the end)."""

    guarantee = Guarantee.SOUND
    Options = SoundOptions

    def tau(
        self, model: LateFusionModel, meta: DatasetMeta, data: Split | None, orth: bool
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tau, enc_lip = {}, {}
        for m, (rows, _, pairs) in _head_rows(model, orth).items():
            enc = model.encoders[m]
            shape = meta.spec(m).shape
            units = chain_units(enc, shape)  # once per encoder: the conv bounds dominate the cost
            enc_lip[m] = chain_lipschitz(units)
            row_lip = sound_row_lipschitz(enc, shape, rows, units=units).double()
            tau[m] = row_lip if pairs is None else pair_matrix(row_lip, pairs, meta.num_classes)
        info = {
            "encoder_lipschitz": enc_lip,
            "note": "guaranteed upper bound (per-layer operator norms composed); radii are certificates",
        }
        return tau, info


def head_lipschitz(
    model: LateFusionModel, meta: DatasetMeta, certifier: str, data: Split | None = None, **options: Any
) -> HeadLipschitz:
    """The pair matrices ``L^m[y, k]`` of a registered Lipschitz certifier with ``options``
    (e.g. ``theorem="3.3"``, ``fit_samples=None``)."""
    cls = CERTIFIERS.get(certifier)
    if not issubclass(cls, LipschitzCertifier):
        raise ConfigError(f"certifier '{certifier}' does not estimate Lipschitz constants")
    return cls(cls.Options(**options)).head_lipschitz(model, meta, data)
