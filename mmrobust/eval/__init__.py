"""Evaluation: metrics and the evaluation suites."""

from mmrobust.eval.metrics import accuracy, macro_f1, predict

__all__ = ["accuracy", "macro_f1", "predict"]
