"""Transposes of the linear maps of a :class:`~mmrobust.layer_rules.Unit`, shared by the sound
Lipschitz bound (:mod:`mmrobust.certify.sound`) and CROWN (:mod:`mmrobust.certify.crown_ops`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn import grad as nn_grad

_CONV_INPUT_GRAD = {F.conv1d: nn_grad.conv1d_input, F.conv2d: nn_grad.conv2d_input}


def vjp(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: tuple[int, ...], v: torch.Tensor) -> torch.Tensor:
    """``A^T v`` for the linear part ``A`` of the affine map ``fn`` (rows of ``v`` are a batch), by autograd."""
    x = torch.zeros(v.shape[0], *in_shape, dtype=torch.float64, requires_grad=True)
    y = fn(x)
    (g,) = torch.autograd.grad(y, x, v.reshape(y.shape))
    return g


def transpose(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: tuple[int, ...], v: torch.Tensor) -> torch.Tensor:
    """``A^T v`` per row of ``v``: direct for a Linear/Conv ``partial`` (as built by the sound rules),
    else one vector-Jacobian product (:func:`vjp`)."""
    if isinstance(fn, partial) and fn.func is F.linear:
        return v @ fn.keywords["weight"]
    if isinstance(fn, partial) and fn.func in _CONV_INPUT_GRAD:
        kw = fn.keywords
        grad = _CONV_INPUT_GRAD[fn.func]
        return grad(
            (v.shape[0], *in_shape),
            kw["weight"],
            v,
            kw.get("stride", 1),
            kw.get("padding", 0),
            kw.get("dilation", 1),
            kw.get("groups", 1),
        )
    with torch.enable_grad():
        return vjp(fn, in_shape, v)
