"""The certifier interface: one class per certifier, found by name in ``CERTIFIERS``.

A certifier turns a model and a split into per-sample certified radii (:class:`Radii`) and says
what kind of guarantee they carry (:class:`Guarantee`): ``sound`` (a deterministic lower bound on
the distance to the decision boundary), ``probabilistic`` (holds except with probability
``alpha``) or ``estimate`` (no guarantee, e.g. an empirical Lipschitz constant). Presentation
(tables, plots, ``certify.json``) is built from :class:`Certificate` elsewhere; certifiers never
print, plot or write.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import torch

from mmrobust.data.base import DatasetMeta, Split
from mmrobust.errors import ConfigError
from mmrobust.progress import ProgressFn
from mmrobust.registry import Registry

#: the default of a parameter that has a deprecated alias: tells "not given" from every given value
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()


def resolve_alias(name: str, value: Any, alias: str, alias_value: Any, default: Any, where: str) -> tuple[Any, str]:
    """``(value, the name it was given under)`` for a parameter ``name`` with the deprecated ``alias``.

    Either may be given (the alias with a :class:`DeprecationWarning`), not both (a
    :class:`ConfigError` naming both); neither gives ``default``. Unset ones are :data:`UNSET`.
    """
    if alias_value is UNSET:
        return (default if value is UNSET else value), name
    if value is not UNSET:
        raise ConfigError(f"{where}: give {name} or its deprecated alias {alias}, not both", param=name)
    warnings.warn(f"{where}: {alias} is deprecated, use {name}", DeprecationWarning, stacklevel=3)
    return alias_value, alias


class Guarantee(StrEnum):
    SOUND = "sound"
    PROBABILISTIC = "probabilistic"
    ESTIMATE = "estimate"


@dataclass
class Radii:
    """Per-sample certified radii in the model's input space (0 where misclassified or abstained).

    ``joint``: one ball over all modalities together (``sum_m ||d_m||^2 <= r^2`` for l2);
    ``unimodal[m]``: modality ``m`` perturbed alone, the others fixed. ``correct``: the certified
    prediction equals the label (for smoothing: the smoothed classifier did not abstain and is right).
    """

    joint: torch.Tensor
    unimodal: dict[str, torch.Tensor]
    correct: torch.Tensor


@dataclass
class Certificate:
    """What one certifier produced on one split."""

    certifier: str
    guarantee: Guarantee
    norm: str  # "l2" or "linf"
    radii: Radii
    labels: torch.Tensor
    alpha: float | None = None  # failure probability of a probabilistic certificate
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # certifier-specific, JSON-able values


@dataclass
class CertifyContext:
    """Data a certifier may read besides the split it certifies (never the test split for fitting)."""

    fit_data: Split | None = None  # e.g. the training split the empirical estimator maximises over
    batch_size: int = 256
    seed: int = 0
    progress: ProgressFn | None = None  # ``progress(description, done, total)`` over the certified samples


class Certifier:
    """A certifier. Subclasses set ``Options`` (a dataclass validated in ``__post_init__``) and
    ``guarantee``, and implement :meth:`certify`."""

    name: ClassVar[str]  # set by ``CERTIFIERS.register(name)``
    guarantee: ClassVar[Guarantee] = Guarantee.SOUND
    Options: ClassVar[type] = object

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def certify(self, model: torch.nn.Module, meta: DatasetMeta, split: Split, ctx: CertifyContext) -> Certificate:
        raise NotImplementedError


#: the certifiers by name; the listed modules register the built-in ones (a new certifier module is
#: added here, or imported by the user before the look-up)
CERTIFIERS: Registry[type[Certifier]] = Registry(
    "certifier",
    modules=(
        "mmrobust.certify.estimators",  # empirical, sound
        "mmrobust.certify.crown",  # crown (linear bound propagation)
        "mmrobust.certify.alpha_crown",  # alpha-crown (CROWN with optimised slopes)
        "mmrobust.certify.smoothing",  # smoothing (randomized smoothing, probabilistic)
    ),
)
