"""An on-disk dataset format that streams: one ``.npy`` per modality and split, read by offset.

Layout of a dataset folder::

    meta.json                 format, version, complete, the DatasetMeta fields, storage, sizes, sha256
    train/<modality>.npy      (n, *shape) in the stored dtype (float32, float16 or uint8)
    train/label.npy           (n,) int64
    val/...  test/...

A modality's model input is ``(stored * scale - mean) / std`` in float32, decoded batch by batch
(uint8 frames take a quarter of the disk and page cache of float32). :class:`DiskWriter` writes a
folder chunk by chunk and can resume an interrupted write; :func:`open_ondisk` opens a complete one
without reading its arrays (headers only), and :class:`DiskSplit` reads only the rows asked for.

The package, one concern per module (this module only re-exports the public names):

* :mod:`~mmrobust.data.ondisk.arrays`: raw ``.npy`` files read and written by byte offset, hashing;
* :mod:`~mmrobust.data.ondisk.format`: meta.json (schema, :class:`Storage` dtypes) and the arrays it declares;
* :mod:`~mmrobust.data.ondisk.writer`: :class:`DiskWriter`, the partial folder and :func:`publish`;
* :mod:`~mmrobust.data.ondisk.reader`: :func:`open_ondisk`, :class:`DiskSplit`, :class:`OnDiskOptions`;
* :mod:`~mmrobust.data.ondisk.tools`: :func:`convert`, :func:`verify_ondisk`, :func:`ondisk_fingerprint`.
"""

from mmrobust.data.ondisk.arrays import CHUNK_BYTES
from mmrobust.data.ondisk.format import DTYPES, FORMAT, SPLITS, VERSION, Storage, is_ondisk
from mmrobust.data.ondisk.reader import DEFAULT_MAX_INPUTS_GB, DiskSplit, OnDiskOptions, open_ondisk
from mmrobust.data.ondisk.tools import (
    ConvertResult,
    VerifyResult,
    check_splits,
    convert,
    ondisk_fingerprint,
    uint8_storage,
    verify_ondisk,
    verify_splits,
)
from mmrobust.data.ondisk.writer import DiskWriter, partial_path, publish

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_MAX_INPUTS_GB",
    "DTYPES",
    "FORMAT",
    "SPLITS",
    "VERSION",
    "ConvertResult",
    "DiskSplit",
    "DiskWriter",
    "OnDiskOptions",
    "Storage",
    "VerifyResult",
    "check_splits",
    "convert",
    "verify_splits",
    "is_ondisk",
    "ondisk_fingerprint",
    "open_ondisk",
    "partial_path",
    "publish",
    "uint8_storage",
    "verify_ondisk",
]
