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
from mmrobust.runs import load_run, seal_run
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
    # the manifest is checked before config.json is trusted: an unsealed edit is refused as such
    with pytest.raises(RunError, match=r"config.json changed after the run was written"):
        load_run(run)
    seal_run(run)  # sealed on purpose: now the config itself is validated
    with pytest.raises(RunError, match=r"invalid run config .*unknown key\(s\) \['lr'\]"):
        load_run(run)
    cfg["train"].pop("lr")
    cfg["train"]["epochs"] = "two"
    (run / "config.json").write_text(json.dumps(cfg))
    seal_run(run)
    with pytest.raises(RunError, match="'train.epochs' expects int"):
        load_run(run)
    shutil.copy(tiny_run / "config.json", run / "config.json")
    (run / "metrics.json").write_text("[1, 2]")
    seal_run(run)
    with pytest.raises(RunError, match="metrics.json: must hold a JSON object"):
        load_run(run)
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": "high"}))  # sealed, but not a number
    seal_run(run)
    with pytest.raises(RunError, match="'test_accuracy' must be a number"):
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


# -- issue 22: verified resume, outputs resolved once, one writer protocol ----------------------------


def _interrupted(argv: list[str], monkeypatch, after: int = 2) -> None:
    """Run ``mmrobust train`` and stop it (KeyboardInterrupt) while it reports epoch ``after``: the
    checkpoint of epoch ``after - 1`` stays in the partial folder."""
    import mmrobust.report.console as console

    def stop(line: str) -> None:
        if f"epoch {after}/" in line:
            raise KeyboardInterrupt

    monkeypatch.setattr(console, "echo", stop)
    assert main(argv) == 130
    monkeypatch.undo()


def _partial_files(out: Path) -> dict[str, str]:
    partial = out.with_name(f".{out.name}.partial")
    return {p.name: _sha(p) for p in sorted(partial.iterdir())}


@pytest.mark.parametrize("tamper", ["tensor-bytes", "epoch", "history"])
def test_resume_refuses_a_tampered_checkpoint_and_keeps_it(tmp_path, capsys, monkeypatch, tamper):
    out = tmp_path / "r"
    argv = ["train", *TINY, "--epochs", "3", "--out", str(out)]
    _interrupted(argv, monkeypatch)
    capsys.readouterr()
    partial = out.with_name(".r.partial")
    doc = json.loads((partial / "checkpoint.json").read_text())
    tensors = partial / doc["tensors"]
    saved = {p.name: p.read_bytes() for p in partial.iterdir()}
    if tamper == "tensor-bytes":
        raw = bytearray(tensors.read_bytes())
        raw[-3] ^= 0x01  # one bit of one weight
        tensors.write_bytes(bytes(raw))
        named = doc["tensors"]
    else:
        if tamper == "epoch":
            doc["epoch"] = 2  # claims a later epoch than it holds
        else:
            doc["history"][0]["val_accuracy"] = 1.0
        (partial / "checkpoint.json").write_text(json.dumps(doc))
        named = "checkpoint.json"
    before = _partial_files(out)
    assert main([*argv, "--resume"]) == 2
    line = _err_line(capsys)
    assert named in line and ("changed after it was written" in line or "edited after it was written" in line), line
    assert _partial_files(out) == before and not out.exists()  # nothing lost, nothing published
    for name, data in saved.items():  # restored: the resume continues and says so
        (partial / name).write_bytes(data)
    assert main([*argv, "--resume"]) == 0
    metrics = load_run(out).metrics
    assert metrics["resumed"] is True and metrics["resumed_from_epoch"] == 1 and metrics["reproducible"] is True


def _npz_folder(root: Path, shift: float = 0.0) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(exist_ok=True)
    for split, n in (("train", 96), ("test", 32)):
        y = rng.integers(0, 3, n)
        x = rng.standard_normal((n, 6)).astype(np.float32) + y[:, None]
        z = rng.standard_normal((n, 4)).astype(np.float32)
        np.savez(root / f"{split}.npz", a=x + shift, b=z, label=y)
    return root


