"""Per-modality encoders. Every encoder is built as ``Encoder(spec, feature_dim)`` and exposes
``out_dim``; the default one for a modality is chosen from its kind and shape.

Encoders are plain compositions of Linear/Conv/BatchNorm/ReLU/non-overlapping pooling (and
residual blocks for ResNet18) so that sound Lipschitz bounds can be composed layer by layer.
"""

from __future__ import annotations

import torch
from torch import nn

from mmrobust.data.base import ModalitySpec
from mmrobust.errors import ConfigError
from mmrobust.registry import Registry

#: the encoders by name; the listed modules register the built-in ones (1-Lipschitz encoders included)
ENCODERS: Registry[type[nn.Module]] = Registry(
    "encoder", modules=("mmrobust.models.encoders", "mmrobust.models.lipschitz")
)


@ENCODERS.register("mlp")
class MLPEncoder(nn.Sequential):
    """Two-layer MLP for vectors (any shape is flattened)."""

    def __init__(self, spec: ModalitySpec, feature_dim: int = 128, hidden: int = 256) -> None:
        d = 1
        for s in spec.shape:
            d *= s
        super().__init__(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU())
        self.out_dim = feature_dim


@ENCODERS.register("tcn")
class TemporalCNN(nn.Sequential):
    """Temporal CNN for ``(channels, length)`` sequences, global average pooled over time."""

    def __init__(self, spec: ModalitySpec, feature_dim: int = 128, width: int = 64) -> None:
        if spec.kind != "sequence":
            raise ConfigError(f"encoder 'tcn' needs a sequence modality, '{spec.name}' is {spec.kind}")
        c = spec.shape[0]
        super().__init__(
            nn.Conv1d(c, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Conv1d(width, 2 * width, 5, padding=2, stride=2), nn.BatchNorm1d(2 * width), nn.ReLU(),
            nn.Conv1d(2 * width, feature_dim, 3, padding=1), nn.BatchNorm1d(feature_dim), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )  # fmt: skip
        self.out_dim = feature_dim


@ENCODERS.register("smallcnn")
class SmallCNN(nn.Sequential):
    """Three-block CNN for small ``(C, H, W)`` images (MNIST-sized)."""

    pool: type[nn.Module] = nn.MaxPool2d

    def __init__(self, spec: ModalitySpec, feature_dim: int = 128, width: int = 32) -> None:
        if spec.kind not in ("image", "spectrogram"):
            raise ConfigError(f"encoder {type(self).__name__} needs an image modality, '{spec.name}' is {spec.kind}")
        c = spec.shape[0]
        super().__init__(
            nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), self.pool(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), self.pool(2),
            nn.Conv2d(2 * width, feature_dim, 3, padding=1), nn.BatchNorm2d(feature_dim), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.out_dim = feature_dim


@ENCODERS.register("smallcnn-avgpool")
class SmallCNNAvgPool(SmallCNN):
    """:class:`SmallCNN` with 2x2 average instead of max pooling, for models to be certified.

    Why: a max-pool window whose elements tie at the input (a constant background makes most of
    them tie) has no linear bound tighter than a constant, and linear bound propagation (CROWN)
    pays that constant in every such window; an average is linear and costs nothing.
    """

    pool = nn.AvgPool2d


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(F(x) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@ENCODERS.register("resnet18")
class ResNet18(nn.Module):
    """The CRMT paper's ResNet18: a ``C``-channel stem (1 for spectrograms), 512-d features.

    Video ``(T, C, H, W)`` is folded into the batch, encoded frame by frame and averaged over time.
    ``feature_dim`` is ignored (always 512) to stay faithful to the paper's backbone.
    """

    def __init__(self, spec: ModalitySpec, feature_dim: int = 512) -> None:
        super().__init__()
        if spec.kind not in ("image", "spectrogram", "video"):
            raise ConfigError(
                f"encoder 'resnet18' needs an image/spectrogram/video modality, '{spec.name}' is {spec.kind}"
            )
        self.video = spec.kind == "video"
        c = spec.shape[1] if self.video else spec.shape[0]
        self.stem = nn.Sequential(
            nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.video:
            n, t = x.shape[:2]
            feats = self.pool(self.layers(self.stem(x.flatten(0, 1))))
            return feats.view(n, t, -1).mean(1)
        return self.pool(self.layers(self.stem(x)))


def default_encoder(spec: ModalitySpec) -> str:
    """Pick an encoder name from the modality's kind and size."""
    if spec.kind == "vector":
        return "mlp"
    if spec.kind == "sequence":
        return "tcn"
    if spec.kind == "video":
        return "resnet18"
    return "smallcnn" if max(spec.shape[1:]) <= 64 else "resnet18"


def build_encoder(spec: ModalitySpec, name: str | None = None, feature_dim: int = 128) -> nn.Module:
    """Instantiate the encoder ``name`` (default: :func:`default_encoder`) for ``spec``."""
    cls = ENCODERS.get(name or default_encoder(spec))
    return cls(spec, feature_dim)
