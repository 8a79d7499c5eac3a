"""1-Lipschitz layers and encoders: checked by power iteration on their Jacobians."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jvp, vjp

from mmrobust.certify.crown_encoder import EncoderBounds
from mmrobust.certify.crown_layers import build_ops
from mmrobust.certify.crown_ops import run_forward
from mmrobust.certify.estimators import head_lipschitz
from mmrobust.certify.sound import chain_units, sound_lipschitz
from mmrobust.config import RunConfig
from mmrobust.data.base import DatasetMeta, ModalitySpec
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.models.lipschitz import AOLConv1d, AOLConv2d, AOLLinear, LipschitzCNN, LipschitzMLP, LipschitzTCN, MaxMin

from .conftest import tiny_config


def jacobian_norm(fn, x: torch.Tensor, iters: int = 60) -> float:
    """Largest singular value of the Jacobian of ``fn`` at ``x`` (power iteration on ``J^T J``)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    est = 0.0
    for _ in range(iters):
        v = v / v.norm()
        _, u = jvp(fn, (x,), (v,))
        _, back = vjp(fn, x)
        (w,) = back(u)
        est, v = float(w.norm()) ** 0.5, w
    return est


LAYERS = {
    "aol linear": (lambda: AOLLinear(12, 7), (12,)),
    "aol linear wide": (lambda: AOLLinear(5, 20), (5,)),
    "aol conv1d": (lambda: AOLConv1d(3, 4, 5, padding=2), (3, 16)),
    "aol conv1d stride": (lambda: AOLConv1d(3, 6, 5, stride=2, padding=2), (3, 15)),
    "aol conv2d": (lambda: AOLConv2d(2, 4, 3, padding=1), (2, 9, 9)),
    "aol conv2d stride": (lambda: AOLConv2d(2, 4, 3, stride=2, padding=1), (2, 10, 10)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_aol_layers_are_one_lipschitz_and_not_trivially_so(name):
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = make().double()
    with torch.no_grad():
        layer.weight.mul_(10)  # the raw weight is far from 1-Lipschitz: the rescaling does the work
    x = torch.randn(1, *shape, dtype=torch.float64)
    norm = jacobian_norm(layer, x)
    assert norm <= 1 + 1e-6
    assert norm > 0.3  # AOL is tight-ish, not a collapse to zero
    raw = jacobian_norm(lambda t: layer.forward.__func__(_Raw(layer), t), x)
    assert raw > 1.5


class _Raw(nn.Module):
    """The same layer with the raw (unrescaled) weight, to show the rescaling matters."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        for attr in ("stride", "padding", "dims"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def rescaled(self) -> torch.Tensor:
        return self.weight


def test_maxmin_preserves_gradient_norm():
    x = torch.randn(3, 8, dtype=torch.float64)
    act = MaxMin()
    assert jacobian_norm(act, x[:1]) == pytest.approx(1.0, abs=1e-9)
    d = torch.randn_like(x) * 0.1
    assert float(((act(x + d) - act(x)).norm(dim=1) / d.norm(dim=1)).max()) <= 1 + 1e-12
    assert torch.equal(act(torch.tensor([[1.0, 5.0, 3.0, 2.0]])), torch.tensor([[3.0, 5.0, 1.0, 2.0]]))


ENCODERS = {
    "lip-mlp": (LipschitzMLP, ModalitySpec("v", "vector", (9,))),
    "lip-tcn": (LipschitzTCN, ModalitySpec("a", "sequence", (3, 11))),
    "lip-cnn": (LipschitzCNN, ModalitySpec("i", "image", (1, 10, 10))),
}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoders_are_one_lipschitz_and_the_sound_bound_uses_the_exact_constant(name):
    torch.manual_seed(1)
    cls, spec = ENCODERS[name]
    enc = cls(spec, 6, 8).double().eval()
    for p in enc.parameters():
        with torch.no_grad():
            p.mul_(5)
    worst = max(jacobian_norm(enc, torch.randn(1, *spec.shape, dtype=torch.float64) * 3) for _ in range(3))
    assert worst <= 1 + 1e-6
    units = chain_units(enc, spec.shape)
    assert all(u.lip <= 1 + 1e-4 for u in units)  # every layer's constant is 1 (not a spectral estimate)
    assert sound_lipschitz(enc, spec.shape) <= 1 + 1e-4
    # CROWN handles them too (AOL layers as affine maps, MaxMin by its own relaxation)
    x = torch.randn(2, *spec.shape, dtype=torch.float64)
    assert torch.allclose(run_forward(build_ops(enc, spec.shape), x), enc(x), atol=1e-10)
    eb = EncoderBounds(enc, spec.shape, "l2", "fast", 1)
    r = torch.tensor([0.2, 1.0], dtype=torch.float64)
    spec_rows = torch.randn(2, 3, 6, dtype=torch.float64)
    lin, dual, _ = eb.bound(x, r, spec_rows)
    d = torch.randn(300, *spec.shape, dtype=torch.float64)
    d = d / d.flatten(1).norm(dim=1).view(-1, *[1] * len(spec.shape))
    for i in range(2):
        with torch.no_grad():
            vals = enc(x[i] + r[i] * d) @ spec_rows[i].T
        assert (vals >= lin[i] - r[i] * dual[i] - 1e-9).all()


def _meta(kinds: dict[str, tuple[str, tuple[int, ...]]]) -> DatasetMeta:
    return DatasetMeta("m", [ModalitySpec(n, k, s) for n, (k, s) in kinds.items()], ["0", "1", "2"])


def test_model_config_picks_lipschitz_encoders_and_validates():
    meta = _meta({"a": ("sequence", (3, 8)), "i": ("image", (1, 8, 8)), "v": ("vector", (4,))})
    model = build_model(meta, ModelConfig(feature_dim=8, lipschitz_encoders=True))
    assert [type(e).__name__ for e in model.encoders.values()] == ["LipschitzTCN", "LipschitzCNN", "LipschitzMLP"]
    plain = build_model(meta, ModelConfig(feature_dim=8))
    assert type(plain.encoders["v"]).__name__ == "MLPEncoder"
    with pytest.raises(ConfigError, match="model.lipschitz_encoders' expects bool"):
        ModelConfig(lipschitz_encoders="yes")  # type: ignore[arg-type]
    video = _meta({"a": ("sequence", (3, 8)), "vid": ("video", (2, 1, 8, 8))})
    with pytest.raises(ConfigError, match="no 1-Lipschitz encoder for modality 'vid'"):
        build_model(video, ModelConfig(lipschitz_encoders=True))
    cfg = RunConfig.from_dict({"model": {"lipschitz_encoders": True}})
    assert cfg.model.lipschitz_encoders is True


@pytest.mark.parametrize("method", ["jt", "crmt-jt"])
def test_every_method_trains_lipschitz_encoders_and_the_sound_tau_is_at_most_one(tmp_path, method):
    from mmrobust.runs import load_run
    from mmrobust.training import train

    cfg = tiny_config(method, epochs=2)
    cfg.model.lipschitz_encoders = True
    train(cfg, out=tmp_path / method)
    run = load_run(tmp_path / method)
    assert all(type(e).__name__ == "LipschitzMLP" for e in run.model.encoders.values())
    hl = head_lipschitz(run.model, run.meta, "sound")
    if method == "crmt-jt":  # Theorem 3.5: the rows of W~ are unit vectors, so tau~ <= Lip(phi) <= 1
        assert all(float(t.max()) <= 1 + 1e-4 for t in hl.tau.values())
