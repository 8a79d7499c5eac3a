"""The one extension point for per-layer bounds: ``LAYER_RULES`` maps a layer type to its rules.

Every certifier that reasons layer by layer looks a layer up here, by its exact type (a subclass may
compute something else, so it must register itself):

* ``lipschitz(name, layer, in_shape) -> list[Unit]``: the sound l2 Lipschitz bound
  (:mod:`mmrobust.certify.sound`). A rule that returns only ``"linear"`` units with an ``offset``
  describes an affine layer exactly, and CROWN then handles the layer without a rule of its own.
* ``crown(name, layer, in_shape) -> list[Op]``: linear-bound-propagation operators
  (:mod:`mmrobust.certify.crown`) for layers that are not affine.

Rules for torch's layers are registered in ``sound.py`` and ``crown_layers.py``; a new layer registers
its rules next to its definition (see :mod:`mmrobust.models.lipschitz`)::

    register_layer(MyLayer, lipschitz=my_units, crown=my_ops)

Encoders are traced with ``torch.fx`` (:mod:`mmrobust.certify.graph`): a module with a rule is one
node (its rule applies), any other module is traced through its ``forward``. A *function* called in
a ``forward`` (``torch.sin(x)``, ``x.clamp(0, 1)``) that the graph does not know has its rules in
``FUNCTION_RULES``, registered the same way; the rules receive a :class:`FunctionCall` in place
of the layer (call it on a tensor to apply the function with the call's other arguments)::

    register_function(torch.sin, lipschitz=my_units, crown=my_ops)  # torch.sin(x)
    register_function("sin", lipschitz=my_units, crown=my_ops)      # x.sin() (a Tensor method)

This module imports nothing from the model zoo, so model modules may import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Unit:
    """One link of an encoder chain with its Lipschitz bound.

    ``kind`` is ``"linear"`` (an affine map: Linear/Conv, optionally with BatchNorm fused,
    BatchNorm alone, average pools, Flatten/Identity/Dropout), ``"act"`` (an elementwise activation
    with derivative in [0, 1]) or ``"other"``. ``fn`` applies the layer (for linear units: its
    linear part, without the offset); ``abs_fn`` (linear units) applies the linear part with every
    coefficient replaced by its absolute value, ``sq_fn`` (optional) with every coefficient squared
    (so ``sq_fn(ones)`` holds the squared row norms); ``offset`` (linear units) is the map's value at
    0, of shape ``out_shape``, so that the layer is exactly ``fn(x) + offset``.
    """

    name: str
    kind: str
    lip: float
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    fn: Callable[[torch.Tensor], torch.Tensor]
    abs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    sq_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    offset: torch.Tensor | None = None


LipschitzRule = Callable[[str, Any, tuple[int, ...]], list[Unit]]
CrownRule = Callable[[str, Any, tuple[int, ...]], list[Any]]


@dataclass
class LayerRule:
    """The bound rules of one layer type (either may be missing)."""

    lipschitz: LipschitzRule | None = None
    crown: CrownRule | None = None


LAYER_RULES: dict[type[nn.Module], LayerRule] = {}


def register_layer(
    *types: type[nn.Module], lipschitz: LipschitzRule | None = None, crown: CrownRule | None = None
) -> None:
    """Register the Lipschitz and/or CROWN rule of ``types``; registering one rule twice is a bug."""
    for t in types:
        rule = LAYER_RULES.setdefault(t, LayerRule())
        for attr, value in (("lipschitz", lipschitz), ("crown", crown)):
            if value is None:
                continue
            if getattr(rule, attr) is not None:
                raise ValueError(f"{attr} rule for {t.__name__} is registered twice")
            setattr(rule, attr, value)


def find_rule(layer: nn.Module) -> LayerRule:
    """The rules registered for ``type(layer)`` (empty rules when none are)."""
    return LAYER_RULES.get(type(layer), LayerRule())


@dataclass
class FunctionCall:
    """One call of a function in a traced ``forward``, as a function rule sees it.

    ``fn`` is the function (or the name of a Tensor method), ``args``/``kwargs`` its arguments with
    the traced input replaced by ``None`` at position ``pos`` (graph values such as sizes replaced by
    their values). Calling the object applies the function to a new input, with the same other
    arguments.
    """

    fn: Callable[..., Any] | str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    pos: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        args = list(self.args)
        args[self.pos] = x
        if isinstance(self.fn, str):
            return getattr(x, self.fn)(*args[1:], **self.kwargs)
        return self.fn(*args, **self.kwargs)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The argument at position ``index`` (the input counts) or keyword ``name``, else ``default``."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)


#: function (or Tensor method name) -> its rules; looked up by :func:`find_function_rule`
FUNCTION_RULES: dict[Any, LayerRule] = {}


def register_function(
    *fns: Callable[..., Any] | str, lipschitz: LipschitzRule | None = None, crown: CrownRule | None = None
) -> None:
    """Register the Lipschitz and/or CROWN rule of functions called in a traced ``forward``.

    ``fns`` are functions (``torch.sin``) or Tensor method names (``"sin"`` for ``x.sin()``). The
    rules are called as ``rule(name, call, in_shape)`` with a :class:`FunctionCall` in place of the
    layer, exactly like a layer's rules (:func:`register_layer`); registering one rule twice is a bug.
    """
    for fn in fns:
        rule = FUNCTION_RULES.setdefault(fn, LayerRule())
        for attr, value in (("lipschitz", lipschitz), ("crown", crown)):
            if value is None:
                continue
            if getattr(rule, attr) is not None:
                raise ValueError(f"{attr} rule for {getattr(fn, '__name__', fn)} is registered twice")
            setattr(rule, attr, value)


def find_function_rule(fn: Any) -> LayerRule:
    """The rules registered for the function (or Tensor method name) ``fn`` (empty rules when none are)."""
    try:
        return FUNCTION_RULES.get(fn, LayerRule())
    except TypeError:  # an unhashable target
        return LayerRule()
