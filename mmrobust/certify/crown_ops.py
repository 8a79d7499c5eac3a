"""Linear-bound operators of CROWN: one :class:`Op` per layer, each with three passes.

``forward`` computes the layer; ``propagate`` maps bounds on its input over the ball (a
:class:`State`) to bounds on its output; ``backward`` maps a linear lower bound on its output to
one on its input (Zhang et al., 2018):

* an affine layer ``z' = A z + b`` maps a bound ``lambda . z' + c`` to ``(A^T lambda) . z + c + lambda . b``;
* a ReLU with pre-activation bounds ``l < 0 < u`` is relaxed by ``relu(z) <= u (z - l) / (u - l)``
  and ``relu(z) >= a z`` (``a = 1`` if ``u > -l`` else 0): positive coefficients take the lower
  line, negative ones the upper line (stable ReLUs are exact);
* a non-overlapping max-pool window is bounded below by its element with the largest lower bound
  and above by that element when it dominates every other upper bound, else by ``max u``;
* a residual block ``F(z) + S(z)`` sends the bound through both branches and adds the results.

Every computed interval is widened by :data:`PAD` (relative) against float64 rounding. Which
operators a layer becomes is decided by :mod:`mmrobust.certify.crown_layers`.

**Optimisable lower slopes (alpha-CROWN).** The ReLU-like operators (:class:`ReLUOp`,
:class:`MaxMinOp`, and LeakyReLU in :mod:`mmrobust.certify.activations`) have an ``alpha``
attribute: ``None`` (the adaptive slope above) or a tensor ``(B, S, *shape)`` of lower slopes in
``[0, 1]``, one per sample, specification row and neuron, used for the unstable neurons by
:meth:`Op.backward`. ``relu(z) >= alpha z`` holds on ``[l, u]`` for every ``alpha`` in ``[0, 1]``
when ``l < 0 < u``, so any such tensor gives a sound bound; :mod:`mmrobust.certify.alpha_crown`
optimises it by gradient ascent on the bound (the backward pass is differentiable in ``alpha``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.certify.linear_maps import _CONV_INPUT_GRAD, transpose
from mmrobust.errors import ConfigError
from mmrobust.layer_rules import Unit

#: relative widening of every computed interval, against float64 rounding
PAD = 1e-9


def widen(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[lo, hi]`` widened by :data:`PAD` (relative, plus 1e-15 absolute)."""
    w = PAD * (lo.abs() + hi.abs()) + 1e-15
    return lo - w, hi + w


