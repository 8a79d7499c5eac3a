import subprocess
import sys

import numpy as np
import pytest

from mmrobust.cli import main


def _one_line_error(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmrobust: error: "), err
    assert needle in err[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--method", "nosuch", "--data", "synthetic", "--out", "x"], "unknown training method 'nosuch'"),
        (["train", "--data", "nosuch", "--out", "x"], "unknown dataset 'nosuch'"),
        (
            ["train", "--data", "synthetic", "--epochs", "-1", "--out", "x"],
            "option 'train.epochs' must be in [0, 100000], got -1",
        ),
        (
            ["train", "--data", "synthetic", "--data-opt", "signal", "--out", "x"],
            "--data-opt 'signal' must look like KEY=VALUE",
        ),
        (
            ["train", "--data", "synthetic", "--method-opt", "rho=2", "--out", "x"],
            "method 'jt': unknown option(s) ['rho']",
        ),
        (["evaluate", "/nonexistent/run"], "/nonexistent/run: run folder not found"),
    ],
)
def test_cli_user_errors_are_one_line(capsys, argv, needle):
    _one_line_error(capsys, argv, needle)


def test_cli_bad_dataset_file_no_traceback(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    x[3, 1] = np.inf
    for name in ("train", "test"):
        np.savez(root / f"{name}.npz", a=x, b=x, label=np.arange(20) % 2)
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mmrobust.cli", "train", "--data", str(root), "--out", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "'a' contains NaN or inf values in 1 sample(s)" in proc.stderr
    assert not out.exists()  # nothing half-written


def test_cli_train_and_evaluate_roundtrip(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "--data", "synthetic", "--data-opt", "n_train=120", "--data-opt", "n_val=40",
            "--data-opt", "n_test=60", "--epochs", "1", "--feature-dim", "16", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.json",
        "metrics.json",
        "manifest.json",
        "train.log",
    }
    assert main(["evaluate", str(out)]) == 0
    assert (out / "eval.json").is_file()
    assert main(["datasets"]) == 0
    assert "avdigits" in capsys.readouterr().out
