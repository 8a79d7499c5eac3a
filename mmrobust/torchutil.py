"""Small torch helpers every floor uses (ground floor: imports nothing of mmrobust)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (BN statistics untouched) and restore afterwards every submodule's own
    mode (not ``model.train(flag)``, which would switch a wrapped model to the wrapper's mode: a
    freshly built wrapper starts in train mode)."""
    modes = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for mod, mode in modes:
            mod.training = mode


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Move a ``{modality: tensor}`` batch to ``device``.

    To CUDA through pinned host memory with ``non_blocking`` copies (the copy overlaps the GPU's
    work; tensors a DataLoader already pinned are not copied twice); elsewhere a plain ``.to``
    (a tensor already there is returned as it is).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    out = {}
    for k, v in batch.items():
        if v.device.type == "cpu" and not v.is_pinned():
            v = v.pin_memory()
        out[k] = v.to(device, non_blocking=True)
    return out
