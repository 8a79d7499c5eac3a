"""Square (Andriushchenko et al. 2020): score-based random search, for l-inf and l2, under a joint
budget, on the packed modality vector. The proposals are the reference's (l-inf windows of +-eps,
l2 mass-preserving windows, the same p schedule). The one structural departure, documented in
docs/attacks.md: the windows are squares on image-like modalities and segments on the others, in a
modality drawn with probability proportional to its size.

A query changes one modality only. On a late-fusion model (:class:`~mmrobust.models.fusion.LateFusionModel`)
the features of the other modalities are therefore kept from the current point and only the
changed modality's encoder runs: the same logits for a fraction of the cost."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import nn

from mmrobust.attacks.base import ATTACKS, TINY, BestTracker, Packed
from mmrobust.attacks.component import AutoAttackComponent
from mmrobust.attacks.losses import margin
from mmrobust.models.fusion import LateFusionModel


@ATTACKS.register("square")
class Square(AutoAttackComponent):
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

    default_norm = "linf"
    fixed_loss = "cw"
    query_based = True
    p_init = 0.8

    def __init__(self, model: nn.Module, threat: Any = None, *, steps: int = 5000, **kwargs: Any) -> None:
        super().__init__(model, threat, steps=steps, **kwargs)

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
        fusion = _late_fusion(self.model)
        with torch.no_grad():
            best = BestTracker(packed.x0, self.forward(packed, packed.x0), labels)
            x = self._init(packed)
            feats = fusion.encode(packed.unpack(x)) if fusion is not None else {}
            logits = fusion.head(feats) if fusion is not None else self.forward(packed, x)
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
                m = packed.slices[mi][0]
                if fusion is not None:
                    # a proposal changes one modality: only its encoder runs, the others' features are kept
                    f_m = fusion.encoders[m](fusion.transform({m: sub.unpack(new)[m]})[m])
                    new_logits = fusion.head({k: f_m if k == m else v[active] for k, v in feats.items()})
                else:
                    new_logits = self.forward(sub, new)
                m_new = -margin(new_logits, labels[active])
                better = m_new < cur[active]
                rows = active[better]
                # x only ever moves to a larger margin, so it is the best point so far (the tracker's pick)
                x[rows], cur[rows], logits[rows] = new[better], m_new[better], new_logits[better]
                if fusion is not None:
                    feats[m][rows] = f_m[better]
            best.update(x, logits)
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


def _late_fusion(model: nn.Module) -> LateFusionModel | None:
    """``model`` where its logits are ``head({m: encoder_m(transform_m(x_m))})`` exactly (a
    :class:`LateFusionModel` whose forward nothing overrides or hooks), else None."""
    if (
        isinstance(model, LateFusionModel)
        and type(model).forward is LateFusionModel.forward
        and type(model).encode is LateFusionModel.encode
        and not model._forward_hooks
        and not model._forward_pre_hooks
    ):
        return model
    return None


@functools.lru_cache(maxsize=256)
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
