"""FAB (Croce & Hein 2020): targeted FAB-T and untargeted FAB ("plus"), for l-inf and l2, under a
joint budget, on the packed modality vector. Each step is the exact minimal-norm projection onto
the linearised boundary inside the valid box
(:func:`~mmrobust.attacks.projection.project_onto_hyperplane_in_box`)."""

from __future__ import annotations

import math

import torch

from mmrobust.attacks.base import ATTACKS, BestTracker, Packed
from mmrobust.attacks.component import AutoAttackComponent
from mmrobust.attacks.projection import project_onto_hyperplane_in_box


@ATTACKS.register("fab-t")
class FABT(AutoAttackComponent):
    """Targeted FAB (Croce & Hein 2020): at each step, linearise ``z_target - z_y`` and take the
    minimal-norm step onto its zero set *inside the valid box*
    (:func:`~mmrobust.attacks.projection.project_onto_hyperplane_in_box`), both from the current
    point and from the clean input, mix the two with weight ``a = min(|d_cur| / (|d_cur| +
    |d_orig|), alpha_max)``, overshoot by ``eta`` and, after each success, step back towards the clean
    input (x ``beta``). Keeps the smallest adversarial perturbation and counts it only within eps."""

    default_norm = "linf"
    fixed_loss = "ce"  # not used for optimisation; FAB is loss-free
    targeted = True
    alpha_max, eta, beta = 0.1, 1.05, 0.9

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, runs = self.targeted_runs(packed, labels)
        for restart, idx, target in runs:
            sub, y = packed.take(idx), labels[idx]
            found = self._fab(sub, y, target, random_start=restart > 0, samples=idx)
            with torch.no_grad():
                best.update(found, self.forward(sub, found), idx)
        return best.x, best.logits

    def _closest_boundary(
        self, packed: Packed, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Untargeted FAB: ``z_k - z_y`` and its gradient for the wrong class ``k`` whose linearised
        boundary is closest, ``|z_k - z_y| / ||grad||_dual`` (one backward pass per class), and the logits."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.forward(packed, x)
            grads = torch.stack([torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)[0]
                                 for k in range(logits.shape[1])], 1)  # fmt: skip
        logits = logits.detach()
        f = logits - logits.gather(1, labels[:, None])
        w = grads - grads[torch.arange(len(labels)), labels][:, None]
        dual = w.abs().sum(2) if self.norm == "linf" else w.norm(dim=2)
        dist = f.abs() / (dual + 1e-12)
        dist[torch.arange(len(labels)), labels] = math.inf
        k = dist.argmin(1)
        rows = torch.arange(len(labels))
        return f[rows, k], w[rows, k], logits

    def _fab(
        self,
        packed: Packed,
        labels: torch.Tensor,
        target: torch.Tensor | None,
        random_start: bool = False,
        samples: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One FAB run from the clean input or (``random_start``, the reference's restarts after
        the first) from a random point at half the budget: l-inf ``eps/2 * t / max|t|`` with ``t``
        uniform in [-1, 1], l2 a random direction of length ``eps/2``; clamped to the valid box.

        With ``early_stop`` a row leaves once it, or another row of the same sample (``samples``: the
        sample of each row), has an adversarial point within eps."""
        x0_all = packed.x0
        eps = packed.eps[0]
        x = x0_all.clone()
        if random_start:
            x = self._random_point(packed, x0_all, packed.expand(packed.eps) * 0.5)
        out = x0_all.clone()
        out_norm = torch.full((x0_all.shape[0],), math.inf, dtype=x0_all.dtype, device=x0_all.device)
        rows = torch.arange(x0_all.shape[0], device=x0_all.device)  # the rows of ``packed`` still running
        x0 = x0_all
        x_best = x0.clone()
        best_norm = out_norm.clone()

        def boundary(p: Packed, z: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None):
            if t is None:
                return self._closest_boundary(p, z, y)

            def gap(logits: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:  # > 0 when the target wins
                return logits.gather(1, t[:, None]).squeeze(1) - logits.gather(1, yy[:, None]).squeeze(1)

            return self.loss_and_grad(p, z, y, gap)

        # the reference's order: a plain forward pass scores each step, the next gradient comes after
        # (reusing that pass for the gradient was tried: rows that step back need it again, and FAB's
        # rows step back most of the time, so it cost more than it saved)
        f, w, _ = boundary(packed, x, labels, target)
        for it in range(self.steps):
            last = it == self.steps - 1
            with torch.no_grad():
                lo = packed.lo if packed.lo is not None else torch.full_like(x0, -math.inf)
                hi = packed.hi if packed.hi is not None else torch.full_like(x0, math.inf)
                # the linearised boundary {z: f + w.(z - x) = 0}, reached inside the valid box
                d_cur = project_onto_hyperplane_in_box(w, -f, lo - x, hi - x, self.norm)
                d_orig = project_onto_hyperplane_in_box(w, -f - (w * (x0 - x)).sum(1), lo - x0, hi - x0, self.norm)
                n_cur = packed.group_norms(d_cur, self.norm)[:, 0]
                n_orig = packed.group_norms(d_orig, self.norm)[:, 0]
                # bias towards the clean input when it is (relatively) close to the boundary
                a = (n_cur / (n_cur + n_orig + 1e-12)).clamp(0, self.alpha_max)[:, None]
                x = packed.clamp((x + self.eta * d_cur) * (1 - a) + (x0 + self.eta * d_orig) * a)
            with torch.no_grad():
                logits = self.forward(packed, x)
                adv = logits.argmax(1) != labels
                dist = packed.group_norms(x - x0, self.norm)[:, 0]
                better = adv & (dist < best_norm)
                x_best[better], best_norm[better] = x[better], dist[better]
                # after a success, step back towards x0 to look for a closer adversarial example
                x = torch.where(adv[:, None], x0 + (x - x0) * self.beta, x)
            if last:
                break
            done = best_norm <= eps * (1 + 1e-6) if self.early_stop else torch.zeros_like(adv)
            if samples is not None and bool(done.any()):  # a sample broken by one target needs no other
                hit = torch.zeros(int(samples.max()) + 1, dtype=torch.bool, device=done.device)
                hit[samples[rows[done]]] = True
                done = hit[samples[rows]]
            if bool(done.any()):
                out[rows[done]], out_norm[rows[done]] = x_best[done], best_norm[done]
                if bool(done.all()):
                    return torch.where((out_norm <= eps * (1 + 1e-6))[:, None], out, x0_all)
                keep = (~done).nonzero().squeeze(1)
                packed, rows, labels = packed.take(keep), rows[keep], labels[keep]
                target = None if target is None else target[keep]
                x0, x, x_best, best_norm = packed.x0, x[keep], x_best[keep], best_norm[keep]
            f, w, _ = boundary(packed, x, labels, target)
        out[rows], out_norm[rows] = x_best, best_norm
        within = out_norm <= eps * (1 + 1e-6)
        return torch.where(within[:, None], out, x0_all)


@ATTACKS.register("fab")
class FAB(FABT):
    """Untargeted FAB (AutoAttack "plus", 5 restarts there): each step heads for the closest
    linearised boundary; restarts after the first start at a random point (see :meth:`FABT._fab`)."""

    targeted = False

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            best = BestTracker(packed.x0, self.forward(packed, packed.x0), labels)
        for restart in range(self.restarts):  # the reference ("plus") runs 5, all but the first randomly started
            idx = (~best.broken).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            sub = packed.take(idx)
            found = self._fab(sub, labels[idx], None, random_start=restart > 0)
            with torch.no_grad():
                best.update(found, self.forward(sub, found), idx)
        return best.x, best.logits
