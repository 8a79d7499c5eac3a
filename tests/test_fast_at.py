"""Fast adversarial training: every training attack stays in the requested ball, ``free`` replays,
and the catastrophic-overfitting guard reports collapses and chooses the kept epoch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmrobust.config import options_dataclass
from mmrobust.data.base import DatasetMeta, ModalitySpec, Normalization
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.training import METHODS, train
from mmrobust.training.adversarial import TRAIN_ATTACKS
from mmrobust.training.base import StepContext
from mmrobust.training.guard import COLLAPSE, ROBUST, SINGLE, CollapseGuard
from tests.conftest import tiny_config

# an image in [0, 1] (one std) and an MFCC-like sequence (one std per coefficient, no valid range)
META = DatasetMeta(
    "fastat",
    [
        ModalitySpec(
            "image", "image", (1, 6, 6), (0.0, 1.0), "pixel intensity in [0, 1]", Normalization((0.4,), (0.3,))
        ),  # fmt: skip
        ModalitySpec("audio", "sequence", (3, 8), None, "MFCC", Normalization((0.0, 1.0, 2.0), (5.0, 2.0, 0.5))),
    ],
    ["a", "b", "c"],
)
EPS = 0.2


def _batch(n: int = 24, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, 6, 6, generator=g)
    image[:, :, :2] = image[:, :, :2].round()  # pixels on the range's edges: the clamp must hold them
    audio = torch.randn(n, 3, 8, generator=g) * torch.tensor([5.0, 2.0, 0.5])[:, None]
    return {"image": image, "audio": audio}, torch.randint(0, 3, (n,), generator=g)


def _strategy(method: str, **options: object):
    cls = METHODS.get(method)
    strategy = cls(options_dataclass(cls.Options, dict(options), method), META)
    torch.manual_seed(0)
    model = build_model(META, cls.model_config(ModelConfig(feature_dim=8), strategy.options))
    return strategy, model


def _examples(strategy, model, inputs, labels, replays: int = 3) -> list[dict[str, torch.Tensor]]:
    """Training examples of a few steps; ``free`` is driven as the engine does (backward, after_backward)."""
    out = []
    for step in range(replays):
        ctx = StepContext(0, step, torch.Generator().manual_seed(0))
        x = strategy.adversarial_examples(model, inputs, labels, ctx)
        out.append({k: v.detach().clone() for k, v in x.items()})
        model.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        strategy.after_backward(model, ctx)
    return out


def _scaled_norms(delta: dict[str, torch.Tensor], norm: str, scaled: bool) -> dict[str, torch.Tensor]:
    """Per-sample norm of each modality's perturbation, in the units the convention states (brute force)."""
    scales = {"image": torch.tensor(0.3), "audio": torch.tensor([5.0, 2.0, 0.5])[:, None]}
    out = {}
    for m, d in delta.items():
        d = d / scales[m] if scaled else d
        flat = d.flatten(1)
        out[m] = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    return out


@pytest.mark.parametrize("attack", TRAIN_ATTACKS)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("budget", ["joint", "per-modality"])
def test_training_examples_lie_in_the_requested_ball_and_range(attack, norm, budget):
    strategy, model = _strategy("mmat", train_eps=EPS, train_norm=norm, train_budget=budget, train_attack=attack,
                                steps=3)  # fmt: skip
    threat = strategy._threat()
    assert (threat.norm, threat.budget) == (norm, budget)
    inputs, labels = _batch()
    for step, x in enumerate(_examples(strategy, model, inputs, labels, replays=3 if attack == "free" else 1)):
        delta = {m: x[m] - inputs[m] for m in inputs}
        assert float(x["image"].min()) >= 0.0 and float(x["image"].max()) <= 1.0  # the valid range
        # units (docs/attacks.md): joint l2 on x / std; per-modality l2 on x / std only where the
        # normalisation has one value per coefficient (audio); l-inf in stored units
        if norm == "linf":
            per = _scaled_norms(delta, "linf", scaled=False)
        elif budget == "joint":
            per = _scaled_norms(delta, "l2", scaled=True)
        else:
            per = {
                "image": _scaled_norms(delta, "l2", False)["image"],
                "audio": _scaled_norms(delta, "l2", True)["audio"],
            }
        if norm == "l2" and budget == "joint":
            size = torch.sqrt(per["image"] ** 2 + per["audio"] ** 2)
            assert float(size.max()) <= EPS * (1 + 1e-5)
        else:
            for m, v in per.items():
                assert float(v.max()) <= EPS * (1 + 1e-5), m
        if attack == "free" and step == 0:
            assert all(torch.allclose(x[m], inputs[m], atol=1e-5) for m in inputs)  # free starts from zero
            continue
        # every attack moves the inputs (not a no-op) and uses the budget it was asked for: an l-inf
        # or per-modality request has a joint-l2 size well beyond eps, which joint l2 never does
        joint_l2 = torch.sqrt(sum(v**2 for v in _scaled_norms(delta, "l2", scaled=True).values()))
        moved = torch.stack([v for v in per.values()], 1).amax(1) if norm == "linf" or budget != "joint" else size
        assert float(moved.median()) > 0.5 * EPS
        if norm == "linf" or budget == "per-modality":
            assert float(joint_l2.median()) > 1.2 * EPS, (attack, norm, budget)
        if norm == "linf":  # sign steps: most audio entries sit on the box's faces
            on_face = (delta["audio"].abs() > EPS * (1 - 1e-4)).float().mean()
            assert float(on_face) > 0.3


