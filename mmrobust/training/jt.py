"""JT: joint training of all encoders and the concat-linear head with cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch
from mmrobust.training.base import METHODS, StepContext, Strategy
from mmrobust.training.certified import CertifiedOptions


@dataclass
class JTOptions(CertifiedOptions):
    """JT has no options of its own; certified training (``certified=ibp|crown-ibp``) can be mixed in."""


@METHODS.register("jt")
class JointTraining(Strategy[JTOptions]):
    """Plain joint training: ``CE(h(x), y)``."""

    head = "concat"
    Options = JTOptions

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(inputs)
        return F.cross_entropy(logits, labels), logits
