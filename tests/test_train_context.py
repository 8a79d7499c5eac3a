"""The training package's structure: hooks see a TrainContext, the caller's config is never changed,
one optimiser builder, registry-owned method names, CRMT's fit_samples alias."""

import ast
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmrobust.config import RunConfig, build_optimizer, optimizer_for, options_dataclass
from mmrobust.errors import ConfigError
from mmrobust.training import METHODS, Strategy, TrainContext, Trainer, method_model_config, train
from mmrobust.training.crmt import CRMTOptions, OJTOptions

from .conftest import tiny_config

TRAINING = Path(__file__).resolve().parents[1] / "mmrobust" / "training"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_training_module_but_the_package_imports_the_engine():
    for path in TRAINING.glob("*.py"):
        if path.name in ("engine.py", "__init__.py"):
            continue
        assert "mmrobust.training.engine" not in _imports(path), path.name


def test_method_classes_do_not_repeat_their_registry_key():
    for path in TRAINING.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else []
                    assert not any(isinstance(t, ast.Name) and t.id == "name" for t in targets), (path.name, node.name)
    for key in METHODS.names():
        assert METHODS.get(key).name == key


@pytest.mark.parametrize("method", ["gb", "msefm", "crmt-jt"])
def test_train_leaves_the_callers_config_unchanged(method, tmp_path):
    cfg = tiny_config(method, epochs=1)
    if method == "msefm":
        cfg.train.method_options = {"memory_size": 32}
    if method == "crmt-jt":
        cfg.train.method_options = {"fit_samples": 32, "step2_epochs": 1}
    before = copy.deepcopy(cfg)
    fit = train(cfg, out=tmp_path / "run")
    assert cfg == before
    assert fit.model_config == method_model_config(cfg) == fit.config.model
    assert fit.config.model != cfg.model  # the method's head or extras
    assert method_model_config(cfg) is not cfg.model and cfg == before


def test_method_model_config_is_the_methods_head_and_extras():
    cfg = RunConfig()
    cfg.model.feature_dim = 24
    cfg.train.method = "gb"
    gb = method_model_config(cfg)
    assert (gb.head, gb.aux_heads, gb.feature_dim) == ("concat", True, 24)
    cfg.train.method, cfg.train.method_options = "msefm", {"memory_size": 7}
    assert method_model_config(cfg).feature_memory == 7
    cfg.train.method, cfg.train.method_options = "ojt", {}
    assert method_model_config(cfg).head == "orthogonal"
    assert cfg.model.head == "concat" and not cfg.model.aux_heads and cfg.model.feature_memory == 0


class _ContextProbe(Strategy):
    def __init__(self, options, meta):
        super().__init__(options, meta)
        self.seen = []

    def on_train_start(self, ctx):
        self.seen.append(ctx)

    def on_epoch_end(self, ctx, epoch):
        self.seen.append(ctx)
        return {}

    def loss(self, model, inputs, labels, ctx):
        logits = model(inputs)
        return F.cross_entropy(logits, labels), logits

    def after_training(self, ctx):
        self.seen.append(ctx)
        return {"probe_val": ctx.evaluate("val")}


def test_hooks_receive_a_narrow_frozen_context():
    trainer = Trainer(tiny_config("gb", epochs=1))
    trainer.strategy = probe = _ContextProbe(trainer.strategy.options, trainer.bundle.meta)
    messages = []
    fit = trainer.fit(on_epoch=messages.append)
    assert len(probe.seen) == 3 and all(isinstance(c, TrainContext) for c in probe.seen)
    ctx = probe.seen[0]
    assert ctx.model is trainer.model and ctx.train is trainer.train_split and ctx.val is trainer.bundle.val
    assert len(ctx.train) < len(trainer.bundle.train)  # GB's held-out part does not train the model
    assert (ctx.seed, ctx.batch_size, ctx.memory_budget) == (0, 32, "auto")
    assert fit.metrics["probe_val"] == fit.metrics["val_accuracy"]
    ctx.on_message("hello")
    assert messages[-1] == "hello"
    with pytest.raises(AttributeError):
        ctx.seed = 1  # type: ignore[misc]


def test_crmt_lipschitz_samples_is_an_alias_of_fit_samples():
    assert options_dataclass(CRMTOptions, {"lipschitz_samples": "64"}, "crmt-jt").fit_samples == 64
    assert options_dataclass(OJTOptions, {"lipschitz_samples": 5}, "ojt").fit_samples == 5
    assert options_dataclass(CRMTOptions, {"fit_samples": 3}, "crmt-jt").fit_samples == 3
    with pytest.raises(ConfigError, match="lipschitz_samples.*fit_samples") as err:
        options_dataclass(CRMTOptions, {"lipschitz_samples": 64, "fit_samples": 64}, "crmt-jt")
    assert err.value.param == "lipschitz_samples"
    with pytest.raises(ConfigError) as err:
        options_dataclass(CRMTOptions, {"fit_samples": -1}, "crmt-jt")
    assert err.value.param == "fit_samples"


def test_old_option_name_still_trains_from_a_config(tmp_path):
    cfg = tiny_config("ojt", epochs=1)
    cfg.train.method_options = {"lipschitz_samples": 16}
    fit = train(cfg)
    assert "16 random training samples" in fit.metrics["crmt"]["tau_estimator"]


def test_one_optimiser_builder():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert type(build_optimizer(p, "adam", 1e-3)) is torch.optim.AdamW
    assert type(build_optimizer(p, "adam", 1e-3, decoupled_weight_decay=False)) is torch.optim.Adam
    sgd = build_optimizer(p, "sgd", 0.1, momentum=0.5, weight_decay=0.01)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.5
    assert type(optimizer_for(p, tiny_config().train.optim)) is torch.optim.AdamW
    with pytest.raises(ConfigError) as err:
        build_optimizer(p, "adam", 0.0, prefix="step2_")
    assert err.value.param == "step2_lr" and "--" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_optimizer(p, "rmsprop", 0.1, name_param="step2_optimizer")
    assert err.value.param == "step2_optimizer"
