"""Bounds follow the traced graph of an encoder: a custom ``forward`` over functional calls, sums and
concatenations is bounded soundly by both ``sound`` and ``crown``; unknown operations are refused
by name; the zoo's radii are exactly those of the child-by-child walk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.certify import graph as graph_mod
from mmrobust.certify.crown import CrownOptions, crown_radii
from mmrobust.certify.crown_encoder import EncoderBounds
from mmrobust.certify.crown_layers import build_ops
from mmrobust.certify.crown_ops import GraphOp, run_forward
from mmrobust.certify.runner import certify_model
from mmrobust.certify.sound import chain_units, sound_lipschitz
from mmrobust.certify.soundness import soundness_check
from mmrobust.data.base import DatasetMeta, ModalitySpec, Split
from mmrobust.errors import ConfigError
from mmrobust.layer_rules import FUNCTION_RULES, Unit, register_function
from mmrobust.models.encoders import BasicBlock, MLPEncoder, SmallCNN, SmallCNNAvgPool, TemporalCNN
from mmrobust.models.fusion import LateFusionModel
from mmrobust.models.heads import ConcatHead
from mmrobust.models.lipschitz import LipschitzCNN, LipschitzMLP, LipschitzTCN


class GeluNet(nn.Module):
    """Conv -> GELU -> residual conv (+) -> functional avg pool -> flatten -> Linear."""

    def __init__(self, feat: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.res = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, feat)
        self.out_dim = feat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.conv(x))
        h = h + 0.5 * self.res(h)
        h = F.avg_pool2d(h, 2)
        return self.fc(torch.flatten(h, 1))


class Mixed(nn.Module):
    """Every kind of node: tanh, silu, softplus, hardswish, leaky, elu, a difference, a concatenation,
    scaling by constants and a parameter, a mean, view(x.size(0), -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(16, 5)
        self.shift = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x)) - self.shift
        g = F.silu(self.b(h)) - h
        z = torch.cat([F.softplus(g), F.hardswish(h) * 2.0], dim=1)
        z = F.elu(F.leaky_relu(z, 0.1), 0.7).view(z.size(0), -1)
        return self.c(z).unsqueeze(2).mean(dim=2).sigmoid()


CASES = {"gelu-net": (GeluNet, (1, 8, 8)), "mixed": (Mixed, (6,))}


@pytest.mark.parametrize("name", list(CASES))
def test_custom_forward_is_reproduced_and_bounded_soundly(name):
    torch.manual_seed(1)
    make, shape = CASES[name]
    enc = make().eval()
    x = torch.randn(3, *shape)
    ops = build_ops(enc, shape, "encoders.m")
    assert any(isinstance(op, GraphOp) for op in ops)  # the sums/concatenations are regions
    assert torch.allclose(run_forward(ops, x.double()), enc(x).double(), atol=1e-5)
    # the sound bound dominates gradient norms at random points
    lip = sound_lipschitz(enc, shape)
    xs = torch.randn(64, *shape, requires_grad=True)
    out = enc(xs)
    for k in range(out.shape[1]):
        (g,) = torch.autograd.grad(out[:, k].sum(), xs, retain_graph=True)
        assert float(g.flatten(1).norm(dim=1).max()) <= lip * (1 + 1e-5)
    r = torch.tensor([0.05, 0.5, 2.0], dtype=torch.float64)
    for inter in ("fast", "crown"):
        eb = EncoderBounds(enc, shape, "l2", inter, 10**9)
        st = eb.propagate(x, r)
        spec = torch.randn(3, 4, *st.z.shape[1:], dtype=torch.float64)
        lin, dual, ibp = eb.bound(x, r, spec)
        d = torch.randn(3000, *shape)
        d = d / d.flatten(1).norm(dim=1).view(-1, *[1] * len(shape))
        for i in range(3):
            with torch.no_grad():
                pts = x[i] + float(r[i]) * d * torch.rand(3000, *[1] * len(shape)) ** (1 / d[0].numel())
                out = enc(pts).double()
            assert (out >= st.lo[i] - 1e-5).all() and (out <= st.hi[i] + 1e-5).all()
            vals = out.flatten(1) @ spec[i].flatten(1).T
            assert (vals >= lin[i] - r[i] * dual[i] - 1e-5).all() and (vals >= ibp[i] - 1e-5).all()


