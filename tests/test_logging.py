"""Experiment logs (--log csv,tensorboard) and Python logging of library messages."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from mmrobust.cli import main

TINY = ["--data", "synthetic", "--data-opt", "n_train=96", "--data-opt", "n_val=32", "--data-opt", "n_test=32",
        "--no-progress"]  # fmt: skip


def test_csv_and_tensorboard_logs_hold_every_epoch(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "3", "--log", "csv,tensorboard", "--out", str(out)]) == 0
    history = json.loads((out / "metrics.json").read_text())["history"]
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row, h in zip(rows, history, strict=True):
        assert float(row["val_accuracy"]) == pytest.approx(h["val_accuracy"])
        assert float(row["train_loss"]) == pytest.approx(h["train_loss"])
    events = EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    assert "epoch/val_accuracy" in events.Tags()["scalars"]
    got = [(e.step, e.value) for e in events.Scalars("epoch/val_accuracy")]
    assert got == [(h["epoch"], pytest.approx(h["val_accuracy"])) for h in history]


def test_unknown_logger_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *TINY, "--log", "csv,wandb", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        "mmrobust: error: --log: unknown logger(s) ['wandb']; choose from: csv, tensorboard\n"
    )
    assert not (tmp_path / "run").exists()


def test_library_messages_go_to_python_logging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from mmrobust.config import RunConfig
    from mmrobust.data import DataConfig
    from mmrobust.training import train

    cfg = RunConfig(data=DataConfig("synthetic", options={"n_train": 96, "n_val": 32, "n_test": 32}))
    cfg.train.epochs, cfg.train.method, cfg.train.progress = 1, "crmt-jt", False
    with caplog.at_level(logging.INFO, logger="mmrobust"):
        train(cfg)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("mmrobust"))
    assert "[crmt-jt] epoch 1/1" in text and "step 2 (modality weights a^(m)): kept" in text
