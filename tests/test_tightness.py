"""Tightness: attack radii by bisection over eps, ratios certified / attack radius, violations."""

from __future__ import annotations

import pytest
import torch

from mmrobust.certify.crown import CrownOptions, crown_radii
from mmrobust.certify.runner import certify_model
from mmrobust.certify.tightness import TightnessOptions, tightness
from mmrobust.data.base import Split
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig, build_model

from .test_certify import _fit, _linear_model, _trained, small_cnn_data

FAST = TightnessOptions(samples=12, steps=15, search_rounds=6, bisect_rounds=5)


def test_attack_radius_matches_the_exact_distance_on_a_linear_model_and_flags_inflated_radii():
    model, meta = _linear_model()
    x = {"a": torch.randn(16, 5), "b": torch.randn(16, 3)}
    split = Split(x, model(x).argmax(1))
    exact = crown_radii(model, meta, split, CrownOptions(steps=40))  # exact on a linear model (test_crown)
    res = tightness(model, split, exact.joint, "joint", FAST)
    assert res.violations == 0 and res.indices.numel() == 12
    assert 0.9 <= res.median_ratio <= 1.0 + 1e-6  # the attacks get within 10% of the boundary
    assert (res.ratio <= 1 + 1e-6).all()
    inflated = tightness(model, split, exact.joint * 1.5, "joint", FAST)
    assert inflated.violations >= 10  # a certificate 1.5x the true distance is refuted
    uni = tightness(model, split, exact.unimodal["b"], "b", FAST)
    assert uni.violations == 0 and uni.median_ratio is not None and uni.median_ratio >= 0.9


def _small_cnn() -> tuple:
    meta, split = small_cnn_data(60)
    return _fit(build_model(meta, ModelConfig(feature_dim=8)), split, epochs=40), meta, split.subset(slice(0, 10))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sound_certifiers_never_exceed_the_attack_radius(tiny_bundle, kind):
    if kind == "mlp":
        model, meta, test = _trained("concat", tiny_bundle), tiny_bundle.meta, tiny_bundle.test.subset(slice(0, 10))
        crown = crown_radii(model, meta, test, CrownOptions(steps=10))
    else:
        model, meta, test = _small_cnn()
        crown = crown_radii(model, meta, test, CrownOptions(steps=6, intermediate="fast"))
    sound = certify_model(model, meta, test, "sound").certificate.radii
    opts = TightnessOptions(samples=10, steps=15, search_rounds=6, bisect_rounds=3)
    for threat in ["joint", *model.modalities]:
        res = tightness(model, test, crown.joint if threat == "joint" else crown.unimodal[threat], threat, opts)
        assert res.violations == 0, (kind, threat)
        assert res.median_ratio is not None and res.median_ratio > 0, (kind, threat)
        snd = (sound.joint if threat == "joint" else sound.unimodal[threat]).double()
        assert (snd[res.indices] <= res.attack_radius).all(), (kind, threat)  # the same attack radii


@pytest.mark.parametrize("kw", [{"samples": 0}, {"steps": 1.5}, {"attacks": ("fgsm",)}, {"attacks": ()}, {"start": 0}])
def test_options_are_validated(kw):
    with pytest.raises(ConfigError, match="tightness: "):
        TightnessOptions(**kw)


def test_bad_threat_or_length_is_a_clear_error():
    model, meta = _linear_model()
    x = {"a": torch.randn(4, 5), "b": torch.randn(4, 3)}
    split = Split(x, model(x).argmax(1))
    with pytest.raises(ConfigError, match="unknown threat 'c'"):
        tightness(model, split, torch.ones(4), "c", FAST)
    with pytest.raises(ConfigError, match="3 certified radii for a split of 4"):
        tightness(model, split, torch.ones(3), "joint", FAST)


def test_cli_certify_tightness_writes_ratios(tiny_run, tmp_path, capsys):
    import json
    import shutil

    from mmrobust.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["certify", str(run), "--lipschitz", "sound", "--tightness", "4"]) == 0
    t = json.loads((run / "certify.json").read_text())["certifiers"]["sound"]["tightness"]
    assert t["samples"] == 4 and t["violations"] == 0 and t["threat"] == "joint"
    assert all(0 <= c <= a for c, a in zip(t["certified"], t["attack_radius"], strict=True))
    assert "median certified / smallest attack radius" in " ".join(capsys.readouterr().out.split())
    assert main(["certify", str(run), "--tightness", "-1"]) == 2


def test_robust_at_a_fixed_eps_matches_the_exact_distance_on_a_linear_model():
    from mmrobust.certify.tightness import robust_at

    model, meta = _linear_model()
    x = {"a": torch.randn(16, 5), "b": torch.randn(16, 3)}
    labels = model(x).argmax(1)
    dist = crown_radii(model, meta, Split(x, labels), CrownOptions(steps=40)).joint  # exact here
    eps = float(dist.median())
    ok = robust_at(model, x, labels, eps, ["a", "b"], FAST)
    assert (ok[dist < 0.9 * eps] == 0).all() and (ok[dist > 1.1 * eps] == 1).all()
    assert 0 < int(ok.sum()) < 16
    wrong = labels.clone()
    wrong[0] = (wrong[0] + 1) % 3  # a misclassified sample is never robust, at any eps
    assert not robust_at(model, x, wrong, 1e-6, ["a", "b"], FAST)[0]
