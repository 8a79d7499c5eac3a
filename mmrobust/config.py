"""Typed run configuration, loadable from YAML/JSON and CLI flags, saved beside every run."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mmrobust.data.registry import DataConfig
from mmrobust.errors import ConfigError
from mmrobust.memory import check_budget
from mmrobust.models.fusion import ModelConfig
from mmrobust.options import build_options, check_range, check_types
from mmrobust.precision import check_precision

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step", "none")

#: Training recipes: complete optimiser sections that a run (``--recipe``, ``optim: {recipe: ...}``) or
#: a benchmark grid starts from; explicit fields and flags override them. ``tuned``: AdamW lr 1e-3,
#: weight decay 1e-4, cosine schedule (mmrobust's defaults). ``paper``: the CRMT reference code's
#: SGD lr 1e-3, momentum 0.9, weight decay 1e-4, StepLR(60 epochs, x0.1).
RECIPES: dict[str, dict[str, Any]] = {
    "tuned": {"name": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine",
              "step_size": 30, "gamma": 0.1},
    "paper": {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "step",
              "step_size": 60, "gamma": 0.1},
}  # fmt: skip


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule; ``recipe`` names the :data:`RECIPES` entry it started from."""

    name: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | none
    step_size: int = 30
    gamma: float = 0.1
    recipe: str = "tuned"

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_recipe(cls, recipe: str, **overrides: Any) -> OptimConfig:
        """The optimiser section of ``recipe`` with ``overrides`` applied (unknown recipe: one-line error)."""
        if recipe not in RECIPES:
            raise ConfigError(f"unknown training recipe '{recipe}'; choose from: {', '.join(RECIPES)}")
        return build_options(cls, {**RECIPES[recipe], "recipe": recipe, **overrides}, "train.optim")

    def validate(self, where: str = "train.optim") -> None:
        check_types(self, where)
        if self.recipe not in RECIPES:
            raise ConfigError(
                f"option '{where}.recipe': unknown training recipe '{self.recipe}'; choose from: {', '.join(RECIPES)}",
                param=f"{where}.recipe",
            )
        check_optimizer_name(self.name, f"{where}.name")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"option '{where}.schedule': unknown schedule '{self.schedule}'; choose from: {', '.join(SCHEDULES)}",
                param=f"{where}.schedule",
            )
        check_range(self.lr, 0, 10, f"{where}.lr", low_open=True)
        check_range(self.momentum, 0, 1, f"{where}.momentum")
        check_range(self.weight_decay, 0, 10, f"{where}.weight_decay")
        check_range(self.step_size, 1, 10**6, f"{where}.step_size")
        check_range(self.gamma, 0, 1, f"{where}.gamma", low_open=True)


def check_optimizer_name(name: str, param: str) -> None:
    """Refuse an optimiser name other than :data:`OPTIMIZERS` (``param``: the option that holds it)."""
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"option '{param}': unknown optimiser '{name}'; choose from: {', '.join(OPTIMIZERS)}", param=param
        )


def build_optimizer(
    params: Iterable[Any],
    name: str,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True,
    prefix: str = "train.optim.",
    name_param: str | None = None,
) -> torch.optim.Optimizer:
    """The one optimiser builder (the training engine, CRMT step 2): ``adam`` or ``sgd`` (with ``momentum``).

    ``decoupled_weight_decay``: ``adam`` is AdamW (the engine); False gives Adam with the weight decay
    added to the gradient (CRMT step 2, as in the reference code). The arguments are checked here, so
    every caller gets the same one-line :class:`ConfigError`, naming the option ``prefix + "lr"`` etc.
    (``name_param``: the option holding ``name``, default ``prefix + "name"``).
    """
    check_optimizer_name(name, name_param or f"{prefix}name")
    if not lr > 0:
        raise ConfigError(f"option '{prefix}lr' must be > 0, got {lr}", param=f"{prefix}lr")
    if not weight_decay >= 0:
        raise ConfigError(
            f"option '{prefix}weight_decay' must be >= 0, got {weight_decay}", param=f"{prefix}weight_decay"
        )
    if name == "adam":
        adam = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
        return adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def optimizer_for(params: Iterable[Any], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of an :class:`OptimConfig` (see :func:`build_optimizer`)."""
    return build_optimizer(params, cfg.name, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def scheduler_for(
    opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule of an :class:`OptimConfig` over ``epochs`` (None for ``none``)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule != "none":
        raise ConfigError(
            f"option 'train.optim.schedule': unknown schedule '{cfg.schedule}'; choose from: {', '.join(SCHEDULES)}",
            param="train.optim.schedule",
        )
    return None


@dataclass
class TrainConfig:
    """What to train and how. ``method_options`` are validated by the method's own dataclass."""

    method: str = "jt"
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    #: auto (CUDA if available, else CPU) | cpu | cuda | cuda:N; a per-command setting, not part of the
    #: run's identity (a resume on another device continues the run; see parse_device)
    device: str = "auto"
    optim: OptimConfig = field(default_factory=OptimConfig)
    method_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    #: model forwards in fp32 | bf16 (autocast) | fp16 (CUDA AMP + grad scaler); see mmrobust.precision
    precision: str = "fp32"
    channels_last: bool = False  # image/video inputs in NHWC order for the convolutions
    #: memory budget of the heavy passes after training (Lipschitz estimate, attack check): auto or e.g. 8GB
    memory_budget: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "train") -> None:
        check_types(self, where)
        if not isinstance(self.optim, OptimConfig):
            raise ConfigError(f"option '{where}.optim' must be an optimiser section")
        self.optim.validate(f"{where}.optim")
        check_range(self.epochs, 0, 100_000, f"{where}.epochs")
        check_range(self.batch_size, 1, 2**20, f"{where}.batch_size")
        check_range(self.seed, 0, 2**63 - 1, f"{where}.seed")
        parse_device(self.device, f"{where}.device")  # the form only: availability is checked where it computes
        check_precision(self.precision, self.device, f"{where}.precision")
        check_budget(self.memory_budget, f"{where}.memory_budget")


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE_FORM = re.compile(r"cpu|auto|cuda(:(0|[1-9][0-9]{0,5}))?")


