import json
import shutil
import subprocess
import sys

import pytest
import torch

from mmrobust.eval.runner import evaluate_run
from mmrobust.io import write_json
from mmrobust.report.robustness import save_eval
from mmrobust.runs import load_run
from mmrobust.training import train
from tests.conftest import free_port, tiny_config


def test_jt_learns_and_selects_on_validation(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    hist = metrics["history"]
    assert len(hist) == 3
    best = max(range(3), key=lambda i: (hist[i]["val_accuracy"], -hist[i]["val_loss"]))
    assert metrics["best_epoch"] == best + 1
    assert metrics["val_accuracy"] == pytest.approx(hist[best]["val_accuracy"])
    assert metrics["test_accuracy"] > 0.6  # chance is 0.25
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_evaluate_reproduces_test_accuracy_exactly(tiny_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(tiny_run, run_dir)
    result = evaluate_run(run_dir)
    save_eval(run_dir, result)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result.clean_accuracy == metrics["test_accuracy"]
    assert not result.warnings
    written = json.loads((run_dir / "eval.json").read_text())
    assert [r["modalities"] for r in written["results"]] == [["strong"], ["weak"]]
    # removing the informative modality hurts more than removing the weak one
    acc = {r["modalities"][0]: r["accuracy"] for r in written["results"]}
    assert acc["strong"] < acc["weak"]


def test_training_is_deterministic_by_seed():
    a = train(tiny_config(epochs=1))
    b = train(tiny_config(epochs=1))
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k


def test_load_run_rejects_corrupt_weights(tiny_run, tmp_path):
    from mmrobust.errors import RunError
    from mmrobust.runs import seal_run

    run_dir = tmp_path / "bad"
    shutil.copytree(tiny_run, run_dir)
    data = (run_dir / "model.safetensors").read_bytes()
    (run_dir / "model.safetensors").write_bytes(data[: len(data) // 3])
    # the manifest is checked first (issue 22): nothing unsealed is parsed
    with pytest.raises(RunError, match="model.safetensors changed after the run was written"):
        load_run(run_dir)
    seal_run(run_dir)
    with pytest.raises(RunError, match="corrupt or truncated safetensors"):
        load_run(run_dir)
    (run_dir / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="config.json changed after the run was written"):
        load_run(run_dir)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import os

    target = tmp_path / "m.json"
    write_json(target, {"a": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_torchrun_two_processes_equals_one(tmp_path):
    """DDP over 2 processes (batch 32 = 2 x 16) takes the same steps as 1 process with batch 32."""
    args = ["--data", "synthetic", "--epochs", "2", "--batch-size", "32", "--feature-dim", "16", "--no-progress"]
    for k, v in {"n_train": "240", "n_val": "80", "n_test": "120", "dim": "12", "classes": "4"}.items():
        args += ["--data-opt", f"{k}={v}"]
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port()]
    proc = subprocess.run(
        [*env_cmd, "-m", "mmrobust.cli", "train", *args, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mmrobust.cli import main

    assert main(["train", *args, "--out", str(tmp_path / "single")]) == 0
    ddp, single = load_run(tmp_path / "ddp"), load_run(tmp_path / "single")
    assert ddp.metrics["world_size"] == 2 and single.metrics["world_size"] == 1
    for (k, a), b in zip(ddp.model.state_dict().items(), single.model.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), k
    assert ddp.metrics["test_accuracy"] == pytest.approx(single.metrics["test_accuracy"], abs=1 / 120)


def test_write_json_turns_non_finite_values_into_null_inside_tensors_too(tmp_path):
    write_json(tmp_path / "x.json", {"t": torch.tensor([1.0, float("nan")]), "f": float("inf")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"t": [1.0, None], "f": None}


def test_the_engine_prints_nothing_and_reports_epochs_and_steps_to_callbacks(tmp_path, capsys):
    from mmrobust.training import train

    lines: list[str] = []
    steps: list[tuple[str, int, int]] = []
    cfg = tiny_config(epochs=2)
    result = train(cfg, tmp_path / "run", on_epoch=lines.append, progress=lambda *a: steps.append(a))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # presentation is the caller's
    assert [line.split("  ")[0] for line in lines] == ["[jt] epoch 1/2", "[jt] epoch 2/2"]
    assert (tmp_path / "run" / "train.log").read_text().splitlines() == lines
    per_epoch = -(-len(result.bundle.train) // cfg.train.batch_size)
    assert steps == [("jt train", i, 2 * per_epoch) for i in range(1, 2 * per_epoch + 1)]