def test_functional_and_module_forms_give_the_same_bounds():
    torch.manual_seed(0)

    class Functional(nn.Module):
        def __init__(self, seq: nn.Sequential) -> None:
            super().__init__()
            self.seq = seq

        def forward(self, x):
            return F.silu(self.seq[2](F.gelu(self.seq[0](x))))

    seq = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3), nn.SiLU()).eval()
    x, r = torch.randn(2, 4), torch.tensor([0.3, 1.0], dtype=torch.float64)
    spec = torch.randn(2, 2, 3, dtype=torch.float64)
    a = EncoderBounds(seq, (4,), "l2", "crown", 10**9).bound(x, r, spec)
    b = EncoderBounds(Functional(seq).eval(), (4,), "l2", "crown", 10**9).bound(x, r, spec)
    for u, v in zip(a, b, strict=True):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)
    assert sound_lipschitz(seq, (4,)) == sound_lipschitz(Functional(seq), (4,))


def test_unknown_operations_are_refused_by_name_and_a_function_rule_admits_them():
    class Sin(nn.Module):
        def forward(self, x):
            return self.lin(x).sin()

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

    enc = Sin()
    with pytest.raises(ConfigError, match=r"^the sound Lipschitz bound does not support encoders\.img: node 'sin' "
                       r"\(call_method sin\) in Sin\.forward; use certifier='empirical', or register a rule for it "
                       r"with mmrobust\.layer_rules\.register_function\('sin', lipschitz=\.\.\.\)$") as exc:  # fmt: skip
        chain_units(enc, (3,), "encoders.img")
    assert exc.value.param == "certifier"
    with pytest.raises(ConfigError, match=r"^CROWN does not support encoders\.img: node 'sin'"):
        build_ops(enc, (3,), "encoders.img")

    def sin_units(name, call, in_shape):
        return [Unit(name, "other", 1.0, in_shape, in_shape, call)]

    register_function("sin", lipschitz=sin_units)
    try:
        units = chain_units(enc, (3,))
        assert units[-1].lip == 1.0 and units[-1].name == "sin"
        with pytest.raises(ConfigError, match=r"CROWN does not support node 'sin'.*register_function\('sin', crown"):
            build_ops(enc, (3,))
    finally:
        FUNCTION_RULES.pop("sin")


@pytest.mark.parametrize(
    "forward,why",
    [(lambda x: x * x, "a product of two tensors"), (lambda x: x.mean(0, keepdim=True).expand_as(x), ""),
     (lambda x: x + x.mean(dim=0), "batch"), (lambda x: x.sum(), "")],
)  # fmt: skip
def test_operations_across_the_batch_or_between_tensors_are_refused(forward, why):
    class Enc(nn.Module):
        def forward(self, x):
            return forward(x)

    with pytest.raises(ConfigError, match=why):
        chain_units(Enc(), (3,))
    with pytest.raises(ConfigError):
        build_ops(Enc(), (3,))


