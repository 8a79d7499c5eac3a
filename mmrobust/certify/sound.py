"""Sound (guaranteed) l2 Lipschitz upper bounds for encoders, composed layer by layer (see docs/certify.md).

Every bound below is a true upper bound on the l2 -> l2 Lipschitz constant of the layer *for the
input shape it actually sees* (the shape is tracked by running the layer on zeros). The encoder's
bound is the product over a chain (``Lip(f o g) <= Lip(f) Lip(g)``) and ``Lip(F) + Lip(S)`` for a
residual block ``F(x) + S(x)``. Loose, but a real certificate.

Per-layer bounds and why they hold:

* ``Linear``: its exact spectral norm (SVD in float64), padded by ``SVD_PAD`` for rounding.
* ``Conv1d``/``Conv2d``: a guaranteed upper bound on the operator norm of the convolution *with the
  true input size, stride, padding, dilation and groups* (see :func:`conv_operator_bound`). Not the
  norm of the reshaped kernel matrix, which is not a bound on the operator.
* ``BatchNorm`` in eval mode is the affine map ``x_c -> g_c x_c + b_c`` with
  ``g_c = gamma_c / sqrt(var_c + eps)``: Lipschitz ``max_c |g_c|``. When it directly follows a
  ``Linear``/``Conv`` it is fused into that layer's weight (``W'_c = g_c W_c``) — the composition
  is exactly that linear map, so its norm is a valid and much tighter bound than the product.
* ``ReLU``/``Tanh``/``LeakyReLU``(|slope| <= 1)/``ELU``(alpha <= 1): 1; ``Sigmoid``: 1/4;
  ``GELU``: 1.13 (sup |gelu'| = 1.1289); ``SiLU``: 1.10 (sup |silu'| = 1.0998).
* ``Flatten``/``Identity``/``Dropout`` (eval mode): 1.
* ``MaxPool``: ``sqrt(w)`` with ``w`` the most windows one input can fall in. Proof: for one window
  ``|max a_W - max b_W| <= max |a_W - b_W| <= ||a_W - b_W||_2``; squaring and summing over windows
  counts every input at most ``w`` times. Non-overlapping pools (kernel == stride) give 1; the
  ResNet stem (kernel 3, stride 2) gives ``sqrt(2 * 2) = 2`` in 2-D.
* ``AvgPool``/``AdaptiveAvgPool``: a linear map with nonnegative entries; Schur's test gives
  ``||P||^2 <= max row sum * max column sum``, both computed exactly for the input shape (global
  average pooling over ``n`` positions gives ``1/sqrt(n)``).
* ``BasicBlock`` (ResNet): ``relu(F(x) + S(x))`` -> ``Lip(F) + Lip(S)``.
* ``ResNet18`` on video: frames are encoded separately and averaged over ``T``:
  ``||(1/T) sum_t (g(x_t) - g(x'_t))|| <= (L/T) sum_t ||d_t|| <= (L / sqrt(T)) ||d||``.

Anything else raises a :class:`ConfigError` naming the layer: the sound bound never guesses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.certify.graph import EncoderGraph, GraphNode, Reduce, Region, Reshape, Scale, evaluate, trace_graph
from mmrobust.certify.graph import refuse as refuse_node
from mmrobust.certify.linear_maps import vjp
from mmrobust.errors import ConfigError
from mmrobust.layer_rules import Unit, find_rule, register_layer
from mmrobust.models.encoders import BasicBlock, ResNet18

#: Relative pad on norms obtained from an SVD (float64) to cover rounding.
SVD_PAD = 1e-6

_ACTIVATION_LIP: dict[type[nn.Module], float] = {
    nn.ReLU: 1.0,
    nn.Tanh: 1.0,
    nn.Sigmoid: 0.25,
    nn.GELU: 1.13,
    nn.SiLU: 1.10,
    nn.Hardswish: 1.5,
}
#: activations whose derivative lies in [0, 1] everywhere (used by the row-aware bound)
_MONOTONE_CONTRACTIVE = (nn.ReLU, nn.Tanh, nn.Sigmoid)
_NEUTRAL = (nn.Flatten, nn.Identity, nn.Dropout, Reshape)
_CONV = (nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_MAX = (nn.MaxPool1d, nn.MaxPool2d)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Batched LAPACK calls (eigvalsh/svd) on a busy machine are ~100x slower with several threads
    (measured: 8 s vs 0.07 s for 60 Hermitian 64x64 matrices on 2 shared cores); run them on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _tup(v: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, tuple | list) else (int(v),) * n


def spectral_norm(weight: torch.Tensor) -> float:
    """Exact largest singular value of a matrix (float64 SVD), padded by :data:`SVD_PAD`."""
    w = weight.detach().double().flatten(1) if weight.ndim > 2 else weight.detach().double()
    with _one_thread():
        return float(torch.linalg.matrix_norm(w, ord=2)) * (1 + SVD_PAD)


def bn_scale(bn: Any) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)`` of a BatchNorm in eval mode (its linear part)."""
    if bn.running_var is None:
        raise ConfigError(
            f"sound Lipschitz bound: {type(bn).__name__} without running statistics uses batch statistics, "
            "which is not a fixed map; build it with track_running_stats=True"
        )
    g = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        g = g * bn.weight.detach().double()
    return g


