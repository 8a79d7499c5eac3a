"""AutoAttack-style attacks (Croce & Hein 2020) on the packed modality vector: APGD-CE, APGD-T
(targeted DLR), FAB-T and Square, for l-inf and l2, under a joint budget.

Our own implementations, written for a dict of modalities (no torchattacks, no [0, 1] assumption:
a modality is clamped to its declared valid range, or not at all). FAB-T's step is the exact
minimal-norm projection onto the linearised boundary inside the valid box, Square's proposals are
the reference's (l-inf windows of +-eps, l2 mass-preserving windows, the same p schedule). The one
structural departure, documented in docs/attacks.md: Square's windows are squares on image-like
modalities and segments on the others, in a modality drawn with probability proportional to its
size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmrobust.attacks.base import ATTACKS, TINY, Attack, BestTracker, Packed
from mmrobust.attacks.losses import ce_loss, dlr_loss, dlr_targeted_loss, margin
from mmrobust.attacks.projection import project_onto_hyperplane_in_box
from mmrobust.data.base import DatasetMeta
from mmrobust.errors import ConfigError


class _AutoAttack(Attack):
    """Shared constructor: joint budget only, a fixed loss, an iteration count."""

    budgets = ("joint",)
    fixed_loss = "ce"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.losses = (cls.fixed_loss,)

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        *,
        steps: int = 100,
        restarts: int = 1,
        norm: str | None = None,
        loss: str | None = None,
        modalities: Sequence[str] | None = None,
        budget: str = "joint",
        meta: DatasetMeta | None = None,
        valid_range: Mapping[str, tuple[float, float] | None] | None = None,
        seed: int = 0,
        targets: int = 9,
        num_classes: int | None = None,
    ) -> None:
        if budget != "joint":
            raise ConfigError(
                f"{self.name}: only a joint budget is supported (l-inf joint = the same eps per modality)"
            )
        if loss is not None and loss != self.fixed_loss:
            raise ConfigError(f"{self.name}: uses the {self.fixed_loss} loss; loss='{loss}' does not apply")
        super().__init__(model, eps, norm=norm, loss=self.fixed_loss, modalities=modalities, budget=budget, meta=meta,
                         valid_range=valid_range, seed=seed)  # fmt: skip
        if steps < 1 or restarts < 1:
            raise ConfigError(f"{self.name}: steps and restarts must be >= 1, got {steps} and {restarts}")
        self.steps, self.restarts, self.targets = steps, restarts, targets
        k = num_classes or (meta.num_classes if meta is not None else getattr(model, "num_classes", None))
        if k is not None:
            check_applicable(self.name, int(k), targets)

    def _random_point(self, packed: Packed, x0: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """A random point at distance ``radius`` (per column) from ``x0`` in the attack's norm, in the box."""
        if self.norm == "linf":
            t = 2 * torch.rand(x0.shape, generator=self.generator, dtype=x0.dtype).to(x0.device) - 1
            return packed.clamp(x0 + radius * t / t.abs().amax(1, keepdim=True).clamp_min(1e-12))
        t = torch.randn(x0.shape, generator=self.generator, dtype=x0.dtype).to(x0.device)
        return packed.clamp(x0 + radius * packed.normalize(t, "l2"))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "steps": self.steps, "restarts": self.restarts}


def check_applicable(name: str, num_classes: int, targets: int = 9) -> None:
    """Raise a clear :class:`ConfigError` where an AutoAttack component does not apply."""
    if name in ("apgd-t", "apgd-dlr") and num_classes < 3:
        raise ConfigError(f"{name}: the DLR loss needs >= 3 classes, this model has {num_classes}")
    if name in ("apgd-t", "fab-t") and targets > num_classes - 1:
        need = targets + 1
        raise ConfigError(
            f"{name}: {targets} target classes need >= {need} classes, this model has {num_classes} "
            f"(lower the number of targets to <= {num_classes - 1})"
        )
    if name in ("apgd-t", "fab-t") and targets < 1:
        raise ConfigError(f"{name}: needs at least 1 target class, got {targets}")


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


