"""Lipschitz estimators for the uni-modal margins of a fusion head, by name.

``empirical``: max over data of the local gradient norm (what the paper does) — an *estimate*,
not a guarantee. ``sound``: a true upper bound from :mod:`mmrobust.certify.sound`.
Each returns, per modality, the ``(K, K)`` matrix ``L^m[y, k]`` used by
:func:`mmrobust.certify.radius.certified_radii`, plus the raw ``tau`` it was built from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmrobust.certify.lipschitz import empirical_lipschitz, score_jacobian
from mmrobust.certify.radius import concat_pair_lipschitz, orthogonal_pair_lipschitz, pair_matrix, pair_rows
from mmrobust.certify.sound import chain_lipschitz, chain_units, sound_row_lipschitz
from mmrobust.data.base import DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import LateFusionModel
from mmrobust.models.heads import OrthogonalHead
from mmrobust.registry import Registry


@dataclass
class HeadLipschitz:
    """What an estimator produced: ``pair_lip`` modality -> ``(K, K)``, ``tau`` modality -> ``(K, K)``
    (concat: per class pair) or ``(K,)`` (orthogonal: per class), and whether it is a guarantee."""

    estimator: str
    guarantee: bool
    theorem: str
    pair_lip: dict[str, torch.Tensor]
    tau: dict[str, torch.Tensor]
    info: dict[str, Any]


#: name -> ``fn(model, meta, data_split, **options) -> (tau per modality, info)``; ``data_split`` is
#: only read by the empirical estimator
ESTIMATORS: Registry[Callable[..., tuple[dict[str, torch.Tensor], dict[str, Any]]]] = Registry("Lipschitz estimator")


THEOREMS = ("auto", "3.3", "3.5")


def resolve_theorem(model: LateFusionModel, theorem: str = "auto") -> bool:
    """Whether to use the orthogonal-head form (Theorem 3.5) for ``model``.

    ``auto``: 3.5 for an orthogonal head, 3.3 otherwise. ``3.3`` works for every additive head (on an
    orthogonal head it uses ``W = a * W~`` row by row and is never looser than 3.5, since
    ``||a_y W~_y - a_k W~_k|| = sqrt(a_y^2 + a_k^2) <= |a_y| + |a_k|`` for orthonormal rows).
    """
    if theorem not in THEOREMS:
        raise ConfigError(f"unknown theorem '{theorem}'; choose from: {', '.join(THEOREMS)}")
    orth = isinstance(model.head, OrthogonalHead)
    if theorem == "3.5" and not orth:
        raise ConfigError("Theorem 3.5 needs an orthogonal head (train with a CRMT method or --method ojt); use 3.3")
    return orth and theorem != "3.3"


def _head_rows(
    model: LateFusionModel, orth: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """Per modality: rows whose score Lipschitz constants we need (+ c and pair index for concat)."""
    out = {}
    for m in model.modalities:
        if orth:
            out[m] = (model.head.basis(m).detach(), None, None)
        else:
            rows, c, pairs = pair_rows(model.head.modality_weight(m))
            out[m] = (rows, c, pairs)
    return out


@ESTIMATORS.register("empirical")
def empirical_tau(
    model: LateFusionModel,
    meta: DatasetMeta,
    data: Split,
    max_samples: int | None = 512,
    batch_size: int = 64,
    orth: bool = False,
    **_: Any,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Max over ``data`` (first ``max_samples``) of per-sample gradient norms of each uni-modal margin."""
    if max_samples is not None:
        data = data.subset(slice(0, max_samples))
    k = meta.num_classes
    if orth:
        rows = {m: model.head.basis(m).detach() for m in model.modalities}
        tau = {m: t.double() for m, t in empirical_lipschitz(model, data, rows, batch_size=batch_size).items()}
    else:
        # One Jacobian of the K head rows per sample gives every pair: grad of the normalised pair
        # margin is (G_y - G_k) / c_yk with G = W J; its norm comes from the Gram matrix of G.
        tau = {m: torch.zeros(k, k, dtype=torch.float64) for m in model.modalities}
        for inputs, _ in iterate_batches(data, batch_size):
            for m in model.modalities:
                w = model.head.modality_weight(m).detach()
                g = score_jacobian(model, inputs, m, w).flatten(2).double()  # (N, K, D)
                gram = g @ g.transpose(1, 2)
                diag = gram.diagonal(dim1=1, dim2=2)
                sq = (diag[:, :, None] + diag[:, None, :] - 2 * gram).clamp_min(0.0)
                tau[m] = torch.maximum(tau[m], sq.sqrt().max(0).values)
        for m in model.modalities:
            _, c, _ = pair_rows(model.head.modality_weight(m))
            tau[m] = torch.where(c > 0, tau[m] / c.clamp_min(1e-30), torch.zeros_like(c))
    info = {
        "samples": len(data),
        "note": "estimate: max local gradient norm over the data, NOT an upper bound; radii are not guarantees",
    }
    return tau, info


@ESTIMATORS.register("sound")
def sound_tau(model: LateFusionModel, meta: DatasetMeta, data: Split | None = None, orth: bool = False, **_: Any):
    """Guaranteed upper bounds: spectral norms composed through each encoder (row-aware at the end)."""
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
    model: LateFusionModel,
    meta: DatasetMeta,
    estimator: str,
    data: Split | None = None,
    theorem: str = "auto",
    **options: Any,
) -> HeadLipschitz:
    """Run ``estimator`` on ``model`` and turn its ``tau`` into the pair matrices ``L^m[y, k]``.

    ``theorem``: see :func:`resolve_theorem`.
    """
    fn = ESTIMATORS.get(estimator)
    orth = resolve_theorem(model, theorem)
    model.eval()
    tau, info = fn(model, meta, data, orth=orth, **options)
    pair_lip = {}
    for m in model.modalities:
        if orth:
            pair_lip[m] = orthogonal_pair_lipschitz(model.head.a[m], tau[m])
        else:
            _, c, _ = pair_rows(model.head.modality_weight(m))
            pair_lip[m] = concat_pair_lipschitz(c, tau[m])
    if orth:
        name = "3.5 (orthogonal head)"
    else:
        name = "3.3 (concat form" + (
            ", orthogonal head with W = a * W~)" if isinstance(model.head, OrthogonalHead) else ")"
        )
    return HeadLipschitz(estimator, estimator == "sound", name, pair_lip, tau, info)
