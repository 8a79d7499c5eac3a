"""Our l2-PGD against torchattacks' PGDL2 on the same model and settings.

torchattacks takes one ``(N, C, H, W)`` tensor in [0, 1]: the attacked modality is an image-shaped
modality with valid range [0, 1] here, and a wrapper feeds torchattacks' tensor plus the other
(fixed) modality to the multi-modal model, so both attack exactly the same function.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmrobust.attacks import PGDL2
from mmrobust.data import DataConfig, load_data
from mmrobust.data.base import DataBundle, DatasetMeta, ModalitySpec, Split
from mmrobust.eval.metrics import accuracy
from tests.conftest import tiny_config

torchattacks = pytest.importorskip("torchattacks")

EPS, STEPS, ALPHA = 0.25, 10, 0.0625


def _to_image(split: Split, lo: torch.Tensor, hi: torch.Tensor) -> Split:
    x = ((split.inputs["strong"] - lo) / (hi - lo)).clamp(0, 1).reshape(-1, 1, 4, 4)
    return Split({"strong": x, "weak": split.inputs["weak"]}, split.labels)


@pytest.fixture(scope="module")
def setup():
    from mmrobust.training import train

    raw = load_data(DataConfig("synthetic", 1, {"n_train": "400", "n_val": "100", "n_test": "300", "dim": "16",
                                                "classes": "4", "signal": "3.0,0.5"}))  # fmt: skip
    lo, hi = raw.train.inputs["strong"].min(0).values, raw.train.inputs["strong"].max(0).values
    meta = DatasetMeta(
        "parity", [ModalitySpec("strong", "image", (1, 4, 4), (0.0, 1.0)), ModalitySpec("weak", "vector", (16,))],
        raw.meta.class_names,
    )  # fmt: skip
    bundle = DataBundle(meta, *(_to_image(s, lo, hi) for s in (raw.train, raw.val, raw.test)))
    cfg = tiny_config(epochs=5)
    cfg.train.batch_size, cfg.train.optim.lr = 32, 5e-3
    cfg.model.encoders = {"strong": "mlp"}
    model = train(cfg, bundle=bundle).model.eval()
    return model, meta, bundle.test


class SingleInput(nn.Module):
    """``image -> logits`` for torchattacks, the other modality fixed to the current batch's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.weak: torch.Tensor | None = None

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model({"strong": image, "weak": self.weak})


def _run_both(model, meta, split, random_start: bool):
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
    return acc, acc_ta, adv, adv_ta, x


@pytest.mark.parametrize("random_start", [False, True])
def test_pgdl2_matches_torchattacks(setup, random_start):
    model, meta, split = setup
    acc, acc_ta, adv, adv_ta, x = _run_both(model, meta, split, random_start)
    with torch.no_grad():
        clean = accuracy(model(x).argmax(1), split.labels)
    assert acc_ta < clean - 0.1  # the setting is one where the attack matters
    assert abs(acc - acc_ta) <= 0.01, (acc, acc_ta)
    # every perturbation within budget and range; the other modality untouched
    norms = (adv["strong"] - x["strong"]).flatten(1).norm(dim=1)
    assert float(norms.max()) <= EPS + 1e-5
    assert float((adv_ta - x["strong"]).flatten(1).norm(dim=1).max()) <= EPS + 1e-5
    assert float(adv["strong"].min()) >= 0 and float(adv["strong"].max()) <= 1
    assert torch.equal(adv["weak"], x["weak"])
