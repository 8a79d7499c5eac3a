"""Run folders on disk: ``model.safetensors`` + ``config.json`` + ``metrics.json``.

``config.json`` holds everything needed to rebuild the model and the data pipeline; the data are
re-derived deterministically from the data config (seeded splits, train-only statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrobust import __version__
from mmrobust.config import RunConfig
from mmrobust.data.base import DataBundle, DatasetMeta
from mmrobust.data.registry import load_data
from mmrobust.errors import RunError
from mmrobust.io import load_tensors, read_json, save_tensors, write_json
from mmrobust.models.fusion import LateFusionModel, build_model

MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"


def save_run(
    out: str | Path, model: LateFusionModel, cfg: RunConfig, bundle: DataBundle, metrics: dict[str, Any]
) -> Path:
    """Write a complete run folder; ``metrics.json`` goes last, so its presence marks completeness."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / MODEL_FILE, model.state_dict())
    config = {
        "mmrobust_version": __version__,
        **cfg.to_dict(),
        "dataset": bundle.meta.to_dict(),
        "data_source": bundle.source,
    }
    write_json(out / CONFIG_FILE, config)
    write_json(out / METRICS_FILE, metrics)
    return out


@dataclass
class Run:
    """A loaded run: its config, dataset metadata, model (eval mode) and metrics."""

    path: Path
    config: RunConfig
    meta: DatasetMeta
    model: LateFusionModel
    metrics: dict[str, Any]
    _bundle: DataBundle | None = field(default=None, repr=False)

    def data(self) -> DataBundle:
        """Rebuild the run's data exactly (cached after the first call)."""
        if self._bundle is None:
            self._bundle = load_data(self.config.data)
            if self._bundle.meta.to_dict() != self.meta.to_dict():
                raise RunError(f"{self.path}: the data rebuilt from config.json no longer match the run's dataset")
        return self._bundle


def load_run(path: str | Path) -> Run:
    """Load a run folder written by :func:`save_run`; never unpickles anything."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: run folder not found")
    raw = read_json(path / CONFIG_FILE)
    try:
        cfg = RunConfig.from_dict({k: raw[k] for k in ("data", "model", "train")})
        meta = DatasetMeta.from_dict(raw["dataset"])
    except (KeyError, TypeError) as exc:
        raise RunError(f"{path / CONFIG_FILE}: incomplete run config (missing {exc})") from None
    metrics = read_json(path / METRICS_FILE) if (path / METRICS_FILE).is_file() else {}
    model = build_model(meta, cfg.model)
    state = load_tensors(path / MODEL_FILE)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise RunError(f"{path / MODEL_FILE}: weights do not match the model in config.json ({first})") from None
    model.eval()
    return Run(path, cfg, meta, model, metrics)
