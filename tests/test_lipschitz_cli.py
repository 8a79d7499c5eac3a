"""``mmrobust train --lipschitz-encoders``: the flag reaches the model, is saved, and is validated."""

import json

import numpy as np

from mmrobust.cli import build_parser, build_run_config, main

TINY = ["--data", "synthetic", "--data-opt", "n_train=60", "--data-opt", "n_val=20", "--data-opt", "n_test=20",
        "--epochs", "1", "--feature-dim", "8", "--no-progress"]  # fmt: skip


def _cfg(*argv: str):
    return build_run_config(build_parser().parse_args(["train", *argv, "--out", "x"]))


def test_flag_sets_the_model_config_and_no_flag_overrides_a_config_file(tmp_path):
    assert _cfg("--data", "synthetic").model.lipschitz_encoders is False
    assert _cfg("--data", "synthetic", "--lipschitz-encoders").model.lipschitz_encoders is True
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {lipschitz_encoders: true}\n")
    assert _cfg("--config", str(cfg_file)).model.lipschitz_encoders is True
    assert _cfg("--config", str(cfg_file), "--no-lipschitz-encoders").model.lipschitz_encoders is False


def test_train_with_the_flag_builds_and_saves_lipschitz_encoders(tmp_path):
    from mmrobust.runs import load_run

    out = tmp_path / "r"
    assert main(["train", *TINY, "--lipschitz-encoders", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["lipschitz_encoders"] is True
    run = load_run(out)  # rebuilt from the saved config with the same encoders
    assert {type(e).__name__ for e in run.model.encoders.values()} == {"LipschitzMLP"}


def test_flag_on_a_modality_without_a_lipschitz_encoder_is_a_one_line_error(tmp_path, capsys):
    root = tmp_path / "ds"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        np.savez(root / f"{name}.npz", a=rng.normal(size=(20, 4)).astype(np.float32),
                 vid=rng.normal(size=(20, 2, 1, 4, 4)).astype(np.float32), label=np.arange(20) % 2)  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--epochs", "1", "--lipschitz-encoders", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no 1-Lipschitz encoder for modality 'vid'" in err[0], err
    assert not out.exists()  # nothing half-written
