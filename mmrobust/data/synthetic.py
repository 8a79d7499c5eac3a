"""Synthetic multi-modal Gaussian data with a chosen informativeness per modality.

Each modality m draws class prototypes ``mu_k^(m)`` uniformly on a sphere of radius ``signal_m``
and samples ``x = mu_y + noise_m * N(0, I)``; a modality with a high signal-to-noise ratio is the one
a jointly trained model will prefer, which is how modality preference is created on purpose.
"""

from __future__ import annotations

import torch

from mmrobust.data.base import DataBundle, DatasetMeta, ModalitySpec, Split
from mmrobust.data.registry import DATASETS
from mmrobust.errors import DataError


def _floats(value: str | float | list | tuple, what: str) -> list[float]:
    if isinstance(value, str):
        try:
            return [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise DataError(f"synthetic: '{what}' must be comma-separated numbers, got '{value}'") from None
    if isinstance(value, list | tuple):
        return [float(v) for v in value]
    return [float(value)]


@DATASETS.register("synthetic")
def load_synthetic(
    seed: int = 0,
    names: str | list[str] = "strong,weak",
    signal: str | list[float] = "3.0,1.0",
    noise: str | list[float] = "1.0",
    dim: int | str = 32,
    classes: int | str = 10,
    n_train: int | str = 2000,
    n_val: int | str = 500,
    n_test: int | str = 1000,
) -> DataBundle:
    """Generate a seeded synthetic dataset; lists are per modality, scalars are broadcast."""
    mod_names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    m = len(mod_names)
    sig, noi, dims = _floats(signal, "signal"), _floats(noise, "noise"), [int(d) for d in _floats(dim, "dim")]
    sig, noi, dims = [v * m if len(v) == 1 else v for v in (sig, noi, dims)]
    for what, vals in (("signal", sig), ("noise", noi), ("dim", dims)):
        if len(vals) != m:
            raise DataError(f"synthetic: '{what}' has {len(vals)} value(s) for {m} modalities {mod_names}")
    if any(n <= 0 for n in noi) or any(s < 0 for s in sig) or any(d < 1 for d in dims):
        raise DataError("synthetic: noise must be > 0, signal >= 0 and dim >= 1")
    k = int(classes)
    if k < 2:
        raise DataError(f"synthetic: need at least 2 classes, got {k}")
    g = torch.Generator().manual_seed(int(seed))
    protos = []
    for s, d in zip(sig, dims, strict=True):
        p = torch.randn(k, d, generator=g)
        protos.append(s * p / p.norm(dim=1, keepdim=True))

    def make(n: int) -> Split:
        y = torch.randint(0, k, (n,), generator=g)
        inputs = {
            name: p[y] + sd * torch.randn(n, p.shape[1], generator=g)
            for name, p, sd in zip(mod_names, protos, noi, strict=True)
        }
        return Split(inputs, y)

    train, val, test = make(int(n_train)), make(int(n_val)), make(int(n_test))
    meta = DatasetMeta(
        "synthetic",
        [ModalitySpec(name, "vector", (d,)) for name, d in zip(mod_names, dims, strict=True)],
        [f"class{i}" for i in range(k)],
        info={"signal": sig, "noise": noi},
    )
    return DataBundle(meta, train, val, test)
