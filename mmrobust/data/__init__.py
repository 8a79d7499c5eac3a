"""Data layer: the batch protocol, bundled and user datasets."""

from mmrobust.data import avdigits as _avdigits  # noqa: F401  (registers "avdigits")
from mmrobust.data import synthetic as _synthetic  # noqa: F401  (registers "synthetic")
from mmrobust.data.base import (
    Batch,
    DataBundle,
    DatasetMeta,
    ModalitySpec,
    Split,
    iterate_batches,
    validate_batch,
    validate_split,
)
from mmrobust.data.registry import DATASETS, DataConfig, load_data

__all__ = [
    "DATASETS",
    "Batch",
    "DataBundle",
    "DataConfig",
    "DatasetMeta",
    "ModalitySpec",
    "Split",
    "iterate_batches",
    "load_data",
    "validate_batch",
    "validate_split",
]
