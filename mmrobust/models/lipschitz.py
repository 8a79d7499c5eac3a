"""Encoders that are 1-Lipschitz in l2 by construction (``ModelConfig.lipschitz_encoders``).

Every layer is 1-Lipschitz, so each encoder is, and with CRMT's orthonormal head every uni-modal
score has ``tau <= 1``: Theorem 3.5 (or 3.3) becomes a sound certificate at no extra cost.

* **AOL rescaling** (Prach & Lampert, 2022) for linear and convolutional layers: the weight is used
  as ``W diag(d)`` with ``d_i = (sum_j |W^T W|_ij)^(-1/2)`` (a wide linear layer uses ``diag(d) W``
  with the same formula on ``W^T``, since ``||diag(d) W|| = ||W^T diag(d)||``). Why it is 1-Lipschitz:
  ``||W D||^2 = ||D W^T W D||`` and ``D W^T W D <= I`` because a symmetric matrix ``M`` with
  ``M = D P D``, ``P = W^T W``, has (Schur / Gershgorin with weights ``1/d``) spectral radius at most
  ``max_i d_i^2 sum_j |P_ij| = 1``. For a convolution the same holds with ``P`` the kernel's
  autocorrelation: ``sum_j |P_ij|`` becomes the sum over input channels ``j`` *and all shifts* of
  ``|sum_o sum_t K[o, i, t] K[o, j, t + s]|`` (the rows of the Gram matrix of the convolution
  operator), for any input size and zero padding; a stride subsamples the output (1-Lipschitz).
* **MaxMin** activation (GroupSort with groups of 2): the channels are split in halves ``(a, b)`` and
  mapped to ``(max(a, b), min(a, b))``: a permutation of each pair, so 1-Lipschitz and
  gradient-norm preserving (unlike ReLU, it does not shrink gradients).
* no normalisation layer (BatchNorm is an unconstrained affine map in eval mode); spatial
  downsampling by strided AOL convolutions, then Flatten and an AOL linear layer.

The Lipschitz rules (the ``sound`` certifier uses the exact constant 1 for these layers; CROWN treats
AOL layers as affine through the same rule) are registered below, next to the layers; MaxMin's CROWN
relaxation is registered with the other relaxations in :mod:`mmrobust.certify.crown_layers`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.data.base import ModalitySpec
from mmrobust.errors import ConfigError
from mmrobust.layer_rules import Unit, register_layer
from mmrobust.models.encoders import ENCODERS

#: relative pad on the constant 1 of an AOL layer: the model computes its rescaling in float32
AOL_PAD = 1e-5


def aol_scale(weight: torch.Tensor) -> torch.Tensor:
    """AOL's ``d`` per input channel for a Linear ``(out, in)`` or Conv ``(out, in, *k)`` weight."""
    if weight.ndim == 2:
        gram = weight.T @ weight
        return gram.abs().sum(1).clamp_min(1e-12).rsqrt()
    k = weight.shape[2:]
    wt = weight.transpose(0, 1)  # (in, out, *k): autocorrelation over all shifts, summed over outputs
    conv = F.conv1d if weight.ndim == 3 else F.conv2d
    auto = conv(wt, wt, padding=tuple(s - 1 for s in k))  # (in, in, *(2k - 1))
    return auto.abs().flatten(1).sum(1).clamp_min(1e-12).rsqrt()


class _AOL(nn.Module):
    """Shared by the AOL layers: a free weight, used rescaled as ``W diag(d)``."""

    weight: nn.Parameter
    bias: nn.Parameter

    def rescaled(self) -> torch.Tensor:
        w = self.weight
        if w.ndim == 2 and w.shape[1] > w.shape[0]:
            # a wide matrix: rescale its rows instead (AOL on W^T; ||D W|| = ||W^T D||), so the Gram
            # matrix is out x out rather than in x in (a 128 x 3136 layer: 16k instead of 9.8M entries)
            return aol_scale(w.T)[:, None] * w
        return w * aol_scale(w).view(1, -1, *([1] * (w.ndim - 2)))


