"""Why does calibration (not) help on the avdigits-bind example? A sweep of training options,
measured on the VALIDATION split only (the test split is left to ``calibration_matrix.py``).

The example (frozen "Bind" model) is built once; then, per configuration, one modality's head is
calibrated and the validation split is evaluated at 2/4/8 / 255 with APGD-CE + APGD-T (cascaded,
``--steps`` iterations; a cheap stand-in for the full protocol, enough to rank configurations).
Each configuration's stage-2 history is kept: the head's accuracy on the attack's training
examples (before each step; ~0 = the examples do fool the current pipeline), the loss, the
gradient norm reaching the head and the validation accuracies per epoch.

    python benchmarks/calibration_sweep.py --modality image --config loss=ce,eps=2/255 --config loss=ce,lr=1e-3

A ``--config`` is a comma list of ``CalibrationOptions`` fields (eps as ``a/b`` or a float); without
any, the built-in grid runs. Prints a table and writes ``benchmarks/results/calibration_sweep_<tag>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.calibration import BindModel, CalibrationOptions, EvalOptions, calibrate, evaluate
from mmrobust.calibration.examples import EXAMPLE_DEFAULTS, avdigits_bind
from mmrobust.calibration.setup import CalibrationSetup
from mmrobust.eval.suites import parse_eps

RESULTS = Path(__file__).resolve().parent / "results"

#: the built-in grid: (name, overrides of the example's calibration defaults)
GRID: list[tuple[str, dict[str, Any]]] = [
    ("ce eps8 lr3e-3 (example default)", {}),
    ("ce eps4", {"eps": 4 / 255}),
    ("ce eps2", {"eps": 2 / 255}),
    ("ce eps2 lr1e-3", {"eps": 2 / 255, "lr": 1e-3}),
    ("ce eps2 lr3e-4", {"eps": 2 / 255, "lr": 3e-4}),
    ("ce eps4 warmup2", {"eps": 4 / 255, "eps_warmup": 2}),
    ("ce eps2 clean1", {"eps": 2 / 255, "clean_weight": 1.0}),
    ("ce eps2 T0.07", {"eps": 2 / 255, "ce_temperature": 0.07}),
    ("ce eps2 hidden1024", {"eps": 2 / 255, "hidden": 1024}),
]


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    out: dict[str, Any] = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        key, value = item.split("=", 1)
        if key == "eps":
            out[key] = (parse_eps(value, "eps") or [0.0])[0]
        elif key in ("loss", "train_attack"):
            out[key] = value
        else:
            num = float(value)
            out[key] = int(num) if num.is_integer() and "." not in value and "e" not in value else num
    return text, out


def single(setup: CalibrationSetup, model: BindModel, m: str) -> BindModel:
    """``model`` restricted to modality ``m`` (evaluation then attacks only that one)."""
    heads = {m: model.heads[m]} if m in model.heads else {}
    return BindModel({m: setup.model.encoders[m]}, {m: setup.model.centres(m)}, heads)


def val_scores(setup: CalibrationSetup, model: BindModel, m: str, steps: int) -> dict[str, float]:
    opts = EvalOptions(attacks=("apgd-ce", "apgd-t"), steps=steps, targets=3)
    ev = evaluate(single(setup, model, m), setup.meta, setup.data.val, opts).modalities[m]
    out = {"clean": ev.clean.accuracy}
    out.update({f"{round(b.eps * 255)}/255": b.worst.accuracy for b in ev.budgets})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modality", default="image")
    p.add_argument("--config", action="append", default=[])
    p.add_argument("--epochs", type=int, default=None, help="stage-2 epochs (default: the example's)")
    p.add_argument("--steps", type=int, default=10, help="attack iterations of the validation evaluation")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--tag", default="sweep")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    setup = avdigits_bind(n_train=args.n_train, n_val=args.n_val)
    build_s = time.perf_counter() - t0
    base = dict(EXAMPLE_DEFAULTS["avdigits-bind"]["calibration"])
    if args.epochs is not None:
        base["epochs"] = args.epochs
    grid = [parse_config(c) for c in args.config] if args.config else GRID
    m = args.modality
    rows: list[dict[str, Any]] = []
    frozen = val_scores(setup, setup.model, m, args.steps)
    print(f"setup built in {build_s:.0f} s; frozen {m} (val): {frozen}", flush=True)
    out_path = RESULTS / f"calibration_sweep_{args.tag}.json"
    RESULTS.mkdir(exist_ok=True)
    for name, overrides in grid:
        opts = CalibrationOptions(**{**base, **overrides})
        t, c = time.perf_counter(), time.process_time()
        result = calibrate(setup, opts, modalities=[m])
        head = result.heads[m]
        scores = val_scores(setup, result.model, m, args.steps)
        row = {"name": name, "options": opts.to_dict(), "val": scores, "best_epoch": head.best_epoch,
               "history": head.history, "wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}  # fmt: skip
        rows.append(row)
        hist = " | ".join(
            f"e{int(h['epoch'])}: adv-train {h.get('train_adv_acc', float('nan')):.2f} loss {h['train_loss']:.3f} "
            f"grad {h.get('grad_norm', float('nan')):.2g} val {h['val_clean']:.2f}/{h['val_adv']:.2f}"
            for h in head.history
        )
        print(f"{name}: best epoch {head.best_epoch}; val {scores}; {row['wall_s']:.0f} s\n    {hist}", flush=True)
        out_path.write_text(json.dumps({"modality": m, "frozen_val": frozen, "build_s": build_s, "base": base,
                                        "rows": rows, "total_wall_s": time.perf_counter() - t0,
                                        "total_cpu_s": time.process_time() - c0}, indent=1))  # fmt: skip
    print(f"{'config':40s} {'best':>4s} " + " ".join(f"{k:>7s}" for k in frozen))
    print(f"{'frozen':40s} {'-':>4s} " + " ".join(f"{v:7.3f}" for v in frozen.values()))
    for r in rows:
        print(f"{r['name'][:40]:40s} {r['best_epoch']:4d} " + " ".join(f"{v:7.3f}" for v in r["val"].values()))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
