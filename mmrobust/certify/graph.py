"""An encoder as the graph of what its ``forward`` computes, for the layer-by-layer bounds.

:func:`trace_graph` traces a module with ``torch.fx``: a module with a registered rule
(:mod:`mmrobust.layer_rules`: Linear, Conv, the ResNet blocks, the AOL layers, ...) is one node and
its rule applies; any other module is traced through its ``forward``, so a custom ``forward`` over
supported operations is bounded exactly as written. The nodes are:

* ``layer``: one input, one output, bounded by a rule. Besides the registered modules this covers
  calls the graph rewrites into small modules with rules of their own: reshapes (``flatten``,
  ``view``, ``reshape``, ``squeeze``/``unsqueeze``, ``contiguous``: :class:`Reshape`), scaling and
  shifting by constants (``x * 2``, ``x - self.mean``, ``-x``: :class:`Scale`), means and sums over
  non-batch axes (:class:`Reduce`), and functional activations and pools (``F.gelu``,
  ``torch.tanh``, ``F.avg_pool2d``, ...: the equivalent ``nn`` module, see ``_AS_MODULE``); any other
  function with a rule in ``FUNCTION_RULES`` (``register_function``) gets a
  :class:`~mmrobust.layer_rules.FunctionCall`;
* ``add``: a signed sum of tensors of one shape (``x + f(x)``, ``a - b``: residual connections);
* ``cat``: a concatenation along a non-batch axis.

Anything else is refused, never skipped: a one-line :class:`ConfigError` naming the node, its
place in the module and how to register a rule. The traced graph is checked to reproduce the
module's output on a random input. Where tracing fails (data-dependent control flow) the caller
falls back to walking an ``nn.Sequential`` child by child (``None`` is returned), any other module
is refused with the reason.

The graph is cut at the nodes every path from the input to the output goes through: the pieces
between two cuts are either one layer (bounded as a link of a chain) or a *region* (a small
directed acyclic graph with sums and concatenations, bounded as one unit: a residual block).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mmrobust.errors import ConfigError
from mmrobust.layer_rules import FunctionCall, LayerRule, find_function_rule, find_rule

#: who asks: (what is refused, what to use instead, the rule keyword to register)
_WHO = {
    "sound": ("the sound Lipschitz bound", "certifier='empirical'", "lipschitz"),
    "crown": ("CROWN", "certifier='sound'", "crown"),
}


def refuse(who: str, place: str, hint: str) -> ConfigError:
    """The one-line error for an operation without a rule (``hint``: how to register one)."""
    what, use, _ = _WHO[who]
    return ConfigError(f"{what} does not support {place}; use {use}, or register a rule for it with {hint}",
                       param="certifier")  # fmt: skip


def layer_hint(who: str, layer: Any) -> str:
    return f"mmrobust.layer_rules.register_layer({type(layer).__name__}, {_WHO[who][2]}=...)"


def function_hint(who: str, fn: Any) -> str:
    key = repr(fn) if isinstance(fn, str) else display_name(fn)
    return f"mmrobust.layer_rules.register_function({key}, {_WHO[who][2]}=...)"


def display_name(fn: Any) -> str:
    """``torch.nn.functional.gelu`` rather than ``torch._C._nn.gelu``: the name a user writes."""
    if isinstance(fn, str):
        return fn
    name = getattr(fn, "__name__", repr(fn))
    for mod, label in ((F, "torch.nn.functional"), (torch, "torch"), (operator, "operator")):
        if getattr(mod, name, None) is fn:
            return f"{label}.{name}"
    return f"{getattr(fn, '__module__', None) or '?'}.{name}"


# --- the small modules calls are rewritten into (their rules are registered in certify/sound.py) ---


class Reshape(nn.Module):
    """A row-major reshape of each sample to ``out_shape`` (flatten, view, reshape, squeeze, ...)."""

    def __init__(self, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.out_shape)


class Scale(nn.Module):
    """``x * scale + shift`` elementwise, with per-sample-shaped constants (float64)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.scale, self.shift = scale.double(), shift.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class Reduce(nn.Module):
    """Mean (or sum) over non-batch axes ``dims`` (global average pooling: ``x.mean((2, 3))``)."""

    def __init__(self, dims: tuple[int, ...], keepdim: bool, mean: bool) -> None:
        super().__init__()
        self.dims, self.keepdim, self.mean = dims, keepdim, mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduce = torch.mean if self.mean else torch.sum
        return reduce(x, dim=self.dims, keepdim=self.keepdim)


