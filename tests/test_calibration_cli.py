"""``mmrobust calibrate`` with user encoders (tiny stand-ins), its report, and its bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

from mmrobust.calibration.examples import missing_extra
from mmrobust.cli import main
from mmrobust.io import save_tensors
from tests.calibration_setups import nuisance_setup, write_folder_dataset

ENC = "audio=tests.calibration_setups:nuisance_encoder,image=tests.calibration_setups:nuisance_encoder"
FAST = ["--epochs", "2", "--eval-eps", "2/255,8/255", "--eval-opt", "steps=3", "--eval-opt", "queries=5",
        "--eval-opt", "targets=3", "--calib-opt", "stage1_epochs=60", "--calib-opt", "stage1_lr=0.01",
        "--calib-opt", "lr=0.01", "--calib-opt", "hidden=16", "--calib-opt", "attack_steps=3", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    setup = nuisance_setup()
    write_folder_dataset(root / "data", setup)
    write_folder_dataset(root / "data_norange", setup, valid_ranges=False)
    save_tensors(root / "centres.safetensors", {"centres": setup.model.centres("audio")})
    save_tensors(root / "centres7.safetensors", {"centres": torch.randn(4, 7)})
    return root


def _args(files, out, *extra: str, centres: str = "centres.safetensors", data: str = "data", enc: str = ENC):
    return ["calibrate", "--encoders", enc, "--centres", str(files / centres), "--data", str(files / data),
            "--out", str(out), *extra]  # fmt: skip


@pytest.mark.slow
def test_calibrate_user_encoders_writes_json_report_plot_and_heads(user_files, tmp_path):
    out = tmp_path / "out"
    assert main(_args(user_files, out, "--loss", "ce", *FAST)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "embeddings.png", "heads", "report.md"]
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["ce.json", "ce.safetensors"]
    result = json.loads((out / "calibration.json").read_text())
    audio_frozen = result["frozen"]["modalities"]["audio"]
    audio_ce = result["variants"]["ce"]["evaluation"]["modalities"]["audio"]
    assert audio_frozen["budgets"][1]["worst"]["accuracy"] < 0.3  # the stand-in is fragile at 8/255 ...
    assert audio_ce["budgets"][1]["worst"]["accuracy"] > 0.8  # ... and calibration fixes it
    assert 0 < result["variants"]["ce"]["calibration"]["heads"]["audio"]["trainable_fraction"] <= 1
    report = (out / "report.md").read_text()
    assert "| frozen |" in report and "| ce |" in report and "robust acc 8/255" in report
    assert "apgd-t skipped" not in report and "![embeddings](embeddings.png)" in report
    assert not list(tmp_path.glob(".out.*"))  # no partial folder left behind


@pytest.mark.parametrize(
    "extra, message",
    [(["--eps", "2"], "eps must be in (0, 1]"), (["--eps", "0"], "eps must be in (0, 1]"),
     (["--eval-eps", "8/255,1.5"], "eps must be in (0, 1]"), (["--loss", "mse"], "unknown loss 'mse'"),
     (["--lora-rank", "x"], "--lora-rank"), (["--calib-opt", "bogus=1"], "unknown option(s) ['bogus']"),
     (["--eval-opt", "attacks=pgd"], "unknown component 'pgd'")],
)  # fmt: skip
def test_bad_options_exit_2_before_any_work(user_files, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(_args(user_files, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmrobust: error:") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"centres": "centres7.safetensors"}, "dimension 7"),
     ({"enc": ENC.replace("audio=tests.calibration_setups:nuisance_encoder", "audio=tests.calibration_setups:nan_encoder")},
      "encoder 'audio' returned NaN"),
     ({"data": "data_norange"}, "'audio' has no valid input range"),
     ({"enc": "audio=tests.calibration_setups:nope"}, "has no 'nope'"),
     ({"enc": "audio=tests.calibration_setups:NOT_A_FACTORY"}, "is a int, not a factory to call"),
     ({"enc": "audio"}, "MODALITY=MODULE:FACTORY"),
     ({"centres": "missing.safetensors"}, "file not found")],
)  # fmt: skip
def test_bad_encoders_centres_or_data_exit_2_and_write_nothing(user_files, tmp_path, capsys, kwargs, message):
    out = tmp_path / "out"
    assert main(_args(user_files, out, *FAST, **kwargs)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmrobust: error:") and message in err and "\n" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_out_is_refused_without_force(user_files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(_args(user_files, out, *FAST)) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_example_and_encoders_flags_exclude_each_other(user_files, tmp_path, capsys):
    assert main(["calibrate", "--example", "avdigits-bind", "--data", "x", "--out", str(tmp_path / "o")]) == 2
    assert "do not apply" in capsys.readouterr().err
    assert main(["calibrate", "--example", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "unknown calibration example 'nope'; choose from: avdigits-bind" in capsys.readouterr().err


@pytest.mark.skipif(
    not missing_extra(), reason="the calibration extra is installed; this checks the message without it"
)
def test_example_without_the_extra_names_what_is_missing(tmp_path, capsys):
    assert main(["calibrate", "--example", "avdigits-bind", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'mmrobust[calibration]'" in err and missing_extra()[0] in err
    assert not (tmp_path / "o").exists()


def test_report_states_only_the_counts_of_the_components_that_ran():
    from mmrobust.report.calibration import _protocol_counts

    proto = {"steps": 20, "queries": 5000, "targets": 9}
    assert _protocol_counts({**proto, "attacks": ["apgd-ce"]}) == "20 steps"
    assert _protocol_counts({**proto, "attacks": ["square"]}) == "5000 Square queries"
    assert _protocol_counts({**proto, "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"]}) == (
        "20 steps, 5000 Square queries, 9 target classes"
    )
