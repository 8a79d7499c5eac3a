"""Closed-form certified lower bounds for the orthogonal (CRMT) head (Theorem 3.5; see docs/certify.md).

The bound is differentiable w.r.t. the modality weights ``a^(m)`` (and the bias), so CRMT step 2
can maximise it directly; certification reuses it with a Lipschitz estimate ``tau`` of its choice.
"""

from __future__ import annotations

import torch

from mmrobust.errors import ConfigError


def runner_up(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Index of the highest-scoring class other than the label, per sample."""
    masked = logits.detach().scatter(1, labels[:, None], float("-inf"))
    return masked.argmax(1)


def fused_logits(raw_scores: dict[str, torch.Tensor], a: dict[str, torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
    """``h_k = sum_m a_k^(m) s_k^(m) + b_k`` — the orthogonal head's output from its raw scores."""
    return torch.stack([a[m] * s for m, s in raw_scores.items()]).sum(0) + bias


def orthogonal_bound(
    raw_scores: dict[str, torch.Tensor],
    a: dict[str, torch.Tensor],
    bias: torch.Tensor,
    labels: torch.Tensor,
    tau: dict[str, torch.Tensor],
    eps: float = 1e-12,
) -> torch.Tensor:
    """Theorem 3.5 lower bound on the l2 radius (joint over modalities), per sample, shape ``(N,)``.

    ``P(x) >= (h_y - h_j) / sqrt(sum_m (|a_y^(m)| tau_y^(m) + |a_j^(m)| tau_j^(m))^2)`` with ``j`` the
    runner-up class of the fused logits, ``s^(m) = W~^(m) phi^(m)`` the raw uni-modal scores
    (``raw_scores``: modality -> ``(N, K)``), ``a`` modality -> ``(K,)``, ``tau`` modality -> ``(K,)``
    the Lipschitz constants of the rows ``W~_k^(m) phi^(m)``.

    The paper writes ``a`` without absolute values (it assumes ``a >= 0``); with ``|a|`` the bound
    stays valid if an optimiser pushes a weight negative. Misclassified samples get a negative value
    (the bound of the margin, not a radius); clamp at 0 for a certified radius. Given a *sound* tau
    this is a certificate; with the empirical tau it is an estimate.
    """
    names = list(raw_scores)
    if set(names) != set(a) or set(names) != set(tau):
        raise ConfigError(
            f"orthogonal_bound: modalities differ: scores {sorted(raw_scores)}, a {sorted(a)}, tau {sorted(tau)}"
        )
    logits = fused_logits(raw_scores, a, bias)
    y = labels[:, None]
    j = runner_up(logits, labels)[:, None]
    margin = (logits.gather(1, y) - logits.gather(1, j)).squeeze(1)
    denom_sq = 0.0
    for m in names:
        am, tm = a[m].abs(), tau[m].to(logits)
        eta = (am * tm)[y.squeeze(1)] + (am * tm)[j.squeeze(1)]
        denom_sq = denom_sq + eta**2  # type: ignore[assignment]
    return margin / torch.sqrt(denom_sq + eps)  # type: ignore[arg-type]
