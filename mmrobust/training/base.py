"""The training-strategy interface: one small class per method, found by name in ``METHODS``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.registry import Registry

if TYPE_CHECKING:
    from mmrobust.training.engine import Trainer

METHODS: Registry[type[Strategy]] = Registry("training method")


@dataclass
class NoOptions:
    """For methods without options."""


@dataclass
class StepContext:
    """What a strategy may need to know about the current step."""

    epoch: int
    step: int
    generator: torch.Generator


class Strategy:
    """A training method.

    Subclasses set ``head`` (the fusion head they need), ``Options`` (a dataclass of their
    hyper-parameters, filled from ``TrainConfig.method_options``) and implement :meth:`loss`.
    ``model`` passed to :meth:`loss` may be wrapped in DDP: call it, don't reach into it; use
    ``model(inputs, return_all=True)`` for features and per-modality scores.
    """

    name: ClassVar[str] = ""
    head: ClassVar[str] = "concat"
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any, meta: DatasetMeta) -> None:
        self.options = options
        self.meta = meta

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """Parameters the optimiser updates (default: all)."""
        return model.parameters()

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, logits)``; logits feed the running train accuracy."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State the strategy carries across epochs (saved in checkpoints for ``--resume``)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def after_training(self, trainer: Trainer) -> dict[str, Any]:
        """Hook run once on the selected model after the epochs (e.g. CRMT step 2).

        Returns extra metrics for ``metrics.json``.
        """
        return {}
