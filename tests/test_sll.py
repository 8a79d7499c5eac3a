"""SLL layers, the sll-* encoders and Lipschitz-margin training (lmt).

1-Lipschitzness is checked by power iteration on Jacobians and by random pairs; the certifiers'
acceptance by running them on tiny trained models and attacking inside the certified balls.
"""

from __future__ import annotations

import pytest
import torch

from mmrobust.certify.crown_layers import build_ops
from mmrobust.certify.crown_ops import run_forward
from mmrobust.certify.runner import certify_model, standardised_view
from mmrobust.certify.sound import sound_lipschitz
from mmrobust.certify.soundness import soundness_check
from mmrobust.data.base import ModalitySpec
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig
from mmrobust.models.lipschitz import SLLCNN, SLLMLP, SLLTCN, SLLConv1d, SLLConv2d, SLLLinear, abs_gram
from mmrobust.training.base import METHODS
from mmrobust.training.lipmargin import LMTOptions, margin_logits, pair_lipschitz

from .conftest import tiny_config
from .test_lipschitz_layers import jacobian_norm

LAYERS = {
    "sll linear": (lambda: SLLLinear(10, 14), (10,)),
    "sll linear narrow": (lambda: SLLLinear(10, 4), (10,)),
    "sll conv1d": (lambda: SLLConv1d(4, 3, hidden=6), (4, 11)),
    "sll conv2d": (lambda: SLLConv2d(3, 3), (3, 6, 7)),
    "sll conv2d k5": (lambda: SLLConv2d(2, 5, hidden=3), (2, 5, 5)),
}


