"""Bring-your-own dataset: a folder with ``train.npz``, ``test.npz`` (optional ``val.npz``, ``meta.json``).

Each npz holds one float array per modality (first axis = samples) and an integer array ``label``.
``meta.json`` may give ``class_names``, per-modality ``kinds`` and raw-space ``valid_ranges``.
Everything is validated strictly and every error names the file and array at fault.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrobust.data.base import DataBundle, DatasetMeta, ModalitySpec, Split, validate_split
from mmrobust.data.transforms import fit_normalizer, normalize, normalized_range
from mmrobust.errors import DataError

_KIND_BY_NDIM = {1: "vector", 2: "sequence", 3: "image", 4: "video"}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        # allow_pickle=False turns object arrays into ValueError: we never unpickle user files
        raise DataError(f"{path}: not a readable npz file ({exc})") from None


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: must hold a JSON object")
    unknown = set(meta) - {"class_names", "kinds", "valid_ranges", "name", "normalize"}
    if unknown:
        raise DataError(f"{path}: unknown key(s) {sorted(unknown)}")
    return meta


def _to_split(arrays: dict[str, np.ndarray], where: str) -> Split:
    if "label" not in arrays:
        raise DataError(f"{where}: no 'label' array (found: {sorted(arrays)})")
    label = arrays["label"]
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"{where}: 'label' must be an integer array, got {label.dtype}")
    inputs = {}
    for name, arr in arrays.items():
        if name == "label":
            continue
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"{where}: '{name}' must be numeric, got {arr.dtype}")
        if arr.ndim < 2:
            raise DataError(f"{where}: '{name}' must have a sample axis and a feature axis, got shape {arr.shape}")
        if arr.shape[0] != label.shape[0]:
            raise DataError(f"{where}: '{name}' has {arr.shape[0]} samples but 'label' has {label.shape[0]}")
        inputs[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return Split(inputs, torch.from_numpy(label.astype(np.int64)))


def load_folder(
    path: str | Path, seed: int = 0, val_fraction: float = 0.1, normalize_inputs: bool | str = True
) -> DataBundle:
    """Load a bring-your-own dataset folder (see module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    meta_json = _read_meta(root / "meta.json")
    train = _to_split(_read_npz(root / "train.npz"), f"{root / 'train.npz'}")
    test = _to_split(_read_npz(root / "test.npz"), f"{root / 'test.npz'}")
    if (root / "val.npz").exists():
        val = _to_split(_read_npz(root / "val.npz"), f"{root / 'val.npz'}")
    else:
        vf = float(val_fraction)
        if not 0 < vf < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {vf}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(seed)))
        n_val = max(1, round(len(train) * vf))
        val, train = train.subset(perm[:n_val]), train.subset(perm[n_val:].sort().values)

    names = list(train.inputs)
    labels = torch.cat([train.labels, val.labels, test.labels])
    if labels.numel() and int(labels.min()) < 0:
        raise DataError(f"{root}: 'label' values must be >= 0, found {int(labels.min())}")
    class_names = meta_json.get("class_names") or [str(k) for k in range(int(labels.max()) + 1)]
    kinds = meta_json.get("kinds", {})
    ranges = meta_json.get("valid_ranges", {})
    for key, mapping in (("kinds", kinds), ("valid_ranges", ranges)):
        if not isinstance(mapping, dict):
            raise DataError(f"{root / 'meta.json'}: '{key}' must map modality names to values")
        extra = set(mapping) - set(names)
        if extra:
            raise DataError(f"{root / 'meta.json'}: '{key}' names unknown modality {sorted(extra)}; arrays are {names}")

    do_norm = normalize_inputs not in (False, "false", "0", "no")
    specs, stats = [], {}
    for name in names:
        x = train.inputs[name]
        kind = kinds.get(name) or _KIND_BY_NDIM.get(x.ndim - 1)
        if kind is None:
            raise DataError(f"{root}/train.npz: '{name}' has {x.ndim - 1}-d samples; mmrobust supports 1-4")
        raw_range = tuple(ranges[name]) if name in ranges else None
        if raw_range is not None and len(raw_range) != 2:
            raise DataError(f"{root / 'meta.json'}: valid_ranges['{name}'] must be [low, high]")
        spec = ModalitySpec(name, kind, tuple(x.shape[1:]), raw_range)
        if do_norm and torch.isfinite(x).all():
            # a scalar normaliser keeps a declared range an interval; otherwise per channel
            mean, std = fit_normalizer(x, kind, per_channel=raw_range is None)
            for split in (train, val, test):
                if name in split.inputs:
                    split.inputs[name] = normalize(split.inputs[name], mean, std)
            spec = ModalitySpec(name, kind, spec.shape, normalized_range(raw_range, mean, std))
            stats[name] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
        specs.append(spec)
    meta = DatasetMeta(str(meta_json.get("name", root.name)), specs, [str(c) for c in class_names])
    for split, fname in ((train, "train.npz"), (val, "val.npz"), (test, "test.npz")):
        validate_split(meta, split, str(root / fname))
    return DataBundle(meta, train, val, test, source={"normalization": stats})
