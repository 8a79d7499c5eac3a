"""Gaussian noise augmentation: the base-classifier training that randomized smoothing needs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch
from mmrobust.errors import ConfigError
from mmrobust.training.base import METHODS, StepContext, Strategy


@dataclass
class GaussianOptions:
    """``sigma``: standard deviation of the noise added to every modality (input space); train with
    the ``sigma`` you will certify with (``mmrobust.certify.smoothing``)."""

    sigma: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, int | float) or not 0 < self.sigma < math.inf:
            raise ConfigError(f"method 'gaussian': sigma must be a finite number > 0, got {self.sigma!r}")


@METHODS.register("gaussian")
class GaussianAugmentation(Strategy[GaussianOptions]):
    """Joint training on noisy inputs: ``CE(h(x + e), y)``, ``e ~ N(0, sigma^2 I)`` on every modality
    (Cohen et al., 2019): a smoothed classifier is only accurate if its base model is accurate under noise."""

    head = "concat"
    Options = GaussianOptions

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = float(self.options.sigma)
        noisy = {
            m: v + sigma * torch.randn(v.shape, generator=ctx.generator, dtype=v.dtype).to(v.device)
            for m, v in inputs.items()
        }
        logits = model(noisy)
        return F.cross_entropy(logits, labels), logits
