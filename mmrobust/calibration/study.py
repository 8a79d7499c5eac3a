"""The frozen model against calibrated variants (each loss, with and without LoRA) on one setup."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmrobust.calibration.evaluate import Evaluation, evaluate
from mmrobust.calibration.options import CALIBRATION_LOSSES, CalibrationOptions, EvalOptions
from mmrobust.calibration.setup import CalibrationSetup
from mmrobust.calibration.train import CalibrationResult, calibrate
from mmrobust.errors import ConfigError
from mmrobust.progress import MessageFn


@dataclass
class Variant:
    """One calibrated model: its name (``ce``, ``ce+lora8``), training result and evaluation."""

    name: str
    result: CalibrationResult
    evaluation: Evaluation


@dataclass
class CalibrationStudy:
    setup_info: dict[str, Any]
    frozen: Evaluation
    variants: list[Variant]
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "setup": self.setup_info,
            "wall_time_s": self.wall_time_s,
            "frozen": self.frozen.to_dict(),
            "variants": {
                v.name: {
                    "loss": v.result.options.loss,
                    "lora_rank": v.result.options.lora_rank,
                    "calibration": v.result.to_dict(),
                    "evaluation": v.evaluation.to_dict(),
                }
                for v in self.variants
            },  # fmt: skip
        }


def variant_name(loss: str, lora_rank: int) -> str:
    return loss if lora_rank == 0 else f"{loss}+lora{lora_rank}"


def run_study(
    setup: CalibrationSetup,
    losses: Sequence[str] = CALIBRATION_LOSSES,
    lora_ranks: Sequence[int] = (0,),
    calibration: CalibrationOptions | None = None,
    evaluation: EvalOptions | None = None,
    on_message: MessageFn | None = None,
) -> CalibrationStudy:
    """Evaluate the frozen model, then calibrate and evaluate one variant per (loss, LoRA rank).

    ``calibration`` supplies every other training option (its ``loss`` and ``lora_rank`` are
    replaced per variant); the test split is used only here, never for training or model selection.
    """
    base = calibration or CalibrationOptions()
    ev_opts = evaluation or EvalOptions()
    if not losses or not lora_ranks:
        raise ConfigError("give at least one loss and one LoRA rank (0 = no LoRA)")
    # build every variant's options first: a bad loss or rank fails before hours of work
    plans = [
        (variant_name(loss, r), dataclasses.replace(base, loss=loss, lora_rank=r))
        for loss in losses
        for r in lora_ranks
    ]
    notify = on_message or (lambda _msg: None)
    start = time.perf_counter()
    notify("evaluating the frozen model")
    frozen = evaluate(setup.model, setup.meta, setup.data.test, ev_opts)
    variants = []
    for name, opts in plans:
        notify(f"calibrating: {name}")

        def on_epoch(m: str, row: dict[str, float], n: str = name) -> None:
            notify(_epoch_line(n, m, row))

        result = calibrate(setup, opts, on_epoch=on_epoch)
        notify(f"evaluating: {name}")
        variants.append(Variant(name, result, evaluate(result.model, setup.meta, setup.data.test, ev_opts)))
    return CalibrationStudy(setup.info, frozen, variants, time.perf_counter() - start)


def _epoch_line(name: str, m: str, row: dict[str, float]) -> str:
    return (f"{name} {m} epoch {int(row['epoch'])}: val clean {row['val_clean']:.3f}, adv {row['val_adv']:.3f}, "
            f"score {row['val_score']:.3f}")  # fmt: skip
