"""alpha-CROWN: sound against brute force and attacks, never looser than plain CROWN, and strictly
tighter where the adaptive lower slope of plain CROWN is the wrong one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmrobust.certify.alpha_crown import AlphaCrownOptions, AlphaModelBounds, alpha_crown_radii
from mmrobust.certify.base import CERTIFIERS
from mmrobust.certify.crown import CrownOptions, ModelBounds, crown_radii
from mmrobust.certify.runner import certify_model
from mmrobust.certify.soundness import min_adversarial_norm, soundness_check
from mmrobust.data.base import DatasetMeta, ModalitySpec, Split
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import LateFusionModel
from mmrobust.models.heads import ConcatHead

from .test_certify import _trained
from .test_crown import _tiny_relu_model, grid_minima


def _kink_model() -> tuple[LateFusionModel, DatasetMeta]:
    """Two scalar modalities, two classes: margin ``h_0 - h_1 = relu(x + 0.1) - x / 2`` (> 0 everywhere)
    for modality ``u``; the head ignores modality ``v``.

    The encoder is ``(relu(x + 0.1), relu(x + 5))`` (the second unit is linear for ``|x| < 5``) and the
    head ``[1, -1/2] . phi + 5/2`` for class 0, 0 for class 1. Around ``x = 0`` with ``0.1 < r < 5``
    the first ReLU is unstable with ``u > -l``: plain CROWN takes the lower line ``relu(z) >= z``,
    which gives ``0.1 - r / 2`` (radius 0.2); the slope 1/2 gives ``0.05`` at every such ``r``, the
    exact minimum (at ``x = -0.1``).
    """
    meta = DatasetMeta("kink", [ModalitySpec("u", "vector", (1,)), ModalitySpec("v", "vector", (1,))], ["0", "1"])
    lin = nn.Linear(1, 2)
    head = ConcatHead({"u": 2, "v": 1}, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0], [1.0]]))
        lin.bias.copy_(torch.tensor([0.1, 5.0]))
        head.linears["u"].weight.copy_(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
        head.linears["v"].weight.zero_()
        head.bias.copy_(torch.tensor([2.5, 0.0]))
    encoders = {"u": nn.Sequential(nn.Flatten(), lin, nn.ReLU()), "v": nn.Sequential(nn.Flatten(), nn.Linear(1, 1))}
    return LateFusionModel(encoders, head, 2).eval(), meta


def test_optimised_slopes_strictly_tighten_a_constructed_bound_and_radius():
    model, meta = _kink_model()
    x, y = {"u": torch.zeros(1, 1), "v": torch.zeros(1, 1)}, torch.zeros(1, dtype=torch.long)
    r = torch.tensor([1.0], dtype=torch.float64)
    opts = AlphaCrownOptions(iterations=60, lr=0.1)
    plain = ModelBounds(model, meta, opts).lower(x, y, r, ["u"])[0, 1]
    tight = AlphaModelBounds(model, meta, opts).lower(x, y, r, ["u"])[0, 1]
    # brute force: the true minimum over [-1, 1] is 0.05
    t = torch.linspace(-1, 1, 20001).unsqueeze(1)
    with torch.no_grad():
        logits = model({"u": t, "v": torch.zeros_like(t)}).double()
    true_min = float((logits[:, 0] - logits[:, 1]).min())
    assert abs(true_min - 0.05) < 1e-4
    assert float(plain) < -0.3  # plain CROWN: 0.1 - r / 2 (interval and Lipschitz are no better)
    assert (
        0.045 < float(tight) <= min(true_min + 1e-6, 0.05 + 1e-9)
    )  # optimised: (nearly) the exact minimum, still a lower bound
    # radii: plain CROWN stops at 0.2; the optimised bound is positive on every ball tried (up to the search's end)
    split = Split(x, y)
    alpha, base, cost = alpha_crown_radii(model, meta, split, AlphaCrownOptions(steps=4, unimodal=False))
    assert abs(float(base.joint[0]) - 0.2) < 0.02 and float(crown_radii(model, meta, split).joint[0]) < 0.21
    assert float(alpha.joint[0]) > 2 * float(base.joint[0])
    assert cost["calls"] > 0 and cost["steps"] > 0


@pytest.mark.parametrize("seed,intermediate", [(0, "fast"), (1, "crown"), (2, "fast")])
def test_bounds_hold_on_a_dense_grid_and_are_never_looser_than_plain_crown(seed, intermediate):
    model, meta = _tiny_relu_model(seed)
    opts = AlphaCrownOptions(intermediate=intermediate, iterations=15)
    plain_b, alpha_b = ModelBounds(model, meta, opts), AlphaModelBounds(model, meta, opts)
    torch.manual_seed(seed)
    x0 = {"u": torch.randn(4, 1), "v": torch.randn(4, 1)}
    y = model(x0).argmax(1)
    r = torch.tensor([0.3, 0.8, 1.5, 3.0], dtype=torch.float64)
    plain, low = plain_b.lower(x0, y, r, ["u", "v"]), alpha_b.lower(x0, y, r, ["u", "v"])
    other = torch.ones_like(low, dtype=torch.bool).scatter(1, y[:, None], False)
    assert (low[other] >= plain[other] - 1e-12).all()
    true_min = grid_minima(alpha_b.logits, x0, y, r, ["u", "v"])
    for i in range(4):
        for k in range(3):
            if k != int(y[i]):
                assert low[i, k] <= true_min[i, k] + 1e-9, (i, k)
    # per-modality ball (a segment): the same
    low_u = alpha_b.lower(x0, y, r, ["u"])
    seg_min = grid_minima(alpha_b.logits, x0, y, r, ["u"])
    for i in range(4):
        assert all(low_u[i, k] <= seg_min[i, k] + 1e-9 for k in range(3) if k != int(y[i]))


def test_the_optimisation_tightens_random_relu_networks():
    # over three random models and several radii, the optimised bound is strictly above plain CROWN somewhere
    gains = []
    for seed in range(3):
        model, meta = _tiny_relu_model(seed)
        opts = AlphaCrownOptions(intermediate="fast", iterations=15)
        torch.manual_seed(10 + seed)
        x0 = {"u": torch.randn(6, 1), "v": torch.randn(6, 1)}
        y = model(x0).argmax(1)
        r = torch.full((6,), 1.0, dtype=torch.float64)
        plain = ModelBounds(model, meta, opts).lower(x0, y, r, ["u", "v"])
        low = AlphaModelBounds(model, meta, opts).lower(x0, y, r, ["u", "v"])
        other = torch.ones_like(low, dtype=torch.bool).scatter(1, y[:, None], False)
        gains.append((low - plain)[other & (plain <= 0)])
    assert float(torch.cat(gains).max()) > 1e-3


def test_radius_survives_the_circle_and_is_never_below_plain_crown():
    model, meta = _tiny_relu_model(3)
    torch.manual_seed(3)
    x0 = {"u": torch.randn(6, 1), "v": torch.randn(6, 1)}
    y = model(x0).argmax(1)
    alpha, plain, _ = alpha_crown_radii(
        model, meta, Split(x0, y), AlphaCrownOptions(steps=8, intermediate="fast", iterations=10)
    )
    assert (alpha.joint >= plain.joint).all()
    for m in "uv":
        assert (alpha.unimodal[m] >= plain.unimodal[m]).all()
    ang = torch.linspace(0, 2 * math.pi, 2001, dtype=torch.float64)
    for i in range(6):
        pts = {"u": x0["u"][i].double() + 0.999 * alpha.joint[i] * torch.cos(ang)[:, None],
               "v": x0["v"][i].double() + 0.999 * alpha.joint[i] * torch.sin(ang)[:, None]}  # fmt: skip
        assert (model({m: v.float() for m, v in pts.items()}).argmax(1) == y[i]).all()


def test_radii_never_exceed_attacks_on_a_trained_mlp(tiny_bundle):
    model = _trained("concat", tiny_bundle)
    test = tiny_bundle.test.subset(slice(0, 8))
    opts = {"steps": 6, "iterations": 8, "intermediate": "fast"}
    res = certify_model(model, tiny_bundle.meta, test, "alpha-crown", options=opts)
    cert = res.certificate
    assert res.is_guarantee is True and cert.certifier == "alpha-crown"
    rad = cert.radii.joint.double()
    info = cert.info["alpha_crown"]
    plain = torch.tensor(info["crown_radii"]["joint"], dtype=torch.float64)
    assert (rad >= plain).all() and info["joint"]["median_ratio"] >= 1.0
    assert info["alpha_seconds_per_sample"] > 0 and info["crown_seconds_per_sample"] > 0
    adv = min_adversarial_norm(model, test.inputs, test.labels, model.modalities, torch.where(rad > 0, rad, 1.0),
                               steps=20, search_rounds=6, bisect_rounds=4)  # fmt: skip
    assert (rad <= adv * (1 + 1e-6)).all()
    check = soundness_check(model, tiny_bundle.meta, test, {"joint": rad, "unimodal": cert.radii.unimodal}, steps=20)
    assert all(check[t]["violations"] == 0 for t in ("joint", *model.modalities))


def test_a_spent_time_budget_falls_back_to_plain_crown():
    model, meta = _kink_model()
    split = Split({"u": torch.zeros(1, 1), "v": torch.zeros(1, 1)}, torch.zeros(1, dtype=torch.long))
    alpha, plain, cost = alpha_crown_radii(model, meta, split, AlphaCrownOptions(steps=4, seconds=1e-9))
    assert torch.equal(alpha.joint, plain.joint) and cost["steps"] == 0 and cost["skipped"] > 0


@pytest.mark.parametrize(
    "kw,key",
    [({"iterations": 0}, "iterations"), ({"lr": 0}, "lr"), ({"seconds": -1.0}, "seconds"),
     ({"lr": math.inf}, "lr"), ({"norm": "l3"}, "norm"), ({"steps": 0}, "steps")],
)  # fmt: skip
def test_options_are_validated_and_named(kw, key):
    with pytest.raises(ConfigError, match=f"alpha-crown: .*{key}"):
        AlphaCrownOptions(**kw)
    assert CERTIFIERS.get("alpha-crown").Options is AlphaCrownOptions
    assert CrownOptions().where == "crown"


def test_cli_certifies_with_alpha_crown(tiny_run, tmp_path, capsys):
    import json
    import shutil

    from mmrobust.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    argv = ["certify", str(run), "--certifier", "alpha-crown", "--radii", "0,0.1"]
    assert main([*argv, "--cert-opt", "steps=3", "--cert-opt", "iterations=3", "--cert-opt", "unimodal=false"]) == 0
    assert main([*argv, "--cert-opt", "iterations=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "alpha-crown: iterations must be an integer >= 1" in err[-1] and "--" not in err[-1].split("error:")[1]
    entry = json.loads((run / "certify.json").read_text())["certifiers"]["alpha-crown"]
    assert entry["guarantee"] is True and "median_ratio" in entry["alpha_crown"]["joint"]