class AOLLinear(_AOL):
    """1-Lipschitz linear layer ``x -> W diag(d) x + b`` (AOL)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        lin = nn.Linear(in_features, out_features)  # its initialisation
        self.weight, self.bias = nn.Parameter(lin.weight.detach()), nn.Parameter(lin.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rescaled(), self.bias)


class _AOLConv(_AOL):
    dims = 2

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        conv = (nn.Conv1d if self.dims == 1 else nn.Conv2d)(cin, cout, kernel, stride=stride, padding=padding)
        self.weight = nn.Parameter(conv.weight.detach())
        self.bias = nn.Parameter(conv.bias.detach() if conv.bias is not None else torch.zeros(cout))
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, self.rescaled(), self.bias, self.stride, self.padding)


class AOLConv1d(_AOLConv):
    """1-Lipschitz 1-d convolution (AOL rescaling, zero padding, any stride)."""

    dims = 1


class AOLConv2d(_AOLConv):
    """1-Lipschitz 2-d convolution (AOL rescaling, zero padding, any stride)."""

    dims = 2


class MaxMin(nn.Module):
    """``(a, b) -> (max(a, b), min(a, b))`` over the two halves of the channel axis (axis 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


def _even(n: int) -> int:
    return n + n % 2  # MaxMin pairs channels


@ENCODERS.register("lip-mlp")
class LipschitzMLP(nn.Sequential):
    """1-Lipschitz two-layer MLP for vectors (any shape is flattened)."""

    def __init__(self, spec: ModalitySpec, feature_dim: int = 128, hidden: int = 256) -> None:
        d = 1
        for s in spec.shape:
            d *= s
        super().__init__(nn.Flatten(), AOLLinear(d, hidden), MaxMin(), AOLLinear(hidden, feature_dim))
        self.out_dim = feature_dim


@ENCODERS.register("lip-tcn")
class LipschitzTCN(nn.Sequential):
    """1-Lipschitz temporal CNN for ``(channels, length)`` sequences."""

    def __init__(self, spec: ModalitySpec, feature_dim: int = 128, width: int = 64) -> None:
        if spec.kind != "sequence":
            raise ConfigError(f"encoder 'lip-tcn' needs a sequence modality, '{spec.name}' is {spec.kind}")
        c, n = spec.shape
        w = _even(width)
        n2 = (n - 1) // 2 + 1  # length after the stride-2 layer (kernel 5, padding 2)
        super().__init__(
            AOLConv1d(c, w, 5, padding=2), MaxMin(),
            AOLConv1d(w, 2 * w, 5, stride=2, padding=2), MaxMin(),
            nn.Flatten(), AOLLinear(2 * w * n2, feature_dim),
        )  # fmt: skip
        self.out_dim = feature_dim


@ENCODERS.register("lip-cnn")
class LipschitzCNN(nn.Sequential):
    """1-Lipschitz CNN for small ``(C, H, W)`` images: two stride-2 AOL convs, then an AOL linear."""

    def __init__(self, spec: ModalitySpec, feature_dim: int = 128, width: int = 32) -> None:
        if spec.kind not in ("image", "spectrogram"):
            raise ConfigError(f"encoder 'lip-cnn' needs an image modality, '{spec.name}' is {spec.kind}")
        c, h, wd = spec.shape
        w = _even(width)
        size = ((h - 1) // 2 // 2 + 1) * ((wd - 1) // 2 // 2 + 1)  # two stride-2 layers (kernel 3, padding 1)
        super().__init__(
            AOLConv2d(c, w, 3, padding=1), MaxMin(),
            AOLConv2d(w, 2 * w, 3, stride=2, padding=1), MaxMin(),
            AOLConv2d(2 * w, 2 * w, 3, stride=2, padding=1), MaxMin(),
            nn.Flatten(), AOLLinear(2 * w * size, feature_dim),
        )  # fmt: skip
        self.out_dim = feature_dim


# --- SLL: SDP-based Lipschitz layers (Araujo et al., ICLR 2023) ---


def abs_gram(weight: torch.Tensor) -> torch.Tensor:
    """``|V V^T|`` summed over all shifts, ``(h, h)``, for the map ``V`` of a Linear ``(h, d)`` or Conv
    ``(h, d, *k)`` weight (for a convolution: the autocorrelation of the kernel over the input channels
    and every shift, the Gram matrix of the convolution on the infinite signal, entry by entry in
    absolute value before summing over shifts)."""
    if weight.ndim == 2:
        return (weight @ weight.T).abs()
    conv = F.conv1d if weight.ndim == 3 else F.conv2d
    auto = conv(weight, weight, padding=tuple(s - 1 for s in weight.shape[2:]))  # (h, h, *(2k - 1))
    return auto.abs().flatten(2).sum(2)


def sll_scale(weight: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """SLL's ``t_i = sum_j |V V^T|_ij q_j / q_i`` (``q = exp(log_q)``), the diagonal of ``T``."""
    q = log_q.exp()
    return ((abs_gram(weight) @ q) / q).clamp_min(1e-12)


class _SLL(nn.Module):
    """Shared by the SLL layers: ``x -> x - 2 V^T T^(-1) relu(V x + b)``.

    Why it is 1-Lipschitz (Araujo et al., 2023, Theorem 3): the Jacobian is ``I - 2 V^T T^(-1) S V``
    with ``S`` diagonal in [0, 1]; it is a contraction whenever ``T - V V^T`` is positive
    semi-definite, and ``T = diag(t)`` with ``t`` as in :func:`sll_scale` is: ``Q^(-1) (T - V V^T) Q``
    (``Q = diag(q)``) is diagonally dominant with a positive diagonal (Gershgorin). For a convolution
    with zero padding ``V = P C E`` (``E`` embeds the input into the infinite signal, ``C`` the
    infinite convolution, ``P`` keeps the output positions); ``V V^T <= P C C^T P^T``, a principal
    submatrix of ``C C^T``, whose rows are the shifted autocorrelations summed in :func:`abs_gram`,
    and ``V^T`` is exactly the transposed convolution with the same padding.
    """

    weight: nn.Parameter
    bias: nn.Parameter
    log_q: nn.Parameter

    def scale(self) -> torch.Tensor:
        """``t`` (the diagonal of ``T``), one entry per hidden channel."""
        return sll_scale(self.weight, self.log_q)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def outer(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.scale().view(1, -1, *([1] * (x.ndim - 2)))
        return x - 2 * self.outer(F.relu(self.inner(x)) / t)


class SLLLinear(_SLL):
    """1-Lipschitz residual dense layer on ``features`` channels with ``hidden`` inner units (SLL)."""

    def __init__(self, features: int, hidden: int | None = None) -> None:
        super().__init__()
        lin = nn.Linear(features, hidden or features)
        self.weight, self.bias = nn.Parameter(lin.weight.detach()), nn.Parameter(lin.bias.detach())
        self.log_q = nn.Parameter(torch.zeros(hidden or features))

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def outer(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight


class _SLLConv(_SLL):
    dims = 2

    def __init__(self, channels: int, kernel: int = 3, hidden: int | None = None) -> None:
        super().__init__()
        if kernel % 2 == 0:
            raise ConfigError(f"SLL convolution: kernel must be odd (same-size output), got {kernel}", param="kernel")
        hidden = hidden or channels
        conv = (nn.Conv1d if self.dims == 1 else nn.Conv2d)(channels, hidden, kernel, padding=kernel // 2)
        self.weight = nn.Parameter(conv.weight.detach())
        self.bias = nn.Parameter(conv.bias.detach() if conv.bias is not None else torch.zeros(hidden))
        self.log_q = nn.Parameter(torch.zeros(hidden))
        self.padding = kernel // 2

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(x, self.weight, self.bias, padding=self.padding)

    def outer(self, h: torch.Tensor) -> torch.Tensor:
        conv_t = F.conv_transpose1d if self.dims == 1 else F.conv_transpose2d
        return conv_t(h, self.weight, padding=self.padding)


class SLLConv1d(_SLLConv):
    """1-Lipschitz residual 1-d convolution (SLL; stride 1, zero padding, odd kernel)."""

    dims = 1


class SLLConv2d(_SLLConv):
    """1-Lipschitz residual 2-d convolution (SLL; stride 1, zero padding, odd kernel)."""

    dims = 2


@ENCODERS.register("sll-mlp")
class SLLMLP(nn.Sequential):
    """1-Lipschitz MLP for vectors: an AOL linear lift, ``depth`` SLL dense layers, an AOL linear."""

    def __init__(self, spec: ModalitySpec, feature_dim: int = 128, hidden: int = 256, depth: int = 4) -> None:
        d = 1
        for s in spec.shape:
            d *= s
        super().__init__(nn.Flatten(), AOLLinear(d, hidden), *[SLLLinear(hidden) for _ in range(depth)],
                         AOLLinear(hidden, feature_dim))  # fmt: skip
        self.out_dim = feature_dim


@ENCODERS.register("sll-tcn")
class SLLTCN(nn.Sequential):
    """1-Lipschitz temporal CNN: AOL conv lift, SLL convs, a stride-2 AOL conv, SLL convs, SLL dense."""

    def __init__(
        self, spec: ModalitySpec, feature_dim: int = 128, width: int = 32, depth: int = 2, dense: int = 256
    ) -> None:
        if spec.kind != "sequence":
            raise ConfigError(f"encoder 'sll-tcn' needs a sequence modality, '{spec.name}' is {spec.kind}")
        c, n = spec.shape
        n2 = (n - 1) // 2 + 1  # length after the stride-2 layer (kernel 3, padding 1)
        super().__init__(
            AOLConv1d(c, width, 3, padding=1), *[SLLConv1d(width) for _ in range(depth)],
            AOLConv1d(width, 2 * width, 3, stride=2, padding=1), *[SLLConv1d(2 * width) for _ in range(depth)],
            nn.Flatten(), AOLLinear(2 * width * n2, dense), *[SLLLinear(dense) for _ in range(depth)],
            AOLLinear(dense, feature_dim),
        )  # fmt: skip
        self.out_dim = feature_dim


@ENCODERS.register("sll-cnn")
class SLLCNN(nn.Sequential):
    """1-Lipschitz CNN for small images: AOL lift, SLL convs, two stride-2 AOL convs with SLL convs
    after each, then SLL dense layers and an AOL linear."""

    def __init__(
        self, spec: ModalitySpec, feature_dim: int = 128, width: int = 16, depth: int = 2, dense: int = 256
    ) -> None:
        if spec.kind not in ("image", "spectrogram"):
            raise ConfigError(f"encoder 'sll-cnn' needs an image modality, '{spec.name}' is {spec.kind}")
        c, h, wd = spec.shape
        w = width
        size = ((h - 1) // 2 // 2 + 1) * ((wd - 1) // 2 // 2 + 1)  # two stride-2 layers (kernel 3, padding 1)
        super().__init__(
            AOLConv2d(c, w, 3, padding=1), *[SLLConv2d(w) for _ in range(depth)],
            AOLConv2d(w, 2 * w, 3, stride=2, padding=1), *[SLLConv2d(2 * w) for _ in range(depth)],
            AOLConv2d(2 * w, 4 * w, 3, stride=2, padding=1), *[SLLConv2d(4 * w) for _ in range(depth)],
            nn.Flatten(), AOLLinear(4 * w * size, dense), *[SLLLinear(dense) for _ in range(depth)],
            AOLLinear(dense, feature_dim),
        )  # fmt: skip
        self.out_dim = feature_dim


LIPSCHITZ_ENCODERS = {"vector": "lip-mlp", "sequence": "lip-tcn", "image": "lip-cnn", "spectrogram": "lip-cnn"}


def lipschitz_encoder(spec: ModalitySpec) -> str:
    """The 1-Lipschitz encoder for a modality's kind (video has none)."""
    if spec.kind not in LIPSCHITZ_ENCODERS:
        raise ConfigError(
            f"lipschitz_encoders: no 1-Lipschitz encoder for modality '{spec.name}' of kind {spec.kind}; "
            f"supported kinds: {', '.join(LIPSCHITZ_ENCODERS)}",
            param="lipschitz_encoders",
        )
    return LIPSCHITZ_ENCODERS[spec.kind]


# --- bound rules (the extension point of mmrobust.layer_rules) ---


def _aol_units(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    """An AOL layer is the affine map with weight ``W diag(d)`` and Lipschitz constant 1 (proof above)."""
    w = layer.rescaled().detach().double()
    if isinstance(layer, AOLLinear):
        fn, abs_fn, sq_fn = (partial(F.linear, weight=v) for v in (w, w.abs(), w**2))
    else:
        conv = F.conv1d if layer.dims == 1 else F.conv2d
        kw = {"stride": layer.stride, "padding": layer.padding}
        fn, abs_fn, sq_fn = (partial(conv, weight=v, **kw) for v in (w, w.abs(), w**2))
    with torch.no_grad():
        out_shape = tuple(fn(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])
    bias = layer.bias.detach().double()
    offset = bias.view(-1, *([1] * (len(out_shape) - 1))).expand(out_shape).clone()
    return [Unit(name, "linear", 1.0 + AOL_PAD, in_shape, out_shape, fn, abs_fn, sq_fn, offset)]


def _maxmin_units(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    if in_shape[0] % 2:
        raise ConfigError(f"MaxMin layer '{name}' needs an even number of channels, got {in_shape[0]}")
    return [Unit(name, "other", 1.0, in_shape, in_shape, layer)]


register_layer(AOLLinear, AOLConv1d, AOLConv2d, lipschitz=_aol_units)
register_layer(MaxMin, lipschitz=_maxmin_units)


def sll_parts(name: str, layer: Any, in_shape: tuple[int, ...]) -> tuple[Unit, Unit]:
    """An SLL layer as ``x + outer(relu(inner(x)))``: the affine ``inner`` (``V x + b``) and the linear
    ``outer`` (``-2 V^T T^(-1)``) as float64 ``"linear"`` units (CROWN composes them around a ReLU).

    Their Lipschitz constants: ``||V|| <= sqrt(max t)`` (``V V^T <= T``) and
    ``||V^T T^(-1)|| <= ||V^T T^(-1/2)|| ||T^(-1/2)|| <= 1 / sqrt(min t)``, padded for rounding.
    """
    w = layer.weight.detach().double()
    t = layer.scale().detach().double()
    bias = layer.bias.detach().double()
    if isinstance(layer, SLLLinear):
        fn_in, abs_in, sq_in = (partial(F.linear, weight=v) for v in (w, w.abs(), w**2))
        o = -2 * w.T / t  # (d, h)
        fn_out, abs_out, sq_out = (partial(F.linear, weight=v) for v in (o, o.abs(), o**2))
    else:
        conv = F.conv1d if layer.dims == 1 else F.conv2d
        conv_t = F.conv_transpose1d if layer.dims == 1 else F.conv_transpose2d
        kw = {"padding": layer.padding}
        fn_in, abs_in, sq_in = (partial(conv, weight=v, **kw) for v in (w, w.abs(), w**2))
        o = -2 * w / t.view(-1, *([1] * (w.ndim - 1)))  # per hidden channel (the transposed conv's input)
        fn_out, abs_out, sq_out = (partial(conv_t, weight=v, **kw) for v in (o, o.abs(), o**2))
    with torch.no_grad():
        hid_shape = tuple(fn_in(torch.zeros(1, *in_shape, dtype=torch.float64)).shape[1:])
    offset = bias.view(-1, *([1] * (len(hid_shape) - 1))).expand(hid_shape).clone()
    pad = 1 + AOL_PAD
    lip_in, lip_out = float(t.max().sqrt()) * pad, 2 * float(t.min().rsqrt()) * pad
    zero = torch.zeros(in_shape, dtype=torch.float64)
    return (
        Unit(name + ".inner", "linear", lip_in, in_shape, hid_shape, fn_in, abs_in, sq_in, offset),
        Unit(name + ".outer", "linear", lip_out, hid_shape, in_shape, fn_out, abs_out, sq_out, zero),
    )


def _sll_units(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    """An SLL layer is 1-Lipschitz (proof in :class:`_SLL`); the model computes ``T`` in float32."""
    first, second = sll_parts(name, layer, in_shape)
    bias = first.offset
    assert bias is not None

    def fn(x: torch.Tensor) -> torch.Tensor:
        return x + second.fn(F.relu(first.fn(x) + bias))

    return [Unit(name, "other", 1.0 + AOL_PAD, in_shape, in_shape, fn)]


register_layer(
    SLLLinear, SLLConv1d, SLLConv2d, lipschitz=_sll_units
)  # CROWN: _sll_rule in certify/crown_layers.py  # its CROWN relaxation: MaxMinOp in certify/crown_layers.py