def _kw(call: FunctionCall, i: int, name: str, default: Any) -> Any:
    return call.arg(i, name, default)


#: functional forms -> the equivalent nn module (whose rules then apply)
_AS_MODULE: dict[Any, Callable[[FunctionCall], nn.Module]] = {}


def _as_module(*fns: Any) -> Callable[[Callable[[FunctionCall], nn.Module]], Callable[[FunctionCall], nn.Module]]:
    def deco(make: Callable[[FunctionCall], nn.Module]) -> Callable[[FunctionCall], nn.Module]:
        for fn in fns:
            _AS_MODULE[fn] = make
        return make

    return deco


_as_module(F.relu, torch.relu, "relu")(lambda c: nn.ReLU())
_as_module(torch.tanh, F.tanh, "tanh")(lambda c: nn.Tanh())
_as_module(torch.sigmoid, F.sigmoid, "sigmoid")(lambda c: nn.Sigmoid())
_as_module(F.gelu)(lambda c: nn.GELU(approximate=_kw(c, 1, "approximate", "none")))
_as_module(F.silu)(lambda c: nn.SiLU())
_as_module(F.hardswish)(lambda c: nn.Hardswish())
_as_module(F.leaky_relu)(lambda c: nn.LeakyReLU(_kw(c, 1, "negative_slope", 0.01)))
_as_module(F.elu)(lambda c: nn.ELU(_kw(c, 1, "alpha", 1.0)))
_as_module(F.softplus)(lambda c: nn.Softplus(_kw(c, 1, "beta", 1.0), _kw(c, 2, "threshold", 20.0)))
_as_module(F.adaptive_avg_pool1d)(lambda c: nn.AdaptiveAvgPool1d(_kw(c, 1, "output_size", None)))
_as_module(F.adaptive_avg_pool2d)(lambda c: nn.AdaptiveAvgPool2d(_kw(c, 1, "output_size", None)))


def _avg_pool(cls: type[nn.Module], two_d: bool) -> Callable[[FunctionCall], nn.Module]:
    def make(c: FunctionCall) -> nn.Module:
        kw = {
            "kernel_size": _kw(c, 1, "kernel_size", None), "stride": _kw(c, 2, "stride", None),
            "padding": _kw(c, 3, "padding", 0), "ceil_mode": _kw(c, 4, "ceil_mode", False),
            "count_include_pad": _kw(c, 5, "count_include_pad", True),
        }  # fmt: skip
        if two_d:
            kw["divisor_override"] = _kw(c, 6, "divisor_override", None)
        return cls(**kw)

    return make


def _max_pool(cls: type[nn.Module]) -> Callable[[FunctionCall], nn.Module]:
    def make(c: FunctionCall) -> nn.Module:
        if _kw(c, 6, "return_indices", False):
            raise ValueError("return_indices=True")
        return cls(_kw(c, 1, "kernel_size", None), _kw(c, 2, "stride", None), _kw(c, 3, "padding", 0),
                   _kw(c, 4, "dilation", 1), ceil_mode=_kw(c, 5, "ceil_mode", False))  # fmt: skip

    return make


_AS_MODULE[F.avg_pool1d] = _avg_pool(nn.AvgPool1d, False)
_AS_MODULE[F.avg_pool2d] = _avg_pool(nn.AvgPool2d, True)
_AS_MODULE[F.max_pool1d] = _max_pool(nn.MaxPool1d)
_AS_MODULE[F.max_pool2d] = _max_pool(nn.MaxPool2d)

_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_NEG = {operator.neg, torch.neg, "neg"}
_CAT = {torch.cat, torch.concat}
_RESHAPE = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "flatten", "view", "reshape", "squeeze",
            "unsqueeze", "contiguous", "clone"}  # fmt: skip