def bcast(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample ``(B,)`` tensor viewed to broadcast against ``like`` ``(B, ...)``."""
    return r.view(-1, *([1] * (like.ndim - 1)))


@dataclass
class State:
    """Bounds on one intermediate tensor over the ball, per sample ``(B, *shape)``.

    ``z``: its value at the centre; ``lo``/``hi``: elementwise bounds; ``lip``: per-element bound on
    ``|z_j(x') - z_j(x)| / r``; ``g`` ``(B,)``: bound on ``||z(x') - z(x)||_2 / r``.
    """

    z: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    lip: torch.Tensor
    g: torch.Tensor


class Op:
    """One operator of the bound-propagation graph."""

    name: str = ""
    #: lower slopes of the unstable neurons for :meth:`backward` (see the module docstring); ops
    #: that have them set it to ``None`` and override :meth:`slope_bounds`
    alpha: torch.Tensor | None = None

    def slope_bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(lo, hi)`` ``(B, *shape)``: the pre-activation bounds of the neurons whose lower slope
        ``alpha`` sets (from the last :meth:`propagate`); ``None`` for an op without such slopes."""
        return None

    def children(self) -> list[Op]:
        """The operators inside this one (a residual block's branches, a graph region's layers)."""
        return []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def propagate(self, st: State, r: torch.Tensor) -> State:
        """Bounds on the output from bounds on the input (and remember what :meth:`backward` needs)."""
        raise NotImplementedError

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_in, c)`` with ``A . out >= A_in . in + c`` over the bounds of the last :meth:`propagate`.

        ``a`` is ``(B, S, *out_shape)``; ``A_in`` is ``(B, S, *in_shape)``, ``c`` ``(B, S)``.
        """
        raise NotImplementedError


class AffineOp(Op):
    """``fn(z) + offset`` from a ``"linear"`` :class:`Unit`."""

    def __init__(self, unit: Unit) -> None:
        if unit.offset is None or unit.abs_fn is None:
            raise ConfigError(
                f"CROWN: layer '{unit.name}' has no affine description; use certifier='sound'", param="certifier"
            )
        self.unit, self.name = unit, unit.name
        self.offset = unit.offset.double()
        self.rownorm = unit.sq_fn(torch.ones(1, *unit.in_shape, dtype=torch.float64))[0].sqrt() if unit.sq_fn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit.fn(x) + self.offset

    def propagate(self, st: State, r: torch.Tensor) -> State:
        u = self.unit
        assert u.abs_fn is not None
        z = self.forward(st.z)
        mid, rad = self.forward((st.lo + st.hi) / 2), u.abs_fn((st.hi - st.lo) / 2)
        lip = u.abs_fn(st.lip)
        if self.rownorm is not None:  # |A_j (z' - z)| <= ||A_j||_2 ||z' - z||_2
            lip = torch.minimum(lip, self.rownorm * bcast(st.g, lip))
        rr = bcast(r, z)
        lo, hi = widen(torch.maximum(mid - rad, z - rr * lip), torch.minimum(mid + rad, z + rr * lip))
        return State(z, lo, hi, lip, st.g * u.lip)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = a.shape[:2]
        return self.transpose(a.reshape(b * s, *a.shape[2:])).view(b, s, *self.unit.in_shape), (
            a * self.offset
        ).flatten(2).sum(2)

    def transpose(self, v: torch.Tensor) -> torch.Tensor:
        """``A^T v`` per row (see :func:`mmrobust.certify.linear_maps.transpose`); differentiable in
        ``v`` when ``v`` requires a gradient (alpha-CROWN)."""
        fn = self.unit.fn
        direct = isinstance(fn, partial) and (fn.func is F.linear or fn.func in _CONV_INPUT_GRAD)
        if not v.requires_grad or direct:  # the direct maps are differentiable as they are
            return transpose(fn, self.unit.in_shape, v)
        with torch.enable_grad():
            x = torch.zeros(v.shape[0], *self.unit.in_shape, dtype=v.dtype, requires_grad=True)
            y = fn(x)
            (g,) = torch.autograd.grad(y, x, v.reshape(y.shape), create_graph=True)
        return g


class ReLUOp(Op):
    """ReLU with the triangle relaxation (upper chord, adaptive lower slope 0 or 1)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lo = self.hi = torch.zeros(0)
        self.alpha = None

    def slope_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    def propagate(self, st: State, r: torch.Tensor) -> State:
        self.lo, self.hi = st.lo, st.hi
        lip = torch.where(st.hi <= 0, torch.zeros_like(st.lip), st.lip)  # dead units cannot move
        return State(st.z.clamp_min(0), st.lo.clamp_min(0), st.hi.clamp_min(0), lip, st.g)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return relu_relax(a, self.lo, self.hi, self.alpha)


