"""Predictions and the metrics every table uses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mmrobust.data.base import Batch, Split, iterate_batches
from mmrobust.torchutil import eval_mode, to_device


@torch.no_grad()
def predict(
    model: nn.Module,
    split: Split,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    transform: Callable[[Batch, torch.Tensor], Batch] | None = None,
) -> torch.Tensor:
    """Predicted labels for a split in eval mode; ``transform`` may alter each batch first.

    Batches go to ``device`` (None: the model's device, see :func:`model_device`)."""
    device = model_device(model) if device is None else device
    preds = []
    with eval_mode(model):
        for inputs, labels in iterate_batches(split, batch_size):
            inputs = to_device(inputs, device)
            if transform is not None:
                inputs = transform(inputs, labels.to(device))
            preds.append(model(inputs).argmax(1).cpu())
    return torch.cat(preds)


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model without any."""
    first: torch.Tensor | None = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    return float((preds == labels).float().mean())


def macro_precision_recall_f1(
    preds: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[float, float, float]:
    """Unweighted means over classes of ``tp/(tp+fp)``, ``tp/(tp+fn)`` and ``2tp/(2tp+fp+fn)``.

    A class absent from both labels and predictions is
    left out; a class never predicted has precision 0 (and one never present recall 0).
    """
    ps, rs, fs = [], [], []
    for k in range(num_classes):
        tp = int(((preds == k) & (labels == k)).sum())
        fp = int(((preds == k) & (labels != k)).sum())
        fn = int(((preds != k) & (labels == k)).sum())
        if tp + fp + fn == 0:
            continue
        ps.append(tp / (tp + fp) if tp + fp else 0.0)
        rs.append(tp / (tp + fn) if tp + fn else 0.0)
        fs.append(2 * tp / (2 * tp + fp + fn))
    n = len(fs)
    return (sum(ps) / n, sum(rs) / n, sum(fs) / n) if n else (0.0, 0.0, 0.0)


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    return macro_precision_recall_f1(preds, labels, num_classes)[2]
