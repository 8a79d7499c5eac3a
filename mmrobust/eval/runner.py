"""Evaluate a run folder with a named suite: :func:`evaluate_run` loads the run, checks its data and
calls :func:`~mmrobust.eval.api.evaluate_model`; returns an :class:`EvalResult`.

The only module of :mod:`mmrobust.eval` that knows run folders (:mod:`mmrobust.runs`). Nothing
here prints or writes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from mmrobust.config import resolve_device
from mmrobust.errors import ConfigError
from mmrobust.eval.api import COMMON_OPTIONS, check_memory_budget, check_options, evaluate_model
from mmrobust.eval.results import EvalResult
from mmrobust.eval.suites import SUITES
from mmrobust.precision import check_precision
from mmrobust.runs import load_run

__all__ = ["COMMON_OPTIONS", "check_options", "evaluate_model", "evaluate_run"]


def evaluate_run(
    path: str | Path,
    suite: str = "basic",
    split: str = "test",
    max_samples: int | None = None,
    *,
    allow_data_change: bool = False,
    device: str = "auto",
    data: str | Path | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    memory_budget: str | int | None = "auto",
    **options: Any,
) -> EvalResult:
    """Run ``suite`` on a run folder's ``split`` on ``device`` (``auto``: CUDA if available, else CPU).

    ``data``: another copy of the run's data (a folder); ``allow_data_change``: accept data whose
    fingerprint differs from the run's (see :func:`~mmrobust.runs.load_run`). The result's
    parameters record the device and, where the data are not the recorded ones, which data were used.

    ``max_samples`` evaluates only the first samples of the split (quick looks; say so in reports).
    On the whole split, a clean accuracy that differs from the one recorded at training time adds
    a warning (the data or the weights changed). Everything else is :func:`evaluate_model`'s.
    """
    # cheap checks first: a bad option fails before the run and its data are loaded
    check_options(suite, SUITES.get(suite), options)
    dev = resolve_device(device)  # before any work: cuda without CUDA is refused here
    check_precision(precision, dev)
    check_memory_budget(memory_budget)
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}", param="max_samples")
    run = load_run(path, allow_data_change=allow_data_change, device=dev, data=data)
    samples = run.data().split(split)
    if max_samples is not None:
        samples = samples.subset(slice(0, max_samples))
    result = evaluate_model(run.model, run.meta, samples, suite, split_name=split, precision=precision,
                            channels_last=channels_last, memory_budget=memory_budget, **options)  # fmt: skip
    record = run.data_record()
    if data is not None or record.get("changed") or record["path"] != run.config.data.name:
        result = replace(result, parameters={**result.parameters, "data": record})
    expected = run.metrics.get(f"{split}_accuracy")
    if max_samples is None and expected is not None and abs(expected - result.clean_accuracy) > 1e-9:
        warning = f"clean {split} accuracy {result.clean_accuracy:.6f} differs from the training run's {expected:.6f}"
        result = replace(result, warnings=[*result.warnings, warning])
    return result
