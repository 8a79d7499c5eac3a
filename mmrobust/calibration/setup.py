"""A calibration problem: the frozen model, the data it is calibrated and evaluated on, and the
checks that turn bad input into one-line errors before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmrobust.calibration.pipeline import BindModel
from mmrobust.data.base import DataBundle, DatasetMeta
from mmrobust.errors import ConfigError, DataError

#: samples fed through each encoder by :func:`check_setup`
PROBE_SAMPLES = 8


@dataclass
class CalibrationSetup:
    """The frozen model (no heads), the dataset metadata (each modality's valid input range) and
    the train / val / test splits. ``info`` describes how it was built (shown in reports)."""

    model: BindModel
    meta: DatasetMeta
    data: DataBundle
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_setup(self.model, self.meta, self.data)


def check_setup(model: BindModel, meta: DatasetMeta, data: DataBundle) -> None:
    """Every encoded modality exists in the data and has a valid range (l-inf attacks need one),
    and each encoder returns finite ``(N, D)`` embeddings with the centres' dimension ``D``."""
    for m in model.modalities:
        if m not in meta.modality_names:
            raise ConfigError(
                f"encoder for '{m}' but the data has no such modality; it has: {', '.join(meta.modality_names)}"
            )
        if meta.spec(m).valid_range is None:
            raise ConfigError(
                f"modality '{m}' has no valid input range; l-inf attacks (eps in (0, 1]) need one: "
                "give the modality a valid_range in the dataset metadata"
            )
        x = data.train.inputs[m][:PROBE_SAMPLES]
        with torch.no_grad():
            z = model.features(m, x)
        check_finite(z, m, "probe")
        if z.shape[1] != model.dim(m):
            raise ConfigError(
                f"centres for '{m}' have dimension {model.dim(m)} but encoder '{m}' returns {z.shape[1]}-d embeddings"
            )


def check_finite(z: torch.Tensor, m: str, what: str) -> None:
    """A one-line error when encoder ``m`` returned NaN or inf for some of the ``what`` samples."""
    bad = int((~torch.isfinite(z)).flatten(1).any(1).sum())
    if bad:
        raise DataError(f"encoder '{m}' returned NaN or inf embeddings for {bad} of {len(z)} {what} sample(s)")
