"""Training strategies (one module per method, registered in ``METHODS`` when first looked up) and the
shared engine."""

from mmrobust.training.base import (
    METHODS,
    MethodOptions,
    NoOptions,
    StepContext,
    Strategy,
    make_strategy,
    method_model_config,
)
from mmrobust.training.context import TrainContext
from mmrobust.training.engine import FitResult, Trainer, train

__all__ = [
    "METHODS",
    "FitResult",
    "MethodOptions",
    "NoOptions",
    "StepContext",
    "Strategy",
    "TrainContext",
    "Trainer",
    "make_strategy",
    "method_model_config",
    "train",
]
