"""Tiny stand-in "Bind" setups for the calibration tests (no extra packages needed).

Each modality has 4 informative input coordinates and 4 nuisance ones that are constant (0.5) on
clean data. The frozen encoder passes the informative part through and amplifies the nuisance part
by ``gain``; the class centres have non-zero nuisance components. So the frozen zero-shot
classifier is perfect on clean data but an l-inf perturbation of 8/255 on the nuisance inputs
moves the embedding by ``gain * 8/255`` per coordinate and breaks it, while a head that damps the
nuisance coordinates is both accurate and robust: calibration has something real to learn.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmrobust.calibration import BindModel, CalibrationSetup
from mmrobust.data.base import DataBundle, DatasetMeta, ModalitySpec, Split

D_SIGNAL, D_NUISANCE, CLASSES = 4, 4, 4


class NuisanceEncoder(nn.Module):
    """``f(x) = [x_signal - 0.5, gain * (x_nuisance - 0.5)]`` behind a batch-norm layer in eval mode
    (its running statistics must survive calibration untouched)."""

    def __init__(self, gain: float = 20.0) -> None:
        super().__init__()
        self.gain = gain
        self.bn = nn.BatchNorm1d(D_SIGNAL + D_NUISANCE, affine=False)
        with torch.no_grad():
            self.bn.running_var = torch.ones(D_SIGNAL + D_NUISANCE)
            self.bn.running_mean = torch.full((D_SIGNAL + D_NUISANCE,), 0.5)
        self.weight = nn.Parameter(torch.ones(D_SIGNAL + D_NUISANCE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.bn(x) * self.weight
        return torch.cat([z[:, :D_SIGNAL], self.gain * z[:, D_SIGNAL:]], 1)


def nuisance_setup(seed: int = 0, sizes: tuple[int, int, int] = (128, 64, 64), gain: float = 20.0) -> CalibrationSetup:
    g = torch.Generator().manual_seed(seed)
    patterns = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    patterns = torch.cat([patterns, torch.randint(0, 2, (CLASSES, D_SIGNAL - 2), generator=g).float() * 2 - 1], 1)
    mods = ["audio", "image"]

    def split(n: int) -> Split:
        y = torch.arange(n) % CLASSES
        inputs = {}
        for _ in mods:
            signal = (0.5 + 0.3 * patterns[y] + 0.05 * torch.randn(n, D_SIGNAL, generator=g)).clamp(0, 1)
            inputs[_] = torch.cat([signal, torch.full((n, D_NUISANCE), 0.5)], 1)
        return Split(inputs, y)

    train, val, test = (split(n) for n in sizes)
    meta = DatasetMeta(
        "nuisance",
        [ModalitySpec(m, "vector", (D_SIGNAL + D_NUISANCE,), (0.0, 1.0)) for m in mods],
        [str(k) for k in range(CLASSES)],
    )
    centres = torch.cat([0.3 * patterns, 0.3 * torch.randn(CLASSES, D_NUISANCE, generator=g)], 1)
    model = BindModel({m: NuisanceEncoder(gain) for m in mods}, centres)
    return CalibrationSetup(model, meta, DataBundle(meta, train, val, test), {"example": "nuisance"})


def nuisance_encoder() -> NuisanceEncoder:
    """Factory for ``--encoders MODALITY=tests.calibration_setups:nuisance_encoder``."""
    return NuisanceEncoder()


def nan_encoder() -> nn.Module:
    """An encoder whose embeddings are NaN (must be refused with a one-line error)."""

    class NaNEncoder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x), D_SIGNAL + D_NUISANCE), float("nan"))

    return NaNEncoder()


def write_folder_dataset(root, setup: CalibrationSetup, valid_ranges: bool = True) -> None:  # noqa: ANN001
    """The setup's splits as a bring-your-own data folder (un-normalised, with valid ranges)."""
    import json

    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "test"):
        split = setup.data.split(name)
        arrays: dict[str, Any] = {m: x.numpy() for m, x in split.inputs.items()}
        np.savez(root / f"{name}.npz", label=split.labels.numpy(), **arrays)
    meta = {"class_names": setup.meta.class_names, "normalize": False}
    if valid_ranges:
        meta["valid_ranges"] = {m: [0.0, 1.0] for m in setup.meta.modality_names}
    (root / "meta.json").write_text(json.dumps(meta))


#: not a factory (the calibrate command must refuse it in one line)
NOT_A_FACTORY = 3
