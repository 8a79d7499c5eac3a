"""User encoders given as text (the ``calibrate`` command's encoders SPEC, centres FILE and data).

SPEC is a comma-separated list of ``MODALITY=MODULE:FACTORY`` entries, e.g.
``audio=mypkg.enc:make_audio,image=mypkg.enc:make_image``: ``FACTORY`` is called with no
arguments and returns an ``nn.Module`` or a callable ``(N, ...) -> (N, D)``; ``MODALITY`` must be a
modality of the data. FILE is a safetensors file with a ``(K, D)`` tensor ``centres`` shared by
every modality, or one tensor per modality named after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmrobust.errors import ConfigError, RunError
from mmrobust.io import load_tensors
from mmrobust.plugins import load_object


def parse_encoder_spec(spec: str) -> dict[str, tuple[str, str]]:
    """``"a=pkg.mod:fn,b=pkg.mod:fn2"`` -> ``{"a": ("pkg.mod", "fn"), ...}`` (syntax only)."""
    out: dict[str, tuple[str, str]] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "=" not in item or ":" not in item.split("=", 1)[1]:
            raise ConfigError(f"encoders: '{item}' must look like MODALITY=MODULE:FACTORY", param="encoders")
        m, target = (s.strip() for s in item.split("=", 1))
        module, factory = (s.strip() for s in target.rsplit(":", 1))
        if not m or not module or not factory:
            raise ConfigError(f"encoders: '{item}' must look like MODALITY=MODULE:FACTORY", param="encoders")
        if m in out:
            raise ConfigError(f"encoders: modality '{m}' given twice", param="encoders")
        out[m] = (module, factory)
    if not out:
        raise ConfigError("encoders: no MODALITY=MODULE:FACTORY entry given", param="encoders")
    return out


def load_encoders(spec: str) -> dict[str, Any]:
    """Import and call each factory of SPEC (imported with :func:`mmrobust.plugins.load_object`)."""
    encoders = {}
    for m, (module, factory) in parse_encoder_spec(spec).items():
        try:
            fn = load_object(f"{module}:{factory}", "encoders", param="encoders")
        except ConfigError as exc:
            raise ConfigError(f"encoders: {exc} (for '{m}')", param="encoders") from None
        if not callable(fn):
            raise ConfigError(
                f"encoders: '{module}:{factory}' (for '{m}') is a {type(fn).__name__}, not a factory to call",
                param="encoders",
            )
        encoders[m] = fn()
    return encoders


def load_centres(path: str | Path, modalities: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The class centres of FILE: the shared ``centres`` tensor, or one tensor per modality."""
    try:
        tensors = load_tensors(path)
    except RunError as exc:
        raise ConfigError(f"centres: {exc}", param="centres") from None
    if "centres" in tensors:
        extra = sorted(set(tensors) - {"centres"})
        if extra:
            raise ConfigError(
                f"centres {path}: holds 'centres' and also {extra}; give one shared or one per modality",
                param="centres",
            )
        return tensors["centres"]
    missing = [m for m in modalities if m not in tensors]
    if missing:
        raise ConfigError(
            f"centres {path}: no tensor 'centres' nor one for modality {missing}; it has {sorted(tensors)}",
            param="centres",
        )
    return {m: tensors[m] for m in modalities}
