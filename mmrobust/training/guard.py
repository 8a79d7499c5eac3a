"""The catastrophic-overfitting guard of the adversarial-training methods.

Single-step adversarial training can *overfit catastrophically* (Wong et al. 2020): within an epoch
the model learns to defeat the one-step attack it trains on (its accuracy under that attack rises)
while its robustness to a multi-step attack collapses. The guard watches for exactly that on a fixed
random subset of the validation split (``samples``, drawn once from the run's seed; never the test
split), after every epoch, under the training threat model:

* multi-step robust accuracy: ``steps``-step PGD (random start), per-sample worst case over the CE
  and the CW (logit margin) losses; both losses' accuracies are recorded too;
* single-step accuracy: one FGM step of eps (the sign for l-inf) from the clean input, CE.

A *collapse* is an epoch whose multi-step robust accuracy lies more than ``drop`` below the best so
far while its single-step accuracy is above the single-step accuracy of that best epoch. It is
reported (a message) and recorded in the epoch's history row; with the guard on the engine keeps the
epoch of the best multi-step robust accuracy (ties: validation accuracy), not the best clean one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmrobust.attacks.gradient import FGM, PGD
from mmrobust.attacks.threat import ThreatModel
from mmrobust.data.base import Split
from mmrobust.eval.metrics import accuracy
from mmrobust.eval.robust import attack_predictions, worst_predictions
from mmrobust.models.fuse import fuse_for_split

#: history columns written by the guard
ROBUST = "guard_robust_accuracy"
ROBUST_CE = "guard_robust_accuracy_ce"
ROBUST_CW = "guard_robust_accuracy_cw"
SINGLE = "guard_single_step_accuracy"
COLLAPSE = "guard_collapse"


class CollapseGuard:
    """Per-epoch multi-step vs single-step robustness on a fixed validation subset (module docstring)."""

    def __init__(self, threat: ThreatModel, *, samples: int = 128, steps: int = 10, drop: float = 0.10,
                 seed: int = 0) -> None:  # fmt: skip
        self.threat, self.samples, self.steps, self.drop, self.seed = threat, samples, steps, drop, seed
        self.best: tuple[float, float, int] | None = None  # (robust, single-step, epoch) of the best epoch
        self.collapses: list[dict[str, Any]] = []
        self._subset: Split | None = None

    def subset(self, val: Split) -> Split:
        """The fixed validation subset (the same samples every epoch)."""
        if self._subset is None:
            pick = torch.randperm(len(val), generator=torch.Generator().manual_seed(self.seed + 7919))
            self._subset = val.subset(pick[: min(self.samples, len(val))])
        return self._subset

    def measure(self, model: nn.Module, val: Split, device: torch.device | str) -> dict[str, float]:
        """The guard's accuracies of ``model`` on the subset of ``val`` (history columns)."""
        split = self.subset(val)
        labels = split.labels
        # the attacks run on a fused copy (same function, cheaper passes); the model judges
        net = fuse_for_split(model, split, device).module
        preds = {
            loss: attack_predictions(
                PGD(net, self.threat, steps=self.steps, loss=loss, seed=self.seed), split, device=device, judge=model
            )  # fmt: skip
            for loss in ("ce", "cw")
        }
        single = attack_predictions(FGM(net, self.threat, loss="ce"), split, device=device, judge=model)
        worst = worst_predictions([preds["ce"], preds["cw"]], labels)
        return {
            ROBUST: accuracy(worst, labels),
            ROBUST_CE: accuracy(preds["ce"], labels),
            ROBUST_CW: accuracy(preds["cw"], labels),
            SINGLE: accuracy(single, labels),
        }

    def observe(self, epoch: int, acc: dict[str, float]) -> tuple[dict[str, Any], str | None]:
        """Record epoch ``epoch``'s (0-based) accuracies; the history columns and a message on a collapse."""
        robust, single = acc[ROBUST], acc[SINGLE]
        collapse = False
        message = None
        if self.best is not None:
            best, best_single, best_epoch = self.best
            if robust < best - self.drop and single > best_single:
                collapse = True
                self.collapses.append({"epoch": epoch + 1, "robust_accuracy": robust, "single_step_accuracy": single,
                                       "best_robust_accuracy": best, "best_epoch": best_epoch})  # fmt: skip
                message = (
                    f"catastrophic overfitting at epoch {epoch + 1}: {self.steps}-step PGD robust accuracy {robust:.3f} "
                    f"is {best - robust:.3f} below its best {best:.3f} (epoch {best_epoch}) while single-step accuracy "
                    f"rose to {single:.3f} (from {best_single:.3f}); the kept model is chosen by multi-step robust "
                    f"accuracy ({self.threat.describe()}, {self.subset_size} validation samples)"
                )
        if self.best is None or robust > self.best[0]:
            self.best = (robust, single, epoch + 1)
        return {**acc, COLLAPSE: collapse}, message

    def epoch(
        self, model: nn.Module, val: Split, device: torch.device | str, epoch: int
    ) -> tuple[dict[str, Any], str | None]:
        """Measure and observe one epoch (see :meth:`measure`, :meth:`observe`)."""
        return self.observe(epoch, self.measure(model, val, device))

    @property
    def subset_size(self) -> int:
        return len(self._subset) if self._subset is not None else self.samples

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` records about the guard."""
        return {
            "enabled": True,
            "threat": self.threat.describe(),
            "samples": self.subset_size,
            "split": "val",
            "multi_step": f"PGD {self.steps} steps, worst case over CE and CW",
            "single_step": "FGM (one step of eps from the clean input, CE)",
            "drop": self.drop,
            "best_epoch": self.best[2] if self.best is not None else None,
            "best_robust_accuracy": self.best[0] if self.best is not None else None,
            "collapses": self.collapses,
        }
