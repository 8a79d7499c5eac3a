"""Joint-l2 PGD training examples, shared by the adversarial-training methods (CRMT-AT, MMAT, VARMAT-input)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.training.base import MethodOptions, StepContext, require


@dataclass
class AdversarialOptions(MethodOptions):
    """Joint l2 budget ``||(delta_1, ..., delta_M)||_2 <= eps`` over all modalities, ``steps`` PGD steps."""

    eps: float = 0.5
    steps: int = 5
    step_size: float = 0.0  # 0 = 2.5 * eps / steps (Madry et al.)

    def check(self) -> None:
        super().check()
        require(self.eps > 0, f"option eps must be > 0, got {self.eps}", "eps")
        require(self.steps >= 1, f"option steps must be >= 1, got {self.steps}", "steps")
        require(
            self.step_size >= 0,
            f"option step_size must be >= 0 (0 = 2.5 eps / steps), got {self.step_size}",
            "step_size",
        )


def joint_pgd_examples(
    model: nn.Module,
    inputs: Batch,
    labels: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float,
    meta: DatasetMeta,
    ctx: StepContext,
) -> Batch:
    """CE-maximising joint-l2 PGD examples (random start), detached.

    The attack runs the model in eval mode (BatchNorm statistics untouched) and restores train mode;
    its seed follows the step so a run is reproducible.
    """
    from mmrobust.attacks import PGDL2

    attack = PGDL2(
        getattr(model, "module", model), eps, steps=steps, rel_step_size=(step_size / eps) or None, loss="ce",
        budget="joint", meta=meta, seed=ctx.epoch * 100_003 + ctx.step,
    )  # fmt: skip
    return {k: v.detach() for k, v in attack(inputs, labels).items()}
