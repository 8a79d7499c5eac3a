"""An on-disk dataset format that streams: one memory-mapped ``.npy`` per modality and split.

Layout of a dataset folder::

    meta.json                 format, version, complete, the DatasetMeta fields, storage, sizes, sha256
    train/<modality>.npy      (n, *shape) in the stored dtype (float32, float16 or uint8)
    train/label.npy           (n,) int64
    val/...  test/...

A modality's model input is ``(stored * scale - mean) / std`` in float32, decoded batch by batch
(uint8 frames take a quarter of the disk and page cache of float32). :class:`DiskWriter` writes a
folder chunk by chunk and can resume an interrupted write; :func:`open_ondisk` opens a complete one
without reading its arrays (headers only), and :class:`DiskSplit` reads only the rows asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrobust.data.base import DataBundle, DatasetMeta, Split
from mmrobust.errors import DataError
from mmrobust.io import write_json

FORMAT = "mmrobust-ondisk"
VERSION = 1
SPLITS = ("train", "val", "test")
DTYPES = ("float32", "float16", "uint8")
#: rows per chunk are chosen so that one chunk is about this many bytes
CHUNK_BYTES = 64 << 20
#: materialising ``DiskSplit.inputs`` is refused above this many decoded bytes ($MMROBUST_MAX_INPUTS_GB)
DEFAULT_MAX_INPUTS_GB = 1.0
_PROGRESS = "progress.json"

ProgressFn = Callable[[str, int, int], None]


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
    """True when ``path`` is a folder whose meta.json declares this format (complete or not)."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        d = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(d, dict) and d.get("format") == FORMAT


def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def _read_meta(root: Path) -> dict[str, Any]:
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


def _parse(root: Path, d: dict[str, Any]) -> tuple[DatasetMeta, dict[str, Storage], dict[str, int]]:
    where = str(root / "meta.json")
    try:
        meta = DatasetMeta.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: bad dataset description ({exc})") from None
    storage_d = d["storage"]
    if not isinstance(storage_d, dict) or set(storage_d) != set(meta.modality_names):
        raise DataError(f"{where}: 'storage' must name exactly the modalities {meta.modality_names}")
    storage = {m: Storage.from_dict(storage_d[m], f"{where} storage['{m}']") for m in meta.modality_names}
    sizes = d["sizes"]
    if not isinstance(sizes, dict) or set(sizes) != set(SPLITS):
        raise DataError(f"{where}: 'sizes' must give train, val and test, got {sizes!r}")
    for s, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"{where}: sizes['{s}'] must be an integer >= 1, got {n!r}")
    return meta, storage, dict(sizes)


def _array_names(meta: DatasetMeta) -> list[str]:
    return [*meta.modality_names, "label"]


def _open_array(path: Path, mode: str, shape: tuple[int, ...], dtype: str) -> np.memmap:
    """Open one array by memory map, checking shape and dtype from its header (reads no data)."""
    if not path.is_file():
        raise DataError(f"{path}: file missing")
    try:
        arr = np.load(path, mmap_mode=mode, allow_pickle=False)  # type: ignore[call-overload]
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.memmap):
        raise DataError(f"{path}: not a memory-mappable .npy array")
    if tuple(arr.shape) != shape:
        raise DataError(f"{path}: shape {tuple(arr.shape)}, expected {shape}")
    if arr.dtype != np.dtype(dtype):
        raise DataError(f"{path}: dtype {arr.dtype}, expected {dtype}")
    if not arr.flags.c_contiguous:
        raise DataError(f"{path}: array is not C-ordered")
    return arr


def _expected(meta: DatasetMeta, storage: Mapping[str, Storage], n: int, name: str) -> tuple[tuple[int, ...], str]:
    if name == "label":
        return (n,), "int64"
    return (n, *meta.spec(name).shape), storage[name].dtype


