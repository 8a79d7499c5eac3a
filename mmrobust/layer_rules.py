"""The one extension point for per-layer bounds: ``LAYER_RULES`` maps a layer type to its rules.

Every certifier that reasons layer by layer looks a layer up here, by its exact type (a subclass may
compute something else, so it must register itself):

* ``lipschitz(name, layer, in_shape) -> list[Unit]``: the sound l2 Lipschitz bound
  (:mod:`mmrobust.certify.sound`). A rule that returns only ``"linear"`` units with an ``offset``
  describes an affine layer exactly, and CROWN then handles the layer without a rule of its own.
* ``crown(name, layer, in_shape) -> list[Op]``: linear-bound-propagation operators
  (:mod:`mmrobust.certify.crown`) for layers that are not affine.

Rules for torch's layers are registered in ``sound.py`` and ``crown.py``; a new layer registers
its rules next to its definition (see :mod:`mmrobust.models.lipschitz`)::

    register_layer(MyLayer, lipschitz=my_units, crown=my_ops)

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
