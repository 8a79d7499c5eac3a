"""mmrobust.publish: the one writer protocol shared by every command that publishes a folder."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmrobust.errors import DataError, RunError
from mmrobust.publish import (
    Lock,
    check_destination,
    folder_update,
    is_mmrobust_folder,
    partial_path,
    publish_folder,
    resolve_target,
    seal_folder,
)


def test_resolve_follows_a_symlink_to_its_target(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "big")
    assert resolve_target(tmp_path / "link") == tmp_path / "big"
    assert resolve_target("rel") == Path.cwd() / "rel"


def test_destination_refusals(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunError, match="is not a folder \\(a file\\)"):
        check_destination(tmp_path / "f", force=True)
    with pytest.raises(RunError, match="device or other special file"):
        check_destination(Path(os.devnull), force=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("a")
    with pytest.raises(RunError, match="already exists; pass force=True") as info:
        check_destination(foreign)
    assert info.value.param == "force"
    with pytest.raises(DataError, match="not a folder written by mmrobust"):
        check_destination(foreign, force=True, error=DataError)
    (foreign / "meta.json").write_text("{}")
    assert is_mmrobust_folder(foreign)
    check_destination(foreign, force=True)  # ours: may be replaced
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty")
    with pytest.raises(RunError, match="already exists"):
        check_destination(tmp_path / "empty", empty_ok=False)


def test_lock_refuses_a_live_writer_and_takes_over_a_dead_ones(tmp_path):
    target = tmp_path / "d"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        Lock(target).path.write_text(str(sleeper.pid))
        with pytest.raises(RunError, match=f"another mmrobust process \\(pid {sleeper.pid}\\) is writing this dataset"):
            Lock(target, "dataset").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with Lock(target) as lock:  # dead: taken over
        assert lock.path.read_text() == str(os.getpid())
    assert not lock.path.exists()


def test_publish_swaps_in_a_complete_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    partial = partial_path(target)
    partial.mkdir()
    (partial / "new.txt").write_text("new")
    seal_folder(partial)
    publish_folder(partial, target)
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old folder left


def test_folder_update_serialises_read_merge_write(tmp_path):
    import json

    (tmp_path / "c.json").write_text("{}")

    def add(key: str) -> None:
        with folder_update(tmp_path):
            doc = json.loads((tmp_path / "c.json").read_text())
            time.sleep(0.05)  # a slow merge: without the lock one result would be lost
            doc[key] = 1
            (tmp_path / "c.json").write_text(json.dumps(doc))

    threads = [threading.Thread(target=add, args=(f"k{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(json.loads((tmp_path / "c.json").read_text())) == ["k0", "k1", "k2", "k3"]
