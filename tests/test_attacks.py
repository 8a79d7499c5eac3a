"""Attacks: budgets, untouched modalities, valid ranges, losses, restarts, model state, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmrobust.attacks import ATTACKS, MissingModality, build_attack
from mmrobust.data.base import DatasetMeta, ModalitySpec
from mmrobust.errors import ConfigError
from mmrobust.eval.robust import ce_gradient_underflow
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.runs import load_run

TOL = 1e-5


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def batch(run):
    return run.data().test.take(slice(0, 64))


class Scaled(nn.Module):
    """The same classifier with logits x ``factor``: CE saturates, the argmax does not change."""

    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.inner, self.factor = model, factor

    @property
    def modalities(self) -> list[str]:
        return self.inner.modalities

    def forward(self, inputs):
        return self.factor * self.inner(inputs)


def _acc(model, adv, y) -> float:
    with torch.no_grad():
        return float((model(adv).argmax(1) == y).float().mean())


def _norms(adv, x, mods, p=2):
    d = [(adv[m] - x[m]).flatten(1) for m in mods]
    if p == 2:
        return torch.sqrt(sum(v.pow(2).sum(1) for v in d)), [v.norm(dim=1) for v in d]
    return torch.stack([v.abs().amax(1) for v in d], 1).amax(1), [v.abs().amax(1) for v in d]


@pytest.mark.parametrize("name", ["fgm", "pgd-l2"])
def test_l2_joint_budget_respected_and_used(run, batch, name):
    x, y = batch
    adv = (
        build_attack(name, run.model, run.meta, eps=0.7, loss="cw", steps=5)(x, y)
        if name != "fgm"
        else (build_attack(name, run.model, run.meta, eps=0.7)(x, y))
    )
    joint, _ = _norms(adv, x, run.meta.modality_names)
    assert float(joint.max()) <= 0.7 + TOL
    assert float(joint.max()) > 0.69  # the budget is actually spent (no range to clamp against)


def test_l2_per_modality_budget(run, batch):
    x, y = batch
    eps = {"strong": 0.3, "weak": 0.9}
    adv = build_attack("pgd-l2", run.model, run.meta, eps=eps, budget="per-modality", steps=5)(x, y)
    _, per = _norms(adv, x, ["strong", "weak"])
    assert float(per[0].max()) <= 0.3 + TOL and float(per[1].max()) <= 0.9 + TOL
    assert float(per[0].max()) > 0.29 and float(per[1].max()) > 0.89
    # a joint budget of 0.9 lets one modality take more than 0.3: the two budgets really differ
    adv_j = build_attack("pgd-l2", run.model, run.meta, eps=0.9, budget="joint", steps=5)(x, y)
    joint, _ = _norms(adv_j, x, ["strong", "weak"])
    assert float(joint.max()) <= 0.9 + TOL


@pytest.mark.parametrize("budget", ["joint", "per-modality"])
def test_linf_budgets(run, batch, budget):
    x, y = batch
    eps = 0.05 if budget == "joint" else {"strong": 0.02, "weak": 0.08}
    adv = build_attack("pgd-linf", run.model, run.meta, eps=eps, budget=budget, steps=5)(x, y)
    _, per = _norms(adv, x, ["strong", "weak"], p="inf")
    limits = (0.05, 0.05) if budget == "joint" else (0.02, 0.08)
    for v, lim in zip(per, limits, strict=True):
        assert float(v.max()) <= lim + TOL
        assert float(v.max()) > lim - 1e-4


@pytest.mark.parametrize("name", ["fgm", "pgd-l2", "pgd-linf", "apgd-ce", "square"])
def test_untouched_modality_bit_identical(run, batch, name):
    x, y = batch
    kw = {"steps": 3} if name != "fgm" else {}
    adv = build_attack(name, run.model, run.meta, eps=0.5, modalities=["weak"], **kw)(x, y)
    assert adv["strong"] is x["strong"] or torch.equal(adv["strong"], x["strong"])
    assert not torch.equal(adv["weak"], x["weak"])


def test_valid_range_respected_from_meta_and_absent_without(run, batch):
    x, y = batch
    x = {k: v.clamp(-1, 1) for k, v in x.items()}
    meta = DatasetMeta(
        "ranged", [ModalitySpec("strong", "vector", (12,), (-1.0, 1.0)), ModalitySpec("weak", "vector", (12,))],
        run.meta.class_names,
    )  # fmt: skip
    for name in ("pgd-l2", "pgd-linf", "fgm"):
        kw = {"steps": 3} if name != "fgm" else {}
        adv = build_attack(name, run.model, meta, eps=3.0 if name != "pgd-linf" else 0.8, **kw)(x, y)
        assert float(adv["strong"].min()) >= -1 and float(adv["strong"].max()) <= 1
        assert float(adv["strong"].abs().max()) == 1.0  # the clamp is active, not vacuous
        assert float(adv["weak"].abs().max()) > 1.0  # no declared range: no clamp
    # an explicit valid_range overrides the meta
    adv = build_attack("pgd-l2", run.model, run.meta, eps=3.0, steps=3, valid_range={"weak": (-0.5, 0.5)})(x, y)
    # clean values already outside the range are never pushed further out
    assert bool((adv["weak"] >= torch.clamp(x["weak"], max=-0.5)).all())
    assert bool((adv["weak"] <= torch.clamp(x["weak"], min=0.5)).all())
    assert float(adv["strong"].abs().max()) > 1.0


def test_cw_breaks_saturated_model_ce_cannot(run, batch):
    x, y = batch
    scaled = Scaled(run.model, 1000.0)
    clean = _acc(scaled, x, y)
    acc = {}
    for loss in ("ce", "cw"):
        attack = build_attack("pgd-l2", scaled, run.meta, eps=2.0, loss=loss, steps=10, random_start=False)
        acc[loss] = _acc(scaled, attack(x, y), y)
    plain = _acc(run.model, build_attack("pgd-l2", run.model, run.meta, eps=2.0, loss="cw", steps=10,
                                         random_start=False)(x, y), y)  # fmt: skip
    assert acc["ce"] > acc["cw"] + 0.2  # CE's gradient underflows: it barely moves most samples
    assert acc["ce"] >= clean - 0.15
    assert abs(acc["cw"] - plain) <= 0.03  # CW is scale-invariant: same strength as on the unscaled model
    # and the underflow detector sees it
    split = run.data().test
    assert ce_gradient_underflow(scaled, split).share > 0.5
    assert ce_gradient_underflow(run.model, split).share == 0.0


def test_restarts_never_worse(run, batch):
    x, y = batch
    broken = {}
    for r in (1, 3):
        attack = build_attack("pgd-l2", run.model, run.meta, eps=0.8, steps=3, restarts=r, seed=5)
        _, logits = attack.perturb(x, y)
        broken[r] = logits.argmax(1) != y
    assert bool((broken[3] | ~broken[1]).all())  # every sample broken with 1 restart stays broken
    assert int(broken[3].sum()) >= int(broken[1].sum())


def test_more_steps_and_worst_iterate(run, batch):
    x, y = batch
    accs = [_acc(run.model, build_attack("pgd-l2", run.model, run.meta, eps=0.8, steps=s, loss="cw",
                                         random_start=False)(x, y), y) for s in (1, 10)]  # fmt: skip
    assert accs[1] <= accs[0]


def test_attack_leaves_model_untouched():
    meta = DatasetMeta(
        "seq", [ModalitySpec("a", "sequence", (3, 8)), ModalitySpec("b", "vector", (5,))], ["x", "y", "z"]
    )
    torch.manual_seed(0)
    model = build_model(meta, ModelConfig(feature_dim=8))
    model.train()
    x = {"a": torch.randn(16, 3, 8), "b": torch.randn(16, 5)}
    y = torch.randint(0, 3, (16,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    build_attack("pgd-l2", model, meta, eps=1.0, steps=3, restarts=2)(x, y)
    build_attack("apgd-ce", model, meta, eps=0.1, steps=3)(x, y)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # BN running statistics untouched
        assert torch.equal(v, state[k]), k


def test_autoattack_components_respect_budget(run, batch):
    x, y = ({k: v[:32] for k, v in batch[0].items()}, batch[1][:32])
    for name, kw in (("apgd-ce", {"steps": 5}), ("apgd-t", {"steps": 5, "targets": 3}),
                     ("fab-t", {"steps": 5, "targets": 3}), ("square", {"steps": 15})):  # fmt: skip
        for norm, eps in (("linf", 0.1), ("l2", 0.5)):
            attack = build_attack(name, run.model, run.meta, eps=eps, norm=norm, **kw)
            adv, logits = attack.perturb(x, y)
            joint, _ = _norms(adv, x, ["strong", "weak"], p=2 if norm == "l2" else "inf")
            assert float(joint.max()) <= eps + TOL, (name, norm)
            with torch.no_grad():  # the logits returned are those of the returned inputs
                assert torch.allclose(logits, run.model(adv), atol=1e-5), (name, norm)


def test_apgd_t_stronger_than_nothing(run, batch):
    x, y = batch
    clean = _acc(run.model, x, y)
    adv = build_attack("apgd-t", run.model, run.meta, eps=1.0, norm="l2", steps=10, targets=3)(x, y)
    assert _acc(run.model, adv, y) < clean - 0.1


def test_clear_errors(run):
    with pytest.raises(ConfigError, match="unknown modality 'video'"):
        build_attack("pgd-l2", run.model, run.meta, eps=1.0, modalities=["strong", "video"])
    with pytest.raises(ConfigError, match="differ from the modalities in eps"):
        build_attack("pgd-l2", run.model, run.meta, eps={"strong": 1.0}, modalities=["strong", "weak"],
                     budget="per-modality")  # fmt: skip
    with pytest.raises(ConfigError, match="joint budget takes one eps"):
        build_attack("pgd-l2", run.model, run.meta, eps={"strong": 1.0, "weak": 2.0}, budget="joint")
    with pytest.raises(ConfigError, match="unknown attack loss|unknown loss"):
        build_attack("pgd-l2", run.model, run.meta, eps=1.0, loss="hinge")
    with pytest.raises(ConfigError, match="unknown attack"):
        build_attack("deepfool", run.model, run.meta, eps=1.0)
    with pytest.raises(ConfigError, match="eps must be"):
        build_attack("fgm", run.model, run.meta, eps=-1.0)
    # FAB-T's default 9 targets need 10 classes; the tiny model has 4
    with pytest.raises(ConfigError, match="need >= 10 classes"):
        build_attack("fab-t", run.model, run.meta, eps=0.1)
    meta2 = DatasetMeta("two", [ModalitySpec("a", "vector", (4,)), ModalitySpec("b", "vector", (4,))], ["n", "p"])
    model2 = build_model(meta2, ModelConfig(feature_dim=8))
    with pytest.raises(ConfigError, match="DLR loss needs >= 3 classes"):
        build_attack("apgd-t", model2, meta2, eps=0.1, targets=1)
    with pytest.raises(ConfigError, match="unknown fill"):
        MissingModality(["strong"], fill="missing")
    assert {"fgm", "pgd-l2", "pgd-linf", "apgd-ce", "apgd-t", "fab-t", "square"} <= set(ATTACKS.names())