class APGD(_AutoAttack):
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

    def _apgd(self, packed: Packed, labels: torch.Tensor, loss_fn: Any, best: BestTracker, index: torch.Tensor) -> None:
        n_iter = self.steps
        x0 = packed.x0
        x = self._random_point(packed, x0, packed.expand(packed.eps))
        step = 2 * packed.eps.expand(x0.shape[0], -1)[:, :1].clone()  # (N, 1)
        loss, grad, logits = self.loss_and_grad(packed, x, labels, loss_fn)
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
            with torch.no_grad():
                a = 0.75 if i > 0 else 1.0
                x1 = packed.step_to(x - x0 + step * packed.normalize(grad, self.norm), self.norm)
                x1 = packed.step_to(x - x0 + (x1 - x) * a + (x - x_old) * (1 - a), self.norm)
                x_old, x = x, x1
            loss, grad, logits = self.loss_and_grad(packed, x, labels, loss_fn)
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


@ATTACKS.register("apgd-ce")
class APGDCE(APGD):
    """APGD on the cross-entropy loss (untargeted)."""

    name = "apgd-ce"
    default_norm = "linf"

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            best = BestTracker(packed.x0, self.forward(packed, packed.x0), labels)
        return self._untargeted(packed, labels, ce_loss, best)


@ATTACKS.register("apgd-dlr")
class APGDDLR(APGD):
    """APGD on the untargeted DLR loss (AutoAttack "plus"); needs >= 3 classes."""

    name = "apgd-dlr"
    default_norm = "linf"
    fixed_loss = "dlr"

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            clean_logits = self.forward(packed, packed.x0)
        check_applicable(self.name, clean_logits.shape[1], self.targets)
        return self._untargeted(packed, labels, dlr_loss, BestTracker(packed.x0, clean_logits, labels))


@ATTACKS.register("apgd-t")
class APGDT(APGD):
    """APGD on the targeted DLR loss, over the ``targets`` highest-scoring wrong classes."""

    name = "apgd-t"
    default_norm = "linf"
    fixed_loss = "dlr"

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            clean_logits = self.forward(packed, packed.x0)
        check_applicable(self.name, clean_logits.shape[1], self.targets)
        best = BestTracker(packed.x0, clean_logits, labels)
        order = clean_logits.sort(dim=1).indices
        for t in range(2, self.targets + 2):
            for _ in range(self.restarts):
                idx = (~best.broken).nonzero().squeeze(1)
                if len(idx) == 0:
                    return best.x, best.logits
                target = order[idx, -t]

                def loss_fn(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor = target) -> torch.Tensor:
                    return dlr_targeted_loss(logits, y, target)

                self._apgd(packed.take(idx), labels[idx], loss_fn, best, idx)
        return best.x, best.logits


