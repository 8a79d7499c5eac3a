"""The training-strategy interface: one small class per method, found by name in ``METHODS``.

A step of the engine, and where a strategy can act (``ctx``: a :class:`TrainContext`, the hooks'
narrow view of the run: model, device, splits, seed, batch size, memory budget, ``evaluate``)::

    on_train_start(ctx)                          once, before the first epoch
    for each epoch:
        on_epoch_start(ctx, epoch)               e.g. PMR's prototypes
        for each batch:
            loss, logits = step_loss(model, x, y, step)   step: a StepContext (epoch, step, generator, ...);
                                                         loss() unless an options mixin adds a term
            loss.backward()
            after_backward(model, step)          gradient modulation (OGM-GE), before the optimiser step
            optimiser.step()
        on_epoch_end(ctx, epoch) -> dict         e.g. GB's blend weights; merged into the epoch's history row
    after_training(ctx) -> dict                  on the selected model (CRMT step 2, MSEFM's memory)

Modules a method adds to the deployed model (GB's per-modality heads, MSEFM's feature memory) are
declared through :meth:`Strategy.model_config` (see :func:`method_model_config`): they are then part
of the model's ``state_dict``, saved in ``model.safetensors`` and rebuilt by ``load_run`` from
``config.json``. Strategy state that is not part of the model (prototypes, blend weights) is exposed
by :meth:`Strategy.state_dict`.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from mmrobust.config import RunConfig, options_dataclass
from mmrobust.data.base import Batch, DatasetMeta, Split
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import LateFusionModel, ModelConfig
from mmrobust.options import coerce
from mmrobust.registry import Registry
from mmrobust.training.context import TrainContext

#: every built-in method's module; importing one registers its methods (done on the first look-up)
METHOD_MODULES = tuple(
    f"mmrobust.training.{m}"
    for m in ("crmt", "gaussian", "gb", "jt", "lipmargin", "mixup", "mmat", "msefm", "ogm_ge", "pmr", "varmat")
)
METHODS: Registry[type[Strategy[Any]]] = Registry("training method", modules=METHOD_MODULES)

OptionsT = TypeVar("OptionsT")


def unwrap(model: nn.Module) -> LateFusionModel:
    """The :class:`LateFusionModel` inside a (possibly DDP-wrapped) model."""
    inner = getattr(model, "module", model)
    assert isinstance(inner, LateFusionModel)
    return inner


def require(ok: bool, message: str, param: str | None = None) -> None:
    """Raise :class:`ConfigError` with ``message`` (about the option ``param``) unless ``ok`` (range checks)."""
    if not ok:
        raise ConfigError(message, param=param)


@dataclass
class MethodOptions:
    """Base of every method's options: checks each field's type (and finiteness) on construction.

    Subclasses add range checks by overriding :meth:`check` (calling ``super().check()``), so options
    built from Python are held to the same rules as those parsed from strings (CLI, YAML).

    ``aliases``: old option names still accepted (old name -> new name), see :func:`method_options`.
    """

    aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, declared = getattr(self, f.name), hints.get(f.name, f.type)
            if isinstance(value, str) and declared is not str:
                raise ConfigError(
                    f"option '{f.name}' expects {getattr(declared, '__name__', declared)}, got '{value}'", param=f.name
                )
            setattr(self, f.name, coerce(value, declared, f.name))
        self.check()

    def check(self) -> None:
        """Range checks; raise :class:`ConfigError` naming the option."""

    def step_loss(
        self, strategy: Strategy[Any], model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss of one step: the strategy's own :meth:`Strategy.loss`. An options mixin
        overrides it to add a term to any method it is mixed into (certified training:
        :class:`mmrobust.training.certified.CertifiedOptions`)."""
        return strategy.loss(model, inputs, labels, ctx)

    def selectable(self, epoch: int) -> bool:
        """Whether the model after ``epoch`` (from 0) may be selected on validation accuracy (an options
        mixin may rule out epochs that do not train what the method is for: certified training's warm-up
        and ramp)."""
        return True


@dataclass
class NoOptions(MethodOptions):
    """For methods without options."""


@dataclass
class StepContext:
    """What a strategy may need to know about the current step: its epoch and step within the epoch
    (from 0), the step generator, and the schedule's length (``steps_per_epoch``, ``epochs``; 0 where
    unknown) for losses that ramp per step."""

    epoch: int
    step: int
    generator: torch.Generator
    steps_per_epoch: int = 0
    epochs: int = 0


