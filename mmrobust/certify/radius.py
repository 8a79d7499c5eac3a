"""Certified radii and vulnerability indicators for additive late-fusion heads (see docs/certify.md).

Both heads are handled through one object: for every modality ``m`` a ``(K, K)`` matrix
``L^m[y, k]``, an upper bound (or, with the empirical estimator, an estimate) of the Lipschitz
constant w.r.t. ``x^(m)`` of modality ``m``'s contribution to the margin ``h_y(x) - h_k(x)``:

* concat head (Theorem 3.3): ``L^m[y, k] = c_k^(m) tau_k^(m)`` with ``c = ||W_y^(m) - W_k^(m)||``
  and ``tau`` the Lipschitz constant of the normalised uni-modal margin ``zeta_k^(m)``;
* orthogonal head (Theorem 3.5): ``L^m[y, k] = |a_y^(m)| tau~_y^(m) + |a_k^(m)| tau~_k^(m)``.

The margin ``h_y - h_k`` moves by at most ``sum_m L^m[y, k] ||d_m|| <= sqrt(sum_m L^m[y,k]^2) ||d||``
under a perturbation ``d``, so no class ``k`` can overtake ``y`` within
``(h_y - h_k) / sqrt(sum_m L^m[y, k]^2)`` (joint) or ``(h_y - h_k) / L^m[y, k]`` (modality ``m``
alone, Proposition 3.4). The certified radius is the **minimum over every k != y**: the papers
state the bound for the runner-up ``j`` only, which is not a certificate when another class has a
slightly smaller logit but a much larger Lipschitz constant. The vulnerability indicator
``eta^(m) = L^m[y, j]`` uses the runner-up ``j``, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmrobust.certify.bounds import runner_up
from mmrobust.errors import ConfigError


def pair_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised row differences of a ``(K, d)`` head matrix for every pair ``y < k``.

    Returns ``(rows (P, d), c (K, K), pairs (2, P))`` with ``rows_p = (W_y - W_k) / ||W_y - W_k||`` and
    ``c[y, k] = ||W_y - W_k||`` (the integration factor). The sign of a row does not change a
    Lipschitz constant, so ``(y, k)`` and ``(k, y)`` share one row.
    """
    w = weight.detach().double()
    k = w.shape[0]
    pairs = torch.triu_indices(k, k, 1)
    diff = w[pairs[0]] - w[pairs[1]]
    norms = diff.norm(dim=1)
    c = torch.zeros(k, k, dtype=torch.float64)
    c[pairs[0], pairs[1]] = norms
    c[pairs[1], pairs[0]] = norms
    return (diff / norms.clamp_min(1e-30)[:, None]).float(), c, pairs


def pair_matrix(values: torch.Tensor, pairs: torch.Tensor, k: int) -> torch.Tensor:
    """Scatter per-pair values ``(P,)`` into a symmetric ``(K, K)`` matrix (zero diagonal)."""
    out = torch.zeros(k, k, dtype=torch.float64)
    out[pairs[0], pairs[1]] = values.double()
    out[pairs[1], pairs[0]] = values.double()
    return out


def concat_pair_lipschitz(c: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Theorem 3.3: ``L[y, k] = c[y, k] * tau[y, k]`` (both ``(K, K)``)."""
    return c.double() * tau.double()


def orthogonal_pair_lipschitz(a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Theorem 3.5: ``L[y, k] = |a_y| tau_y + |a_k| tau_k`` from per-class ``a`` and ``tau`` (``(K,)``).

    The diagonal is zero (a class never competes with itself).
    """
    t = a.detach().double().abs() * tau.double()
    out = t[:, None] + t[None, :]
    return out.fill_diagonal_(0.0)


def certified_radii(
    logits: torch.Tensor, labels: torch.Tensor, pair_lip: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """Joint and uni-modal certified radii per sample (0 for misclassified samples).

    ``logits`` ``(N, K)``, ``labels`` ``(N,)``, ``pair_lip`` modality -> ``(K, K)``. Returns
    ``joint`` ``(N,)``, ``unimodal`` modality -> ``(N,)``, ``runner_up`` ``(N,)``, ``margin`` ``(N,)``
    (logit gap to the runner-up) and ``eta`` modality -> ``(N,)`` (``L^m[y, j]``).
    """
    if not pair_lip:
        raise ConfigError("certified_radii needs the Lipschitz matrices of at least one modality")
    logits = logits.detach().double()
    n, k = logits.shape
    y = labels.long()
    gaps = logits.gather(1, y[:, None]) - logits  # (N, K): h_y - h_k
    other = torch.ones(n, k, dtype=torch.bool).scatter_(1, y[:, None], False)
    correct = (gaps.masked_fill(~other, float("inf")) > 0).all(1)
    lips = {m: lm.double()[y] for m, lm in pair_lip.items()}  # (N, K): L^m[y_i, k]
    joint_lip = torch.sqrt(sum(lm**2 for lm in lips.values()))  # type: ignore[arg-type]

    def radius(lip: torch.Tensor) -> torch.Tensor:
        # a class whose margin no modality can move (lip == 0) never overtakes y: infinite radius
        r = torch.where(lip > 0, gaps / lip.clamp_min(1e-300), torch.full_like(gaps, float("inf")))
        r = r.masked_fill(~other, float("inf")).min(1).values
        return torch.where(correct, r, torch.zeros_like(r))

    j = runner_up(logits, y)
    return {
        "joint": radius(joint_lip),
        "unimodal": {m: radius(lm) for m, lm in lips.items()},
        "runner_up": j,
        "margin": gaps.gather(1, j[:, None]).squeeze(1),
        "eta": {m: lm.gather(1, j[:, None]).squeeze(1) for m, lm in lips.items()},
        "correct": correct,
    }


def certified_accuracy(radii: torch.Tensor, grid: Sequence[float]) -> list[float]:
    """Fraction of samples certified beyond each radius (``radius > r``; misclassified have 0)."""
    radii = radii.double()
    return [float((radii > r).double().mean()) for r in grid]


def eta_summary(
    eta: dict[str, torch.Tensor], correct: torch.Tensor, pair_lip: dict[str, torch.Tensor]
) -> dict[str, object]:
    """Vulnerability indicators: mean ``eta^(m)`` over correctly classified samples, their ratios
    to the first modality's, and the class-pair matrices and ratios (paper Fig. 3)."""
    names = list(eta)
    mask = correct.bool()
    mean = {m: float(eta[m][mask].mean()) if mask.any() else None for m in names}
    ref = names[0]
    ratio = {}
    pair_ratio = {}
    for m in names[1:]:
        key = f"{m}/{ref}"
        ratio[key] = mean[m] / mean[ref] if mean[ref] and mean[m] is not None else None  # type: ignore[operator]
        pr = pair_lip[m].double() / pair_lip[ref].double()
        pair_ratio[key] = pr.fill_diagonal_(float("nan"))
    per_sample_ratio = {
        f"{m}/{ref}": float((eta[m][mask] / eta[ref][mask]).median()) if mask.any() else None for m in names[1:]
    }
    return {
        "mean": mean,
        "ratio_of_means": ratio,
        "median_per_sample_ratio": per_sample_ratio,
        "pairs": {m: pair_lip[m] for m in names},
        "pair_ratio": pair_ratio,
        "most_vulnerable": max(names, key=lambda m: mean[m] if mean[m] is not None else -1.0),  # type: ignore[arg-type,return-value]
    }
