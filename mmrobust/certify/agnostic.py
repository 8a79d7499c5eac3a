"""A model-agnostic empirical radius estimate, for models that are not additive late fusion.

For any differentiable ``model(inputs) -> logits`` the joint radius of a correctly classified
sample is estimated as ``margin / L``, where ``margin = logit_y - max_{k != y} logit_k`` and ``L``
is the largest input-gradient norm of the margin (all modalities together, l2) over the fit data.
Like the paper's empirical estimator this is **an estimate, not a bound**: ``L`` is a maximum over
samples, not over the input space. There are no per-modality radii (the model's structure is not
known). Models built as a :class:`~mmrobust.models.fusion.LateFusionModel` get the per-modality
estimate and the sound certifiers instead.
"""

from __future__ import annotations

import time

import torch

from mmrobust.certify.base import Certificate, CertifyContext, Guarantee, Radii
from mmrobust.data.base import DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.torchutil import eval_mode

#: why the estimate has no per-modality radii and what the other certifiers need
NOT_LATE_FUSION = (
    "model-agnostic estimate: joint radius = margin / the largest input-gradient norm of the margin over the fit "
    "data (an estimate, NOT a bound); no per-modality radii. Per-modality estimates and the sound certifiers "
    "(sound, crown) need an additive late-fusion model (LateFusionModel: one encoder per modality and a linear "
    "fusion head; see LateFusionModel.from_modules); smoothing certifies any model, probabilistically"
)


def margins_and_gradient_norms(
    model: torch.nn.Module, split: Split, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the logit margin ``logit_y - max_{k != y} logit_k`` and the l2 norm of its gradient
    with respect to all input modalities together (the model runs in eval mode; weights get no grad)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    margins, norms = [], []
    with eval_mode(model):
        for inputs, labels in iterate_batches(split, batch_size):
            x = {m: v.to(device).detach().float().requires_grad_(True) for m, v in inputs.items()}
            logits = model(x)
            y = labels.to(device)
            true = logits.gather(1, y[:, None]).squeeze(1)
            other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
            margin = true - other.max(1).values
            grads = torch.autograd.grad(margin.sum(), list(x.values()), allow_unused=True)
            sq = sum(g.flatten(1).pow(2).sum(1) for g in grads if g is not None)
            margins.append(margin.detach().cpu())
            norms.append(torch.as_tensor(sq).sqrt().detach().cpu())
    return torch.cat(margins), torch.cat(norms)


def agnostic_certificate(
    model: torch.nn.Module, meta: DatasetMeta, split: Split, ctx: CertifyContext, fit_samples: int | None, name: str
) -> Certificate:
    """The estimate described in the module docstring, as a :class:`Certificate` of kind ``estimate``."""
    fit = ctx.fit_data if ctx.fit_data is not None else split
    if fit_samples is not None:
        fit = fit.subset(slice(0, fit_samples))
    if len(fit) == 0:
        raise ConfigError(f"certifier '{name}': no fit data to maximise the gradient norm over", param="fit_samples")
    t0 = time.perf_counter()
    _, fit_norms = margins_and_gradient_norms(model, fit, ctx.batch_size)
    lip = float(fit_norms.max())
    margin, _ = margins_and_gradient_norms(model, split, ctx.batch_size)
    correct = margin > 0
    joint = torch.where(correct, margin.clamp_min(0) / max(lip, 1e-30), torch.zeros_like(margin))
    info = {
        "note": NOT_LATE_FUSION,
        "lipschitz": {"max_gradient_norm": lip, "fit_samples": len(fit)},
        "margin": margin.tolist(),
        "timing": {"total_s": time.perf_counter() - t0},
    }
    return Certificate(
        certifier=name, guarantee=Guarantee.ESTIMATE, norm="l2", radii=Radii(joint, {}, correct),
        labels=split.labels, seconds=time.perf_counter() - t0, info=info,
    )  # fmt: skip
