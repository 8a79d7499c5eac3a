"""Bring a trained model: LateFusionModel.from_modules, ModelConfig.factory, `mmrobust wrap`, the
user's model in the benchmark (issue 20 items 3, 6)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmrobust.benchmark import BenchmarkConfig
from mmrobust.certify.runner import certify_model
from mmrobust.cli import main
from mmrobust.data import DataConfig, load_data
from mmrobust.errors import ConfigError
from mmrobust.models import LateFusionModel
from mmrobust.models.fusion import WrappedModel
from mmrobust.runs import load_run
from mmrobust.wrap import wrap_model

ROOT = Path(__file__).resolve().parents[1]
OPTS = {"n_train": "64", "n_val": "16", "n_test": "40", "dim": "6"}
DATA = ["--data", "synthetic", *[f"--data-opt={k}={v}" for k, v in OPTS.items()]]

MODULE = '''
import torch
from torch import nn
from mmrobust.models import LateFusionModel, ENCODERS


class Net(nn.Module):
    """Plain PyTorch late fusion: an MLP per modality, one linear layer over the concatenation."""

    def __init__(self, dims, classes, d=8):
        super().__init__()
        self.enc = nn.ModuleDict({m: nn.Sequential(nn.Linear(n, d), nn.ReLU()) for m, n in dims.items()})
        self.fc = nn.Linear(d * len(dims), classes)

    def forward(self, x):
        return self.fc(torch.cat([self.enc[m](x[m]) for m in self.enc], 1))


def plain(meta):
    return Net({s.name: s.shape[0] for s in meta.modalities}, meta.num_classes)


def late(meta):
    net = plain(meta)
    return LateFusionModel.from_modules(dict(net.enc), net.fc, meta)


@ENCODERS.register("wrap-test-gelu")
class GeluEncoder(nn.Module):
    def __init__(self, spec, feature_dim=16):
        super().__init__()
        self.lin = nn.Linear(spec.shape[0], feature_dim)
        self.out_dim = feature_dim

    def forward(self, x):
        return nn.functional.gelu(self.lin(x.flatten(1)))
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """A folder holding the user's module ``wrapmodels`` and weights of both of its factories."""
    root = tmp_path_factory.mktemp("wrap")
    (root / "wrapmodels.py").write_text(MODULE)
    sys.path.insert(0, str(root))
    import wrapmodels  # type: ignore[import-not-found]

    bundle = load_data(DataConfig("synthetic", options=dict(OPTS)))
    torch.manual_seed(0)
    net = wrapmodels.plain(bundle.meta)
    save_file(net.state_dict(), root / "net.safetensors")
    late = LateFusionModel.from_modules(dict(net.enc), net.fc, bundle.meta)
    save_file(late.state_dict(), root / "late.safetensors")
    torch.save(net.state_dict(), root / "net.pt")
    yield root, bundle, net
    sys.path.remove(str(root))


def test_from_modules_gives_the_users_logits_and_every_certifier_works(plugin) -> None:
    _, bundle, net = plugin
    model = LateFusionModel.from_modules(dict(net.enc), net.fc, bundle.meta).eval()
    x = bundle.test.inputs
    with torch.no_grad():
        assert (model(x) - net(x)).abs().max() <= 1e-5
    for name in ("sound", "crown", "empirical"):
        res = certify_model(model, bundle.meta, bundle.test, name, bundle.train, (0.0, 0.1))
        assert res.certificate.radii.joint.shape == (len(bundle.test),)


def test_from_modules_refuses_what_it_cannot_turn_into_late_fusion(plugin) -> None:
    _, bundle, net = plugin
    with pytest.raises(ConfigError, match="head takes 99 features"):
        LateFusionModel.from_modules(dict(net.enc), nn.Linear(99, 10), bundle.meta)
    with pytest.raises(ConfigError, match="not additive late fusion"):
        LateFusionModel.from_modules(dict(net.enc), nn.Sequential(nn.Linear(16, 10)), bundle.meta)
    with pytest.raises(ConfigError, match="dataset has modalities"):
        LateFusionModel.from_modules({"x": net.enc["strong"]}, net.fc, bundle.meta)


