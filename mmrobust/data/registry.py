"""Dataset registry and the single entry point :func:`load_data`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrobust.data.base import DataBundle, validate_split
from mmrobust.errors import ConfigError, DataError
from mmrobust.registry import Registry

#: name -> ``loader(seed, **options) -> DataBundle``
DATASETS: Registry[Callable[..., DataBundle]] = Registry("dataset")


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


def load_data(cfg: DataConfig) -> DataBundle:
    """Load (and validate) a dataset by registered name or folder path."""
    if cfg.name in DATASETS:
        bundle = DATASETS.get(cfg.name)(seed=cfg.seed, **cfg.options)
    elif Path(cfg.name).exists() or "/" in cfg.name or cfg.name.startswith("."):
        from mmrobust.data.folder import load_folder

        bundle = load_folder(cfg.name, seed=cfg.seed, **cfg.options)
    else:
        raise DataError(
            f"unknown dataset '{cfg.name}': not a registered name ({', '.join(DATASETS.names())}) nor an existing folder"
        )
    for split in ("train", "val", "test"):
        validate_split(bundle.meta, bundle.split(split), f"{bundle.meta.name}/{split}")
    bundle.source = {"name": cfg.name, "seed": cfg.seed, "options": dict(cfg.options), **bundle.source}
    return bundle
