"""Typed run configuration, loadable from YAML/JSON and CLI flags, saved beside every run."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmrobust.data.registry import DataConfig
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | none
    step_size: int = 30
    gamma: float = 0.1


@dataclass
class TrainConfig:
    """What to train and how. ``method_options`` are validated by the method's own dataclass."""

    method: str = "jt"
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    optim: OptimConfig = field(default_factory=OptimConfig)
    method_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(
            data=_build(DataConfig, d.get("data", {}), "data"),
            model=_build(ModelConfig, d.get("model", {}), "model"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: must hold a mapping with keys data/model/train")
        unknown = set(d) - {"data", "model", "train", "mmrobust_version", "dataset", "data_source"}
        if unknown:
            raise ConfigError(f"{p}: unknown section(s) {sorted(unknown)}")
        return cls.from_dict(d)


def _build(cls: type, values: Any, where: str) -> Any:
    """Instantiate a (possibly nested) dataclass from a dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{where}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"config '{where}': unknown key(s) {sorted(unknown)}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        ftype = fields[name].type
        if ftype == "OptimConfig":
            kwargs[name] = _build(OptimConfig, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def options_dataclass(cls: type, values: dict[str, Any], name: str, kind: str = "method") -> Any:
    """Build the options dataclass of the ``kind`` (method, certifier, ...) called ``name``, coercing
    CLI strings to the declared field types; an unknown key is refused with the valid ones listed."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{kind} '{name}': unknown option(s) {sorted(unknown)}; valid: {valid}")
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = coerce(value, fields[key].type, f"{name}.{key}")
    return cls(**kwargs)


def coerce(value: Any, type_name: Any, what: str) -> Any:
    """Coerce a CLI string to ``type_name`` (``int``/``float``/``bool``/``str``, or ``T | None``:
    the string ``none`` gives None)."""
    t = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    if not isinstance(value, str):
        return value
    parts = [p.strip() for p in t.split("|")]
    if len(parts) == 2 and "None" in parts:
        if value.lower() == "none":
            return None
        t = next(p for p in parts if p != "None")
    try:
        if t == "int":
            return int(value)
        if t == "float":
            return float(value)
        if t == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
    except ValueError:
        raise ConfigError(f"option '{what}' expects {t}, got '{value}'") from None
    return value


def parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    """Parse repeated ``KEY=VALUE`` CLI options."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} '{item}' must look like KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