_REDUCE = {torch.mean: True, "mean": True, torch.sum: False, "sum": False}
_DROPOUT = {F.dropout, F.dropout1d, F.dropout2d}


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


@dataclass
class GraphNode:
    """One node: ``kind`` ``input``, ``layer`` (``layer`` with ``rule``; a Linear/Conv may carry the
    BatchNorm fused into it, ``bn``), ``add`` (``signs``) or ``cat`` (``dim``: per-sample axis)."""

    name: str
    place: str
    kind: str
    inputs: list[int]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    layer: Any = None
    rule: LayerRule = field(default_factory=LayerRule)
    hint: str = ""
    bn: Any = None
    signs: tuple[float, ...] = ()
    dim: int = 0


@dataclass
class Region:
    """A piece of the graph with sums/concatenations: ``nodes`` in topological order, their
    ``inputs`` index the region's values (0: the region's input, ``i + 1``: ``nodes[i]``)."""

    nodes: list[GraphNode]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    name: str


@dataclass
class EncoderGraph:
    """``nodes[0]`` is the input, the last node the output; topological order."""

    nodes: list[GraphNode]

    def pieces(self) -> Iterator[GraphNode | Region]:
        """The graph as a chain: single layers and regions between consecutive cut nodes."""
        n = len(self.nodes)
        jumped = [0] * (n + 1)
        for j, node in enumerate(self.nodes):
            for i in node.inputs:
                if j - i > 1:  # the edge i -> j jumps over i+1 .. j-1
                    jumped[i + 1] += 1
                    jumped[j] -= 1
        cuts, run = [], 0
        for p in range(n):
            run += jumped[p]
            if run == 0:
                cuts.append(p)
        for a, b in zip(cuts, cuts[1:], strict=False):
            node = self.nodes[b]
            if b == a + 1 and node.kind == "layer":
                yield node
                continue
            local = {a: 0}
            nodes: list[GraphNode] = []
            for k in range(a + 1, b + 1):
                src = self.nodes[k]
                local[k] = len(nodes) + 1
                nodes.append(GraphNode(**{**src.__dict__, "inputs": [local[i] for i in src.inputs]}))
            yield Region(nodes, self.nodes[a].out_shape, node.out_shape, node.name)


