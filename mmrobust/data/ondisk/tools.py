"""Whole-dataset tools: :func:`convert` (any dataset -> on-disk, resumable), :func:`verify_ondisk`
(re-hash every array) and :func:`ondisk_fingerprint` (identity without reading the arrays)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrobust.data.base import DataBundle, DatasetMeta
from mmrobust.data.ondisk.arrays import digest_and_check, rows_per_chunk
from mmrobust.data.ondisk.format import SPLITS, Storage, array_names, open_complete, read_meta, verify_splits
from mmrobust.data.ondisk.writer import DiskWriter, partial_path, publish
from mmrobust.errors import DataError
from mmrobust.progress import ProgressFn
from mmrobust.publish import Lock, check_destination, resolve_target


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
    inputs inside their declared valid range, labels in range: a one-line :class:`DataError` names the
    file and the first offending row). Nothing is written.
    """
    import time

    t0 = time.perf_counter()
    root = Path(path)
    d, meta, storage, sizes, arrays = open_complete(root)  # a malformed folder fails before any hashing
    names = array_names(meta)
    total, done, nbytes, mismatched = sum(sizes.values()) * len(names), 0, 0, []
    for split in SPLITS:
        for name, f in arrays[split].items():
            fd = os.open(f.path, os.O_RDONLY)
            st = storage.get(name)
            vr = meta.spec(name).valid_range if name != "label" else None
            try:
                digest = digest_and_check(fd, f, name, meta.num_classes, st.decode if st is not None else None, vr)
            finally:
                os.close(fd)
            if digest != d["sha256"][split].get(name):
                mismatched.append(f"{split}/{name}")
            nbytes += f.offset + f.rows * f.row_bytes
            done += sizes[split]
            if progress is not None:
                progress("verify", done, total)
    return VerifyResult(root, len(SPLITS) * len(names), nbytes, mismatched, time.perf_counter() - t0)


def check_splits(bundle: DataBundle, splits: Sequence[str]) -> None:
    """For an on-disk bundle: :func:`verify_splits` of ``splits`` (nothing for in-memory data, whose
    fingerprint covers every value)."""
    from mmrobust.data.ondisk.reader import DiskSplit

    if isinstance(bundle.train, DiskSplit):
        verify_splits(Path(bundle.train.where).parent, splits)


def ondisk_fingerprint(path: str | Path) -> str:
    """sha256 over meta.json (which holds every array's sha256, computed at write time) and file sizes."""
    root = Path(path)
    d = read_meta(root)
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode())
    for split in SPLITS:
        for name in sorted(d["storage"]) + ["label"]:
            f = root / split / f"{name}.npy"
            h.update(f"{split}/{name}/{f.stat().st_size};".encode())
    return h.hexdigest()


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
    dst = resolve_target(dst)
    check_destination(dst, force=force, param="dst", empty_ok=False, error=DataError)
    with Lock(dst, "dataset"):
        return _convert(bundle, dst, uint8, info, progress, t0)


def _convert(
    bundle: DataBundle,
    dst: Path,
    uint8: Sequence[str],
    info: Mapping[str, Any] | None,
    progress: ProgressFn | None,
    t0: float,
) -> ConvertResult:
    import time

    meta = bundle.meta
    for m in uint8:
        spec = meta.spec(m)
        if spec.valid_range is None:
            raise DataError(
                f"uint8 names modality '{m}', which has no valid range to quantise over; declare one "
                "(meta.json valid_ranges) or store it as float32",
                param="uint8",
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
    step = rows_per_chunk(row_bytes)
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