class Strategy(Generic[OptionsT]):
    """A training method, generic in its options type.

    Subclasses set ``head`` (the fusion head they need), ``Options`` (a :class:`MethodOptions`
    dataclass of their hyper-parameters, filled from ``TrainConfig.method_options``; the same type
    as ``OptionsT``) and implement :meth:`loss`; the hooks are optional and see a
    :class:`TrainContext`, not the engine. ``model`` passed to :meth:`loss` and :meth:`after_backward`
    may be wrapped in DDP: call it, don't reach into it; use ``model(inputs, return_all=True)`` for
    features, per-modality scores and auxiliary logits. ``name`` is the registry key, set by
    ``METHODS.register``.
    """

    name: ClassVar[str]
    head: ClassVar[str] = "concat"
    Options: ClassVar[type[Any]] = NoOptions
    # methods whose per-process decisions would make DDP replicas diverge set a reason here
    distributed_reason: ClassVar[str] = ""

    def __init__(self, options: OptionsT, meta: DatasetMeta) -> None:
        self.options = options
        self.meta = meta

    @property
    def distributed(self) -> bool:
        """Whether the method can run under ``torchrun`` (see ``distributed_reason``)."""
        return not self.distributed_reason

    @classmethod
    def model_config(cls, model: ModelConfig, options: Any) -> ModelConfig:
        """The model this method trains and deploys: ``model`` (the user's) with the method's head (and
        extras); returns a new config, ``model`` is left as it is."""
        return dataclasses.replace(model, head=cls.head)

    def parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """Parameters the optimiser updates (default: all)."""
        return model.parameters()

    def training_split(self, train: Split, seed: int) -> Split:
        """The part of the training split that trains the model (GB holds part of it out)."""
        return train

    def on_train_start(self, ctx: TrainContext) -> None:
        """Hook run once before the first epoch."""

    def on_epoch_start(self, ctx: TrainContext, epoch: int) -> None:
        """Hook run before each epoch (model state as left by the previous epoch)."""

    def loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loss, logits)``; logits feed the running train accuracy."""
        raise NotImplementedError

    def step_loss(
        self, model: nn.Module, inputs: Batch, labels: torch.Tensor, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the engine calls each step: :meth:`loss`, or what the options make of it
        (``options.step_loss``: certified training mixes in a verified loss)."""
        if isinstance(self.options, MethodOptions):
            return self.options.step_loss(self, model, inputs, labels, ctx)
        return self.loss(model, inputs, labels, ctx)

    def selectable(self, epoch: int) -> bool:
        """Whether the engine may select the model after ``epoch`` (from 0) on validation accuracy
        (``options.selectable``; all epochs unless an options mixin says otherwise). When no epoch is,
        the last model is kept."""
        return self.options.selectable(epoch) if isinstance(self.options, MethodOptions) else True

    def replays(self) -> int:
        """How many times the engine runs each minibatch in a row (1; "free" adversarial training: m)."""
        return 1

    def epochs_to_run(self, epochs: int) -> int:
        """The epochs the engine runs for ``epochs`` requested (all of them unless a method replays
        minibatches)."""
        return epochs

    def selection_metric(self) -> str | None:
        """The history column the kept epoch is chosen by, or None for validation accuracy."""
        return None

    def training_record(self, epochs: int) -> dict[str, Any]:
        """Entries merged into ``metrics.json`` that state how the method trained (``epochs``: as
        requested); none by default."""
        return {}

    def after_backward(self, model: nn.Module, ctx: StepContext) -> None:
        """Hook run after ``loss.backward()`` and before the optimiser step (gradient modulation)."""

    def on_epoch_end(self, ctx: TrainContext, epoch: int) -> dict[str, Any]:
        """Hook run after each epoch's training pass; returns extra columns for the history row."""
        return {}

    def after_training(self, ctx: TrainContext) -> dict[str, Any]:
        """Hook run once on the selected model after the epochs (e.g. CRMT step 2).

        Returns extra metrics for ``metrics.json``.
        """
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Strategy state outside the model (e.g. prototypes), as tensors: saved in every epoch checkpoint
        so that a resumed run restores it."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`; refuses keys it does not know."""
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown:
            name = getattr(self, "name", type(self).__name__)
            raise ConfigError(f"{name}: unknown strategy state {unknown}")


def method_options(cfg: RunConfig) -> Any:
    """The options dataclass of ``cfg.train.method``, built from ``cfg.train.method_options``."""
    cls = METHODS.get(cfg.train.method)
    given = sorted(k for k in cfg.train.method_options if str(k).startswith("certified"))
    if given and not _has_certified(cls):
        supported = [name for name, other in METHODS.items() if _has_certified(other)]
        raise ConfigError(
            f"method '{cfg.train.method}' has no certified training (option '{given[0]}'); "
            f"methods that support it: {', '.join(supported)}",
            param=given[0],
        )
    return options_dataclass(cls.Options, cfg.train.method_options, cfg.train.method)


def _has_certified(cls: type[Strategy[Any]]) -> bool:
    """Whether the method's options carry the certified-training mixin (a field named ``certified``)."""
    options = cls.Options
    return dataclasses.is_dataclass(options) and any(f.name == "certified" for f in dataclasses.fields(options))


def method_model_config(cfg: RunConfig) -> ModelConfig:
    """The model config a run trains and deploys: ``cfg.model`` with the head (and the extras, such as
    GB's auxiliary heads or MSEFM's feature memory) of ``cfg.train.method``. ``cfg`` is not changed."""
    cls = METHODS.get(cfg.train.method)
    return cls.model_config(copy.deepcopy(cfg.model), method_options(cfg))


def make_strategy(cfg: RunConfig, meta: DatasetMeta) -> Strategy[Any]:
    """The strategy of ``cfg.train.method`` with its options, for data described by ``meta``."""
    return METHODS.get(cfg.train.method)(method_options(cfg), meta)
