"""The late-fusion model: one encoder per modality, an additive fusion head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.errors import ConfigError, DataError
from mmrobust.models.encoders import build_encoder
from mmrobust.models.heads import HEADS, FusionHead
from mmrobust.options import check_range, check_types


@dataclass
class ModelConfig:
    """How to build a model for a dataset. ``encoders`` overrides the default per modality."""

    head: str = "concat"
    feature_dim: int = 128
    encoders: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_types(self, "model")
        check_range(self.feature_dim, 1, 65_536, "model.feature_dim")
        for name, enc in self.encoders.items():
            if not isinstance(enc, str):
                raise ConfigError(f"option 'model.encoders.{name}' must be an encoder name, got {enc!r}")


class LateFusionModel(nn.Module):
    """``logits = head({m: encoder_m(x_m)})`` for any number of modalities.

    ``forward(inputs)`` returns logits. ``forward(inputs, return_all=True)`` returns a dict with
    ``logits``, ``features`` and per-modality ``scores`` in one pass; training strategies use it so
    that everything goes through ``forward`` (and therefore through a DDP wrapper).
    """

    def __init__(self, encoders: dict[str, nn.Module], head: FusionHead, num_classes: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = head
        self.num_classes = num_classes

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def encode(self, inputs: Batch) -> dict[str, torch.Tensor]:
        missing = [m for m in self.encoders if m not in inputs]
        if missing:
            raise DataError(f"batch lacks modality {missing}; the model expects {self.modalities}")
        return {m: enc(inputs[m]) for m, enc in self.encoders.items()}

    def forward(self, inputs: Batch, return_all: bool = False) -> torch.Tensor | dict[str, Any]:
        feats = self.encode(inputs)
        if not return_all:
            return self.head(feats)
        scores = self.head.scores(feats)
        return {"logits": self.head.combine(scores), "features": feats, "scores": scores}


def build_model(meta: DatasetMeta, cfg: ModelConfig | None = None) -> LateFusionModel:
    """Build a :class:`LateFusionModel` for ``meta`` from a :class:`ModelConfig`."""
    cfg = cfg or ModelConfig()
    unknown = set(cfg.encoders) - set(meta.modality_names)
    if unknown:
        raise ConfigError(f"encoder override for unknown modality {sorted(unknown)}; dataset has {meta.modality_names}")
    if cfg.feature_dim < 1:
        raise ConfigError(f"feature_dim must be >= 1, got {cfg.feature_dim}")
    encoders = {s.name: build_encoder(s, cfg.encoders.get(s.name), cfg.feature_dim) for s in meta.modalities}
    dims = {m: int(e.out_dim) for m, e in encoders.items()}
    head = HEADS.get(cfg.head)(dims, meta.num_classes)
    return LateFusionModel(encoders, head, meta.num_classes)
