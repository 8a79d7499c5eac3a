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


def test_recipes_set_the_optimiser_and_flags_override_them(tmp_path):
    from mmrobust.config import RECIPES, OptimConfig

    args = build_parser().parse_args(["train", "--recipe", "paper", "--lr", "0.01", "--out", "x"])
    optim = build_run_config(args).train.optim
    assert (optim.recipe, optim.name, optim.momentum, optim.weight_decay, optim.schedule) == (
        "paper", "sgd", 0.9, 1e-4, "step"
    )  # fmt: skip
    assert optim.lr == 0.01  # the flag wins over the recipe
    assert OptimConfig.from_recipe("tuned") == OptimConfig()  # tuned = the defaults
    assert set(RECIPES) == {"tuned", "paper"}
    path = tmp_path / "r.yaml"
    path.write_text("train: {optim: {recipe: paper, lr: 0.002}}\n")
    optim = RunConfig.from_file(path).train.optim
    assert (optim.name, optim.schedule, optim.lr) == ("sgd", "step", 0.002)
    assert RunConfig.from_dict(RunConfig.from_file(path).to_dict()).train.optim == optim  # saved form round-trips
    with pytest.raises(ConfigError, match="unknown training recipe 'fast'; choose from: tuned, paper"):
        OptimConfig.from_recipe("fast")
