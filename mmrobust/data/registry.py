"""Dataset registry and the single entry point :func:`load_data`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrobust.data.base import DataBundle, validate_split
from mmrobust.errors import ConfigError, DataError
from mmrobust.registry import Registry

#: name -> ``loader(seed, **options) -> DataBundle``; the bundled datasets register on first look-up
DATASETS: Registry[Callable[..., DataBundle]] = Registry(
    "dataset", modules=("mmrobust.data.avdigits", "mmrobust.data.synthetic")
)


def dataset_folder(name: str) -> Path | None:
    """The folder a dataset name stands for (absolute, ``~`` expanded), or None when it is not a folder.

    The one rule for "is this dataset name a folder": a name that is not a registered dataset is a
    folder when it is written like a path (holds ``/``, starts with ``.`` or ``~``) or names an
    existing directory. A registered name wins over a directory of the same name. Whether a path-like
    name exists is not checked here: loading it says so.
    """
    if name in DATASETS or not ("/" in name or name.startswith((".", "~")) or Path(name).is_dir()):
        return None
    return Path(name).expanduser().absolute()


@dataclass
class DataConfig:
    """Which data to load. ``name`` is a registered dataset or a folder path (bring your own)."""

    name: str = "avdigits"
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"data name must be a non-empty string, got {self.name!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in 0..2^63-1, got {self.seed!r}")
        if not isinstance(self.options, dict):
            raise ConfigError(f"data options must be a mapping of KEY: VALUE, got {self.options!r}")
        folder = dataset_folder(self.name)
        if folder is not None:
            # a run must find its data from any working directory: keep folders as absolute paths
            self.name = str(folder)


def fingerprint(bundle: DataBundle) -> str:
    """sha256 over every split's arrays and labels (names, shapes, dtypes and bytes), in a fixed order.

    An on-disk dataset is not read: its fingerprint covers meta.json (with the sha256 of every array,
    computed once when it was written) and the file sizes.
    """
    from mmrobust.data.ondisk import DiskSplit, ondisk_fingerprint

    if isinstance(bundle.train, DiskSplit):
        return ondisk_fingerprint(bundle.train.where.rsplit("/", 1)[0])
    h = hashlib.sha256()
    for split_name in ("train", "val", "test"):
        split = bundle.split(split_name)
        for name in sorted(split.inputs) + ["label"]:
            t = split.labels if name == "label" else split.inputs[name]
            t = t.detach().cpu().contiguous()
            h.update(f"{split_name}/{name}/{tuple(t.shape)}/{t.dtype};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_data(cfg: DataConfig) -> DataBundle:
    """Load (and validate) a dataset by registered name or folder path."""
    from mmrobust.data.ondisk import is_ondisk, open_ondisk

    if cfg.name in DATASETS:
        bundle = DATASETS.get(cfg.name)(seed=cfg.seed, **cfg.options)
        check_finite = True
    elif (folder := dataset_folder(cfg.name)) is None:
        raise DataError(
            f"unknown dataset '{cfg.name}': not a registered name ({', '.join(DATASETS.names())}) nor an existing folder"
        )
    elif is_ondisk(folder):
        # streamed from disk: values were validated once when written, shapes/dtypes at open
        bundle = open_ondisk(folder, seed=cfg.seed, **cfg.options)
        check_finite = False
    else:
        from mmrobust.data.folder import load_folder

        bundle = load_folder(folder, seed=cfg.seed, **cfg.options)
        check_finite = False  # load_folder checked every value once, before fitting the normalisation
    if bundle.source.get("format") is None:
        for split in ("train", "val", "test"):
            validate_split(bundle.meta, bundle.split(split), f"{bundle.meta.name}/{split}", check_finite=check_finite)
    bundle.source = {
        "name": cfg.name,
        "seed": cfg.seed,
        "options": dict(cfg.options),
        **bundle.source,
        "fingerprint": fingerprint(bundle),
    }
    return bundle
