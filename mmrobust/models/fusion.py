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
from mmrobust.models.memory import SparseCodingMemory
from mmrobust.models.transform import build_transforms, encoder_spec
from mmrobust.options import check_range, check_types


@dataclass
class ModelConfig:
    """How to build a model for a dataset. ``encoders`` overrides the default per modality;
    ``lipschitz_encoders`` picks the 1-Lipschitz encoder of each modality's kind as the default."""

    head: str = "concat"
    feature_dim: int = 128
    encoders: dict[str, str] = field(default_factory=dict)
    # set by training methods that deploy extra modules (saved with the weights, rebuilt by load_run)
    aux_heads: bool = False  # one linear classifier per modality on its features (Gradient Blending)
    feature_memory: int = 0  # clean features per modality in a sparse-coding memory (MSEFM); 0 = none
    #: 1-Lipschitz encoders by construction (mmrobust.models.lipschitz) for modalities without an override
    lipschitz_encoders: bool = False

    def __post_init__(self) -> None:
        check_types(self, "model")
        check_range(self.feature_dim, 1, 65_536, "model.feature_dim")
        check_range(self.feature_memory, 0, 10**7, "model.feature_memory")
        for name, enc in self.encoders.items():
            if not isinstance(enc, str):
                raise ConfigError(f"option 'model.encoders.{name}' must be an encoder name, got {enc!r}")


class LateFusionModel(nn.Module):
    """``logits = head({m: encoder_m(t_m(x_m))})`` for any number of modalities.

    ``t_m`` is the modality's input transform (``transforms[m]``: standardisation or a waveform front
    end, see :mod:`mmrobust.models.transform`), the identity for modalities without one: inputs are
    the data as stored, in their natural units.

    ``forward(inputs)`` returns logits. ``forward(inputs, return_all=True)`` returns a dict with
    ``logits``, ``features`` and per-modality ``scores`` in one pass (plus ``aux_logits``, one
    uni-modal classifier per modality, when the model has auxiliary heads); training strategies use
    it so that everything goes through ``forward`` (and therefore through a DDP wrapper). Auxiliary
    heads never enter ``logits``: the deployed prediction is the fusion head's.
    """

    def __init__(
        self,
        encoders: dict[str, nn.Module],
        head: FusionHead,
        num_classes: int,
        aux: dict[str, nn.Module] | None = None,
        transforms: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = head
        self.num_classes = num_classes
        self.aux = nn.ModuleDict(aux) if aux else None
        self.transforms: nn.ModuleDict | None = None
        self.set_transforms(transforms)

    def set_transforms(self, transforms: dict[str, nn.Module] | None) -> None:
        """Install (or with ``None``/``{}`` remove) the input transforms; ``load_run`` uses it for legacy runs."""
        unknown = set(transforms or {}) - set(self.encoders)
        if unknown:
            raise ConfigError(
                f"input transform for unknown modality {sorted(unknown)}; the model has {self.modalities}"
            )
        # only modalities that have one: a model without transforms keeps its old state_dict
        self.transforms = nn.ModuleDict(transforms) if transforms else None

    def transform(self, inputs: Batch) -> Batch:
        """The encoders' inputs: each stored modality through its input transform (if any)."""
        if self.transforms is None:
            return inputs
        return {m: self.transforms[m](x) if m in self.transforms else x for m, x in inputs.items()}

    def input_encoder(self, name: str) -> nn.Module:
        """``encoders[name]`` preceded by its input transform: the map from stored values to features.

        What a certifier must bound (it shares the model's modules); the bare encoder when the
        modality has no transform.
        """
        enc = self.encoders[name]
        if self.transforms is None or name not in self.transforms:
            return enc
        return nn.Sequential(self.transforms[name], enc)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def encode(self, inputs: Batch) -> dict[str, torch.Tensor]:
        missing = [m for m in self.encoders if m not in inputs]
        if missing:
            raise DataError(f"batch lacks modality {missing}; the model expects {self.modalities}")
        if self.transforms is not None:
            inputs = self.transform({m: inputs[m] for m in self.encoders})
        return {m: enc(inputs[m]) for m, enc in self.encoders.items()}

    def forward(self, inputs: Batch, return_all: bool = False) -> torch.Tensor | dict[str, Any]:
        feats = self.encode(inputs)
        if not return_all:
            return self.head(feats)
        scores = self.head.scores(feats)
        out = {"logits": self.head.combine(scores), "features": feats, "scores": scores}
        if self.aux is not None:
            out["aux_logits"] = {m: head(feats[m]) for m, head in self.aux.items()}
        return out


def build_model(meta: DatasetMeta, cfg: ModelConfig | None = None) -> LateFusionModel:
    """Build a :class:`LateFusionModel` for ``meta`` from a :class:`ModelConfig`."""
    cfg = cfg or ModelConfig()
    unknown = set(cfg.encoders) - set(meta.modality_names)
    if unknown:
        raise ConfigError(f"encoder override for unknown modality {sorted(unknown)}; dataset has {meta.modality_names}")
    if cfg.feature_dim < 1:
        raise ConfigError(f"feature_dim must be >= 1, got {cfg.feature_dim}")
    specs = {s.name: encoder_spec(meta, s.name) for s in meta.modalities}  # a waveform's encoder reads features
    names = {
        m: cfg.encoders.get(m) or (lipschitz_encoder(s) if cfg.lipschitz_encoders else None) for m, s in specs.items()
    }
    encoders = {m: build_encoder(s, names[m], cfg.feature_dim) for m, s in specs.items()}
    dims = {m: int(cast(int, e.out_dim)) for m, e in encoders.items()}
    if cfg.feature_memory:
        encoders = {m: SparseCodingMemory(e, cfg.feature_memory) for m, e in encoders.items()}
    head = cast(FusionHead, HEADS.get(cfg.head)(dims, meta.num_classes))
    aux: dict[str, nn.Module] | None = (
        {m: nn.Linear(d, meta.num_classes) for m, d in dims.items()} if cfg.aux_heads else None
    )
    return LateFusionModel(encoders, head, meta.num_classes, aux, build_transforms(meta))
