"""Runs follow their data: a moved project folder, another copy (``--data``), changed data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mmrobust.cli import main
from mmrobust.errors import RunError
from mmrobust.io import read_json
from mmrobust.runs import RELATIVE_DATA_KEY, load_run


def _project(root):
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(parents=True)
    for name, n in (("train", 60), ("test", 20)):
        np.savez(data / f"{name}.npz", a=rng.normal(size=(n, 4)).astype(np.float32),
                 b=rng.normal(size=(n, 3)).astype(np.float32), label=rng.integers(0, 2, n))  # fmt: skip
    assert main(["train", "--data", str(data), "--epochs", "1", "--no-progress", "--device", "cpu",
                 "--out", str(root / "runs" / "r")]) == 0  # fmt: skip
    return data, root / "runs" / "r"


def _err(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_run_records_its_data_path_relative_to_the_run(tmp_path):
    data, run = _project(tmp_path / "proj")
    source = read_json(run / "config.json")["data_source"]
    assert source["name"] == str(data)
    assert source[RELATIVE_DATA_KEY] == "../../data"


def test_moved_project_folder_evaluates_without_flags(tmp_path, capsys):
    _project(tmp_path / "proj")
    shutil.move(str(tmp_path / "proj"), str(tmp_path / "moved"))
    run = tmp_path / "moved" / "runs" / "r"
    assert main(["evaluate", str(run), "--no-progress", "--device", "cpu"]) == 0
    params = read_json(run / "eval.json")["parameters"]
    assert params["device"] == "cpu"
    assert params["data"] == {"path": str(tmp_path / "moved" / "data")}  # the moved copy, same fingerprint
    assert main(["certify", str(run), "--radii", "0,0.5"]) == 0
    entry = next(iter(read_json(run / "certify.json")["certifiers"].values()))
    assert entry["data"]["path"] == str(tmp_path / "moved" / "data") and entry["device"] == "cpu"


def test_moved_data_that_changed_are_refused(tmp_path):
    data, run = _project(tmp_path / "proj")
    shutil.move(str(tmp_path / "proj"), str(tmp_path / "moved"))
    with np.load(tmp_path / "moved" / "data" / "test.npz") as z:
        arrays = dict(z)
    arrays["a"][0, 0] += 1.0
    np.savez(tmp_path / "moved" / "data" / "test.npz", **arrays)
    with pytest.raises(RunError, match="differ from the run's"):
        load_run(tmp_path / "moved" / "runs" / "r").data()


def test_evaluate_on_a_copy_with_data(tmp_path, capsys):
    data, run = _project(tmp_path)
    shutil.copytree(data, tmp_path / "copy")
    assert main(["evaluate", str(run), "--data", str(tmp_path / "copy"), "--no-progress", "--device", "cpu"]) == 0
    record = read_json(run / "eval.json")["parameters"]["data"]
    assert record == {"path": str(tmp_path / "copy")}  # same fingerprint: nothing changed


def test_modified_copy_needs_allow_data_change_and_is_recorded(tmp_path, capsys):
    data, run = _project(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    with np.load(copy / "test.npz") as z:
        arrays = dict(z)
    arrays["a"][0, 0] += 1.0
    np.savez(copy / "test.npz", **arrays)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(copy), "--no-progress"]) == 2
    err = _err(capsys)
    assert "differ from the run's" in err and "--allow-data-change" in err
    assert not (run / "eval.json").exists()
    assert main(["evaluate", str(run), "--data", str(copy), "--allow-data-change", "--no-progress"]) == 0
    record = read_json(run / "eval.json")["parameters"]["data"]
    assert record["path"] == str(copy) and record["changed"] is True
    assert record["run_fingerprint"] == read_json(run / "config.json")["data_source"]["fingerprint"]
    assert record["fingerprint"] != record["run_fingerprint"]
    assert main(["certify", str(run), "--data", str(copy), "--radii", "0,0.5"]) == 2
    assert "--allow-data-change" in _err(capsys)
    assert main(["certify", str(run), "--data", str(copy), "--allow-data-change", "--radii", "0,0.5"]) == 0
    entry = next(iter(read_json(run / "certify.json")["certifiers"].values()))
    assert entry["data"]["changed"] is True


def test_data_folder_must_exist(tmp_path, capsys):
    data, run = _project(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "data folder not found" in _err(capsys)
    assert not (run / "eval.json").exists()
