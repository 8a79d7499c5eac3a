"""Reading an on-disk dataset: :func:`open_ondisk` and :class:`DiskSplit`, a lazy split that reads
only the rows asked for (in the main process or through DataLoader workers)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrobust.data.base import Batch, DataBundle, DatasetMeta, Split
from mmrobust.data.ondisk.arrays import ArrayFile, read_rows
from mmrobust.data.ondisk.format import FORMAT, SPLITS, Storage, open_complete, verify_splits
from mmrobust.errors import ConfigError, DataError

#: materialising ``DiskSplit.inputs`` is refused above this many decoded bytes ($MMROBUST_MAX_INPUTS_GB)
DEFAULT_MAX_INPUTS_GB = 1.0


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

    def __init__(self, files: dict[str, ArrayFile]) -> None:
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
            x = read_rows(self.handles.fd(m), self.handles.files[m], rows)
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
                f"max_inputs_gb={self.options.max_inputs_gb:g}); raise the data option max_inputs_gb or use fewer samples",
                param="max_inputs_gb",
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


def open_ondisk(path: str | Path, seed: int = 0, **options: Any) -> DataBundle:
    """Open a complete on-disk dataset folder; checks meta.json and every array header, reads no inputs."""
    from mmrobust.options import build_options

    opts = build_options(OnDiskOptions, options, "data option")
    root = Path(path)
    _, meta, storage, sizes, arrays = open_complete(root)
    splits = {}
    for split in SPLITS:
        files = arrays[split]
        handles = _Handles(files)
        label = read_rows(handles.fd("label"), files["label"], np.arange(sizes[split]))
        if label.min() < 0 or label.max() >= meta.num_classes:  # the labels are read anyway: a cheap check
            raise DataError(
                f"{files['label'].path}: values must be in 0..{meta.num_classes - 1}, found {label.min()}..{label.max()}"
            )
        splits[split] = DiskSplit(f"{root}/{split}", meta, storage, handles, torch.from_numpy(label), None, opts)
    # one changed value in the small splits every command reads is caught before any result is
    # written (train is re-hashed at resume; `mmrobust data verify` re-hashes everything)
    verify_splits(root, ("val", "test"))
    return DataBundle(meta, splits["train"], splits["val"], splits["test"], source={"format": FORMAT})
