"""FGM and PGD (l2 and l-inf) over any subset of modalities, joint or per-modality budgets."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmrobust.attacks.base import ATTACKS, Attack, BestTracker, Packed
from mmrobust.attacks.threat import ThreatModel
from mmrobust.errors import ConfigError


@ATTACKS.register("fgm")
class FGM(Attack):
    """Fast gradient method: one step of size eps along the (jointly or per-modality) normalised
    gradient of the loss; the l-inf version (``fgsm``) steps along its sign."""

    rescore = False

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, grad, _ = self.loss_and_grad(packed, packed.x0, labels)
        x = packed.step_to(packed.expand(packed.eps) * packed.normalize(grad, self.norm), self.norm)
        with torch.no_grad():
            return x, self.forward(packed, x)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "steps": 1}


@ATTACKS.register("fgsm")
class FGSM(FGM):
    """FGM under an l-inf budget (the sign of the gradient)."""

    default_norm = "linf"


class PGD(Attack):
    """Projected gradient ascent on the loss, with random start and restarts.

    Each step moves ``rel_step_size * eps`` along the normalised gradient (the sign for l-inf),
    projects onto the budget ball and clamps to the valid range. The returned example is, per
    sample, the worst one over every iterate of every restart (see :class:`BestTracker`), so more
    steps or restarts never report a higher accuracy. The first restart starts at the clean input
    unless ``random_start``; later restarts always start at a random point.
    """

    rescore = False

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel | Any = None,
        *,
        steps: int = 10,
        rel_step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(model, threat, **options)
        if steps < 1:
            raise ConfigError(f"{self.name}: steps must be >= 1, got {steps}")
        if restarts < 1:
            raise ConfigError(f"{self.name}: restarts must be >= 1, got {restarts}")
        # Madry et al.'s 2.5 eps / steps lets a walk reach the boundary from anywhere in the ball
        self.rel_step_size = 2.5 / steps if rel_step_size is None else float(rel_step_size)
        if self.rel_step_size <= 0:
            raise ConfigError(f"{self.name}: step size must be > 0, got {rel_step_size}")
        self.steps, self.random_start, self.restarts = steps, random_start, restarts

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "steps": self.steps, "restarts": self.restarts,
                "rel_step_size": self.rel_step_size, "random_start": self.random_start}  # fmt: skip

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = packed.expand(packed.eps * self.rel_step_size)
        best: BestTracker | None = None
        for r in range(self.restarts):
            delta0 = packed.random_start(self.norm, self.generator) if (r > 0 or self.random_start) else None
            x = packed.x0 if delta0 is None else packed.step_to(delta0, self.norm)
            for _ in range(self.steps):
                _, grad, logits = self.loss_and_grad(packed, x, labels)
                best = _offer(best, x, logits, labels)
                x = packed.step_to(x - packed.x0 + alpha * packed.normalize(grad, self.norm), self.norm)
            with torch.no_grad():
                best = _offer(best, x, self.forward(packed, x), labels)
        assert best is not None
        return best.x, best.logits


def _offer(best: BestTracker | None, x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> BestTracker:
    if best is None:
        return BestTracker(x, logits, labels)
    best.update(x, logits)
    return best


@ATTACKS.register("pgd-l2")
class PGDL2(PGD):
    """l2 PGD (the CRMT paper's attack)."""

    default_norm = "l2"


@ATTACKS.register("pgd-linf")
class PGDLinf(PGD):
    """l-inf PGD."""

    default_norm = "linf"
