"""The model-agnostic empirical estimate for models that are not additive late fusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmrobust.certify.runner import certify_model
from mmrobust.data import DataConfig, load_data
from mmrobust.errors import ConfigError


class EarlyFusion(nn.Module):
    """Concatenates the modalities first: not additive late fusion."""

    def __init__(self, dims: dict[str, int], classes: int) -> None:
        super().__init__()
        self.order = sorted(dims)
        self.fc = nn.Linear(sum(dims.values()), classes)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([inputs[m].flatten(1) for m in self.order], 1))


@pytest.fixture(scope="module")
def setup():
    bundle = load_data(DataConfig("synthetic", options={"n_train": 64, "n_val": 16, "n_test": 40}))
    torch.manual_seed(0)
    dims = {s.name: s.shape[0] for s in bundle.meta.modalities}
    return bundle, EarlyFusion(dims, bundle.meta.num_classes)


def test_empirical_estimates_any_model_as_margin_over_max_gradient_norm(setup) -> None:
    bundle, model = setup
    res = certify_model(model, bundle.meta, bundle.test, "empirical", bundle.train, options={"fit_samples": 50})
    cert = res.certificate
    assert cert.guarantee.value == "estimate" and cert.radii.unimodal == {} and "NOT a bound" in cert.info["note"]
    # brute force for a linear model: the margin's gradient is W_y - W_j (j = runner-up), its norm exact
    w, b = model.fc.weight.detach(), model.fc.bias.detach()

    def margin_and_grad(split):
        x = torch.cat([split.inputs[m].flatten(1) for m in model.order], 1)
        logits = x @ w.T + b
        y = split.labels
        other = logits.clone()
        other[torch.arange(len(y)), y] = float("-inf")
        j = other.argmax(1)
        return logits[torch.arange(len(y)), y] - logits[torch.arange(len(y)), j], (w[y] - w[j]).norm(dim=1)

    _, fit_norms = margin_and_grad(bundle.train.subset(slice(0, 50)))
    margin, _ = margin_and_grad(bundle.test)
    expected = torch.where(margin > 0, margin / fit_norms.max(), torch.zeros_like(margin))
    torch.testing.assert_close(cert.radii.joint, expected, rtol=1e-5, atol=1e-6)
    assert cert.radii.correct.sum() > 0 and (cert.radii.joint[cert.radii.correct] > 0).all()


def test_sound_certifiers_refuse_a_model_that_is_not_late_fusion_in_one_line(setup) -> None:
    bundle, model = setup
    with pytest.raises(ConfigError) as info:
        certify_model(model, bundle.meta, bundle.test, "sound", bundle.train)
    text = str(info.value)
    assert "\n" not in text and "needs an additive late-fusion model" in text and "EarlyFusion" in text
    assert "certifier='empirical'" in text and info.value.param == "certifier"
