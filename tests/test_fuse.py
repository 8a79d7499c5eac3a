"""The fused copy an attack runs on computes the model's function, and the model keeps the last word.

:func:`mmrobust.models.fuse.fuse_for_inference` folds BatchNorm into the conv/linear layer before it
and stores 4-d weights channels-last. Checked here: logits and input gradients equal the original's
on the AV-digits CNN encoders with non-trivial BatchNorm statistics (the gradient is what an attack
uses); the original is untouched; copies that cannot reproduce the model fall back to it, saying
why; AutoAttack and the guard's predictions are decided by the model, not by the copy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmrobust.attacks.autoattack import AutoAttackOptions, run_autoattack
from mmrobust.attacks.gradient import PGD
from mmrobust.errors import ConfigError
from mmrobust.eval.robust import attack_predictions
from mmrobust.models.fuse import Fusion, fold_batchnorm, fuse_for_inference
from mmrobust.models.fusion import ModelConfig, build_model


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


@pytest.fixture(scope="module")
def model(avdigits):
    torch.manual_seed(0)
    net = build_model(avdigits.meta, ModelConfig(feature_dim=32)).eval()
    _randomise_batchnorm(net)
    return net


@pytest.fixture(scope="module")
def batch(avdigits):
    return avdigits.test.take(slice(0, 24))


def test_fused_copy_has_the_models_logits_and_input_gradients(model, batch):
    inputs, _ = batch
    before = copy.deepcopy(model.state_dict())
    fusion = fuse_for_inference(model, inputs)
    assert fusion.fused and fusion.module is not model
    # tcn: 3 conv+bn pairs, smallcnn: 3
    assert fusion.folded == 6 and fusion.channels_last
    assert "6 BatchNorm layer(s) folded, channels_last" in fusion.describe()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fusion.module.modules())
    assert not any(p.requires_grad for p in fusion.module.parameters())
    # the original is untouched (its BatchNorms, statistics and weights)
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == 6
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    def logits_and_grads(net):
        x = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        out = net(x)
        loss = (out * torch.linspace(-1, 1, out.shape[1])).sum()
        grads = torch.autograd.grad(loss, list(x.values()))
        return out.detach(), grads

    want, want_g = logits_and_grads(model)
    got, got_g = logits_and_grads(fusion.module)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_g, want_g, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))


def test_fold_batchnorm_counts_only_conv_bn_pairs_inside_sequentials():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6), nn.Linear(6, 3))
    _randomise_batchnorm(seq)
    seq.eval()
    x = torch.randn(5, 4)
    want = seq(x)
    assert fold_batchnorm(seq) == 1  # the second BatchNorm follows a ReLU: not foldable
    assert isinstance(seq[1], nn.Identity) and isinstance(seq[3], nn.BatchNorm1d)
    assert torch.allclose(seq(x), want, atol=1e-5)
    hooked = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3))
    hooked[1].register_forward_hook(lambda *a: None)
    assert fold_batchnorm(hooked) == 0  # a hooked layer may depend on the BatchNorm being there


class _Views(nn.Module):
    """A user model whose forward calls ``.view`` on a conv output (breaks on channels-last)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, batch):
        h = self.conv(batch["image"])
        return self.fc(h.view(h.shape[0], -1))


class _Changes(nn.Sequential):
    """Deep-copies into a different function (what the logit check is there for)."""

    def __deepcopy__(self, memo):
        other = _Changes(nn.Linear(3, 2), nn.BatchNorm1d(2))
        return other

    def forward(self, batch):
        return super().forward(batch["x"])


def test_copies_that_do_not_reproduce_the_model_fall_back_to_it():
    image = {"image": torch.rand(3, 1, 28, 28)}
    views = _Views().eval()
    fusion = fuse_for_inference(views, image)
    assert fusion.module is views and not fusion.fused
    assert "fails on the batch" in fusion.describe()
    torch.manual_seed(1)
    changes = _Changes(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    fusion = fuse_for_inference(changes, {"x": torch.randn(4, 3)})
    assert fusion.module is changes and fusion.reason == "the copy's logits differ from the model's"
    plain = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(3), nn.Conv2d(1, 2, 3))  # BatchNorm after no layer
    assert fuse_for_inference(plain).reason == "nothing to fuse"


def test_models_too_large_to_copy_are_attacked_as_they_are(model, batch, monkeypatch):
    import mmrobust.models.fuse as fuse

    monkeypatch.setattr(fuse, "MAX_COPY_BYTES", 1000)
    fusion = fuse.fuse_for_inference(model, batch[0])
    assert fusion.module is model and fusion.reason is not None and fusion.reason.startswith("too large to copy")


class _Liar(nn.Module):
    """A 'copy' that calls every input misclassified (class 0's logit for label != 0 rows...)."""

    def __init__(self, model: nn.Module, labels: torch.Tensor) -> None:
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, batch):
        out = self.model(batch)
        wrong = (out.argmax(1) + 1) % out.shape[1]
        return out + 100.0 * nn.functional.one_hot(wrong, out.shape[1])


def test_autoattack_verdicts_are_the_models_not_the_copys(model, batch, monkeypatch):
    inputs, _ = batch
    with torch.no_grad():
        labels = model(inputs).argmax(1)  # an untrained model: attack its own predictions
    import mmrobust.attacks.autoattack as aa

    monkeypatch.setattr(aa, "fuse_for_inference", lambda m, example: Fusion(_Liar(m, labels), 6, True))
    opts = AutoAttackOptions(eps=0.05, norm="l2", version="custom", attacks=("apgd-ce",), steps=3)
    res = run_autoattack(model, inputs, labels, opts)
    # the liar calls every point broken at once; the model, judging, finds none at this tiny budget
    assert res.clean_accuracy == 1.0 and res.robust_accuracy == 1.0
    assert res.fusion.startswith("fused copy")


EPS = 3.0


def test_autoattack_fused_and_plain_find_the_same_broken_samples(model, batch):
    inputs, _ = batch
    with torch.no_grad():
        labels = model(inputs).argmax(1)  # an untrained model: attack its own predictions
    kw = dict(eps=EPS, norm="l2", version="custom", attacks=("apgd-ce", "apgd-t"), steps=8, targets=3)
    fused = run_autoattack(model, inputs, labels, AutoAttackOptions(**kw))
    plain = run_autoattack(model, inputs, labels, AutoAttackOptions(**kw, fuse=False))
    assert fused.fusion.startswith("fused copy") and plain.fusion == "the model as given (fuse off)"
    assert 0 < plain.robust_accuracy < plain.clean_accuracy  # the budget breaks some, not all
    assert int((fused.robust != plain.robust).sum()) <= 1
    with pytest.raises(ConfigError, match="fuse must be true or false"):
        AutoAttackOptions(eps=1.0, fuse="yes")  # type: ignore[arg-type]


def test_attack_predictions_judge_decides(model, avdigits):
    split = avdigits.test.subset(slice(0, 16))
    liar = _Liar(model, split.labels)
    attack = PGD(liar, eps=0.01, norm="l2", steps=1, seed=0, meta=avdigits.meta)
    with torch.no_grad():
        clean = model(split.take(slice(0, 16))[0]).argmax(1)
    own = attack_predictions(attack, split)
    judged = attack_predictions(attack, split, judge=model)
    assert bool((own != clean).all())  # the liar's own logits: all "wrong"
    assert torch.equal(judged, clean)  # the model's predictions at a 0.01 budget: unchanged
