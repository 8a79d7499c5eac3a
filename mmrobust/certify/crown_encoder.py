"""CROWN through one encoder: bounds on every layer over a ball around the input, and the linear
lower bound of a specification ``spec . phi(x')`` propagated back to the input.

Pre-activation bounds of every layer are needed by the relaxations and depend on ``r``. They are
the intersection of (i) interval propagation, (ii) a Lipschitz interval
``z_j(x) +- r min(|A| L, ||A_j||_2 G)`` (``L``: per-element sensitivities, ``G``: a sound l2
Lipschitz bound of the prefix, the same per-layer bounds as the ``sound`` certifier) — exact for the
first affine layer of an l2 ball — and (iii) when it fits the memory budget, CROWN itself run
backwards from that layer (``intermediate``). All arithmetic is float64.

At the input a bound ``lambda . x' + c`` has its minimum over the ball in closed form:
``lambda . x + c - r ||lambda||_*`` (l2: ``||.||_2``, l-inf: ``||.||_1``; :func:`dual_norm`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmrobust.certify.activations import ActivationOp
from mmrobust.certify.crown_layers import build_ops, shape_after
from mmrobust.certify.crown_ops import AffineOp, Op, ReLUOp, State, bcast, run_backward, run_forward, widen


def relaxed_neurons(op: Op, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor | None:
    """Which inputs of ``op`` are relaxed (tighter bounds on them tighten the relaxation): ReLU-like
    ones where ``lo < 0 < hi``, smooth activations wherever ``lo < hi``; ``None`` for other ops."""
    if isinstance(op, ReLUOp) or isinstance(op, ActivationOp) and op.act.slope is not None:
        return (lo < 0) & (hi > 0)
    if isinstance(op, ActivationOp):
        return hi > lo
    return None


def dual_norm(a: torch.Tensor, norm: str) -> torch.Tensor:
    """Dual norm of each ``(B, S, ...)`` row: l2 for an l2 ball, l1 for an l-inf ball."""
    flat = a.flatten(2)
    return flat.norm(dim=2) if norm == "l2" else flat.abs().sum(2)


class EncoderBounds:
    """Bound propagation through one encoder: ``bound(x, r, spec)`` -> linear and interval bounds."""

    def __init__(
        self, encoder: nn.Module, in_shape: tuple[int, ...], norm: str, intermediate: str, budget: int,
        memory: int = 2**23, name: str = "",
    ):  # fmt: skip
        self.in_shape, self.norm, self.memory = tuple(in_shape), norm, memory
        self.ops = build_ops(encoder, in_shape, name)  # ``name``: prefix of the layer names in errors
        self.numel = math.prod(self.in_shape)
        # which top-level ReLUs get full CROWN pre-activation bounds (cost ~ 2N x widest earlier layer)
        widths, shape, widest = [], self.in_shape, math.prod(self.in_shape)
        for op in self.ops:
            widths.append((math.prod(shape), widest))
            shape = shape_after([op], shape)
            widest = max(widest, math.prod(shape))
        self.widest = [w for _, w in widths]  # largest tensor a backward pass from op i goes through
        # (the first nonlinearity needs none: an affine prefix already has exact bounds on the ball)
        first = next((i for i, op in enumerate(self.ops) if not isinstance(op, AffineOp)), len(self.ops))
        self.tighten = [
            isinstance(op, ReLUOp | ActivationOp)
            and i > first
            and (intermediate == "crown" or (intermediate == "auto" and 2 * n * w <= budget))
            for i, (op, (n, w)) in enumerate(zip(self.ops, widths, strict=True))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_forward(self.ops, x.double())

    def _concretize(self, a: torch.Tensor, c: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (a * x.unsqueeze(1)).flatten(2).sum(2) + c - r[:, None] * dual_norm(a, self.norm)

    def propagate(self, x: torch.Tensor, r: torch.Tensor) -> State:
        """Bounds on every layer over the ball of radius ``r`` (per sample) around ``x``."""
        x = x.double()
        rr = bcast(r, x)
        g0 = torch.ones_like(r) if self.norm == "l2" else torch.full_like(r, math.sqrt(self.numel))
        st = State(x, x - rr, x + rr, torch.ones_like(x), g0)
        for i, op in enumerate(self.ops):
            if self.tighten[i]:
                st = self._crown_tighten(i, st, x, r)
            st = op.propagate(st, r)
        return st

    def _crown_tighten(self, i: int, st: State, x: torch.Tensor, r: torch.Tensor) -> State:
        """Intersect the bounds of the input of op ``i`` (an activation) with CROWN run backwards from it.

        Only the neurons still relaxed (:func:`relaxed_neurons`; a ReLU: ``lo < 0 < hi``) are bounded:
        a stable ReLU is exact in every later relaxation whatever its bounds, and the bounds of later
        layers are intersections, so skipping them never makes anything unsound. Rows are processed ``memory`` elements at a
        time (one lower and one upper bound row per neuron and sample).
        """
        b, shape = st.z.shape[0], st.z.shape[1:]
        n = math.prod(shape)
        lo, hi = st.lo.reshape(b, n).clone(), st.hi.reshape(b, n).clone()
        mask = relaxed_neurons(self.ops[i], lo, hi)
        assert mask is not None
        unstable = mask
        counts = unstable.sum(1)
        kmax = int(counts.max()) if b else 0
        if kmax == 0:
            return st
        order = unstable.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :kmax]  # unstable first
        valid = torch.arange(kmax).unsqueeze(0) < counts.unsqueeze(1)
        per = max(1, self.memory // (2 * b * self.widest[i]))
        for s0 in range(0, kmax, per):
            idx, ok = order[:, s0 : s0 + per], valid[:, s0 : s0 + per]
            k = idx.shape[1]
            spec = torch.zeros(b, 2 * k, n, dtype=torch.float64)
            spec[:, :k].scatter_(2, idx.unsqueeze(2), 1.0)
            spec[:, k:].scatter_(2, idx.unsqueeze(2), -1.0)
            spec = spec * torch.cat([ok, ok], 1).unsqueeze(2)  # padding rows bound nothing
            a, c = run_backward(self.ops[:i], spec.view(b, 2 * k, *shape))
            bound = self._concretize(a, c, x, r)
            old_lo, old_hi = lo.gather(1, idx), hi.gather(1, idx)
            lo.scatter_(1, idx, torch.where(ok, torch.maximum(old_lo, bound[:, :k]), old_lo))
            hi.scatter_(1, idx, torch.where(ok, torch.minimum(old_hi, -bound[:, k:]), old_hi))
        lo, hi = widen(lo.view_as(st.lo), hi.view_as(st.hi))
        return State(st.z, lo, hi, st.lip, st.g)

    def bound(self, x: torch.Tensor, r: torch.Tensor, spec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """For ``spec`` ``(B, S, *feature shape)``: ``(lin, dual, ibp)`` with, for ``||x' - x|| <= r``,
        ``spec . phi(x') >= lin - r dual`` (CROWN; ``lin = lambda . x + c``, ``dual = ||lambda||_*``)
        and ``spec . phi(x') >= ibp`` (interval propagation), all ``(B, S)``."""
        st = self.propagate(x, r)
        mid, rad = (st.lo + st.hi) / 2, (st.hi - st.lo) / 2
        ibp = (spec * mid.unsqueeze(1)).flatten(2).sum(2) - (spec.abs() * rad.unsqueeze(1)).flatten(2).sum(2)
        a, c = run_backward(self.ops, spec)
        lin = (a * x.double().unsqueeze(1)).flatten(2).sum(2) + c
        return lin, dual_norm(a, self.norm), ibp
