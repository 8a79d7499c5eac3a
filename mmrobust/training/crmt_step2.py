"""CRMT step 2 as a pure function over cached uni-modal scores.

With the encoders and the orthonormal bases frozen (model in eval mode), the raw uni-modal scores
``s^(m) = W~^(m) phi^(m)(x^(m))`` of every sample are constants, so step 2 -- maximise the mean
Theorem 3.5 lower bound over the modality weights ``a^(m)`` alone -- needs only those scores, the
labels, the bias, the Lipschitz constants ``tau~`` and its options; never the model or the engine.
:func:`optimise_modality_weights` runs it; :func:`choose_step2` decides which state to keep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmrobust.certify.bounds import fused_logits, orthogonal_bound
from mmrobust.config import build_optimizer

Scores = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Step2Data:
    """The narrow context of step 2: cached scores (``(N, K)`` per modality) and what the bound needs."""

    train_scores: Scores
    train_labels: torch.Tensor
    val_scores: Scores
    val_labels: torch.Tensor
    a0: Scores  # the modality weights after step 1 (the starting point, and a candidate)
    bias: torch.Tensor
    tau: Scores


@dataclass
class Step2Result:
    """Per-epoch history and the best candidate (``best_epoch`` 0 = step 1's weights)."""

    step1: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_a: Scores = field(default_factory=dict)
    floor: float = 0.0
    #: the weights after the last epoch, whatever the criterion says (what the reference code keeps)
    last_a: Scores = field(default_factory=dict)


@torch.no_grad()
def summarize(scores: Scores, a: Scores, bias: torch.Tensor, labels: torch.Tensor, tau: Scores) -> dict[str, float]:
    """Accuracy, mean certified radius (``max(bound, 0)``, 0 when misclassified) and mean bound."""
    bound = orthogonal_bound(scores, a, bias, labels, tau)
    correct = fused_logits(scores, a, bias).argmax(1) == labels
    radius = torch.where(correct, bound.clamp_min(0), torch.zeros_like(bound))
    return {
        "val_accuracy": float(correct.float().mean()),
        "val_mean_radius": float(radius.mean()),
        "val_mean_bound": float(bound.mean()),
    }


def optimise_modality_weights(data: Step2Data, options: Any, batch_size: int, seed: int) -> Step2Result:
    """Maximise the mean Theorem 3.5 bound over ``a^(m)`` (mini-batches of the training scores).

    After every epoch the validation summary is recorded; the best epoch is the one with the highest
    validation mean certified radius among those whose validation accuracy is at least step 1's minus
    ``options.step2_max_acc_drop``. ``data.a0`` is never modified.
    """
    o = options
    step1 = summarize(data.val_scores, data.a0, data.bias, data.val_labels, data.tau)
    a = {m: v.detach().clone().requires_grad_(True) for m, v in data.a0.items()}
    params = list(a.values())
    opt = build_optimizer(
        params, o.step2_optimizer, o.step2_lr, momentum=0.9, weight_decay=o.step2_weight_decay,
        decoupled_weight_decay=False, prefix="step2_", name_param="step2_optimizer",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 7919)
    bias = data.bias.detach()
    result = Step2Result(step1, floor=step1["val_accuracy"] - o.step2_max_acc_drop)
    best_crit = step1["val_mean_radius"]
    result.best_a = {m: v.detach().clone() for m, v in data.a0.items()}
    result.last_a = result.best_a
    labels = data.train_labels
    n = len(labels)
    for epoch in range(o.step2_epochs):
        order = torch.randperm(n, generator=gen).to(labels.device)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            bound = orthogonal_bound({m: s[idx] for m, s in data.train_scores.items()}, a, bias, labels[idx], data.tau)
            loss = -bound.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        a_now = {m: p.detach().clone() for m, p in a.items()}
        row = {
            "epoch": epoch + 1,
            "train_mean_bound": -total / n,
            **summarize(data.val_scores, a_now, bias, data.val_labels, data.tau),
        }
        result.history.append(row)
        result.last_a = a_now
        if row["val_accuracy"] >= result.floor and row["val_mean_radius"] > best_crit:
            best_crit, result.best_epoch, result.best_a = row["val_mean_radius"], epoch + 1, a_now
    return result


def choose_step2(result: Step2Result, check: dict[str, float] | None) -> tuple[str, str]:
    """``(kept, reason)``: keep step 2's best weights unless none qualified or the attack check objects."""
    s1, floor = result.step1, result.floor
    if result.best_epoch == 0:
        return "step1", (
            f"no step-2 epoch raised the validation mean certified radius ({s1['val_mean_radius']:.4f}) "
            f"with validation accuracy >= {floor:.4f}"
        )
    best = result.history[result.best_epoch - 1]["val_mean_radius"]
    if check is not None and check["step2"] < check["step1"]:
        return "step1", (
            f"step-2 epoch {result.best_epoch} raised the validation mean certified radius from "
            f"{s1['val_mean_radius']:.4f} to {best:.4f}, but lowered validation CW-PGD accuracy at "
            f"eps {check['eps']:.3f} from {check['step1']:.4f} to {check['step2']:.4f}: the empirical tau "
            f"overstates the gain"
        )
    reason = (
        f"step-2 epoch {result.best_epoch} raised the validation mean certified radius from "
        f"{s1['val_mean_radius']:.4f} to {best:.4f} with validation accuracy >= {floor:.4f}"
    )
    if check is not None:
        reason += f" and CW-PGD accuracy at eps {check['eps']:.3f} {check['step1']:.4f} -> {check['step2']:.4f}"
    return "step2", reason
