"""Evaluate a model with a named suite: :func:`evaluate_model` takes a model, its dataset's metadata
and the samples, and returns an :class:`~mmrobust.eval.results.EvalResult`; no run folder is read
or written (:func:`mmrobust.eval.runner.evaluate_run` is the run-folder front end).

Nothing here prints or writes: the CLI and the demo show the result and save ``eval.json``
through :mod:`mmrobust.report.evaluation`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from mmrobust.data.base import DatasetMeta, Split
from mmrobust.errors import ConfigError
from mmrobust.eval.results import EvalResult
from mmrobust.eval.suites import SUITES
from mmrobust.memory import input_gradient_plan, parse_bytes
from mmrobust.precision import check_precision, model_precision

#: options every suite accepts (the CLI passes them whatever the suite)
COMMON_OPTIONS = ("progress", "fill", "batch_size")


def evaluate_model(
    model: nn.Module,
    meta: DatasetMeta,
    split: Split,
    suite: str = "basic",
    *,
    split_name: str = "test",
    precision: str = "fp32",
    channels_last: bool = False,
    memory_budget: str | int | None = "auto",
    **options: Any,
) -> EvalResult:
    """Run ``suite`` (a name in :data:`~mmrobust.eval.suites.SUITES`) on the samples ``split`` of
    ``model``, whose dataset ``meta`` describes; ``split_name`` is what the result calls them.

    ``options`` are the suite's (``eps``, ``steps``, ``losses``, ...; one it would ignore is an
    error). ``precision``/``channels_last``: the model's forwards only (attack arithmetic stays
    float32, see :mod:`mmrobust.precision`). ``batch_size`` None (or absent) sizes batches to
    ``memory_budget`` (at most 256, see :mod:`mmrobust.memory`).

    Everything runs on the model's device (move the model first, e.g. ``load_run(path, device=...)``):
    batches are moved there with :func:`~mmrobust.torchutil.to_device` and attack tensors stay there;
    the result's parameters record the device.
    """
    fn = SUITES.get(suite)
    check_options(suite, fn, options)
    check_memory_budget(memory_budget)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    check_precision(precision, device)
    with model_precision(model, precision, device, channels_last):
        if options.get("batch_size") is None:
            options["batch_size"] = input_gradient_plan(model, split, memory_budget, device).batch_size
        result = fn(model, meta, split, **options)
    return replace(result, split=split_name, parameters={**result.parameters, "device": str(device)})


def check_options(suite: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Refuse options the suite would silently ignore (e.g. ``eps`` with the basic suite)."""
    accepted = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD}
    bad = sorted(k for k in options if k not in accepted and k not in COMMON_OPTIONS)
    if bad:
        raise ConfigError(f"option {', '.join(bad)} does not apply to the '{suite}' suite", param=bad[0])


def check_memory_budget(memory_budget: str | int | None) -> None:
    """``None``, ``"auto"`` or a size such as ``"8GB"`` (one-line error otherwise)."""
    if memory_budget is not None and memory_budget != "auto":
        parse_bytes(memory_budget, "memory_budget")
