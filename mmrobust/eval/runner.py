"""Evaluate a run (or a run folder) with a named suite; returns an :class:`EvalResult`.

Nothing here prints or writes: the CLI and the demo show the result and save ``eval.json``
through :mod:`mmrobust.report.evaluation`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmrobust.data.base import Split
from mmrobust.errors import ConfigError
from mmrobust.eval.results import EvalResult
from mmrobust.eval.suites import SUITES
from mmrobust.memory import input_gradient_plan, parse_bytes
from mmrobust.precision import check_precision, model_precision
from mmrobust.runs import Run, load_run

#: options every suite accepts (the CLI passes them whatever the suite)
COMMON_OPTIONS = ("progress", "fill", "batch_size")


def evaluate(
    run: Run,
    data: Split,
    suite: str = "basic",
    split: str = "test",
    *,
    precision: str = "fp32",
    channels_last: bool = False,
    memory_budget: str | int | None = "auto",
    **options: Any,
) -> EvalResult:
    """Run ``suite`` on ``data`` (a split of ``run``'s data, or a subset of it, named ``split``).

    ``precision``/``channels_last``: the model's forwards only (attack arithmetic stays float32, see
    :mod:`mmrobust.precision`). ``batch_size`` None (or absent) sizes batches to ``memory_budget``
    (at most 256, see :mod:`mmrobust.memory`).
    """
    fn = SUITES.get(suite)
    check_options(suite, fn, options)
    device = next((p.device for p in run.model.parameters()), "cpu")
    check_precision(precision, device, "--precision")
    with model_precision(run.model, precision, device, channels_last):
        if options.get("batch_size") is None:
            options["batch_size"] = input_gradient_plan(run.model, data, memory_budget, device).batch_size
        return replace(fn(run, data, **options), split=split)


def evaluate_run(
    path: str | Path,
    suite: str = "basic",
    split: str = "test",
    max_samples: int | None = None,
    *,
    allow_data_change: bool = False,
    precision: str = "fp32",
    channels_last: bool = False,
    memory_budget: str | int | None = "auto",
    **options: Any,
) -> EvalResult:
    """Run ``suite`` on a run folder's ``split`` (``allow_data_change``: see :func:`~mmrobust.runs.load_run`).

    ``max_samples`` evaluates only the first samples of the split (quick looks; say so in reports).
    On the whole split, a clean accuracy that differs from the one recorded at training time adds
    a warning (the data or the weights changed).
    """
    check_options(suite, SUITES.get(suite), options)
    check_precision(precision, "cpu" if precision != "fp16" else "auto", "--precision")
    if memory_budget is not None and memory_budget != "auto":
        parse_bytes(memory_budget, "--memory-budget")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"--max-samples must be >= 1, got {max_samples}")
    run = load_run(path, allow_data_change=allow_data_change)
    data = run.data().split(split)
    if max_samples is not None:
        data = data.subset(slice(0, max_samples))
    result = evaluate(run, data, suite, split, precision=precision, channels_last=channels_last,
                      memory_budget=memory_budget, **options)  # fmt: skip
    expected = run.metrics.get(f"{split}_accuracy")
    if max_samples is None and expected is not None and abs(expected - result.clean_accuracy) > 1e-9:
        warning = f"clean {split} accuracy {result.clean_accuracy:.6f} differs from the training run's {expected:.6f}"
        result = replace(result, warnings=[*result.warnings, warning])
    return result


def check_options(suite: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Refuse options the suite would silently ignore (e.g. ``--eps`` with the basic suite)."""
    accepted = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD}
    bad = sorted(k for k in options if k not in accepted and k not in COMMON_OPTIONS)
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise ConfigError(f"option {flags} does not apply to the '{suite}' suite")
