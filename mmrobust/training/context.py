"""What a strategy's hooks see of the run being trained: a narrow, read-only view, never the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmrobust.data.base import Split
from mmrobust.models.fusion import LateFusionModel
from mmrobust.progress import MessageFn


@dataclass(frozen=True)
class TrainContext:
    """Handed to :meth:`~mmrobust.training.base.Strategy.on_train_start` and the other hooks.

    ``model``: the model being trained (never DDP-wrapped; hooks run on every rank alike), on
    ``device``. ``train``: the samples that train the model (after the method's ``training_split``);
    ``val``: the validation split. ``seed``, ``batch_size`` (global) and ``memory_budget``: the run's
    settings. ``evaluate(split_name)``: accuracy of ``model`` on ``"train"``, ``"val"`` or ``"test"``.
    ``on_message``: report a line of information to the caller (the CLI prints it).
    """

    model: LateFusionModel
    device: torch.device
    train: Split
    val: Split
    seed: int
    batch_size: int
    memory_budget: str
    evaluate: Callable[[str], float]
    on_message: MessageFn