def test_resume_refuses_changed_data_unless_allowed_and_records_both_fingerprints(tmp_path, capsys, monkeypatch):
    data = _npz_folder(tmp_path / "data")
    out = tmp_path / "r"
    argv = ["train", "--data", str(data), "--feature-dim", "8", "--no-progress", "--epochs", "3", "--out", str(out)]
    _interrupted(argv, monkeypatch)
    capsys.readouterr()
    first = json.loads((out.with_name(".r.partial") / "checkpoint.json").read_text())["data_fingerprint"]
    _npz_folder(data, shift=0.5)  # the data are regenerated differently while the run is down
    before = _partial_files(out)
    assert main([*argv, "--resume"]) == 2
    line = _err_line(capsys)
    assert "the data changed since the interrupted run started" in line and "--allow-data-change" in line
    assert _partial_files(out) == before and not out.exists()
    assert main([*argv, "--allow-data-change"]) == 2  # only with --resume
    assert "--allow-data-change applies to --resume only" in _err_line(capsys)
    assert main([*argv, "--resume", "--allow-data-change"]) == 0
    metrics = load_run(out, allow_data_change=True).metrics
    assert metrics["resumed_from_epoch"] == 1 and metrics["reproducible"] is False
    assert metrics["data_fingerprints"][0] == first and len(set(metrics["data_fingerprints"])) == 2


def test_resume_rehashes_an_ondisk_train_split(tmp_path, capsys, monkeypatch):
    disk = tmp_path / "disk"
    assert main(["data", "convert", "synthetic", str(disk), "--data-opt", "n_train=120", "--data-opt", "n_val=40",
                 "--data-opt", "n_test=40", "--data-opt", "dim=8", "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "r"
    argv = ["train", "--data", str(disk), "--feature-dim", "8", "--no-progress", "--epochs", "3", "--out", str(out)]
    _interrupted(argv, monkeypatch)
    capsys.readouterr()
    arr = np.load(disk / "train" / "weak.npy", mmap_mode="r+")
    arr[5, 0] += 1.0  # one value, still finite: only a re-hash sees it
    arr.flush()
    del arr
    assert main([*argv, "--resume"]) == 2
    assert "train/weak.npy: changed since the dataset was written" in _err_line(capsys)
    assert (out.with_name(".r.partial") / "checkpoint.json").is_file()


def test_outputs_are_published_at_a_symlink_target(tmp_path, capsys):
    big = tmp_path / "bigdisk"
    big.mkdir()
    link = tmp_path / "runs"
    link.symlink_to(big, target_is_directory=True)
    assert main(["train", *TINY, "--epochs", "1", "--out", str(link / "r")]) == 0
    assert load_run(big / "r").metrics["resumed"] is False
    target = tmp_path / "elsewhere"
    (tmp_path / "r2").symlink_to(target)  # a dangling link to the place the run should go
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2").is_symlink() and (target / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing stranded


@pytest.mark.parametrize("command", ["train", "convert"])
def test_force_replaces_only_mmrobust_folders(tmp_path, capsys, command):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    (tmp_path / "f.txt").write_text("keep")
    if command == "train":
        argv = lambda dst: ["train", *TINY, "--epochs", "1", "--out", str(dst), "--force"]  # noqa: E731
    else:
        argv = lambda dst: ["data", "convert", "synthetic", str(dst), "--data-opt", "n_train=60", "--data-opt",  # noqa: E731
                            "n_val=20", "--data-opt", "n_test=20", "--no-progress", "--force"]  # fmt: skip
    for dst, msg in ((foreign, "not a folder written by mmrobust"), (tmp_path / "f.txt", "is not a folder"),
                     (Path(os.devnull), "is not a folder")):  # fmt: skip
        assert main(argv(dst)) == 2
        assert msg in _err_line(capsys)
    assert (foreign / "holiday.jpg").read_bytes() == b"x" and (tmp_path / "f.txt").read_text() == "keep"
    assert Path(os.devnull).is_char_device()


def test_concurrent_certify_keeps_both_results(tiny_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "mmrobust", "certify", str(run), "--certifier"]
    runs = (["empirical", "--fit-samples", "16"], ["sound"])
    procs = [
        subprocess.Popen([*cmd, *extra], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL) for extra in runs
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read() if p.stderr else ""
    doc = json.loads((run / "certify.json").read_text())
    assert {"empirical", "sound"} <= set(doc["certifiers"])


def test_a_second_concurrent_convert_is_refused_in_one_line(tmp_path, capsys):
    from mmrobust.publish import Lock, resolve_target

    dst = tmp_path / "ds"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = Lock(resolve_target(dst), "dataset")
        lock.path.write_text(str(sleeper.pid))  # the first convert, still running
        assert main(["data", "convert", "synthetic", str(dst), "--no-progress"]) == 2
        assert f"another mmrobust process (pid {sleeper.pid}) is writing this dataset" in _err_line(capsys)
        assert not dst.exists() and not dst.with_name(".ds.partial").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
