"""Missing-modality evaluation: replace whole modalities by a fill value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mmrobust.data.base import Batch
from mmrobust.errors import ConfigError

FILLS = ("zero", "mean", "noise")


class MissingModality:
    """Replace ``modalities`` by a fill; the others stay bit-identical.

    ``zero``: zeros in the model's standardised space (the train mean); ``mean``: the per-sample
    mean of the modality, broadcast; ``noise``: standard Gaussian noise in the standardised space
    (seeded). ``standardization`` gives ``(mean, std)`` of the modalities the model standardises
    itself (stored values ``x`` enter it as ``(x - mean) / std``): their fills are mapped back to
    stored units. Call it like an attack: ``adv = MissingModality(["audio"])(inputs, labels)``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        fill: str = "zero",
        seed: int = 0,
        standardization: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if fill not in FILLS:
            raise ConfigError(f"unknown fill '{fill}'; choose from: {', '.join(FILLS)}")
        if not modalities:
            raise ConfigError("missing-modality evaluation needs at least one modality to remove")
        self.modalities = list(modalities)
        self.fill = fill
        self.generator = torch.Generator().manual_seed(seed)
        self.standardization = dict(standardization or {})

    def __call__(self, inputs: Batch, labels: torch.Tensor | None = None) -> Batch:
        out = dict(inputs)
        for m in self.modalities:
            if m not in inputs:
                raise ConfigError(f"unknown modality '{m}'; the batch has: {', '.join(inputs)}")
            x = inputs[m]
            if self.fill == "mean":
                out[m] = x.flatten(1).mean(1).view(-1, *[1] * (x.ndim - 1)).expand_as(x).clone()
                continue
            z = (
                torch.zeros_like(x)
                if self.fill == "zero"
                else torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)
            )
            if m in self.standardization:  # the fill is defined in the standardised space: map it back
                mean, std = (t.to(device=x.device, dtype=x.dtype) for t in self.standardization[m])
                z = z * std + mean
            out[m] = z
        return out
