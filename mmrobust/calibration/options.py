"""Options of calibration training and evaluation; each dataclass validates itself."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from mmrobust.attacks.autoattack import STANDARD_COMPONENTS
from mmrobust.errors import ConfigError
from mmrobust.options import check_range, check_types

#: attacks that can generate the stage-2 training examples (and the early-stopping validation ones)
TRAIN_ATTACKS = ("apgd-ce", "apgd-dlr")
#: stage-2 losses: l2 to the frozen stage-1 embedding, ce on cosine logits, infonce over clean/adv pairs
CALIBRATION_LOSSES = ("l2", "ce", "infonce")


def check_eps(value: Any, what: str) -> float:
    """An l-inf budget on inputs in a unit-width range: a finite number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 < value <= 1:
        raise ConfigError(f"{what}: eps must be in (0, 1] (e.g. 8/255), got {value!r}")
    return float(value)


@dataclass
class CalibrationOptions:
    """How the heads are trained.

    Stage 1 (``stage1_epochs``, ``stage1_lr``): AdamW on ``||g(f(x)) - f(x)||^2`` over clean data.
    Stage 2 (``epochs``, ``lr``): AdamW on ``loss`` over APGD-CE l-inf examples of budget ``eps``
    (``attack_steps`` iterations), regenerated every batch against the current head. ``lora_rank``
    > 0 trains rank-r LoRA adapters (scale ``lora_alpha / r``) on the stage-1 head instead of the
    whole head. Early stopping keeps the epoch with the best ``0.25 * clean + 0.75 * adversarial``
    validation accuracy and stops after ``patience`` epochs without improvement. ``eps_warmup``:
    epochs over which the training budget grows linearly to ``eps`` (a curriculum; 0 = none);
    ``clean_weight``: weight of the same loss on the clean input, added to the adversarial one.
    ``train_attack``: ``apgd-ce`` (the paper's) or ``apgd-dlr`` (scale-invariant DLR loss: no
    gradient underflow when the cosine logits saturate the softmax), for training and validation.
    """

    loss: str = "ce"
    eps: float = 8 / 255
    attack_steps: int = 10
    hidden: int = 256
    stage1_epochs: int = 30
    stage1_lr: float = 1e-3
    epochs: int = 5
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    ce_temperature: float = 0.01
    infonce_temperature: float = 0.07
    lora_rank: int = 0
    lora_alpha: float = 16.0
    patience: int = 2
    eps_warmup: int = 0
    clean_weight: float = 0.0
    train_attack: str = "apgd-ce"
    seed: int = 0

    def __post_init__(self) -> None:
        who = "calibration"
        check_types(self, who)
        if self.loss not in CALIBRATION_LOSSES:
            raise ConfigError(f"{who}.loss: unknown loss '{self.loss}'; choose from: {', '.join(CALIBRATION_LOSSES)}")
        if self.train_attack not in TRAIN_ATTACKS:
            raise ConfigError(
                f"{who}.train_attack: unknown attack '{self.train_attack}'; choose from: {', '.join(TRAIN_ATTACKS)}"
            )
        self.eps = check_eps(self.eps, f"{who}.eps")
        for name, minimum in (("attack_steps", 1), ("hidden", 1), ("stage1_epochs", 0), ("epochs", 0),
                              ("batch_size", 1), ("lora_rank", 0), ("patience", 1), ("eps_warmup", 0), ("seed", 0)):  # fmt: skip
            check_range(getattr(self, name), minimum, None, f"{who}.{name}")
        for name in ("stage1_lr", "lr", "ce_temperature", "infonce_temperature", "lora_alpha"):
            check_range(getattr(self, name), 0.0, None, f"{who}.{name}", low_open=True)
        check_range(self.weight_decay, 0.0, None, f"{who}.weight_decay")
        check_range(self.clean_weight, 0.0, None, f"{who}.clean_weight")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalOptions:
    """How calibrated and frozen models are evaluated.

    At every l-inf budget in ``eps`` the AutoAttack protocol runs the components in ``attacks`` in
    order, each on the samples the earlier ones left correct (``steps`` iterations for the gradient
    attacks, ``queries`` for Square, ``targets`` target classes for APGD-T and FAB-T); the robust
    accuracy is the per-sample worst case over them. ``retrieval_k``: the k of recall@k.
    """

    eps: tuple[float, ...] = (2 / 255, 4 / 255, 8 / 255)
    attacks: tuple[str, ...] = STANDARD_COMPONENTS
    steps: int = 100
    queries: int = 5000
    targets: int = 9
    retrieval_k: tuple[int, ...] = (1, 5)
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        who = "evaluation"
        check_types(self, who)
        self.eps = tuple(sorted(check_eps(e, f"{who}.eps") for e in self.eps))  # reports read the last as the largest
        if not self.eps:
            raise ConfigError(f"{who}.eps: give at least one budget")
        self.attacks = tuple(self.attacks)
        for a in self.attacks:
            if a not in STANDARD_COMPONENTS:
                raise ConfigError(
                    f"{who}.attacks: unknown component '{a}'; choose from: {', '.join(STANDARD_COMPONENTS)}"
                )
        if not self.attacks:
            raise ConfigError(f"{who}.attacks: give at least one of: {', '.join(STANDARD_COMPONENTS)}")
        for name, minimum in (("steps", 1), ("queries", 1), ("targets", 1), ("batch_size", 1),
                              ("seed", 0)):  # fmt: skip
            check_range(getattr(self, name), minimum, None, f"{who}.{name}")
        self.retrieval_k = tuple(self.retrieval_k)
        for k in self.retrieval_k:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"option '{who}.retrieval_k' needs integers >= 1, got {k!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