class DiskWriter:
    """Writes a dataset folder split by split, chunk by chunk; resumable.

    ``written[split]`` lists the ``[start, stop)`` row ranges already on disk (flushed), so an
    importer interrupted at any point can :meth:`reopen` the folder and write only what is missing.
    """

    def __init__(
        self,
        root: Path,
        meta: DatasetMeta,
        sizes: dict[str, int],
        storage: dict[str, Storage],
        written: dict[str, list[list[int]]],
    ) -> None:
        self.root, self.meta, self.sizes, self.storage = root, meta, sizes, storage
        self.written = written
        self._arrays: dict[str, dict[str, np.memmap]] = {}
        for split in SPLITS:
            self._arrays[split] = {
                name: _open_array(root / split / f"{name}.npy", "r+", *_expected(meta, storage, sizes[split], name))
                for name in _array_names(meta)
            }

    # -- creation -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, root: str | Path, meta: DatasetMeta, sizes: Mapping[str, int], storage: Mapping[str, Storage]
    ) -> DiskWriter:
        """Start a new dataset folder: meta.json (``complete: false``) and preallocated arrays."""
        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise DataError(f"{root}: already exists and is not an empty folder")
        if not isinstance(meta, DatasetMeta):
            raise DataError(f"meta must be a DatasetMeta, got {type(meta).__name__}")
        if set(sizes) != set(SPLITS):
            raise DataError(f"sizes must give exactly train, val and test, got {sorted(sizes)}")
        for s in SPLITS:
            n = sizes[s]
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
                raise DataError(f"sizes['{s}'] must be an integer >= 1, got {n!r}")
        if set(storage) != set(meta.modality_names):
            raise DataError(f"storage must name exactly the modalities {meta.modality_names}, got {sorted(storage)}")
        for m, st in storage.items():
            if not isinstance(st, Storage):
                raise DataError(f"storage['{m}'] must be a Storage, got {type(st).__name__}")
        sizes_ = {s: int(sizes[s]) for s in SPLITS}
        storage_ = {m: storage[m] for m in meta.modality_names}
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / "meta.json", _meta_json(meta, sizes_, storage_, complete=False))
        for split in SPLITS:
            (root / split).mkdir()
            for name in _array_names(meta):
                shape, dtype = _expected(meta, storage_, sizes_[split], name)
                arr = np.lib.format.open_memmap(root / split / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                del arr  # sparse file: the OS allocates blocks as rows are written
        written: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        write_json(root / _PROGRESS, written)
        return cls(root, meta, sizes_, storage_, written)

    @classmethod
    def reopen(cls, root: str | Path) -> DiskWriter:
        """Reopen an incomplete dataset folder to resume writing (arrays opened ``r+``)."""
        root = Path(root)
        d = _read_meta(root)
        if d["complete"]:
            raise DataError(f"{root}: dataset is already complete; nothing to resume")
        meta, storage, sizes = _parse(root, d)
        written: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        prog = root / _PROGRESS
        if prog.is_file():
            try:
                p = json.loads(prog.read_text())
                written = {s: [[int(a), int(b)] for a, b in p.get(s, [])] for s in SPLITS}
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
                written = {s: [] for s in SPLITS}  # unknown progress: everything is rewritten
        return cls(root, meta, sizes, storage, written)

    # -- writing --------------------------------------------------------------------------------

    def missing(self, split: str) -> list[tuple[int, int]]:
        """``[start, stop)`` row ranges of ``split`` not written yet (what a resumed writer must do)."""
        self._check_split(split)
        out, pos = [], 0
        for a, b in self.written[split]:
            if a > pos:
                out.append((pos, a))
            pos = max(pos, b)
        if pos < self.sizes[split]:
            out.append((pos, self.sizes[split]))
        return out

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)}")

    def write(self, split: str, start: int, inputs: Mapping[str, np.ndarray], labels: np.ndarray) -> None:
        """Write rows ``start .. start+len(labels)`` of ``split``; arrays in the stored dtype and shape."""
        self._check_split(split)
        where = f"{self.root}/{split}"
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{where}: labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
        n = labels.shape[0]
        if n == 0:
            return
        if isinstance(start, bool) or not isinstance(start, int | np.integer) or start < 0:
            raise DataError(f"{where}: start must be an integer >= 0, got {start!r}")
        start = int(start)
        if start + n > self.sizes[split]:
            raise DataError(f"{where}: rows {start}..{start + n - 1} past the split size {self.sizes[split]}")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.meta.num_classes:
            raise DataError(f"{where}: label values must be in 0..{self.meta.num_classes - 1}, found {lo}..{hi}")
        if set(inputs) != set(self.meta.modality_names):
            raise DataError(f"{where}: inputs name {sorted(inputs)}, expected {self.meta.modality_names}")
        for name in self.meta.modality_names:
            x = inputs[name]
            if not isinstance(x, np.ndarray):
                raise DataError(f"{where}: '{name}' must be a numpy array, got {type(x).__name__}")
            shape, dtype = _expected(self.meta, self.storage, n, name)
            if tuple(x.shape) != shape:
                raise DataError(f"{where}: '{name}' has shape {tuple(x.shape)}, expected {shape}")
            if x.dtype != np.dtype(dtype):
                raise DataError(f"{where}: '{name}' has dtype {x.dtype}, stored as {dtype}")
            if dtype != "uint8" and not np.isfinite(x).all():
                bad = int((~np.isfinite(x)).reshape(n, -1).any(1).sum())
                raise DataError(f"{where}: '{name}' contains NaN or inf values in {bad} sample(s)")
        arrays = self._arrays[split]
        for name in self.meta.modality_names:
            arrays[name][start : start + n] = inputs[name]
        arrays["label"][start : start + n] = labels.astype(np.int64)
        for arr in arrays.values():
            arr.flush()
        self._mark(split, start, start + n)

    def _mark(self, split: str, a: int, b: int) -> None:
        ranges = sorted([*self.written[split], [a, b]])
        merged: list[list[int]] = []
        for x, y in ranges:
            if merged and x <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], y)
            else:
                merged.append([x, y])
        self.written[split] = merged
        write_json(self.root / _PROGRESS, self.written)

    def finish(self, progress: ProgressFn | None = None) -> None:
        """Check every row was written, validate in chunks, store sha256 per array, mark complete."""
        for split in SPLITS:
            gaps = self.missing(split)
            if gaps:
                a, b = gaps[0]
                raise DataError(f"{self.root}/{split}: rows {a}..{b - 1} were never written ({len(gaps)} gap(s))")
        digests: dict[str, dict[str, str]] = {}
        total = sum(self.sizes.values()) * len(_array_names(self.meta))
        done = 0
        for split in SPLITS:
            digests[split] = {}
            for name, arr in self._arrays[split].items():
                arr.flush()
                digests[split][name] = _digest_and_check(
                    self.root / split / f"{name}.npy", arr, name, self.meta.num_classes
                )
                done += self.sizes[split]
                if progress is not None:
                    progress("verify", done, total)
        self._arrays = {}
        d = _meta_json(self.meta, self.sizes, self.storage, complete=True)
        d["sha256"] = digests
        write_json(self.root / "meta.json", d)
        (self.root / _PROGRESS).unlink(missing_ok=True)


def _digest_and_check(path: Path, arr: np.memmap, name: str, num_classes: int) -> str:
    """sha256 of the whole .npy file (header + rows, read in chunks) and a finiteness/label check."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(arr.offset))
    n = arr.shape[0]
    step = _rows_per_chunk(arr[:1].nbytes)
    for a in range(0, n, step):
        chunk = np.ascontiguousarray(arr[a : a + step])
        if name == "label":
            lo, hi = int(chunk.min()), int(chunk.max())
            if lo < 0 or hi >= num_classes:
                raise DataError(f"{path}: label values must be in 0..{num_classes - 1}, found {lo}..{hi}")
        elif chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            raise DataError(f"{path}: contains NaN or inf values (rows {a}..{min(n, a + step) - 1})")
        h.update(chunk.data)
    return h.hexdigest()


def _meta_json(
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


def remove_tree(path: Path) -> None:
    """Delete a (partial) dataset folder."""
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["FORMAT", "VERSION", "DataBundle", "DiskWriter", "Split", "Storage", "is_ondisk"]
