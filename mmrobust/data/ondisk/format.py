"""The on-disk format itself: meta.json (schema, version, storage dtypes, split sizes) and the
shape and dtype each array file must declare.

A folder is *complete* when meta.json says so and records every array's sha256;
:func:`open_complete` checks all that plus every array header, reading no array data.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrobust.data.base import DatasetMeta
from mmrobust.data.ondisk.arrays import ArrayFile, array_file, digest_and_check
from mmrobust.errors import DataError

FORMAT = "mmrobust-ondisk"
VERSION = 1
SPLITS = ("train", "val", "test")
DTYPES = ("float32", "float16", "uint8")


@dataclass(frozen=True)
class Storage:
    """How one modality is stored on disk. Model input = (stored * scale - mean) / std (float32)."""

    dtype: str = "float32"  # one of "float32", "float16", "uint8"; validated
    scale: float = 1.0  # finite, > 0
    mean: float = 0.0  # finite
    std: float = 1.0  # finite, > 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise DataError(f"storage dtype {self.dtype!r} is not supported; choose from: {', '.join(DTYPES)}")
        for name in ("scale", "mean", "std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise DataError(f"storage {name} must be a finite number, got {v!r}")
        if not self.scale > 0 or not self.std > 0:
            raise DataError(f"storage scale and std must be > 0, got scale={self.scale!r} std={self.std!r}")

    @property
    def identity(self) -> bool:
        return self.dtype == "float32" and self.scale == 1.0 and self.mean == 0.0 and self.std == 1.0

    def decode(self, x: np.ndarray) -> torch.Tensor:
        """Stored rows -> float32 model input."""
        t = torch.from_numpy(np.ascontiguousarray(x))
        if self.identity:
            return t
        t = t.to(torch.float32)
        if self.scale != 1.0:
            t = t.mul_(self.scale)
        if self.mean != 0.0:
            t = t.sub_(self.mean)
        if self.std != 1.0:
            t = t.div_(self.std)
        return t

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Storage:
        if not isinstance(d, dict) or set(d) - {"dtype", "scale", "mean", "std"}:
            raise DataError(f"{where}: storage must be an object with dtype, scale, mean, std; got {d!r}")
        return cls(**d)


def is_ondisk(path: str | Path) -> bool:
    """True when ``path`` is a folder whose meta.json declares a format (this one, complete or not, or
    another one that :func:`open_ondisk` then refuses by name)."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        d = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(d, dict) and "format" in d  # an npz folder's meta.json has no format key


def read_meta(root: Path) -> dict[str, Any]:
    path = root / "meta.json"
    if not path.is_file():
        raise DataError(f"{root}: no meta.json; not an on-disk dataset folder")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        fmt = d.get("format") if isinstance(d, dict) else None
        raise DataError(f"{path}: format is {fmt!r}, expected {FORMAT!r}")
    if d.get("version") != VERSION:
        raise DataError(
            f"{path}: format version {d.get('version')!r} is not supported (this mmrobust reads version {VERSION})"
        )
    for key in ("complete", "name", "modalities", "class_names", "storage", "sizes"):
        if key not in d:
            raise DataError(f"{path}: missing key '{key}'")
    return d


def _check_shapes(where: str, d: dict[str, Any], meta: DatasetMeta) -> None:
    """Declared shapes are bounded before anything is allocated or built from them: one sample of a
    modality at most ``LIMITS['sample_elements']`` values, every split's arrays at most the array limit."""
    from mmrobust.io import LIMITS

    most = int(LIMITS["sample_elements"][1])
    for m in meta.modalities:
        n = math.prod(m.shape)
        if any(s < 1 for s in m.shape) or n > most:
            raise DataError(
                f"{where}: modality '{m.name}' declares shape {tuple(m.shape)} ({n:,} values per sample); "
                f"each dimension must be >= 1 and a sample at most {most:,} values"
            )


def parse_meta(root: Path, d: dict[str, Any]) -> tuple[DatasetMeta, dict[str, Storage], dict[str, int]]:
    where = str(root / "meta.json")
    try:
        meta = DatasetMeta.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: bad dataset description ({exc})") from None
    _check_shapes(where, d, meta)
    storage_d = d["storage"]
    if not isinstance(storage_d, dict) or set(storage_d) != set(meta.modality_names):
        raise DataError(f"{where}: 'storage' must name exactly the modalities {meta.modality_names}")
    storage = {m: Storage.from_dict(storage_d[m], f"{where} storage['{m}']") for m in meta.modality_names}
    sizes = d["sizes"]
    if not isinstance(sizes, dict) or set(sizes) != set(SPLITS):
        raise DataError(f"{where}: 'sizes' must give train, val and test, got {sizes!r}")
    for s, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1 << 40:
            raise DataError(f"{where}: sizes['{s}'] must be an integer in [1, {1 << 40}], got {n!r}")
    return meta, storage, dict(sizes)


def array_names(meta: DatasetMeta) -> list[str]:
    return [*meta.modality_names, "label"]


def expected_array(meta: DatasetMeta, storage: Mapping[str, Storage], n: int, name: str) -> tuple[tuple[int, ...], str]:
    if name == "label":
        return (n,), "int64"
    return (n, *meta.spec(name).shape), storage[name].dtype


def meta_json(
    meta: DatasetMeta, sizes: Mapping[str, int], storage: Mapping[str, Storage], complete: bool
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "complete": complete,
        **meta.to_dict(),
        "storage": {m: storage[m].to_dict() for m in meta.modality_names},
        "sizes": {s: int(sizes[s]) for s in SPLITS},
    }


def open_complete(
    root: Path,
) -> tuple[dict[str, Any], DatasetMeta, dict[str, Storage], dict[str, int], dict[str, dict[str, ArrayFile]]]:
    """meta.json of a complete folder, parsed, and every array file's header checked against it."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    d = read_meta(root)
    if d["complete"] is not True:
        raise DataError(f"{root}: dataset is incomplete (interrupted write); rerun the import/convert to resume")
    meta, storage, sizes = parse_meta(root, d)
    digests = d.get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(SPLITS):
        raise DataError(f"{root / 'meta.json'}: missing or malformed 'sha256' digests")
    arrays = {
        split: {
            name: array_file(root / split / f"{name}.npy", *expected_array(meta, storage, sizes[split], name))
            for name in array_names(meta)
        }
        for split in SPLITS
    }
    return d, meta, storage, sizes, arrays


def verify_splits(root: Path, splits: Sequence[str]) -> None:
    """Re-hash the arrays of ``splits`` against the sha256 in meta.json, checking their values as they
    stream (finite, inside the declared valid range, labels in range); the first changed or bad array
    is named in a one-line :class:`DataError`. Memory stays at one chunk."""
    d, meta, storage, _, arrays = open_complete(root)
    for split in splits:
        for name, f in arrays[split].items():
            st = storage.get(name)
            vr = meta.spec(name).valid_range if name != "label" else None
            fd = os.open(f.path, os.O_RDONLY)
            try:
                digest = digest_and_check(fd, f, name, meta.num_classes, st.decode if st is not None else None, vr)
            finally:
                os.close(fd)
            if digest != d["sha256"][split].get(name):
                raise DataError(
                    f"{f.path}: changed since the dataset was written (sha256 differs from meta.json); "
                    "restore it, or convert or import the data again"
                )
