"""Compatibility alias: the AutoAttack protocol moved to :mod:`mmrobust.attacks.autoattack`
(:class:`~mmrobust.attacks.autoattack.AutoAttack`, registered as the attack ``autoattack``).

Kept only while ``mmrobust.calibration.evaluate`` and ``benchmarks/attack_parity.py`` import from
here; import from :mod:`mmrobust.attacks.autoattack` instead.
"""

from mmrobust.attacks.autoattack import (
    COMPONENTS,
    VERSION_COMPONENTS,
    VERSIONS,
    AutoAttackOptions,
    AutoAttackResult,
    StageLog,
    run_autoattack,
    sanity_checks,
)
from mmrobust.attacks.component import check_applicable

__all__ = ["COMPONENTS", "VERSIONS", "VERSION_COMPONENTS", "AutoAttackOptions", "AutoAttackResult", "StageLog",
           "check_applicable", "run_autoattack", "sanity_checks"]  # fmt: skip
