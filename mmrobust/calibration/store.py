"""Calibration heads on disk: ``<name>.safetensors`` (weights, keys ``<modality>.<parameter>``) and
``<name>.json`` (architecture, options, training history). No pickle."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mmrobust.calibration.pipeline import ProjectionHead
from mmrobust.calibration.train import CalibrationResult
from mmrobust.errors import RunError
from mmrobust.io import load_tensors, read_json, save_tensors, write_json

FORMAT = "mmrobust-calibration-heads-v1"


def save_heads(folder: str | Path, name: str, result: CalibrationResult) -> list[Path]:
    """Write the heads of ``result``; returns the two paths written."""
    folder = Path(folder)
    tensors = {f"{m}.{k}": v for m, h in result.heads.items() for k, v in h.head.state_dict().items()}
    heads = {}
    for m, h in result.heads.items():
        head = h.head
        assert isinstance(head, ProjectionHead)
        heads[m] = {"dim": head.dim, "hidden": head.hidden, **h.to_dict()}
    st, js = folder / f"{name}.safetensors", folder / f"{name}.json"
    save_tensors(st, tensors)
    write_json(js, {"format": FORMAT, "options": result.options.to_dict(), "heads": heads})
    return [st, js]


def load_heads(folder: str | Path, name: str) -> dict[str, nn.Module]:
    """Rebuild ``{modality: ProjectionHead}`` saved by :func:`save_heads`."""
    folder = Path(folder)
    meta = read_json(folder / f"{name}.json")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunError(f"{folder / name}.json: not a calibration-heads file (format {FORMAT})")
    tensors = load_tensors(folder / f"{name}.safetensors")
    out: dict[str, nn.Module] = {}
    for m, spec in meta["heads"].items():
        head = ProjectionHead(int(spec["dim"]), int(spec["hidden"]))
        state = {k[len(m) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{m}.")}
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise RunError(f"{folder / name}.safetensors: weights of '{m}' do not match its JSON ({exc})") from None
        out[m] = head.requires_grad_(False).eval()
    return out
