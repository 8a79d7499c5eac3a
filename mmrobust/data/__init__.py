"""Data layer: the batch protocol, bundled and user datasets."""

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
from mmrobust.data.registry import DATASETS, DataConfig, dataset_folder, load_data

__all__ = [
    "DATASETS",
    "Batch",
    "DataBundle",
    "DataConfig",
    "DatasetMeta",
    "ModalitySpec",
    "Split",
    "dataset_folder",
    "iterate_batches",
    "load_data",
    "validate_batch",
    "validate_split",
]