def test_free_replays_each_minibatch_and_divides_the_epochs():
    cfg = tiny_config("mmat", epochs=4)
    cfg.train.method_options = {"train_attack": "free", "replays": 2, "guard": False}
    seen = []
    result = train(cfg, progress=lambda label, done, total: seen.append((done, total)))
    m = result.metrics
    assert len(m["history"]) == 2 and m["epochs"] == 2
    rec = m["adversarial_training"]
    assert (rec["train_attack"], rec["replays"], rec["epochs_requested"], rec["epochs_run"]) == ("free", 2, 4, 2)
    assert rec["minibatch_passes_per_sample"] == 4
    batches = math.ceil(240 / 32)
    assert seen[-1] == (2 * 2 * batches, 2 * 2 * batches)  # every minibatch ran twice in each of 2 epochs


def test_free_perturbation_comes_from_the_training_backward():
    strategy, model = _strategy("crmt-at", train_eps=EPS, train_attack="free", replays=2)
    inputs, labels = _batch()
    ctx = StepContext(0, 0, torch.Generator().manual_seed(0))
    x = strategy.adversarial_examples(model, inputs, labels, ctx)
    loss, _ = strategy._loss(model, x, labels, None, 1.0)
    loss.backward()
    grad = strategy._free._leaf.grad.clone()
    strategy.after_backward(model, ctx)
    # one step of eps along the normalised input gradient of that very loss, from zero (joint l2);
    # columns: the 36 image pixels (clamped to [0, 1]), then the 24 audio entries (no valid range)
    step = strategy._free.delta
    assert grad.shape == (24, 60) and float(grad.abs().sum()) > 0
    assert torch.allclose(step[:, 36:], EPS * grad[:, 36:] / grad.norm(dim=1, keepdim=True), atol=1e-6)


def test_crmt_at_old_option_names_are_aliases():
    cls = METHODS.get("crmt-at").Options
    o = options_dataclass(cls, {"at_eps": "1.5", "at_steps": "3", "at_step_size": "0.4"}, "crmt-at")
    assert (o.train_eps, o.steps, o.step_size) == (1.5, 3, 0.4)
    with pytest.raises(ConfigError, match="'at_steps' and 'steps' are the same setting"):
        options_dataclass(cls, {"at_steps": "3", "steps": "2"}, "crmt-at")
    with pytest.raises(ConfigError, match="choose from: pgd, fgsm-rs, n-fgsm, free, fgsm") as err:
        options_dataclass(cls, {"train_attack": "fgsm-fast"}, "crmt-at")
    assert err.value.param == "train_attack" and "--" not in str(err.value)
    for bad in ({"train_norm": "l1"}, {"train_budget": "each"}, {"replays": "0"}):
        with pytest.raises(ConfigError):
            options_dataclass(cls, bad, "crmt-at")


def test_guard_default_and_steps():
    pgd, _ = _strategy("varmat-input")
    fast, _ = _strategy("varmat-input", train_attack="fgsm-rs")
    assert not pgd.options.guard_on and fast.options.guard_on
    assert pgd.selection_metric() is None and fast.selection_metric() == ROBUST
    assert fast._rel_step() == 1.25 and _strategy("mmat", train_attack="n-fgsm")[0]._rel_step() == 1.0


def test_guard_flags_a_collapse_only_when_multi_step_falls_and_single_step_rises():
    guard = CollapseGuard(_strategy("mmat")[0]._threat())
    seq = [(0.40, 0.50), (0.55, 0.60), (0.50, 0.58), (0.44, 0.55), (0.30, 0.80)]
    flags = [guard.observe(e, {ROBUST: r, SINGLE: s})[0][COLLAPSE] for e, (r, s) in enumerate(seq)]
    # epoch 4: 0.11 below the best but single-step fell; epoch 5: 0.25 below while single-step rose
    assert flags == [False, False, False, False, True]
    assert guard.collapses[0]["epoch"] == 5 and guard.collapses[0]["best_epoch"] == 2


def test_guard_reports_and_keeps_the_most_robust_epoch(monkeypatch):
    # scripted guard measurements: robustness collapses after epoch 2 while clean accuracy improves
    script = iter([(0.30, 0.40), (0.50, 0.55), (0.10, 0.90), (0.05, 0.95)])

    def measure(self, model, val, device):
        r, s = next(script)
        return {ROBUST: r, "guard_robust_accuracy_ce": r, "guard_robust_accuracy_cw": r, SINGLE: s}

    monkeypatch.setattr(CollapseGuard, "measure", measure)
    cfg = tiny_config("mmat", epochs=4)
    cfg.train.method_options = {"train_attack": "fgsm-rs"}
    messages: list[str] = []
    m = train(cfg, on_epoch=messages.append).metrics
    assert m["best_epoch"] == 2  # by robust accuracy, whatever the clean accuracy
    assert [h[COLLAPSE] for h in m["history"]] == [False, False, True, True]
    assert sum("catastrophic overfitting at epoch" in line for line in messages) == 2
    guard = m["adversarial_training"]["guard"]
    assert guard["best_epoch"] == 2 and [c["epoch"] for c in guard["collapses"]] == [3, 4]


def test_guard_measures_real_robustness():
    strategy, model = _strategy("mmat", train_eps=1.0)
    guard = CollapseGuard(strategy._threat(), samples=16, steps=5)
    from mmrobust.data.base import Split

    inputs, labels = _batch(32)
    acc = guard.measure(model.eval(), Split(inputs, labels), "cpu")
    assert acc[ROBUST] <= min(acc["guard_robust_accuracy_ce"], acc["guard_robust_accuracy_cw"])
    assert guard.subset_size == 16
