"""Evaluation: metrics, the evaluation suites and :func:`evaluate_model` (a model, no run folder)."""

from mmrobust.eval.api import evaluate_model
from mmrobust.eval.metrics import accuracy, macro_f1, predict

__all__ = ["accuracy", "evaluate_model", "macro_f1", "predict"]
