"""APGD (Croce & Hein 2020): APGD-CE, APGD-DLR ("plus") and APGD-T (targeted DLR), for l-inf and
l2, under a joint budget, on the packed modality vector. Step-size schedule and checkpoints as in
the reference code (see :func:`_checkpoints`).

With ``early_stop`` (what :class:`~mmrobust.attacks.autoattack.AutoAttack` asks for) a run drops a
sample from its batch as soon as any iterate misclassifies it, and APGD-T attacks several target
classes in one batch (one row per sample and target, see
:meth:`~mmrobust.attacks.component.AutoAttackComponent.targeted_runs`) instead of one pass per target. Every row's
trajectory is the one it has alone (the step sizes are per row), so which samples end up broken
does not change; only the work spent on samples already broken is saved (see docs/attacks.md).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from mmrobust.attacks.base import ATTACKS, BestTracker, Packed
from mmrobust.attacks.component import AutoAttackComponent
from mmrobust.attacks.losses import ce_loss, dlr_loss, dlr_targeted_loss


def _checkpoints(n_iter: int) -> list[int]:
    """APGD's step-size checkpoints, as the reference code computes them in whole iterations: the
    first after ``floor(0.22 n)``, then intervals shrinking by ``floor(0.03 n)`` down to
    ``floor(0.06 n)`` (each at least 1). For small ``n`` this is denser than ``ceil(p_j n)``."""
    first, decrement, least = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    points, at, span = [], first, first
    while at < n_iter:
        points.append(at)
        span = max(span - decrement, least)
        at += span
    return points


class APGD(AutoAttackComponent):
    """Auto-PGD: momentum 0.75, step size halved at checkpoints where the loss stopped rising."""

    def _untargeted(
        self, packed: Packed, labels: torch.Tensor, loss_fn: Any, best: BestTracker
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``restarts`` runs of APGD on ``loss_fn``, each only on the samples no earlier run has broken."""
        for _ in range(self.restarts):
            idx = (~best.broken).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            self._apgd(packed.take(idx), labels[idx], loss_fn, best, idx)
        return best.x, best.logits

    def _apgd(
        self,
        packed: Packed,
        labels: torch.Tensor,
        loss_fn: Any,
        best: BestTracker,
        index: torch.Tensor,
        target: torch.Tensor | None = None,
    ) -> None:
        """One APGD run on the rows of ``packed`` (row i is sample ``index[i]`` of ``best``; ``target``:
        the target class per row for a targeted ``loss_fn(logits, labels, target)``). With
        ``early_stop``, rows whose sample is broken leave the batch."""
        n_iter = self.steps

        def loss_of(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
            return loss_fn(logits, y) if t is None else loss_fn(logits, y, t)

        x0 = packed.x0
        x = self._random_point(packed, x0, packed.expand(packed.eps))
        step = 2 * packed.eps.expand(x0.shape[0], -1)[:, :1].clone()  # (N, 1)
        loss, grad, logits = self.loss_and_grad(packed, x, labels, partial(loss_of, t=target))
        best.update(x, logits, index)
        x_best, loss_best, grad_best = x.clone(), loss.clone(), grad.clone()
        x_old = x.clone()
        checkpoints = set(_checkpoints(n_iter))
        last_check = 0
        # As in the reference: the first checkpoint compares the loss after the first step with 0
        # (its zero-initialised loss buffer, read at index -1), not with the loss at the start; for
        # the targeted DLR loss (< 0 until the target wins) that first comparison is never a rise.
        # And no sample counts as "reduced without improvement" before the first checkpoint.
        losses = [torch.zeros_like(loss)]
        reduced_last = torch.ones_like(loss, dtype=torch.bool)
        loss_best_last = loss_best.clone()
        for i in range(n_iter):
            if self.early_stop:
                keep = ~best.broken[index]
                if not bool(keep.all()):
                    if not bool(keep.any()):
                        return
                    rows = keep.nonzero().squeeze(1)
                    packed, labels, index = packed.take(rows), labels[rows], index[rows]
                    target = None if target is None else target[rows]
                    x0, x, x_old, grad, step = packed.x0, x[rows], x_old[rows], grad[rows], step[rows]
                    x_best, loss_best, grad_best = x_best[rows], loss_best[rows], grad_best[rows]
                    losses = [v[rows] for v in losses]
                    reduced_last, loss_best_last = reduced_last[rows], loss_best_last[rows]
            with torch.no_grad():
                a = 0.75 if i > 0 else 1.0
                x1 = packed.step_to(x - x0 + step * packed.normalize(grad, self.norm), self.norm)
                x1 = packed.step_to(x - x0 + (x1 - x) * a + (x - x_old) * (1 - a), self.norm)
                x_old, x = x, x1
            loss, grad, logits = self.loss_and_grad(packed, x, labels, partial(loss_of, t=target))
            best.update(x, logits, index)
            losses.append(loss)
            improved = loss > loss_best
            x_best[improved], grad_best[improved], loss_best[improved] = x[improved], grad[improved], loss[improved]
            if i + 1 in checkpoints and i + 1 < n_iter:
                span = i + 1 - last_check
                rises = sum((losses[j] > losses[j - 1]).float() for j in range(len(losses) - span, len(losses)))
                reduce = (rises <= 0.75 * span) | (~reduced_last & (loss_best_last >= loss_best))
                reduced_last, loss_best_last, last_check = reduce, loss_best.clone(), i + 1
                step[reduce] /= 2
                x[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
                losses = losses[-1:]  # the next checkpoint looks back at most to this one


@ATTACKS.register("apgd-ce")
class APGDCE(APGD):
    """APGD on the cross-entropy loss (untargeted)."""

    default_norm = "linf"

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            best = BestTracker(packed.x0, self.forward(packed, packed.x0), labels)
        return self._untargeted(packed, labels, ce_loss, best)


@ATTACKS.register("apgd-dlr")
class APGDDLR(APGD):
    """APGD on the untargeted DLR loss (AutoAttack "plus"); needs >= 3 classes."""

    default_norm = "linf"
    fixed_loss = "dlr"
    min_classes = 3

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            clean_logits = self.forward(packed, packed.x0)
        self.check_applicable(clean_logits.shape[1], self.targets)
        return self._untargeted(packed, labels, dlr_loss, BestTracker(packed.x0, clean_logits, labels))


@ATTACKS.register("apgd-t")
class APGDT(APGD):
    """APGD on the targeted DLR loss, over the ``targets`` highest-scoring wrong classes."""

    default_norm = "linf"
    fixed_loss = "dlr"
    min_classes = 3
    targeted = True

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, runs = self.targeted_runs(packed, labels)
        for _, idx, target in runs:
            self._apgd(packed.take(idx), labels[idx], dlr_targeted_loss, best, idx, target)
        return best.x, best.logits