def conv_operator_bound(
    weight: torch.Tensor,
    input_shape: tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
) -> float:
    """Guaranteed upper bound on ``||conv||_2`` for inputs of shape ``(C, *spatial)``.

    Why it holds: write the strided zero-padded convolution as a stride-1 correlation over the
    *polyphase* components of the zero-padded input (entry ``s*i + r`` goes to channel ``r``,
    position ``i``; the kernel is regrouped the same way). The map ``x -> polyphase(pad(x))`` is
    an isometry (every entry of ``x`` lands exactly once, the rest are zeros). Every output of the
    true layer equals an output of the *circular* stride-1 correlation on a grid of the polyphase
    length ``L`` (the indices it reads never wrap, see the comment below), so the layer is
    ``crop o circ o isometry`` and ``||conv|| <= ||circ||``. A circular convolution is
    block-diagonalised by the DFT: ``||circ|| = max_w ||K^(w)||_2`` over the ``L``-point frequency
    grid, computed exactly by an SVD per frequency (float64), padded by :data:`SVD_PAD`.
    Dilation is handled by spreading the kernel with zeros; groups give a block-diagonal operator
    (norm = max over groups).
    """
    w = weight.detach().double()
    d = w.ndim - 2
    if d not in (1, 2):
        raise ConfigError(f"sound Lipschitz bound supports 1-d and 2-d convolutions, got a {d}-d kernel")
    spatial = tuple(int(s) for s in input_shape[1:])
    stride, dilation = _tup(stride, d), _tup(dilation, d)
    k = tuple(w.shape[2:])
    if isinstance(padding, str):
        # 'valid' pads nothing; for 'same' we assume the full d*(k-1) on both sides, which only
        # enlarges the grid below (a larger circular grid is still a valid bound)
        padding = tuple(0 if padding == "valid" else dilation[i] * (k[i] - 1) for i in range(d))
    padding = _tup(padding, d)
    if any(dl > 1 for dl in dilation):  # spread the kernel: a dilated kernel is a sparse ordinary one
        spread = torch.zeros(*w.shape[:2], *[dilation[i] * (k[i] - 1) + 1 for i in range(d)], dtype=w.dtype)
        spread[(slice(None), slice(None), *[slice(None, None, dilation[i]) for i in range(d)])] = w
        w = spread
        k = tuple(w.shape[2:])
    # polyphase regrouping: kernel tap t = q*s + r -> channel r, tap q (pad taps to a multiple of s)
    kq = tuple(math.ceil(k[i] / stride[i]) for i in range(d))
    w = F.pad(w, [p for i in reversed(range(d)) for p in (0, kq[i] * stride[i] - k[i])])
    co, ci = w.shape[:2]
    if d == 1:
        w = w.view(co, ci, kq[0], stride[0]).permute(0, 1, 3, 2).reshape(co, ci * stride[0], kq[0])
    else:
        w = w.view(co, ci, kq[0], stride[0], kq[1], stride[1]).permute(0, 1, 3, 5, 2, 4)
        w = w.reshape(co, ci * stride[0] * stride[1], kq[0], kq[1])
    # Polyphase length of the zero-padded input. The true layer reads padded index s*i + t with
    # t < k for output i <= (n + 2p - k)//s, i.e. polyphase index i + q <= (n + 2p - 1)//s < L: no wrap.
    grid = [max(kq[i], math.ceil((spatial[i] + 2 * padding[i]) / stride[i])) for i in range(d)]
    # a real kernel has K^(-w) = conj(K^(w)) (same singular values): the half spectrum of rfftn suffices
    spec = torch.fft.rfftn(w, s=grid, dim=tuple(range(2, 2 + d)))  # (co, ci', *half grid)
    spec = spec.flatten(2).permute(2, 0, 1)  # (freq, co, ci')
    # groups: output block g reads only its own input channels (the kernel's in-channel axis), so the
    # operator is block-diagonal up to a permutation and its norm is the max over groups
    co_g = co // groups
    best = 0.0
    for g in range(groups):
        block = spec[:, g * co_g : (g + 1) * co_g, :]
        # sigma_max^2 = largest eigenvalue of the smaller Hermitian Gram matrix (much faster than an SVD)
        gram = block @ block.mH if block.shape[1] <= block.shape[2] else block.mH @ block
        with _one_thread():
            top = torch.linalg.eigvalsh(gram)[:, -1]
        best = max(best, float(top.max().clamp_min(0.0)) ** 0.5)
    return best * (1 + SVD_PAD)


