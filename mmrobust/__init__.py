"""mmrobust: adversarial robustness of multi-modal (late-fusion) classifiers.

The most used entry points are importable from the top level (loaded lazily, so that
``import mmrobust`` and the CLI stay fast)::

    from mmrobust import RunConfig, train, load_run, evaluate_run, certify_run, run_benchmark
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# library messages go to the "mmrobust" logger; silent unless the application configures logging
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

_API = {
    "RunConfig": "mmrobust.config",
    "DataConfig": "mmrobust.data",
    "load_data": "mmrobust.data",
    "ModelConfig": "mmrobust.models",
    "build_model": "mmrobust.models",
    "train": "mmrobust.training",
    "load_run": "mmrobust.runs",
    "evaluate_run": "mmrobust.eval.runner",
    "evaluate_model": "mmrobust.eval.api",
    "certify_run": "mmrobust.certify.runner",
    "certify_model": "mmrobust.certify.runner",
    "BenchmarkConfig": "mmrobust.benchmark",
    "run_benchmark": "mmrobust.benchmark",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mmrobust' has no attribute '{name}'")


__all__ = ["__version__", *_API]
