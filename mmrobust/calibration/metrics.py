"""Classification and retrieval metrics of the calibration evaluation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def macro_precision_recall_f1(
    preds: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[float, float, float]:
    """Unweighted means over classes of ``tp/(tp+fp)``, ``tp/(tp+fn)`` and ``2tp/(2tp+fp+fn)``.

    Like :func:`mmrobust.eval.metrics.macro_f1`, a class absent from both labels and predictions is
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


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of ``cos(a_i, b_i)``."""
    return float(F.cosine_similarity(a, b, dim=1).mean())


def recall_at_k(
    queries: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor, gallery_labels: torch.Tensor,
    ks: Sequence[int],
) -> dict[int, float]:  # fmt: skip
    """Class-level retrieval recall@k: the share of queries with at least one item of their own
    class among their ``k`` nearest gallery items by cosine similarity (k capped at the gallery size)."""
    sims = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T
    kmax = min(max(ks), gallery.shape[0])
    top = sims.topk(kmax, dim=1).indices  # (Q, kmax), most similar first
    hit = gallery_labels[top] == query_labels[:, None]
    return {k: float(hit[:, : min(k, kmax)].any(1).float().mean()) for k in ks}
