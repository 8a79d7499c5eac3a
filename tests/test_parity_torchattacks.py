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
from mmrobust.attacks import PGDL2
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
