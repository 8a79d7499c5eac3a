"""Parity with torchattacks on the same model, samples and budget.

torchattacks takes one ``(N, C, H, W)`` tensor in [0, 1]; ``benchmarks/attack_parity.UnitImage``
presents a multi-modal model that way (the attacked modalities concatenated into one image, one
common scale). Here both modalities of a small synthetic model are images with valid range [0, 1],
attacked jointly, so both libraries attack exactly the same function over the same box.
torchattacks is a test dependency (``make test`` installs it): without it this module fails.
"""

from __future__ import annotations

import pytest
import torch
import torchattacks
from torch import nn

from benchmarks.attack_parity import UnitImage, compare
from mmrobust.attacks import PGDL2, build_attack
from mmrobust.data import DataConfig, load_data
from mmrobust.data.base import DataBundle, DatasetMeta, ModalitySpec, Split
from mmrobust.eval.metrics import accuracy
from tests.conftest import tiny_config

EPS, STEPS, ALPHA = 0.25, 10, 0.0625
#: ours may be weaker than torchattacks by at most this much accuracy (0.5 points)
SLACK = 0.005


def _to_images(split: Split, lo: dict, hi: dict) -> Split:
    x = {m: ((v - lo[m]) / (hi[m] - lo[m])).clamp(0, 1).reshape(-1, 1, 8, 8) for m, v in split.inputs.items()}
    return Split(x, split.labels)


@pytest.fixture(scope="module")
def setup():
    from mmrobust.training import train

    raw = load_data(DataConfig("synthetic", 1, {"n_train": "400", "n_val": "100", "n_test": "200", "dim": "64",
                                                "classes": "4", "signal": "3.0,1.5"}))  # fmt: skip
    lo = {m: float(v.min()) for m, v in raw.train.inputs.items()}
    hi = {m: float(v.max()) for m, v in raw.train.inputs.items()}
    meta = DatasetMeta(
        "parity", [ModalitySpec(m, "image", (1, 8, 8), (0.0, 1.0)) for m in ("strong", "weak")], raw.meta.class_names
    )
    bundle = DataBundle(meta, *(_to_images(s, lo, hi) for s in (raw.train, raw.val, raw.test)))
    cfg = tiny_config(epochs=5)
    cfg.train.batch_size, cfg.train.optim.lr = 32, 5e-3
    cfg.model.encoders = {"strong": "mlp", "weak": "mlp"}
    model = train(cfg, bundle=bundle).model.eval()
    return model, meta, bundle.test


RANGES = {"strong": (0.0, 1.0), "weak": (0.0, 1.0)}


@pytest.mark.parametrize(
    ("attack", "norm", "eps"),
    [("apgd-ce", "linf", 0.1), ("apgd-t", "linf", 0.1), ("fab-t", "linf", 0.1), ("square", "linf", 0.1),
     ("autoattack", "linf", 0.1), ("apgd-ce", "l2", 1.0), ("apgd-t", "l2", 1.0), ("fab-t", "l2", 1.0),
     ("square", "l2", 1.0), ("autoattack", "l2", 1.0)],
)  # fmt: skip
def test_at_least_as_strong_as_torchattacks(setup, attack, norm, eps):
    model, meta, split = setup
    row = compare(model, meta, split.inputs, split.labels, norm=norm, eps=eps, modalities=["strong", "weak"],
                  ranges=RANGES, attack=attack, steps=10, queries=200)  # fmt: skip
    assert row["torchattacks"] < row["clean"] - 0.1 or row["ours"] < row["clean"] - 0.1  # the attack matters
    assert row["ours"] <= row["torchattacks"] + SLACK, row
    if attack == "autoattack":  # the whole suite (ours with its early stopping): robust accuracy within one sample
        assert abs(row["ours"] - row["torchattacks"]) * len(split.labels) <= 1 + 1e-6, row


def test_unit_image_round_trip(setup):
    model, _, split = setup
    x = split.inputs
    wrapper = UnitImage(model, x, ["strong", "weak"], RANGES)
    u = wrapper.encode(x)
    assert u.shape == (len(split.labels), 1, 11, 12) and float(u.min()) >= 0 and float(u.max()) <= 1
    back = wrapper.decode(u)
    for m in x:
        assert torch.allclose(back[m], x[m], atol=1e-6)
    # a fixed modality is recovered per sample from the index pixels, also on a subset of rows
    single = UnitImage(model, x, ["strong"], RANGES)
    rows = torch.tensor([5, 2, 17])
    dec = single.decode(single.encode(x)[rows] + 0.3 * (torch.rand(3, 1, single.height, single.width) - 0.5))
    assert torch.equal(dec["weak"], x["weak"][rows])


