"""The batch protocol: modality specs, dataset metadata, splits and batching.

A batch is a ``dict[str, Tensor]`` (one entry per modality, first axis = samples) plus an integer
label tensor. Nothing here assumes two modalities.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmrobust.errors import DataError

Batch = dict[str, torch.Tensor]

#: Modality kinds the model zoo knows how to encode.
KINDS = ("vector", "sequence", "image", "spectrogram", "video")


@dataclass(frozen=True)
class Normalization:
    """The standardisation a model applies to one modality's stored values: ``(x - mean) / std``.

    ``mean`` and ``std`` hold one value (the whole modality), or one value per entry along the
    per-sample axis ``axis`` (e.g. per MFCC coefficient of a ``(coefficients, frames)`` sequence,
    ``axis=0``; per channel of a ``(C, H, W)`` image, ``axis=0``).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    axis: int = 0

    def __post_init__(self) -> None:
        if not self.mean or len(self.mean) != len(self.std):
            raise DataError(f"normalization: mean and std need the same non-zero length, got {self.mean}, {self.std}")
        values = [*self.mean, *self.std]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise DataError(f"normalization: mean and std must be finite numbers, got {self.mean}, {self.std}")
        if min(self.std) <= 0:
            raise DataError(f"normalization: std must be > 0, got {self.std}")

    @property
    def scalar(self) -> bool:
        """One value for the whole modality (an l2 ball in stored units maps to a ball)."""
        return len(self.std) == 1

    def broadcast_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of ``mean``/``std`` as tensors broadcasting over one sample of ``sample_shape``."""
        if self.scalar:
            return (1,) * len(sample_shape)
        if not 0 <= self.axis < len(sample_shape) or sample_shape[self.axis] != len(self.std):
            raise DataError(
                f"normalization: {len(self.std)} values along axis {self.axis} do not fit samples of shape "
                f"{tuple(sample_shape)}"
            )
        return tuple(len(self.std) if i == self.axis else 1 for i in range(len(sample_shape)))

    def tensors(self, sample_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as float32 tensors of :meth:`broadcast_shape` (no sample axis)."""
        shape = self.broadcast_shape(sample_shape)
        mean = torch.tensor(self.mean, dtype=torch.float32).reshape(shape)
        std = torch.tensor(self.std, dtype=torch.float32).reshape(shape)
        return mean, std

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "axis": self.axis}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalization:
        return cls(tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]), int(d.get("axis", 0)))


#: the units of values stored already standardised (data written before models standardised their inputs)
STANDARDISED = "standardised"
#: units of images stored as intensities in [0, 1]
PIXEL_UNITS = "pixel intensity in [0, 1]"
#: units of waveforms stored as amplitudes in [-1, 1]
WAVEFORM_UNITS = "waveform amplitude in [-1, 1]"
#: ``DatasetMeta.info`` key mapping a modality to the front end the model applies to it (a waveform's
#: log-mel spectrogram; see :mod:`mmrobust.models.transform`)
FRONT_ENDS = "front_ends"


