"""Training strategies (one module per method) and the shared engine."""

# importing a method's module registers it in METHODS
from mmrobust.training import crmt as _crmt  # noqa: F401  (the CRMT family)
from mmrobust.training import gaussian as _gaussian  # noqa: F401
from mmrobust.training import gb as _gb  # noqa: F401
from mmrobust.training import jt as _jt  # noqa: F401
from mmrobust.training import mixup as _mixup  # noqa: F401
from mmrobust.training import mmat as _mmat  # noqa: F401
from mmrobust.training import msefm as _msefm  # noqa: F401
from mmrobust.training import ogm_ge as _ogm_ge  # noqa: F401
from mmrobust.training import pmr as _pmr  # noqa: F401
from mmrobust.training import varmat as _varmat  # noqa: F401  (varmat, varmat-input)
from mmrobust.training.base import METHODS, MethodOptions, NoOptions, StepContext, Strategy
from mmrobust.training.engine import FitResult, Trainer, train

__all__ = ["METHODS", "FitResult", "MethodOptions", "NoOptions", "StepContext", "Strategy", "Trainer", "train"]