def test_data_dependent_control_flow_is_refused_in_one_line_and_a_sequential_falls_back(monkeypatch):
    class Flow(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ConfigError, match=r"^CROWN cannot trace 'encoders.a' \(Flow\) with torch.fx \(.*\); use "
                       r"certifier='sound'"):  # fmt: skip
        build_ops(Flow(), (3,), "encoders.a")
    # a Sequential that cannot be traced is walked child by child: the same units
    seq = MLPEncoder(ModalitySpec("v", "vector", (5,)), 4, hidden=6).eval()
    traced = chain_units(seq, (5,))
    monkeypatch.setattr(graph_mod._Tracer, "trace", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    walked = chain_units(seq, (5,))
    assert [(u.name, u.kind, u.lip) for u in traced] == [(u.name, u.kind, u.lip) for u in walked]


ZOO = {
    "mlp": (lambda: MLPEncoder(ModalitySpec("v", "vector", (7,)), 5, hidden=9), (7,)),
    "tcn": (lambda: TemporalCNN(ModalitySpec("a", "sequence", (3, 12)), 6, width=4), (3, 12)),
    "smallcnn": (lambda: SmallCNN(ModalitySpec("i", "image", (1, 9, 9)), 6, width=4), (1, 9, 9)),
    "smallcnn-avgpool": (lambda: SmallCNNAvgPool(ModalitySpec("i", "image", (1, 9, 9)), 6, width=4), (1, 9, 9)),
    "lip-mlp": (lambda: LipschitzMLP(ModalitySpec("v", "vector", (7,)), 5, hidden=8), (7,)),
    "lip-tcn": (lambda: LipschitzTCN(ModalitySpec("a", "sequence", (3, 12)), 6, width=4), (3, 12)),
    "lip-cnn": (lambda: LipschitzCNN(ModalitySpec("i", "image", (1, 8, 8)), 6, width=4), (1, 8, 8)),
    "basic block": (lambda: nn.Sequential(BasicBlock(2, 3, 2), nn.Flatten()), (2, 6, 6)),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_radii_equal_those_of_the_child_by_child_walk(name, monkeypatch):
    """The traced graph of every zoo encoder is the chain the Sequential walk gave: the same units,
    hence the same sound and CROWN radii (a before/after check without the old code)."""
    torch.manual_seed(2)
    make, shape = ZOO[name]
    enc = make()
    for mod in enc.modules():
        if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 2), mod.running_var.uniform_(0.2, 2), mod.running_mean.uniform_(-1, 1)
    feat = enc(torch.zeros(1, *shape)).shape[1] if not hasattr(enc, "out_dim") else enc.out_dim
    kind = {1: "vector", 2: "sequence", 3: "image"}[len(shape)]
    meta = DatasetMeta("z", [ModalitySpec("m", kind, shape), ModalitySpec("w", "vector", (3,))], ["0", "1", "2"])
    encs = {"m": enc, "w": nn.Sequential(nn.Flatten(), nn.Linear(3, 2), nn.ReLU())}
    model = LateFusionModel(encs, ConcatHead({"m": feat, "w": 2}, 3), 3).eval()
    x = {"m": torch.randn(6, *shape), "w": torch.randn(6, 3)}
    with torch.no_grad():
        split = Split(x, model(x).argmax(1))
    opts = CrownOptions(steps=8, unimodal=False, intermediate="crown")

    def radii():
        s = certify_model(model, meta, split, "sound", radii=[0.0]).certificate.radii.joint
        return s, crown_radii(model, meta, split, opts).joint

    graph_sound, graph_crown = radii()
    monkeypatch.setattr(graph_mod, "trace_graph", lambda *a, **k: None)
    monkeypatch.setattr("mmrobust.certify.sound.trace_graph", lambda *a, **k: None)
    monkeypatch.setattr("mmrobust.certify.crown_layers.trace_graph", lambda *a, **k: None)
    walk_sound, walk_crown = radii()
    assert torch.equal(graph_sound, walk_sound)
    assert torch.equal(graph_crown, walk_crown)


def _gelu_model(seed: int) -> tuple[LateFusionModel, DatasetMeta]:
    torch.manual_seed(seed)
    meta = DatasetMeta("g", [ModalitySpec("img", "image", (1, 8, 8)), ModalitySpec("vec", "vector", (5,))],
                       ["0", "1", "2"])  # fmt: skip
    encs = {"img": GeluNet(6), "vec": MLPEncoder(meta.spec("vec"), 4, hidden=8)}
    return LateFusionModel(encs, ConcatHead({"img": 6, "vec": 4}, 3), 3).eval(), meta


def test_custom_gelu_encoder_end_to_end_sound_and_crown_survive_pgd():
    model, meta = _gelu_model(0)
    gen = torch.Generator().manual_seed(0)
    x = {"img": torch.randn(24, 1, 8, 8, generator=gen), "vec": torch.randn(24, 5, generator=gen)}
    with torch.no_grad():
        split = Split(x, model(x).argmax(1))
    sound = certify_model(model, meta, split, "sound", radii=[0.0, 0.05, 0.1])
    crown = certify_model(model, meta, split, "crown", split, [0.0, 0.05, 0.1], options={"steps": 10})
    rs, rc = sound.certificate.radii, crown.certificate.radii
    assert (rs.joint > 0).all() and (rc.joint >= rs.joint * (1 - 1e-6)).all()
    assert float((rc.joint / rs.joint).median()) > 1.2  # CROWN is tighter than the Lipschitz product
    for r in (rs, rc):
        check = soundness_check(model, meta, split, {"joint": r.joint, "unimodal": r.unimodal}, steps=100,
                                restarts=2)  # fmt: skip
        for threat in ("joint", "img", "vec"):
            assert check[threat]["checked"] > 0 and check[threat]["violations"] == 0, (threat, check[threat])