class _Tracer(fx.Tracer):
    """Modules with a registered rule are leaves (their rules apply); others are traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        rule = find_rule(m)
        if rule.lipschitz is not None or rule.crown is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


def _flat_nodes(a: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(a, lambda n: out.append(n) or n)  # type: ignore[func-returns-value]
    return out


def trace_graph(module: nn.Module, in_shape: tuple[int, ...], prefix: str, who: str) -> EncoderGraph | None:
    """The graph of ``module`` (eval mode) on per-sample inputs of ``in_shape``; ``None`` when tracing
    fails on an ``nn.Sequential`` (walk it child by child instead). ``who`` (``sound``/``crown``)
    words the errors."""
    modes = [(m, m.training) for m in module.modules()]  # restored one by one: a wrapper's mode is not its children's
    module.eval()
    try:
        return _trace(module, tuple(int(s) for s in in_shape), prefix, who)
    finally:
        for m, mode in modes:
            m.training = mode


def _trace(module: nn.Module, shape: tuple[int, ...], prefix: str, who: str) -> EncoderGraph | None:
    label = prefix or type(module).__name__
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    probes = []
    try:
        gm = fx.GraphModule(module, _Tracer().trace(module))
        for b in (2, 3):  # every node's value at two batch sizes: which values are per sample
            rec = _Recorder(gm)
            gen = torch.Generator().manual_seed(b)
            with torch.no_grad():
                rec.run(torch.randn(b, *shape, generator=gen).to(dtype))
            probes.append(rec.values)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: data-dependent control flow, ...
        if isinstance(module, nn.Sequential):
            return None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what, use, _ = _WHO[who]
        raise ConfigError(
            f"{what} cannot trace '{label}' ({type(module).__name__}) with torch.fx ({reason}); use {use}, "
            "or register a rule for the whole module with mmrobust.layer_rules.register_layer",
            param="certifier",
        ) from None
    where = f"{label}: " if prefix else ""

    def place(n: fx.Node) -> str:
        target = display_name(n.target) if n.op == "call_function" else n.target
        return f"{where}node '{n.name}' ({n.op} {target}) in {type(module).__name__}.forward"

    nodes: list[GraphNode] = []
    index: dict[fx.Node, int] = {}  # fx node -> index of its graph node (tensors depending on the input)
    consts: dict[fx.Node, Any] = {}  # values that do not depend on the input
    batchy: set[fx.Node] = set()  # non-tensor values that depend on the batch size (x.size(0))

    def is_sample_tensor(n: fx.Node) -> bool:
        v2, v3 = probes[0].get(n), probes[1].get(n)
        return (isinstance(v2, torch.Tensor) and isinstance(v3, torch.Tensor) and v2.ndim >= 1 and v3.ndim >= 1
                and v2.shape[0] == 2 and v3.shape[0] == 3 and v2.shape[1:] == v3.shape[1:])  # fmt: skip

    def add_node(n: fx.Node, kind: str, inputs: list[int], **kw: Any) -> None:
        in_shape_ = nodes[inputs[0]].out_shape if inputs else shape
        out = tuple(probes[1][n].shape[1:])
        name = kw.pop("name", f"{prefix}.{n.name}" if prefix else n.name)
        nodes.append(GraphNode(name, kw.pop("place", place(n)), kind, inputs, in_shape_, out, **kw))
        index[n] = len(nodes) - 1

    def resolve(a: fx.Node, n: fx.Node) -> Any:
        if a in consts:
            return consts[a]
        raise refuse(who, place(n) + " (an argument that depends on the batch or the input)", "a custom module")

    def const_value(a: Any, n: fx.Node) -> Any:
        return fx.node.map_arg(a, lambda m: resolve(m, n))

    def layer(n: fx.Node, obj: Any, rule: LayerRule, hint: str, src: fx.Node, **kw: Any) -> None:
        add_node(n, "layer", [index[src]], layer=obj, rule=rule, hint=hint, **kw)

    output: fx.Node | None = None
    for n in gm.graph.nodes:
        if n.op == "output":
            output = n
            continue
        if n.op == "placeholder":
            if not nodes:
                add_node(n, "input", [], place=f"the input of '{label}'")
            else:
                consts[n] = probes[1].get(n)
            continue
        used = _flat_nodes((n.args, n.kwargs))
        deps = [a for a in used if a in index]
        v2, v3 = probes[0].get(n), probes[1].get(n)
        if n.op == "get_attr" or not any(a in index or a in batchy for a in used):
            if isinstance(v3, torch.Tensor) and not (isinstance(v2, torch.Tensor) and torch.equal(v2, v3)):
                raise refuse(who, place(n) + " (a tensor that does not depend on the input)", "a custom module")
            consts[n] = v3
            continue
        if not is_sample_tensor(n):
            # sizes (x.size(2)) are constants; what changes with the batch (x.size(0), a reduction
            # over the batch) may only feed reshapes
            same = not isinstance(v3, torch.Tensor) and not isinstance(v2, torch.Tensor) and v2 == v3
            if same:
                consts[n] = v3
            else:
                batchy.add(n)
            continue
        target = n.target
        if n.op == "call_module":
            mod = gm.get_submodule(str(target))
            full = f"{prefix}.{target}" if prefix else str(target)
            rule = find_rule(mod)
            desc = f"layer '{full}' ({type(mod).__name__})"
            if rule.lipschitz is None and rule.crown is None or len(n.args) != 1 or n.kwargs:
                raise refuse(who, desc, layer_hint(who, mod))
            layer(n, mod, rule, layer_hint(who, mod), n.args[0], name=full, place=desc)
            continue
        if n.op not in ("call_function", "call_method"):
            raise refuse(who, place(n), "a custom module")
        key = target if _hashable(target) else None
        args = list(n.args)
        first = args[0] if args else None
        if key in _ADD or key in _SUB:
            sign = 1.0 if key in _ADD else -1.0
            if len(args) != 2 or n.kwargs:
                raise refuse(who, place(n), function_hint(who, target))
            a, b = args
            if a in index and b in index:
                if nodes[index[a]].out_shape != nodes[index[b]].out_shape:
                    raise refuse(who, place(n) + " (a sum that broadcasts)", function_hint(who, target))
                add_node(n, "add", [index[a], index[b]], signs=(1.0, sign))
                continue
            src, c, scale = (a, const_value(b, n), 1.0) if a in index else (b, const_value(a, n), sign)
            shift = c * sign if a in index else c
            _scale_node(n, src, scale, shift, nodes, index, layer, who, place)
            continue
        if key in _MUL or key in _DIV or key in _NEG:
            if key in _NEG:
                src, c = first, -1.0
            elif len(args) == 2 and not n.kwargs and (args[0] in index) != (args[1] in index):
                src = args[0] if args[0] in index else args[1]
                c = const_value(args[1] if src is args[0] else args[0], n)
                if key in _DIV:
                    if src is not args[0]:
                        raise refuse(who, place(n), function_hint(who, target))
                    c = 1.0 / c
            else:
                raise refuse(who, place(n) + " (a product of two tensors)", function_hint(who, target))
            _scale_node(n, src, c, 0.0, nodes, index, layer, who, place)
            continue
        if key in _CAT:
            parts = args[0] if args else n.kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else n.kwargs.get("dim", 0)
            ndim = probes[1][n].ndim
            dim = int(const_value(dim, n)) % ndim
            if not isinstance(parts, list | tuple) or not all(p in index for p in parts) or dim == 0:
                raise refuse(who, place(n), function_hint(who, target))
            add_node(n, "cat", [index[p] for p in parts], dim=dim - 1)
            continue
        if len(deps) != 1 or first is not deps[0]:
            raise refuse(who, place(n) + " (several tensor inputs)", function_hint(who, target))
        src = deps[0]
        out_shape = tuple(probes[1][n].shape[1:])
        if key in _RESHAPE or key in _DROPOUT:
            if key in _DROPOUT and const_value(n.args[2] if len(n.args) > 2 else n.kwargs.get("training", True), n):
                raise refuse(who, place(n) + " (dropout in training mode)", function_hint(who, target))
            if math.prod(out_shape) != math.prod(nodes[index[src]].out_shape):
                raise refuse(who, place(n), function_hint(who, target))
            layer(n, Reshape(out_shape), find_rule(Reshape(())), "", src)
            continue
        if key in _REDUCE:
            dim = const_value(args[1] if len(args) > 1 else n.kwargs.get("dim"), n)
            keep = bool(const_value(args[2] if len(args) > 2 else n.kwargs.get("keepdim", False), n))
            ndim = probes[1][src].ndim
            dims = (dim,) if isinstance(dim, int) else tuple(dim) if dim is not None else ()
            dims = tuple(sorted(int(d) % ndim for d in dims))
            if not dims or 0 in dims or "dtype" in n.kwargs:
                raise refuse(who, place(n) + " (a reduction over the batch axis)", function_hint(who, target))
            red = Reduce(dims, keep, _REDUCE[key])
            layer(n, red, find_rule(red), "", src)
            continue
        call_args = tuple(None if a is src else const_value(a, n) for a in args)
        call = FunctionCall(target, call_args, {k: const_value(v, n) for k, v in n.kwargs.items()}, 0)
        if key in _AS_MODULE:
            try:
                mod = _AS_MODULE[key](call)
            except (TypeError, ValueError) as exc:
                raise refuse(who, f"{place(n)} ({exc})", function_hint(who, target)) from None
            layer(n, mod, find_rule(mod), function_hint(who, target), src)
            continue
        rule = find_function_rule(key)
        if rule.lipschitz is None and rule.crown is None:
            raise refuse(who, place(n), function_hint(who, target))
        layer(n, call, rule, function_hint(who, target), src)
    assert output is not None
    out = output.args[0]
    if not isinstance(out, fx.Node) or out not in index:
        raise refuse(who, f"the output of '{label}' (not one tensor computed from the input)", "a custom module")
    graph = _fuse_and_prune(EncoderGraph(nodes), index[out])
    _check_reproduces(graph, module, shape, dtype, who, label)
    return graph


def _scale_node(n: fx.Node, src: fx.Node, scale: Any, shift: Any, nodes: list[GraphNode], index: dict[fx.Node, int],
                layer: Callable[..., None], who: str, place: Callable[[fx.Node], str]) -> None:  # fmt: skip
    shape = nodes[index[src]].out_shape
    full = (1, *shape)
    try:
        s = torch.broadcast_to(torch.as_tensor(scale, dtype=torch.float64), full)[0]
        b = torch.broadcast_to(torch.as_tensor(shift, dtype=torch.float64), full)[0]
    except (RuntimeError, TypeError):
        raise refuse(who, place(n) + " (a constant that changes the shape)", "a custom module") from None
    mod = Scale(s.clone(), b.clone())
    layer(n, mod, find_rule(mod), "", src)


def _fuse_and_prune(graph: EncoderGraph, out: int) -> EncoderGraph:
    """Fuse a Linear/Conv followed only by a BatchNorm; drop nodes that do not reach the output."""
    nodes = graph.nodes
    users: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for j, node in enumerate(nodes):
        for i in node.inputs:
            users[i].append(j)
    alias = list(range(len(nodes)))
    for j, node in enumerate(nodes):
        node.inputs = [alias[i] for i in node.inputs]
        if node.kind != "layer" or not isinstance(node.layer, nn.BatchNorm1d | nn.BatchNorm2d) or node.bn is not None:
            continue
        (src,) = node.inputs
        prev = nodes[src]
        if (prev.kind == "layer" and prev.bn is None and type(prev.layer) in (nn.Linear, nn.Conv1d, nn.Conv2d)
                and users[src] == [j]):  # fmt: skip
            prev.bn, prev.out_shape, prev.name = node.layer, node.out_shape, prev.name
            alias[j] = src
            node.kind = "fused"
    out = alias[out]
    keep = {out}
    for j in range(len(nodes) - 1, -1, -1):
        if j in keep:
            keep.update(nodes[j].inputs)
    keep.add(0)
    new: dict[int, int] = {}
    kept: list[GraphNode] = []
    for j, node in enumerate(nodes):
        if j in keep and node.kind != "fused":
            new[j] = len(kept)
            node.inputs = [new[i] for i in node.inputs]
            kept.append(node)
    return EncoderGraph(kept[: new[out] + 1])


def evaluate(graph: EncoderGraph | Region, x: torch.Tensor, apply: Callable[[GraphNode, torch.Tensor], torch.Tensor]
             ) -> torch.Tensor:  # fmt: skip
    """Run the graph (or region) on ``x``, each layer node by ``apply(node, value)``."""
    values = [x] if isinstance(graph, Region) else []
    for node in graph.nodes:
        ins = [values[i] for i in node.inputs]
        if node.kind == "input":
            values.append(x)
        elif node.kind == "layer":
            values.append(apply(node, ins[0]))
        elif node.kind == "add":
            values.append(_signed_sum(node.signs, ins))
        else:
            values.append(torch.cat(ins, dim=node.dim + 1))
    return values[-1]


def _signed_sum(signs: tuple[float, ...], values: list[torch.Tensor]) -> torch.Tensor:
    out = signs[0] * values[0]
    for s, v in zip(signs[1:], values[1:], strict=True):
        out = out + s * v
    return out


def _apply_module(node: GraphNode, x: torch.Tensor) -> torch.Tensor:
    y = node.layer(x)
    return node.bn(y) if node.bn is not None else y


def _check_reproduces(graph: EncoderGraph, module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, who: str,
                      label: str) -> None:  # fmt: skip
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.no_grad():
        want, got = module(x), evaluate(graph, x, _apply_module)
    scale = 1.0 + float(want.abs().max()) if want.numel() else 1.0
    if got.shape != want.shape or float((got - want).abs().max()) > 1e-4 * scale:
        what, use, _ = _WHO[who]
        raise ConfigError(f"{what}: the graph traced from '{label}' does not reproduce its forward; use {use}",
                          param="certifier")  # fmt: skip