@ATTACKS.register("fab-t")
class FABT(_AutoAttack):
    """Targeted FAB (Croce & Hein 2020): at each step, linearise ``z_target - z_y`` and take the
    minimal-norm step onto its zero set *inside the valid box*
    (:func:`~mmrobust.attacks.projection.project_onto_hyperplane_in_box`), both from the current
    point and from the clean input, mix the two with weight ``a = min(|d_cur| / (|d_cur| +
    |d_orig|), alpha_max)``, overshoot by ``eta`` and, after each success, step back towards the clean
    input (x ``beta``). Keeps the smallest adversarial perturbation and counts it only within eps."""

    name = "fab-t"
    default_norm = "linf"
    fixed_loss = "ce"  # not used for optimisation; FAB is loss-free
    alpha_max, eta, beta = 0.1, 1.05, 0.9

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            clean_logits = self.forward(packed, packed.x0)
        check_applicable(self.name, clean_logits.shape[1], self.targets)
        best = BestTracker(packed.x0, clean_logits, labels)
        order = clean_logits.sort(dim=1).indices
        for t in range(2, self.targets + 2):
            for restart in range(self.restarts):
                idx = (~best.broken).nonzero().squeeze(1)
                if len(idx) == 0:
                    return best.x, best.logits
                sub, y, target = packed.take(idx), labels[idx], order[idx, -t]
                found = self._fab(sub, y, target, random_start=restart > 0)
                with torch.no_grad():
                    best.update(found, self.forward(sub, found), idx)
        return best.x, best.logits

    def _closest_boundary(
        self, packed: Packed, x: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Untargeted FAB: ``z_k - z_y`` and its gradient for the wrong class ``k`` whose linearised
        boundary is closest, ``|z_k - z_y| / ||grad||_dual`` (one backward pass per class)."""
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
        return f[rows, k], w[rows, k]

    def _fab(
        self, packed: Packed, labels: torch.Tensor, target: torch.Tensor | None, random_start: bool = False
    ) -> torch.Tensor:
        """One FAB run from the clean input or (``random_start``, the reference's restarts after
        the first) from a random point at half the budget: l-inf ``eps/2 * t / max|t|`` with ``t``
        uniform in [-1, 1], l2 a random direction of length ``eps/2``; clamped to the valid box."""
        x0 = packed.x0
        lo = packed.lo if packed.lo is not None else torch.full_like(x0, -math.inf)
        hi = packed.hi if packed.hi is not None else torch.full_like(x0, math.inf)
        x = x0.clone()
        if random_start:
            x = self._random_point(packed, x0, packed.expand(packed.eps) * 0.5)
        x_best = x0.clone()
        best_norm = torch.full((x0.shape[0],), math.inf, dtype=x0.dtype, device=x0.device)

        def gap(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # > 0 when the target wins
            assert target is not None
            return logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)

        for _ in range(self.steps):
            f, w = self._closest_boundary(packed, x, labels) if target is None else self.loss_and_grad(
                packed, x, labels, gap)[:2]  # fmt: skip
            with torch.no_grad():
                # the linearised boundary {z: f + w.(z - x) = 0}, reached inside the valid box
                d_cur = project_onto_hyperplane_in_box(w, -f, lo - x, hi - x, self.norm)
                d_orig = project_onto_hyperplane_in_box(w, -f - (w * (x0 - x)).sum(1), lo - x0, hi - x0, self.norm)
                n_cur = packed.group_norms(d_cur, self.norm)[:, 0]
                n_orig = packed.group_norms(d_orig, self.norm)[:, 0]
                # bias towards the clean input when it is (relatively) close to the boundary
                a = (n_cur / (n_cur + n_orig + 1e-12)).clamp(0, self.alpha_max)[:, None]
                x = packed.clamp((x + self.eta * d_cur) * (1 - a) + (x0 + self.eta * d_orig) * a)
                logits = self.forward(packed, x)
                adv = logits.argmax(1) != labels
                dist = packed.group_norms(x - x0, self.norm)[:, 0]
                better = adv & (dist < best_norm)
                x_best[better], best_norm[better] = x[better], dist[better]
                # after a success, step back towards x0 to look for a closer adversarial example
                x = torch.where(adv[:, None], x0 + (x - x0) * self.beta, x)
        within = best_norm <= packed.eps[0] * (1 + 1e-6)
        return torch.where(within[:, None], x_best, x0)


@ATTACKS.register("fab")
class FAB(FABT):
    """Untargeted FAB (AutoAttack "plus", 5 restarts there): each step heads for the closest
    linearised boundary; restarts after the first start at a random point (see :meth:`FABT._fab`)."""

    name = "fab"

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


@ATTACKS.register("square")
class Square(_AutoAttack):
    """Square attack (Andriushchenko et al. 2020): score-based random search on the margin loss.

    No gradients: each query changes the perturbation inside one window (a square on image-like
    modalities, a segment on the others) of one modality, drawn with probability proportional to
    its size, at the same place for every sample still correctly classified, and keeps the
    proposal where the margin ``z_y - max_{k != y} z_k`` drops. The window covers a share ``p`` of
    the modality, halved on the reference schedule (rescaled to ``steps`` = queries).

    * l-inf: start from vertical stripes ``x0 +- eps``; a proposal sets the window to
      ``x0 + eps * sign`` (one random sign per channel), redrawn if it would not change anything.
    * l2: start from a grid of ``+-eta`` blocks scaled to norm eps; a proposal moves the mass of a
      second window and of the first into the first (mass-preserving), with a fresh ``+-eta``
      pattern (two centred halves of opposite sign, weights ``1/(k+1)^2`` on the k-th ring), and
      renormalises the whole perturbation to norm eps.
    """

    name = "square"
    default_norm = "linf"
    fixed_loss = "cw"
    p_init = 0.8

    def __init__(self, model: nn.Module, eps: float, *, steps: int = 5000, **kwargs: Any) -> None:
        super().__init__(model, eps, steps=steps, **kwargs)

    def _p(self, it: int) -> float:
        """The reference's piecewise-constant schedule of the window share, on a 10000-query scale."""
        i = int(it / self.steps * 10000)
        for j, edge in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
            if i <= edge:
                return self.p_init / 2**j
        return self.p_init / 2**9

    def _rand_sign(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=self.generator) * 2 - 1).to(like)

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.generator))

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            best = BestTracker(packed.x0, self.forward(packed, packed.x0), labels)
            x = self._init(packed)
            logits = self.forward(packed, x)
            best.update(x, logits)
            cur = -margin(logits, labels)  # z_y - max_{k != y} z_k, minimised: <= 0 means broken
            sizes = torch.tensor([stop - start for _, start, stop, _ in packed.slices], dtype=torch.float)
            for it in range(self.steps - 1):
                active = (cur > 0).nonzero().squeeze(1)
                if len(active) == 0:
                    break
                mi = int(torch.multinomial(sizes, 1, generator=self.generator))
                sub = packed.take(active)
                propose = self._propose_linf if self.norm == "linf" else self._propose_l2
                new = propose(sub, x[active], mi, self._p(it))
                logits = self.forward(sub, new)
                m_new = -margin(logits, labels[active])
                better = m_new < cur[active]
                rows = active[better]
                x[rows], cur[rows] = new[better], m_new[better]
                best.update(new, logits, active)
        return best.x, best.logits

    def _init(self, packed: Packed) -> torch.Tensor:
        x0, eps = packed.x0, float(packed.eps[0])
        n = x0.shape[0]
        parts = []
        for *_, shape in packed.slices:
            c, h, w = _view(shape)
            if self.norm == "linf":  # vertical stripes: one sign per (channel, column)
                parts.append(self._rand_sign((n, c, 1, w), x0).expand(n, c, h, w).reshape(n, -1))
                continue
            delta = torch.zeros(n, c, h, w, dtype=x0.dtype, device=x0.device)
            sh, sw = (1, max(w // 5, 1)) if h == 1 else (max(h // 5, 1), max(h // 5, 1))
            top0, left0 = (h - sh * (h // sh)) // 2, (w - sw * (w // sw)) // 2
            for top in range(top0, h - sh + 1, sh):
                for left in range(left0, w - sw + 1, sw):
                    pattern = _eta(sh, sw, self._randint(2) == 1).to(x0)
                    delta[:, :, top : top + sh, left : left + sw] = pattern * self._rand_sign((n, c, 1, 1), x0)
            parts.append(delta.reshape(n, -1))
        if self.norm == "linf":
            return packed.clamp(x0 + eps * torch.cat(parts, 1))
        delta = torch.cat(parts, 1)
        return packed.clamp(x0 + eps * delta / (delta.norm(dim=1, keepdim=True) + TINY))

    def _window_size(self, view: tuple[int, int, int], p: float) -> tuple[int, int]:
        """Side(s) of a window covering a share ``p`` (at least 1 for l-inf, 3 and odd for l2)."""
        _, h, w = view
        least = 1 if self.norm == "linf" else 3
        if h == 1:
            s = max(round(p * w), least)
            s = s + 1 if self.norm == "l2" and s % 2 == 0 else s
            return 1, max(1, min(s, w - 1 if w > 1 else 1))
        s = max(round(math.sqrt(p * h * w)), least)
        s = s + 1 if self.norm == "l2" and s % 2 == 0 else s
        s = max(1, min(s, min(h, w) - 1 if min(h, w) > 1 else 1))
        return s, s

    def _propose_linf(self, sub: Packed, x: torch.Tensor, mi: int, p: float) -> torch.Tensor:
        _, start, stop, shape = sub.slices[mi]
        c, h, w = view = _view(shape)
        sh, sw = self._window_size(view, p)
        top, left = self._randint(h - sh + 1), self._randint(w - sw + 1)
        n, eps = x.shape[0], float(sub.eps[0])
        win = (slice(None), slice(None), slice(top, top + sh), slice(left, left + sw))
        cur = x[:, start:stop].reshape(n, c, h, w)
        base = sub.x0[:, start:stop].reshape(n, c, h, w)[win]
        signs = self._rand_sign((n, c, 1, 1), x)
        new_m = cur.clone()
        new_m[win] = base + eps * signs
        new = x.clone()
        new[:, start:stop] = new_m.reshape(n, -1)
        new = sub.clamp(new)
        # a proposal identical to the current point wastes a query: flip its signs (as redrawing would)
        same = (new[:, start:stop] == x[:, start:stop]).all(1)
        if bool(same.any()):
            new_m[win] = torch.where(same[:, None, None, None], base - eps * signs, new_m[win])
            new[:, start:stop] = new_m.reshape(n, -1)
            new = sub.clamp(new)
        return new

    def _propose_l2(self, sub: Packed, x: torch.Tensor, mi: int, p: float) -> torch.Tensor:
        _, start, stop, shape = sub.slices[mi]
        c, h, w = view = _view(shape)
        sh, sw = self._window_size(view, p)
        n, eps = x.shape[0], float(sub.eps[0])
        t1, l1 = self._randint(h - sh + 1), self._randint(w - sw + 1)
        t2, l2 = self._randint(h - sh + 1), self._randint(w - sw + 1)
        win1 = (slice(None), slice(None), slice(t1, t1 + sh), slice(l1, l1 + sw))
        win2 = (slice(None), slice(None), slice(t2, t2 + sh), slice(l2, l2 + sw))
        delta = x - sub.x0
        dm = delta[:, start:stop].reshape(n, c, h, w)
        both = torch.zeros(1, 1, h, w, dtype=torch.bool, device=x.device)
        both[win1] = True
        both[win2] = True
        mass_windows = dm.masked_fill(~both, 0).flatten(1).norm(dim=1)  # (n,) mass of both windows
        total = delta.norm(dim=1)  # (n,) the joint norm (< eps where clamping ate some of it)
        old = dm[win1]
        fresh = _eta(sh, sw, self._randint(2) == 1).to(x) * self._rand_sign((n, c, 1, 1), x)
        new_win = fresh + old / (old.flatten(2).norm(dim=2)[..., None, None] + TINY)
        # per channel: the window's share of the freed mass plus whatever the budget has left
        scale = ((eps**2 - total**2).clamp_min(0) / c + mass_windows**2).sqrt()
        new_win = new_win / (new_win.flatten(2).norm(dim=2)[..., None, None] + TINY) * scale[:, None, None, None]
        dm_new = dm.clone()
        dm_new[win2] = 0.0
        dm_new[win1] = new_win
        new_delta = delta.clone()
        new_delta[:, start:stop] = dm_new.reshape(n, -1)
        return sub.clamp(sub.x0 + eps * new_delta / (new_delta.norm(dim=1, keepdim=True) + TINY))


def _eta(sh: int, sw: int, transpose: bool) -> torch.Tensor:
    """Square's l2 proposal pattern on a ``(sh, sw)`` window, unit norm: the window's two halves
    (along its longer side, or along rows for a square drawn with ``transpose``) carry centred
    nested rectangles of opposite signs, the k-th ring weighted ``sum_{j >= k} 1/(j+1)^2``."""
    along_cols = sw > sh or (sh == sw and transpose)
    length = sw if along_cols else sh
    if length < 2:
        out = torch.ones(sh, sw)
        return out / out.norm()
    half = length // 2

    def rings(a: int, b: int) -> torch.Tensor:
        ca, cb = a // 2, b // 2
        ring = torch.maximum((torch.arange(a)[:, None] - ca).abs(), (torch.arange(b)[None, :] - cb).abs())
        weights = 1.0 / (torch.arange(max(ca, cb) + 1, dtype=torch.float) + 1) ** 2
        tail = weights.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{j >= k} weights[j]
        block = tail[ring]
        return block / block.norm()

    if along_cols:
        out = torch.cat([rings(sh, half), -rings(sh, sw - half)], dim=1)
    else:
        out = torch.cat([rings(half, sw), -rings(sh - half, sw)], dim=0)
    return out / out.norm()


def _view(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A ``(C, H, W)`` view of a modality sample: squares on images, segments on the rest."""
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    if len(shape) == 4:
        return shape[0] * shape[1], shape[2], shape[3]
    if len(shape) == 2:
        return shape[0], 1, shape[1]
    return 1, 1, int(math.prod(shape))
