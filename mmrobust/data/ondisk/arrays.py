"""Raw ``.npy`` array files of the on-disk format, read and written by byte offset.

Reading and writing by offset (``pread``/``pwrite``, no memory map) keeps the resident memory at
what one batch needs. :func:`array_file` checks a header (shape, dtype, order, file size) without
reading data; :func:`digest_and_check` hashes a whole file while checking its values.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmrobust.errors import DataError

#: rows per chunk are chosen so that one chunk is about this many bytes
CHUNK_BYTES = 64 << 20


def rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, row_bytes))


@dataclass(frozen=True)
class ArrayFile:
    """One ``.npy`` file read and written by offset (no memory map: RSS stays at what a batch needs)."""

    path: Path
    offset: int  # bytes of the header
    row_bytes: int
    rows: int
    dtype: np.dtype
    row_shape: tuple[int, ...]


def array_file(path: Path, shape: tuple[int, ...], dtype: str) -> ArrayFile:
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
    return ArrayFile(path, offset, row_bytes, shape[0], got_dtype, tuple(shape[1:]))


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    while len(buf):
        got = os.preadv(fd, [buf], offset)
        if got <= 0:
            raise DataError(f"{path}: unexpected end of file")
        buf, offset = buf[got:], offset + got


def read_rows(fd: int, f: ArrayFile, rows: np.ndarray) -> np.ndarray:
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


def write_rows(fd: int, f: ArrayFile, start: int, x: np.ndarray) -> None:
    data = np.ascontiguousarray(x).reshape(-1).view(np.uint8).data
    offset = f.offset + start * f.row_bytes
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def preallocate(path: Path, shape: tuple[int, ...], dtype: str) -> None:
    """Write the .npy header and extend the file to its full size (sparse: blocks come as rows are written)."""
    with path.open("wb") as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})  # fmt: skip
        fh.truncate(fh.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)


def digest_and_check(
    fd: int,
    f: ArrayFile,
    name: str,
    num_classes: int,
    decode: Callable[[np.ndarray], Any] | None = None,
    valid_range: tuple[float, float] | None = None,
) -> str:
    """sha256 of the whole .npy file (header + rows, read in chunks: memory stays at one chunk) and a
    check of its values on the way: labels in range, inputs finite and, with ``valid_range``, inside it
    (after ``decode``, the storage's decoding to model inputs). The first offending row is named."""
    h = hashlib.sha256()
    head = np.empty(f.offset, dtype=np.uint8)
    _pread_into(fd, head.data, 0, f.path)
    h.update(head.data)
    step = rows_per_chunk(f.row_bytes)
    for a in range(0, f.rows, step):
        chunk = read_rows(fd, f, np.arange(a, min(f.rows, a + step)))
        if name == "label":
            bad = (chunk < 0) | (chunk >= num_classes)
            if bad.any():
                row = a + int(np.argmax(bad))
                raise DataError(
                    f"{f.path}: label values must be in 0..{num_classes - 1}, found {int(chunk[row - a])} (row {row})"
                )
        elif chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            row = a + int(np.argmax(~np.isfinite(chunk.reshape(len(chunk), -1)).all(1)))
            raise DataError(f"{f.path}: contains NaN or inf values (first in row {row})")
        if valid_range is not None and name != "label":
            x = np.asarray(decode(chunk) if decode is not None else chunk, dtype=np.float64).reshape(len(chunk), -1)
            lo, hi = valid_range
            tol = 1e-4 * (hi - lo)  # uint8/float16 storage rounds
            out = ((x < lo - tol) | (x > hi + tol)).any(1)
            if out.any():
                row = a + int(np.argmax(out))
                raise DataError(
                    f"{f.path}: values outside the declared valid range [{lo:g}, {hi:g}] (first in row {row}: "
                    f"{x[row - a].min():g}..{x[row - a].max():g})"
                )
        h.update(chunk.data)
    return h.hexdigest()
