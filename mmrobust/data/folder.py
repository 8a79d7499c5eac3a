"""Bring-your-own dataset: a folder with ``train.npz``, ``test.npz`` (optional ``val.npz``, ``meta.json``).

Each npz holds one float array per modality (first axis = samples) and an integer array ``label``.
``meta.json`` may give ``class_names``, per-modality ``kinds``, ``valid_ranges`` and ``units``.
Everything is validated strictly and every error names the file and array at fault.

Values are kept as stored (valid ranges in the same units). With ``normalize`` (the default) each
modality gets a ``spec.normalization`` fitted on the training split that the *model* applies
(:mod:`mmrobust.models.transform`): per channel, or one scalar when a valid range is declared (a
box stays a box). See docs/units.md.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmrobust.data.base import KINDS, DataBundle, DatasetMeta, ModalitySpec, Normalization, Split, validate_split
from mmrobust.data.transforms import channel_axis, fit_normalizer
from mmrobust.errors import ConfigError, DataError
from mmrobust.options import build_options

_KIND_BY_NDIM = {1: "vector", 2: "sequence", 3: "image", 4: "video"}
_META_KEYS = ("class_names", "kinds", "valid_ranges", "name", "normalize", "units")
#: units of a modality whose meta.json gives none
FOLDER_UNITS = "as stored in the npz files"
#: default cap on the decoded size of one array (bytes); raise it with ``--data-opt max_array_gb=N``
#: or ``$MMROBUST_MAX_ARRAY_GB``
DEFAULT_MAX_ARRAY_GB = 8.0


@dataclass
class FolderOptions:
    """Options of a bring-your-own folder (``--data-opt KEY=VALUE``)."""

    val_fraction: float = 0.1  # share of train.npz held out for validation when there is no val.npz
    normalize_inputs: bool = True  # the model standardises (fitted on train; meta.json "normalize" must agree)
    max_array_gb: float = 0.0  # 0: $MMROBUST_MAX_ARRAY_GB or 8 GB; refuse larger arrays before reading them

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data option 'val_fraction' must be in (0, 1), got {self.val_fraction}")
        if self.max_array_gb < 0:
            raise ConfigError(f"data option 'max_array_gb' must be >= 0, got {self.max_array_gb}")

    def array_limit_bytes(self) -> int:
        gb = self.max_array_gb
        if gb == 0:
            env = os.environ.get("MMROBUST_MAX_ARRAY_GB", "")
            try:
                gb = float(env) if env else DEFAULT_MAX_ARRAY_GB
            except ValueError:
                raise ConfigError(f"$MMROBUST_MAX_ARRAY_GB must be a number, got {env!r}") from None
            if not gb > 0:
                raise ConfigError(f"$MMROBUST_MAX_ARRAY_GB must be > 0, got {env!r}")
        return int(gb * 2**30)


def _check_member_sizes(zf: zipfile.ZipFile, path: Path, limit: int) -> None:
    """Read every member's npy header and refuse arrays whose declared size exceeds ``limit``.

    Why: a crafted header (or a highly compressed member) can declare gigabytes that numpy would
    allocate before noticing anything; the header alone tells the size.
    """
    for info in zf.infolist():
        with zf.open(info) as fh:
            try:
                version = np.lib.format.read_magic(fh)
                reader = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = reader(fh)
            except (ValueError, OSError, EOFError, SyntaxError) as exc:
                raise DataError(f"{path}: member '{info.filename}' is not a valid npy array ({exc})") from None
        size = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if size > limit:
            name = info.filename.removesuffix(".npy")
            raise DataError(
                f"{path}: array '{name}' declares shape {tuple(shape)} ({size:,} bytes), over the limit of "
                f"{limit:,} bytes; raise it with the data option max_array_gb or $MMROBUST_MAX_ARRAY_GB",
                param="max_array_gb",
            )


def _read_npz(path: Path, limit: int) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as zf:
            _check_member_sizes(zf, path, limit)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"{path}: not enough memory to read it") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        # allow_pickle=False turns object arrays into ValueError: we never unpickle user files
        raise DataError(f"{path}: not a readable npz file ({exc})") from None


def _finite_pair(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in value)
        and value[0] < value[1]
    )


def _read_meta(path: Path) -> dict[str, Any]:
    """Read and validate ``meta.json``: known keys, and each value of the type it must have."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: must hold a JSON object")
    unknown = sorted(set(meta) - set(_META_KEYS))
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; valid: {', '.join(_META_KEYS)}")
    if "name" in meta and not (isinstance(meta["name"], str) and meta["name"]):
        raise DataError(f"{path}: 'name' must be a non-empty string")
    if "normalize" in meta and not isinstance(meta["normalize"], bool):
        raise DataError(f"{path}: 'normalize' must be true or false, got {meta['normalize']!r}")
    if "class_names" in meta:
        names = meta["class_names"]
        if not (isinstance(names, list) and names and all(isinstance(c, str) and c for c in names)):
            raise DataError(f"{path}: 'class_names' must be a list of non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            raise DataError(f"{path}: 'class_names' has duplicates")
    for key in ("kinds", "valid_ranges", "units"):
        if key in meta and not isinstance(meta[key], dict):
            raise DataError(f"{path}: '{key}' must map modality names to values, got {meta[key]!r}")
    for name, kind in meta.get("kinds", {}).items():
        if kind not in KINDS:
            raise DataError(f"{path}: kinds['{name}'] is {kind!r}; choose from: {', '.join(KINDS)}")
    for name, units in meta.get("units", {}).items():
        if not (isinstance(units, str) and units.strip()):
            raise DataError(f"{path}: units['{name}'] must be a non-empty string, got {units!r}")
    for name, rng in meta.get("valid_ranges", {}).items():
        if not _finite_pair(rng):
            raise DataError(f"{path}: valid_ranges['{name}'] must be [low, high] with finite low < high, got {rng!r}")
    return meta


def _to_split(arrays: dict[str, np.ndarray], where: str) -> Split:
    if "label" not in arrays:
        raise DataError(f"{where}: no 'label' array (found: {sorted(arrays)})")
    label = arrays["label"]
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"{where}: 'label' must be an integer array, got {label.dtype}")
    if label.ndim != 1:
        raise DataError(f"{where}: 'label' must be 1-d (one class index per sample), got shape {label.shape}")
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


