"""Per-epoch training checkpoints, so that ``mmrobust train --resume`` continues a killed run.

A checkpoint holds everything the next epoch depends on: model and best-so-far weights,
optimiser and scheduler state, the global and the strategy's RNG states, the strategy's own state,
the history and the selection key, and the data fingerprint taken when the run first started.
Resuming from it reproduces the uninterrupted run bit for bit
(same seed, same data order: the shuffle of epoch ``e`` depends only on ``(seed, e)``).

Layout (inside the run's ``.NAME.partial`` folder): ``checkpoint-E.safetensors`` (every tensor)
and ``checkpoint.json`` (everything else, and which tensor file belongs to it). The JSON file is
replaced atomically after its tensor file is complete, so a kill at any moment leaves a
consistent pair; older tensor files are removed afterwards.

Before a checkpoint is used it is verified: ``checkpoint.json`` records the sha256 of its tensor file
and of its own fields (everything but the digests: epoch, history, settings, ...); tampered bytes
or an edited epoch are refused in one line naming the file, and the checkpoint is left in place.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmrobust.errors import RunError
from mmrobust.io import _clean_floats, _json_default, load_tensors, read_json, save_tensors, sha256_file, write_json

CHECKPOINT_JSON = "checkpoint.json"
FORMAT = 2  # 2: sha256 digests of the tensor file and of the fields; the data fingerprint


@dataclass
class TrainingState:
    """What one epoch hands to the next."""

    epoch: int  # epochs completed
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor] | None
    best_key: tuple[float, float]
    best_epoch: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rng: torch.Tensor  # torch's global CPU generator
    generator: torch.Tensor  # the strategy's step generator
    strategy: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    config: dict[str, Any]
    scaler: dict[str, Any] | None = None  # fp16 gradient scaler (loss scale and growth tracker)
    data_fingerprint: str | None = None  # of the data when the run first started (checked at resume)
    data_fingerprints: list[str] | None = None  # every fingerprint accepted (allow_data_change)


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor inside ``obj`` by ``{"__tensor__": key}`` and collect it in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split_tensors(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:  # keys keep their type (optimiser state uses ints)
        return {k: _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_checkpoint(folder: Path, state: TrainingState) -> None:
    tensors: dict[str, torch.Tensor] = {}
    doc = {
        "format": FORMAT,
        "epoch": state.epoch,
        "best_key": list(state.best_key),
        "best_epoch": state.best_epoch,
        "history": state.history,
        "config": state.config,
        "model": _split_tensors(state.model, "model", tensors),
        "best_model": _split_tensors(state.best_model, "best", tensors) if state.best_model is not None else None,
        "optimizer": _split_tensors(state.optimizer, "optim", tensors),
        "scheduler": _split_tensors(state.scheduler, "sched", tensors) if state.scheduler is not None else None,
        "rng": _split_tensors(state.rng, "rng", tensors),
        "generator": _split_tensors(state.generator, "gen", tensors),
        "strategy": _split_tensors(state.strategy, "strategy", tensors),
        "scaler": _split_tensors(state.scaler, "scaler", tensors) if state.scaler is not None else None,
        "data_fingerprint": state.data_fingerprint,
        "data_fingerprints": state.data_fingerprints,
    }
    name = f"checkpoint-{state.epoch}.safetensors"
    doc["tensors"] = name
    save_tensors(folder / name, tensors)
    doc = json.loads(json.dumps(_clean_floats(doc), default=_json_default))  # exactly what is read back
    doc["sha256"] = {"tensors": sha256_file(folder / name), "fields": _fields_digest(doc)}
    write_json(folder / CHECKPOINT_JSON, doc)
    for old in folder.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _fields_digest(doc: dict[str, Any]) -> str:
    """sha256 of every field of ``checkpoint.json`` but the digests themselves (canonical JSON)."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """``checkpoint.json``, checked against its digests (its fields and its tensor file) before use."""
    path = folder / CHECKPOINT_JSON
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RunError(f"{path}: not a checkpoint of this mmrobust version; pass force=True to start over",
                       param="force")  # fmt: skip
    digests = doc.get("sha256")
    name = doc.get("tensors")
    if not isinstance(digests, dict) or not isinstance(name, str) or "/" in name or name.startswith("."):
        raise RunError(f"{path}: malformed checkpoint (no digests); pass force=True to start over", param="force")
    if digests.get("fields") != _fields_digest(doc):
        raise RunError(
            f"{path}: edited after it was written (its fields, e.g. epoch or history, no longer match their "
            "sha256); the checkpoint is kept: restore it, or pass force=True to start over",
            param="force",
        )
    tensor_file = folder / name
    if not tensor_file.is_file() or sha256_file(tensor_file) != digests.get("tensors"):
        raise RunError(
            f"{tensor_file}: missing or changed after it was written (sha256 differs from {CHECKPOINT_JSON}); "
            "the checkpoint is kept: restore it, or pass force=True to start over",
            param="force",
        )
    return doc


def load_checkpoint(folder: Path) -> TrainingState:
    doc = verify_checkpoint(folder)
    try:
        tensors = load_tensors(folder / doc["tensors"])
        best = doc["best_model"]
        sched = doc["scheduler"]
        scaler = doc.get("scaler")
        return TrainingState(
            epoch=int(doc["epoch"]),
            model=_join_tensors(doc["model"], tensors),
            best_model=_join_tensors(best, tensors) if best is not None else None,
            best_key=(float(doc["best_key"][0]), float(doc["best_key"][1])),
            best_epoch=int(doc["best_epoch"]),
            optimizer=_join_tensors(doc["optimizer"], tensors),
            scheduler=_join_tensors(sched, tensors) if sched is not None else None,
            rng=_join_tensors(doc["rng"], tensors),
            generator=_join_tensors(doc["generator"], tensors),
            strategy=_join_tensors(doc["strategy"], tensors),
            history=list(doc["history"]),
            config=dict(doc["config"]),
            scaler=_join_tensors(scaler, tensors) if scaler is not None else None,
            data_fingerprint=doc.get("data_fingerprint"),
            data_fingerprints=doc.get("data_fingerprints"),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise RunError(f"{folder / CHECKPOINT_JSON}: corrupt checkpoint ({exc})") from None


def config_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first setting that differs between two config dicts (dotted key), ignoring progress bars,
    the memory budget (it only sizes the batches of the passes after training) and the device (a
    per-command setting: a run interrupted on a GPU may continue on another one, or on the CPU)."""

    def flat(d: Any, prefix: str = "") -> dict[str, str]:
        if isinstance(d, dict):
            out: dict[str, str] = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix.rstrip("."): json.dumps(d, sort_keys=True, default=str)}

    a, b = flat(saved), flat(current)
    for key in sorted(set(a) | set(b)):
        if key in ("train.progress", "train.memory_budget", "train.device"):
            continue
        if a.get(key) != b.get(key):
            return key
    return None
