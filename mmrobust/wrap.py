"""Bring a trained model: turn a model factory + safetensors weights into a normal run folder.

``wrap_model("mypkg.models:build", "model.safetensors", DataConfig("avdigits"), "runs/mine")`` builds
the model with the factory (``build(meta)`` or ``build()``), loads the weights (safetensors only,
every key must match), measures its validation and test accuracy and writes a sealed run folder
(:class:`~mmrobust.runs.RunFolder`) whose ``config.json`` records ``model.factory`` and the
factory's module as a plug-in: :func:`~mmrobust.runs.load_run` rebuilds the model in a fresh
process from ``config.json`` + ``model.safetensors`` alone, and every command accepts the folder.

A factory that returns a :class:`~mmrobust.models.fusion.LateFusionModel` (e.g. built with
``LateFusionModel.from_modules``) gets every attack and certifier; any other ``dict -> logits``
module gets every attack and the model-agnostic ``empirical`` estimate (see docs/your-model.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from mmrobust.config import RunConfig, TrainConfig
from mmrobust.data.base import DataBundle, Split, iterate_batches
from mmrobust.data.registry import DataConfig, load_data
from mmrobust.errors import ConfigError, RunError
from mmrobust.io import load_tensors, sha256_file
from mmrobust.models.fusion import LateFusionModel, ModelConfig, WrappedModel, build_model, model_from_factory
from mmrobust.runs import RunFolder, save_run

#: suffixes of pickled checkpoints (refused: mmrobust never unpickles user files)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
#: how to convert a pickled checkpoint, in every refusal
CONVERT_HINT = (
    "convert it once, in the Python that trained it: "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
)
#: the rebuilt model must give the wrapped model's logits to this precision
REBUILD_TOLERANCE = 1e-5


@dataclass
class WrapResult:
    out: Path
    model: nn.Module
    metrics: dict[str, Any]
    late_fusion: bool


def check_weights_file(path: str | Path) -> Path:
    """``path`` must be a safetensors file; a pickle (``.pt`` and the like) is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: weights file not found", param="weights")
    head = path.open("rb").read(8)
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:2] in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04"):
        raise ConfigError(
            f"{path}: looks like a pickled PyTorch checkpoint; mmrobust reads safetensors only (it never "
            f"unpickles files); {CONVERT_HINT}",
            param="weights",
        )
    if len(head) < 8 or int.from_bytes(head, "little") <= 1 or path.open("rb").read(9)[8:9] != b"{":
        raise ConfigError(f"{path}: not a safetensors file; {CONVERT_HINT}", param="weights")
    return path


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model``; every key and shape must match (one line naming the first that does not)."""
    path = check_weights_file(path)
    try:
        state = load_tensors(path)
    except RunError as exc:
        raise ConfigError(str(exc), param="weights") from None
    own = model.state_dict()
    for key, t in own.items():
        if key not in state:
            raise ConfigError(
                f"{path}: does not match the model: key '{key}' is missing from the file "
                f"({len(state)} keys in the file, {len(own)} in the model)",
                param="weights",
            )
        if tuple(state[key].shape) != tuple(t.shape):
            raise ConfigError(
                f"{path}: does not match the model: key '{key}' has shape {tuple(state[key].shape)} in the "
                f"file, {tuple(t.shape)} in the model",
                param="weights",
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise ConfigError(
            f"{path}: does not match the model: the file has key '{extra[0]}', which the model lacks",
            param="weights",
        )
    for key, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConfigError(f"{path}: weight '{key}' holds NaN or inf values", param="weights")
    model.load_state_dict(state)


def _logits(model: nn.Module, split: Split, batch_size: int, num_classes: int, spec: str) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for inputs, _ in iterate_batches(split, batch_size):
            try:
                logits = model(inputs)
            except Exception as exc:
                raise ConfigError(
                    f"the model of '{spec}' fails on a batch of the data: {type(exc).__name__}: {exc}",
                    param="model",
                ) from None
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (
                len(next(iter(inputs.values()))),
                num_classes,
            ):
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ConfigError(
                    f"the model of '{spec}' must return (batch, {num_classes}) logits for a {{modality: batch}} "
                    f"dict, got {got}",
                    param="model",
                )
            out.append(logits.detach().float().cpu())
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else None


def wrap_model(
    factory: str,
    weights: str | Path,
    data: DataConfig | str,
    out: str | Path,
    *,
    force: bool = False,
    batch_size: int = 256,
    bundle: DataBundle | None = None,
) -> WrapResult:
    """Write the run folder ``out`` for the model of ``factory`` with ``weights`` on ``data`` (see the module doc)."""
    data_cfg = DataConfig(data) if isinstance(data, str) else data
    cfg = RunConfig(data=data_cfg, model=ModelConfig(factory=factory.strip()), train=TrainConfig(epochs=0))
    cfg.train.progress = False
    cfg.validate()  # before any work; records the factory's module as a plug-in below
    weights = check_weights_file(weights)
    folder = RunFolder(out, force=force)
    folder._check_target()
    bundle = bundle or load_data(data_cfg)
    meta = bundle.meta
    model = model_from_factory(cfg.model.factory, meta)
    # the file holds the state_dict of the module the factory returned
    load_weights(model.net if isinstance(model, WrappedModel) else model, weights)
    model.eval()
    cfg.validate()  # the factory's module is imported now: recorded in cfg.plugins
    val = _logits(model, bundle.val, batch_size, meta.num_classes, factory)
    test = _logits(model, bundle.test, batch_size, meta.num_classes, factory)
    # what load_run will do: a fresh build from the config + the saved state must give the same logits
    rebuilt = build_model(meta, cfg.model)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    probe = bundle.test if len(bundle.test) else bundle.val
    probe = probe.subset(slice(0, min(len(probe), 64)))
    diff = (_logits(rebuilt, probe, batch_size, meta.num_classes, factory) - test[: len(probe)]).abs().max()
    if len(probe) and not float(diff) <= REBUILD_TOLERANCE:
        raise ConfigError(
            f"model factory '{factory}': a fresh model from the factory with these weights gives other logits "
            f"(max difference {float(diff):.3g}); keep all of the model's state in its parameters and buffers "
            "and make the factory deterministic",
            param="model",
        )
    late = isinstance(model, LateFusionModel)
    metrics: dict[str, Any] = {
        "val_accuracy": _accuracy(val, bundle.val.labels),
        "test_accuracy": _accuracy(test, bundle.test.labels),
        "wrapped": {
            "factory": factory,
            "weights": weights.name,
            "weights_sha256": sha256_file(weights),
            "late_fusion": late,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        },
    }
    with folder:
        save_run(folder.partial, cast(LateFusionModel, model), cfg, bundle, metrics)
        path = folder.commit()
    return WrapResult(path, model, metrics, late)