def _spiky(layer: torch.nn.Module) -> torch.nn.Module:
    """A layer whose raw weight is far from a contraction, with unequal q (the rescaling must work)."""
    layer = layer.double()
    with torch.no_grad():
        layer.weight.mul_(5)
        layer.log_q.copy_(torch.randn(layer.log_q.shape, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("name", list(LAYERS))
def test_sll_layers_are_one_lipschitz_by_power_iteration_and_pairs(name):
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = _spiky(make())
    worst = 0.0
    for seed in range(2):
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        worst = max(worst, jacobian_norm(layer, x))
    assert worst <= 1 + 1e-9
    assert worst > 0.5  # not a collapse to a constant
    x, y = torch.randn(200, *shape, dtype=torch.float64), torch.randn(200, *shape, dtype=torch.float64)
    ratio = (layer(x) - layer(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= 1 + 1e-9
    # without T (t = 1) the same residual map expands: the scaling is what makes it 1-Lipschitz
    raw = type(layer).scale
    try:
        type(layer).scale = lambda self: torch.ones_like(self.log_q)  # type: ignore[method-assign]
        assert jacobian_norm(layer, x[:1]) > 1.5
    finally:
        type(layer).scale = raw  # type: ignore[method-assign]


def test_abs_gram_of_a_convolution_is_the_operator_gram_on_a_long_signal():
    torch.manual_seed(0)
    w = torch.randn(3, 2, 3, dtype=torch.float64)
    n = 40
    # the convolution's matrix on a long signal (zero padding), rows (hidden, position)
    eye = torch.eye(2 * n, dtype=torch.float64).view(2 * n, 2, n)
    mat = torch.nn.functional.conv1d(eye, w, padding=1).reshape(2 * n, 3 * n).T  # (3n, 2n)
    gram = (mat @ mat.T).view(3, n, 3, n)[:, n // 2]  # an interior position: all shifts present
    assert torch.allclose(gram.abs().sum(2), abs_gram(w), atol=1e-10)


SPECS = {
    "sll-mlp": (SLLMLP, ModalitySpec("v", "vector", (12,)), {"hidden": 16, "depth": 2}),
    "sll-tcn": (SLLTCN, ModalitySpec("s", "sequence", (3, 9)), {"width": 4, "depth": 1, "dense": 16}),
    "sll-cnn": (SLLCNN, ModalitySpec("i", "image", (1, 8, 8)), {"width": 4, "depth": 1, "dense": 16}),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_sll_encoders_are_one_lipschitz_and_certifiers_accept_them(name):
    torch.manual_seed(0)
    cls, spec, kw = SPECS[name]
    enc = cls(spec, feature_dim=10, **kw).double().eval()
    for mod in enc.modules():
        if hasattr(mod, "log_q"):
            _spiky(mod)
    x = torch.randn(2, *spec.shape, dtype=torch.float64)
    assert jacobian_norm(enc, x[:1]) <= 1 + 1e-6
    assert sound_lipschitz(enc, spec.shape) <= 1 + 1e-3
    ops = build_ops(enc, spec.shape)
    assert torch.allclose(run_forward(ops, x), enc(x), atol=1e-9)  # CROWN's ops compute the encoder
    if name != "sll-mlp":  # the MLP flattens any shape
        with pytest.raises(ConfigError, match="needs"):
            cls(ModalitySpec("w", "video", (2, 1, 8, 8)), feature_dim=10)


def test_sll_conv_refuses_even_kernels():
    with pytest.raises(ConfigError, match="odd"):
        SLLConv2d(2, 4)


def test_margin_logits_offset_every_other_class_by_the_pair_constant():
    a = {"x": torch.tensor([1.0, 2.0, 0.5]), "y": torch.tensor([0.0, 1.0, 1.0])}
    lip = pair_lipschitz(a)
    # brute force: ||a_y W_y - a_k W_k|| over both modalities with orthonormal rows W
    sq = {k: sum(float(v[k]) ** 2 for v in a.values()) for k in range(3)}
    for y in range(3):
        for k in range(3):
            assert float(lip[y, k]) == pytest.approx((sq[y] + sq[k]) ** 0.5, rel=1e-6)
    logits = torch.zeros(2, 3)
    out = margin_logits(logits, torch.tensor([0, 2]), lip, 0.5)
    assert float(out[0, 0]) == 0 and float(out[1, 2]) == 0
    assert float(out[0, 1]) == pytest.approx(0.5 * float(lip[0, 1]))
    assert float(out[1, 0]) == pytest.approx(0.5 * float(lip[2, 0]))


def test_lmt_options_and_ramp():
    with pytest.raises(ConfigError, match="margin_eps"):
        LMTOptions(margin_eps=-1.0)
    cls = METHODS.get("lmt")
    strat = cls(LMTOptions(margin_eps=2.0, margin_ramp=4), None)  # type: ignore[arg-type]
    assert [strat.eps_at(e) for e in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]


def test_lmt_with_sll_encoders_trains_and_both_certifiers_are_sound(tmp_path):
    from mmrobust.runs import load_run
    from mmrobust.training import train

    cfg = tiny_config("lmt", epochs=3)
    cfg.model = ModelConfig(feature_dim=16, encoders={"strong": "sll-mlp", "weak": "sll-mlp"})
    cfg.train.method_options = {"margin_eps": 0.5, "step2_epochs": 0}
    train(cfg, out=tmp_path / "lmt")
    run = load_run(tmp_path / "lmt")
    assert all(isinstance(e, SLLMLP) for e in run.model.encoders.values())
    split = run.data().test.subset(slice(0, 40))
    radii = {}
    for name in ("sound", "crown"):
        opts = {"steps": 6, "unimodal": False} if name == "crown" else {}
        cert = certify_model(run.model, run.meta, split, name, options=opts).certificate
        radii[name] = cert.radii.joint.double()
    assert float((radii["crown"] > 0).double().mean()) > 0.5  # certificates exist
    # CROWN starts from the Lipschitz radius of the orthogonal head, never below the sound one
    assert bool((radii["crown"] >= radii["sound"] * (1 - 1e-6)).all())
    zeros = {m: torch.zeros(40) for m in run.model.modalities}
    # attacked in the coordinates the radii measure (the model's standardised inputs)
    with standardised_view(run.model, run.meta, split, None) as (meta_v, split_v, *_):
        check = soundness_check(run.model, meta_v, split_v, {"joint": radii["crown"], "unimodal": zeros}, steps=20)
    assert check["joint"]["checked"] > 10 and check["joint"]["violations"] == 0
