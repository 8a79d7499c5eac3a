"""Certified training: the differentiable margin bounds (IBP, CROWN-IBP) are sound against attacks
and brute force on every built-in encoder, carry weight gradients, and the option mixes them into
the methods that support it (and is refused by the others)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmrobust.attacks import PGDL2, PGDLinf
from mmrobust.attacks.threat import ThreatModel
from mmrobust.certify.ibp import margin_bounds
from mmrobust.data.base import DatasetMeta, ModalitySpec, Normalization
from mmrobust.errors import ConfigError
from mmrobust.models.encoders import MLPEncoder, ResNet18, SmallCNN, SmallCNNAvgPool, TemporalCNN
from mmrobust.models.fusion import LateFusionModel
from mmrobust.models.heads import ConcatHead, OrthogonalHead
from mmrobust.models.lipschitz import LipschitzCNN, LipschitzMLP, LipschitzTCN
from mmrobust.models.transform import build_transforms
from mmrobust.training.base import StepContext, method_options
from mmrobust.training.certified import CertifiedOptions

from .conftest import tiny_config

IMG = ModalitySpec("img", "image", (1, 8, 8), (0.0, 1.0), "pixel", Normalization((0.4,), (0.3,)))
SEQ = ModalitySpec("seq", "sequence", (2, 8), None, "mfcc", Normalization((0.0, 1.0), (2.0, 0.5), 0))
VEC = ModalitySpec("vec", "vector", (5,))
META = DatasetMeta("t", [IMG, SEQ, VEC], ["0", "1", "2"])
D = 6  # feature dimension

ENCODERS = {
    "standard": lambda: {
        "img": SmallCNN(IMG, D, width=4),
        "seq": TemporalCNN(SEQ, D, width=4),
        "vec": MLPEncoder(VEC, D, hidden=8),
    },
    "avgpool": lambda: {
        "img": SmallCNNAvgPool(IMG, D, width=4),
        "seq": TemporalCNN(SEQ, D, width=4),
        "vec": MLPEncoder(VEC, D, hidden=8),
    },
    "lipschitz": lambda: {
        "img": LipschitzCNN(IMG, D, width=4),
        "seq": LipschitzTCN(SEQ, D, width=4),
        "vec": LipschitzMLP(VEC, D, hidden=8),
    },
}


def _model(encoders: str, head: str, seed: int = 0) -> LateFusionModel:
    torch.manual_seed(seed)
    encs = ENCODERS[encoders]()
    dims = dict.fromkeys(encs, D)
    fusion = ConcatHead(dims, 3) if head == "concat" else OrthogonalHead(dims, 3)
    model = LateFusionModel(encs, fusion, 3, transforms=build_transforms(META))
    # non-trivial BatchNorm statistics, then eval mode (what a certificate talks about)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(_inputs(16, seed + 100))
    return model.eval()


def _inputs(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "img": torch.rand(n, 1, 8, 8, generator=g),
        "seq": torch.randn(n, 2, 8, generator=g) * 2,
        "vec": torch.randn(n, 5, generator=g),
    }


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, y[:, None]) - logits


CASES = [(e, h) for e in ENCODERS for h in ("concat", "orthogonal")]


@pytest.mark.parametrize("encoders,head", CASES)
@pytest.mark.parametrize(
    "norm,budget,eps", [("l2", "joint", 0.1), ("l2", "per-modality", 0.05), ("linf", "joint", 0.01)]
)
def test_bounds_lower_bound_the_pgd_margin_and_the_clean_margin(encoders, head, norm, budget, eps):
    model = _model(encoders, head)
    x = _inputs(8)
    y = model(x).argmax(1)
    threat = ThreatModel.parse(META, eps=eps, norm=norm, budget=budget)
    b = margin_bounds(model, x, y, threat, crown=True)
    assert b.ibp.dtype == torch.float32 and b.crown is not None and b.crown.dtype == torch.float32
    assert torch.allclose(b.logits, model(x), atol=1e-5)
    clean = _margins(model(x), y)
    attack = (PGDL2 if norm == "l2" else PGDLinf)(model, threat, steps=20, loss="cw", seed=0)
    _, adv_logits = attack.perturb(x, y)
    adv = _margins(adv_logits, y)
    for lower in (b.ibp, b.crown):
        assert (lower <= clean + 1e-4).all()
        assert (lower <= adv + 1e-4).all()
        assert (lower.gather(1, y[:, None]) == 0).all()  # k = y: the spec is zero
    # not vacuous: at this small radius CROWN-IBP keeps some margins positive on the 1-Lipschitz models
    if encoders == "lipschitz" and norm == "l2" and budget == "joint":
        assert (b.crown.scatter(1, y[:, None], math.inf).min(1).values > 0).any()


def _sample_joint_ball(x: dict[str, torch.Tensor], eps: float, n: int, meta: DatasetMeta) -> dict[str, torch.Tensor]:
    """``n`` random points per sample of the joint l2 ball in the threat model's scaled units (half of them
    on the sphere), as stored inputs."""
    threat = ThreatModel.parse(meta, eps=eps, norm="l2", budget="joint")
    g = torch.Generator().manual_seed(3)
    out = {}
    dirs = {m: torch.randn(n, *v.shape, generator=g) for m, v in x.items()}
    norm = torch.stack([d.flatten(2).pow(2).sum(2) for d in dirs.values()]).sum(0).sqrt()  # (n, B)
    radius = eps * torch.where(torch.arange(n)[:, None] % 2 == 0, torch.ones_like(norm), torch.rand(n, norm.shape[1]))
    for m, d in dirs.items():
        spec = meta.spec(m)
        s = (
            torch.tensor(threat.scales[m]).reshape(spec.normalization.broadcast_shape(spec.shape))
            if len(threat.scales[m]) > 1
            else torch.tensor(threat.scales[m][0])
        )
        scaled = d / norm.view(n, -1, *([1] * (d.ndim - 2))) * radius.view(n, -1, *([1] * (d.ndim - 2)))
        out[m] = (x[m].unsqueeze(0) + scaled * s).flatten(0, 1)
    return out


@pytest.mark.parametrize("encoders", list(ENCODERS))
def test_brute_force_never_goes_below_the_bound(encoders):
    model = _model(encoders, "concat", seed=2)
    x = _inputs(4, seed=5)
    y = model(x).argmax(1)
    eps, n = 0.3, 300
    b = margin_bounds(model, x, y, ThreatModel.parse(META, eps=eps, norm="l2", budget="joint"), crown=True)
    pts = _sample_joint_ball(x, eps, n, META)
    with torch.no_grad():
        m = _margins(model(pts), y.repeat(n)).view(n, 4, 3).min(0).values
    assert (b.ibp <= m + 1e-4).all() and (b.crown <= m + 1e-4).all()


def test_resnet18_intervals_are_sound():
    img = ModalitySpec("img", "image", (1, 16, 16), None, "pixel", Normalization((0.4,), (0.3,)))
    meta = DatasetMeta("r", [img, VEC], ["0", "1", "2"])
    torch.manual_seed(0)
    encs = {"img": ResNet18(img), "vec": MLPEncoder(VEC, D, hidden=8)}
    model = LateFusionModel(encs, ConcatHead({"img": 512, "vec": D}, 3), 3, transforms=build_transforms(meta))
    model.eval()
    x = {"img": torch.rand(2, 1, 16, 16), "vec": torch.randn(2, 5)}
    y = model(x).argmax(1)
    threat = ThreatModel.parse(meta, eps=0.01, norm="l2", budget="joint")
    b = margin_bounds(model, x, y, threat, crown=True)
    _, adv_logits = PGDL2(model, threat, steps=5, loss="cw", seed=0).perturb(x, y)
    assert (b.ibp <= _margins(adv_logits, y) + 1e-4).all() and (b.crown <= _margins(adv_logits, y) + 1e-4).all()


def test_exact_at_radius_zero():
    model = _model("standard", "concat")
    x = _inputs(6)
    y = model(x).argmax(1)
    b = margin_bounds(model, x, y, ThreatModel.parse(META, eps=0.0, norm="l2", budget="joint"), crown=True)
    clean = _margins(model(x), y)
    assert torch.allclose(b.ibp, clean, atol=1e-4) and torch.allclose(b.crown, clean, atol=1e-4)


@pytest.mark.parametrize("encoders,head", [("standard", "concat"), ("lipschitz", "orthogonal")])
def test_bounds_give_weight_gradients_in_train_mode_without_touching_batchnorm_statistics(encoders, head):
    model = _model(encoders, head).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = _inputs(8)
    y = torch.arange(8) % 3
    threat = ThreatModel.parse(META, eps=0.2, norm="l2", budget="joint")
    for kind in ("ibp", "crown"):
        model.zero_grad()
        b = margin_bounds(model, x, y, threat, crown=True)
        lower = b.ibp if kind == "ibp" else b.crown
        torch.nn.functional.cross_entropy(-lower, y).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (kind, name)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    # sound for the train-mode model too (BatchNorm on batch statistics)
    with torch.no_grad():
        clean = _margins(model(x), y)
    b = margin_bounds(model, x, y, threat, crown=True)
    assert (b.ibp <= clean + 1e-4).all() and (b.crown <= clean + 1e-4).all()


def test_crown_ibp_is_tighter_than_ibp_on_a_locally_linear_model():
    # every ReLU is stably active on the ball: the model is affine there, CROWN is exact, IBP pays the
    # dependency between the two layers (W2 W1 cancels where |W2| |W1| does not)
    meta = DatasetMeta("lin", [ModalitySpec("v", "vector", (4,)), ModalitySpec("w", "vector", (2,))], ["0", "1"])
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())
    with torch.no_grad():
        enc[0].bias.fill_(20.0)
        enc[2].weight.copy_(torch.randn(4, 8) * 0.5)
        enc[2].bias.copy_(50.0 - enc[2].weight @ (enc[0].weight @ torch.zeros(4) + 20.0))
    model = LateFusionModel({"v": enc, "w": nn.Flatten()}, ConcatHead({"v": 4, "w": 2}, 2), 2).eval()
    x = {"v": torch.randn(5, 4) * 0.1, "w": torch.randn(5, 2)}
    y = model(x).argmax(1)
    threat = ThreatModel.parse(meta, eps=0.5, norm="l2", budget="joint", modalities=["v"])  # w stays as it is
    b = margin_bounds(model, x, y, threat, crown=True)
    other = 1 - y
    ibp, crown = b.ibp.gather(1, other[:, None]), b.crown.gather(1, other[:, None])
    assert (crown > ibp + 1e-3).all()
    # and CROWN is exact here: margin(x) - eps * ||gradient of the margin||
    w = model.head.modality_weight("v")
    grad = (w[y] - w[other]) @ enc[2].weight @ enc[0].weight
    exact = _margins(model(x), y).gather(1, other[:, None]).squeeze(1) - 0.5 * grad.norm(dim=1)
    assert torch.allclose(crown.squeeze(1), exact, atol=1e-3)


def test_an_unknown_layer_is_refused_in_one_line():
    meta = DatasetMeta("u", [ModalitySpec("v", "vector", (4,)), ModalitySpec("w", "vector", (2,))], ["0", "1"])
    encs = {"v": nn.Sequential(nn.Linear(4, 4), nn.Tanh()), "w": nn.Flatten()}
    model = LateFusionModel(encs, ConcatHead({"v": 4, "w": 2}, 2), 2)
    x = {"v": torch.randn(2, 4), "w": torch.randn(2, 2)}
    with pytest.raises(ConfigError, match=r"layer 'encoders\.v\.1' \(Tanh\)") as err:
        margin_bounds(model, x, torch.tensor([0, 1]), ThreatModel.parse(meta, eps=0.1))
    assert "\n" not in str(err.value) and err.value.param == "certified"


# --- the option ------------------------------------------------------------------------------------


def test_schedule_warms_up_then_ramps_per_step():
    o = CertifiedOptions(certified="ibp", certified_eps=2.0, certified_warmup=1, certified_ramp=2, certified_mix=0.2)
    g = torch.Generator()
    at = [
        o.certified_schedule(StepContext(e, s, g, 10, 5)) for e, s in ((0, 9), (1, 0), (2, 0), (2, 5), (3, 0), (4, 9))
    ]
    assert [s.eps for s in at] == pytest.approx([0.0, 0.0, 1.0, 1.5, 2.0, 2.0])
    assert [s.kappa for s in at] == pytest.approx([1.0, 1.0, 0.6, 0.4, 0.2, 0.2])
    assert [s.beta for s in at] == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.0, 0.0])
    # the default radius: the method's train_eps, else 1.0
    assert CertifiedOptions(certified="ibp").certified_radius == 1.0
    cfg = tiny_config("mmat")
    cfg.train.method_options = {"certified": "ibp", "train_eps": "0.7"}
    assert method_options(cfg).certified_radius == pytest.approx(0.7)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("certified", "lbp", "choose from: none, ibp, crown-ibp"),
        ("certified_norm", "l1", "choose from: l2, linf"),
        ("certified_budget", "all", "choose from: joint, per-modality"),
        ("certified_mix", "1.5", r"in \[0, 1\]"),
        ("certified_beta", "-0.1", r"in \[0, 1\]"),
        ("certified_eps", "-1", ">= 0"),
        ("certified_ramp", "-2", ">= 0 epochs"),
    ],
)
def test_bad_values_are_refused_naming_the_option(key, value, match):
    cfg = tiny_config("jt")
    cfg.train.method_options = {"certified": "ibp", key: value}
    with pytest.raises(ConfigError, match=match) as err:
        method_options(cfg)
    assert err.value.param == key


@pytest.mark.parametrize("method", ["gb", "pmr", "varmat"])
def test_methods_without_the_mixin_refuse_in_one_line(method):
    cfg = tiny_config(method)
    cfg.train.method_options = {"certified_eps": "0.5"}
    with pytest.raises(ConfigError) as err:
        method_options(cfg)
    msg = str(err.value)
    assert f"method '{method}'" in msg and "certified_eps" in msg and "\n" not in msg
    for supported in ("jt", "ojt", "crmt-jt", "crmt-at", "crmt-mix", "mmat"):
        assert supported in msg
    assert err.value.param == "certified_eps"


def test_certified_training_mixes_the_verified_loss_per_step(monkeypatch):
    from mmrobust.training import train
    from mmrobust.training.jt import JointTraining

    seen: list[StepContext] = []
    natural = JointTraining.loss

    def record(self, model, inputs, labels, ctx):
        seen.append(ctx)
        return natural(self, model, inputs, labels, ctx)

    monkeypatch.setattr(JointTraining, "loss", record)
    losses = {}
    for cert in ("none", "ibp"):
        cfg = tiny_config("jt", epochs=2)
        cfg.train.method_options = {"certified": cert, "certified_warmup": "0", "certified_ramp": "1",
                                    "certified_mix": "0"}  # fmt: skip
        losses[cert] = train(cfg).metrics["history"][-1]["train_loss"]
    # 240 samples, batch 32: 8 steps per epoch, and the engine says so
    assert seen[-1].steps_per_epoch == 8 and seen[-1].epochs == 2
    # the verified loss is the whole loss at the end of the ramp, and it is above the natural one
    assert losses["ibp"] > losses["none"] + 0.05


def test_certified_training_raises_the_certified_margin():
    from mmrobust.training import train

    lower = {}
    for cert in ("none", "crown-ibp"):
        cfg = tiny_config("ojt", epochs=3)
        cfg.train.method_options = {"certified": cert, "certified_eps": "0.5", "certified_warmup": "0",
                                    "certified_ramp": "1", "certified_beta": "0.5", "fit_samples": "64"}  # fmt: skip
        result = train(cfg)
        val = result.bundle.val
        threat = ThreatModel.parse(result.bundle.meta, eps=0.5)
        with torch.no_grad():
            b = margin_bounds(result.model.eval(), val.inputs, val.labels, threat)
        lower[cert] = float(b.ibp.scatter(1, val.labels[:, None], math.inf).min(1).values.mean())
    assert lower["crown-ibp"] > lower["none"] + 0.5


def test_only_epochs_from_the_end_of_the_ramp_are_selectable(tiny_bundle):
    from mmrobust.training.jt import JointTraining, JTOptions

    o = JTOptions(certified="ibp", certified_warmup=1, certified_ramp=2)
    assert [JointTraining(o, tiny_bundle.meta).selectable(e) for e in range(5)] == [False, False, True, True, True]
    assert all(JointTraining(JTOptions(), tiny_bundle.meta).selectable(e) for e in range(3))


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_the_first_affine_layer_is_bounded_exactly_on_the_l2_ball(layer):
    from mmrobust.certify.ibp import Ball, _forward_bounds, _ops

    torch.manual_seed(0)
    if layer == "linear":
        module, z = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), torch.randn(2, 3, 4)
    else:
        module, z = nn.Conv2d(2, 3, 3, padding=1, stride=2), torch.randn(2, 2, 5, 5)
    ops = _ops(module, "enc")
    with torch.no_grad():
        out = module(z)
        lo, hi = _forward_bounds(ops, Ball(z, torch.tensor(0.7), "l2"))[-1]
        # each output's maximiser on the ball: z + 0.7 * (its gradient) / ||gradient||
        for j in range(out[0].numel()):
            zz = z.clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(module(zz).flatten(1)[:, j].sum(), zz)
            top = module(z + 0.7 * g / g.flatten(1).norm(dim=1).view(-1, *[1] * (z.ndim - 1))).flatten(1)[:, j]
            assert torch.allclose(top, hi.flatten(1)[:, j], atol=1e-5)
            bottom = module(z - 0.7 * g / g.flatten(1).norm(dim=1).view(-1, *[1] * (z.ndim - 1))).flatten(1)[:, j]
            assert torch.allclose(bottom, lo.flatten(1)[:, j], atol=1e-5)
