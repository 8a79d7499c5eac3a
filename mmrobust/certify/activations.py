"""Sound linear relaxations of elementwise activations for CROWN, on an input interval ``[l, u]``.

For each activation ``f`` and each neuron, :func:`relax` returns a lower line ``al x + bl`` and an
upper line ``au x + bu`` with ``al x + bl <= f(x) <= au x + bu`` for every ``x`` in ``[l, u]``.

* piecewise-linear ones (``LeakyReLU``, any slope ``s``): ``f(x) = s x + (1 - s) relu(x)``, so the
  ReLU triangle relaxation (chord above, slope 0 or 1 below) scaled by ``1 - s`` is exact on
  stable intervals;
* smooth ones (GELU, SiLU, Tanh, Sigmoid, ELU, Softplus, Hardswish), including non-convex and
  non-monotone regions: a few candidate slopes ``a`` (the chord, the derivative at both ends and
  at the middle, and their means) and, for each, the *verified* offset ``b = max (f(x) - a x)``
  over ``[l, u]`` (upper line; ``min`` for the lower). The maximum is taken over a grid of
  ``POINTS`` points (plus the points where ``f'`` jumps) and padded by the interpolation error
  ``M delta^2 / 8`` (``delta``: the widest grid step, ``M``: a bound on ``|f''|`` on the smooth
  pieces). Why it holds: between two grid points ``h(x) = f(x) - a x`` exceeds the chord of its
  values by at most ``M delta^2 / 8`` (``h'' = f''``, ``f'`` absolutely continuous on the piece),
  and the chord is at most the larger grid value. The candidate with the smallest value at the
  middle (the least area between line and ``f``) is kept. Exact lines are not needed: any slope
  with its verified offset is sound.

Output intervals: ``[f(l), f(u)]`` for monotone activations, the grid's minimum and maximum padded
the same way otherwise. ``M`` and ``sup |f'|`` of every activation are checked against dense grids
in ``tests/test_relaxations.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.certify.crown_ops import Op, State, bcast, widen

#: grid points per interval for the verified offsets (interpolation error ~ M (u - l)^2 / 8 / (POINTS - 1)^2)
POINTS = 65
#: neurons relaxed at once (memory: CHUNK * (POINTS + kinks) float64 values per tensor)
CHUNK = 1 << 15


@dataclass(frozen=True)
class Activation:
    """An elementwise activation as the relaxations see it.

    ``torch_fn``: the function as the model computes it; ``f``/``df``: a smooth formula and its
    derivative (float64) with ``f - drop <= torch_fn <= f``; ``lip``: ``sup |f'|``; ``curv``: a bound on
    ``|f''|`` away from ``kinks`` (where ``f'`` may jump); ``monotone``: non-decreasing;
    ``slope``: for piecewise-linear ``s x + (1 - s) relu(x)`` (``f``, ``df``, ``curv`` unused).
    """

    name: str
    torch_fn: Callable[[torch.Tensor], torch.Tensor]
    f: Callable[[torch.Tensor], torch.Tensor]
    df: Callable[[torch.Tensor], torch.Tensor]
    lip: float
    curv: float
    kinks: tuple[float, ...] = ()
    monotone: bool = True
    drop: float = 0.0
    slope: float | None = None


def _gelu_df(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gelu_tanh_df(x: torch.Tensor) -> torch.Tensor:
    c = math.sqrt(2 / math.pi)
    t = torch.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _silu_df(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _hardswish_df(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), (2 * x + 3) / 6))


def gelu(approximate: str = "none") -> Activation:
    if approximate == "tanh":
        fn = partial_gelu_tanh
        return Activation("GELU(tanh)", fn, fn, _gelu_tanh_df, 1.13, 0.81, monotone=False)
    return Activation("GELU", F.gelu, F.gelu, _gelu_df, 1.13, 0.81, monotone=False)


def partial_gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


SILU = Activation("SiLU", F.silu, F.silu, _silu_df, 1.10, 0.51, monotone=False)
TANH = Activation("Tanh", torch.tanh, torch.tanh, lambda x: 1 - torch.tanh(x) ** 2, 1.0, 0.77)
SIGMOID = Activation(
    "Sigmoid", torch.sigmoid, torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)), 0.25, 0.0963
)
HARDSWISH = Activation("Hardswish", F.hardswish, F.hardswish, _hardswish_df, 1.5, 1 / 3 + 1e-9, (-3.0, 3.0), False)


def elu(alpha: float = 1.0) -> Activation:
    def df(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x < 0, alpha * torch.exp(x.clamp_max(0)), torch.ones_like(x))

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.elu(x, alpha)

    kinks = () if alpha == 1.0 else (0.0,)
    return Activation(f"ELU({alpha})", fn, fn, df, max(1.0, abs(alpha)), abs(alpha), kinks, alpha >= 0)


def softplus(beta: float = 1.0, threshold: float = 20.0) -> Activation:
    if beta <= 0:
        raise ValueError(f"Softplus needs beta > 0, got {beta}")

    def smooth(x: torch.Tensor) -> torch.Tensor:  # log(1 + exp(beta x)) / beta without the linear switch
        return torch.logaddexp(beta * x, torch.zeros_like(x)) / beta

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x, beta, threshold)

    # torch returns x where beta x > threshold: below the smooth formula by at most log1p(exp(-threshold)) / beta
    drop = math.log1p(math.exp(-threshold)) / beta * (1 + 1e-6)
    return Activation(f"Softplus({beta})", fn, smooth, lambda x: torch.sigmoid(beta * x), 1.0, beta / 4 + 1e-12,
                      drop=drop)  # fmt: skip


def leaky_relu(slope: float = 0.01) -> Activation:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, slope)

    return Activation(f"LeakyReLU({slope})", fn, fn, fn, max(1.0, abs(slope)), 0.0, (0.0,), slope >= 0, slope=slope)


def activation_of(layer: nn.Module) -> Activation:
    """The :class:`Activation` of an activation module (``KeyError`` for any other)."""
    if isinstance(layer, nn.GELU):
        return gelu(layer.approximate)
    if isinstance(layer, nn.ELU):
        return elu(float(layer.alpha))
    if isinstance(layer, nn.Softplus):
        return softplus(float(layer.beta), float(layer.threshold))
    if isinstance(layer, nn.LeakyReLU):
        return leaky_relu(float(layer.negative_slope))
    return {nn.SiLU: SILU, nn.Tanh: TANH, nn.Sigmoid: SIGMOID, nn.Hardswish: HARDSWISH}[type(layer)]


Lines = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _piecewise_relax(act: Activation, lo: torch.Tensor, hi: torch.Tensor, alpha: torch.Tensor | None = None) -> Lines:
    """``s x + (1 - s) relu(x)``: the ReLU triangle relaxation scaled by ``1 - s`` (which line of the
    ReLU is the lower one flips with the sign of ``1 - s``); ``alpha`` in ``[0, 1]``: the slopes of
    the ReLU's lower lines on unstable neurons (alpha-CROWN; default 1 if ``u > -l`` else 0)."""
    assert act.slope is not None
    s = act.slope
    zero = torch.zeros_like(lo)
    unstable = (lo < 0) & (hi > 0)
    active = (lo >= 0).double()
    up_a = torch.where(unstable, hi / (hi - lo).clamp_min(1e-300), active)  # relu <= up_a x + up_b
    up_b = torch.where(unstable, -up_a * lo, zero)
    lo_a = torch.where(unstable, (hi > -lo).double() if alpha is None else alpha, active)  # relu >= lo_a x
    if s > 1:
        lo_a, up_a, up_b, lo_b = up_a, lo_a, zero, up_b
    else:
        lo_b = zero
    return s + (1 - s) * lo_a, (1 - s) * lo_b, s + (1 - s) * up_a, (1 - s) * up_b


def relax(act: Activation, lo: torch.Tensor, hi: torch.Tensor, points: int = POINTS) -> Lines:
    """``(al, bl, au, bu)``, each shaped like ``lo``: ``al x + bl <= f(x) <= au x + bu`` on ``[lo, hi]``."""
    lo, hi = lo.double(), torch.maximum(hi.double(), lo.double())
    if act.slope is not None:
        return _piecewise_relax(act, lo, hi)
    shape = lo.shape
    outs = [torch.empty(lo.numel(), dtype=torch.float64) for _ in range(4)]
    flat_l, flat_u = lo.reshape(-1), hi.reshape(-1)
    for s0 in range(0, flat_l.numel(), CHUNK):
        sl = slice(s0, s0 + CHUNK)
        for out, v in zip(outs, _relax_flat(act, flat_l[sl], flat_u[sl], points), strict=True):
            out[sl] = v
    return tuple(o.view(shape) for o in outs)  # type: ignore[return-value]


def _grid(act: Activation, lo: torch.Tensor, hi: torch.Tensor, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid points (``(n, P)``, sorted, kinks included) and the interpolation pad per neuron."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    xs = lo[:, None] + (hi - lo)[:, None] * t
    if act.kinks:
        kinks = torch.tensor(act.kinks, dtype=torch.float64)
        extra = torch.minimum(torch.maximum(kinks[None, :], lo[:, None]), hi[:, None])
        xs = torch.cat([xs, extra], 1).sort(1).values
    xs = torch.cat([xs[:, :1], xs[:, 1:-1], hi[:, None]], 1)  # the ends exactly
    step = (hi - lo) / (points - 1)
    return xs, act.curv * step * step / 8


def _relax_flat(act: Activation, lo: torch.Tensor, hi: torch.Tensor, points: int) -> Lines:
    xs, pad = _grid(act, lo, hi, points)
    fx = act.f(xs)
    mid = (lo + hi) / 2
    width = hi - lo
    fl, fu = act.f(lo), act.f(hi)
    chord = torch.where(width > 0, (fu - fl) / width.clamp_min(1e-300), act.df(lo))
    dl, dm, du = act.df(lo), act.df(mid), act.df(hi)
    cands = [chord, dl, dm, du, (chord + dm) / 2, (chord + dl) / 2, (chord + du) / 2]
    # rounding: |f - a x| is computed to ~1e-15 of its magnitude
    mag = fx.abs().amax(1) + torch.maximum(lo.abs(), hi.abs()) * max(act.lip, 1.0)
    eps = 1e-12 * (1 + mag)
    best_up = best_lo = None
    for a in cands:
        h = fx - a[:, None] * xs
        bu = h.amax(1) + pad + eps
        bl = h.amin(1) - pad - eps - act.drop
        vu, vl = a * mid + bu, a * mid + bl
        if best_up is None or best_lo is None:
            best_up, best_lo = (a, bu, vu), (a, bl, vl)
            continue
        take_u, take_l = vu < best_up[2], vl > best_lo[2]
        best_up = tuple(torch.where(take_u, n, o) for n, o in zip((a, bu, vu), best_up, strict=True))  # type: ignore[assignment]
        best_lo = tuple(torch.where(take_l, n, o) for n, o in zip((a, bl, vl), best_lo, strict=True))  # type: ignore[assignment]
    assert best_up is not None and best_lo is not None
    return best_lo[0], best_lo[1], best_up[0], best_up[1]


def value_range(act: Activation, lo: torch.Tensor, hi: torch.Tensor, points: int = POINTS) -> tuple[torch.Tensor, ...]:
    """Bounds on ``f`` over ``[lo, hi]`` (elementwise): exact ends if monotone, else a padded grid."""
    if act.monotone:  # the smooth formula is monotone and torch's value lies in [f - drop, f]
        return act.f(lo) - act.drop, act.f(hi)
    if act.slope is not None:  # a non-monotone piecewise-linear one (negative slope): the ends and 0
        ends = torch.stack([act.torch_fn(lo), act.torch_fn(hi), act.torch_fn(torch.zeros_like(lo))])
        inside = (lo < 0) & (hi > 0)
        cand_lo = torch.where(inside, ends.amin(0), ends[:2].amin(0))
        cand_hi = torch.where(inside, ends.amax(0), ends[:2].amax(0))
        return cand_lo, cand_hi
    xs, pad = _grid(act, lo.reshape(-1), hi.reshape(-1), points)
    fx = act.f(xs)
    return (fx.amin(1) - pad - act.drop).view(lo.shape), (fx.amax(1) + pad).view(lo.shape)


class ActivationOp(Op):
    """An elementwise activation with the relaxations of :func:`relax` (CROWN)."""

    def __init__(self, name: str, act: Activation) -> None:
        self.name, self.act = name, act
        self.lines: Lines | None = None
        self.lo = self.hi = torch.zeros(0)
        self.alpha = None  # lower slopes of the ReLU part of a piecewise-linear one (alpha-CROWN)

    def slope_bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.lo, self.hi) if self.act.slope is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act.torch_fn(x)

    def propagate(self, st: State, r: torch.Tensor) -> State:
        self.lines = relax(self.act, st.lo, st.hi)
        self.lo, self.hi = st.lo, st.hi
        lo, hi = value_range(self.act, st.lo, st.hi)
        z = self.forward(st.z)
        lip = st.lip * self.act.lip  # |f(z') - f(z)| <= sup|f'| |z' - z|
        rr = bcast(r, z)
        lo, hi = widen(torch.maximum(lo, z - rr * lip), torch.minimum(hi, z + rr * lip))
        return State(z, lo, hi, lip, st.g * self.act.lip)

    def backward(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.lines is not None
        if self.alpha is not None and self.act.slope is not None:
            al, bl, au, bu = _piecewise_relax(self.act, self.lo.unsqueeze(1), self.hi.unsqueeze(1), self.alpha)
        else:
            al, bl, au, bu = (t.unsqueeze(1) for t in self.lines)
        a_pos, a_neg = a.clamp_min(0), a.clamp_max(0)
        return a_pos * al + a_neg * au, (a_pos * bl + a_neg * bu).flatten(2).sum(2)
