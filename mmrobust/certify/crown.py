"""CROWN: sound certified radii by linear bound propagation through the late-fusion model.

For a sample ``x`` with label ``y`` and every class ``k``, the margin ``g_k(x') = h_y(x') - h_k(x')``
is bounded from below over a ball ``B(x, r)`` by propagating a linear lower bound backwards from
the head through every layer of every encoder (Zhang et al., 2018):

* an affine layer ``z' = A z + b`` maps a bound ``lambda . z' + c`` to ``(A^T lambda) . z + c + lambda . b``;
* a ReLU with pre-activation bounds ``l < 0 < u`` is relaxed by ``relu(z) <= u (z - l) / (u - l)``
  and ``relu(z) >= a z`` (``a = 1`` if ``u > -l`` else 0): positive coefficients take the lower
  line, negative ones the upper line (stable ReLUs are exact);
* a non-overlapping max-pool window is bounded below by its element with the largest lower bound
  and above by that element when it dominates every other upper bound, else by ``max u``;
* a residual block ``F(z) + S(z)`` sends the bound through both branches and adds the results.

At the input the bound is ``lambda . x' + c`` per modality, and its minimum over the ball is
closed form: ``lambda . x + c - r ||lambda||_*`` (l2: ``||.||_2``, l-inf: ``||.||_1``). The **joint**
ball over all modalities (``sum_m ||d_m||^2 <= r^2``) is one ball over the concatenated input, so
the blocks share one dual norm: ``sum_m (lambda_m . x_m + c_m) - r ||(lambda_1, ..., lambda_M)||_*``.
A **per-modality** ball perturbs modality ``m`` alone; the others contribute their exact values.

Pre-activation bounds of every layer are needed by the relaxations and depend on ``r``. They are
the intersection of (i) interval propagation, (ii) a Lipschitz interval
``z_j(x) +- r min(|A| L, ||A_j||_2 G)`` (``L``: per-element sensitivities, ``G``: a sound l2
Lipschitz bound of the prefix, the same per-layer bounds as ``--lipschitz sound``) — exact for the
first affine layer of an l2 ball — and (iii) when it fits the memory budget, CROWN itself run
backwards from that layer (``intermediate``). The final bound takes, per modality, the better of
CROWN and interval propagation. All arithmetic is float64.

The certified radius of a sample is the largest ``r`` (found by bisection, ``steps`` rounds per
sample: doubling/halving from ``start`` until bracketed, then halving the bracket) at which every
``k != y`` lower bound is positive; every ``r`` reported was verified, so the radius is a lower
bound on the distance to the decision boundary. Misclassified samples get 0.

Memory: the backward pass holds a ``(chunk, K, *layer shape)`` float64 tensor per layer
(``chunk * K * 8`` bytes per neuron of the widest layer: 8 samples, 10 classes and a 32x28x28 conv
output take 16 MB); full intermediate CROWN holds ``2N`` such rows for a layer of ``N`` neurons and
is used only where ``2N * (widest earlier layer) <= budget``. Lower ``chunk`` (and the budget) to
fit smaller machines. Larger chunks are slower, not faster: tensors above glibc's mmap threshold
(32 MB at most) are mapped and unmapped on every operation, and the page faults cost as much as the
arithmetic (avdigits JT, 96 samples, 1 thread: 32.7 s at chunk 32 of which 12.1 s system time,
21.4 s and no system time at chunk 8).

Layers without a CROWN rule (see :mod:`mmrobust.layer_rules`) raise a one-line error naming the
layer; ``--lipschitz sound`` handles more layer types.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

from mmrobust.certify.base import CERTIFIERS, Certificate, Certifier, CertifyContext, Guarantee, Radii
from mmrobust.certify.sound import _vjp, chain_units, sequential_parts, sound_row_lipschitz
from mmrobust.data.base import Batch, DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError
from mmrobust.layer_rules import Unit, find_rule, register_layer
from mmrobust.models.encoders import BasicBlock, ResNet18
from mmrobust.models.fusion import LateFusionModel
from mmrobust.models.lipschitz import MaxMin

NORMS = ("l2", "linf")
INTERMEDIATE = ("auto", "crown", "fast")
_CONV_INPUT_GRAD = {F.conv1d: nn_grad.conv1d_input, F.conv2d: nn_grad.conv2d_input}
#: relative widening of every computed interval, against float64 rounding
PAD = 1e-9


def _pad(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = PAD * (lo.abs() + hi.abs()) + 1e-15
    return lo - w, hi + w


def _bcast(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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
            raise ConfigError(f"CROWN: layer '{unit.name}' has no affine description; use --lipschitz sound")
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
            lip = torch.minimum(lip, self.rownorm * _bcast(st.g, lip))
        rr = _bcast(r, z)
        lo, hi = _pad(torch.maximum(mid - rad, z - rr * lip), torch.minimum(mid + rad, z + rr * lip))
        return State(z, lo, hi, lip, st.g * u.lip)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = a.shape[:2]
        return self.transpose(a.reshape(b * s, *a.shape[2:])).view(b, s, *self.unit.in_shape), (
            a * self.offset
        ).flatten(2).sum(2)

    def transpose(self, v: torch.Tensor) -> torch.Tensor:
        """``A^T v`` per row: direct for Linear/Conv, else one vector-Jacobian product."""
        fn, shape = self.unit.fn, self.unit.in_shape
        if isinstance(fn, partial) and fn.func is F.linear:
            return v @ fn.keywords["weight"]
        if isinstance(fn, partial) and fn.func in _CONV_INPUT_GRAD:
            kw = fn.keywords
            grad = _CONV_INPUT_GRAD[fn.func]
            return grad(
                (v.shape[0], *shape),
                kw["weight"],
                v,
                kw.get("stride", 1),
                kw.get("padding", 0),
                kw.get("dilation", 1),
                kw.get("groups", 1),
            )
        with torch.enable_grad():
            return _vjp(fn, shape, v)


class ReLUOp(Op):
    """ReLU with the triangle relaxation (upper chord, adaptive lower slope 0 or 1)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lo = self.hi = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    def propagate(self, st: State, r: torch.Tensor) -> State:
        self.lo, self.hi = st.lo, st.hi
        lip = torch.where(st.hi <= 0, torch.zeros_like(st.lip), st.lip)  # dead units cannot move
        return State(st.z.clamp_min(0), st.lo.clamp_min(0), st.hi.clamp_min(0), lip, st.g)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return relu_relax(a, self.lo, self.hi)


