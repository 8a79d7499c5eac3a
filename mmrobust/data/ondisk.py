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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmrobust.data.base import Batch, DataBundle, DatasetMeta, Split
from mmrobust.errors import ConfigError, DataError
from mmrobust.io import write_json

if TYPE_CHECKING:
    from mmrobust.progress import ProgressFn

FORMAT = "mmrobust-ondisk"
VERSION = 1
SPLITS = ("train", "val", "test")
DTYPES = ("float32", "float16", "uint8")
#: rows per chunk are chosen so that one chunk is about this many bytes
CHUNK_BYTES = 64 << 20
#: materialising ``DiskSplit.inputs`` is refused above this many decoded bytes ($MMROBUST_MAX_INPUTS_GB)
DEFAULT_MAX_INPUTS_GB = 1.0
_PROGRESS = "progress.json"


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


@dataclass(frozen=True)
class _ArrayFile:
    """One ``.npy`` file read and written by offset (no memory map: RSS stays at what a batch needs)."""

    path: Path
    offset: int  # bytes of the header
    row_bytes: int
    rows: int
    dtype: np.dtype
    row_shape: tuple[int, ...]


def _array_file(path: Path, shape: tuple[int, ...], dtype: str) -> _ArrayFile:
    """Check one array's header (shape, dtype, order) and file size; reads no data."""
    if not path.is_file():
        raise DataError(f"{path}: file missing")
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, fortran, got_dtype = reader(fh)
            offset = fh.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
    if tuple(got_shape) != shape:
        raise DataError(f"{path}: shape {tuple(got_shape)}, expected {shape}")
    if got_dtype != np.dtype(dtype):
        raise DataError(f"{path}: dtype {got_dtype}, expected {dtype}")
    if fortran:
        raise DataError(f"{path}: array is Fortran-ordered, expected C order")
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * got_dtype.itemsize
    size = path.stat().st_size
    if size != offset + row_bytes * shape[0]:
        raise DataError(f"{path}: file has {size:,} bytes, expected {offset + row_bytes * shape[0]:,} (truncated?)")
    return _ArrayFile(path, offset, row_bytes, shape[0], got_dtype, tuple(shape[1:]))


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    while len(buf):
        got = os.preadv(fd, [buf], offset)
        if got <= 0:
            raise DataError(f"{path}: unexpected end of file")
        buf, offset = buf[got:], offset + got


