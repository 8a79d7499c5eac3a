"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

Per batch, each modality's confidence in the true class from its own part of the concat head,
``s_m = sum_i softmax(W^(m) z_m,i + b / M)[y_i]``. The original two-modality ratio
``rho = s_a / s_v`` generalises to ``rho_m = s_m / min_j s_j`` (every modality measured against the
weakest; for M = 2 this is the paper's ratio for the dominant modality and 1 for the other). After
backward, every parameter gradient of encoder ``m`` becomes

    g <- k_m g + GE noise,    k_m = 1 - tanh(alpha * max(rho_m - 1, 0)),

so the dominant encoders slow down and the weakest keeps ``k = 1``; GE adds ``N(0, std(g)^2)``
noise (the std of that parameter's gradient, before scaling) to every encoder gradient, as the
public code does. The fusion head is not modulated. Deviation: the public code modulates only 4-d
(convolution) weights; ours modulates every encoder parameter, since our encoders include MLPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.training.base import METHODS, MethodOptions, StepContext, Strategy, require, unwrap


def modality_confidence(scores: dict[str, torch.Tensor], bias: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``s_m = sum_i softmax(scores_m,i + bias / M)[y_i]`` (the bias split evenly, as in the paper's code)."""
    share = bias / len(scores)
    return {
        m: float(F.softmax(s.detach() + share.detach(), 1).gather(1, labels[:, None]).sum()) for m, s in scores.items()
    }


def ogm_coefficients(confidence: dict[str, float], alpha: float) -> dict[str, float]:
    """``k_m = 1 - tanh(alpha * max(s_m / min_j s_j - 1, 0))``."""
    weakest = max(min(confidence.values()), 1e-12)
    return {
        m: 1.0 - float(torch.tanh(torch.tensor(alpha * max(s / weakest - 1.0, 0.0)))) for m, s in confidence.items()
    }


@dataclass
class OGMGEOptions(MethodOptions):
    """``alpha`` (the paper sweeps 0.1-0.8; its example runs use 0.8) and whether to add GE noise."""

    alpha: float = 0.8
    ge: bool = True

    def check(self) -> None:
        super().check()
        require(self.alpha >= 0, f"option alpha must be >= 0, got {self.alpha}", "alpha")


@METHODS.register("ogm-ge")
class OGMGE(Strategy[OGMGEOptions]):
    """Joint training whose dominant encoders' gradients are damped (see module docstring)."""

    head = "concat"
    Options = OGMGEOptions
    distributed_reason = "the modulation coefficients and noise are computed per process (replicas would diverge)"

    def __init__(self, options: OGMGEOptions, meta: DatasetMeta) -> None:
        super().__init__(options, meta)
        self.coefficients: dict[str, float] = {}

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs, return_all=True)
        conf = modality_confidence(out["scores"], unwrap(model).head.bias, labels)
        self.coefficients = ogm_coefficients(conf, self.options.alpha)
        return F.cross_entropy(out["logits"], labels), out["logits"]

    @torch.no_grad()
    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        for m, enc in unwrap(model).encoders.items():
            k = self.coefficients[m]
            for p in enc.parameters():
                if p.grad is None:
                    continue
                g = p.grad
                noise = None
                if self.options.ge and g.numel() > 1:
                    std = float(g.std())
                    noise = torch.randn(g.shape, generator=ctx.generator).to(g) * std
                g.mul_(k)
                if noise is not None:
                    g.add_(noise)
