"""JT: joint training of all encoders and the concat-linear head with cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch
from mmrobust.training.base import METHODS, NoOptions, StepContext, Strategy


@METHODS.register("jt")
class JointTraining(Strategy[NoOptions]):
    """Plain joint training: ``CE(h(x), y)``."""

    head = "concat"

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(inputs)
        return F.cross_entropy(logits, labels), logits
