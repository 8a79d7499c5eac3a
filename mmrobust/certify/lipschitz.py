"""Empirical Lipschitz estimates of uni-modal scores (see docs/certify.md).

For a modality ``m`` and a set of rows ``R`` (R x d_m), the uni-modal scores are
``u_r(x_m) = R_r . phi^(m)(x_m)``. Their local Lipschitz constant at ``x`` is
``||grad_{x_m} u_r(x)||_2``; the paper's tau is the maximum of that over the data.

This is an *estimate*, not an upper bound: a certificate built on it is not a guarantee (use
``mmrobust.certify.sound`` for that). Only modality ``m``'s encoder is differentiated, so the other
modalities cannot leak into (or zero out) its gradient — the reference code's defect #2.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from mmrobust.certify.base import UNSET, resolve_alias
from mmrobust.data.base import Batch, Split, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.memory import BatchPlan, jacobian_chunk, plan_batch
from mmrobust.torchutil import to_device

#: largest automatic batch of the Lipschitz estimate, (CPU, CUDA)
LIPSCHITZ_CAP = (16, 64)


def _encoder(model: nn.Module, modality: str) -> nn.Module:
    if modality not in model.encoders:  # type: ignore[operator]
        raise ConfigError(f"unknown modality '{modality}'; the model has: {', '.join(model.encoders)}")  # type: ignore[arg-type]
    return model.encoders[modality]  # type: ignore[index,return-value]


def score_jacobian(
    model: nn.Module, inputs: Batch, modality: str, rows: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-sample Jacobian ``d(rows @ phi^(m)(x_m)) / d x_m``, shape ``(N, R, *input_shape)``, with
    respect to the encoder's input (for a model that standardises its inputs: the standardised values,
    the coordinates its certified bounds are stated in).

    Computed with ``vmap(jacrev)`` over samples: R vector-Jacobian products per sample, batched,
    instead of R separate backward passes per batch. The encoder is evaluated in eval mode.
    """
    enc = _encoder(model, modality)
    x = inputs[modality]
    transforms = getattr(model, "transforms", None)
    if transforms is not None and modality in transforms:  # the encoder's input: standardised values
        with torch.no_grad():
            x = transforms[modality](x)
    rows = rows.to(x.device, x.dtype).detach()
    if rows.ndim != 2:
        raise ConfigError(f"rows must be a (R, d) matrix, got shape {tuple(rows.shape)}")
    params = {k: v.detach() for k, v in enc.named_parameters()}
    buffers = dict(enc.named_buffers())

    def scores(sample: torch.Tensor) -> torch.Tensor:
        phi = functional_call(enc, (params, buffers), (sample.unsqueeze(0),)).squeeze(0)
        return rows @ phi

    was_training = enc.training
    enc.eval()
    try:
        return vmap(jacrev(scores, chunk_size=chunk_size))(x.detach())
    finally:
        enc.train(was_training)


def score_gradient_norms(
    model: nn.Module, inputs: Batch, modality: str, rows: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """``||grad_{x_m} (rows_r . phi^(m)(x_m))||_2`` per sample and row, shape ``(N, R)``."""
    return score_jacobian(model, inputs, modality, rows, chunk_size).flatten(2).norm(dim=2)


def lipschitz_batch(
    model: nn.Module,
    split: Split,
    rows: dict[str, torch.Tensor],
    memory_budget: str | int | None = "auto",
    device: str | torch.device = "cpu",
) -> tuple[BatchPlan, int | None]:
    """Batch size (and Jacobian row chunk, None = all rows) of :func:`empirical_lipschitz` that fits
    ``memory_budget``, measured on the first samples of ``split`` (see :mod:`mmrobust.memory`).

    At most :data:`LIPSCHITZ_CAP` samples (16 on CPU, 64 on CUDA) even when more would fit: the
    vectorised Jacobian is fastest at small batches on CPU (avdigits, 256 samples: 9.2 s at 16,
    15 s at 64, 20 s at 256; benchmarks/robust_throughput.py).
    """

    def probe(n: int) -> None:
        inputs = to_device(split.take(slice(0, n))[0], device)
        for m, r in rows.items():
            score_gradient_norms(model, inputs, m, r)

    cap = LIPSCHITZ_CAP[torch.device(device).type == "cuda"]
    plan = plan_batch(probe, memory_budget, device, cap=cap, samples=len(split))
    return plan, jacobian_chunk(plan, max(r.shape[0] for r in rows.values()))


def empirical_lipschitz(
    model: nn.Module,
    split: Split,
    rows: dict[str, torch.Tensor],
    batch_size: int | None = None,
    fit_samples: int | None = UNSET,
    device: str | torch.device = "cpu",
    memory_budget: str | int | None = "auto",
    *,
    max_samples: int | None = UNSET,
) -> dict[str, torch.Tensor]:
    """Max over the data of the local gradient norm of each row's uni-modal score, per modality.

    ``rows`` maps modality -> ``(R, d_m)``; returns modality -> ``(R,)``. ``fit_samples`` limits
    the estimate to the first samples of ``split`` (faster, even less of a guarantee; None = all;
    ``max_samples`` is its deprecated name). ``batch_size`` None sizes the batches (and, if one
    sample is too large, the Jacobian's row chunks) to ``memory_budget``; the result does not depend
    on either.
    """
    fit_samples, _ = resolve_alias("fit_samples", fit_samples, "max_samples", max_samples, None, "empirical_lipschitz")
    if fit_samples is not None:
        split = split.subset(slice(0, fit_samples))
    chunk = None
    if batch_size is None:
        plan, chunk = lipschitz_batch(model, split, rows, memory_budget, device)
        batch_size = plan.batch_size
    out = {m: torch.zeros(r.shape[0]) for m, r in rows.items()}
    for inputs, _ in iterate_batches(split, batch_size):
        inputs = to_device(inputs, device)
        for m, r in rows.items():
            norms = score_gradient_norms(model, inputs, m, r, chunk).max(0).values.cpu()
            out[m] = torch.maximum(out[m], norms)
    return out
