"""The zero-shot pipeline of a frozen "Bind-style" encoder, and its calibration heads.

Per modality ``m`` a frozen encoder ``f_m`` maps an input into a shared embedding space where each
class ``k`` has a fixed centre ``c_k`` (for instance the text embedding of a prompt). A projection
head ``g_m`` (the only trainable part) sits between encoder and centres, and the prediction is

    y_hat = argmax_k cos(g_m(f_m(x)), c_k)

Without a head (``g_m`` = identity) this is the plain zero-shot classifier of the frozen model.
Attacks see the whole pipeline (encoder, head, cosine) through :meth:`BindModel.classifier`, a
model over a ``{modality: tensor}`` batch like every other mmrobust model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.errors import ConfigError, DataError

#: CLIP's logit scale: the attacks' CE and DLR losses see ``LOGIT_SCALE * cosine``
LOGIT_SCALE = 100.0


class FrozenEncoder(nn.Module):
    """Wraps an ``nn.Module`` or any callable ``x -> (N, D)`` and keeps it frozen.

    The wrapped module stays in eval mode whatever mode its parent is put in (batch-norm statistics
    and dropout of a pretrained encoder must not change during calibration) and its parameters
    never require gradients; gradients still flow to the *input*, which the attacks need.
    """

    def __init__(self, encoder: nn.Module | Callable[[torch.Tensor], torch.Tensor], name: str) -> None:
        super().__init__()
        if not callable(encoder):
            raise ConfigError(f"encoder '{name}' is not callable (got {type(encoder).__name__})")
        self.name = name
        self.module = encoder if isinstance(encoder, nn.Module) else None
        self._fn = None if isinstance(encoder, nn.Module) else encoder
        if self.module is not None:
            self.module.requires_grad_(False)
            self.module.eval()

    def train(self, mode: bool = True) -> FrozenEncoder:
        super().train(mode)
        if self.module is not None:
            self.module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self.module if self.module is not None else self._fn
        assert fn is not None
        z = fn(x)
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != x.shape[0]:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise DataError(f"encoder '{self.name}' must return an (N, D) tensor for N={x.shape[0]} inputs, got {got}")
        return z

    def num_parameters(self) -> int | None:
        """Parameter count, or None for an opaque callable (its size is unknown to us)."""
        return None if self.module is None else sum(p.numel() for p in self.module.parameters())


class ProjectionHead(nn.Module):
    """The calibration head ``g(z) = W2 gelu(W1 z + b1) + b2`` (``dim -> hidden -> dim``).

    A plain MLP rather than a residual one, so that stage 1 (distillation towards the identity) is a
    real fit and stage 2 starts from a head that reproduces the frozen embeddings.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class BindModel(nn.Module):
    """Frozen encoders + fixed class centres + optional per-modality heads.

    Args:
        encoders: ``{modality: encoder}`` (modules or callables returning ``(N, D)``).
        centres: one ``(K, D)`` matrix shared by all modalities, or ``{modality: (K, D)}``; rows are
            L2-normalised here.
        heads: ``{modality: head}`` for the calibrated model; a modality without one uses the frozen
            embedding directly.
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module | Callable[[torch.Tensor], torch.Tensor]],
        centres: torch.Tensor | Mapping[str, torch.Tensor],
        heads: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if not encoders:
            raise ConfigError("BindModel needs at least one encoder")
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(
            {m: e if isinstance(e, FrozenEncoder) else FrozenEncoder(e, m) for m, e in encoders.items()}
        )
        per_modality = centres if isinstance(centres, Mapping) else {m: centres for m in self.modalities}
        missing = [m for m in self.modalities if m not in per_modality]
        if missing:
            raise ConfigError(f"no class centres for modality {missing}; centres given for {sorted(per_modality)}")
        extra = sorted(set(per_modality) - set(self.modalities))
        if extra:
            raise ConfigError(f"class centres given for unknown modality {extra}; modalities: {self.modalities}")
        ks = set()
        for m in self.modalities:
            c = per_modality[m]
            if not isinstance(c, torch.Tensor) or c.ndim != 2 or c.shape[0] < 2:
                got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
                raise ConfigError(f"centres for '{m}' must be a (K, D) tensor with K >= 2 classes, got {got}")
            if not torch.isfinite(c).all():
                raise ConfigError(f"centres for '{m}' contain NaN or inf")
            ks.add(int(c.shape[0]))
            self.register_buffer(f"centres_{m}", F.normalize(c.detach().float(), dim=1))
        if len(ks) != 1:
            raise ConfigError(f"all modalities need the same number of classes, got {sorted(ks)}")
        self.num_classes = ks.pop()
        self.heads = nn.ModuleDict(dict(heads or {}))

    def centres(self, m: str) -> torch.Tensor:
        c = getattr(self, f"centres_{m}")
        assert isinstance(c, torch.Tensor)
        return c

    def dim(self, m: str) -> int:
        return int(self.centres(m).shape[1])

    def features(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """The frozen embedding ``f_m(x)`` (unnormalised)."""
        return self.encoders[m](x)

    def project(self, m: str, z: torch.Tensor) -> torch.Tensor:
        """``g_m(z)``, the identity where the modality has no head."""
        return self.heads[m](z) if m in self.heads else z

    def embed(self, m: str, x: torch.Tensor) -> torch.Tensor:
        """``g_m(f_m(x))`` (unnormalised)."""
        return self.project(m, self.features(m, x))

    def cosine_logits(self, m: str, z: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
        """``scale * cos(z, c_k)`` for every class ``k``: ``(N, K)``."""
        return scale * F.normalize(z, dim=1) @ self.centres(m).T

    def logits(self, m: str, x: torch.Tensor) -> torch.Tensor:
        return self.cosine_logits(m, self.embed(m, x))

    def classifier(self, m: str) -> ModalityClassifier:
        """The zero-shot classifier of modality ``m`` as a model over ``{m: tensor}`` batches."""
        if m not in self.encoders:
            raise ConfigError(f"unknown modality '{m}'; choose from: {', '.join(self.modalities)}")
        return ModalityClassifier(self, m)

    def with_heads(self, heads: Mapping[str, nn.Module]) -> BindModel:
        """The same (shared, not copied) encoders and centres with other heads."""
        return BindModel(dict(self.encoders.items()), {m: self.centres(m) for m in self.modalities}, heads)


class ModalityClassifier(nn.Module):
    """``batch -> logits`` of one modality's zero-shot classifier (what the attacks see)."""

    def __init__(self, model: BindModel, modality: str) -> None:
        super().__init__()
        self.model = model
        self.modality = modality
        self.modalities = [modality]
        self.num_classes = model.num_classes

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.model.logits(self.modality, inputs[self.modality])