def _check_consistent(root: Path, splits: dict[str, Split]) -> None:
    """Same modality names and per-sample shapes in every split, finite values, before any statistics."""
    ref_name, ref = next(iter(splits.items()))
    for fname, split in splits.items():
        if set(split.inputs) != set(ref.inputs):
            raise DataError(
                f"{root / fname}: modalities {sorted(split.inputs)} differ from {ref_name}'s {sorted(ref.inputs)}"
            )
        for name, x in split.inputs.items():
            want = tuple(ref.inputs[name].shape[1:])
            if tuple(x.shape[1:]) != want:
                raise DataError(
                    f"{root / fname}: '{name}' samples have shape {tuple(x.shape[1:])}, {ref_name} has {want}"
                )
            if not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
                raise DataError(f"{root / fname}: '{name}' contains NaN or inf values in {bad} sample(s)")


def _check_in_range(root: Path, splits: dict[str, Split], name: str, rng: tuple[float, float]) -> None:
    for fname, split in splits.items():
        x = split.inputs[name]
        outside = int(((x < rng[0]) | (x > rng[1])).sum())
        if outside:
            lo, hi = float(x.min()), float(x.max())
            raise DataError(
                f"{root / fname}: '{name}' has {outside} value(s) outside its declared valid range "
                f"[{rng[0]:g}, {rng[1]:g}] (found {lo:g}..{hi:g}); fix the data or meta.json valid_ranges"
            )


