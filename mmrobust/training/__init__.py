"""Training strategies (one module per method) and the shared engine."""

from mmrobust.training import crmt as _crmt  # noqa: F401  (registers the CRMT family)
from mmrobust.training import gaussian as _gaussian  # noqa: F401  (registers "gaussian")
from mmrobust.training import jt as _jt  # noqa: F401  (registers "jt")
from mmrobust.training.base import METHODS, NoOptions, StepContext, Strategy
from mmrobust.training.engine import FitResult, Trainer, train

__all__ = ["METHODS", "FitResult", "NoOptions", "StepContext", "Strategy", "Trainer", "train"]
