"""Run folders are units: transactional writes, the overwrite policy, locks, resume, portability."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrobust.cli import main
from mmrobust.errors import RunError
from mmrobust.runs import load_run
from mmrobust.training import Trainer
from tests.conftest import free_port

TINY = ["--data", "synthetic", "--data-opt", "n_train=120", "--data-opt", "n_val=40", "--data-opt", "n_test=40",
        "--data-opt", "dim=8", "--data-opt", "classes=3", "--feature-dim", "8", "--no-progress"]  # fmt: skip
# slow enough per epoch to be caught mid-run by a signal, still a few seconds in all
SLOW = ["--data", "synthetic", "--data-opt", "n_train=640", "--data-opt", "n_val=100", "--data-opt", "n_test=100",
        "--data-opt", "dim=16", "--data-opt", "classes=5", "--feature-dim", "32", "--batch-size", "16",
        "--no-progress", "--seed", "3"]  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _epochs_logged(run: Path) -> list[int]:
    """Epoch numbers in ``train.log``, in order (a resumed run must not repeat any)."""
    return [int(line.split("epoch ")[1].split("/")[0]) for line in (run / "train.log").read_text().splitlines()]


def _err_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mmrobust: error: "), lines
    return lines[0]


def test_existing_run_is_refused_then_replaced_whole_with_force(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    (out / "eval.json").write_text("{}")  # a stale evaluation of the old model
    before = _sha(out / "model.safetensors")
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 2
    assert "already exists; pass --force to replace it or --resume" in _err_line(capsys)
    assert _sha(out / "model.safetensors") == before
    assert main(["train", *TINY, "--epochs", "2", "--force", "--out", str(out)]) == 0
    assert not (out / "eval.json").exists()  # replaced whole
    assert load_run(out).metrics["epochs"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no partial, lock or old folder left


@pytest.mark.parametrize("target", ["file", "dev-null", "under-a-file"])
def test_bad_out_is_refused_before_training(tmp_path, capsys, monkeypatch, target):
    import mmrobust.training.engine as engine

    (tmp_path / "f.txt").write_text("x")
    out = {"file": tmp_path / "f.txt", "dev-null": Path(os.devnull), "under-a-file": tmp_path / "f.txt" / "run"}[target]
    monkeypatch.setattr(engine, "Trainer", None)  # training must never start
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert "is not a folder" in line or "cannot create the folder" in line
    assert (tmp_path / "f.txt").read_text() == "x"


def test_load_run_refuses_incomplete_and_mixed_folders(tiny_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["epochs"] = 99  # e.g. a config.json from another run
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match="config.json changed after the run was written"):
        load_run(run)
    shutil.copy(tiny_run / "config.json", run / "config.json")
    load_run(run)
    (run / "manifest.json").unlink()
    with pytest.raises(RunError, match="incomplete run folder"):
        load_run(run)


def test_run_config_and_metrics_are_validated(tiny_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["lr"] = "fast"  # unknown key
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match=r"invalid run config .*unknown key\(s\) \['lr'\]"):
        load_run(run)
    cfg["train"].pop("lr")
    cfg["train"]["epochs"] = "two"
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match="'train.epochs' expects int"):
        load_run(run)
    shutil.copy(tiny_run / "config.json", run / "config.json")
    (run / "metrics.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="metrics.json: must hold a JSON object"):
        load_run(run)


def test_a_live_lock_stops_a_second_writer_and_a_stale_one_is_taken_over(tmp_path, capsys):
    out = tmp_path / "r"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".r.lock").write_text(str(sleeper.pid))
        assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
        assert f"another mmrobust process (pid {sleeper.pid}) is writing this run" in _err_line(capsys)
        assert not out.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0  # the lock's owner is dead
    assert not (tmp_path / ".r.lock").exists()


def test_concurrent_writers_never_both_succeed(tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "mmrobust.cli", "train", *TINY, "--epochs", "2", "--out", str(out)]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "is writing this run" in loser or "already exists" in loser
    load_run(out)  # complete and consistent


def _train_until_checkpoint(out: Path, epochs: int, min_epoch: int, sig: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mmrobust.cli", "train", *SLOW, "--epochs", str(epochs), "--out", str(out)]
    # the same thread count as this process: float sums split over other thread counts differ in the last bits
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ck = out.with_name(f".{out.name}.partial") / "checkpoint.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(ck.read_text())["epoch"] >= min_epoch:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_kill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    epochs = 6
    assert main(["train", *SLOW, "--epochs", str(epochs), "--out", str(tmp_path / "full")]) == 0
    killed = _train_until_checkpoint(tmp_path / "r", epochs, 2, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "r").exists()  # nothing but the hidden partial folder and the dead lock
    assert main(["train", *SLOW, "--epochs", str(epochs), "--resume", "--out", str(tmp_path / "r")]) == 0
    assert _sha(tmp_path / "r" / "model.safetensors") == _sha(tmp_path / "full" / "model.safetensors")
    full, resumed = load_run(tmp_path / "full"), load_run(tmp_path / "r")
    strip = [{k: v for k, v in row.items() if k != "time_s"} for row in full.metrics["history"]]
    assert [{k: v for k, v in row.items() if k != "time_s"} for row in resumed.metrics["history"]] == strip
    assert _epochs_logged(tmp_path / "r") == [1, 2, 3, 4, 5, 6]  # continued, not retrained from scratch


def test_sigterm_keeps_a_checkpoint_and_resume_refuses_changed_settings(tmp_path, capsys):
    out = tmp_path / "r"
    stopped = _train_until_checkpoint(out, 5, 1, signal.SIGTERM)
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted; continue with the same command plus --resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not (tmp_path / ".r.lock").exists()  # released on the way out
    assert main(["train", *SLOW, "--epochs", "5", "--out", str(out)]) == 2
    assert "an interrupted run of this folder has a checkpoint; pass --resume" in _err_line(capsys)
    assert main(["train", *SLOW, "--epochs", "5", "--lr", "0.01", "--resume", "--out", str(out)]) == 2
    assert "setting 'train.optim.lr' differs from the interrupted run" in _err_line(capsys)
    assert main(["train", *SLOW, "--epochs", "5", "--resume", "--out", str(out)]) == 0
    assert load_run(out).metrics["epochs"] == 5
    capsys.readouterr()
    assert main(["train", *SLOW, "--epochs", "5", "--resume", "--out", str(out)]) == 2
    assert "already complete; nothing to resume" in _err_line(capsys)


def test_folder_data_are_found_from_anywhere_and_fingerprinted(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("train", 60), ("test", 20)):
        np.savez(data / f"{name}.npz", a=rng.normal(size=(n, 4)).astype(np.float32),
                 b=rng.normal(size=(n, 3)).astype(np.float32), label=rng.integers(0, 2, n))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "data", "--epochs", "1", "--no-progress", "--out", "run"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = load_run(tmp_path / "run")
    assert run.config.data.name == str(data)  # stored absolute
    run.data()
    with np.load(data / "test.npz") as z:
        arrays = dict(z)
    arrays["a"][0, 0] += 1.0  # edited after training
    np.savez(data / "test.npz", **arrays)
    with pytest.raises(RunError, match="changed since training .* allow_data_change=True"):
        load_run(tmp_path / "run").data()
    assert len(load_run(tmp_path / "run", allow_data_change=True).data().test) == 20


def test_output_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "r").iterdir()}
    assert set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("method", ["gb", "ogm-ge", "pmr", "crmt-jt", "msefm", "mixup"])
def test_resume_restores_strategy_state(tmp_path, monkeypatch, method):
    """Interrupted after epoch 2 (in-process), resumed: same weights as an uninterrupted run."""
    import mmrobust.training.checkpoint as checkpoint

    args = ["train", *TINY, "--method", method, "--epochs", "4", "--seed", "1"]
    if method == "msefm":
        args += ["--method-opt", "memory_size=32"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    real = checkpoint.save_checkpoint

    def save_then_stop(folder, state):
        real(folder, state)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    assert main([*args, "--out", str(tmp_path / "r")]) == 130
    monkeypatch.setattr(checkpoint, "save_checkpoint", real)
    trained = []
    real_epoch = Trainer._train_epoch

    def counted_epoch(self, epoch, *a, **kw):
        trained.append(epoch + 1)
        return real_epoch(self, epoch, *a, **kw)

    monkeypatch.setattr(Trainer, "_train_epoch", counted_epoch)
    assert main([*args, "--resume", "--out", str(tmp_path / "r")]) == 0
    assert trained == [3, 4]  # continued from the checkpoint, not retrained from scratch
    assert _sha(tmp_path / "r" / "model.safetensors") == _sha(tmp_path / "full" / "model.safetensors")
    assert _epochs_logged(tmp_path / "r") == [1, 2, 3, 4]


def test_torchrun_kill_then_resume_is_bit_identical(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port()]
    args = [*launcher, "-m", "mmrobust.cli", "train", *SLOW, "--epochs", "5"]
    done = subprocess.run([*args, "--out", str(tmp_path / "full")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "r")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    ck = tmp_path / ".r.partial" / "checkpoint.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(ck.read_text())["epoch"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    target = str(tmp_path / "r")
    for entry in Path("/proc").iterdir():  # the launcher and both workers (they run in sessions of their own)
        try:
            if entry.name.isdigit() and target in (entry / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    proc.wait(timeout=60)
    assert not (tmp_path / "r").exists()
    resumed = subprocess.run([*args, "--resume", "--out", str(tmp_path / "r")], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, [
        line for line in resumed.stderr.splitlines() if "mmrobust" in line or "Error" in line
    ]
    assert _sha(tmp_path / "r" / "model.safetensors") == _sha(tmp_path / "full" / "model.safetensors")