def parse_device(name: Any, param: str = "device") -> str:
    """Check the form of a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``) without looking for
    the device; returns it. ``gpu``, ``cuda:x``, ``cuda:-1`` are one-line errors naming ``param``."""
    if not isinstance(name, str) or not _DEVICE_FORM.fullmatch(name):
        raise ConfigError(f"option '{param}': unknown device {name!r}; choose {DEVICE_CHOICES}", param=param)
    return name


def resolve_device(name: Any, param: str = "device") -> torch.device:
    """The ``torch.device`` that ``name`` asks for, checked before any work.

    ``auto`` is CUDA when available, else the CPU. ``cuda`` / ``cuda:N`` without CUDA, or with ``N``
    beyond the GPU count, is a one-line :class:`ConfigError` (nothing falls back silently).
    """
    name = parse_device(name, param)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use cpu or auto", param=param)
    index = int(name.split(":")[1]) if ":" in name else None
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ConfigError(
            f"device '{name}' requested but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})",
            param=param,
        )
    return torch.device(name)


@dataclass
class RunConfig:
    """A run's configuration. ``plugins``: modules to import before the run can be rebuilt: those
    given (the CLI's ``--plugin``) and those that registered its dataset or encoders (added by
    :meth:`validate`)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plugins: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Check every section again (flags may have changed fields after construction) and record
        the plug-ins the configuration uses."""
        self.data.__post_init__()
        self.model.__post_init__()
        self.train.validate()
        if not isinstance(self.plugins, list) or not all(isinstance(m, str) and m for m in self.plugins):
            raise ConfigError(f"plugins must be a list of module names, got {self.plugins!r}", param="plugins")
        self.plugins = list(dict.fromkeys([*self.plugins, *self._registering_modules()]))

    def _registering_modules(self) -> list[str]:
        """Modules outside mmrobust that registered the dataset or an encoder this config names."""
        from mmrobust.data.registry import DATASETS
        from mmrobust.models.encoders import ENCODERS

        found: list[object] = []
        if self.data.name in DATASETS:
            found.append(DATASETS.get(self.data.name))
        found += [ENCODERS.get(name) for name in self.model.encoders.values()]
        modules = [getattr(obj, "__module__", "") for obj in found]
        if self.model.factory:  # the module of the user's model factory (re-imported by load_run)
            modules.append(self.model.factory.strip().rpartition(":")[0])
        return [m for m in modules if m and m != "__main__" and not m.startswith("mmrobust.")]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return cls(
            data=_build(DataConfig, d.get("data", {}), "data"),
            model=_build(ModelConfig, d.get("model", {}), "model"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
            plugins=list(d.get("plugins", [])),
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
        unknown = set(d) - {
            "data",
            "model",
            "train",
            "plugins",
            "schema_version",
            "mmrobust_version",
            "dataset",
            "data_source",
        }
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
            if isinstance(value, dict) and "recipe" in value:  # the recipe first, the section's own keys over it
                recipe = value["recipe"]
                _build(OptimConfig, value, f"{where}.{name}")  # unknown keys / bad values: one-line error
                kwargs[name] = OptimConfig.from_recipe(recipe, **{k: v for k, v in value.items() if k != "recipe"})
            else:
                kwargs[name] = _build(OptimConfig, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def options_dataclass(cls: type, values: dict[str, Any], method: str) -> Any:
    """Build a method's options dataclass from ``method_options`` values (YAML or CLI strings; strict, see
    :mod:`mmrobust.options`).

    An old option name listed in the dataclass's ``aliases`` (old name -> new name) is accepted for the
    new one; giving both is refused.
    """
    if isinstance(values, dict):
        for old, new in getattr(cls, "aliases", {}).items():
            if old in values:
                if new in values:
                    raise ConfigError(
                        f"method '{method}': options '{old}' and '{new}' are the same setting ('{old}' is its "
                        f"old name); give only '{new}'",
                        param=old,
                    )
                values = {(new if k == old else k): v for k, v in values.items()}
    return build_options(cls, values, f"method '{method}'")


def parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    """Parse repeated ``KEY=VALUE`` CLI options."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} '{item}' must look like KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out
