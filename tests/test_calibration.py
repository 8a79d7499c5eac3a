"""Calibration of frozen Bind-style encoders, on tiny stand-in encoders (no extra packages)."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.attacks import build_attack
from mmrobust.attacks.autoattack import AutoAttackOptions, run_autoattack
from mmrobust.calibration import BindModel, CalibrationOptions, CalibrationSetup, EvalOptions, calibrate, evaluate
from mmrobust.calibration.evaluate import BudgetResult
from mmrobust.calibration.metrics import recall_at_k
from mmrobust.calibration.pipeline import ProjectionHead
from mmrobust.calibration.store import load_heads, save_heads
from mmrobust.calibration.train import distill, epoch_eps, stage2_loss
from mmrobust.data.base import DataBundle, DatasetMeta, ModalitySpec
from mmrobust.errors import ConfigError, DataError
from mmrobust.eval.metrics import macro_f1, macro_precision_recall_f1
from tests.calibration_setups import NuisanceEncoder, nuisance_setup

FAST: dict[str, Any] = dict(
    epochs=3, stage1_epochs=100, stage1_lr=1e-2, lr=1e-2, hidden=16, batch_size=32, attack_steps=5, patience=3
)
EVAL = EvalOptions(eps=(8 / 255,), steps=10, queries=40, targets=3, attacks=("apgd-ce", "square"))
HAS_PEFT = importlib.util.find_spec("peft") is not None


def _cosine(budget: BudgetResult) -> float:
    assert budget.embedding_cosine is not None
    return budget.embedding_cosine


@pytest.fixture(scope="module")
def setup() -> CalibrationSetup:
    return nuisance_setup()


@pytest.fixture(scope="module")
def ce_result(setup):
    return calibrate(setup, CalibrationOptions(loss="ce", **FAST), modalities=["audio"])


def test_zero_shot_logits_are_scaled_cosines_to_the_centres(setup):
    model = setup.model.with_heads({"audio": ProjectionHead(8, 5)})
    x = setup.data.test.inputs["audio"][:7]
    with torch.no_grad():
        z = model.heads["audio"](model.encoders["audio"](x))
    brute = torch.tensor([[float(z[i] @ c) / float(z[i].norm() * c.norm()) for c in model.centres("audio")]
                          for i in range(len(x))])  # fmt: skip
    with torch.no_grad():
        logits = model.classifier("audio")({"audio": x})
    torch.testing.assert_close(logits / 100.0, brute, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argmax(1), brute.argmax(1))


def test_attacks_see_encoder_head_and_cosine_and_stay_in_range(setup):
    # a head that zeroes the nuisance part makes the pipeline robust: APGD must see the head to find that
    head = ProjectionHead(8, 8)
    first, second = head.net[0], head.net[2]
    assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
    with torch.no_grad():
        first.weight.copy_(torch.eye(8))
        first.bias.fill_(10.0)  # GELU(z + 10) - 10 ~ z on the signal part
        second.weight.copy_(torch.diag(torch.tensor([1.0] * 4 + [0.0] * 4)))
        second.bias.copy_(torch.tensor([-10.0] * 4 + [0.0] * 4))
    frozen = evaluate(setup.model, setup.meta, setup.data.test, EVAL)
    headed = evaluate(setup.model.with_heads({"audio": head}), setup.meta, setup.data.test, EVAL)
    assert frozen.modalities["audio"].budgets[0].worst.accuracy < 0.3
    assert headed.modalities["audio"].budgets[0].worst.accuracy == 1.0
    assert _cosine(headed.modalities["audio"].budgets[0]) > 0.99
    assert _cosine(frozen.modalities["audio"].budgets[0]) < 0.9


def test_attack_examples_respect_budget_and_valid_range(setup):
    from mmrobust.attacks import build_attack

    x = setup.data.test.inputs["image"].clone()
    x[:, :4] = (x[:, :4] > 0.5).float()  # the class signal sits on the range's edges
    attack = build_attack("apgd-ce", setup.model.classifier("image"), setup.meta, eps=8 / 255, norm="linf",
                          modalities=["image"], steps=5)  # fmt: skip
    adv = attack({"image": x}, setup.data.test.labels)["image"]
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert not torch.equal(adv, x)


def test_stage1_distils_the_identity(setup):
    torch.manual_seed(0)
    z = setup.model.features("audio", setup.data.train.inputs["audio"])
    head = ProjectionHead(8, 16)
    before = float((head(z) - z).detach().pow(2).sum(1).mean())
    losses = distill(head, z, CalibrationOptions(**FAST))
    after = float((head(z) - z).detach().pow(2).sum(1).mean())
    assert after < 0.01 * before and losses[-1] < losses[0]


def test_ce_calibration_makes_the_pipeline_robust_and_keeps_clean_accuracy(setup, ce_result):
    frozen = evaluate(setup.model, setup.meta, setup.data.test, EVAL).modalities["audio"]
    after = evaluate(ce_result.model, setup.meta, setup.data.test, EVAL).modalities["audio"]
    assert frozen.clean.accuracy == 1.0 and frozen.budgets[0].worst.accuracy < 0.3
    assert after.clean.accuracy >= 0.95
    assert after.budgets[0].worst.accuracy >= 0.9
    assert _cosine(after.budgets[0]) > _cosine(frozen.budgets[0])
    # only the requested modality got a head; the other still is the frozen model
    assert set(ce_result.model.heads) == {"audio"}


def test_encoders_and_centres_stay_frozen(setup, ce_result):
    enc = setup.model.encoders["audio"].module
    assert isinstance(enc, NuisanceEncoder)
    assert torch.equal(enc.weight, torch.ones(8)) and not enc.weight.requires_grad
    ce_result.model.train()  # even a model put in train mode keeps its encoders in eval mode
    ce_result.model.logits("audio", setup.data.train.inputs["audio"])
    assert torch.equal(enc.bn.running_mean, torch.full((8,), 0.5))  # type: ignore[arg-type]  # batch-norm never ran in train mode
    assert ce_result.model.encoders["audio"] is setup.model.encoders["audio"]
    assert torch.equal(ce_result.model.centres("audio"), setup.model.centres("audio"))


def test_early_stopping_keeps_the_best_validation_epoch(setup, ce_result):
    h = ce_result.heads["audio"]
    scores = [r["val_score"] for r in h.history]
    assert h.best_epoch == max(range(len(scores)), key=lambda i: (scores[i], -i))
    for r in h.history:
        assert r["val_score"] == pytest.approx(0.25 * r["val_clean"] + 0.75 * r["val_adv"])
    assert len(h.history) <= FAST["epochs"] + 1
    assert h.trainable_parameters == sum(p.numel() for p in h.head.parameters())
    assert h.trainable_fraction == pytest.approx(h.trainable_parameters / (h.trainable_parameters + 8))


def test_stage2_history_shows_the_training_attack_fools_the_head_and_gradients_reach_it(ce_result):
    first = ce_result.heads["audio"].history[1]
    assert first["train_eps"] == pytest.approx(8 / 255)
    # on its own training examples the head starts far below its clean accuracy: the attack works
    assert first["train_adv_acc"] < 0.8 < first["train_clean_acc"]
    assert first["grad_norm"] > 0


def test_eps_curriculum_grows_the_training_budget_linearly(setup):
    opt = CalibrationOptions(loss="ce", eps=6 / 255, eps_warmup=2, **FAST)
    assert [epoch_eps(opt, e) for e in (1, 2, 3, 4)] == pytest.approx([2 / 255, 4 / 255, 6 / 255, 6 / 255])
    rows = calibrate(setup, opt, modalities=["audio"]).heads["audio"].history[1:]
    assert [r["train_eps"] for r in rows] == pytest.approx([2 / 255, 4 / 255, 6 / 255])


def test_the_training_attack_option_picks_the_attack_of_training_and_validation(setup, monkeypatch):
    import mmrobust.calibration.train as train_module

    used: list[str] = []

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        used.append(name)
        return build_attack(name, *args, **kwargs)

    monkeypatch.setattr(train_module, "build_attack", spy)
    opt = CalibrationOptions(loss="ce", train_attack="apgd-dlr", **{**FAST, "epochs": 1})
    result = calibrate(setup, opt, modalities=["audio"])
    assert used and set(used) == {"apgd-dlr"} and result.heads["audio"].history[1]["train_adv_acc"] < 1.0


def test_l2_loss_pulls_adversarial_embeddings_to_the_stage1_clean_ones(setup):
    result = calibrate(setup, CalibrationOptions(loss="l2", **FAST), modalities=["image"])
    after = evaluate(result.model, setup.meta, setup.data.test, EVAL).modalities["image"]
    assert after.budgets[0].worst.accuracy >= 0.9 and after.clean.accuracy >= 0.95


def test_stage2_losses_match_their_formulas():
    torch.manual_seed(0)
    z_adv, anchors, centres = torch.randn(5, 3), torch.randn(5, 3), F.normalize(torch.randn(4, 3), dim=1)
    y = torch.tensor([0, 1, 2, 3, 0])
    opts = CalibrationOptions()
    l2 = stage2_loss(dataclasses.replace(opts, loss="l2"), z_adv, anchors, y, centres)
    assert float(l2) == pytest.approx(sum(float((z_adv[i] - anchors[i]).pow(2).sum()) for i in range(5)) / 5)
    ce = stage2_loss(dataclasses.replace(opts, loss="ce", ce_temperature=0.5), z_adv, anchors, y, centres)
    cos = torch.stack([torch.stack([F.cosine_similarity(z_adv[i], c, dim=0) for c in centres]) for i in range(5)])
    assert float(ce) == pytest.approx(float(-torch.log_softmax(cos / 0.5, 1)[torch.arange(5), y].mean()), rel=1e-5)
    nce = stage2_loss(dataclasses.replace(opts, loss="infonce"), z_adv, anchors, y, centres)
    sims = torch.stack([torch.stack([F.cosine_similarity(z_adv[i], anchors[j], dim=0) for j in range(5)])
                        for i in range(5)])  # fmt: skip
    assert float(nce) == pytest.approx(float(-torch.log_softmax(sims / 0.07, 1).diagonal().mean()), rel=1e-5)


def test_macro_precision_recall_f1_and_recall_at_k_by_brute_force():
    preds, labels = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2])
    p, r, f = macro_precision_recall_f1(preds, labels, 4)
    assert p == pytest.approx((1 / 2 + 1 / 1 + 2 / 3) / 3)
    assert r == pytest.approx((1 / 2 + 1 / 2 + 2 / 2) / 3)
    assert f == pytest.approx(macro_f1(preds, labels, 4))
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gallery = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.1, 1.0]])
    assert recall_at_k(q, torch.tensor([1, 0]), gallery, torch.tensor([0, 1, 1]), (1, 2)) == {1: 0.0, 2: 0.5}


def test_evaluation_reports_every_component_worst_case_and_retrieval(setup):
    opts = EvalOptions(eps=(2 / 255, 8 / 255), steps=5, queries=30, targets=3)
    ev = evaluate(setup.model, setup.meta, setup.data.test, opts)
    audio = ev.modalities["audio"]
    for b in audio.budgets:
        assert set(b.by_attack) == {"apgd-ce", "apgd-t", "fab-t", "square"}
        assert b.worst.accuracy <= min(b.by_attack.values()) + 1e-9
    assert audio.budgets[1].worst.accuracy <= audio.budgets[0].worst.accuracy
    rows = {(r["query"], r["gallery"]): r for r in ev.retrieval}
    assert set(rows) == {("audio", "image"), ("image", "audio")}
    assert rows[("audio", "image")]["clean"][1] == 1.0  # both modalities share the class signal
    # the gallery's clean embeddings have no nuisance part, so the perturbed queries still find their class
    assert rows[("audio", "image")]["adversarial_eps"] == pytest.approx(8 / 255)
    assert set(rows[("audio", "image")]["adversarial"]) == {1, 5}
    d = ev.to_dict()
    assert d["modalities"]["image"]["budgets"][0]["eps"] == pytest.approx(2 / 255)


def test_components_that_do_not_apply_are_skipped_with_a_reason(setup):
    ev = evaluate(setup.model, setup.meta, setup.data.test.subset(slice(0, 8)),
                  EvalOptions(eps=(8 / 255,), steps=2, queries=5, targets=9))  # fmt: skip
    skipped = ev.modalities["audio"].skipped
    assert len(skipped) == 2 and all("this model has 4" in s for s in skipped)
    assert set(ev.modalities["audio"].budgets[0].by_attack) == {"apgd-ce", "square"}


def test_heads_round_trip_through_safetensors_and_json(tmp_path, setup, ce_result):
    paths = save_heads(tmp_path, "ce", ce_result)
    assert sorted(p.name for p in paths) == ["ce.json", "ce.safetensors"]
    heads = load_heads(tmp_path, "ce")
    x = setup.data.test.inputs["audio"]
    reloaded = setup.model.with_heads(heads)
    torch.testing.assert_close(reloaded.logits("audio", x), ce_result.model.logits("audio", x))


@pytest.mark.skipif(not HAS_PEFT, reason="LoRA needs the optional 'peft' package (pip install 'mmrobust[calibration]')")
def test_lora_trains_only_low_rank_adapters_and_merges_into_a_plain_head(setup):
    result = calibrate(setup, CalibrationOptions(loss="ce", lora_rank=2, **FAST), modalities=["audio"])
    h = result.heads["audio"]
    assert h.trainable_parameters == 2 * (8 + 16) + 2 * (16 + 8)  # A: r x in, B: out x r, two linear layers
    assert h.trainable_parameters < h.head_parameters
    assert isinstance(h.head, ProjectionHead)
    after = evaluate(result.model, setup.meta, setup.data.test, EVAL).modalities["audio"]
    assert after.budgets[0].worst.accuracy >= 0.9


@pytest.mark.skipif(HAS_PEFT, reason="checks the message shown when 'peft' is not installed")
def test_lora_without_peft_is_a_one_line_error(setup):
    with pytest.raises(ConfigError, match="peft"):
        calibrate(setup, CalibrationOptions(lora_rank=8))


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [({"eps": 0.0}, "eps"), ({"eps": 1.5}, "eps"), ({"eps": float("nan")}, "eps"), ({"loss": "mse"}, "choose from"),
     ({"lora_rank": -1}, "lora_rank"), ({"epochs": True}, "epochs"), ({"lr": 0.0}, "lr"),
     ({"ce_temperature": float("inf")}, "ce_temperature"), ({"train_attack": "fab"}, "unknown attack 'fab'"),
     ({"eps_warmup": -1}, "eps_warmup"), ({"clean_weight": -0.5}, "clean_weight")],
)  # fmt: skip
def test_calibration_options_validate_themselves(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CalibrationOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"eps": (2 / 255, 2.0)}, "eps"), ({"eps": ()}, "eps"), ({"attacks": ("pgd",)}, "choose from"),
     ({"steps": 0}, "steps"), ({"retrieval_k": (0,)}, "retrieval_k")],
)  # fmt: skip
def test_eval_options_validate_themselves(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EvalOptions(**kwargs)


def test_centres_with_the_wrong_dimension_are_refused(setup):
    model = BindModel(dict(setup.model.encoders.items()), torch.randn(4, 7))
    with pytest.raises(ConfigError, match="dimension 7 .* 8-d"):
        CalibrationSetup(model, setup.meta, setup.data)


def test_an_encoder_returning_nan_is_refused(setup):
    def broken(x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 8), float("nan"))

    model = BindModel({"audio": broken, "image": setup.model.encoders["image"]}, setup.model.centres("audio"))
    with pytest.raises(DataError, match="encoder 'audio' returned NaN"):
        CalibrationSetup(model, setup.meta, setup.data)


def test_an_encoder_returning_nan_beyond_the_probe_samples_is_refused_before_training(setup):
    encoder = setup.model.encoders["audio"]

    def late_nan(x: torch.Tensor) -> torch.Tensor:  # fine on the 8 probe samples, NaN on larger batches
        z = encoder(x)
        return z if len(x) <= 8 else torch.full_like(z, float("nan"))

    model = BindModel({"audio": late_nan}, setup.model.centres("audio"))
    bad = CalibrationSetup(model, setup.meta, setup.data)  # the probe passes
    with pytest.raises(DataError, match="encoder 'audio' returned NaN or inf embeddings for 64 of 64 evaluation"):
        evaluate(model, setup.meta, setup.data.test, EVAL)
    with pytest.raises(DataError, match="returned NaN or inf embeddings for 128 of 128 training"):
        calibrate(bad, CalibrationOptions(**FAST))


def test_a_modality_without_valid_range_is_refused(setup):
    meta = DatasetMeta("x", [ModalitySpec("audio", "vector", (8,)), ModalitySpec("image", "vector", (8,), (0.0, 1.0))],
                       setup.meta.class_names)  # fmt: skip
    with pytest.raises(ConfigError, match="'audio' has no valid input range"):
        CalibrationSetup(setup.model, meta, DataBundle(meta, setup.data.train, setup.data.val, setup.data.test))


def test_bad_centres_and_encoders_are_refused():
    enc = {"a": nn.Identity(), "b": nn.Identity()}
    with pytest.raises(ConfigError, match="no class centres for modality"):
        BindModel(enc, {"a": torch.randn(3, 4)})
    with pytest.raises(ConfigError, match="same number of classes"):
        BindModel(enc, {"a": torch.randn(3, 4), "b": torch.randn(5, 4)})
    with pytest.raises(ConfigError, match="NaN"):
        BindModel(enc, torch.full((3, 4), float("nan")))
    with pytest.raises(ConfigError, match="not callable"):
        BindModel({"a": 3, "b": nn.Identity()}, torch.randn(3, 4))  # type: ignore[dict-item]


def test_adapters_name_the_missing_package_and_import_nothing_at_load():
    import sys

    from mmrobust.calibration import adapters

    assert "imagebind" not in sys.modules and "languagebind" not in sys.modules
    for fn, package in ((adapters.imagebind_encoders, "imagebind"), (adapters.languagebind_encoders, "languagebind")):
        if importlib.util.find_spec(package) is not None:
            continue
        with pytest.raises(ConfigError, match=f"needs the '{package}' package"):
            fn("/nonexistent")


def test_pca_2d_projects_on_the_leading_principal_axes():
    from mmrobust.report.calibration import pca_2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g) * torch.tensor([5.0, 2.0, 0.1]) + torch.tensor([1.0, -3.0, 7.0])
    xy = pca_2d(x)
    cov = torch.cov((x - x.mean(0)).T)
    top = torch.linalg.eigvalsh(cov).flip(0)[:2]
    torch.testing.assert_close(xy.var(0), top, rtol=1e-4, atol=1e-4)


def test_robust_accuracy_is_the_autoattack_protocol_carried_over_budgets(setup):
    opts = EvalOptions(eps=(2 / 255, 4 / 255), steps=5, queries=30, targets=3)
    test = setup.data.test
    image = evaluate(setup.model, setup.meta, test, opts).modalities["image"]
    clf = setup.model.classifier("image")

    def direct(eps: float) -> float:
        aa_opts = AutoAttackOptions(
            eps=eps,
            version="custom",
            attacks=opts.attacks,
            modalities=("image",),
            steps=opts.steps,
            queries=opts.queries,
            targets=opts.targets,
            seed=opts.seed,
        )
        return run_autoattack(
            clf, {"image": test.inputs["image"]}, test.labels, aa_opts, meta=setup.meta
        ).robust_accuracy

    small, large = image.budgets
    assert small.worst.accuracy == pytest.approx(direct(2 / 255))
    # a sample broken at 2/255 stays broken at 4/255 (its example is inside the larger ball)
    assert large.worst.accuracy <= min(direct(4 / 255), small.worst.accuracy) + 1e-9
    for b in image.budgets:
        steps = list(b.by_attack.values())  # cumulative: after each component
        assert steps == sorted(steps, reverse=True) and steps[-1] == pytest.approx(b.worst.accuracy)
    assert small.worst.accuracy <= 0.6  # the stand-in is fragile: the protocol really attacked
