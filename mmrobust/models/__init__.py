"""Model zoo: encoders, fusion heads and the late-fusion model."""

from mmrobust.models.encoders import ENCODERS, build_encoder, default_encoder
from mmrobust.models.fusion import LateFusionModel, ModelConfig, build_model
from mmrobust.models.heads import HEADS, ConcatHead, FusionHead, OrthogonalHead

__all__ = [
    "ENCODERS",
    "HEADS",
    "ConcatHead",
    "FusionHead",
    "LateFusionModel",
    "ModelConfig",
    "OrthogonalHead",
    "build_encoder",
    "build_model",
    "default_encoder",
]
