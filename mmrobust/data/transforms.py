"""Normalisation fitted on the training split only, and the bookkeeping to undo it for ranges."""

from __future__ import annotations

import torch

_EPS = 1e-6


def channel_axis(kind: str) -> int | None:
    """Axis (in a batched tensor) that holds channels/features for per-channel statistics."""
    return {"vector": 1, "sequence": 1, "image": 1, "spectrogram": 1, "video": 2}.get(kind)


def fit_normalizer(x: torch.Tensor, kind: str, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``x`` (batched) shaped to broadcast against a batch.

    Per-channel statistics suit unbounded features (MFCC coefficients have very different scales);
    a single scalar keeps a declared valid range a plain interval after normalisation.
    """
    axis = channel_axis(kind)
    if per_channel and axis is not None:
        dims = [d for d in range(x.ndim) if d != axis]
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True)
    else:
        mean = x.mean().reshape([1] * x.ndim)
        std = x.std().reshape([1] * x.ndim)
    return mean, std.clamp_min(_EPS)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def normalized_range(
    spec_range: tuple[float, float] | None, mean: torch.Tensor, std: torch.Tensor
) -> tuple[float, float] | None:
    """Map a raw-space valid range through a scalar normaliser (``None`` stays ``None``)."""
    if spec_range is None:
        return None
    m, s = float(mean.flatten()[0]), float(std.flatten()[0])
    return ((spec_range[0] - m) / s, (spec_range[1] - m) / s)