def relu_relax(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_in, c)`` with ``A . relu(z) >= A_in . z + c`` for ``lo <= z <= hi`` (``a``: ``(B, S, *shape)``)."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    unstable = (lo < 0) & (hi > 0)
    upper = torch.where(unstable, hi / (hi - lo).clamp_min(1e-300), (lo >= 0).double())
    lower = torch.where(unstable, (hi > -lo).double(), (lo >= 0).double())
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def propagate(self, st: State, r: torch.Tensor) -> State:
        (za, zb), (la, lb), (ua, ub), (pa, pb) = (t.chunk(2, dim=1) for t in (st.z, st.lo, st.hi, st.lip))
        t, rr = za - zb, _bcast(r, za)
        self.lo, self.hi = _pad(torch.maximum(la - ub, t - rr * (pa + pb)), torch.minimum(ua - lb, t + rr * (pa + pb)))
        lo = torch.cat([torch.maximum(la, lb), torch.minimum(la, lb)], dim=1)
        hi = torch.cat([torch.maximum(ua, ub), torch.minimum(ua, ub)], dim=1)
        lip = torch.maximum(pa, pb).repeat(1, 2, *([1] * (pa.ndim - 2)))
        return State(self.forward(st.z), lo, hi, lip, st.g)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a1, a2 = a.chunk(2, dim=2)
        nu, const = relu_relax(a1 - a2, self.lo, self.hi)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_forward(self.body, x) + run_forward(self.shortcut, x)

    def propagate(self, st: State, r: torch.Tensor) -> State:
        f, s = run_propagate(self.body, st, r), run_propagate(self.shortcut, st, r)
        z, lip = f.z + s.z, f.lip + s.lip
        rr = _bcast(r, z)
        lo, hi = _pad(torch.maximum(f.lo + s.lo, z - rr * lip), torch.minimum(f.hi + s.hi, z + rr * lip))
        return State(z, lo, hi, lip, f.g + s.g)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        af, cf = run_backward(self.body, a)
        as_, cs = run_backward(self.shortcut, a)
        return af + as_, cf + cs


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


