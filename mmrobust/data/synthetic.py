"""Synthetic multi-modal Gaussian data with a chosen informativeness per modality.

Each modality m draws class prototypes ``mu_k^(m)`` uniformly on a sphere of radius ``signal_m``
and samples ``x = mu_y + noise_m * N(0, I)``; a modality with a high signal-to-noise ratio is the one
a jointly trained model will prefer, which is how modality preference is created on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmrobust.data.base import DataBundle, DatasetMeta, ModalitySpec, Split
from mmrobust.data.registry import DATASETS
from mmrobust.errors import ConfigError
from mmrobust.options import build_options


def _items(value: Any, what: str) -> list[str]:
    """A comma-separated string, a list or a scalar -> list of stripped strings."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, list | tuple):
        items = [str(v).strip() for v in value]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        items = [str(value)]
    else:
        raise ConfigError(f"synthetic: '{what}' must be a list or comma-separated values, got {value!r}")
    if not items or any(not v for v in items):
        raise ConfigError(f"synthetic: '{what}' has an empty entry: {value!r}")
    return items


def _numbers(value: Any, what: str, cast: type) -> list[Any]:
    out = []
    for text in _items(value, what):
        try:
            v = cast(text)
        except ValueError:
            raise ConfigError(f"synthetic: '{what}' must hold {cast.__name__} values, got {text!r}") from None
        if not float(v) == float(v) or abs(float(v)) == float("inf"):
            raise ConfigError(f"synthetic: '{what}' must be finite, got {text!r}")
        out.append(v)
    return out


@dataclass
class SyntheticOptions:
    """Options of ``synthetic`` (``--data-opt KEY=VALUE``); per-modality values are comma lists,
    a single value is broadcast to every modality."""

    names: str | list[str] = "strong,weak"
    signal: str | list[float] | float = "3.0,1.0"
    noise: str | list[float] | float = "1.0"
    dim: str | list[int] | int = 32
    classes: int = 10
    n_train: int = 2000
    n_val: int = 500
    n_test: int = 1000
    # parsed per-modality values (filled by __post_init__)
    modality_names: list[str] = field(init=False)
    signals: list[float] = field(init=False)
    noises: list[float] = field(init=False)
    dims: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.modality_names = _items(self.names, "names")
        m = len(self.modality_names)
        if len(set(self.modality_names)) != m:
            raise ConfigError(f"synthetic: duplicate modality names {self.modality_names}")
        lists = {
            "signal": _numbers(self.signal, "signal", float),
            "noise": _numbers(self.noise, "noise", float),
            "dim": _numbers(self.dim, "dim", int),
        }
        for what, vals in lists.items():
            if len(vals) == 1:
                lists[what] = vals * m
            elif len(vals) != m:
                raise ConfigError(
                    f"synthetic: '{what}' has {len(vals)} value(s) for {m} modalities {self.modality_names}"
                )
        self.signals, self.noises, self.dims = lists["signal"], lists["noise"], lists["dim"]
        if any(n <= 0 for n in self.noises) or any(s < 0 for s in self.signals):
            raise ConfigError("synthetic: noise must be > 0 and signal >= 0")
        if any(not 1 <= d <= 1_000_000 for d in self.dims):
            raise ConfigError(f"synthetic: dim must be in 1..1000000, got {self.dims}")
        if not 2 <= self.classes <= 100_000:
            raise ConfigError(f"synthetic: classes must be in 2..100000, got {self.classes}")
        for what in ("n_train", "n_val", "n_test"):
            n = getattr(self, what)
            if not 1 <= n <= 10_000_000:
                raise ConfigError(f"synthetic: {what} must be in 1..10000000, got {n}")


@DATASETS.register("synthetic")
def load_synthetic(seed: int = 0, **options: Any) -> DataBundle:
    """Generate a seeded synthetic dataset; ``options`` fill :class:`SyntheticOptions`."""
    opts = build_options(SyntheticOptions, options, "synthetic")
    mod_names, sig, noi, dims = opts.modality_names, opts.signals, opts.noises, opts.dims
    k = opts.classes
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

    train, val, test = make(opts.n_train), make(opts.n_val), make(opts.n_test)
    meta = DatasetMeta(
        "synthetic",
        [ModalitySpec(name, "vector", (d,)) for name, d in zip(mod_names, dims, strict=True)],
        [f"class{i}" for i in range(k)],
        info={"signal": sig, "noise": noi},
    )
    return DataBundle(meta, train, val, test)
