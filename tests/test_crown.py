"""CROWN: exact on linear models, sound against brute force and attacks, never looser than the
interval and Lipschitz bounds it is combined with."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmrobust.certify.base import CERTIFIERS, CertifyContext, Guarantee
from mmrobust.certify.crown import CrownOptions, ModelBounds, crown_radii
from mmrobust.certify.crown_encoder import EncoderBounds
from mmrobust.certify.crown_layers import build_ops
from mmrobust.certify.crown_ops import run_forward
from mmrobust.certify.runner import certify_model
from mmrobust.certify.soundness import min_adversarial_norm
from mmrobust.data.base import DatasetMeta, ModalitySpec, Split
from mmrobust.errors import ConfigError
from mmrobust.models.encoders import BasicBlock, MLPEncoder, SmallCNN, SmallCNNAvgPool, TemporalCNN
from mmrobust.models.fusion import LateFusionModel, ModelConfig, build_model
from mmrobust.models.heads import ConcatHead

from .test_certify import _linear_model, _trained


def _exact_linear_radii(model: LateFusionModel, split: Split, dual: float) -> tuple[torch.Tensor, dict]:
    """Exact distance to the boundary of a linear model: min_k margin_k / ||grad of margin_k||_dual."""
    grads = {m: model.head.modality_weight(m).double() @ model.encoders[m][1].weight.double() for m in model.modalities}
    logits = model(split.inputs).detach().double()
    y = split.labels
    joint, uni = [], {m: [] for m in grads}
    for i in range(len(split)):
        others = [k for k in range(logits.shape[1]) if k != int(y[i])]
        gap = {k: float(logits[i, y[i]] - logits[i, k]) for k in others}
        rows = {m: {k: g[y[i]] - g[k] for k in others} for m, g in grads.items()}
        norm = {m: {k: float(v.norm(p=dual)) for k, v in rk.items()} for m, rk in rows.items()}
        cat = {k: float(torch.cat([rows[m][k] for m in grads]).norm(p=dual)) for k in others}
        joint.append(min(gap[k] / cat[k] for k in others))
        for m in grads:
            uni[m].append(min(gap[k] / norm[m][k] for k in others))
    return torch.tensor(joint), {m: torch.tensor(v) for m, v in uni.items()}


@pytest.mark.parametrize("norm,dual", [("l2", 2.0), ("linf", 1.0)])
def test_radius_is_exact_on_a_linear_model(norm, dual):
    model, meta = _linear_model()
    x = {"a": torch.randn(12, 5), "b": torch.randn(12, 3)}
    split = Split(x, model(x).argmax(1))
    rad = crown_radii(model, meta, split, CrownOptions(norm=norm, steps=40))
    joint, uni = _exact_linear_radii(model, split, dual)
    assert torch.allclose(rad.joint, joint.double(), rtol=1e-6)
    for m in model.modalities:
        assert torch.allclose(rad.unimodal[m], uni[m].double(), rtol=1e-6), m


def test_misclassified_samples_get_zero():
    model, meta = _linear_model()
    x = {"a": torch.randn(10, 5), "b": torch.randn(10, 3)}
    pred = model(x).argmax(1)
    rad = crown_radii(model, meta, Split(x, (pred + 1) % 3), CrownOptions(steps=4))
    assert (rad.joint == 0).all() and not rad.correct.any()


def _tiny_relu_model(seed: int) -> tuple[LateFusionModel, DatasetMeta]:
    torch.manual_seed(seed)
    meta = DatasetMeta("tiny", [ModalitySpec("u", "vector", (1,)), ModalitySpec("v", "vector", (1,))], ["0", "1", "2"])
    encs = {m: nn.Sequential(nn.Flatten(), nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU()) for m in "uv"}
    return LateFusionModel(encs, ConcatHead({"u": 5, "v": 5}, 3), 3).eval(), meta


def grid_minima(logits, x0, y, r, modalities):
    """Per sample ``i`` of two scalar modalities ``u``, ``v``: the smallest margin ``h_y - h_k`` (per class
    ``k``) over a dense grid of the ball of radius ``r[i]``: a disc for the joint ball (``["u", "v"]``),
    a segment for ``["u"]`` alone. ``logits``: the model in float64 (``ModelBounds.logits``)."""
    t = torch.linspace(-1, 1, 301, dtype=torch.float64)
    if modalities == ["u"]:
        du, dv = t, torch.zeros_like(t)
    else:
        gu, gv = torch.meshgrid(t, t, indexing="ij")
        inside = gu**2 + gv**2 <= 1
        du, dv = gu[inside], gv[inside]
    out = []
    for i in range(len(y)):
        pts = {"u": x0["u"][i].double() + r[i] * du[:, None], "v": x0["v"][i].double() + r[i] * dv[:, None]}
        lg = logits(pts)
        out.append((lg[:, y[i]].unsqueeze(1) - lg).min(0).values)
    return torch.stack(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_hold_on_a_dense_grid_of_the_joint_ball(seed):
    # two scalar modalities: the joint l2 ball is a disc; check every margin bound against a dense grid
    model, meta = _tiny_relu_model(seed)
    bounds = ModelBounds(model, meta, CrownOptions(intermediate="crown"))
    x0 = {"u": torch.randn(4, 1), "v": torch.randn(4, 1)}
    y = model(x0).argmax(1)
    r = torch.tensor([0.3, 0.8, 1.5, 3.0], dtype=torch.float64)
    low = bounds.lower(x0, y, r, ["u", "v"])
    true_min = grid_minima(bounds.logits, x0, y, r, ["u", "v"])
    seg_min = grid_minima(bounds.logits, x0, y, r, ["u"])  # per-modality ball: a segment
    for i in range(4):
        for k in range(3):
            if k != int(y[i]):
                assert low[i, k] <= true_min[i, k] + 1e-9, (i, k)
        low_u = bounds.lower({m: v[i : i + 1] for m, v in x0.items()}, y[i : i + 1], r[i : i + 1], ["u"])[0]
        assert all(low_u[k] <= seg_min[i, k] + 1e-9 for k in range(3) if k != int(y[i]))
    # the bound is informative, not just valid: at the smallest radius it is within 50% of the truth
    true0 = true_min[0]
    k = [k for k in range(3) if k != int(y[0])]
    assert all(low[0, j] >= true0[j] - 0.5 * (true0[j].abs() + 0.1) for j in k)


def test_certified_radius_survives_the_grid():
    model, meta = _tiny_relu_model(3)
    x0 = {"u": torch.randn(6, 1), "v": torch.randn(6, 1)}
    y = model(x0).argmax(1)
    rad = crown_radii(model, meta, Split(x0, y), CrownOptions(steps=20, intermediate="crown"))
    ang = torch.linspace(0, 2 * math.pi, 2001, dtype=torch.float64)
    for i in range(6):
        for scale in (0.5, 0.999):
            pts = {"u": x0["u"][i].double() + scale * rad.joint[i] * torch.cos(ang)[:, None],
                   "v": x0["v"][i].double() + scale * rad.joint[i] * torch.sin(ang)[:, None]}  # fmt: skip
            assert (model({m: v.float() for m, v in pts.items()}).argmax(1) == y[i]).all()


def test_crown_is_at_least_as_tight_as_interval_and_sound_lipschitz_and_much_tighter_on_an_mlp(tiny_bundle):
    model = _trained("concat", tiny_bundle)
    test = tiny_bundle.test.subset(slice(0, 40))
    meta = tiny_bundle.meta
    rad = crown_radii(model, meta, test, CrownOptions(steps=14, unimodal=False))
    sound = certify_model(model, meta, test, "sound").certificate.radii.joint.double()
    assert (rad.joint >= sound * (1 - 1e-6)).all()
    # at fixed radii, CROWN's own linear bound beats interval propagation on this MLP by a wide margin
    bounds = ModelBounds(model, meta, CrownOptions())
    y = test.labels
    r = torch.full((len(test),), 0.5, dtype=torch.float64)
    spec, beta = bounds.specs(y)
    crown_only, ibp_only = beta.clone(), beta.clone()
    duals = []
    for m in model.modalities:
        lin, dual, ibp = bounds.enc[m].bound(test.inputs[m], r, spec[m])
        crown_only, ibp_only = crown_only + lin, ibp_only + ibp
        duals.append(dual)
    crown_only = crown_only - r[:, None] * torch.stack(duals).pow(2).sum(0).sqrt()
    best = bounds.lower(test.inputs, y, r, model.modalities)
    other = torch.ones_like(best, dtype=torch.bool).scatter(1, y[:, None], False)
    assert (best[other] >= ibp_only[other] - 1e-9).all() and (best[other] >= crown_only[other] - 1e-9).all()
    assert float((crown_only - ibp_only)[other].median()) > 0.5
    # and its radii are a multiple of the sound Lipschitz radii
    ok = sound > 0
    assert float((rad.joint[ok] / sound[ok]).median()) > 1.3


@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_crown_radii_never_exceed_the_smallest_adversarial_perturbation_mlp(tiny_bundle, head):
    model = _trained(head, tiny_bundle)
    test = tiny_bundle.test.subset(slice(0, 30))
    rad = crown_radii(model, tiny_bundle.meta, test, CrownOptions(steps=10))
    threats = {"joint": rad.joint, **rad.unimodal}
    for threat, r in threats.items():
        mods = model.modalities if threat == "joint" else [threat]
        adv = min_adversarial_norm(model, test.inputs, test.labels, mods, torch.where(r > 0, r, torch.ones_like(r)),
                                   steps=20, search_rounds=6, bisect_rounds=4)  # fmt: skip
        assert (r <= adv * (1 + 1e-6)).all(), threat
        if threat == "joint":
            found = torch.isfinite(adv) & (r > 0)
            assert float((r[found] / adv[found]).median()) > 0.2  # a tight certificate on an MLP


ENCODERS = {
    "mlp": (lambda: MLPEncoder(ModalitySpec("v", "vector", (7,)), 5, hidden=9), (7,)),
    "tcn": (lambda: TemporalCNN(ModalitySpec("a", "sequence", (3, 12)), 6, width=4), (3, 12)),
    "smallcnn": (lambda: SmallCNN(ModalitySpec("i", "image", (1, 9, 9)), 6, width=4), (1, 9, 9)),
    "smallcnn-avgpool": (lambda: SmallCNNAvgPool(ModalitySpec("i", "image", (1, 9, 9)), 6, width=4), (1, 9, 9)),
    "basic block": (lambda: BasicBlock(2, 3, 2), (2, 6, 6)),
    "basic block identity": (lambda: BasicBlock(2, 2, 1), (2, 5, 5)),
}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_operators_reproduce_the_encoder_and_bound_it_on_random_points(name):
    torch.manual_seed(4)
    make, shape = ENCODERS[name]
    enc = make()
    for mod in enc.modules():  # non-trivial BatchNorm maps
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.uniform_(-2, 2), mod.bias.uniform_(-1, 1)
                mod.running_var.uniform_(0.1, 3), mod.running_mean.uniform_(-1, 1)
    enc = enc.eval()
    x = torch.randn(3, *shape)
    assert torch.allclose(run_forward(build_ops(enc, shape), x.double()), enc(x).double(), atol=1e-5)
    eb = EncoderBounds(enc, shape, "l2", "fast", 1)
    r = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    st = eb.propagate(x, r)
    d = torch.randn(200, *shape)
    d = d / d.flatten(1).norm(dim=1).view(-1, *[1] * len(shape))
    spec = torch.randn(3, 4, *st.z.shape[1:], dtype=torch.float64)
    lin, dual, ibp = eb.bound(x, r, spec)
    for i in range(3):
        with torch.no_grad():
            out = enc(x[i] + float(r[i]) * d * torch.rand(200, *[1] * len(shape))).double()
        assert (out >= st.lo[i] - 1e-5).all() and (out <= st.hi[i] + 1e-5).all()
        vals = out.flatten(1) @ spec[i].flatten(1).T  # (200, 4)
        assert (vals >= (lin[i] - r[i] * dual[i]) - 1e-5).all() and (vals >= ibp[i] - 1e-5).all()


def test_average_pooling_is_exact_where_max_pooling_ties_cost_a_constant():
    """At a radius so small that no ReLU is unstable, CROWN through average pooling is the first-order
    bound ``f(x) - r ||grad f||``; a max-pool window whose elements tie at the centre (a constant
    image) has no linear bound and pays a constant per window, many times the gradient's share."""
    torch.manual_seed(0)
    r, shape = 1e-6, (1, 8, 8)
    drops = {}
    for name, cls in (("avg", SmallCNNAvgPool), ("max", SmallCNN)):
        enc = cls(ModalitySpec("i", "image", shape), 5, width=4).eval()
        with torch.no_grad():
            for conv in (m for m in enc.modules() if isinstance(m, nn.Conv2d)):
                conv.bias.uniform_(0.5, 1.0)  # every ReLU active on a constant image
        x = torch.full((1, *shape), 0.3, dtype=torch.float64)
        spec = torch.randn(1, 1, 5, dtype=torch.float64)
        lin, dual, _ = EncoderBounds(enc, shape, "l2", "fast", 1).bound(x, torch.tensor([r]).double(), spec)
        xg = x.clone().requires_grad_(True)
        val = (enc.double()(xg) * spec[0]).sum()
        (grad,) = torch.autograd.grad(val, xg)
        drops[name] = float(val - (lin - r * dual)) / (r * float(grad.norm()))
    assert drops["avg"] == pytest.approx(1.0, abs=1e-3)  # exact to first order
    assert drops["max"] > 2  # the tie constants (3.6 here)


