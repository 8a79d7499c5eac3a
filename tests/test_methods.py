"""The comparison methods: each one's defining mechanism against an independent computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmrobust.cli import main
from mmrobust.config import RunConfig
from mmrobust.data import DataConfig
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.runs import load_run
from mmrobust.training import METHODS, train
from mmrobust.training.base import StepContext, Strategy
from mmrobust.training.crmt_step2 import Step2Data, optimise_modality_weights
from mmrobust.training.engine import Trainer
from mmrobust.training.gb import blend_weights
from mmrobust.training.mmat import MMAT, MMATOptions
from mmrobust.training.ogm_ge import OGMGE, OGMGEOptions
from mmrobust.training.pmr import pmr_weights
from mmrobust.training.varmat import latent_attack, vulnerability
from tests.conftest import TINY, tiny_config

NEW_METHODS = ["gb", "ogm-ge", "pmr", "msefm", "mmat", "mixup", "varmat", "varmat-input"]


def _ctx(seed: int = 0) -> StepContext:
    return StepContext(0, 0, torch.Generator().manual_seed(seed))


def _model(bundle, head: str = "concat", **extra):
    torch.manual_seed(0)
    return build_model(bundle.meta, ModelConfig(head, 16, **extra))


# --- OGM-GE -------------------------------------------------------------------------------------


def test_ogm_ge_scales_only_the_dominant_encoder_by_one_minus_tanh(tiny_bundle):
    model = _model(tiny_bundle)
    x, y = tiny_bundle.train.take(slice(0, 64))
    # a trained-ish state: a few JT steps make the strong modality dominant
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    alpha = 0.5
    strategy = OGMGE(OGMGEOptions(alpha=alpha, ge=False), tiny_bundle.meta)
    model.zero_grad()
    loss, _ = strategy.loss(model, x, y, _ctx())
    loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    strategy.after_backward(model, _ctx())
    # independent: s_m = sum_i softmax(W^(m) z_m + b/2)[y_i], rho = s_strong / s_weak
    with torch.no_grad():
        feats = model.encode(x)
        s = {
            m: float(F.softmax(model.head.linears[m](feats[m]) + model.head.bias / 2, 1)[torch.arange(64), y].sum())
            for m in feats
        }
    assert s["strong"] > s["weak"]
    k = 1 - math.tanh(alpha * (s["strong"] / s["weak"] - 1))
    assert 0 < k < 0.99  # a real modulation, not a no-op
    assert float(model.encoders["strong"][1].weight.grad.abs().max()) > 0
    for n, p in model.named_parameters():
        factor = k if n.startswith("encoders.strong.") else 1.0
        torch.testing.assert_close(p.grad, before[n] * factor, atol=0.0, rtol=1e-5, msg=n)


def test_ogm_ge_noise_has_the_gradient_std(tiny_bundle):
    model = _model(tiny_bundle)
    x, y = tiny_bundle.train.take(slice(0, 64))
    strategy = OGMGE(OGMGEOptions(alpha=0.0, ge=True), tiny_bundle.meta)  # k = 1: only the noise
    loss, _ = strategy.loss(model, x, y, _ctx())
    loss.backward()
    w = model.encoders["weak"][1].weight
    g0 = w.grad.clone()
    strategy.after_backward(model, _ctx())
    noise = w.grad - g0
    assert float(noise.std()) == pytest.approx(float(g0.std()), rel=0.1)


# --- PMR ----------------------------------------------------------------------------------------


def test_pmr_prototypes_are_the_class_means_of_the_training_features():
    cfg = tiny_config("pmr", epochs=1)
    trainer = Trainer(cfg)
    trainer.fit()  # prototypes refreshed at the start of the (only) epoch; refresh on the final model
    trainer.strategy.on_epoch_start(trainer.context(), 1)
    model = trainer.model.eval()
    with torch.no_grad():
        feats = model.encode(trainer.train_split.inputs)
    labels = trainer.train_split.labels
    for m, z in feats.items():
        for k in range(trainer.bundle.meta.num_classes):
            torch.testing.assert_close(trainer.strategy.prototypes[m][k], z[labels == k].mean(0), atol=1e-5, rtol=1e-5)


def test_pmr_weights_push_only_the_lagging_modality_in_proportion_to_the_imbalance():
    w = pmr_weights({"a": torch.tensor(30.0), "b": torch.tensor(10.0), "c": torch.tensor(20.0)}, alpha=2.0)
    assert float(w["a"]) == 0.0
    assert float(w["b"]) == pytest.approx(2.0 * (30 / 10 - 1))
    assert float(w["c"]) == pytest.approx(2.0 * (30 / 20 - 1))


# --- GB -----------------------------------------------------------------------------------------


def test_gb_weights_follow_g_over_o_squared():
    train_before = {"fused": 1.0, "a": 1.2, "b": 1.5}
    val_before = {"fused": 1.1, "a": 1.3, "b": 1.6}
    train_now = {"fused": 0.3, "a": 0.5, "b": 1.2}
    val_now = {"fused": 0.6, "a": 1.1, "b": 1.4}
    # G = val drop; O = growth of (val - train)
    g = {"fused": 0.5, "a": 0.2, "b": 0.2}
    o = {"fused": 0.3 - 0.1, "a": 0.6 - 0.1, "b": 0.2 - 0.1}
    raw = {h: g[h] / o[h] ** 2 for h in g}
    expected = {h: v / sum(raw.values()) for h, v in raw.items()}
    got = blend_weights(train_before, val_before, train_now, val_now)
    assert got is not None
    for h in g:
        assert got[h] == pytest.approx(expected[h])
    # no head improved on the held-out part: no new estimate
    assert blend_weights(train_now, val_now, train_before, val_before) is None


def test_gb_holds_out_training_samples_and_saves_its_heads(tmp_path):
    fit = train(tiny_config("gb", epochs=2), out=tmp_path / "gb")
    hist = fit.metrics["history"]
    assert all(sum(r["gb_weights"].values()) == pytest.approx(1.0) for r in hist)
    assert hist[-1]["gb_weights"] != {"fused": 1 / 3, "strong": 1 / 3, "weak": 1 / 3}  # re-estimated
    run = load_run(tmp_path / "gb")
    assert run.model.aux is not None and set(run.model.aux) == {"strong", "weak"}
    for (k, a), b in zip(fit.model.state_dict().items(), run.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_gb_training_split_excludes_the_held_out_samples():
    trainer = Trainer(tiny_config("gb", epochs=0))
    s = trainer.strategy
    n = len(trainer.bundle.train)
    assert len(trainer.train_split) + len(s.held_out) == n
    rows = {tuple(r.tolist()) for r in trainer.train_split.inputs["strong"]}
    assert not any(tuple(r.tolist()) in rows for r in s.held_out.inputs["strong"])


# --- VARMAT -------------------------------------------------------------------------------------


def test_varmat_penalty_is_the_per_sample_gradient_norm_and_reaches_the_encoders(tiny_bundle):
    model = _model(tiny_bundle)
    x, y = tiny_bundle.train.take(slice(0, 8))
    feats = model.encode(x)
    v = vulnerability(F.cross_entropy(model.head(feats), y), feats)
    # independent: one sample at a time, CE of that sample / B (the batch-mean convention)
    for i in range(8):
        zi = {m: z[i : i + 1].detach().requires_grad_(True) for m, z in feats.items()}
        loss_i = F.cross_entropy(model.head(zi), y[i : i + 1]) / 8
        grads = torch.autograd.grad(loss_i, list(zi.values()))
        for j, g in enumerate(grads):
            assert float(v[i, j].detach()) == pytest.approx(float(g.norm()), rel=1e-5)
    model.zero_grad()
    v.sum().backward()  # double backprop: the penalty's own gradient reaches every encoder
    for m in model.modalities:
        assert any(float(p.grad.abs().sum()) > 0 for p in model.encoders[m].parameters() if p.grad is not None), m


def test_varmat_latent_attack_respects_the_relative_radius(tiny_bundle):
    model = _model(tiny_bundle)
    x, y = tiny_bundle.train.take(slice(0, 32))
    feats = {m: z.detach() for m, z in model.encode(x).items()}
    eps = 0.05
    delta = latent_attack(model.head, feats, y, eps, steps=3, generator=torch.Generator().manual_seed(0))
    for m, d in delta.items():
        r = eps * feats[m].norm(dim=1) / len(feats)
        assert bool((d.norm(dim=1) <= r * (1 + 1e-5)).all())
        assert float(d.norm(dim=1).max()) > 0.5 * float(r.max())  # it does move
    with torch.no_grad():  # and raises the loss over the clean latent
        clean = F.cross_entropy(model.head(feats), y)
        adv = F.cross_entropy(model.head({m: feats[m] + delta[m] for m in feats}), y)
    assert adv > clean


# --- MMAT ---------------------------------------------------------------------------------------


def test_mmat_examples_respect_the_joint_budget(tiny_bundle):
    model = _model(tiny_bundle)
    x, y = tiny_bundle.train.take(slice(0, 32))
    eps = 0.7
    strategy = MMAT(MMATOptions(train_eps=eps, steps=4), tiny_bundle.meta)
    adv = strategy.examples(model, x, y, _ctx())
    joint = torch.sqrt(sum(((adv[m] - x[m]) ** 2).flatten(1).sum(1) for m in x))
    assert bool((joint <= eps * (1 + 1e-5)).all())
    assert float(joint.max()) > 0.9 * eps
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_mmat_mix_clean_blends_clean_and_adversarial_losses(tiny_bundle):
    model = _model(tiny_bundle)
    x, y = tiny_bundle.train.take(slice(0, 32))
    strategy = MMAT(MMATOptions(train_eps=0.5, steps=2, mix_clean=0.25), tiny_bundle.meta)
    loss, _ = strategy.loss(model, x, y, _ctx())
    adv = strategy.examples(model, x, y, _ctx())  # same seed -> same examples
    with torch.no_grad():
        expected = 0.25 * F.cross_entropy(model(x), y) + 0.75 * F.cross_entropy(model(adv), y)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


# --- MSEFM --------------------------------------------------------------------------------------


def _msefm_config(**opts):
    cfg = tiny_config("msefm", epochs=2)
    cfg.train.method_options = {"memory_size": 32, "memory_lambda": 0.2, **opts}
    return cfg


def test_msefm_memory_changes_test_predictions_and_survives_reload(tmp_path):
    fit = train(_msefm_config(), out=tmp_path / "m")
    model = fit.model.eval()
    x, _ = fit.bundle.test.take(slice(0, 120))
    with torch.no_grad():
        with_memory = model(x)
        for enc in model.encoders.values():
            enc.filled.fill_(False)
        without = model(x)
        for enc in model.encoders.values():
            enc.filled.fill_(True)
    assert bool((with_memory.argmax(1) != without.argmax(1)).any())
    run = load_run(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(run.model(x), with_memory)
    assert fit.metrics["test_accuracy"] == run.metrics["test_accuracy"]


def test_sparse_coding_reconstructs_a_memory_atom_and_is_refused_by_the_sound_bound(tiny_bundle):
    from mmrobust.certify.sound import chain_units

    model = _model(tiny_bundle, feature_memory=8)
    enc = model.encoders["strong"]
    atoms = torch.randn(8, 16)
    enc.fill(atoms, lam=0.0, iters=2000)
    torch.testing.assert_close(enc.reconstruct(atoms[:3]), atoms[:3], atol=1e-3, rtol=1e-3)
    with pytest.raises(ConfigError):
        chain_units(enc, tiny_bundle.meta.spec("strong").shape)


def test_msefm_refuses_unequal_feature_dimensions():
    cfg = _msefm_config()
    cfg.data = DataConfig("synthetic", 0, {**TINY, "dim": "12,6"})
    cfg.model.encoders = {}
    trainer = Trainer(cfg)
    trainer.model.encoders["weak"].out_dim = 8  # as an encoder with another feature size would report
    with pytest.raises(ConfigError, match="msefm: .*dims differ"):
        trainer.strategy.on_train_start(trainer.context())


# --- every method -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", NEW_METHODS)
def test_every_method_trains_with_three_modalities(method):
    cfg = RunConfig()
    cfg.data = DataConfig("synthetic", 0, {**TINY, "names": "a,b,c", "signal": "3.0,1.0,0.5"})
    cfg.model.feature_dim = 16
    cfg.train.method, cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = method, 1, 32, False
    if method == "msefm":
        cfg.train.method_options = {"memory_size": 32}
    fit = train(cfg)
    assert fit.model.modalities == ["a", "b", "c"]
    assert fit.metrics["test_accuracy"] > 0.3  # chance is 0.25


@pytest.mark.parametrize(
    ("method", "opt"),
    [("ogm-ge", "alpha=-1"), ("pmr", "alpha=nan"), ("gb", "holdout=0.7"), ("msefm", "memory_size=0"),
     ("mmat", "mix_clean=1.5"), ("mixup", "alpha=0"), ("varmat", "eps=inf"), ("varmat-input", "steps=0"),
     ("gb", "gb_every=two"), ("crmt-jt", "rho=-1")],
)  # fmt: skip
def test_bad_method_options_are_one_line_errors(method, opt, tmp_path, capsys):
    args = ["train", "--data", "synthetic", "--method", method, "--method-opt", opt, "--out", str(tmp_path / "r")]
    args += [a for k, v in TINY.items() for a in ("--data-opt", f"{k}={v}")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmrobust: error:") and "Traceback" not in err and opt.split("=")[0] in err
    assert not (tmp_path / "r").exists()


def test_options_built_in_python_are_checked_too():
    with pytest.raises(ConfigError, match="alpha"):
        OGMGEOptions(alpha=float("nan"))
    with pytest.raises(ConfigError, match="steps"):
        MMATOptions(steps="3")  # type: ignore[arg-type]


def test_methods_that_cannot_run_distributed_say_why(monkeypatch):
    from mmrobust.training import engine
    from mmrobust.training.distributed import DistInfo

    monkeypatch.setattr(engine, "setup_distributed", lambda device: DistInfo(0, 2, 0))
    cfg = tiny_config("varmat")
    cfg.train.batch_size = 32
    with pytest.raises(ConfigError, match="cannot run under torchrun: .*create_graph"):
        Trainer(cfg)


def test_all_methods_are_registered():
    assert set(NEW_METHODS) <= set(METHODS.names())


# --- the interface ------------------------------------------------------------------------------


class _Recorder(Strategy):
    name = "recorder"

    def __init__(self, options, meta):
        super().__init__(options, meta)
        self.calls: list[str] = []

    def on_train_start(self, ctx):
        self.calls.append("start")

    def on_epoch_start(self, ctx, epoch):
        self.calls.append(f"epoch{epoch}")

    def loss(self, model, inputs, labels, ctx):
        logits = model(inputs)
        return F.cross_entropy(logits, labels), logits

    def after_backward(self, model, ctx):
        # gradients exist here and the optimiser has not stepped yet: zeroing them freezes the model
        self.calls.append("backward")
        for p in model.parameters():
            p.grad.zero_()

    def on_epoch_end(self, ctx, epoch):
        self.calls.append(f"end{epoch}")
        return {"marker": epoch}


def test_engine_calls_the_hooks_in_order_and_after_backward_runs_before_the_step():
    cfg = tiny_config("jt", epochs=2)
    cfg.train.optim.weight_decay = 0.0
    trainer = Trainer(cfg)
    trainer.strategy = _Recorder(trainer.strategy.options, trainer.bundle.meta)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    fit = trainer.fit()
    steps = math.ceil(240 / 32)
    assert trainer.strategy.calls == ["start", "epoch0", *["backward"] * steps, "end0", "epoch1",
                                      *["backward"] * steps, "end1"]  # fmt: skip
    assert [r["marker"] for r in fit.metrics["history"]] == [0, 1]
    for k, v in fit.model.state_dict().items():
        assert torch.equal(v, before[k]), k


# --- CRMT step 2 as a pure function -------------------------------------------------------------


def test_step2_pure_function_raises_the_bound_without_touching_its_inputs():
    from mmrobust.training.crmt import CRMTOptions

    gen = torch.Generator().manual_seed(0)
    n, k = 200, 4
    labels = torch.randint(0, k, (n,), generator=gen)
    scores = {m: torch.randn(n, k, generator=gen) + 2.0 * F.one_hot(labels, k) * s for m, s in (("a", 1.5), ("b", 0.3))}
    a0 = {m: torch.ones(k) for m in scores}
    tau = {m: torch.full((k,), t) for m, t in (("a", 1.0), ("b", 3.0))}
    data = Step2Data(scores, labels, scores, labels, a0, torch.zeros(k), tau)
    result = optimise_modality_weights(data, CRMTOptions(step2_epochs=5, step2_lr=0.05), batch_size=50, seed=0)
    assert all(torch.equal(v, torch.ones(k)) for v in a0.values())
    assert result.best_epoch > 0
    assert result.history[result.best_epoch - 1]["val_mean_radius"] > result.step1["val_mean_radius"]
    # the noisy, weak modality "b" (large tau, little signal) loses weight relative to "a"
    assert float((result.best_a["a"] / result.best_a["b"]).mean()) > 1.0


@pytest.mark.slow
def test_every_new_method_round_trips_through_a_run_folder(tmp_path):
    for method in NEW_METHODS:
        cfg = tiny_config(method, epochs=1)
        if method == "msefm":
            cfg.train.method_options = {"memory_size": 32}
        fit = train(cfg, out=tmp_path / method)
        run = load_run(tmp_path / method)
        x, _ = run.data().test.take(slice(0, 50))
        with torch.no_grad():
            torch.testing.assert_close(run.model(x), fit.model.eval()(x), msg=method)


def test_strategy_state_round_trips_and_unknown_state_is_refused(tiny_bundle):
    from mmrobust.training.base import NoOptions
    from mmrobust.training.gb import GBOptions, GradientBlending
    from mmrobust.training.jt import JointTraining

    a = GradientBlending(GBOptions(), tiny_bundle.meta)
    a.weights = {"fused": 0.5, "strong": 0.3, "weak": 0.2}
    b = GradientBlending(GBOptions(), tiny_bundle.meta)
    b.load_state_dict(a.state_dict())
    assert b.weights == pytest.approx(a.weights)
    with pytest.raises(ConfigError, match="unknown strategy state"):
        JointTraining(NoOptions(), tiny_bundle.meta).load_state_dict({"weights": torch.zeros(3)})


def test_training_budget_is_train_eps_everywhere_with_the_old_names_accepted():
    from mmrobust.config import options_dataclass
    from mmrobust.training.crmt import CRMTATOptions
    from mmrobust.training.varmat import VARMATInputOptions

    for cls, method, old in ((MMATOptions, "mmat", "eps"), (VARMATInputOptions, "varmat-input", "eps"),
                             (CRMTATOptions, "crmt-at", "at_eps")):  # fmt: skip
        assert options_dataclass(cls, {old: "1.5"}, method).train_eps == 1.5
        assert options_dataclass(cls, {"train_eps": "0.25"}, method).train_eps == 0.25
        with pytest.raises(ConfigError, match="same setting"):
            options_dataclass(cls, {old: "1", "train_eps": "1"}, method)
        with pytest.raises(ConfigError, match="train_eps must be > 0") as err:
            options_dataclass(cls, {old: "0"}, method)
        assert err.value.param == "train_eps"
