"""AutoAttack-style attacks (Croce & Hein 2020) on the packed modality vector: APGD-CE, APGD-T
(targeted DLR), FAB-T and Square, for l-inf and l2, under a joint budget.

Our own implementations, written for a dict of modalities (no torchattacks, no [0, 1] assumption:
a modality is clamped to its declared valid range, or not at all). Departures from the reference
code, all documented in docs/attacks.md: FAB-T projects onto the linearised boundary without the
box constraint and clamps afterwards; Square's windows are squares on image-like modalities and
segments on the others; its l2 variant is a window-wise random search with an l2 projection rather
than the paper's mass-preserving proposal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmrobust.attacks.base import ATTACKS, Attack, BestTracker, Packed
from mmrobust.attacks.losses import ce_loss, dlr_targeted_loss, margin
from mmrobust.data.base import DatasetMeta
from mmrobust.errors import ConfigError


class _AutoAttack(Attack):
    """Shared constructor: joint budget only, a fixed loss, an iteration count."""

    budgets = ("joint",)
    fixed_loss = "ce"
    min_classes = 2

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
        self.losses = (self.fixed_loss,)
        super().__init__(model, eps, norm=norm, loss=self.fixed_loss, modalities=modalities, budget=budget, meta=meta,
                         valid_range=valid_range, seed=seed)  # fmt: skip
        if steps < 1 or restarts < 1:
            raise ConfigError(f"{self.name}: steps and restarts must be >= 1, got {steps} and {restarts}")
        self.steps, self.restarts, self.targets = steps, restarts, targets
        k = num_classes or (meta.num_classes if meta is not None else getattr(model, "num_classes", None))
        if k is not None:
            check_applicable(self.name, int(k), targets)

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
    """APGD's step-size checkpoints ``p_j * n_iter``."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * n_iter) for q in p[1:] if q <= 1})


