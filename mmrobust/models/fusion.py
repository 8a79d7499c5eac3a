"""The late-fusion model: one encoder per modality, an additive fusion head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.errors import ConfigError, DataError
from mmrobust.models.encoders import build_encoder
from mmrobust.models.heads import HEADS, FusionHead
from mmrobust.models.lipschitz import lipschitz_encoder


@dataclass
class ModelConfig:
    """How to build a model for a dataset. ``encoders`` overrides the default per modality;
    ``lipschitz_encoders`` picks the 1-Lipschitz encoder of each modality's kind as the default."""

    head: str = "concat"
    feature_dim: int = 128
    encoders: dict[str, str] = field(default_factory=dict)
    #: 1-Lipschitz encoders by construction (mmrobust.models.lipschitz) for modalities without an override
    lipschitz_encoders: bool = False


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
    if not isinstance(cfg.lipschitz_encoders, bool):
        raise ConfigError(f"lipschitz_encoders must be true or false, got {cfg.lipschitz_encoders!r}")
    names = {
        s.name: cfg.encoders.get(s.name) or (lipschitz_encoder(s) if cfg.lipschitz_encoders else None)
        for s in meta.modalities
    }
    encoders = {s.name: build_encoder(s, names[s.name], cfg.feature_dim) for s in meta.modalities}
    dims = {m: int(cast(int, e.out_dim)) for m, e in encoders.items()}
    head = cast(FusionHead, HEADS.get(cfg.head)(dims, meta.num_classes))
    return LateFusionModel(encoders, head, meta.num_classes)
