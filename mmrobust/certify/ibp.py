"""Differentiable float32 bounds of the worst-case margin, for certified training (IBP, CROWN-IBP).

For a sample ``x`` with label ``y`` and each class ``k``, :func:`margin_bounds` returns lower bounds
of the margin ``h_y(x') - h_k(x')`` over every ``x'`` the threat model allows around ``x``. Unlike the
``crown`` certifier (float64, no gradients, for certificates) these bounds are computed in float32
on the model's device, through the model's own layers and parameters, so that a training loss on
them trains the weights (Gowal et al., 2018, interval bound propagation; Zhang et al., 2020,
CROWN-IBP). They are sound for the model in the mode it is in: with BatchNorm in training mode the
affine map of each BatchNorm is the one its batch statistics give (as the forward pass uses).

Coordinates: a modality whose input transform is a :class:`~mmrobust.models.transform.Standardize`
is bounded in its standardised coordinates ``z = (x - mean) / std`` (as the certifiers do, see
:func:`mmrobust.certify.runner.standardised_view`); the threat model's budget, measured on
``x / s`` (``s``: its scales), becomes a radius ``eps * s / std`` on ``z`` (for l2 the largest entry
of ``s / std``, a sound enclosure). Valid ranges are not used (the bound holds on the whole ball).

* **Interval bounds (IBP).** Per modality, the first affine layer (Linear, Conv, AOL, BatchNorm)
  is bounded exactly on the ball: ``W z +- r ||W_j||_*`` per output (l2: the row's l2 norm, l-inf:
  its l1 norm); every later layer maps an interval to an interval. A **joint** l2 ball is enclosed
  in the product of its projections, each modality's ball of the full radius (sound, loose).
  The last step is the margin itself, ``C_m = W^(m)_y - W^(m)_k`` applied to the feature interval
  (the head's rows are combined before taking absolute values).
* **CROWN-IBP.** The margin ``sum_m C_m . phi_m(z_m) + b_y - b_k`` is propagated backwards as a
  linear bound through the head and the encoder's layers, with the ReLU (and MaxMin) relaxations
  set by the interval bounds of their inputs. Where the pass reaches the input, the bound is
  minimised over the ball in closed form and the modalities share one dual norm (the joint ball
  exactly: ``- eps ||(lambda_1, ..., lambda_M)||_2``). Non-overlapping max pooling is relaxed
  per window (below by the element with the largest lower bound, above by the largest upper
  bound); where the pass meets a layer it cannot go through (overlapping max pooling, a residual
  block) it stops and uses the interval bounds of that layer's output.

Supported layers: Linear, Conv1d/2d, BatchNorm1d/2d, ReLU, MaxPool2d, AvgPool2d,
AdaptiveAvgPool1d/2d, Flatten, Identity, the 1-Lipschitz AOL layers and MaxMin, Standardize,
ResNet basic blocks (intervals only) and any ``nn.Sequential`` of them: every built-in encoder but
video ResNet18. Any other layer raises one line naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.attacks.threat import ThreatModel
from mmrobust.data.base import Batch
from mmrobust.errors import ConfigError
from mmrobust.models.encoders import BasicBlock, ResNet18
from mmrobust.models.fusion import LateFusionModel
from mmrobust.models.lipschitz import AOLConv1d, AOLConv2d, AOLLinear, MaxMin
from mmrobust.models.transform import Standardize

BOUNDS = ("ibp", "crown-ibp")

Interval = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Ball:
    """The input set before the first affine layer: ``||z' - z|| <= radius`` (``radius`` broadcasts
    over one sample for l-inf, one number for l2)."""

    centre: torch.Tensor
    radius: torch.Tensor
    norm: str

    def box(self) -> Interval:
        """An enclosing interval (an l2 ball lies in the l-inf ball of the same radius)."""
        return self.centre - self.radius, self.centre + self.radius


# --------------------------------------------------------------------------------------------------
# operators: the clean forward, the interval map and (where it can) the backward linear map


class Op:
    """One layer. ``forward`` computes the clean value (and fixes batch statistics); ``interval``
    maps an input interval (or the ball, for affine layers) to an output interval; ``backward``
    maps a linear bound ``a . out`` to ``a' . in + c`` given the input interval, or returns None
    (the backward pass stops there)."""

    name: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def interval(self, box: Interval) -> Interval:
        raise NotImplementedError

    def ball(self, ball: Ball) -> Interval | Ball:
        """Bounds over the ball; default: over its enclosing box."""
        return self.interval(ball.box())

    def backward(self, a: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


def _fold(a: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(B, S, *shape)`` -> ``(B * S, *shape)``."""
    b, s = a.shape[:2]
    return a.reshape(b * s, *a.shape[2:]), b, s


