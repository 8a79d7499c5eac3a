"""Which CROWN operators a layer becomes: the rules for torch's layers and the zoo's blocks, and
:func:`build_ops`, which walks an encoder into a list of operators.

Affine layers need no rule of their own: their sound Lipschitz rule (:mod:`mmrobust.certify.sound`)
describes them exactly (``"linear"`` units with an ``offset``) and becomes an :class:`AffineOp`.
A layer without either kind of rule (see :mod:`mmrobust.layer_rules`) is a one-line error naming it.

A module without a rule of its own is traced (:mod:`mmrobust.certify.graph`): its layers become
chains of operators, its regions with sums or concatenations a :class:`GraphOp`. The activations
of :mod:`mmrobust.certify.activations` (GELU, SiLU, Tanh, Sigmoid, LeakyReLU, ELU, Softplus,
Hardswish, as modules or, through the graph, functional calls) get an :class:`ActivationOp`.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrobust.certify.activations import ActivationOp, activation_of
from mmrobust.certify.crown_ops import (
    AffineOp,
    GraphOp,
    MaxMinOp,
    MaxPoolOp,
    Op,
    ReLUOp,
    ResidualOp,
    Step,
    run_forward,
)
from mmrobust.certify.graph import EncoderGraph, GraphNode, Region, refuse, trace_graph
from mmrobust.certify.sound import _affine_unit, chain_units, sequential_parts
from mmrobust.errors import ConfigError
from mmrobust.layer_rules import find_rule, register_layer
from mmrobust.models.encoders import BasicBlock, ResNet18
from mmrobust.models.lipschitz import MaxMin


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
            f"({type(layer).__name__}) is not; use certifier='sound'",
            param="certifier",
        )
    return [MaxPoolOp(name, layer, in_shape)]


def _basic_block_rule(name: str, block: BasicBlock, in_shape: tuple[int, ...]) -> list[Op]:
    body = build_ops(nn.Sequential(block.conv1, block.bn1, block.relu, block.conv2, block.bn2), in_shape, name + ".F")
    shortcut = build_ops(nn.Sequential(block.shortcut), in_shape, name + ".shortcut")
    return [ResidualOp(name, body, shortcut), ReLUOp(name + ".relu")]


def _resnet_rule(name: str, net: ResNet18, in_shape: tuple[int, ...]) -> list[Op]:
    if net.video:
        raise ConfigError(
            f"CROWN does not support the video ResNet18 '{name}' (frame folding); use certifier='sound'",
            param="certifier",
        )
    return build_ops(nn.Sequential(net.stem, net.layers, net.pool), in_shape, name)


def _maxmin_rule(name: str, layer: MaxMin, in_shape: tuple[int, ...]) -> list[Op]:
    if in_shape[0] % 2:
        raise ConfigError(f"MaxMin layer '{name}' needs an even number of channels, got {in_shape[0]}")
    return [MaxMinOp(name)]


def _activation_rule(name: str, layer: nn.Module, in_shape: tuple[int, ...]) -> list[Op]:
    try:
        act = activation_of(layer)
    except ValueError as exc:
        raise ConfigError(f"CROWN: layer '{name}' ({type(layer).__name__}): {exc}; use certifier='sound'",
                          param="certifier") from None  # fmt: skip
    return [ActivationOp(name, act)]


register_layer(nn.ReLU, crown=_relu_rule)
register_layer(nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Hardswish,
               crown=_activation_rule)  # fmt: skip
register_layer(MaxMin, crown=_maxmin_rule)
register_layer(nn.MaxPool1d, nn.MaxPool2d, crown=_maxpool_rule)
register_layer(BasicBlock, crown=_basic_block_rule)
register_layer(ResNet18, crown=_resnet_rule)


def shape_after(ops: list[Op], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample output shape of ``ops`` on inputs of ``shape``."""
    with torch.no_grad():
        return tuple(run_forward(ops, torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])


def build_ops(module: nn.Module, in_shape: tuple[int, ...], prefix: str = "") -> list[Op]:
    """The CROWN operators of ``module`` (eval mode) for per-sample inputs of ``in_shape``.

    A module with a rule is its rule's operators; any other module is traced into a graph
    (:func:`graph_ops`); an ``nn.Sequential`` that cannot be traced is walked child by child.
    """
    shape = tuple(int(s) for s in in_shape)
    name = prefix or type(module).__name__
    rule = find_rule(module)
    if rule.crown is not None:
        return rule.crown(name, module, shape)
    if rule.lipschitz is not None:
        units = rule.lipschitz(name, module, shape)
        if all(u.kind == "linear" and u.offset is not None for u in units):
            return [AffineOp(u) for u in units]
    else:
        graph = trace_graph(module, shape, prefix, "crown")
        if graph is not None:
            return graph_ops(graph)
        if isinstance(module, nn.Sequential):
            ops: list[Op] = []
            for full, child, bn in sequential_parts(module, prefix):
                if bn is not None:
                    new: list[Op] = [AffineOp(chain_units(nn.Sequential(child, bn), shape, full)[0])]
                else:
                    new = build_ops(child, shape, full)
                ops.extend(new)
                shape = shape_after(new, shape)  # all of the child's ops (a block ends with a ReLU)
            return ops
    raise ConfigError(
        f"CROWN does not support layer '{name}' ({type(module).__name__}); use certifier='sound', or register "
        "a CROWN rule for it with mmrobust.layer_rules.register_layer",
        param="certifier",
    )


def node_ops(node: GraphNode) -> list[Op]:
    """The operators of one layer node of a traced graph."""
    if node.bn is not None:
        return [AffineOp(_affine_unit(node.name, node.layer, node.bn, node.in_shape))]
    if node.rule.crown is not None:
        return node.rule.crown(node.name, node.layer, node.in_shape)
    if node.rule.lipschitz is not None:
        units = node.rule.lipschitz(node.name, node.layer, node.in_shape)
        if all(u.kind == "linear" and u.offset is not None for u in units):
            return [AffineOp(u) for u in units]
    raise refuse("crown", node.place, node.hint or "mmrobust.layer_rules.register_layer(..., crown=...)")


def graph_ops(graph: EncoderGraph) -> list[Op]:
    """The operators of a traced graph: layers as chains, regions as one :class:`GraphOp` each."""
    ops: list[Op] = []
    for piece in graph.pieces():
        if not isinstance(piece, Region):
            ops.extend(node_ops(piece))
            continue
        shapes = [piece.in_shape] + [n.out_shape for n in piece.nodes]
        steps = [
            Step(n.kind, n.inputs, node_ops(n) if n.kind == "layer" else [], n.signs, n.dim,
                 tuple(shapes[i][n.dim] for i in n.inputs) if n.kind == "cat" else ())
            for n in piece.nodes
        ]  # fmt: skip
        ops.append(GraphOp(piece.name, steps))
    return ops


from mmrobust.models.lipschitz import SLLConv1d, SLLConv2d, SLLLinear, sll_parts  # noqa: E402  (SLL block)


def _sll_rule(name: str, layer: nn.Module, in_shape: tuple[int, ...]) -> list[Op]:
    """An SLL layer ``x - 2 V^T T^(-1) relu(V x + b)`` (:mod:`mmrobust.models.lipschitz`): a residual
    block whose body is affine, ReLU, linear and whose shortcut is the identity."""
    inner, outer = sll_parts(name, layer, in_shape)
    return [ResidualOp(name, [AffineOp(inner), ReLUOp(name + ".relu"), AffineOp(outer)], [])]


register_layer(SLLLinear, SLLConv1d, SLLConv2d, crown=_sll_rule)