# --- CROWN rules for torch layers and the zoo's blocks (affine layers need none: see layers.py) ---


def _relu_rule(name: str, layer: nn.Module, in_shape: tuple[int, ...]) -> list[Op]:
    return [ReLUOp(name)]


def _maxpool_rule(name: str, layer: nn.MaxPool1d | nn.MaxPool2d, in_shape: tuple[int, ...]) -> list[Op]:
    d = 1 if isinstance(layer, nn.MaxPool1d) else 2
    as_tuple = [(v,) * d if isinstance(v, int) else tuple(v) for v in (layer.kernel_size, layer.stride, layer.padding)]
    dil = (layer.dilation,) * d if isinstance(layer.dilation, int) else tuple(layer.dilation)
    kernel, stride, padding = as_tuple
    if kernel != stride or any(padding) or any(v != 1 for v in dil) or layer.ceil_mode:
        raise ConfigError(
            f"CROWN supports only non-overlapping max pooling (kernel == stride, no padding); layer '{name}' "
            f"({type(layer).__name__}) is not; use --lipschitz sound"
        )
    return [MaxPoolOp(name, layer, in_shape)]


def _basic_block_rule(name: str, block: BasicBlock, in_shape: tuple[int, ...]) -> list[Op]:
    body = build_ops(nn.Sequential(block.conv1, block.bn1, block.relu, block.conv2, block.bn2), in_shape, name + ".F")
    shortcut = build_ops(nn.Sequential(block.shortcut), in_shape, name + ".shortcut")
    return [ResidualOp(name, body, shortcut), ReLUOp(name + ".relu")]


def _resnet_rule(name: str, net: ResNet18, in_shape: tuple[int, ...]) -> list[Op]:
    if net.video:
        raise ConfigError(f"CROWN does not support the video ResNet18 '{name}' (frame folding); use --lipschitz sound")
    return build_ops(nn.Sequential(net.stem, net.layers, net.pool), in_shape, name)


def _maxmin_rule(name: str, layer: MaxMin, in_shape: tuple[int, ...]) -> list[Op]:
    if in_shape[0] % 2:
        raise ConfigError(f"MaxMin layer '{name}' needs an even number of channels, got {in_shape[0]}")
    return [MaxMinOp(name)]


register_layer(nn.ReLU, crown=_relu_rule)
register_layer(MaxMin, crown=_maxmin_rule)
register_layer(nn.MaxPool1d, nn.MaxPool2d, crown=_maxpool_rule)
register_layer(BasicBlock, crown=_basic_block_rule)
register_layer(ResNet18, crown=_resnet_rule)


