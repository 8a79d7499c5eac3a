"""One writer protocol for everything mmrobust publishes (run folders, benchmark cells, on-disk
datasets, imports, calibration studies) or adds to a folder (``certify.json``, ``eval*.json``, plots).

A command that publishes a folder:

1. resolves its destination once, before any work (:func:`resolve_target`: absolute, a symlink
   followed to its target, so a link to a bigger disk is published *at* the target and stays a
   link) and refuses what it cannot publish into (:func:`check_destination`: a file, a device node,
   a non-empty folder without ``force``, a folder mmrobust did not write even with ``force``, an
   unwritable parent);
2. takes the lock file ``.NAME.lock`` beside it (:class:`Lock`: holds the writer's pid; a second
   writer is refused in one line; a lock left by a dead process is taken over);
3. writes into the hidden partial folder ``.NAME.partial`` beside it (:func:`partial_path`);
4. seals it (the caller's manifest, or :func:`seal_folder`), fsyncs every file and renames it into
   place atomically (:func:`publish_folder`: an existing folder is swapped out and removed only
   after the new one is in place).

A command that adds a file to an existing folder writes it atomically (temp file, fsync, rename;
:func:`mmrobust.io.atomic_write_bytes`) and does any read-merge-write under :func:`folder_update`
(an exclusive lock on the folder, waited for), so two concurrent writers never lose a result.

``force`` replaces only a folder mmrobust itself wrote, recognised by one of its signature files
(:data:`SIGNATURES`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmrobust.errors import MMRobustError, RunError

#: a folder holding one of these files was written by mmrobust (run or cell: manifest.json; on-disk
#: dataset: meta.json; benchmark: settings.json; calibration study: calibration.json)
SIGNATURES = ("manifest.json", "meta.json", "settings.json", "calibration.json")


def resolve_target(out: str | Path) -> Path:
    """The absolute path a command publishes at: a symlink (chain) is followed to its target, so the
    result lands where the link points and the link itself is kept."""
    path = Path(out).absolute()
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    return path


def partial_path(target: Path) -> Path:
    """Where a folder is written until it is complete: ``.NAME.partial`` beside it."""
    return target.with_name(f".{target.name}.partial")


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def is_mmrobust_folder(path: Path) -> bool:
    """True when ``path`` is a folder holding one of mmrobust's signature files."""
    return path.is_dir() and not path.is_symlink() and any((path / name).is_file() for name in SIGNATURES)


def check_destination(
    target: Path,
    *,
    force: bool = False,
    param: str = "out",
    existing_ok: bool = False,
    resumable: bool = False,
    empty_ok: bool = True,
    error: type[MMRobustError] = RunError,
) -> None:
    """Refuse, before any work, a destination the command could not publish into.

    ``target`` (from :func:`resolve_target`) must be absent, an empty folder, or (with ``force``) a
    folder mmrobust wrote; never a file or device node. ``existing_ok``: a non-empty folder is
    fine (a benchmark resumes into its folder). ``resumable``: the caller decides about a non-empty
    folder (a run resumes or refuses it in its own words). ``empty_ok=False``: an existing empty
    folder needs ``force`` too (datasets). ``error``: the class of the refusals. The parent must exist or be creatable, and
    be writable.
    """
    if target.exists() and not target.is_dir():
        kind = "a file" if target.is_file() else "a device or other special file"
        raise error(f"{target}: exists and is not a folder ({kind}); choose another {param}", param=param)
    if target.is_dir() and not empty_ok and not force and not any(target.iterdir()):
        raise error(f"{target}: already exists; pass force=True to replace it", param="force")
    if target.is_dir() and any(target.iterdir()):
        if force and not is_mmrobust_folder(target):
            raise error(
                f"{target}: not a folder written by mmrobust (none of {', '.join(SIGNATURES)}); force replaces "
                f"only mmrobust's own folders: choose another {param}",
                param=param,
            )
        if not (force or existing_ok or resumable):
            raise error(f"{target}: already exists; pass force=True to replace it", param="force")
    parent = target.parent
    if not parent.is_dir():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise error(f"{parent}: cannot create the folder for {param} ({exc.strerror})", param=param) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{parent}: not writable; choose another {param}", param=param)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """The lock file ``.NAME.lock`` beside a destination: holds the writer's pid (a context manager).

    A second writer gets ``another mmrobust process (pid N) is writing this <what>``; a lock whose
    process is dead is taken over. Re-entrant within one process (the pid is ours).
    """

    def __init__(self, target: Path, what: str = "folder") -> None:
        self.target, self.what = target, what
        self.path = lock_path(target)
        self.held = False

    def owner(self) -> int | None:
        """The pid holding the lock if that process is alive, else None."""
        try:
            pid = int(self.path.read_text().strip() or "0")
        except (OSError, ValueError):
            return None
        return pid if pid > 0 and _pid_alive(pid) else None

    def refuse_if_taken(self) -> None:
        owner = self.owner()
        if owner is not None and owner != os.getpid():
            raise RunError(f"{self.target}: another mmrobust process (pid {owner}) is writing this {self.what}")

    def acquire(self) -> Lock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.owner()
                if owner == os.getpid():
                    return self  # already ours
                if owner is not None:
                    raise RunError(
                        f"{self.target}: another mmrobust process (pid {owner}) is writing this {self.what}"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its writer died
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
                fh.flush()
                os.fsync(fh.fileno())
            self.held = True
            return self
        raise RunError(f"{self.target}: could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (so a rename publishes bytes that are on disk)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)


def seal_folder(folder: Path, name: str = "manifest.json") -> None:
    """Write ``folder/name``: the sha256 of every file in the folder (for folders without their own)."""
    from mmrobust import __version__
    from mmrobust.io import sha256_file, write_json

    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != name and not p.name.startswith(".")
    }
    write_json(folder / name, {"mmrobust_version": __version__, "files": files})


def publish_folder(partial: Path, target: Path) -> Path:
    """fsync the complete ``partial`` folder and rename it to ``target`` atomically; an existing
    ``target`` (replaced under ``force``) is swapped out first and removed only afterwards."""
    fsync_tree(partial)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists() or target.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(partial, target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def folder_update(folder: Path, timeout_s: float = 600.0) -> Iterator[Path]:
    """An exclusive lock on ``folder`` (``flock`` on the folder itself, waited for): wrap any
    read-merge-write of a file inside it, so concurrent writers (two ``certify`` runs) never lose a
    result. No file is created; the lock goes with the process."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RunError(f"{folder}: another mmrobust process kept it locked for {timeout_s:.0f} s") from None
                time.sleep(0.05)
        yield folder
    finally:
        os.close(fd)  # releases the lock
