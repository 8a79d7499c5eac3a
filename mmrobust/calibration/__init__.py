"""Adversarial calibration of frozen "Bind-style" encoders with small per-modality projection heads.

``BindModel(encoders, centres)`` is the frozen zero-shot classifier ``argmax_k cos(g_m(f_m(x)), c_k)``;
:func:`calibrate` trains the heads ``g_m`` (stage 1: distillation, stage 2: adversarial fine-tuning)
and :func:`evaluate` measures clean and AutoAttack-style accuracy, embedding drift and retrieval.
"""

from mmrobust.calibration.evaluate import Evaluation, ModalityEvaluation, evaluate
from mmrobust.calibration.options import CALIBRATION_LOSSES, CalibrationOptions, EvalOptions
from mmrobust.calibration.pipeline import BindModel, FrozenEncoder, ModalityClassifier, ProjectionHead
from mmrobust.calibration.setup import CalibrationSetup, check_setup
from mmrobust.calibration.train import CalibrationResult, HeadResult, calibrate

__all__ = [
    "CALIBRATION_LOSSES",
    "BindModel",
    "CalibrationOptions",
    "CalibrationResult",
    "CalibrationSetup",
    "EvalOptions",
    "Evaluation",
    "FrozenEncoder",
    "HeadResult",
    "ModalityClassifier",
    "ModalityEvaluation",
    "ProjectionHead",
    "calibrate",
    "check_setup",
    "evaluate",
]
