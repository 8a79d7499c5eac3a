"""Gradient Blending (Wang, Tran, Feiszli, CVPR 2020, "What makes training multi-modal
classification networks hard?").

Besides the fusion head, every modality gets an auxiliary linear classifier on its features (saved
with the model; prediction uses the fusion head alone). The loss blends the ``M + 1`` heads,
``sum_h w_h CE(head_h(x), y)``, with weights from each head's overfitting-to-generalisation ratio,
estimated between two checkpoints ``N`` and ``N + n`` (``n = gb_every`` epochs):

    G_h = V_h(N) - V_h(N + n)                                  (held-out loss gained)
    O_h = (V_h(N + n) - T_h(N + n)) - (V_h(N) - T_h(N))        (overfitting gap grown)
    w_h = max(G_h, 0) / O_h^2,   normalised to sum to 1,

``V`` the loss on a held-out part of the *training* split (``holdout`` fraction, never val/test;
those samples do not train the model) and ``T`` the loss on an equally large random sample of the
rest. A head that overfits (its gap grows) gets little weight, one that keeps generalising gets
more. Weights start uniform and are re-estimated every ``gb_every`` epochs; if no head gained on the
held-out part, they stay as they were. ``O_h^2`` is floored at 1e-8.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch, Split, iterate_batches
from mmrobust.models.fusion import ModelConfig
from mmrobust.torchutil import eval_mode, to_device
from mmrobust.training.base import METHODS, MethodOptions, StepContext, Strategy, require
from mmrobust.training.context import TrainContext

FUSED = "fused"


def blend_weights(
    train_before: dict[str, float], val_before: dict[str, float], train_now: dict[str, float], val_now: dict[str, float]
) -> dict[str, float] | None:
    """``w_h ~ max(G_h, 0) / O_h^2`` normalised (see module docstring); None if every ``G_h <= 0``."""
    raw = {}
    for h in val_now:
        g = val_before[h] - val_now[h]
        o = (val_now[h] - train_now[h]) - (val_before[h] - train_before[h])
        raw[h] = max(g, 0.0) / max(o * o, 1e-8)
    total = sum(raw.values())
    return {h: w / total for h, w in raw.items()} if total > 0 else None


@torch.no_grad()
def head_losses(model: nn.Module, split: Split, device: str | torch.device) -> dict[str, float]:
    """Mean CE of the fusion head and of every auxiliary head on ``split`` (model in eval mode)."""
    sums: dict[str, float] = {}
    with eval_mode(model):
        for inputs, y in iterate_batches(split, 256):
            y = y.to(device)
            out = model(to_device(inputs, device), return_all=True)
            heads = {FUSED: out["logits"], **out["aux_logits"]}
            for h, logits in heads.items():
                sums[h] = sums.get(h, 0.0) + float(F.cross_entropy(logits, y, reduction="sum"))
    return {h: s / len(split) for h, s in sums.items()}


@dataclass
class GBOptions(MethodOptions):
    """``gb_every``: epochs between weight estimates; ``holdout``: fraction of the training split held out."""

    gb_every: int = 1
    holdout: float = 0.1

    def check(self) -> None:
        super().check()
        require(self.gb_every >= 1, f"option gb_every must be >= 1, got {self.gb_every}", "gb_every")
        require(0.0 < self.holdout < 0.5, f"option holdout must be in (0, 0.5), got {self.holdout}", "holdout")


@METHODS.register("gb")
class GradientBlending(Strategy[GBOptions]):
    """Fusion head + per-modality auxiliary heads, losses blended by G/O^2 (see module docstring)."""

    head = "concat"
    Options = GBOptions

    def __init__(self, options: GBOptions, meta: Any) -> None:
        super().__init__(options, meta)
        heads = [FUSED, *meta.modality_names]
        self.weights = {h: 1.0 / len(heads) for h in heads}
        self.held_out: Split | None = None
        self.train_probe: Split | None = None
        self._before: tuple[dict[str, float], dict[str, float]] | None = None

    @classmethod
    def model_config(cls, model: ModelConfig, options: GBOptions) -> ModelConfig:
        return dataclasses.replace(super().model_config(model, options), aux_heads=True)

    def training_split(self, train: Split, seed: int) -> Split:
        n_out = max(1, round(self.options.holdout * len(train)))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 104_729))
        self.held_out = train.subset(order[:n_out])
        rest = train.subset(order[n_out:])
        self.train_probe = rest.subset(slice(0, n_out))  # order is random: a random sample of the rest
        return rest

    def _measure(self, ctx: TrainContext) -> tuple[dict[str, float], dict[str, float]]:
        assert self.held_out is not None and self.train_probe is not None
        return head_losses(ctx.model, self.train_probe, ctx.device), head_losses(ctx.model, self.held_out, ctx.device)

    def on_train_start(self, ctx: TrainContext) -> None:
        self._before = self._measure(ctx)

    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> dict[str, Any]:
        if (epoch + 1) % self.options.gb_every == 0 and self._before is not None:
            now = self._measure(ctx)
            new = blend_weights(*self._before, *now)
            if new is not None:
                self.weights = new
            self._before = now
        return {"gb_weights": dict(self.weights)}

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs, return_all=True)
        heads = {FUSED: out["logits"], **out["aux_logits"]}
        loss = torch.stack([self.weights[h] * F.cross_entropy(z, labels) for h, z in heads.items()]).sum()
        return loss, out["logits"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weights": torch.tensor([self.weights[h] for h in sorted(self.weights)])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict({k: v for k, v in state.items() if k != "weights"})
        if "weights" in state:
            self.weights = dict(zip(sorted(self.weights), state["weights"].tolist(), strict=True))
