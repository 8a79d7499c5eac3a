"""Embedding and retrieval metrics of the calibration evaluation (classification metrics: :mod:`mmrobust.eval.metrics`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
