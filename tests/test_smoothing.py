"""Randomized smoothing: Clopper-Pearson against scipy, radii against a closed-form p_A, abstention,
and the Gaussian-noise training method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmrobust.certify.base import CERTIFIERS, CertifyContext, Guarantee
from mmrobust.certify.smoothing import SmoothingOptions, clopper_pearson_lower, smoothing_radii
from mmrobust.data.base import DatasetMeta, ModalitySpec, Split
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import LateFusionModel
from mmrobust.models.heads import ConcatHead
from mmrobust.training.base import StepContext
from mmrobust.training.gaussian import GaussianAugmentation, GaussianOptions

from .conftest import tiny_config


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_clopper_pearson_matches_the_beta_quantile(n):
    stats = pytest.importorskip("scipy.stats")
    k = torch.tensor(sorted({0, 1, n // 3, n // 2, n - 1, n}))
    for alpha in (0.001, 0.05):
        ours = clopper_pearson_lower(k, n, alpha)
        ref = [stats.beta.ppf(alpha, int(i), n - int(i) + 1) if i > 0 else 0.0 for i in k]
        assert torch.allclose(ours, torch.tensor(ref, dtype=torch.float64), atol=1e-9)
        assert (ours <= torch.tensor(ref, dtype=torch.float64) + 1e-10).all()  # never meaningfully above


def _linear_two_class() -> tuple[LateFusionModel, DatasetMeta, dict[str, torch.Tensor]]:
    """logit_0 - logit_1 = w . x + b with known per-modality gradients w_m."""
    torch.manual_seed(0)
    meta = DatasetMeta("lin", [ModalitySpec("a", "vector", (3,)), ModalitySpec("b", "vector", (2,))], ["0", "1"])
    encs = {"a": nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), "b": nn.Sequential(nn.Flatten(), nn.Linear(2, 2))}
    model = LateFusionModel(encs, ConcatHead({"a": 2, "b": 2}, 2), 2).eval()
    grads = {}
    for m in ("a", "b"):
        w = model.head.modality_weight(m).detach() @ model.encoders[m][1].weight.detach()
        grads[m] = (w[0] - w[1]).double()
    return model, meta, grads


def test_radius_matches_the_closed_form_p_a_of_a_linear_model():
    model, meta, grads = _linear_two_class()
    x = {"a": torch.randn(6, 3) * 2, "b": torch.randn(6, 2) * 2}
    with torch.no_grad():
        logits = model(x).double()
    y = logits.argmax(1)
    gap = (logits[:, 0] - logits[:, 1]).abs()
    sigma = 0.5
    opts = SmoothingOptions(sigma=sigma, n0=50, n=20000, alpha=0.001, batch=20000, seed=1)
    rad = smoothing_radii(model, meta, Split(x, y), opts)
    wnorm = torch.cat(list(grads.values())).norm()
    exact = {"joint": gap / wnorm, **{m: gap / g.norm() for m, g in grads.items()}}  # sigma * Phi^-1(p_A)
    for threat, r in {"joint": rad.joint, **rad.unimodal}.items():
        p_a = torch.special.ndtr(exact[threat] / sigma)
        ok = p_a < 0.999  # where p_A is not saturated the estimate is informative
        assert (r <= exact[threat] + 1e-9).all(), threat  # holds except with probability alpha per sample
        slack = sigma * torch.special.ndtri((p_a - 0.01).clamp_min(0.5))
        assert (r[ok] >= slack[ok] - 1e-9).all(), threat  # and it is close to the truth with n = 20000


def test_abstains_on_the_decision_boundary():
    model, meta, grads = _linear_two_class()
    # move a point onto the boundary along the joint gradient direction
    x = {"a": torch.randn(1, 3), "b": torch.randn(1, 2)}
    with torch.no_grad():
        gap = float((model(x)[0, 0] - model(x)[0, 1]).double())
    w = torch.cat(list(grads.values()))
    step = gap / float(w.norm() ** 2) * w
    x = {"a": (x["a"].double() - step[:3]).float(), "b": (x["b"].double() - step[3:]).float()}
    rad = smoothing_radii(model, meta, Split(x, torch.tensor([0])), SmoothingOptions(n=2000, n0=50, unimodal=False))
    assert float(rad.joint[0]) == 0.0 and not bool(rad.correct[0])


def test_registered_certifier_is_probabilistic_with_alpha():
    model, meta, _ = _linear_two_class()
    x = {"a": torch.randn(4, 3) * 3, "b": torch.randn(4, 2) * 3}
    split = Split(x, model(x).argmax(1))
    cert = CERTIFIERS.get("smoothing")(SmoothingOptions(n=200, n0=20, alpha=0.01)).certify(
        model, meta, split, CertifyContext()
    )
    assert cert.guarantee is Guarantee.PROBABILISTIC and cert.alpha == 0.01 and cert.norm == "l2"
    assert set(cert.radii.unimodal) == {"a", "b"} and cert.info["sigma"] == 0.25


@pytest.mark.parametrize(
    "kw", [{"sigma": 0.0}, {"sigma": math.inf}, {"n": 0}, {"n0": 1.5}, {"alpha": 0.5}, {"alpha": 0}, {"batch": True}]
)
def test_options_are_validated(kw):
    with pytest.raises(ConfigError, match="smoothing: "):
        SmoothingOptions(**kw)


def test_gaussian_training_adds_noise_and_trains(tmp_path, tiny_bundle):
    from mmrobust.training import METHODS, train

    assert METHODS.get("gaussian") is GaussianAugmentation
    with pytest.raises(ConfigError, match="sigma"):
        GaussianOptions(sigma=-1.0)
    model, meta, _ = _linear_two_class()
    x = {"a": torch.randn(64, 3) * 3, "b": torch.randn(64, 2) * 3}
    y = model(x).argmax(1)
    ctx = StepContext(0, 0, torch.Generator().manual_seed(0))
    quiet = GaussianAugmentation(GaussianOptions(sigma=1e-6), meta).loss(model, x, y, ctx)[1]
    loud = GaussianAugmentation(GaussianOptions(sigma=100.0), meta).loss(model, x, y, ctx)[1]
    assert (quiet.argmax(1) == y).float().mean() > 0.99 and (loud.argmax(1) == y).float().mean() < 0.8
    cfg = tiny_config("gaussian", epochs=2)
    cfg.train.method_options = {"sigma": "0.3"}
    result = train(cfg, out=tmp_path / "g")
    assert result is not None and (tmp_path / "g" / "model.safetensors").is_file()