def conv_power_iteration(
    fn: Callable[[torch.Tensor], torch.Tensor],
    input_shape: tuple[int, ...],
    iters: int = 200,
    tol: float = 1e-7,
    seed: int = 0,
) -> float:
    """Power-iteration *estimate* (a lower bound) of the norm of the linear part of ``fn``.

    Runs on the operator itself (true shape, stride and padding) until the estimate changes by
    less than ``tol`` (relative). Used to show how tight :func:`conv_operator_bound` is; never used
    as a certificate, since power iteration approaches the norm from below.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *input_shape, generator=gen, dtype=torch.float64)
    zero = torch.zeros(1, *input_shape, dtype=torch.float64)
    with torch.no_grad():
        offset = fn(zero)
    est = 0.0
    for _ in range(iters):
        x = x / x.norm()
        xr = x.clone().requires_grad_(True)
        y = fn(xr) - offset
        (g,) = torch.autograd.grad(y, xr, y.detach())  # A^T A x
        new = float(g.norm()) ** 0.5
        x = g.detach()
        if abs(new - est) <= tol * max(new, 1e-30):
            est = new
            break
        est = new
    return est


def _schur_bound(fn: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...]) -> float:
    """``sqrt(max row sum * max column sum)`` of a linear map with nonnegative entries (Schur test)."""
    x = torch.ones(1, *input_shape, dtype=torch.float64, requires_grad=True)
    y = fn(x)
    rows = y.detach().max()
    (cols,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return float(torch.sqrt(rows * cols.max()))


def _max_pool_windows(pool: Any, d: int) -> int:
    """Most windows one input position can fall in (per dim ``floor((k-1)*dil/s) + 1``, multiplied)."""
    k, s = _tup(pool.kernel_size, d), _tup(pool.stride or pool.kernel_size, d)
    dil = _tup(pool.dilation, d)
    return math.prod((k[i] - 1) * dil[i] // s[i] + 1 for i in range(d))


def _out_shape(
    fn: Callable[[torch.Tensor], torch.Tensor], in_shape: tuple[int, ...], dtype: torch.dtype = torch.float64
) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(fn(torch.zeros(1, *in_shape, dtype=dtype)).shape[1:])


def _affine_unit(name: str, layer: Any, bn: Any, in_shape: tuple[int, ...]) -> Unit:
    """Linear/Conv (+ a BatchNorm fused into it), as the float64 affine map it computes."""
    w = layer.weight.detach().double()
    scale = bn_scale(bn) if bn is not None else torch.ones(w.shape[0], dtype=torch.float64)
    wf = w * scale.view(-1, *([1] * (w.ndim - 1)))
    # offset per output channel: scale * (b - mean) + beta for a fused BN, else the bias
    shift = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        shift = scale * (shift - bn.running_mean.detach().double())
        if bn.bias is not None:
            shift = shift + bn.bias.detach().double()
    fn: Callable[[torch.Tensor], torch.Tensor]
    if isinstance(layer, nn.Linear):
        fn, abs_fn, sq_fn = (partial(F.linear, weight=v) for v in (wf, wf.abs(), wf**2))
        lip = spectral_norm(wf)
    else:
        if layer.padding_mode != "zeros":
            raise ConfigError(
                f"sound Lipschitz bound: {name} uses padding_mode='{layer.padding_mode}', only 'zeros' is supported"
            )
        conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
        kw = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
        fn, abs_fn, sq_fn = (partial(conv, weight=v, **kw) for v in (wf, wf.abs(), wf**2))
        lip = conv_operator_bound(wf, in_shape, layer.stride, layer.padding, layer.dilation, layer.groups)
    label = name + ("+bn" if bn is not None else "")
    out_shape = _out_shape(fn, in_shape)
    offset = shift.view(-1, *([1] * (len(out_shape) - 1))).expand(out_shape).clone()
    return Unit(label, "linear", lip, in_shape, out_shape, fn, abs_fn, sq_fn, offset)


def _affine_rule(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    return [_affine_unit(name, layer, None, in_shape)]


def _bn_rule(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    g = bn_scale(layer)
    view = (1, -1) + (1,) * (len(in_shape) - 1)
    fn, abs_fn, sq_fn = (partial(torch.mul, other=v.view(view)) for v in (g, g.abs(), g**2))
    shift = -g * layer.running_mean.detach().double()
    if layer.bias is not None:
        shift = shift + layer.bias.detach().double()
    offset = shift.view(view[1:]).expand(in_shape).clone()
    lip = float(g.abs().max()) * (1 + SVD_PAD)
    return [Unit(name, "linear", lip, in_shape, in_shape, fn, abs_fn, sq_fn, offset)]


def _neutral_rule(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    out_shape = _out_shape(layer, in_shape)
    zero = torch.zeros(out_shape, dtype=torch.float64)
    return [Unit(name, "linear", 1.0, in_shape, out_shape, layer, layer, layer, zero)]


def _avg_rule(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    out_shape = _out_shape(layer, in_shape)
    lip = _schur_bound(layer, in_shape) * (1 + SVD_PAD)
    return [
        Unit(name, "linear", lip, in_shape, out_shape, layer, layer, None, torch.zeros(out_shape, dtype=torch.float64))
    ]


def _max_rule(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    d = 1 if isinstance(layer, nn.MaxPool1d) else 2
    lip = math.sqrt(_max_pool_windows(layer, d))
    return [Unit(name, "other", lip, in_shape, _out_shape(layer, in_shape), layer)]


def _leaky_rule(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    slope = float(layer.negative_slope)
    kind = "act" if 0.0 <= slope <= 1.0 else "other"
    return [Unit(name, kind, max(1.0, abs(slope)), in_shape, in_shape, layer)]


def _elu_rule(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    # elu' is alpha e^x (x < 0) or 1: in [0, 1] when 0 <= alpha <= 1
    alpha = float(layer.alpha)
    return [Unit(name, "act" if 0.0 <= alpha <= 1.0 else "other", max(1.0, abs(alpha)), in_shape, in_shape, layer)]


def _softplus_rule(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    # softplus' = sigmoid(beta x) in (0, 1) for beta > 0 (torch switches to x above the threshold: a
    # step of log1p(exp(-threshold)) / beta, 2e-9 by default, that no Lipschitz bound covers)
    if float(layer.beta) <= 0:
        raise ConfigError(f"sound Lipschitz bound: Softplus '{name}' needs beta > 0, got {layer.beta}")
    return [Unit(name, "act", 1.0, in_shape, in_shape, layer)]


def _scale_rule(name: str, layer: Scale, in_shape: tuple[int, ...]) -> list[Unit]:
    """``x * scale + shift`` (a traced ``x * c``, ``x - mean``, ``-x``): a diagonal affine map."""
    s = layer.scale
    fn, abs_fn, sq_fn = (partial(torch.mul, other=v) for v in (s, s.abs(), s**2))
    lip = float(s.abs().max()) * (1 + SVD_PAD) if s.numel() else 0.0
    return [Unit(name, "linear", lip, in_shape, in_shape, fn, abs_fn, sq_fn, layer.shift.clone())]


def _activation_rule(lip: float, kind: str) -> Callable[[str, Any, tuple[int, ...]], list[Unit]]:
    def rule(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
        return [Unit(name, kind, lip, in_shape, in_shape, layer)]

    return rule


def _basic_block_rule(name: str, module: BasicBlock, in_shape: tuple[int, ...]) -> list[Unit]:
    # relu(F(x) + S(x)): Lip <= Lip(F) + Lip(S); the final ReLU is 1-Lipschitz
    body = nn.Sequential(module.conv1, module.bn1, module.relu, module.conv2, module.bn2)
    lip_f = chain_lipschitz(chain_units(body, in_shape, name + ".F"))
    lip_s = chain_lipschitz(chain_units(nn.Sequential(module.shortcut), in_shape, name + ".shortcut"))
    out_shape = _out_shape(module, in_shape, next(module.parameters()).dtype)
    return [Unit(name, "other", lip_f + lip_s, in_shape, out_shape, module)]


def _resnet_rule(name: str, module: ResNet18, in_shape: tuple[int, ...]) -> list[Unit]:
    frame = in_shape[1:] if module.video else in_shape
    inner = chain_units(nn.Sequential(module.stem, module.layers, module.pool), frame, name)
    lip = chain_lipschitz(inner)
    if module.video:  # mean over T independently encoded frames: L / sqrt(T)
        lip /= math.sqrt(in_shape[0])
    return [Unit(name, "other", lip, in_shape, inner[-1].out_shape, module)]


register_layer(nn.Linear, *_CONV, lipschitz=_affine_rule)
register_layer(*_BN, lipschitz=_bn_rule)
register_layer(*_NEUTRAL, lipschitz=_neutral_rule)
register_layer(*_AVG, Reduce, lipschitz=_avg_rule)
register_layer(Scale, lipschitz=_scale_rule)
register_layer(nn.Softplus, lipschitz=_softplus_rule)
register_layer(*_MAX, lipschitz=_max_rule)
register_layer(nn.LeakyReLU, lipschitz=_leaky_rule)
register_layer(nn.ELU, lipschitz=_elu_rule)
for _cls, _lip in _ACTIVATION_LIP.items():
    register_layer(_cls, lipschitz=_activation_rule(_lip, "act" if _cls in _MONOTONE_CONTRACTIVE else "other"))
register_layer(BasicBlock, lipschitz=_basic_block_rule)
register_layer(ResNet18, lipschitz=_resnet_rule)


def sequential_parts(module: nn.Sequential, prefix: str) -> Iterator[tuple[str, nn.Module, nn.Module | None]]:
    """``(name, layer, bn)`` for the children of ``module``; a Linear/Conv directly followed by a
    BatchNorm comes with that BatchNorm (fused into one affine map), otherwise ``bn`` is None."""
    children = list(module.named_children())
    i = 0
    while i < len(children):
        cname, child = children[i]
        full = f"{prefix}.{cname}" if prefix else cname
        nxt = children[i + 1][1] if i + 1 < len(children) else None
        bn = nxt if isinstance(child, (nn.Linear, *_CONV)) and isinstance(nxt, _BN) else None
        yield full, child, bn
        i += 2 if bn is not None else 1


def chain_units(module: nn.Module, in_shape: tuple[int, ...], prefix: str = "") -> list[Unit]:
    """Decompose ``module`` into a chain of :class:`Unit` s whose product bounds its Lipschitz constant.

    A module with a rule in :data:`~mmrobust.layer_rules.LAYER_RULES` is its rule's units (residual
    blocks and ResNets become single ``"other"`` units with their own composed bound). Any other
    module is traced (:func:`mmrobust.certify.graph.trace_graph`): its graph is a chain of layers
    (a Linear/Conv followed by a BatchNorm is fused) and of regions with sums or concatenations,
    each region one ``"other"`` unit bounded by :func:`region_lipschitz`. An ``nn.Sequential`` that
    cannot be traced is walked child by child.
    """
    shape = tuple(int(s) for s in in_shape)
    name = prefix or type(module).__name__
    rule = find_rule(module)
    if rule.lipschitz is not None:
        return rule.lipschitz(name, module, shape)
    if rule.crown is None:
        graph = trace_graph(module, shape, prefix, "sound")
        if graph is not None:
            return graph_units(graph)
        if isinstance(module, nn.Sequential):
            units: list[Unit] = []
            for full, child, bn in sequential_parts(module, prefix):
                units.extend(
                    [_affine_unit(full, child, bn, shape)] if bn is not None else chain_units(child, shape, full)
                )
                shape = units[-1].out_shape if units else shape
            return units
    raise ConfigError(
        f"the sound Lipschitz bound does not support layer '{name}' ({type(module).__name__}); "
        "use certifier='empirical', or register a bound for it with mmrobust.layer_rules.register_layer",
        param="certifier",
    )


def node_units(node: GraphNode) -> list[Unit]:
    """The units of one layer node of a traced graph (a fused BatchNorm makes one affine unit)."""
    if node.bn is not None:
        return [_affine_unit(node.name, node.layer, node.bn, node.in_shape)]
    if node.rule.lipschitz is None:
        raise refuse_node("sound", node.place, node.hint)
    return node.rule.lipschitz(node.name, node.layer, node.in_shape)


def _apply_units(units: list[Unit], x: torch.Tensor) -> torch.Tensor:
    for u in units:
        x = u.fn(x) + u.offset if u.offset is not None else u.fn(x)
    return x


def region_lipschitz(region: Region) -> tuple[float, Callable[[torch.Tensor], torch.Tensor]]:
    """A Lipschitz bound of a region and its float64 forward.

    Per node, a bound ``L_v`` on ``||v(x') - v(x)|| / ||x' - x||`` from the region's input: a layer
    multiplies its input's bound by its units' product, a signed sum ``sum s_i v_i`` has at most
    ``sum |s_i| L_i`` (triangle inequality), a concatenation ``sqrt(sum L_i^2)`` (its squared norm
    is the sum of the parts').
    """
    lips = [1.0]
    units_of: dict[int, list[Unit]] = {}
    for i, node in enumerate(region.nodes):
        ins = [lips[j] for j in node.inputs]
        if node.kind == "layer":
            units_of[i] = node_units(node)
            lips.append(chain_lipschitz(units_of[i]) * ins[0])
        elif node.kind == "add":
            lips.append(sum(abs(s) * v for s, v in zip(node.signs, ins, strict=True)))
        else:
            lips.append(math.sqrt(sum(v * v for v in ins)))
    index = {id(node): i for i, node in enumerate(region.nodes)}

    def forward(x: torch.Tensor) -> torch.Tensor:
        return evaluate(region, x, lambda node, v: _apply_units(units_of[index[id(node)]], v))

    return lips[-1], forward


def graph_units(graph: EncoderGraph) -> list[Unit]:
    """The chain of units of a traced graph: layers as their rules' units, regions as one unit each."""
    units: list[Unit] = []
    for piece in graph.pieces():
        if isinstance(piece, Region):
            lip, fn = region_lipschitz(piece)
            units.append(Unit(piece.name, "other", lip, piece.in_shape, piece.out_shape, fn))
        else:
            units.extend(node_units(piece))
    return units


def chain_lipschitz(units: list[Unit]) -> float:
    """Product of the units' bounds (``Lip(f o g) <= Lip(f) Lip(g)``)."""
    return math.prod(u.lip for u in units)


def sound_lipschitz(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Guaranteed upper bound on the l2 Lipschitz constant of ``module`` (eval mode) at ``input_shape``.

    ``input_shape`` is the per-sample shape (no batch axis). Raises :class:`ConfigError` for a layer
    the bound does not support.
    """
    was_training = module.training
    module.eval()
    try:
        return chain_lipschitz(chain_units(module, input_shape))
    finally:
        module.train(was_training)


def sound_row_lipschitz(
    module: nn.Module, input_shape: tuple[int, ...], rows: torch.Tensor, units: list[Unit] | None = None
) -> torch.Tensor:
    """Guaranteed upper bound on the Lipschitz constant of ``x -> rows_r . module(x)`` per row, ``(R,)``.

    Always ``<= ||rows_r|| * sound_lipschitz(module)`` (that is the first candidate). Tighter: walk
    back from the output keeping a vector ``v`` that dominates the back-propagated gradient ``u``
    for *every* input: through linear units exactly (``v = A^T v``) until the first activation,
    then componentwise (``|u| <= v``: an activation's derivative ``D`` lies in [0, 1], so
    ``|D u| <= |u|``, and ``|A^T u| <= |A|^T |u|``). At any point the gradient is
    ``J_prefix^T u``, so ``||grad|| <= Lip(prefix) * ||v||``; we take the smallest candidate.
    The walk stops at a max-pool, residual block or unknown unit (the spectral product covers it).
    ``units`` (from :func:`chain_units`, eval mode) saves recomputing the per-layer bounds.
    """
    was_training = module.training
    module.eval()
    try:
        units = units if units is not None else chain_units(module, input_shape)
        prefix = [1.0]
        for u in units:
            prefix.append(prefix[-1] * u.lip)
        v = rows.detach().double()
        best = v.norm(dim=1) * prefix[-1]
        exact = True
        for i in range(len(units) - 1, -1, -1):
            u = units[i]
            if u.kind == "linear" and u.abs_fn is not None:
                v = vjp(u.fn, u.in_shape, v) if exact else vjp(u.abs_fn, u.in_shape, v.abs())
            elif u.kind == "act":
                v, exact = v.abs(), False
            else:
                break
            best = torch.minimum(best, v.flatten(1).norm(dim=1) * prefix[i] * (1 + SVD_PAD))
        return best.float()
    finally:
        module.train(was_training)
