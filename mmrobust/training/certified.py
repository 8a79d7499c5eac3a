"""Certified training (IBP, CROWN-IBP) as an option of a method: ``certified=ibp|crown-ibp``.

A method whose options inherit :class:`CertifiedOptions` (jt, ojt, the CRMT methods and mmat) can mix
a *verified* loss into its own loss. Each step::

    loss = kappa * natural + (1 - kappa) * verified
    verified = CE(-lower, y),  lower[k] a lower bound of h_y(x') - h_k(x') over the ball (0 at k = y)

``natural`` is the method's own loss (adversarial for mmat and crmt-at, whatever attack trains it),
``lower`` the interval bound (``ibp``) or ``beta * CROWN-IBP + (1 - beta) * IBP`` (``crown-ibp``)
of :func:`mmrobust.certify.ibp.margin_bounds`, over the threat model of radius ``eps``.

Schedule (per step, Gowal et al., 2018; Zhang et al., 2020): ``certified_warmup`` epochs of the
natural loss alone, then over ``certified_ramp`` epochs ``eps`` grows linearly from 0 to
``certified_eps``, ``kappa`` falls from 1 to ``certified_mix`` and ``beta`` from 1 to
``certified_beta``; then they stay there. The radius is in the units of the threat model
(:class:`~mmrobust.attacks.threat.ThreatModel`; joint l2 by default: ``||(delta_m / std_m)_m||_2``,
the standardised units the ``crown`` certifier reports radii in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch
from mmrobust.training.base import MethodOptions, StepContext, require

if TYPE_CHECKING:
    from mmrobust.training.base import Strategy

CERTIFIED = ("none", "ibp", "crown-ibp")
CERTIFIED_NORMS = ("l2", "linf")
CERTIFIED_BUDGETS = ("joint", "per-modality")


@dataclass(frozen=True)
class CertifiedSchedule:
    """Where the ramp is at one step: the radius, the natural loss's weight and CROWN's weight."""

    eps: float
    kappa: float
    beta: float
    progress: float  # 0 before and at the start of the ramp, 1 at its end


@dataclass
class CertifiedOptions(MethodOptions):
    """Certified-training options (a mixin of a method's options; see the module docstring).

    ``certified``: none | ibp | crown-ibp; ``certified_eps``: the final radius (0: the method's
    ``train_eps`` where it has one, else 1.0); ``certified_norm``: l2 | linf; ``certified_budget``:
    joint | per-modality; ``certified_warmup``/``certified_ramp``: epochs (fractions allowed);
    ``certified_mix``: the natural loss's final weight kappa in [0, 1]; ``certified_beta``: CROWN-IBP's
    final weight in [0, 1] (crown-ibp only).
    """

    certified: str = "none"
    certified_eps: float = 0.0
    certified_norm: str = "l2"
    certified_budget: str = "joint"
    certified_warmup: float = 1.0
    certified_ramp: float = 3.0
    certified_mix: float = 0.5
    certified_beta: float = 0.0

    def check(self) -> None:
        super().check()
        for key, choices in (
            ("certified", CERTIFIED),
            ("certified_norm", CERTIFIED_NORMS),
            ("certified_budget", CERTIFIED_BUDGETS),
        ):
            value = getattr(self, key)
            require(value in choices, f"option {key}='{value}' is unknown; choose from: {', '.join(choices)}", key)
        require(
            self.certified_eps >= 0, f"option certified_eps must be >= 0, got {self.certified_eps}", "certified_eps"
        )
        for key in ("certified_warmup", "certified_ramp"):
            value = getattr(self, key)
            require(value >= 0, f"option {key} must be >= 0 epochs, got {value}", key)
        for key in ("certified_mix", "certified_beta"):
            value = getattr(self, key)
            require(0.0 <= value <= 1.0, f"option {key} must be in [0, 1], got {value}", key)

    @property
    def certified_radius(self) -> float:
        """The final training radius: ``certified_eps``, else ``train_eps``, else 1.0."""
        return self.certified_eps or float(getattr(self, "train_eps", 0.0) or 1.0)

    def certified_schedule(self, ctx: StepContext) -> CertifiedSchedule:
        """The ramp at step ``ctx`` (linear per step; by epoch where the step count is unknown)."""
        t = float(ctx.epoch) + (ctx.step / ctx.steps_per_epoch if ctx.steps_per_epoch > 0 else 0.0)
        t -= self.certified_warmup
        if t < 0:
            return CertifiedSchedule(0.0, 1.0, 1.0, 0.0)
        p = min(1.0, t / self.certified_ramp) if self.certified_ramp > 0 else 1.0
        return CertifiedSchedule(
            self.certified_radius * p,
            1.0 + p * (self.certified_mix - 1.0),
            1.0 + p * (self.certified_beta - 1.0),
            p,
        )

    def selectable(self, epoch: int) -> bool:
        """Only the models trained to the end of the ramp compete on validation accuracy (before it,
        the natural loss weighs more and validation accuracy is higher)."""
        return self.certified == "none" or epoch + 1 >= self.certified_warmup + self.certified_ramp

    def step_loss(
        self, strategy: Strategy[Any], model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        natural, logits = strategy.loss(model, inputs, labels, ctx)
        if self.certified == "none":
            return natural, logits
        s = self.certified_schedule(ctx)
        if s.kappa >= 1.0:  # warm-up: the verified term has no weight
            return natural, logits
        return s.kappa * natural + (1.0 - s.kappa) * self.verified_loss(strategy, model, inputs, labels, s), logits

    def verified_loss(
        self,
        strategy: Strategy[Any],
        model: nn.Module,
        inputs: Batch,
        labels: torch.Tensor,
        schedule: CertifiedSchedule,
    ) -> torch.Tensor:
        """``CE(-lower, y)`` at the schedule's radius (lower: the margins' lower bounds, 0 at ``k = y``)."""
        from mmrobust.attacks.threat import ThreatModel
        from mmrobust.certify.ibp import margin_bounds

        threat = ThreatModel.parse(
            strategy.meta, eps=schedule.eps, norm=self.certified_norm, budget=self.certified_budget
        )
        crown = self.certified == "crown-ibp" and schedule.beta > 0
        bounds = margin_bounds(model, inputs, labels, threat, crown=crown)
        lower = bounds.ibp
        if bounds.crown is not None:
            lower = schedule.beta * bounds.crown + (1.0 - schedule.beta) * bounds.ibp
        return F.cross_entropy(-lower, labels)
