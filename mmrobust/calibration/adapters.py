"""Adapters that turn installed ImageBind / LanguageBind models into ``{modality: encoder}`` dicts
for :class:`~mmrobust.calibration.pipeline.BindModel`.

Nothing is imported at module load and nothing is downloaded: the packages must be installed and
the weights already on disk (a checkpoint file for ImageBind, a filled model cache folder for
LanguageBind). Whatever is missing is named in a one-line :class:`ConfigError`. Each encoder takes
the tensor the package's own preprocessing produces and returns its ``(N, D)`` embeddings; the
valid input range of those tensors must be declared in the dataset metadata for l-inf attacks.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmrobust.errors import ConfigError

IMAGEBIND_MODALITIES = ("vision", "audio", "text", "depth", "thermal", "imu")
LANGUAGEBIND_MODALITIES = ("image", "video", "audio", "depth", "thermal", "language")


def require_package(module: str, what: str) -> None:
    """One-line error naming ``module`` when it is not importable (checked without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{what} needs the '{module}' package, which is not installed (install it to use this adapter)"
        )


class _KeyedEncoder(nn.Module):
    """``x -> model({key: x})[key]``: one modality of a model that embeds dicts of modalities."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model({self.key: x})[self.key]


def imagebind_encoders(checkpoint: str | Path, modalities: Sequence[str] = ("vision", "audio")) -> dict[str, nn.Module]:
    """ImageBind-Huge encoders for ``modalities`` with weights read from ``checkpoint`` (no download)."""
    require_package("imagebind", "the ImageBind adapter")
    bad = [m for m in modalities if m not in IMAGEBIND_MODALITIES]
    if bad:
        raise ConfigError(f"ImageBind has no modality {bad}; choose from: {', '.join(IMAGEBIND_MODALITIES)}")
    path = Path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"ImageBind checkpoint not found: {path} (the adapter never downloads weights)")
    ib: Any = importlib.import_module("imagebind.models.imagebind_model")
    model = ib.imagebind_huge(pretrained=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    return {m: _KeyedEncoder(model, m) for m in modalities}


def imagebind_text_centres(model_encoders: dict[str, nn.Module], prompts: Sequence[str]) -> torch.Tensor:
    """``(K, D)`` ImageBind text embeddings of ``prompts`` (the tokenizer vocabulary ships in the package)."""
    require_package("imagebind", "ImageBind text centres")
    data: Any = importlib.import_module("imagebind.data")
    first = next(iter(model_encoders.values()))
    assert isinstance(first, _KeyedEncoder)
    with torch.no_grad():
        return first.model({"text": data.load_and_transform_text(list(prompts), "cpu")})["text"]


def languagebind_encoders(
    cache_dir: str | Path, modalities: Sequence[str] = ("image", "audio")
) -> dict[str, nn.Module]:
    """LanguageBind encoders for ``modalities`` from an already filled model cache (hub offline)."""
    require_package("languagebind", "the LanguageBind adapter")
    bad = [m for m in modalities if m not in LANGUAGEBIND_MODALITIES]
    if bad:
        raise ConfigError(f"LanguageBind has no modality {bad}; choose from: {', '.join(LANGUAGEBIND_MODALITIES)}")
    folder = Path(cache_dir)
    if not folder.is_dir():
        raise ConfigError(f"LanguageBind cache folder not found: {folder} (the adapter never downloads weights)")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a missing model then fails instead of being fetched
    lb: Any = importlib.import_module("languagebind")
    names = {"image": "LanguageBind_Image", "video": "LanguageBind_Video_FT", "audio": "LanguageBind_Audio_FT",
             "depth": "LanguageBind_Depth", "thermal": "LanguageBind_Thermal"}  # fmt: skip
    clip_type = {m: names[m] for m in modalities if m in names}
    try:
        model = lb.LanguageBind(clip_type=clip_type, cache_dir=str(folder)).eval()
    except OSError as exc:
        raise ConfigError(f"LanguageBind weights for {sorted(clip_type)} not found in {folder}: {exc}") from None
    return {m: _KeyedEncoder(model, m) for m in clip_type}