def load_folder(path: str | Path, seed: int = 0, **options: Any) -> DataBundle:
    """Load a bring-your-own dataset folder (see module docstring); ``options`` fill :class:`FolderOptions`."""
    opts = build_options(FolderOptions, options, "data option")
    limit = opts.array_limit_bytes()
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    meta_json = _read_meta(root / "meta.json")
    if "normalize" in meta_json and "normalize_inputs" in options and meta_json["normalize"] != opts.normalize_inputs:
        raise DataError(
            f"{root / 'meta.json'}: 'normalize' is {str(meta_json['normalize']).lower()} but "
            f"the data option normalize_inputs is {str(opts.normalize_inputs).lower()}; make them agree",
            param="normalize_inputs",
        )
    do_norm = bool(meta_json.get("normalize", opts.normalize_inputs))
    splits = {"train.npz": _to_split(_read_npz(root / "train.npz", limit), f"{root / 'train.npz'}")}
    if (root / "val.npz").exists():
        splits["val.npz"] = _to_split(_read_npz(root / "val.npz", limit), f"{root / 'val.npz'}")
    splits["test.npz"] = _to_split(_read_npz(root / "test.npz", limit), f"{root / 'test.npz'}")
    _check_consistent(root, splits)
    train, test = splits["train.npz"], splits["test.npz"]
    if "val.npz" in splits:
        val = splits["val.npz"]
    else:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(seed)))
        n_val = max(1, round(len(train) * opts.val_fraction))
        if n_val >= len(train):
            raise DataError(f"{root / 'train.npz'}: {len(train)} sample(s) are too few to hold out a validation split")
        val, train = train.subset(perm[:n_val]), train.subset(perm[n_val:].sort().values)

    names = list(train.inputs)
    labels = torch.cat([train.labels, val.labels, test.labels])
    if labels.numel() and int(labels.min()) < 0:
        raise DataError(f"{root}: 'label' values must be >= 0, found {int(labels.min())}")
    class_names = meta_json.get("class_names") or [str(k) for k in range(int(labels.max()) + 1)]
    kinds = meta_json.get("kinds", {})
    ranges = meta_json.get("valid_ranges", {})
    units = meta_json.get("units", {})
    for key, mapping in (("kinds", kinds), ("valid_ranges", ranges), ("units", units)):
        extra = set(mapping) - set(names)
        if extra:
            raise DataError(f"{root / 'meta.json'}: '{key}' names unknown modality {sorted(extra)}; arrays are {names}")

    specs = []
    all_splits = {"train.npz": train, "val.npz": val, "test.npz": test}
    for name in names:
        x = train.inputs[name]
        kind = kinds.get(name) or _KIND_BY_NDIM.get(x.ndim - 1)
        if kind is None:
            raise DataError(f"{root}/train.npz: '{name}' has {x.ndim - 1}-d samples; mmrobust supports 1-4")
        raw_range = (float(ranges[name][0]), float(ranges[name][1])) if name in ranges else None
        if raw_range is not None:
            _check_in_range(root, all_splits, name, raw_range)
        norm = None
        if do_norm:
            # a scalar normaliser keeps a declared range an interval; otherwise per channel
            mean, std = fit_normalizer(x, kind, per_channel=raw_range is None)
            axis = max(0, (channel_axis(kind) or 1) - 1)
            norm = Normalization(tuple(mean.flatten().tolist()), tuple(std.flatten().tolist()), axis)
        specs.append(ModalitySpec(name, kind, tuple(x.shape[1:]), raw_range, units.get(name, FOLDER_UNITS), norm))
    meta = DatasetMeta(str(meta_json.get("name", root.name)), specs, [str(c) for c in class_names])
    for split, fname in ((train, "train.npz"), (val, "val.npz"), (test, "test.npz")):
        validate_split(meta, split, str(root / fname), check_finite=False)  # checked above, before the statistics
    return DataBundle(meta, train, val, test)
