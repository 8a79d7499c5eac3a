"""What ``mmrobust calibrate`` needs besides argument parsing: every option validated up front
(before an expensive setup is built) and the setup built from an example or from user encoders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mmrobust.calibration.options import CALIBRATION_LOSSES, CalibrationOptions, EvalOptions, check_eps
from mmrobust.calibration.pipeline import BindModel
from mmrobust.calibration.setup import CalibrationSetup
from mmrobust.config import resolve_device
from mmrobust.data.base import DatasetMeta, ModalitySpec, Split
from mmrobust.errors import ConfigError
from mmrobust.eval.suites import parse_eps
from mmrobust.options import build_options
from mmrobust.torchutil import to_device


@dataclass
class CalibratePlan:
    """Validated options of one ``calibrate`` command; :meth:`build_setup` does the expensive part."""

    build_setup: Callable[[], CalibrationSetup]
    losses: list[str]
    lora_ranks: list[int]
    calibration: CalibrationOptions
    evaluation: EvalOptions


def parse_losses(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for n in names:
        if n not in CALIBRATION_LOSSES:
            raise ConfigError(
                f"losses: unknown loss '{n}'; choose from: {', '.join(CALIBRATION_LOSSES)}", param="losses"
            )
    if not names:
        raise ConfigError(f"losses: give at least one of: {', '.join(CALIBRATION_LOSSES)}", param="losses")
    return names


def parse_ranks(text: str) -> list[int]:
    ranks = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            r = int(item)
        except ValueError:
            raise ConfigError(f"lora_ranks: '{item}' is not an integer (0 = no LoRA)", param="lora_ranks") from None
        if r < 0:
            raise ConfigError(f"lora_ranks: must be >= 0 (0 = no LoRA), got {r}", param="lora_ranks")
        ranks.append(r)
    if not ranks:
        raise ConfigError("lora_ranks: give at least one rank (0 = no LoRA)", param="lora_ranks")
    return ranks


def parse_budget(text: str, what: str) -> list[float]:
    """An eps list like ``2/255,8/255``, each in (0, 1]; errors name the parameter ``what``."""
    try:
        return [check_eps(e, what) for e in parse_eps(text, what) or []]
    except ConfigError as exc:
        raise ConfigError(str(exc), param=what) from None


def plan(
    *,
    example: str | None,
    example_options: dict[str, str],
    encoders: str | None,
    centres: str | None,
    data: str | None,
    losses: str,
    lora_ranks: str,
    eps: str | None,
    epochs: int | None,
    calibration_options: dict[str, str],
    eval_eps: str | None,
    eval_options: dict[str, str],
    device: str = "auto",
) -> CalibratePlan:
    """Validate everything a ``calibrate`` command was given; nothing heavy is built yet.

    ``device`` (``auto``: CUDA if available, else CPU) is checked here; the built setup's model and
    data are moved there (and its ``info`` records it)."""
    dev = resolve_device(device)
    defaults: dict[str, dict[str, Any]] = {"calibration": {}, "evaluation": {}}
    build: Callable[[], CalibrationSetup]
    if example is not None:
        from mmrobust.calibration.examples import EXAMPLE_DEFAULTS, EXAMPLES

        factory = EXAMPLES.get(example)
        if encoders or centres or data:
            raise ConfigError(
                "example runs a bundled setup: encoders, centres and data do not apply",
                param=("example", "encoders", "centres", "data"),
            )
        defaults = EXAMPLE_DEFAULTS.get(example, defaults)
        opts = dict(example_options)

        def build() -> CalibrationSetup:
            return factory(**opts)
    else:
        if example_options:
            raise ConfigError("example_options apply only with example", param=("example_options", "example"))
        if not (encoders and centres and data):
            raise ConfigError(
                "give example NAME, or all of encoders SPEC, centres FILE and data DATA",
                param=("example", "encoders", "centres", "data"),
            )
        spec, centres_path, data_name = encoders, centres, data

        def build() -> CalibrationSetup:
            return user_setup(spec, centres_path, data_name)

    cal: dict[str, Any] = {**defaults["calibration"], **calibration_options}
    if eps is not None:
        budgets = parse_budget(eps, "eps")
        if len(budgets) != 1:
            raise ConfigError(f"eps: calibration trains at one budget, got {len(budgets)}", param="eps")
        cal["eps"] = budgets[0]
    if epochs is not None:
        cal["epochs"] = epochs
    ev: dict[str, Any] = {**defaults["evaluation"], **eval_options}
    if eval_eps is not None:
        ev["eps"] = tuple(parse_budget(eval_eps, "eval_eps"))
    for key in ("attacks", "retrieval_k"):
        if isinstance(ev.get(key), str):
            items = [s.strip() for s in ev[key].split(",") if s.strip()]
            ev[key] = tuple(int(s) if key == "retrieval_k" and s.isdigit() else s for s in items)
    calibration = build_options(CalibrationOptions, cal, "calibration")
    evaluation = build_options(EvalOptions, ev, "evaluation")
    inner = build

    def build_on_device() -> CalibrationSetup:
        return setup_on_device(inner(), dev)

    return CalibratePlan(build_on_device, parse_losses(losses), parse_ranks(lora_ranks), calibration, evaluation)


def setup_on_device(setup: CalibrationSetup, device: torch.device) -> CalibrationSetup:
    """``setup`` with its model and in-memory splits on ``device`` (recorded in its ``info``)."""
    setup.info = {**setup.info, "device": str(device)}
    if device.type == "cpu":
        return setup
    setup.model.to(device)
    for name in ("train", "val", "test"):
        split = setup.data.split(name)
        if getattr(split, "stream", None) is None and isinstance(split, Split):
            setattr(setup.data, name, Split(to_device(split.inputs, device), split.labels.to(device)))
    return setup


def user_setup(spec: str, centres_path: str, data_name: str) -> CalibrationSetup:
    """A setup from encoders ``SPEC``, a centres file and a dataset (see :mod:`mmrobust.calibration.spec`).

    The frozen encoders see the data as stored: a dataset's normalization (a bring-your-own folder
    gets one by default) is dropped, since a pretrained encoder expects its own input convention
    (docs/calibration.md). Valid ranges and budgets are in the stored units.
    """
    from mmrobust.calibration.spec import load_centres, load_encoders
    from mmrobust.data import DataConfig, load_data

    bundle = load_data(DataConfig(data_name))
    bundle.meta = raw_meta(bundle.meta)
    encoders = load_encoders(spec)
    model = BindModel(encoders, load_centres(centres_path, list(encoders)))
    return CalibrationSetup(
        model, bundle.meta, bundle, {"example": "user encoders", "encoders": spec, "data": data_name, "inputs": "raw"}
    )


def raw_meta(meta: DatasetMeta) -> DatasetMeta:
    """``meta`` without any normalization: what calibrate's frozen encoders are fed (the stored values)."""
    specs = [ModalitySpec(s.name, s.kind, s.shape, s.valid_range, s.units) for s in meta.modalities]
    return DatasetMeta(meta.name, specs, list(meta.class_names), dict(meta.info))
