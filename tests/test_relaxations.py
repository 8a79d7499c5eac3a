"""CROWN's activation relaxations against brute force: on many random input intervals (and the
non-monotone and kinked regions on purpose), lower line <= f <= upper line on a dense grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmrobust.certify.activations import (
    HARDSWISH,
    SIGMOID,
    SILU,
    TANH,
    Activation,
    activation_of,
    elu,
    gelu,
    leaky_relu,
    relax,
    softplus,
    value_range,
)
from mmrobust.certify.sound import chain_units

ACTS = {
    "gelu": gelu(),
    "gelu-tanh": gelu("tanh"),
    "silu": SILU,
    "tanh": TANH,
    "sigmoid": SIGMOID,
    "elu": elu(1.0),
    "elu-0.4": elu(0.4),
    "elu-1.7": elu(1.7),
    "softplus": softplus(),
    "softplus-beta2-threshold8": softplus(2.0, 8.0),
    "hardswish": HARDSWISH,
    "leaky-0.01": leaky_relu(0.01),
    "leaky-0.3": leaky_relu(0.3),
    "leaky-1.5": leaky_relu(1.5),
    "leaky-neg": leaky_relu(-0.5),
}

#: intervals that straddle the non-monotone regions and kinks on purpose
SPECIAL = [(-3.0, 0.5), (-5.0, 0.0), (-1.0, -0.5), (-0.8, -0.7), (-4.0, 4.0), (-3.5, -2.5), (2.5, 3.5),
           (-20.0, 20.0), (-0.1, 0.1), (1.4, 1.6), (-12.0, -6.0), (9.0, 11.0), (0.0, 0.0), (-1.3, -1.3)]  # fmt: skip


def _intervals(seed: int, n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centre = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * 14
    width = 10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 5 - 4) * 1.2  # 1.2e-4 .. 12
    lo, hi = centre - width / 2, centre + width / 2
    sl, su = zip(*SPECIAL, strict=True)
    return torch.cat([lo, torch.tensor(sl, dtype=torch.float64)]), torch.cat(
        [hi, torch.tensor(su, dtype=torch.float64)]
    )


def _violations(act: Activation, lo: torch.Tensor, hi: torch.Tensor, lines: tuple[torch.Tensor, ...],
                tol: float = 1e-9) -> torch.Tensor:  # fmt: skip
    """Per interval, whether ``al x + bl <= f(x) <= au x + bu`` fails somewhere on a dense grid."""
    al, bl, au, bu = (t[:, None] for t in lines)
    xs = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, 4001, dtype=torch.float64)
    fx = act.torch_fn(xs)
    return ((al * xs + bl > fx + tol) | (fx > au * xs + bu + tol)).any(1)


@pytest.mark.parametrize("name", list(ACTS))
def test_lines_bound_the_activation_on_every_interval(name):
    act = ACTS[name]
    lo, hi = _intervals(hash(name) % 1000)
    lines = relax(act, lo, hi)
    bad = _violations(act, lo, hi, lines)
    assert not bad.any(), [(float(lo[i]), float(hi[i])) for i in bad.nonzero()[:5, 0]]
    # the output interval holds too
    xs = lo[:, None] + (hi - lo)[:, None] * torch.linspace(0, 1, 4001, dtype=torch.float64)
    vlo, vhi = value_range(act, lo, hi)
    fx = act.torch_fn(xs)
    assert (fx >= vlo[:, None] - 1e-9).all() and (fx <= vhi[:, None] + 1e-9).all()


@pytest.mark.parametrize("name", list(ACTS))
def test_the_check_catches_a_line_shifted_by_a_hundredth(name):
    """The lower line touches f (up to the verified pad), so moving it up by 0.01 must be caught on
    every interval; likewise the upper line moved down."""
    act = ACTS[name]
    lo, hi = _intervals(7, n=100)
    keep = hi - lo <= 12  # on (-20, 20) the verified pad of the smooth ones is 0.04
    lo, hi = lo[keep], hi[keep]
    al, bl, au, bu = relax(act, lo, hi)
    assert _violations(act, lo, hi, (al, bl + 0.01, au, bu)).all()
    assert _violations(act, lo, hi, (al, bl, au, bu - 0.01)).all()


@pytest.mark.parametrize("name", [n for n in ACTS if ACTS[n].slope is None])
def test_declared_constants_dominate_the_derivatives(name):
    """``lip >= sup |f'|`` and ``curv >= sup |f''|`` away from the kinks (finite differences on a dense grid)."""
    act = ACTS[name]
    x = torch.linspace(-30, 30, 600_001, dtype=torch.float64)
    h = float(x[1] - x[0])
    y = act.f(x)
    d1 = (y[1:] - y[:-1]) / h
    assert float(d1.abs().max()) <= act.lip * (1 + 1e-6)
    assert torch.allclose(act.df(x[:-1] + h / 2), d1, atol=1e-5)  # the derivative is the derivative
    d2 = (y[2:] - 2 * y[1:-1] + y[:-2]) / h**2
    mid = x[1:-1]
    away = torch.ones_like(mid, dtype=torch.bool)
    for k in act.kinks:
        away &= (mid - k).abs() > 2 * h
    assert float(d2[away].abs().max()) <= act.curv * (1 + 1e-3)
    # torch's function lies within [f - drop, f]
    t = act.torch_fn(x)
    assert (t <= y + 1e-12).all() and (t >= y - act.drop - 1e-12).all()