@dataclass(frozen=True)
class ModalitySpec:
    """One modality of a dataset.

    Attributes:
        name: key of the modality in every batch dict.
        kind: one of :data:`KINDS`; picks the default encoder.
        shape: per-sample shape. ``vector``: ``(D,)``; ``sequence``: ``(channels, length)``;
            ``image``/``spectrogram``: ``(C, H, W)``; ``video``: ``(T, C, H, W)``.
        valid_range: ``(low, high)`` bounds of valid inputs **in the stored units** (what a batch
            holds and an attack perturbs), or ``None`` when any value is valid. Attacks clamp to it.
        units: what the stored values measure, e.g. ``"pixel intensity in [0, 1]"`` or
            ``"waveform amplitude in [-1, 1]"``; :data:`STANDARDISED` for values stored already
            standardised (then ``normalization`` is None and budgets are in standardised units).
        normalization: the standardisation the model applies first (a buffer of the model), or None.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    valid_range: tuple[float, float] | None = None
    units: str = STANDARDISED
    normalization: Normalization | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"modality '{self.name}': unknown kind '{self.kind}'; choose from: {', '.join(KINDS)}")
        expected = {"vector": 1, "sequence": 2, "image": 3, "spectrogram": 3, "video": 4}[self.kind]
        if len(self.shape) != expected:
            raise DataError(
                f"modality '{self.name}' of kind '{self.kind}' needs {expected}-d samples, got shape {tuple(self.shape)}"
            )
        if self.valid_range is not None and not self.valid_range[0] < self.valid_range[1]:
            raise DataError(f"modality '{self.name}': valid_range {self.valid_range} is empty")
        if not isinstance(self.units, str) or not self.units:
            raise DataError(f"modality '{self.name}': units must be a non-empty string, got {self.units!r}")
        if self.normalization is not None:
            self.normalization.broadcast_shape(self.shape)  # fits the samples, or a one-line error

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "shape": list(self.shape)}
        d["valid_range"] = list(self.valid_range) if self.valid_range is not None else None
        d["units"] = self.units
        d["normalization"] = self.normalization.to_dict() if self.normalization is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModalitySpec:
        vr = d.get("valid_range")
        norm = d.get("normalization")
        return cls(
            d["name"], d["kind"], tuple(int(s) for s in d["shape"]), tuple(vr) if vr is not None else None,
            str(d.get("units", STANDARDISED)), Normalization.from_dict(norm) if norm is not None else None,
        )  # fmt: skip


@dataclass
class DatasetMeta:
    """What a model and an attack need to know about a dataset."""

    name: str
    modalities: list[ModalitySpec]
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.modalities) < 2:
            raise DataError(f"dataset '{self.name}' has {len(self.modalities)} modality; mmrobust needs at least 2")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise DataError(f"dataset '{self.name}': duplicate modality names {names}")
        if len(self.class_names) < 2:
            raise DataError(f"dataset '{self.name}' has {len(self.class_names)} class; need at least 2")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def spec(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise DataError(f"unknown modality '{name}'; this dataset has: {', '.join(self.modality_names)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modalities": [m.to_dict() for m in self.modalities],
            "class_names": list(self.class_names),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetMeta:
        return cls(
            d["name"],
            [ModalitySpec.from_dict(m) for m in d["modalities"]],
            list(d["class_names"]),
            dict(d.get("info", {})),
        )


@dataclass
class Split:
    """One split held in memory: a dict of modality tensors and the labels."""

    inputs: Batch
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor | slice) -> tuple[Batch, torch.Tensor]:
        return {k: v[index] for k, v in self.inputs.items()}, self.labels[index]

    def subset(self, index: torch.Tensor | slice) -> Split:
        inputs, labels = self.take(index)
        return Split(inputs, labels)


@dataclass
class DataBundle:
    """Train/val/test splits plus metadata. ``source`` records how to rebuild it exactly."""

    meta: DatasetMeta
    train: Split
    val: Split
    test: Split
    source: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split '{name}'; choose from: train, val, test")
        return getattr(self, name)


def validate_split(meta: DatasetMeta, split: Split, where: str, check_finite: bool = True) -> None:
    """Check a split against the metadata; every message names the offending array.

    ``check_finite=False`` skips the one pass over every value (for loaders that already made it).
    """
    n = len(split)
    if split.labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise DataError(f"{where}: 'label' must be an integer array, got {split.labels.dtype}")
    if split.labels.ndim != 1:
        raise DataError(f"{where}: 'label' must be 1-d, got shape {tuple(split.labels.shape)}")
    if n == 0:
        raise DataError(f"{where}: no samples")
    lo, hi = int(split.labels.min()), int(split.labels.max())
    if lo < 0 or hi >= meta.num_classes:
        raise DataError(f"{where}: 'label' values must be in 0..{meta.num_classes - 1}, found {lo}..{hi}")
    extra = set(split.inputs) - set(meta.modality_names)
    if extra:
        raise DataError(f"{where}: unknown modality array(s) {sorted(extra)}; expected {meta.modality_names}")
    for spec in meta.modalities:
        if spec.name not in split.inputs:
            raise DataError(f"{where}: modality '{spec.name}' is missing")
        x = split.inputs[spec.name]
        if x.shape[0] != n:
            raise DataError(f"{where}: '{spec.name}' has {x.shape[0]} samples but 'label' has {n}")
        if tuple(x.shape[1:]) != spec.shape:
            raise DataError(f"{where}: '{spec.name}' samples have shape {tuple(x.shape[1:])}, expected {spec.shape}")
        if not torch.is_floating_point(x):
            raise DataError(f"{where}: '{spec.name}' must be a float array, got {x.dtype}")
        if check_finite and not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            raise DataError(f"{where}: '{spec.name}' contains NaN or inf values in {bad} sample(s)")


#: code that needs many samples at once (AutoAttack's per-set protocol, smoothing) takes them in
#: chunks of at most this many bytes of float32 inputs, so on-disk splits are never loaded whole
CHUNK_BYTES = 256 << 20


def chunk_rows(meta: DatasetMeta, budget_bytes: int = CHUNK_BYTES) -> int:
    """How many samples' float32 inputs fit in ``budget_bytes`` (at least 1)."""
    per_sample = sum(4 * math.prod(m.shape) for m in meta.modalities)
    return max(1, budget_bytes // max(1, per_sample))


def validate_batch(meta: DatasetMeta, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor | None = None) -> None:
    """Validate a user-supplied batch at the API boundary (shapes, names, finiteness, labels)."""
    if not isinstance(inputs, Mapping):
        raise DataError(f"inputs must be a dict {{modality_name: tensor}}, got {type(inputs).__name__}")
    n = next(iter(inputs.values())).shape[0] if inputs else 0
    lab = labels if labels is not None else torch.zeros(n, dtype=torch.long)
    validate_split(meta, Split(dict(inputs), lab), "batch")


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[Batch, torch.Tensor]]:
    """Yield ``(inputs, labels)`` batches, gathering whole batches by index (fast on CPU).

    An on-disk split streams the same batches, in the same order, through a
    ``torch.utils.data.DataLoader`` (see :mod:`mmrobust.data.ondisk`).

    With ``world_size > 1`` each rank gets its own shard exactly as ``DistributedSampler`` does
    (same padding, same per-epoch shuffle), so single- and multi-process runs see the same data.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    n = len(split)
    if world_size > 1 or shuffle:
        # one sampler for every case: rank r of W processes sees order[r::W] of the same permutation,
        # so W processes with batch B/W step through exactly the batches one process with B sees
        sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
            range(n),  # type: ignore[arg-type]  # any sized sequence works; only its length is read
            num_replicas=world_size,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
    else:
        order = torch.arange(n)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    batches = [order[start : start + batch_size] for start in range(0, stop, batch_size)]
    stream = getattr(split, "stream", None)
    if stream is not None:  # an on-disk split: whole batches read by a DataLoader (workers, prefetch)
        yield from stream(batches)
        return
    for idx in batches:
        yield split.take(idx)


def stratified_split(labels: np.ndarray, fractions: tuple[float, float], rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of train/val/test, the same fractions within every class."""
    parts: list[list[np.ndarray]] = [[], [], []]
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_val, n_test = round(len(idx) * fractions[0]), round(len(idx) * fractions[1])
        parts[0].append(idx[n_val + n_test :])
        parts[1].append(idx[:n_val])
        parts[2].append(idx[n_val : n_val + n_test])
    return [np.sort(np.concatenate(p)) for p in parts]