def default_slope(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The adaptive lower slope of an unstable ReLU: 1 if ``u > -l`` else 0 (plain CROWN)."""
    return (hi > -lo).double()


def relu_relax(
    a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, alpha: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_in, c)`` with ``A . relu(z) >= A_in . z + c`` for ``lo <= z <= hi`` (``a``: ``(B, S, *shape)``);
    ``alpha`` (``(B, S, *shape)`` in ``[0, 1]``): the lower slopes of the unstable neurons, else
    :func:`default_slope`."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    unstable = (lo < 0) & (hi > 0)
    upper = torch.where(unstable, hi / (hi - lo).clamp_min(1e-300), (lo >= 0).double())
    slope = default_slope(lo, hi) if alpha is None else alpha
    lower = torch.where(unstable, slope, (lo >= 0).double())
    a_pos, a_neg = a.clamp_min(0), a.clamp_max(0)
    const = torch.where(unstable, -upper * lo, torch.zeros_like(lo))
    return a_pos * lower + a_neg * upper, (a_neg * const).flatten(2).sum(2)


class MaxMinOp(Op):
    """MaxMin over channel halves: ``(max(a, b), min(a, b)) = (b + relu(t), a - relu(t))`` with
    ``t = a - b``, so ``l1 . max + l2 . min = l1 . b + l2 . a + (l1 - l2) . relu(t)`` and only the
    ReLU of ``t`` is relaxed (bounds on ``t``: interval difference and ``|dt| <= |da| + |db|``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lo = self.hi = torch.zeros(0)
        self.alpha = None

    def slope_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi  # of t = a - b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def propagate(self, st: State, r: torch.Tensor) -> State:
        (za, zb), (la, lb), (ua, ub), (pa, pb) = (t.chunk(2, dim=1) for t in (st.z, st.lo, st.hi, st.lip))
        t, rr = za - zb, bcast(r, za)
        self.lo, self.hi = widen(torch.maximum(la - ub, t - rr * (pa + pb)), torch.minimum(ua - lb, t + rr * (pa + pb)))
        lo = torch.cat([torch.maximum(la, lb), torch.minimum(la, lb)], dim=1)
        hi = torch.cat([torch.maximum(ua, ub), torch.minimum(ua, ub)], dim=1)
        lip = torch.maximum(pa, pb).repeat(1, 2, *([1] * (pa.ndim - 2)))
        return State(self.forward(st.z), lo, hi, lip, st.g)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a1, a2 = a.chunk(2, dim=2)
        nu, const = relu_relax(a1 - a2, self.lo, self.hi, self.alpha)
        return torch.cat([a2 + nu, a1 - nu], dim=2), const


class MaxPoolOp(Op):
    """Non-overlapping max pooling (kernel == stride, no padding or dilation), 1-d or 2-d."""

    def __init__(self, name: str, layer: nn.MaxPool1d | nn.MaxPool2d, in_shape: tuple[int, ...]) -> None:
        self.name, self.in_shape = name, in_shape
        self.d = 1 if isinstance(layer, nn.MaxPool1d) else 2
        k = layer.kernel_size
        self.k = (k,) * self.d if isinstance(k, int) else tuple(k)
        self.out = tuple(n // k for n, k in zip(in_shape[1:], self.k, strict=True))
        self.lo = self.hi = torch.zeros(0)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C, *spatial)`` -> ``(..., C, *out, window)`` (trailing rows the pool drops are cut)."""
        lead = x.shape[: x.ndim - self.d]
        if self.d == 1:
            x = x[..., : self.out[0] * self.k[0]]
            return x.reshape(*lead, self.out[0], self.k[0])
        x = x[..., : self.out[0] * self.k[0], : self.out[1] * self.k[1]]
        x = x.reshape(*lead, self.out[0], self.k[0], self.out[1], self.k[1]).transpose(-3, -2)
        return x.reshape(*lead, self.out[0], self.out[1], self.k[0] * self.k[1])

    def _unwindow(self, w: torch.Tensor) -> torch.Tensor:
        lead = w.shape[: w.ndim - self.d - 1]
        if self.d == 1:
            x = w.reshape(*lead, self.out[0] * self.k[0])
        else:
            x = w.reshape(*lead, self.out[0], self.out[1], self.k[0], self.k[1]).transpose(-3, -2)
            x = x.reshape(*lead, self.out[0] * self.k[0], self.out[1] * self.k[1])
        pad = [p for i in reversed(range(self.d)) for p in (0, self.in_shape[1 + i] - self.out[i] * self.k[i])]
        return F.pad(x, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._windows(x).amax(-1)

    def propagate(self, st: State, r: torch.Tensor) -> State:
        self.lo, self.hi = st.lo, st.hi
        # |max a - max b| <= max |a - b|, and non-overlapping windows keep the l2 bound G
        z, lo, hi, lip = (self._windows(t).amax(-1) for t in (st.z, st.lo, st.hi, st.lip))
        return State(z, lo, hi, lip, st.g)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._windows(self.lo), self._windows(self.hi)
        best = lo.argmax(-1, keepdim=True)  # max >= z_best
        others = hi.scatter(-1, best, float("-inf")).amax(-1)
        exact = lo.gather(-1, best).squeeze(-1) >= others  # z_best dominates: max == z_best
        top = hi.amax(-1)  # otherwise max <= max_j u_j
        exact, top, best = exact.unsqueeze(1), top.unsqueeze(1), best.unsqueeze(1)
        a_pos, a_neg = a.clamp_min(0), a.clamp_max(0)
        coef = a_pos + torch.where(exact, a_neg, torch.zeros_like(a_neg))
        win = torch.zeros(*a.shape, lo.shape[-1], dtype=a.dtype).scatter(
            -1, best.expand(*a.shape, 1), coef.unsqueeze(-1)
        )
        const = torch.where(exact, torch.zeros_like(a_neg), a_neg * top)
        return self._unwindow(win), const.flatten(2).sum(2)


class ResidualOp(Op):
    """``F(z) + S(z)`` with both branches given as op lists (an empty list is the identity)."""

    def __init__(self, name: str, body: list[Op], shortcut: list[Op]) -> None:
        self.name, self.body, self.shortcut = name, body, shortcut

    def children(self) -> list[Op]:
        return [*self.body, *self.shortcut]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_forward(self.body, x) + run_forward(self.shortcut, x)

    def propagate(self, st: State, r: torch.Tensor) -> State:
        f, s = run_propagate(self.body, st, r), run_propagate(self.shortcut, st, r)
        z, lip = f.z + s.z, f.lip + s.lip
        rr = bcast(r, z)
        lo, hi = widen(torch.maximum(f.lo + s.lo, z - rr * lip), torch.minimum(f.hi + s.hi, z + rr * lip))
        return State(z, lo, hi, lip, f.g + s.g)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        af, cf = run_backward(self.body, a)
        as_, cs = run_backward(self.shortcut, a)
        return af + as_, cf + cs


def slope_ops(ops: list[Op]) -> list[Op]:
    """Every operator in ``ops`` (nested ones too) with optimisable lower slopes (``slope_bounds``)."""
    out: list[Op] = []
    for op in ops:
        if op.slope_bounds() is not None:
            out.append(op)
        out.extend(slope_ops(op.children()))
    return out


def run_forward(ops: list[Op], x: torch.Tensor) -> torch.Tensor:
    for op in ops:
        x = op.forward(x)
    return x


def run_propagate(ops: list[Op], st: State, r: torch.Tensor) -> State:
    for op in ops:
        st = op.propagate(st, r)
    return st


def run_backward(ops: list[Op], a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    const = torch.zeros(a.shape[:2], dtype=a.dtype)
    for op in reversed(ops):
        a, c = op.backward(a)
        const = const + c
    return a, const


@dataclass
class Step:
    """One node of a :class:`GraphOp`: ``kind`` ``layer`` (``ops``), ``add`` (``signs``) or ``cat``
    (``dim``: per-sample axis, ``sizes``: the inputs' sizes along it); ``inputs`` index the values (0: the op's input, ``i + 1``: step ``i``)."""

    kind: str
    inputs: list[int]
    ops: list[Op]
    signs: tuple[float, ...] = ()
    dim: int = 0
    sizes: tuple[int, ...] = ()  # cat: each input's size along ``dim``


class GraphOp(Op):
    """A region of a traced graph (sums and concatenations of op chains), e.g. ``x + f(x)``.

    Forward bounds per node: a layer runs its ops; a signed sum ``sum s_i v_i`` adds the matching
    ends of the intervals, ``sum |s_i| lip_i`` and ``sum |s_i| G_i`` (intersected with the Lipschitz
    interval, as :class:`ResidualOp`); a concatenation concatenates and has ``G = sqrt(sum G_i^2)``.
    Backward: the coefficients of every node's consumers are summed (a sum sends ``s_i a`` to
    input ``i``, a concatenation each input its slice) before going through its ops.
    """

    def __init__(self, name: str, steps: list[Step]) -> None:
        self.name, self.steps = name, steps

    def children(self) -> list[Op]:
        return [op for st in self.steps for op in st.ops]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals = [x]
        for st in self.steps:
            ins = [vals[i] for i in st.inputs]
            if st.kind == "layer":
                vals.append(run_forward(st.ops, ins[0]))
            elif st.kind == "add":
                vals.append(_signed_sum(st.signs, ins))
            else:
                vals.append(torch.cat(ins, dim=st.dim + 1))
        return vals[-1]

    def propagate(self, st: State, r: torch.Tensor) -> State:
        states = [st]
        for step in self.steps:
            ins = [states[i] for i in step.inputs]
            if step.kind == "layer":
                states.append(run_propagate(step.ops, ins[0], r))
            elif step.kind == "add":
                z = sum(s * v.z for s, v in zip(step.signs, ins, strict=True))
                lo = sum(v.lo * s if s > 0 else v.hi * s for s, v in zip(step.signs, ins, strict=True))
                hi = sum(v.hi * s if s > 0 else v.lo * s for s, v in zip(step.signs, ins, strict=True))
                lip = sum(abs(s) * v.lip for s, v in zip(step.signs, ins, strict=True))
                g = sum(abs(s) * v.g for s, v in zip(step.signs, ins, strict=True))
                assert isinstance(z, torch.Tensor) and isinstance(lip, torch.Tensor)
                rr = bcast(r, z)
                lo_, hi_ = widen(torch.maximum(lo, z - rr * lip), torch.minimum(hi, z + rr * lip))  # type: ignore[arg-type]
                states.append(State(z, lo_, hi_, lip, g))  # type: ignore[arg-type]
            else:
                d = step.dim + 1
                cat = [torch.cat([getattr(v, k) for v in ins], dim=d) for k in ("z", "lo", "hi", "lip")]
                g = torch.stack([v.g for v in ins]).pow(2).sum(0).sqrt()
                states.append(State(cat[0], cat[1], cat[2], cat[3], g))
        return states[-1]

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coef: list[torch.Tensor | None] = [None] * (len(self.steps) + 1)
        coef[-1] = a
        const = torch.zeros(a.shape[:2], dtype=a.dtype)

        def send(i: int, v: torch.Tensor) -> None:
            old = coef[i]
            coef[i] = v if old is None else old + v

        for k in range(len(self.steps) - 1, -1, -1):
            step, ak = self.steps[k], coef[k + 1]
            if ak is None:
                continue
            coef[k + 1] = None  # free it
            if step.kind == "layer":
                a_in, c = run_backward(step.ops, ak)
                const = const + c
                send(step.inputs[0], a_in)
            elif step.kind == "add":
                for s, i in zip(step.signs, step.inputs, strict=True):
                    send(i, ak * s)
            else:
                for i, part in zip(step.inputs, ak.split(list(step.sizes), dim=step.dim + 2), strict=True):
                    send(i, part)
        out = coef[0]
        assert out is not None
        return out, const


def _signed_sum(signs: tuple[float, ...], values: list[torch.Tensor]) -> torch.Tensor:
    out = signs[0] * values[0]
    for s, v in zip(signs[1:], values[1:], strict=True):
        out = out + s * v
    return out
