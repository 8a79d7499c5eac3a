"""The certifier interface: one class per certifier, found by name in ``CERTIFIERS``.

A certifier turns a model and a split into per-sample certified radii (:class:`Radii`) and says
what kind of guarantee they carry (:class:`Guarantee`): ``sound`` (a deterministic lower bound on
the distance to the decision boundary), ``probabilistic`` (holds except with probability
``alpha``) or ``estimate`` (no guarantee, e.g. an empirical Lipschitz constant). Presentation
(tables, plots, ``certify.json``) is built from :class:`Certificate` elsewhere; certifiers never
print, plot or write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import torch

from mmrobust.data.base import DatasetMeta, Split
from mmrobust.registry import Registry


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


class Certifier:
    """A certifier. Subclasses set ``Options`` (a dataclass validated in ``__post_init__``) and
    ``guarantee``, and implement :meth:`certify`."""

    name: ClassVar[str] = ""
    guarantee: ClassVar[Guarantee] = Guarantee.SOUND
    Options: ClassVar[type] = object

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def certify(self, model: torch.nn.Module, meta: DatasetMeta, split: Split, ctx: CertifyContext) -> Certificate:
        raise NotImplementedError


CERTIFIERS: Registry[type[Certifier]] = Registry("certifier")
