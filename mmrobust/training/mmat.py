"""MMAT: multi-modal adversarial training (Madry et al., ICLR 2018, over the joint input).

Each step trains on adversarial examples ``x' ~ argmax_{x' in B(x)} CE(h(x'), y)`` inside the training
threat model ``B`` (default: the joint l2 ball ``||(delta_1, ..., delta_M)||_2 <= train_eps``), found by
``train_attack`` (default ``steps`` PGD steps from a random start; the fast single-step attacks and
``free`` are described in :mod:`mmrobust.training.adversarial`). ``mix_clean = lambda`` trains on a clean/adversarial mix:
``lambda CE(h(x), y) + (1 - lambda) CE(h(x'), y)`` (0: adversarial only, the default).
It is CRMT-AT's adversarial step without CRMT's head, regulariser and step 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import Batch
from mmrobust.training.adversarial import AdversarialOptions, AdversarialTraining
from mmrobust.training.base import METHODS, StepContext, Strategy, require
from mmrobust.training.certified import CertifiedOptions


@dataclass
class MMATOptions(CertifiedOptions, AdversarialOptions):
    """Threat model, training attack and guard (:class:`AdversarialOptions`; ``eps`` is the old name of
    ``train_eps``) and the clean share ``mix_clean`` in [0, 1]."""

    mix_clean: float = 0.0

    def check(self) -> None:
        super().check()
        require(0.0 <= self.mix_clean <= 1.0, f"option mix_clean must be in [0, 1], got {self.mix_clean}", "mix_clean")


@METHODS.register("mmat")
class MMAT(AdversarialTraining, Strategy[MMATOptions]):
    """Multi-modal adversarial training on the concat head (see module docstring)."""

    head = "concat"
    Options = MMATOptions

    def examples(self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext) -> Batch:
        """The step's adversarial examples (inside the training threat model)."""
        return self.adversarial_examples(model, inputs, labels, ctx)

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.options.mix_clean
        adv_logits = model(self.examples(model, inputs, labels, ctx))
        loss = F.cross_entropy(adv_logits, labels)
        if lam > 0:
            loss = lam * F.cross_entropy(model(inputs), labels) + (1.0 - lam) * loss
        return loss, adv_logits
