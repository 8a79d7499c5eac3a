"""Multi-modal mixup (Zhang et al., ICLR 2018, applied jointly to every modality).

One ``lambda ~ Beta(alpha, alpha)`` and one permutation ``pi`` per batch, shared by all modalities:
``x~_m = lambda x_m + (1 - lambda) x_m[pi]`` for every ``m``, loss
``lambda CE(h(x~), y) + (1 - lambda) CE(h(x~), y[pi])``. Sharing them keeps the modalities of a
mixed sample consistent with each other (mixing each modality with a different partner would
create pairs whose modalities disagree about the class).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch
from mmrobust.training.base import METHODS, MethodOptions, StepContext, Strategy, require


def mixup_batch(
    inputs: Batch, labels: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[Batch, torch.Tensor, float]:
    """One ``lambda ~ Beta(alpha, alpha)`` and one permutation shared by every modality."""
    perm = torch.randperm(len(labels), generator=generator).to(labels.device)
    if alpha == 1.0:  # Beta(1, 1) is uniform: draw it from the step's generator
        lam = float(torch.rand((), generator=generator))
    else:  # torch's Beta sampler has no generator argument; the global RNG is seeded by the trainer
        lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    mixed = {m: lam * x + (1.0 - lam) * x[perm] for m, x in inputs.items()}
    return mixed, labels[perm], lam


@dataclass
class MixupOptions(MethodOptions):
    """``alpha``: the Beta(alpha, alpha) parameter of the mixing weight (1.0: uniform)."""

    alpha: float = 1.0

    def check(self) -> None:
        super().check()
        require(self.alpha > 0, f"option alpha must be > 0, got {self.alpha}", "alpha")


@METHODS.register("mixup")
class Mixup(Strategy[MixupOptions]):
    """Multi-modal mixup on the concat head (see module docstring)."""

    head = "concat"
    Options = MixupOptions

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, labels_b, lam = mixup_batch(inputs, labels, self.options.alpha, ctx.generator)
        logits = model(mixed)
        loss = lam * F.cross_entropy(logits, labels) + (1.0 - lam) * F.cross_entropy(logits, labels_b)
        return loss, logits