def _shape_after(ops: list[Op], shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(run_forward(ops, torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])


def build_ops(module: nn.Module, in_shape: tuple[int, ...], prefix: str = "") -> list[Op]:
    """The CROWN operators of ``module`` (eval mode) for per-sample inputs of ``in_shape``."""
    shape = tuple(int(s) for s in in_shape)
    name = prefix or type(module).__name__
    if isinstance(module, nn.Sequential):
        ops: list[Op] = []
        for full, child, bn in sequential_parts(module, prefix):
            if bn is not None:
                ops.append(AffineOp(chain_units(nn.Sequential(child, bn), shape, full)[0]))
            else:
                ops.extend(build_ops(child, shape, full))
            shape = _shape_after(ops[-1:], shape) if ops else shape
        return ops
    rule = find_rule(module)
    if rule.crown is not None:
        return rule.crown(name, module, shape)
    if rule.lipschitz is not None:
        units = rule.lipschitz(name, module, shape)
        if all(u.kind == "linear" and u.offset is not None for u in units):
            return [AffineOp(u) for u in units]
    raise ConfigError(f"CROWN does not support layer '{name}' ({type(module).__name__}); use --lipschitz sound")


def _dual(a: torch.Tensor, norm: str) -> torch.Tensor:
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
            shape = _shape_after([op], shape)
            widest = max(widest, math.prod(shape))
        self.widest = [w for _, w in widths]  # largest tensor a backward pass from op i goes through
        # (the first nonlinearity needs none: an affine prefix already has exact bounds on the ball)
        first = next((i for i, op in enumerate(self.ops) if not isinstance(op, AffineOp)), len(self.ops))
        self.tighten = [
            isinstance(op, ReLUOp)
            and i > first
            and (intermediate == "crown" or (intermediate == "auto" and 2 * n * w <= budget))
            for i, (op, (n, w)) in enumerate(zip(self.ops, widths, strict=True))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_forward(self.ops, x.double())

    def _concretize(self, a: torch.Tensor, c: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (a * x.unsqueeze(1)).flatten(2).sum(2) + c - r[:, None] * _dual(a, self.norm)

    def propagate(self, x: torch.Tensor, r: torch.Tensor) -> State:
        """Bounds on every layer over the ball of radius ``r`` (per sample) around ``x``."""
        x = x.double()
        rr = _bcast(r, x)
        g0 = torch.ones_like(r) if self.norm == "l2" else torch.full_like(r, math.sqrt(self.numel))
        st = State(x, x - rr, x + rr, torch.ones_like(x), g0)
        for i, op in enumerate(self.ops):
            if self.tighten[i]:
                st = self._crown_tighten(i, st, x, r)
            st = op.propagate(st, r)
        return st

    def _crown_tighten(self, i: int, st: State, x: torch.Tensor, r: torch.Tensor) -> State:
        """Intersect the bounds of the input of op ``i`` (a ReLU) with CROWN run backwards from it.

        Only the neurons still unstable (``lo < 0 < hi``) are bounded: a stable ReLU is exact in
        every later relaxation whatever its bounds, and the bounds of later layers are intersections,
        so skipping them never makes anything unsound. Rows are processed ``memory`` elements at a
        time (one lower and one upper bound row per neuron and sample).
        """
        b, shape = st.z.shape[0], st.z.shape[1:]
        n = math.prod(shape)
        lo, hi = st.lo.reshape(b, n).clone(), st.hi.reshape(b, n).clone()
        unstable = (lo < 0) & (hi > 0)
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
        lo, hi = _pad(lo.view_as(st.lo), hi.view_as(st.hi))
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
        return lin, _dual(a, self.norm), ibp


@dataclass
class CrownOptions:
    """Options of the ``crown`` certifier.

    ``norm``: ``l2`` or ``linf`` ball; ``steps``: bisection rounds per sample (>= 1); ``start``:
    first radius tried (> 0); ``intermediate``: pre-activation bounds by full CROWN (``crown``),
    by interval/Lipschitz propagation only (``fast``) or CROWN where it fits ``budget`` elements per
    sample (``auto``); ``memory``: elements of the largest backward tensor of one intermediate-bound
    pass (rows are chunked to it); ``chunk``: samples bounded at once (memory, see the module docstring);
    ``unimodal``: also certify each modality alone.
    """

    norm: str = "l2"
    steps: int = 12
    start: float = 0.5
    intermediate: str = "auto"
    budget: int = 500_000
    memory: int = 2**23
    chunk: int = 8  # small tensors are reused by malloc; big ones are mapped anew (module docstring)
    unimodal: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(f"crown: unknown norm '{self.norm}'; choose from: {', '.join(NORMS)}")
        if self.intermediate not in INTERMEDIATE:
            raise ConfigError(
                f"crown: unknown intermediate '{self.intermediate}'; choose from: {', '.join(INTERMEDIATE)}"
            )
        for key in ("steps", "budget", "memory", "chunk"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"crown: {key} must be an integer >= 1, got {v!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int | float) or not 0 < self.start < math.inf:
            raise ConfigError(f"crown: start must be a finite number > 0, got {self.start!r}")
        if not isinstance(self.unimodal, bool):
            raise ConfigError(f"crown: unimodal must be true or false, got {self.unimodal!r}")


class ModelBounds:
    """Lower bounds on every margin ``h_y - h_k`` of a late-fusion model over a ball, per sample."""

    def __init__(self, model: LateFusionModel, meta: DatasetMeta, options: CrownOptions) -> None:
        model.eval()
        self.names = list(model.modalities)
        self.enc = {
            m: EncoderBounds(
                model.encoders[m],
                meta.spec(m).shape,
                options.norm,
                options.intermediate,
                options.budget,
                options.memory,
                f"encoders.{m}",  # the model's own parameter names: errors say which modality
            )
            for m in self.names
        }
        self.w = {m: model.head.modality_weight(m).detach().double() for m in self.names}
        self.bias = model.head.bias.detach().double()
        self.norm = options.norm
        # the sound Lipschitz bound of each margin row, L^m[y, k] for (W_y - W_k) . phi_m: a third
        # candidate per modality, so CROWN is never looser than --lipschitz sound (l2 only)
        self.row_lip: dict[str, torch.Tensor] = {}
        if self.norm == "l2":
            k = self.bias.shape[0]
            for m in self.names:
                rows = (self.w[m].unsqueeze(1) - self.w[m].unsqueeze(0)).reshape(k * k, -1)
                lip = sound_row_lipschitz(model.encoders[m], meta.spec(m).shape, rows).double()
                self.row_lip[m] = lip.view(k, k)

    def specs(self, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per modality ``C_m[i, k] = W_m[y_i] - W_m[k]`` ``(B, K, d_m)`` and ``beta[i, k] = b_y - b_k``."""
        spec = {m: w[labels].unsqueeze(1) - w.unsqueeze(0) for m, w in self.w.items()}
        return spec, self.bias[labels].unsqueeze(1) - self.bias.unsqueeze(0)

    def logits(self, inputs: Batch) -> torch.Tensor:
        return sum(self.enc[m].forward(inputs[m]) @ self.w[m].T for m in self.names) + self.bias

    def lipschitz_radius(self, inputs: Batch, labels: torch.Tensor, attacked: list[str]) -> torch.Tensor:
        """The sound Lipschitz radius ``min_k (h_y - h_k) / ||(L^m[y, k])_m||`` (0 without l2 row bounds)."""
        if not self.row_lip:
            return torch.zeros(labels.shape[0], dtype=torch.float64)
        spec, beta = self.specs(labels)
        margin = beta + sum((spec[m] * self.enc[m].forward(inputs[m]).unsqueeze(1)).sum(2) for m in self.names)
        lip = torch.stack([self.row_lip[m][labels] for m in attacked]).pow(2).sum(0).sqrt()
        rad = torch.where(lip > 0, margin / lip.clamp_min(1e-300), torch.full_like(margin, math.inf))
        return rad.scatter(1, labels[:, None], math.inf).min(1).values.clamp_min(0) * (1 - 1e-9)

    def lower(self, inputs: Batch, labels: torch.Tensor, r: torch.Tensor, attacked: list[str]) -> torch.Tensor:
        """``(B, K)`` lower bounds of ``h_y - h_k`` over the ball of radius ``r`` (per sample) on the
        concatenation of the ``attacked`` modalities (the others fixed); ``+inf`` at ``k = y``."""
        spec, beta = self.specs(labels)
        fixed = beta.clone()
        # per attacked modality, candidate (value, dual) pairs with term_m >= value - r_m * dual over
        # ||d_m|| <= r_m: CROWN, interval propagation (dual 0: it holds on the whole ball) and the
        # Lipschitz bound; any choice per modality combines into one joint bound with the shared dual norm
        options: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for m in self.names:
            exact = (spec[m] * self.enc[m].forward(inputs[m]).unsqueeze(1)).sum(2)
            if m not in attacked:
                fixed = fixed + exact
                continue
            lin, dual, ibp = self.enc[m].bound(inputs[m], r, spec[m])
            cands = [(lin, dual), (ibp, torch.zeros_like(ibp))]
            if m in self.row_lip:
                cands.append((exact, self.row_lip[m][labels]))
            options.append(cands)
        best = torch.full_like(fixed, -math.inf)
        for choice in itertools.product(*options):
            total = fixed + sum(v for v, _ in choice)
            duals = torch.stack([d for _, d in choice])
            total = total - r[:, None] * (duals.pow(2).sum(0).sqrt() if self.norm == "l2" else duals.sum(0))
            best = torch.maximum(best, total)
        return best.scatter(1, labels[:, None], math.inf)


def _bisect(
    bounds: ModelBounds, inputs: Batch, labels: torch.Tensor, attacked: list[str], options: CrownOptions
) -> torch.Tensor:
    """Per sample, the largest verified radius over ``options.steps`` rounds (0 if misclassified)."""
    n = labels.shape[0]
    with torch.no_grad():
        correct = bounds.logits(inputs).argmax(1) == labels
    lo = torch.zeros(n, dtype=torch.float64)
    hi = torch.full((n,), math.inf, dtype=torch.float64)
    idx = correct.nonzero().squeeze(1)
    if idx.numel() == 0:
        return lo
    # start from the closed-form Lipschitz radius (itself a sound certificate) and search above it
    lo[idx] = bounds.lipschitz_radius({m: v[idx] for m, v in inputs.items()}, labels[idx], attacked)
    r = torch.where(lo > 0, 2 * lo, torch.full_like(lo, float(options.start)))
    sub = {m: v[idx] for m, v in inputs.items()}
    for _ in range(options.steps):
        with torch.no_grad():
            ok = (bounds.lower(sub, labels[idx], r[idx], attacked) > 0).all(1)
        lo[idx[ok]] = r[idx[ok]]
        hi[idx[~ok]] = r[idx[~ok]]
        # doubling until a failure, quartering until a success, then halving the bracket
        r = torch.where(torch.isinf(hi), 2 * lo, torch.where(lo == 0, hi / 4, (lo + hi) / 2))
    return lo


def crown_radii(model: LateFusionModel, meta: DatasetMeta, split: Split, options: CrownOptions | None = None) -> Radii:
    """CROWN-certified radii (joint, and per modality if ``options.unimodal``) for every sample."""
    options = options or CrownOptions()
    bounds = ModelBounds(model, meta, options)
    names = bounds.names
    joint: list[torch.Tensor] = []
    uni: dict[str, list[torch.Tensor]] = {m: [] for m in names}
    correct = []
    for inputs, labels in iterate_batches(split, options.chunk):
        with torch.no_grad():
            correct.append(bounds.logits(inputs).argmax(1) == labels)
        joint.append(_bisect(bounds, inputs, labels, names, options))
        if options.unimodal:
            for m in names:
                uni[m].append(_bisect(bounds, inputs, labels, [m], options))
    unimodal = {m: torch.cat(v) for m, v in uni.items() if v}
    return Radii(torch.cat(joint), unimodal, torch.cat(correct))


@CERTIFIERS.register("crown")
class CrownCertifier(Certifier):
    """Sound radii by linear bound propagation (CROWN); see :mod:`mmrobust.certify.crown`."""

    name = "crown"
    guarantee = Guarantee.SOUND
    Options = CrownOptions

    def certify(self, model: nn.Module, meta: DatasetMeta, split: Split, ctx: CertifyContext) -> Certificate:
        if not isinstance(model, LateFusionModel):
            raise ConfigError(f"crown certifies a LateFusionModel, got {type(model).__name__}")
        t0 = time.perf_counter()
        radii = crown_radii(model, meta, split, self.options)
        opts = self.options
        info = {"steps": opts.steps, "start": opts.start, "intermediate": opts.intermediate, "chunk": opts.chunk}
        return Certificate(
            self.name, self.guarantee, opts.norm, radii, split.labels, seconds=time.perf_counter() - t0, info=info
        )
