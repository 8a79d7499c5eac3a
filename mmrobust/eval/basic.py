"""The basic evaluation: clean accuracy and accuracy with each modality missing."""

from __future__ import annotations

from typing import Any

from mmrobust.attacks.missing import MissingModality
from mmrobust.data.base import Split
from mmrobust.eval.metrics import accuracy, macro_f1, predict
from mmrobust.models.fusion import LateFusionModel


def evaluate_basic(
    model: LateFusionModel, split: Split, num_classes: int, fill: str = "zero", batch_size: int = 256
) -> dict[str, Any]:
    """Clean accuracy and, for each modality, accuracy with it removed (``fill``)."""
    preds = predict(model, split, batch_size)
    results = []
    for m in model.modalities:
        p = predict(model, split, batch_size, transform=MissingModality([m], fill))
        results.append({
            "attack": "missing", "fill": fill, "modalities": [m],
            "accuracy": accuracy(p, split.labels), "macro_f1": macro_f1(p, split.labels, num_classes),
        })  # fmt: skip
    return {
        "clean_accuracy": accuracy(preds, split.labels),
        "clean_macro_f1": macro_f1(preds, split.labels, num_classes),
        "results": results,
    }
