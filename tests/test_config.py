import pytest

from mmrobust.cli import build_parser, build_run_config
from mmrobust.config import RunConfig
from mmrobust.errors import ConfigError


def test_yaml_config_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data: {name: synthetic, options: {classes: 3}}\n"
        "model: {feature_dim: 24}\n"
        "train: {method: jt, epochs: 5, optim: {name: sgd, lr: 0.05}}\n"
    )
    args = build_parser().parse_args(
        ["train", "--config", str(path), "--epochs", "2", "--data-opt", "dim=4", "--out", "x"]
    )
    cfg = build_run_config(args)
    assert cfg.train.epochs == 2 and cfg.train.optim.name == "sgd" and cfg.train.optim.lr == 0.05
    assert cfg.model.feature_dim == 24
    assert cfg.data.options == {"classes": 3, "dim": "4"}
    # the saved form round-trips
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {epochz: 3}\n", r"config 'train': unknown key\(s\) \['epochz'\]"),
        ("train: {optim: {nme: sgd}}\n", r"config 'train.optim': unknown key\(s\) \['nme'\]"),
        ("trainer: {}\n", r"unknown section\(s\) \['trainer'\]"),
        ("train: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_file(path)