def test_relaxation_is_tight_where_the_function_is_convex_or_linear():
    lo = torch.tensor([-2.0, 0.5, 1.0], dtype=torch.float64)
    hi = torch.tensor([1.0, 3.0, 1.5], dtype=torch.float64)
    al, bl, au, bu = relax(softplus(), lo, hi)  # convex: the chord above, a tangent below
    f = softplus().torch_fn
    chord = (f(hi) - f(lo)) / (hi - lo)
    assert torch.allclose(au, chord) and torch.allclose(au * lo + bu, f(lo), atol=1e-3)
    # a stable leaky ReLU is exact
    al, bl, au, bu = relax(leaky_relu(0.1), torch.tensor([0.5, -3.0]).double(), torch.tensor([2.0, -1.0]).double())
    assert torch.equal(al, au) and torch.allclose(al, torch.tensor([1.0, 0.1]).double()) and (bl == 0).all()


@pytest.mark.parametrize(
    "layer", [nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Tanh(), nn.Sigmoid(), nn.ELU(0.5), nn.Softplus(2.0),
              nn.Hardswish(), nn.LeakyReLU(0.2)],
)  # fmt: skip
def test_modules_map_to_their_relaxation_and_sound_constant(layer):
    act = activation_of(layer)
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    assert torch.allclose(act.torch_fn(x), layer(x))
    (unit,) = chain_units(layer, (3,))
    assert unit.lip >= act.lip * (1 - 1e-9) - 1e-9 or unit.lip >= 1.0  # the sound constant covers sup |f'|
    assert unit.lip >= float(((act.torch_fn(x[1:]) - act.torch_fn(x[:-1])) / (x[1] - x[0])).abs().max()) - 1e-6


def test_softplus_switch_to_x_is_covered_by_the_drop():
    """torch's Softplus returns x above the threshold, below the smooth formula: without the drop the
    lower line would cut it (threshold 3, beta 2: a step of 0.024)."""
    import dataclasses

    act = softplus(2.0, 3.0)
    lo, hi = torch.tensor([1.0, 0.0]).double(), torch.tensor([2.0, 3.0]).double()
    assert not _violations(act, lo, hi, relax(act, lo, hi)).any()
    no_drop = dataclasses.replace(act, drop=0.0)
    assert _violations(act, lo, hi, relax(no_drop, lo, hi)).any()
