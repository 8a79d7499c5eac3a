"""Certification: certifiers (by name in ``CERTIFIERS``), certified radii, vulnerability indicators.

Public API (loaded lazily so that importing one submodule stays cheap)::

    from mmrobust.certify import certify_run, certify_model, CERTIFIERS, soundness_check

A new certifier is a :class:`~mmrobust.certify.base.Certifier` subclass registered with
``@CERTIFIERS.register("name")``; ``CERTIFIERS`` imports the modules of the built-in certifiers on its
first look-up (:mod:`mmrobust.registry`), a user's module is imported by the user.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "certify_run": "mmrobust.certify.runner",
    "certify_model": "mmrobust.certify.runner",
    "build_certifier": "mmrobust.certify.runner",
    "certify_run_many": "mmrobust.certify.runner",
    "load_certify": "mmrobust.certify.runner",
    "normalize_certify": "mmrobust.certify.results",
    "CertifyResult": "mmrobust.certify.results",
    "CERTIFIERS": "mmrobust.certify.base",
    "Certificate": "mmrobust.certify.base",
    "certified_radii": "mmrobust.certify.radius",
    "certified_accuracy": "mmrobust.certify.radius",
    "head_lipschitz": "mmrobust.certify.estimators",
    "sound_lipschitz": "mmrobust.certify.sound",
    "sound_row_lipschitz": "mmrobust.certify.sound",
    "conv_operator_bound": "mmrobust.certify.sound",
    "soundness_check": "mmrobust.certify.soundness",
    "min_adversarial_norm": "mmrobust.certify.soundness",
    "empirical_lipschitz": "mmrobust.certify.lipschitz",
    "score_gradient_norms": "mmrobust.certify.lipschitz",
    "orthogonal_bound": "mmrobust.certify.bounds",
    "crown_radii": "mmrobust.certify.crown",
    "smoothing_radii": "mmrobust.certify.smoothing",
    "tightness": "mmrobust.certify.tightness",
    "attack_radius": "mmrobust.certify.tightness",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mmrobust.certify' has no attribute '{name}'")


__all__ = list(_API)
