"""Joint-l2 PGD training examples, shared by the adversarial-training methods (CRMT-AT, MMAT, VARMAT-input).

The training budget is ``train_eps`` in every method (``eps`` for MMAT/VARMAT-input and ``at_eps``
for CRMT-AT are accepted as its old names): a joint l2 radius in the units of
:class:`~mmrobust.attacks.threat.ThreatModel`, i.e. measured on ``x_m / std_m`` (the
normalisation's std; 1 for data stored standardised), so it keeps its meaning whatever the data
store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.training.base import MethodOptions, StepContext, require


@dataclass
class AdversarialOptions(MethodOptions):
    """Joint l2 budget ``||(delta_1 / s_1, ..., delta_M / s_M)||_2 <= train_eps`` over all modalities
    (``s_m``: the threat model's scales), ``steps`` PGD steps; ``eps`` is the old name of ``train_eps``."""

    aliases: ClassVar[dict[str, str]] = {"eps": "train_eps"}

    train_eps: float = 0.5
    steps: int = 5
    step_size: float = 0.0  # 0 = 2.5 * train_eps / steps (Madry et al.)

    def check(self) -> None:
        super().check()
        require(self.train_eps > 0, f"option train_eps must be > 0, got {self.train_eps}", "train_eps")
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
    """CE-maximising joint-l2 PGD examples (random start) inside the threat model of ``eps`` on
    ``meta`` (:meth:`~mmrobust.attacks.threat.ThreatModel.parse`: joint l2, scales from the
    normalisations), detached.

    The attack runs the model in eval mode (BatchNorm statistics untouched) and restores train mode;
    its seed follows the step so a run is reproducible.
    """
    from mmrobust.attacks import PGDL2
    from mmrobust.attacks.threat import ThreatModel

    threat = ThreatModel.parse(meta, eps=eps, norm="l2", budget="joint")
    attack = PGDL2(
        getattr(model, "module", model), threat, steps=steps, rel_step_size=(step_size / eps) or None, loss="ce",
        seed=ctx.epoch * 100_003 + ctx.step,
    )  # fmt: skip
    return {k: v.detach() for k, v in attack(inputs, labels).items()}