class AffineOp(Op):
    """``x -> lin(x) + bias`` with ``lin`` linear: Linear, Conv, AOL (a weight and a bias)."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, conv: dict[str, Any] | None):
        self.name, self.weight, self.bias, self.conv = name, weight, bias, conv
        self.in_shape: tuple[int, ...] = ()
        self.out_shape: tuple[int, ...] = ()

    def _lin(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(x, w)
        fn = F.conv1d if w.ndim == 3 else F.conv2d
        return fn(x, w, None, self.conv["stride"], self.conv["padding"])

    def _bias(self, out: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return out
        return out + self.bias.view(-1, *([1] * (out.ndim - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.in_shape = tuple(x.shape[1:])
        out = self._bias(self._lin(x, self.weight))
        self.out_shape = tuple(out.shape[1:])
        return out

    def interval(self, box: Interval) -> Interval:
        mid, rad = (box[0] + box[1]) / 2, (box[1] - box[0]) / 2
        m, r = self._bias(self._lin(mid, self.weight)), self._lin(rad, self.weight.abs())
        return m - r, m + r

    def ball(self, ball: Ball) -> Interval:
        centre = self._bias(self._lin(ball.centre, self.weight))
        if ball.norm == "l2":  # exact: ||W_j||_2 per output (zero padding included)
            ones = torch.ones(1, *ball.centre.shape[1:], dtype=centre.dtype, device=centre.device)
            rad = ball.radius * self._lin(ones, self.weight.pow(2)).clamp_min(0).sqrt()
        else:  # l-inf: |W| r per output (r may vary per entry)
            rad = self._lin(ball.radius.expand_as(ball.centre[:1]), self.weight.abs())
        return centre - rad, centre + rad

    def backward(self, a: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        flat, b, s = _fold(a)
        w = self.weight
        if self.conv is None:
            back = flat @ w
        else:
            fn = F.conv_transpose1d if w.ndim == 3 else F.conv_transpose2d
            stride, padding = self.conv["stride"], self.conv["padding"]
            size = self.in_shape[1:]
            natural = [
                (o - 1) * st - 2 * p + k
                for o, st, p, k in zip(flat.shape[2:], stride, padding, w.shape[2:], strict=True)
            ]
            extra = tuple(n - m for n, m in zip(size, natural, strict=True))
            back = fn(flat, w, None, stride, padding, output_padding=extra)
        c = torch.zeros(b * s, dtype=a.dtype, device=a.device)
        if self.bias is not None:
            c = (flat.flatten(2).sum(2) * self.bias).sum(1) if flat.ndim > 2 else flat @ self.bias
        return back.reshape(b, s, *self.in_shape), c.view(b, s)


class ScaleOp(Op):
    """Elementwise ``x * scale + shift`` (BatchNorm, Standardize); ``make(x)`` gives the pair from the
    clean input (batch statistics in training mode)."""

    def __init__(self, name: str, make: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.name, self.make = name, make
        self.scale = self.shift = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale, self.shift = self.make(x)
        return x * self.scale + self.shift

    def interval(self, box: Interval) -> Interval:
        mid, rad = (box[0] + box[1]) / 2, (box[1] - box[0]) / 2
        m, r = mid * self.scale + self.shift, rad * self.scale.abs()
        return m - r, m + r

    def ball(self, ball: Ball) -> Interval:
        centre = ball.centre * self.scale + self.shift
        rad = ball.radius * self.scale.abs()  # a diagonal map: each row has one entry
        return centre - rad, centre + rad

    def backward(self, a: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        return a * self.scale, (a * self.shift).flatten(2).sum(2)


class MonotoneOp(Op):
    """A monotone (non-decreasing) map applied to both interval ends: ReLU, pools with non-negative
    weights, reshapes. ``linear`` ones (average pools, reshapes) go backwards by their transpose."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor], linear: bool):
        self.name, self.fn, self.linear = name, fn, linear
        self.in_shape: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.in_shape = tuple(x.shape[1:])
        return self.fn(x)

    def interval(self, box: Interval) -> Interval:
        return self.fn(box[0]), self.fn(box[1])

    def ball(self, ball: Ball) -> Interval | Ball:
        if isinstance(self.fn, nn.Flatten | _Reshape) and ball.norm == "l2":
            return Ball(self.fn(ball.centre), ball.radius, ball.norm)  # a reshape keeps the ball
        return self.interval(ball.box())

    def backward(self, a: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.linear:
            return None
        flat, b, s = _fold(a)
        x = torch.zeros(b * s, *self.in_shape, dtype=a.dtype, device=a.device, requires_grad=True)
        with torch.enable_grad():
            (back,) = torch.autograd.grad(self.fn(x), x, grad_outputs=flat, create_graph=True)
        return back.reshape(b, s, *self.in_shape), torch.zeros(b, s, dtype=a.dtype, device=a.device)


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def _relu_relaxation(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CROWN's ReLU relaxation from the input interval: ``lower_slope * z <= relu(z) <= up_slope * z + up_bias``
    (adaptive lower slope: 1 where ``hi > -lo``; exact where the neuron is stable)."""
    active, dead = lo >= 0, hi <= 0
    unstable = ~(active | dead)
    denom = (hi - lo).clamp_min(1e-12)
    up_slope = torch.where(active, torch.ones_like(lo), torch.where(unstable, hi / denom, torch.zeros_like(lo)))
    up_bias = torch.where(unstable, -lo * hi / denom, torch.zeros_like(lo))
    low_slope = torch.where(active | (unstable & (hi > -lo)), torch.ones_like(lo), torch.zeros_like(lo))
    return low_slope, up_slope, up_bias


def _relu_backward(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower bound ``a . relu(z) >= a' . z + c`` for ``z`` in ``[lo, hi]``."""
    low, up, up_bias = (t.unsqueeze(1) for t in _relu_relaxation(lo, hi))
    pos, neg = a.clamp_min(0), a.clamp_max(0)
    return pos * low + neg * up, (neg * up_bias).flatten(2).sum(2)


class ReLUOp(MonotoneOp):
    def __init__(self, name: str):
        super().__init__(name, F.relu, linear=False)

    def backward(self, a: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        return _relu_backward(a, box[0], box[1])


class MaxMinOp(Op):
    """``(a, b) -> (max(a, b), min(a, b))`` over channel halves; backwards as ``max = b + relu(a - b)``,
    ``min = a - relu(a - b)`` with the ReLU relaxed on the interval of ``a - b``."""

    def __init__(self, name: str):
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def interval(self, box: Interval) -> Interval:
        (la, lb), (ha, hb) = box[0].chunk(2, dim=1), box[1].chunk(2, dim=1)
        lo = torch.cat([torch.maximum(la, lb), torch.minimum(la, lb)], dim=1)
        hi = torch.cat([torch.maximum(ha, hb), torch.minimum(ha, hb)], dim=1)
        return lo, hi

    def backward(self, a: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        (la, lb), (ha, hb) = box[0].chunk(2, dim=1), box[1].chunk(2, dim=1)
        a_max, a_min = a.chunk(2, dim=2)
        coef = a_max - a_min  # the coefficient of relu(d), d = a - b in [la - hb, ha - lb]
        d_coef, c = _relu_backward(coef, la - hb, ha - lb)
        return torch.cat([a_min + d_coef, a_max - d_coef], dim=2), c


class MaxPoolOp(MonotoneOp):
    """Non-overlapping max pooling (kernel = stride, no padding): backwards, each window's max is bounded
    below by the element with the largest lower bound and above by the largest upper bound (by that
    element itself where its lower bound is above every other upper bound: the window is decided)."""

    def __init__(self, name: str, pool: nn.MaxPool2d):
        super().__init__(name, pool, linear=False)
        self.k = _pair(pool.kernel_size)

    def backward(self, a: torch.Tensor, box: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        kh, kw = self.k
        lo, hi = box
        b, c, h, w = lo.shape
        ho, wo = h // kh, w // kw

        def windows(t: torch.Tensor) -> torch.Tensor:  # (B, C, Ho, Wo, kh * kw)
            t = t[:, :, : ho * kh, : wo * kw].reshape(b, c, ho, kh, wo, kw)
            return t.permute(0, 1, 2, 4, 3, 5).reshape(b, c, ho, wo, kh * kw)

        lw, hw = windows(lo), windows(hi)
        best = lw.argmax(-1, keepdim=True)
        pick = torch.zeros_like(lw).scatter(-1, best, 1.0)  # the element with the largest lower bound
        other_hi = hw.masked_fill(pick.bool(), float("-inf")).amax(-1)
        decided = (lw.gather(-1, best).squeeze(-1) >= other_hi).unsqueeze(1)  # (B, 1, C, Ho, Wo)
        pos, neg = a.clamp_min(0), a.clamp_max(0)
        neg_linear = torch.where(decided, neg, torch.zeros_like(neg))
        coef = (pos + neg_linear).unsqueeze(-1) * pick.unsqueeze(1)  # (B, S, C, Ho, Wo, kh * kw)
        back = coef.reshape(b, -1, c, ho, wo, kh, kw).permute(0, 1, 2, 3, 5, 4, 6).reshape(b, -1, c, ho * kh, wo * kw)
        back = F.pad(back, (0, w - wo * kw, 0, h - ho * kh))
        up = hw.amax(-1).unsqueeze(1)
        const = torch.where(decided, torch.zeros_like(neg), neg * up).flatten(2).sum(2)
        return back, const


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ResidualOp(Op):
    """A ResNet basic block ``relu(F(x) + shortcut(x))``: intervals of both branches added (no backward)."""

    def __init__(self, name: str, block: BasicBlock):
        self.name = name
        self.branch = _ops(nn.Sequential(block.conv1, block.bn1, block.relu, block.conv2, block.bn2), name)
        self.short = _ops(block.shortcut, f"{name}.shortcut")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(_run(self.branch, x) + _run(self.short, x))

    def interval(self, box: Interval) -> Interval:
        f, s = _interval(self.branch, box), _interval(self.short, box)
        return F.relu(f[0] + s[0]), F.relu(f[1] + s[1])


# --------------------------------------------------------------------------------------------------
# from modules to operators


def _bn_make(bn: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def make(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean: torch.Tensor | None = bn.running_mean
        var: torch.Tensor | None = bn.running_var
        if bn.training or mean is None or var is None:  # batch statistics, as the forward pass uses them
            dims = [0, *range(2, x.ndim)]
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return scale.view(shape), shift.view(shape)

    return make


SUPPORTED = (
    "Linear, Conv1d, Conv2d, BatchNorm1d, BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool1d, "
    "AdaptiveAvgPool2d, Flatten, Identity, AOLLinear, AOLConv1d, AOLConv2d, MaxMin, Standardize, "
    "ResNet basic blocks and nn.Sequential of them"
)


def _ops(module: nn.Module, name: str) -> list[Op]:
    """The operators of ``module`` (recursing into ``nn.Sequential``); one line for anything else."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return [op for i, child in enumerate(module) for op in _ops(child, f"{name}.{i}")]
    if isinstance(module, ResNet18) and not module.video:
        return [
            *_ops(module.stem, f"{name}.stem"),
            *_ops(module.layers, f"{name}.layers"),
            *_ops(module.pool, f"{name}.pool"),
        ]
    t = type(module)
    if t is nn.Linear or t is nn.Conv1d or t is nn.Conv2d:
        lin: Any = module
        conv = None if t is nn.Linear else {"stride": lin.stride, "padding": _padding(lin, name)}
        if conv is not None and (any(d != 1 for d in lin.dilation) or lin.groups != 1):
            raise _refuse(name, module, "dilation and groups are not supported")
        return [AffineOp(name, lin.weight, lin.bias, conv)]
    if t in (AOLLinear, AOLConv1d, AOLConv2d):
        aol: Any = module
        conv = None if t is AOLLinear else {"stride": aol.stride, "padding": aol.padding}
        return [AffineOp(name, aol.rescaled(), aol.bias, conv)]
    if t in (nn.BatchNorm1d, nn.BatchNorm2d):
        return [ScaleOp(name, _bn_make(module))]  # type: ignore[arg-type]
    if t is Standardize:
        std: Any = module
        return [ScaleOp(name, lambda x: (1.0 / std.std, -std.mean / std.std))]
    if t is nn.ReLU:
        return [ReLUOp(name)]
    if t is MaxMin:
        return [MaxMinOp(name)]
    if t is BasicBlock:
        return [ResidualOp(name, module)]  # type: ignore[arg-type]
    if t is nn.MaxPool2d:
        pool: Any = module
        plain = _pair(pool.stride or pool.kernel_size) == _pair(pool.kernel_size) and _pair(pool.padding) == (0, 0)
        if plain and _pair(pool.dilation) == (1, 1) and not pool.ceil_mode:
            return [MaxPoolOp(name, pool)]
        return [MonotoneOp(name, module, linear=False)]  # overlapping windows: intervals only
    if t in (nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten):
        return [MonotoneOp(name, module, linear=True)]
    if t is nn.Identity:
        return []
    raise _refuse(name, module, f"supported: {SUPPORTED}")


def _padding(conv: Any, name: str) -> tuple[int, ...]:
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise _refuse(name, conv, "only explicit zero padding is supported")
    return tuple(conv.padding)


def _refuse(name: str, layer: nn.Module, why: str) -> ConfigError:
    return ConfigError(
        f"certified training has no interval bound for layer '{name}' ({type(layer).__name__}); {why}",
        param="certified",
    )


def _run(ops: list[Op], x: torch.Tensor) -> torch.Tensor:
    for op in ops:
        x = op.forward(x)
    return x


def _interval(ops: list[Op], box: Interval) -> Interval:
    for op in ops:
        box = op.interval(box)
    return box


# --------------------------------------------------------------------------------------------------
# the margins of the whole model


@dataclass
class MarginBounds:
    """Lower bounds of ``h_y - h_k`` over the threat model's ball, ``(B, K)``, 0 at ``k = y``.

    ``ibp``: interval bound propagation; ``crown``: CROWN-IBP (None unless asked for);
    ``logits``: the clean logits of the bounded pass (for accuracy)."""

    ibp: torch.Tensor
    crown: torch.Tensor | None
    logits: torch.Tensor


def input_radius(model: LateFusionModel, threat: ThreatModel, m: str, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """The threat model's budget of modality ``m`` at eps 1 as a radius in the encoder's coordinates
    (``s / std``; a scalar for l2, per entry for l-inf), float32 on the model's device."""
    device = next(model.parameters()).device
    scales = threat.scales[m]
    if len(scales) == 1:
        s = torch.full((1,) * len(sample_shape), scales[0])
    else:
        axis = threat.scale_axes.get(m, 0)
        s = torch.tensor(scales).reshape([len(scales) if i == axis else 1 for i in range(len(sample_shape))])
    s = s.to(device=device, dtype=torch.float32)
    t = model.transforms[m] if model.transforms is not None and m in model.transforms else None
    if t is not None:
        if not isinstance(t, Standardize):
            raise ConfigError(
                f"certified training: the input front end of modality '{m}' ({type(t).__name__}) has no bound; "
                "train on the feature-space data instead",
                param="certified",
            )
        s = s / t.std
    if threat.norm == "l2":
        return s.max()  # the ellipsoid ||delta / s|| <= 1 lies in the ball of its largest semi-axis
    return s


def margin_bounds(
    model: nn.Module, inputs: Batch, labels: torch.Tensor, threat: ThreatModel, crown: bool = False
) -> MarginBounds:
    """Lower bounds of every margin ``h_y - h_k`` of ``model`` (a :class:`LateFusionModel`, possibly
    DDP-wrapped) over the ``threat`` ball around ``inputs`` (see the module docstring); differentiable
    with respect to the weights, float32. ``crown``: also the CROWN-IBP bound."""
    model = getattr(model, "module", model)
    if not isinstance(model, LateFusionModel):
        raise ConfigError(f"certified training bounds a LateFusionModel, got {type(model).__name__}", param="certified")
    unattacked = [m for m in model.modalities if m not in threat.modalities]
    head = model.head
    k = int(head.bias.shape[0])
    eye = torch.eye(k, device=labels.device, dtype=torch.float32)
    diff = eye[labels].unsqueeze(1) - eye.unsqueeze(0)  # (B, K, K): row k is e_y - e_k
    bias = diff @ head.bias
    ibp_total, crown_value = bias, bias
    duals: list[torch.Tensor] = []
    logits = head.bias.expand(labels.shape[0], k)
    with torch.autocast(labels.device.type, enabled=False):
        for m in model.modalities:
            x = inputs[m].float()
            t = model.transforms[m] if model.transforms is not None and m in model.transforms else None
            if t is not None and not isinstance(t, Standardize):
                input_radius(model, threat, m, tuple(x.shape[1:]))  # the one-line refusal
            z = t(x) if t is not None else x
            ops = _ops(model.encoders[m], f"encoders.{m}")
            w = head.modality_weight(m)  # (K, d_m)
            spec = diff @ w  # (B, K, d_m): W_y - W_k
            feats = _run(ops, z)
            logits = logits + feats @ w.T
            if m in unattacked:
                exact = (spec * feats.unsqueeze(1)).sum(2)
                ibp_total, crown_value = ibp_total + exact, crown_value + exact
                continue
            unit = input_radius(model, threat, m, tuple(z.shape[1:]))
            radius = unit * threat.eps_map[m]
            boxes = _forward_bounds(ops, Ball(z, radius, threat.norm))
            lo, hi = boxes[-1]
            mid, rad = (lo + hi) / 2, (hi - lo) / 2
            ibp_total = ibp_total + (spec * mid.unsqueeze(1)).sum(2) - (spec.abs() * rad.unsqueeze(1)).sum(2)
            if crown:
                value, coef = _backward(ops, boxes, spec, z)
                crown_value = crown_value + value
                if coef is None:
                    continue
                if threat.norm == "linf":  # min of a . d over |d_j| <= r_j
                    duals.append((coef.abs() * radius).flatten(2).sum(2))
                elif threat.budget == "joint":  # per unit eps; the modalities share one l2 dual norm
                    duals.append(coef.flatten(2).norm(dim=2) * unit)
                else:
                    duals.append(coef.flatten(2).norm(dim=2) * radius)
    crown_total = None
    if crown:
        crown_total = crown_value
        if duals:
            if threat.norm == "l2" and threat.budget == "joint":
                eps = threat.eps_map[threat.modalities[0]]
                crown_total = crown_total - eps * torch.stack(duals).pow(2).sum(0).add(1e-30).sqrt()
            else:  # per-modality l2 (each term carries its radius) or l-inf
                crown_total = crown_total - torch.stack(duals).sum(0)
    at_y = labels[:, None]  # k = y: the margin is 0 (its spec is zero; the l2 dual norm's guard adds ~1e-15)
    zero = torch.zeros_like(at_y, dtype=ibp_total.dtype)
    ibp_total = ibp_total.scatter(1, at_y, zero)
    crown_total = crown_total.scatter(1, at_y, zero) if crown_total is not None else None
    return MarginBounds(ibp_total, crown_total, logits)


def _forward_bounds(ops: list[Op], ball: Ball) -> list[Interval]:
    """The interval at the input of every op and at the output (``len(ops) + 1`` entries; the
    entries before the first affine layer are the ball's enclosing box)."""
    state: Interval | Ball = ball
    boxes: list[Interval] = []
    for op in ops:
        boxes.append(state.box() if isinstance(state, Ball) else state)
        state = op.ball(state) if isinstance(state, Ball) else op.interval(state)
    boxes.append(state.box() if isinstance(state, Ball) else state)
    return boxes


def _backward(
    ops: list[Op], boxes: list[Interval], spec: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CROWN backwards from ``spec . phi`` through ``ops``: ``(value, a)`` with ``spec . phi(z') >=
    value + a . (z' - z)`` on the ball when the pass reaches the input (the caller minimises the
    last term over the ball), or ``(bound, None)`` when it stops at a layer it cannot go through
    (the interval bound of that layer's output, valid on the whole ball)."""
    a = spec
    const = torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device)
    for i in range(len(ops) - 1, -1, -1):
        step = ops[i].backward(a, boxes[i])
        if step is None:
            lo, hi = boxes[i + 1]
            mid, rad = ((lo + hi) / 2).unsqueeze(1), ((hi - lo) / 2).unsqueeze(1)
            return const + (a * mid).flatten(2).sum(2) - (a.abs() * rad).flatten(2).sum(2), None
        a, c = step
        const = const + c
    return const + (a * z.unsqueeze(1)).flatten(2).sum(2), a
