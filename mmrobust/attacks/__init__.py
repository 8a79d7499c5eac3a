"""Attacks on multi-modal models: every attack takes and returns a dict of modality tensors.

``build_attack(name, model, meta, eps=..., loss="ce"|"cw", modalities=[...], budget="joint"|"per-modality")``
builds any registered attack (``ATTACKS.names()``: FGM/PGD in :mod:`~mmrobust.attacks.gradient`,
the AutoAttack components in :mod:`~mmrobust.attacks.apgd`, :mod:`~mmrobust.attacks.fab` and
:mod:`~mmrobust.attacks.square`, and the AutoAttack protocol itself,
:class:`~mmrobust.attacks.autoattack.AutoAttack`); ``attack(inputs, labels)`` returns the
adversarial inputs with the untouched modalities bit-identical.
"""

from mmrobust.attacks.base import ATTACKS, BUDGETS, NORMS, Attack, build_attack
from mmrobust.attacks.gradient import FGM, FGSM, PGD, PGDL2, PGDLinf
from mmrobust.attacks.losses import LOSSES, ce_loss, cw_loss, dlr_loss, dlr_targeted_loss, margin
from mmrobust.attacks.missing import FILLS, MissingModality

__all__ = [
    "ATTACKS",
    "BUDGETS",
    "FILLS",
    "FGM",
    "FGSM",
    "LOSSES",
    "NORMS",
    "PGD",
    "PGDL2",
    "PGDLinf",
    "Attack",
    "MissingModality",
    "build_attack",
    "ce_loss",
    "cw_loss",
    "dlr_loss",
    "dlr_targeted_loss",
    "margin",
]