class APGD(_AutoAttack):
    """Auto-PGD: momentum 0.75, step size halved at checkpoints where the loss stopped rising."""

    def _apgd(self, packed: Packed, labels: torch.Tensor, loss_fn: Any, best: BestTracker, index: torch.Tensor) -> None:
        n_iter = self.steps
        x0 = packed.x0
        eps_cols = packed.expand(packed.eps)
        if self.norm == "linf":
            t = 2 * torch.rand(x0.shape, generator=self.generator, dtype=x0.dtype).to(x0.device) - 1
            x = packed.clamp(x0 + eps_cols * t / t.abs().amax(1, keepdim=True).clamp_min(1e-12))
        else:
            t = torch.randn(x0.shape, generator=self.generator, dtype=x0.dtype).to(x0.device)
            x = packed.clamp(x0 + eps_cols * packed.normalize(t, "l2"))
        step = 2 * packed.eps.expand(x0.shape[0], -1)[:, :1].clone()  # (N, 1)
        loss, grad, logits = self.loss_and_grad(packed, x, labels, loss_fn)
        best.update(x, logits, index)
        x_best, loss_best, grad_best = x.clone(), loss.clone(), grad.clone()
        x_old = x.clone()
        checkpoints = set(_checkpoints(n_iter))
        last_check = 0
        losses = [loss]
        reduced_last = torch.zeros_like(loss, dtype=torch.bool)
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
        for _ in range(self.restarts):
            idx = (~best.broken).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            self._apgd(packed.take(idx), labels[idx], ce_loss, best, idx)
        return best.x, best.logits


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
    """Targeted FAB: walk to the linearised boundary towards each target class, with an
    extrapolation towards the clean input, and backtrack (x beta) after each success; keeps the
    smallest adversarial perturbation and counts it only if it lies within eps."""

    name = "fab-t"
    default_norm = "linf"
    fixed_loss = "ce"  # not used for optimisation; FAB is loss-free
    alpha_max, eta, beta = 0.1, 1.05, 0.9

    def _hyperplane_step(self, w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Minimal-norm ``z`` with ``w . z = c`` (no box constraint)."""
        if self.norm == "linf":
            return (c / (w.abs().sum(1) + 1e-12))[:, None] * w.sign()
        return (c / (w.pow(2).sum(1) + 1e-12))[:, None] * w

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            clean_logits = self.forward(packed, packed.x0)
        check_applicable(self.name, clean_logits.shape[1], self.targets)
        best = BestTracker(packed.x0, clean_logits, labels)
        order = clean_logits.sort(dim=1).indices
        for t in range(2, self.targets + 2):
            idx = (~best.broken).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            sub, y, target = packed.take(idx), labels[idx], order[idx, -t]
            found = self._fab(sub, y, target)
            with torch.no_grad():
                best.update(found, self.forward(sub, found), idx)
        return best.x, best.logits

    def _fab(self, packed: Packed, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x0 = packed.x0
        x = x0.clone()
        x_best = x0.clone()
        best_norm = torch.full((x0.shape[0],), math.inf, dtype=x0.dtype, device=x0.device)

        def gap(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # > 0 when the target wins
            return logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)

        for _ in range(self.steps):
            f, w, _ = self.loss_and_grad(packed, x, labels, gap)
            with torch.no_grad():
                d_cur = self._hyperplane_step(w, -f)  # from x to the linearised boundary
                d_orig = self._hyperplane_step(w, -f - (w * (x0 - x)).sum(1))  # from x0 to it
                n_cur = packed.group_norms(d_cur, self.norm)[:, 0]
                n_orig = packed.group_norms(d_orig, self.norm)[:, 0]
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


@ATTACKS.register("square")
class Square(_AutoAttack):
    """Square attack: score-based random search (no gradients) on the margin loss.

    Each query redraws the perturbation in one random window (a square on image-like modalities,
    a segment on the others) of a modality chosen with probability proportional to its size,
    and keeps the proposal where the margin drops. ``steps`` is the number of queries.
    """

    name = "square"
    default_norm = "linf"
    fixed_loss = "cw"
    p_init = 0.8

    def __init__(self, model: nn.Module, eps: float, *, steps: int = 5000, **kwargs: Any) -> None:
        super().__init__(model, eps, steps=steps, **kwargs)

    def _p(self, it: int) -> float:
        # the paper's halving schedule, rescaled to the query budget
        i = int(it / self.steps * 10000)
        for j, edge in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
            if i <= edge:
                return self.p_init / 2**j
        return self.p_init / 2**9

    def run(self, packed: Packed, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _ = packed.x0.shape
        with torch.no_grad():
            clean_logits = self.forward(packed, packed.x0)
            best = BestTracker(packed.x0, clean_logits, labels)
            x0, gen, eps = packed.x0, self.generator, float(packed.eps[0])
            views = [_view(shape) for _, _, _, shape in packed.slices]
            sizes = torch.tensor([stop - start for _, start, stop, _ in packed.slices], dtype=torch.float)
            if self.norm == "linf":
                signs = torch.randint(0, 2, x0.shape, generator=gen).to(x0.device, x0.dtype) * 2 - 1
                x = packed.clamp(x0 + eps * signs)
            else:
                x = packed.step_to(eps * packed.normalize(torch.randn(x0.shape, generator=gen).to(x0), "l2"), "l2")
            logits = self.forward(packed, x)
            best.update(x, logits)
            cur_margin = -margin(logits, labels)  # minimised: < 0 means broken
            for it in range(self.steps - 1):
                active = (cur_margin > 0).nonzero().squeeze(1)
                if len(active) == 0:
                    break
                mi = int(torch.multinomial(sizes, 1, generator=gen))
                _, start, stop, _ = packed.slices[mi]
                mask = _window(views[mi], len(active), self._p(it), gen).to(x0.device)  # (n_act, d_m) bool
                xa, x0a = x[active], x0[active]
                part = xa[:, start:stop]
                if self.norm == "linf":
                    c, h, w = views[mi]
                    chan = (torch.randint(0, 2, (len(active), c, 1, 1), generator=gen) * 2 - 1).to(x0)
                    vals = x0a[:, start:stop] + eps * chan.expand(-1, c, h, w).reshape(len(active), -1)
                else:
                    noise = torch.randn(part.shape, generator=gen).to(x0) * eps / math.sqrt(max(int(mask[0].sum()), 1))
                    vals = part + noise
                new = xa.clone()
                new[:, start:stop] = torch.where(mask, vals, part)
                sub = packed.take(active)
                new = sub.step_to(new - x0a, self.norm)
                logits = self.forward(sub, new)
                m_new = -margin(logits, labels[active])
                better = m_new < cur_margin[active]
                rows = active[better]
                x[rows], cur_margin[rows] = new[better], m_new[better]
                best.update(new, logits, active)
        return best.x, best.logits


def _view(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A ``(C, H, W)`` view of a modality sample: squares on images, segments on the rest."""
    if len(shape) == 3:
        return shape[0], shape[1], shape[2]
    if len(shape) == 4:
        return shape[0] * shape[1], shape[2], shape[3]
    if len(shape) == 2:
        return shape[0], 1, shape[1]
    return 1, 1, int(math.prod(shape))


def _window(view: tuple[int, int, int], n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """``(n, C*H*W)`` masks of one random window per sample, covering about a share ``p``."""
    c, h, w = view
    if h == 1:
        sh, sw = 1, max(1, min(w - 1 if w > 1 else 1, round(p * w)))
    else:
        s = max(1, min(min(h, w) - 1 if min(h, w) > 1 else 1, round(math.sqrt(p * h * w))))
        sh = sw = s
    top = torch.randint(0, h - sh + 1, (n, 1, 1), generator=gen)
    left = torch.randint(0, w - sw + 1, (n, 1, 1), generator=gen)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    m = (rows >= top) & (rows < top + sh) & (cols >= left) & (cols < left + sw)
    return m[:, None].expand(n, c, h, w).reshape(n, -1)
