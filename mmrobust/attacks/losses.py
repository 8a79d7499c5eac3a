"""Per-sample attack losses (all to be *maximised* by the attacker).

``ce`` is what the CRMT paper attacks with; ``cw`` (the logit margin) does not saturate when the
softmax does, so it still has a gradient where CE underflows to exactly zero on models with huge
logits — the reason every robust accuracy mmrobust reports is the worst case over both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmrobust.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits, labels, reduction="none")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``max_{k != y} z_k - z_y``: positive iff some wrong class beats the true one."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return wrong - true


def cw_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner logit-margin loss (untargeted, no confidence clamp): :func:`margin`."""
    return margin(logits, labels)


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Untargeted difference-of-logits-ratio loss (Croce & Hein 2020); needs >= 3 classes."""
    z_sorted = logits.sort(dim=1).values
    return margin(logits, labels) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: ``(z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; with 3 classes ``z_pi4 := z_pi3``."""
    z_sorted = logits.sort(dim=1).values
    third = z_sorted[:, -3]
    fourth = z_sorted[:, -4] if logits.shape[1] >= 4 else third
    gap = logits.gather(1, targets[:, None]).squeeze(1) - logits.gather(1, labels[:, None]).squeeze(1)
    return gap / (z_sorted[:, -1] - 0.5 * (third + fourth) + 1e-12)


LOSSES: dict[str, LossFn] = {"ce": ce_loss, "cw": cw_loss}


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ConfigError(f"unknown attack loss '{name}'; choose from: {', '.join(LOSSES)}")
    return LOSSES[name]
