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

from mmrobust.errors import RunError


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
