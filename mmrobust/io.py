"""Atomic file output and safe checkpoint I/O.

Every file mmrobust writes goes through :func:`atomic_write_bytes`: the content is written to a
temporary file in the same folder and renamed over the target, so an interrupted run never leaves a
half-written file behind. Checkpoints are safetensors (no pickle) plus JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mmrobust.errors import ConfigError, RunError

#: The documented bounds of every numeric input that the data cannot bound themselves
#: (docs/reliability.md shows this table): ``name -> (lowest, highest)``, both inclusive. Inputs the
#: data bound (samples <= the split's size, targets < the number of classes) are clamped or checked
#: against the data as well.
LIMITS: dict[str, tuple[float, float]] = {
    "seed": (0, 2**32 - 1),  # torch/numpy seeds; also split seeds
    "seeds": (1, 1000),  # benchmark: seeds 0..N-1 per cell
    "epochs": (1, 100_000),
    "batch_size": (1, 1 << 20),
    "feature_dim": (1, 1 << 16),
    "samples": (0, 1 << 31),  # max_samples, fit_samples, check_soundness, tightness (also <= split size)
    "steps": (0, 100_000),  # attack iterations, attack_steps
    "restarts": (1, 1000),
    "queries": (1, 10_000_000),
    "targets": (1, 10_000),  # also < the number of classes
    "workers": (0, 256),
    "max_array_gb": (0, 1 << 20),  # GB per array; $MMROBUST_MAX_ARRAY_GB
    "sample_elements": (1, 1 << 28),  # elements of one sample of one modality (meta.json shapes)
    "radii": (0, 1e6),  # certify: each l2 radius; at most 10_000 of them
}


def check_limit(name: str, value: Any, param: str | None = None) -> Any:
    """``value`` if it is a number (an integer where the bounds are) inside ``LIMITS[name]``; else a
    one-line :class:`ConfigError` naming ``param`` (default: ``name``) and the bounds."""
    low, high = LIMITS[name]
    param = param or name
    integral = isinstance(low, int) and isinstance(high, int)
    ok_type = isinstance(value, int) if integral else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(f"{param} must be {'an integer' if integral else 'a number'} in [{low}, {high}], got {value!r}",
                          param=param)  # fmt: skip
    return value


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; follow the user's umask like open() does
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _clean_floats(obj: Any) -> Any:
    # JSON has no NaN/inf; write null so other tools can parse our files. Tensors are unpacked
    # first so that non-finite values inside them are caught too.
    if isinstance(obj, torch.Tensor):
        obj = obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_floats(v) for v in obj]
    return obj


#: the version of the layout of every JSON file mmrobust writes (``"schema_version"`` at the top);
#: 2: one name per concept (renamed keys are written beside their old names for one release).
#: A file without the field is version 1 and stays readable.
SCHEMA_VERSION = 2


def write_json(path: str | Path, obj: Any) -> None:
    """Serialise ``obj`` as indented JSON and write it atomically."""
    text = json.dumps(_clean_floats(obj), indent=2, default=_json_default, sort_keys=False)
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a one-line :class:`RunError`."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({exc})") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(data))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file raises :class:`RunError`."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: file not found")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise RunError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