class SingleInput(nn.Module):
    """``image -> logits`` for torchattacks, the other modality fixed to the current batch's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.weak: torch.Tensor | None = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model({"strong": image, "weak": self.weak})


@pytest.mark.parametrize("random_start", [False, True])
def test_pgdl2_matches_torchattacks(setup, random_start):
    model, meta, split = setup
    wrapper = SingleInput(model).eval()
    ta = torchattacks.PGDL2(wrapper, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=random_start)
    ours = PGDL2(model, EPS, steps=STEPS, rel_step_size=ALPHA / EPS, random_start=random_start,
                 modalities=["strong"], meta=meta, seed=0)  # fmt: skip
    x, y = split.inputs, split.labels
    wrapper.weak = x["weak"]
    torch.manual_seed(0)
    adv_ta = ta(x["strong"], y)
    adv = ours(x, y)
    with torch.no_grad():
        acc_ta = accuracy(wrapper(adv_ta).argmax(1), y)
        acc = accuracy(model(adv).argmax(1), y)
        clean = accuracy(model(x).argmax(1), y)
    assert acc_ta < clean - 0.1  # the setting is one where the attack matters
    assert acc <= acc_ta + SLACK, (acc, acc_ta)
    norms = (adv["strong"] - x["strong"]).flatten(1).norm(dim=1)
    assert float(norms.max()) <= EPS + 1e-5
    assert float(adv["strong"].min()) >= 0 and float(adv["strong"].max()) <= 1
    assert torch.equal(adv["weak"], x["weak"])


class _Recorder(nn.Module):
    """A random ReLU net on one (1, 8, 8) image in [0, 1] (a dict with an ignored ``aux`` for us, the
    tensor for torchattacks) that records the logits of every forward pass."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                                 nn.Linear(64, classes))  # fmt: skip
        self.calls: list[torch.Tensor] = []

    def forward(self, x):
        out = self.net(x["image"] if isinstance(x, dict) else x)
        self.calls.append(out.detach().clone())
        return out


@pytest.mark.parametrize(("attack", "norm", "eps"), [("apgd-t", "l2", 0.2), ("apgd-t", "linf", 0.01),
                                                     ("apgd-ce", "l2", 0.1), ("apgd-ce", "linf", 0.01)])  # fmt: skip
def test_apgd_follows_the_reference_trajectory(monkeypatch, attack, norm, eps):
    """With the random start made deterministic (the same constant draw in both libraries), our
    APGD-CE / APGD-T visit the same points as torchattacks' APGD / APGDT, step for step (logits of
    every iterate within 1e-5). One sample at a time: torchattacks' l2 APGDT applies the first
    sample's step size to the whole batch (a quirk the reference code has since dropped)."""
    k = 10
    net = _Recorder(k).eval()
    meta = DatasetMeta("exact", [ModalitySpec("image", "image", (1, 8, 8), (0.0, 1.0)),
                                 ModalitySpec("aux", "vector", (2,), None)], [str(i) for i in range(k)])  # fmt: skip
    # torchattacks draws with the global generator, we with our own: both get the same constants
    # (l-inf: 0.75 -> t = 0.5 -> the corner x + eps; l2: all-ones direction scaled to eps)
    monkeypatch.setattr(torch, "rand", lambda *s, **kw: torch.full(s[0] if len(s) == 1 else s, 0.75))
    monkeypatch.setattr(torch, "randn", lambda *s, **kw: torch.full(s[0] if len(s) == 1 else s, 1.0))
    gen = torch.Generator().manual_seed(1)
    x = torch.empty(3, 1, 8, 8).uniform_(0, 1, generator=gen)
    with torch.no_grad():
        y = net.net(x).argmax(1)
    ta_norm = "Linf" if norm == "linf" else "L2"
    compared = 0
    for i in range(len(y)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        if attack == "apgd-t":
            ta = torchattacks.APGDT(net, norm=ta_norm, eps=eps, steps=10, n_classes=k, seed=0)
            ours = build_attack("apgd-t", net, meta, eps=eps, norm=norm, steps=10, targets=k - 1, modalities=["image"])
        else:
            ta = torchattacks.APGD(net, norm=ta_norm, eps=eps, steps=10, loss="ce", seed=0)
            ours = build_attack("apgd-ce", net, meta, eps=eps, norm=norm, steps=10, modalities=["image"])
        net.calls.clear()
        adv_ta = ta(xi, yi)
        # torchattacks: one clean pass, then per target one more clean pass (to pick the target),
        # the start and the 10 iterates; we: one clean pass, then per target the start and iterates
        ta_calls = [c for j, c in enumerate(net.calls) if not (attack == "apgd-t" and j % 12 == 1)][1:]
        net.calls.clear()
        _, logits = ours.perturb({"image": xi, "aux": torch.zeros(1, 2)}, yi)
        our_calls = net.calls[1 : 1 + len(ta_calls)]
        assert len(our_calls) == len(ta_calls) >= 11
        for step, (a, b) in enumerate(zip(ta_calls, our_calls, strict=True)):
            assert torch.allclose(a, b, atol=1e-5), (i, step, (a - b).abs().max())
        compared += len(ta_calls)
        with torch.no_grad():
            assert bool(net.net(adv_ta).argmax(1) == yi) == bool(logits.argmax(1) == yi)
    assert compared >= 3 * 11
