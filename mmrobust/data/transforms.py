"""Normalisation fitted on the training split only, and the bookkeeping to undo it for ranges."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

import torch

from mmrobust.data.base import Batch, DataBundle, DatasetMeta, ModalitySpec, Normalization, Split

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


# --- the standardised view: what earlier versions stored (models without input transforms) ---


def standardise(x: torch.Tensor, normalization: Normalization) -> torch.Tensor:
    """``(x - mean) / std`` over a batch, in float32, exactly as the loaders standardised before."""
    mean, std = normalization.tensors(tuple(x.shape[1:]))
    return normalize(x, mean.unsqueeze(0), std.unsqueeze(0))


def standardised_meta(meta: DatasetMeta) -> DatasetMeta:
    """``meta`` as earlier versions recorded it: every modality in units ``"standardised"``, no
    normalization, a valid range mapped through its (scalar) normalization."""
    specs = []
    for s in meta.modalities:
        vr = s.valid_range
        if s.normalization is not None and vr is not None:
            m, sd = s.normalization.mean[0], s.normalization.std[0]
            vr = ((vr[0] - m) / sd, (vr[1] - m) / sd)
        specs.append(ModalitySpec(s.name, s.kind, s.shape, vr))
    return DatasetMeta(meta.name, specs, list(meta.class_names), dict(meta.info))


def standardise_batch(meta: DatasetMeta, inputs: Batch) -> Batch:
    """One batch standardised by each modality's normalization (others unchanged)."""
    out = dict(inputs)
    for s in meta.modalities:
        if s.normalization is not None and s.name in out:
            out[s.name] = standardise(out[s.name], s.normalization)
    return out


def standardised_split(meta: DatasetMeta, split: Split) -> Split:
    """A split's inputs standardised by each modality's normalization (others unchanged): a new
    in-memory split, or for a streamed (on-disk) split a view that standardises each batch it reads."""
    if type(split) is Split:
        return Split(standardise_batch(meta, split.inputs), split.labels)
    return cast(Split, _StandardisedView(meta, split))


class _StandardisedView:
    """A streamed split whose batches are standardised as they are read (nothing is loaded whole)."""

    def __init__(self, meta: DatasetMeta, split: Split) -> None:
        self.meta, self.split = meta, split

    @property
    def labels(self) -> torch.Tensor:
        return self.split.labels

    def __len__(self) -> int:
        return len(self.split)

    def take(self, index: torch.Tensor | slice) -> tuple[Batch, torch.Tensor]:
        inputs, labels = self.split.take(index)
        return standardise_batch(self.meta, inputs), labels

    def subset(self, index: torch.Tensor | slice) -> Split:
        return standardised_split(self.meta, self.split.subset(index))

    @property
    def stream(self) -> Callable[[list[torch.Tensor]], Iterator[tuple[Batch, torch.Tensor]]] | None:
        inner = getattr(self.split, "stream", None)
        if inner is None:
            return None
        return lambda batches: ((standardise_batch(self.meta, x), y) for x, y in inner(batches))


def standardised_bundle(bundle: DataBundle) -> DataBundle:
    """The bundle in the standardised view (:func:`standardised_meta`, :func:`standardised_split`)."""
    meta = bundle.meta
    train, val, test = (standardised_split(meta, bundle.split(s)) for s in ("train", "val", "test"))
    return DataBundle(standardised_meta(meta), train, val, test, dict(bundle.source))