@pytest.mark.parametrize(("factory", "weights", "late"), [("late", "late", True), ("plain", "net", False)])
def test_wrap_writes_a_run_that_a_fresh_process_rebuilds_without_plugin(plugin, tmp_path, factory, weights, late):
    root, bundle, net = plugin
    out = root / f"run-{factory}"
    res = wrap_model(f"wrapmodels:{factory}", root / f"{weights}.safetensors", DataConfig("synthetic", 0, dict(OPTS)),
                     out, bundle=bundle)  # fmt: skip
    assert res.late_fusion is late and (out / "manifest.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["factory"] == f"wrapmodels:{factory}" and "wrapmodels" in config["plugins"]
    run = load_run(out)
    assert isinstance(run.model, LateFusionModel if late else WrappedModel)
    with torch.no_grad():
        expected = net.eval()(bundle.test.inputs)
    save_file({k: v.contiguous() for k, v in bundle.test.inputs.items()}, tmp_path / "x.safetensors")
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file, save_file
        from mmrobust.runs import load_run
        run = load_run({str(out)!r})
        with torch.no_grad():
            save_file({{"logits": run.model(load_file({str(tmp_path / "x.safetensors")!r}))}}, "logits.safetensors")
    """)  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", script], cwd=root, env=env, check=True, timeout=120)
    got = load_file(root / "logits.safetensors")["logits"]
    assert (got - expected).abs().max() <= 1e-5


def test_wrap_cli_run_is_accepted_by_evaluate_and_certify(plugin, tmp_path, monkeypatch, capsys) -> None:
    root, _, _ = plugin
    monkeypatch.chdir(root)
    base = ["wrap", "--model", "wrapmodels:plain", *DATA]
    assert main([*base, "--weights", "net.safetensors", "--out", str(tmp_path / "plain")]) == 0
    assert "not additive late fusion" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "plain"), "--suite", "paper", "--max-samples", "6", "--no-progress"]) == 0
    run = ["certify", str(tmp_path / "plain"), "--radii", "0,0.1"]
    assert main([*run, "--certifier", "empirical", "--fit-samples", "8"]) == 0
    capsys.readouterr()
    assert main([*run, "--certifier", "sound"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an additive late-fusion model" in err[0]


@pytest.mark.parametrize(
    ("weights", "model", "message"),
    [
        ("net.pt", "plain", "safetensors.torch.save_file(model.state_dict()"),
        ("late.safetensors", "plain", "key 'enc.strong.0.weight' is missing from the file"),
        ("net.safetensors", "late", "key 'encoders.strong.0.weight' is missing from the file"),
        ("missing.safetensors", "plain", "weights file not found"),
        ("net.safetensors", "nope", "module 'wrapmodels' has no 'nope'"),
    ],
)
def test_wrap_refuses_bad_weights_in_one_line_and_writes_nothing(plugin, tmp_path, monkeypatch, capsys, weights,
                                                                  model, message) -> None:  # fmt: skip
    root, _, _ = plugin
    monkeypatch.chdir(root)
    out = tmp_path / "run"
    assert main(["wrap", "--model", f"wrapmodels:{model}", "--weights", weights, *DATA, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmrobust: error: ") and message in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_benchmark_model_section_is_validated_and_enters_the_cell_hash(plugin) -> None:
    base = {"data": ["synthetic"], "methods": ["jt"], "seeds": 1}
    default = BenchmarkConfig(**base).cell_settings()
    assert "model" not in default  # cells finished before the model section stay valid
    mine = BenchmarkConfig(**base, model={"encoders": {"strong": "wrap-test-gelu"}}, plugins=["wrapmodels"])
    assert mine.cell_settings()["model"] == {"encoders": {"strong": "wrap-test-gelu"}}
    with pytest.raises(ConfigError, match="unknown key"):
        BenchmarkConfig(**base, model={"encoder": {}})
    with pytest.raises(ConfigError, match="unknown encoder"):
        BenchmarkConfig(**base, model={"encoders": {"strong": "no-such-encoder"}})
    with pytest.raises(ConfigError, match="trains its models from scratch"):
        BenchmarkConfig(**base, model={"factory": "wrapmodels:late"})


def test_benchmark_grid_on_a_plugin_encoder(plugin, tmp_path, capsys) -> None:
    root, _, _ = plugin
    out = tmp_path / "bench"
    argv = ["benchmark", *DATA, "--methods", "jt", "--seeds", "1", "--epochs", "1", "--max-samples", "4",
            "--suite", "curves", "--eps", "0.5", "--feature-dim", "8", "--out", str(out), "--no-progress",
            "--set", "model.encoders.strong=wrap-test-gelu", "--plugin", "wrapmodels"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    (config,) = out.rglob("config.json")
    run = json.loads(config.read_text())
    assert run["model"]["encoders"] == {"strong": "wrap-test-gelu"} and "wrapmodels" in run["plugins"]
    assert load_run(config.parent).model.encoders["strong"].__class__.__name__ == "GeluEncoder"
    # another model is another cell: refused without --force
    capsys.readouterr()
    assert main([*argv[:-4], "--no-progress"]) == 2
    assert "force" in capsys.readouterr().err