def _read_rows(fd: int, f: _ArrayFile, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of one array, one read per run of consecutive rows."""
    out = np.empty((len(rows), *f.row_shape), dtype=f.dtype)
    if len(rows) == 0:
        return out
    flat = out.reshape(-1).view(np.uint8).data
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        _pread_into(fd, flat[a * f.row_bytes : b * f.row_bytes], f.offset + int(rows[a]) * f.row_bytes, f.path)
    return out


def _write_rows(fd: int, f: _ArrayFile, start: int, x: np.ndarray) -> None:
    data = np.ascontiguousarray(x).reshape(-1).view(np.uint8).data
    offset = f.offset + start * f.row_bytes
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


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
        self._files = {
            split: {
                name: _array_file(root / split / f"{name}.npy", *_expected(meta, storage, sizes[split], name))
                for name in _array_names(meta)
            }
            for split in SPLITS
        }
        self._fds: dict[str, dict[str, int]] = {
            split: {name: os.open(f.path, os.O_RDWR) for name, f in files.items()}
            for split, files in self._files.items()
        }

    def close(self) -> None:
        """Close the array files (:meth:`finish` does it; a writer given up on can call it)."""
        for fds in self._fds.values():
            for fd in fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        if getattr(self, "_fds", None):
            self.close()

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
                _preallocate(root / split / f"{name}.npy", shape, dtype)
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
        if not self._fds:
            raise DataError(f"{self.root}: writer is closed")
        files, fds = self._files[split], self._fds[split]
        for name in self.meta.modality_names:
            _write_rows(fds[name], files[name], start, inputs[name])
        _write_rows(fds["label"], files["label"], start, labels.astype(np.int64))
        for fd in fds.values():
            os.fdatasync(fd)  # the rows are on disk before the progress file says so
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
            for name, f in self._files[split].items():
                digests[split][name] = _digest_and_check(self._fds[split][name], f, name, self.meta.num_classes)
                done += self.sizes[split]
                if progress is not None:
                    progress("verify", done, total)
        self.close()
        d = _meta_json(self.meta, self.sizes, self.storage, complete=True)
        d["sha256"] = digests
        write_json(self.root / "meta.json", d)
        (self.root / _PROGRESS).unlink(missing_ok=True)


def _preallocate(path: Path, shape: tuple[int, ...], dtype: str) -> None:
    """Write the .npy header and extend the file to its full size (sparse: blocks come as rows are written)."""
    with path.open("wb") as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})  # fmt: skip
        fh.truncate(fh.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)


def _digest_and_check(fd: int, f: _ArrayFile, name: str, num_classes: int) -> str:
    """sha256 of the whole .npy file (header + rows, read in chunks) and a finiteness/label check."""
    h = hashlib.sha256()
    head = np.empty(f.offset, dtype=np.uint8)
    _pread_into(fd, head.data, 0, f.path)
    h.update(head.data)
    step = _rows_per_chunk(f.row_bytes)
    for a in range(0, f.rows, step):
        chunk = _read_rows(fd, f, np.arange(a, min(f.rows, a + step)))
        if name == "label":
            lo, hi = int(chunk.min()), int(chunk.max())
            if lo < 0 or hi >= num_classes:
                raise DataError(f"{f.path}: label values must be in 0..{num_classes - 1}, found {lo}..{hi}")
        elif chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            raise DataError(f"{f.path}: contains NaN or inf values (rows {a}..{min(f.rows, a + step) - 1})")
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


# -- reading -------------------------------------------------------------------------------------


@dataclass
class OnDiskOptions:
    """Options of an on-disk dataset (``--data-opt KEY=VALUE``): how batches are streamed.

    ``workers``: DataLoader worker processes reading batches (0: read in the main process);
    ``prefetch_factor``: batches each worker reads ahead; ``pin_memory``: pin batches when CUDA is
    available; ``max_inputs_gb``: the most a whole split may take when code asks for all of it at
    once (``split.inputs``; small data only).
    """

    workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = True
    max_inputs_gb: float = DEFAULT_MAX_INPUTS_GB

    def __post_init__(self) -> None:
        if not 0 <= self.workers <= 64:
            raise ConfigError(f"data option 'workers' must be in 0..64, got {self.workers}")
        if not 1 <= self.prefetch_factor <= 64:
            raise ConfigError(f"data option 'prefetch_factor' must be in 1..64, got {self.prefetch_factor}")
        if not self.max_inputs_gb > 0:
            raise ConfigError(f"data option 'max_inputs_gb' must be > 0, got {self.max_inputs_gb}")


class _Handles:
    """The array files of one split, opened lazily once per process (workers reopen after a spawn)."""

    def __init__(self, files: dict[str, _ArrayFile]) -> None:
        self.files = files
        self._fds: dict[str, int] = {}

    def fd(self, name: str) -> int:
        if name not in self._fds:
            try:
                self._fds[name] = os.open(self.files[name].path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"{self.files[name].path}: cannot open ({exc.strerror})") from None
        return self._fds[name]

    def __getstate__(self) -> dict[str, Any]:
        return {"files": self.files, "_fds": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


class _BatchReader(torch.utils.data.Dataset):
    """Dataset whose items are whole batches, as stored: ``reader[index_tensor] -> (stored, labels)``.

    Workers send the stored bytes (a uint8 image is a quarter of its float32 form); the main
    process decodes them.
    """

    def __init__(self, split: DiskSplit) -> None:
        self.split = split

    def __getitem__(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        stored, labels = self.split.read_stored(index)
        return {m: torch.from_numpy(x) for m, x in stored.items()}, labels


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only read; the main process decodes and computes


class DiskSplit(Split):
    """One split on disk with the interface of :class:`Split`; reads only the rows asked for.

    ``take`` reads the requested rows (one read per run of consecutive rows) and decodes them to
    float32; ``subset`` is a view (row indices, nothing read); ``labels`` is held in memory.
    """

    def __init__(
        self,
        where: str,
        meta: DatasetMeta,
        storage: Mapping[str, Storage],
        handles: _Handles,
        labels: torch.Tensor,
        rows: np.ndarray | None,
        options: OnDiskOptions,
    ) -> None:
        self.where, self.meta, self.storage, self.handles = where, meta, dict(storage), handles
        self.rows, self.options = rows, options
        self.labels = labels if rows is None else labels[torch.from_numpy(rows)]
        self._all_labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"DiskSplit({self.where!r}, {len(self)} samples)"

    def _positions(self, index: torch.Tensor | slice | np.ndarray) -> np.ndarray:
        n = len(self)
        if isinstance(index, slice):
            pos = np.arange(*index.indices(n), dtype=np.int64)
        else:
            t = torch.as_tensor(index)
            if t.dtype == torch.bool:
                if t.shape != (n,):
                    raise DataError(f"{self.where}: boolean index of shape {tuple(t.shape)} for {n} samples")
                t = t.nonzero().squeeze(1)
            pos = t.reshape(-1).to(torch.int64).numpy()
            if pos.size and (pos.min() < -n or pos.max() >= n):
                raise DataError(f"{self.where}: index out of range for {n} samples")
            pos = np.where(pos < 0, pos + n, pos)
        return pos if self.rows is None else self.rows[pos]

    def read_stored(self, index: torch.Tensor | slice) -> tuple[dict[str, np.ndarray], torch.Tensor]:
        """The rows at positions ``index`` as stored (uint8/float16/float32), and their labels."""
        pos = self._positions(index)
        labels = self._all_labels[torch.from_numpy(pos)]
        if pos.size > 1 and not bool((np.diff(pos) > 0).all()):
            rows, inverse = np.unique(pos, return_inverse=True)
        else:
            rows, inverse = pos, None
        stored = {}
        for m in self.meta.modality_names:
            x = _read_rows(self.handles.fd(m), self.handles.files[m], rows)
            stored[m] = x if inverse is None else x[inverse]
        return stored, labels

    def decode(self, stored: Mapping[str, np.ndarray | torch.Tensor]) -> Batch:
        """Stored rows -> float32 model inputs."""
        return {m: self.storage[m].decode(np.asarray(x)) for m, x in stored.items()}

    def take(self, index: torch.Tensor | slice) -> tuple[Batch, torch.Tensor]:
        stored, labels = self.read_stored(index)
        return self.decode(stored), labels

    def subset(self, index: torch.Tensor | slice) -> DiskSplit:
        return DiskSplit(self.where, self.meta, self.storage, self.handles, self._all_labels,
                         self._positions(index), self.options)  # fmt: skip

    @property
    def inputs(self) -> Batch:
        """The whole split decoded in memory: refused above ``max_inputs_gb`` (use batches instead)."""
        need = len(self) * sum(4 * int(np.prod(s.shape)) for s in self.meta.modalities)
        limit = int(self.options.max_inputs_gb * 2**30)
        if need > limit:
            raise DataError(
                f"{self.where}: this code path needs the whole split in memory ({need / 2**30:.1f} GiB decoded, over "
                f"max_inputs_gb={self.options.max_inputs_gb:g}); raise --data-opt max_inputs_gb or use fewer samples"
            )
        return self.take(slice(None))[0]

    @inputs.setter
    def inputs(self, value: Batch) -> None:
        raise DataError(f"{self.where}: an on-disk split is read-only")

    def stream(self, batches: list[torch.Tensor]) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Read ``batches`` (lists of positions) in order; through a DataLoader when workers > 0 or pinning."""
        o = self.options
        workers = min(o.workers, len(batches))
        pin = o.pin_memory and torch.cuda.is_available()
        if workers == 0 and not pin:
            for idx in batches:
                yield self.take(idx)
            return
        loader = torch.utils.data.DataLoader(
            _BatchReader(self), batch_size=None, sampler=batches, num_workers=workers,
            prefetch_factor=o.prefetch_factor if workers else None, worker_init_fn=_worker_init if workers else None,
        )  # fmt: skip
        for stored, labels in loader:
            inputs = {m: x.numpy() for m, x in stored.items()}
            batch = self.decode(inputs)
            if pin:
                batch, labels = {m: x.pin_memory() for m, x in batch.items()}, labels.pin_memory()
            yield batch, labels


def _open_complete(
    root: Path,
) -> tuple[dict[str, Any], DatasetMeta, dict[str, Storage], dict[str, int], dict[str, dict[str, _ArrayFile]]]:
    """meta.json of a complete folder, parsed, and every array file's header checked against it."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    d = _read_meta(root)
    if d["complete"] is not True:
        raise DataError(f"{root}: dataset is incomplete (interrupted write); rerun the import/convert to resume")
    meta, storage, sizes = _parse(root, d)
    digests = d.get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(SPLITS):
        raise DataError(f"{root / 'meta.json'}: missing or malformed 'sha256' digests")
    arrays = {
        split: {
            name: _array_file(root / split / f"{name}.npy", *_expected(meta, storage, sizes[split], name))
            for name in _array_names(meta)
        }
        for split in SPLITS
    }
    return d, meta, storage, sizes, arrays


def open_ondisk(path: str | Path, seed: int = 0, **options: Any) -> DataBundle:
    """Open a complete on-disk dataset folder; checks meta.json and every array header, reads no inputs."""
    from mmrobust.options import build_options

    opts = build_options(OnDiskOptions, options, "data option")
    root = Path(path)
    _, meta, storage, sizes, arrays = _open_complete(root)
    splits = {}
    for split in SPLITS:
        files = arrays[split]
        handles = _Handles(files)
        label = _read_rows(handles.fd("label"), files["label"], np.arange(sizes[split]))
        if label.min() < 0 or label.max() >= meta.num_classes:  # the labels are read anyway: a cheap check
            raise DataError(
                f"{files['label'].path}: values must be in 0..{meta.num_classes - 1}, found {label.min()}..{label.max()}"
            )
        splits[split] = DiskSplit(f"{root}/{split}", meta, storage, handles, torch.from_numpy(label), None, opts)
    return DataBundle(meta, splits["train"], splits["val"], splits["test"], source={"format": FORMAT})


@dataclass
class VerifyResult:
    """What :func:`verify_ondisk` read: the folder, bytes hashed, and the arrays (``split/name``)
    whose sha256 differs from the one recorded in ``meta.json`` when the folder was written."""

    path: Path
    arrays: int
    bytes: int
    mismatched: list[str]
    seconds: float


def verify_ondisk(path: str | Path, progress: ProgressFn | None = None) -> VerifyResult:
    """Re-read every array of a complete on-disk dataset and compare its sha256 with ``meta.json``.

    Opening a dataset reads no array data (so that opening 50 GB is instant); this is the full check
    for copies, old disks and network file systems. Values are re-validated on the way (finite
    inputs, labels in range: a one-line :class:`DataError` names the file). Nothing is written.
    """
    import time

    t0 = time.perf_counter()
    root = Path(path)
    d, meta, _, sizes, arrays = _open_complete(root)  # a malformed folder fails before any hashing
    names = _array_names(meta)
    total, done, nbytes, mismatched = sum(sizes.values()) * len(names), 0, 0, []
    for split in SPLITS:
        for name, f in arrays[split].items():
            fd = os.open(f.path, os.O_RDONLY)
            try:
                digest = _digest_and_check(fd, f, name, meta.num_classes)
            finally:
                os.close(fd)
            if digest != d["sha256"][split].get(name):
                mismatched.append(f"{split}/{name}")
            nbytes += f.offset + f.rows * f.row_bytes
            done += sizes[split]
            if progress is not None:
                progress("verify", done, total)
    return VerifyResult(root, len(SPLITS) * len(names), nbytes, mismatched, time.perf_counter() - t0)


def ondisk_fingerprint(path: str | Path) -> str:
    """sha256 over meta.json (which holds every array's sha256, computed at write time) and file sizes."""
    root = Path(path)
    d = _read_meta(root)
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode())
    for split in SPLITS:
        for name in sorted(d["storage"]) + ["label"]:
            f = root / split / f"{name}.npy"
            h.update(f"{split}/{name}/{f.stat().st_size};".encode())
    return h.hexdigest()


# -- conversion ----------------------------------------------------------------------------------


@dataclass
class ConvertResult:
    """What :func:`convert` wrote: the folder, split sizes, storage, bytes on disk and the largest
    decode error per modality (0 for float32 storage; uint8 quantisation otherwise)."""

    path: Path
    sizes: dict[str, int]
    storage: dict[str, Storage]
    bytes: int
    max_abs_error: dict[str, float]
    resumed_rows: int
    seconds: float


def uint8_storage(valid_range: tuple[float, float]) -> Storage:
    """uint8 storage spanning ``valid_range`` (model-input space) in 255 steps: 0 -> low, 255 -> high."""
    lo, hi = valid_range
    return Storage("uint8", scale=(hi - lo) / 255.0, mean=-lo, std=1.0)


def _encode(x: torch.Tensor, st: Storage) -> np.ndarray:
    """float32 model inputs -> stored rows (the inverse of :meth:`Storage.decode`, rounded for uint8)."""
    a = x.detach().cpu().numpy().astype(np.float32, copy=False)
    if st.dtype == "uint8":
        q = np.rint((a.astype(np.float64) * st.std + st.mean) / st.scale)
        return np.clip(q, 0, 255).astype(np.uint8)
    if st.identity:
        return np.ascontiguousarray(a)
    return ((a.astype(np.float64) * st.std + st.mean) / st.scale).astype(st.dtype)


def partial_path(dst: Path) -> Path:
    """Where a conversion or an import writes until it is complete: ``.<name>.partial`` beside DST."""
    return dst.parent / f".{dst.name}.partial"


def publish(partial: Path, dst: Path) -> None:
    """Move the complete partial folder to DST; an existing DST (``force``) goes only now."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(partial, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, dst)


def convert(
    bundle: DataBundle,
    dst: str | Path,
    *,
    uint8: Sequence[str] = (),
    info: Mapping[str, Any] | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
) -> ConvertResult:
    """Write ``bundle`` as an on-disk dataset at ``dst``, chunk by chunk.

    The folder is written as ``.<dst>.partial`` next to ``dst`` and renamed at the end, so ``dst``
    is either absent or complete; an interrupted conversion resumes from the partial folder (rows
    already written are kept). ``uint8`` names modalities stored as bytes over their valid range.
    """
    import time

    t0 = time.perf_counter()
    dst = Path(dst)
    if dst.exists() and not force:
        raise DataError(f"{dst}: already exists; pass --force to replace it")
    meta = bundle.meta
    for m in uint8:
        spec = meta.spec(m)
        if spec.valid_range is None:
            raise DataError(
                f"--uint8 {m}: modality '{m}' has no valid range to quantise over; declare one "
                "(meta.json valid_ranges) or store it as float32"
            )
    storage = {m.name: uint8_storage(m.valid_range) if m.name in uint8 and m.valid_range else Storage()
               for m in meta.modalities}  # fmt: skip
    out_meta = DatasetMeta(meta.name, list(meta.modalities), list(meta.class_names), {**meta.info, **(info or {})})
    sizes = {s: len(bundle.split(s)) for s in SPLITS}
    partial = partial_path(dst)
    writer = None
    if partial.exists():
        try:
            writer = DiskWriter.reopen(partial)
            if (writer.meta.to_dict(), writer.sizes, writer.storage) != (out_meta.to_dict(), sizes, storage):
                writer.close()
                writer = None  # a different conversion was interrupted here: start again
        except DataError:
            writer = None
        if writer is None:
            shutil.rmtree(partial)
    resumed = 0
    if writer is None:
        writer = DiskWriter.create(partial, out_meta, sizes, storage)
    else:
        resumed = sum(b - a for s in SPLITS for a, b in writer.written[s])
    errors = dict.fromkeys(meta.modality_names, 0.0)
    total, done = sum(sizes.values()), resumed
    row_bytes = sum(4 * int(np.prod(m.shape)) for m in meta.modalities)
    step = _rows_per_chunk(row_bytes)
    for split in SPLITS:
        source = bundle.split(split)
        for a0, b0 in writer.missing(split):
            for a in range(a0, b0, step):
                b = min(b0, a + step)
                x, y = source.take(slice(a, b))
                enc = {m: _encode(x[m], storage[m]) for m in meta.modality_names}
                for m in meta.modality_names:
                    if not storage[m].identity:
                        err = (storage[m].decode(enc[m]) - x[m]).abs().max()
                        errors[m] = max(errors[m], float(err))
                writer.write(split, a, enc, y.numpy())
                done += b - a
                if progress is not None:
                    progress("convert", done, total)
    writer.finish(progress)
    publish(partial, dst)
    nbytes = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    return ConvertResult(dst, sizes, storage, nbytes, errors, resumed, time.perf_counter() - t0)
