"""PMR: prototypical modal rebalance (Fan et al., CVPR 2023).

Each modality ``m`` keeps class prototypes ``c_k^(m)`` = the mean encoder feature of the training
samples of class ``k`` (recomputed, in eval mode, at the start of every epoch). The prototype logits
``p_k^(m)(x) = -||z_m - c_k^(m)||_2`` give a prototype cross-entropy ``PCE_m = CE(p^(m), y)`` that
trains encoder ``m`` on its own, and a per-modality confidence ``s_m = sum_i softmax(p^(m)_i)[y_i]``.
The loss is

    CE(h(x), y) + sum_m beta_m PCE_m,    beta_m = alpha * max(max_j s_j / s_m - 1, 0),

so only modalities behind the strongest one get the extra push, in proportion to the imbalance
(for M = 2: the weak modality gets ``alpha (rho - 1)`` with ``rho = s_strong / s_weak``; the
dominant gets 0). Deviation: the paper's entropy regulariser on the dominant modality's prototype
distribution is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch, Split, iterate_batches
from mmrobust.models.fusion import LateFusionModel
from mmrobust.torchutil import eval_mode, to_device
from mmrobust.training.base import METHODS, MethodOptions, StepContext, Strategy, require
from mmrobust.training.context import TrainContext


@torch.no_grad()
def class_prototypes(
    model: LateFusionModel, split: Split, num_classes: int, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Per modality, the ``(K, d_m)`` matrix of class-mean features over ``split`` (model in eval mode).

    A class absent from ``split`` gets a zero prototype.
    """
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(num_classes, device=device)
    with eval_mode(model):
        for inputs, y in iterate_batches(split, 256):
            y = y.to(device)
            feats = model.encode(to_device(inputs, device))
            onehot = F.one_hot(y, num_classes).to(feats[next(iter(feats))].dtype)
            for m, z in feats.items():
                sums[m] = sums.get(m, 0) + onehot.T @ z
            counts += onehot.sum(0)
    return {m: s / counts.clamp_min(1)[:, None] for m, s in sums.items()}


def pmr_weights(confidence: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``beta_m = alpha * max(max_j s_j / s_m - 1, 0)`` (detached)."""
    best = torch.stack([s.detach() for s in confidence.values()]).max()
    return {m: alpha * torch.relu(best / s.detach().clamp_min(1e-12) - 1.0) for m, s in confidence.items()}


@dataclass
class PMROptions(MethodOptions):
    """``alpha`` scales the prototype CE of the lagging modalities (the paper uses 1 or 2)."""

    alpha: float = 1.0

    def check(self) -> None:
        super().check()
        require(self.alpha >= 0, f"option alpha must be >= 0, got {self.alpha}", "alpha")


@METHODS.register("pmr")
class PMR(Strategy[PMROptions]):
    """Joint training plus prototype CE on the lagging modalities (see module docstring)."""

    head = "concat"
    Options = PMROptions

    def __init__(self, options: PMROptions, meta: Any) -> None:
        super().__init__(options, meta)
        self.prototypes: dict[str, torch.Tensor] = {}

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        self.prototypes = class_prototypes(ctx.model, ctx.train, self.meta.num_classes, ctx.device)

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs, return_all=True)
        loss = F.cross_entropy(out["logits"], labels)
        proto_logits = {m: -torch.cdist(z, self.prototypes[m]) for m, z in out["features"].items()}
        conf = {m: F.softmax(p, 1).gather(1, labels[:, None]).sum() for m, p in proto_logits.items()}
        for m, beta in pmr_weights(conf, self.options.alpha).items():
            loss = loss + beta * F.cross_entropy(proto_logits[m], labels)
        return loss, out["logits"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"prototypes.{m}": c for m, c in self.prototypes.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.prototypes = {k.removeprefix("prototypes."): v for k, v in state.items() if k.startswith("prototypes.")}
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("prototypes.")})