def test_an_unsupported_encoder_is_named_by_its_modality():
    meta = DatasetMeta(
        "v", [ModalitySpec("clip", "video", (2, 3, 8, 8)), ModalitySpec("x", "vector", (4,))], ["a", "b"]
    )
    model = build_model(meta, ModelConfig(feature_dim=8))
    with pytest.raises(ConfigError, match=r"video ResNet18 'encoders\.clip' \(frame folding\); use certifier='sound'"):
        crown_radii(
            model, meta, Split({"clip": torch.zeros(1, 2, 3, 8, 8), "x": torch.zeros(1, 4)}, torch.zeros(1).long())
        )


def test_unsupported_layers_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"'1' \(MaxPool2d\).*use certifier='sound'") as exc:
        build_ops(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(3, 2, 1)), (1, 8, 8))
    assert exc.value.param == "certifier"

    class Weird(nn.Module):  # a custom forward is traced: x * 2 is supported, x * x is not
        def forward(self, x):
            return x * 2 + x * x

    with pytest.raises(
        ConfigError,
        match=r"CROWN does not support node 'mul_1' \(call_function operator.mul\) "
        r"in Sequential.forward \(a product of two tensors\); use certifier='sound', or register a "
        r"rule for it with mmrobust.layer_rules.register_function\(operator.mul, crown=...\)$",
    ):
        build_ops(nn.Sequential(Weird()), (3,))

    class Leaf(nn.Module):  # an unregistered torch layer is a leaf of the trace: refused by name
        def forward(self, x):
            return x

    Leaf.__module__ = "torch.nn.modules.fake"
    with pytest.raises(
        ConfigError,
        match=r"CROWN does not support layer 'encoders.x.1' \(Leaf\); use certifier='sound', "
        r"or register a rule for it with mmrobust.layer_rules.register_layer\(Leaf, crown=...\)",
    ):
        build_ops(nn.Sequential(nn.Linear(3, 3), Leaf()), (3,), "encoders.x")


