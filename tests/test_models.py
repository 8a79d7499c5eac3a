import pytest
import torch
from torch import nn

from mmrobust.data import DatasetMeta, ModalitySpec
from mmrobust.errors import ConfigError
from mmrobust.models import ModelConfig, build_model, default_encoder


def _meta(*specs):
    return DatasetMeta("t", list(specs), ["a", "b", "c"])


@pytest.mark.parametrize(
    ("spec", "encoder", "dim"),
    [
        (ModalitySpec("v", "vector", (7,)), "mlp", 16),
        (ModalitySpec("s", "sequence", (5, 20)), "tcn", 16),
        (ModalitySpec("i", "image", (1, 28, 28)), "smallcnn", 16),
        (ModalitySpec("sp", "spectrogram", (1, 96, 72)), "resnet18", 512),
        (ModalitySpec("vid", "video", (2, 3, 32, 32)), "resnet18", 512),
    ],
)
def test_default_encoder_per_kind_and_shapes(spec, encoder, dim):
    assert default_encoder(spec) == encoder
    other = ModalitySpec("x", "vector", (4,))
    model = build_model(_meta(spec, other), ModelConfig(feature_dim=16)).eval()
    inputs = {spec.name: torch.randn(2, *spec.shape), "x": torch.randn(2, 4)}
    out = model(inputs, return_all=True)
    assert out["features"][spec.name].shape == (2, dim)
    assert out["logits"].shape == (2, 3)


def test_video_frames_are_encoded_and_pooled_over_time():
    spec = ModalitySpec("vid", "video", (3, 3, 32, 32))
    model = build_model(_meta(spec, ModalitySpec("x", "vector", (4,)))).eval()
    clip = torch.randn(1, 3, 3, 32, 32)
    per_frame = torch.stack(
        [
            model.encoders["vid"].pool(model.encoders["vid"].layers(model.encoders["vid"].stem(clip[:, t])))
            for t in range(3)
        ]
    )
    assert torch.allclose(model.encoders["vid"](clip), per_frame.mean(0), atol=1e-5)


def test_concat_head_equals_one_linear_over_concatenated_features():
    meta = _meta(
        ModalitySpec("a", "vector", (5,)), ModalitySpec("b", "vector", (6,)), ModalitySpec("c", "vector", (3,))
    )
    model = build_model(meta, ModelConfig(feature_dim=8)).eval()
    x = {"a": torch.randn(4, 5), "b": torch.randn(4, 6), "c": torch.randn(4, 3)}
    out = model(x, return_all=True)
    feats = torch.cat([out["features"][m] for m in ("a", "b", "c")], 1)
    lin = nn.Linear(24, 3)
    lin.weight.data = torch.cat([model.head.modality_weight(m) for m in ("a", "b", "c")], 1)
    lin.bias.data = model.head.bias.data
    assert torch.allclose(lin(feats), out["logits"], atol=1e-6)
    assert torch.allclose(sum(out["scores"].values()) + model.head.bias, model(x), atol=1e-6)


def test_orthogonal_head_rows_are_orthonormal_and_dim_checked():
    meta = _meta(ModalitySpec("a", "vector", (5,)), ModalitySpec("b", "vector", (6,)))
    model = build_model(meta, ModelConfig(head="orthogonal", feature_dim=8))
    for m in ("a", "b"):
        w = model.head.basis(m)
        assert torch.allclose(w @ w.T, torch.eye(3), atol=1e-5)
    with pytest.raises(ConfigError, match="modality 'a' has feature dimension 2 < 3 classes"):
        build_model(meta, ModelConfig(head="orthogonal", feature_dim=2))


def test_model_config_errors():
    meta = _meta(ModalitySpec("a", "vector", (5,)), ModalitySpec("b", "sequence", (2, 9)))
    with pytest.raises(ConfigError, match="unknown encoder 'transformer'"):
        build_model(meta, ModelConfig(encoders={"a": "transformer"}))
    with pytest.raises(ConfigError, match="encoder 'tcn' needs a sequence modality"):
        build_model(meta, ModelConfig(encoders={"a": "tcn"}))
    with pytest.raises(ConfigError, match="unknown modality"):
        build_model(meta, ModelConfig(encoders={"z": "mlp"}))
    with pytest.raises(ConfigError, match="unknown fusion head 'sum'"):
        build_model(meta, ModelConfig(head="sum"))
