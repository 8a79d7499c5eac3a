"""Writing an on-disk dataset: :class:`DiskWriter` (chunk by chunk, resumable, ``finish`` checks and
seals the folder) and the ``.<name>.partial`` folder that :func:`publish` renames into place."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mmrobust.data.base import DatasetMeta
from mmrobust.data.ondisk.arrays import array_file, digest_and_check, preallocate, write_rows
from mmrobust.data.ondisk.format import SPLITS, Storage, array_names, expected_array, meta_json, parse_meta, read_meta
from mmrobust.errors import DataError
from mmrobust.io import write_json
from mmrobust.progress import ProgressFn
from mmrobust.publish import partial_path as _partial_path
from mmrobust.publish import publish_folder

#: while a folder is incomplete: the row ranges of each split already on disk (what a resumed writer skips)
_PROGRESS = "progress.json"


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
                name: array_file(root / split / f"{name}.npy", *expected_array(meta, storage, sizes[split], name))
                for name in array_names(meta)
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
        write_json(root / "meta.json", meta_json(meta, sizes_, storage_, complete=False))
        for split in SPLITS:
            (root / split).mkdir()
            for name in array_names(meta):
                shape, dtype = expected_array(meta, storage_, sizes_[split], name)
                preallocate(root / split / f"{name}.npy", shape, dtype)
        written: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        write_json(root / _PROGRESS, written)
        return cls(root, meta, sizes_, storage_, written)

    @classmethod
    def reopen(cls, root: str | Path) -> DiskWriter:
        """Reopen an incomplete dataset folder to resume writing (arrays opened ``r+``)."""
        root = Path(root)
        d = read_meta(root)
        if d["complete"]:
            raise DataError(f"{root}: dataset is already complete; nothing to resume")
        meta, storage, sizes = parse_meta(root, d)
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
            shape, dtype = expected_array(self.meta, self.storage, n, name)
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
            write_rows(fds[name], files[name], start, inputs[name])
        write_rows(fds["label"], files["label"], start, labels.astype(np.int64))
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
        total = sum(self.sizes.values()) * len(array_names(self.meta))
        done = 0
        for split in SPLITS:
            digests[split] = {}
            for name, f in self._files[split].items():
                digests[split][name] = digest_and_check(self._fds[split][name], f, name, self.meta.num_classes)
                done += self.sizes[split]
                if progress is not None:
                    progress("verify", done, total)
        self.close()
        d = meta_json(self.meta, self.sizes, self.storage, complete=True)
        d["sha256"] = digests
        write_json(self.root / "meta.json", d)
        (self.root / _PROGRESS).unlink(missing_ok=True)


def partial_path(dst: Path) -> Path:
    """Where a conversion or an import writes until it is complete: ``.<name>.partial`` beside DST."""
    return _partial_path(dst)


def publish(partial: Path, dst: Path) -> None:
    """Move the complete partial folder to DST (fsynced, atomic); an existing DST (``force``) goes only
    now. The one writer protocol of :mod:`mmrobust.publish`."""
    publish_folder(partial, dst)