@pytest.mark.parametrize(
    "kw",
    [{"norm": "l1"}, {"steps": 0}, {"steps": 2.5}, {"start": -1.0}, {"start": float("nan")},
     {"intermediate": "full"}, {"chunk": True}, {"unimodal": "yes"}],
)  # fmt: skip
def test_options_are_validated(kw):
    with pytest.raises(ConfigError, match="crown: "):
        CrownOptions(**kw)


def test_registered_certifier_returns_a_sound_certificate():
    model, meta = _linear_model()
    x = {"a": torch.randn(5, 5), "b": torch.randn(5, 3)}
    split = Split(x, model(x).argmax(1))
    cert = CERTIFIERS.get("crown")(CrownOptions(steps=6)).certify(model, meta, split, CertifyContext())
    assert cert.guarantee is Guarantee.SOUND and cert.norm == "l2" and cert.radii.joint.shape == (5,)
    assert set(cert.radii.unimodal) == {"a", "b"} and cert.radii.correct.all()


def test_cli_certifies_with_crown_and_smoothing(tmp_path, capsys):
    import json

    from mmrobust.cli import main
    from mmrobust.training import train

    from .conftest import tiny_config

    out = tmp_path / "run"
    train(tiny_config(epochs=2), out=out)
    assert main(["certify", str(out), "--lipschitz", "crown", "--cert-opt", "steps=4", "--radii", "0,0.1"]) == 0
    assert main(["certify", str(out), "--lipschitz", "smoothing", "--cert-opt", "n=40", "--cert-opt", "n0=10"]) == 0
    assert main(["certify", str(out), "--lipschitz", "crown", "--cert-opt", "norm=l3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmrobust: error:") and "crown: unknown norm 'l3'" in err[-1]
    doc = json.loads((out / "certify.json").read_text())
    assert set(doc["certifiers"]) >= {"crown", "smoothing"}


def test_intermediate_crown_is_chunked_exactly_and_never_looser_than_interval_bounds():
    """Unstable-neuron rows processed a few at a time (small ``memory``) give the same bounds as all at
    once; full intermediate CROWN is never looser than interval/Lipschitz bounds (``fast``), and
    tightens them on a small CNN at a radius where many ReLUs are unstable."""
    from mmrobust.models.fusion import ModelConfig, build_model

    torch.manual_seed(0)
    meta = DatasetMeta(
        "cnn", [ModalitySpec("img", "image", (1, 8, 8)), ModalitySpec("seq", "sequence", (2, 8))], ["0", "1", "2"]
    )
    model = build_model(meta, ModelConfig(feature_dim=8)).eval()  # untrained: the bounds need no training
    x = {"img": torch.randn(6, 1, 8, 8), "seq": torch.randn(6, 2, 8)}
    with torch.no_grad():
        y = model(x).argmax(1)
    names = list(model.modalities)
    r = torch.full((6,), 0.3, dtype=torch.float64)
    one = ModelBounds(model, meta, CrownOptions(intermediate="crown", memory=2**17)).lower(x, y, r, names)
    big = ModelBounds(model, meta, CrownOptions(intermediate="crown", memory=2**26)).lower(x, y, r, names)
    fast = ModelBounds(model, meta, CrownOptions(intermediate="fast")).lower(x, y, r, names)
    mask = torch.isfinite(big)
    assert torch.allclose(one[mask], big[mask], rtol=1e-9, atol=1e-9)
    assert (big[mask] >= fast[mask] - 1e-9).all()
    assert (big[mask] > fast[mask] + 1e-6).any()
