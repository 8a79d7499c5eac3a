"""CRMT: orthogonal head, margin regulariser, Lipschitz estimate, step 2, every method end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.certify.bounds import fused_logits, orthogonal_bound
from mmrobust.certify.lipschitz import score_gradient_norms
from mmrobust.cli import main
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.runs import load_run
from mmrobust.training.base import StepContext
from mmrobust.training.crmt import (
    CRMTJT,
    CRMTMixOptions,
    CRMTOptions,
    margin_regulariser,
    mixup_batch,
    normalized_scores,
)
from mmrobust.training.engine import Trainer
from tests.conftest import TINY, tiny_config

METHODS = ["ojt", "crmt-step1", "crmt-step2", "crmt-jt", "crmt-at", "crmt-mix"]


def _ctx(seed: int = 0) -> StepContext:
    return StepContext(0, 0, torch.Generator().manual_seed(seed))


def test_orthogonal_rows_stay_orthonormal_after_training(tiny_bundle):
    torch.manual_seed(0)
    model = build_model(tiny_bundle.meta, ModelConfig("orthogonal", 16))
    strategy = CRMTJT(CRMTOptions(), tiny_bundle.meta)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    before = {m: model.head.basis(m).detach().clone() for m in model.modalities}
    for step in range(10):
        x, y = tiny_bundle.train.take(slice(step * 16, step * 16 + 32))
        loss, _ = strategy.loss(model, x, y, _ctx(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    k = tiny_bundle.meta.num_classes
    for m in model.modalities:
        w = model.head.basis(m).detach()
        assert torch.linalg.matrix_norm(w @ w.T - torch.eye(k)) < 1e-5
        assert not torch.allclose(w, before[m])  # the basis did train


def test_feature_dim_below_classes_is_a_clear_error(tiny_bundle, tmp_path, capsys):
    with pytest.raises(ConfigError, match="feature dimension 3 < 4 classes"):
        build_model(tiny_bundle.meta, ModelConfig("orthogonal", 3))
    args = ["train", "--data", "synthetic", "--method", "crmt-jt", "--feature-dim", "3", "--out", str(tmp_path / "r")]
    args += [a for k, v in TINY.items() for a in ("--data-opt", f"{k}={v}")]
    assert main(args) == 2
    assert "feature dimension 3 < 4" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def _naive_l1(scores: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    total = []
    for i, y in enumerate(labels.tolist()):
        acc = 0.0
        for s in scores.values():
            for k in range(s.shape[1]):
                if k != y:
                    acc += math.exp(float(s[i, k] - s[i, y]))
        total.append(math.log(acc))
    return torch.tensor(sum(total) / len(total))


def test_margin_regulariser_matches_naive_sum_and_is_stable_at_huge_logits():
    g = torch.Generator().manual_seed(0)
    scores = {m: torch.randn(6, 5, generator=g) for m in ("a", "b", "c")}
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(margin_regulariser(scores, labels), _naive_l1(scores, labels), atol=1e-5)
    big = {m: (1e4 * s).requires_grad_(True) for m, s in scores.items()}
    loss = margin_regulariser(big, labels)
    loss.backward()
    assert torch.isfinite(loss) and abs(float(loss.detach())) > 1e3  # the margins really are of order 1e4
    assert all(torch.isfinite(s.grad).all() for s in big.values())


def test_mixup_margin_matches_hand_computation():
    s1 = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    s2 = torch.tensor([[0.0, -1.0, 3.0, 0.2]])
    lam, ya, yb = 0.3, torch.tensor([0]), torch.tensor([2])
    # target per modality: lam * s_{y_a} + (1 - lam) * s_{y_b}; the sum runs over k not in {y_a, y_b}
    t1, t2 = 0.3 * 1.0 + 0.7 * 0.5, 0.3 * 0.0 + 0.7 * 3.0
    hand = math.log(math.exp(2.0 - t1) + math.exp(-1.0 - t1) + math.exp(-1.0 - t2) + math.exp(0.2 - t2))
    got = margin_regulariser({"a": s1, "b": s2}, ya, yb, lam)
    assert abs(float(got) - hand) < 1e-5


def test_mixup_batch_shares_lambda_and_permutation_across_modalities():
    x = {"a": torch.arange(8.0)[:, None], "b": 10 * torch.arange(8.0)[:, None, None]}
    mixed, yb, lam = mixup_batch(x, torch.arange(8), 1.0, torch.Generator().manual_seed(3))
    perm = yb  # labels are the indices, so the permuted labels reveal the permutation
    assert 0.0 <= lam <= 1.0
    assert torch.allclose(mixed["a"][:, 0], lam * torch.arange(8.0) + (1 - lam) * perm.float())
    assert torch.allclose(mixed["b"][:, 0, 0], 10 * (lam * torch.arange(8.0) + (1 - lam) * perm.float()))


def test_normalized_margin_is_invariant_to_feature_scale(tiny_bundle):
    torch.manual_seed(0)
    model = build_model(tiny_bundle.meta, ModelConfig("orthogonal", 16))
    x, y = tiny_bundle.train.take(slice(0, 16))
    with torch.no_grad():
        feats = model.encode(x)
    vals = []
    with torch.no_grad():  # the head's parameters require grad; only values are compared here
        for c in (1.0, 50.0):
            scaled = {m: c * f for m, f in feats.items()}
            vals.append(float(margin_regulariser(normalized_scores(model.head.raw_scores(scaled), scaled, 10.0), y)))
            faithful = float(margin_regulariser(model.head.raw_scores(scaled), y))
        unscaled = float(margin_regulariser(model.head.raw_scores(feats), y))
    assert abs(vals[0] - vals[1]) < 1e-4
    assert faithful != pytest.approx(unscaled, abs=1e-3)


def test_lipschitz_gradient_norms_match_finite_differences_and_are_isolated(tiny_bundle):
    torch.manual_seed(0)
    model = build_model(tiny_bundle.meta, ModelConfig("orthogonal", 16)).double().eval()
    x, _ = tiny_bundle.train.take(slice(0, 3))
    x = {m: v.double() for m, v in x.items()}
    m, other = model.modalities
    rows = model.head.basis(m).detach()
    norms = score_gradient_norms(model, x, m, rows)
    h = 1e-6
    for i in range(3):
        grad = torch.zeros(rows.shape[0], x[m].shape[1], dtype=torch.float64)
        for d in range(x[m].shape[1]):
            e = torch.zeros_like(x[m][i : i + 1])
            e[0, d] = h
            with torch.no_grad():
                up = rows @ model.encoders[m](x[m][i : i + 1] + e)[0]
                dn = rows @ model.encoders[m](x[m][i : i + 1] - e)[0]
            grad[:, d] = (up - dn) / (2 * h)
        assert torch.allclose(norms[i], grad.norm(dim=1), rtol=1e-4, atol=1e-6)
    assert (norms > 0).all()
    # isolation: another modality's input has no say in modality m's estimate
    moved = dict(x, **{other: x[other] + 5.0 * torch.randn_like(x[other])})
    assert torch.equal(score_gradient_norms(model, moved, m, rows), norms)


def test_orthogonal_bound_matches_hand_computation_and_is_differentiable():
    scores = {"a": torch.tensor([[2.0, 1.0, 0.0]]), "b": torch.tensor([[0.5, 1.5, -1.0]])}
    a = {"a": torch.tensor([1.0, 2.0, 0.5], requires_grad=True), "b": torch.tensor([0.5, 1.0, 1.0], requires_grad=True)}
    tau = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5, 0.5, 0.5])}
    bias = torch.tensor([0.0, 0.1, 0.0])
    # logits: [2+0.25, 2+1.5+0.1, 0-1] -> y=0, runner-up j=1
    num = (2.0 + 0.25) - (2.0 + 1.5 + 0.1)
    den = math.sqrt((1.0 * 1.0 + 2.0 * 2.0) ** 2 + (0.5 * 0.5 + 1.0 * 0.5) ** 2)
    got = orthogonal_bound(scores, a, bias, torch.tensor([0]), tau)
    assert abs(float(got.detach()) - num / den) < 1e-6
    got.sum().backward()
    assert a["a"].grad is not None and a["a"].grad.abs().sum() > 0
    assert torch.allclose(fused_logits(scores, a, bias), torch.tensor([[2.25, 3.6, -1.0]]))


def _trainer_with_bn(method: str, **opts) -> Trainer:
    cfg = tiny_config(method, epochs=0)
    cfg.train.method_options = {"fit_samples": 64, **opts}
    trainer = Trainer(cfg)
    for enc in trainer.model.encoders.values():  # add BatchNorm so step 2 could (wrongly) move statistics
        enc.append(nn.BatchNorm1d(16))
    trainer.model.train()
    with torch.no_grad():
        for i in range(3):
            trainer.model(trainer.bundle.train.take(slice(i * 32, i * 32 + 32))[0])
    opt = torch.optim.Adam(trainer.model.parameters(), lr=3e-3)
    for i in range(20):  # a little step-1 training so the bound is informative
        x, y = trainer.bundle.train.take(slice((i % 7) * 32, (i % 7) * 32 + 32))
        loss = F.cross_entropy(trainer.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return trainer


def test_step2_moves_only_modality_weights_and_keeps_bn_statistics():
    trainer = _trainer_with_bn(
        "crmt-jt", step2_epochs=3, step2_lr=0.05, step2_max_acc_drop=1.0, step2_attack_check=False
    )
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    record = trainer.strategy.after_training(trainer.context())["crmt"]
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("head.a.") for k in changed), changed
    assert record["kept"] == "step2"
    assert all(p.requires_grad for p in trainer.model.parameters())  # flags restored for later use


def test_step2_never_lowers_the_criterion_it_reports():
    # a reckless step 2 (huge SGD steps) must be rejected or, if kept, really be better on validation
    trainer = _trainer_with_bn("crmt-jt", step2_epochs=3, step2_lr=50.0, step2_optimizer="sgd")
    before = {k: v.detach().clone() for k, v in trainer.model.head.a.items()}
    rec = trainer.strategy.after_training(trainer.context())["crmt"]
    s1 = rec["step1"]
    if rec["kept"] == "step1":
        assert all(torch.equal(before[m], p) for m, p in trainer.model.head.a.items())
        assert rec["step2"]["best_epoch"] == 0
    else:
        sel = rec["step2"]["selected"]
        assert sel["val_mean_radius"] > s1["val_mean_radius"]
        assert sel["val_accuracy"] >= s1["val_accuracy"] - 0.01
    check = rec["step2"]["attack_check"]
    if rec["kept"] == "step2" and check is not None:
        assert check["step2"] >= check["step1"]
    # the recorded accuracy is the model's accuracy
    final = rec["step2"]["selected"] if rec["kept"] == "step2" else s1
    assert trainer.evaluate_split("val") == pytest.approx(final["val_accuracy"], abs=1e-6)
    assert len(rec["step2"]["history"]) == 3 and "reason" in rec


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_via_cli_and_reloads(method, tmp_path):
    out = tmp_path / method
    args = ["train", "--data", "synthetic", "--method", method, "--epochs", "2", "--feature-dim", "16"]
    args += ["--batch-size", "32", "--lr", "3e-3", "--no-progress", "--out", str(out)]
    args += [a for k, v in TINY.items() for a in ("--data-opt", f"{k}={v}")]
    if method != "ojt":
        args += ["--method-opt", "fit_samples=64"]
    if method in ("crmt-jt", "crmt-at", "crmt-mix", "crmt-step2"):
        args += ["--method-opt", "step2_epochs=3"]
    if method == "crmt-at":
        args += ["--method-opt", "at_eps=0.5", "--method-opt", "at_steps=2"]
    assert main(args) == 0
    run = load_run(out)
    assert run.config.model.head == "orthogonal"
    bundle = run.data()
    with torch.no_grad():
        acc = float((run.model(bundle.test.inputs).argmax(1) == bundle.test.labels).float().mean())
    assert acc == pytest.approx(run.metrics["test_accuracy"], abs=1e-6)
    assert acc > 0.4  # 4 classes: clearly above chance
    crmt = run.metrics["crmt"]
    assert set(crmt["tau"]) == set(run.meta.modality_names)
    assert ("step2" in crmt) == (method in ("crmt-jt", "crmt-at", "crmt-mix", "crmt-step2"))


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    base = ["train", "--data", "synthetic", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main([*base, "--method", "crmt-jt", "--method-opt", "margin=weird"]) == 2
    assert "margin='weird'" in capsys.readouterr().err
    assert main([*base, "--method", "crmt-at", "--method-opt", "at_eps=0"]) == 2  # the old name of train_eps
    assert "train_eps" in capsys.readouterr().err
    assert main([*base, "--method", "ojt", "--method-opt", "rho=1"]) == 2  # ojt has no margin term


def test_mix_options_default_to_uniform_lambda():
    assert CRMTMixOptions().mix_alpha == 1.0 and CRMTMixOptions().rho == 2.0
