"""Certified training vs none: clean accuracy, CROWN-certified accuracy and CROWN's tightness.

For each ``METHOD:CERTIFIED`` cell (``certified`` = none | ibp | crown-ibp) this trains a run on the
dataset, then certifies the first ``--samples`` test samples with the ``crown`` certifier (joint l2,
standardised units) and compares the radii with the smallest adversarial radius of the first
``--tight`` correct ones (:func:`mmrobust.certify.tightness.tightness`). Prints a table and writes
JSON (one file per cell as it finishes, and the whole grid at the end)::

    OMP_NUM_THREADS=1 python benchmarks/certified_training.py --quick        # synthetic, seconds
    OMP_NUM_THREADS=1 python benchmarks/certified_training.py --cells jt:none,jt:ibp --epochs 6

Numbers depend on the machine only through time; run one cell per process to spread a grid.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.certify.radius import certified_accuracy
from mmrobust.certify.runner import certify_model, standardised_view
from mmrobust.certify.tightness import TightnessOptions, tightness
from mmrobust.config import RunConfig
from mmrobust.data import DataConfig
from mmrobust.precision import full_precision
from mmrobust.runs import load_run
from mmrobust.training import train

RADII = (0.5, 1.0, 2.0)


def run_cell(method: str, certified: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = RunConfig()
    cfg.data = DataConfig(args.data, args.seed, dict(kv.split("=", 1) for kv in args.data_opt))
    cfg.train.method, cfg.train.epochs, cfg.train.seed, cfg.train.progress = method, args.epochs, args.seed, False
    cfg.train.device = "cpu"
    if certified != "none":
        cfg.train.method_options = {
            "certified": certified, "certified_eps": str(args.eps), "certified_warmup": str(args.warmup),
            "certified_ramp": str(args.ramp),
        }  # fmt: skip
    out = Path(args.out) / f"{method}-{certified}"
    t0 = time.perf_counter()
    fit = train(cfg, out=out, force=True)
    train_s = time.perf_counter() - t0
    run = load_run(out, device="cpu")
    test = run.data().split("test")
    sub = test.subset(torch.arange(min(args.samples, len(test))))
    t0 = time.perf_counter()
    res = certify_model(run.model, run.meta, sub, "crown", options={"unimodal": False}, radii=[0.0, *RADII])
    cert_s = time.perf_counter() - t0
    joint = res.certificate.radii.joint
    with full_precision(), standardised_view(run.model, run.meta, sub, None) as (_, data_v, *_):
        tight = tightness(run.model, data_v, joint, "joint", TightnessOptions(samples=args.tight))
    return {
        "method": method,
        "certified": certified,
        "test_accuracy": fit.metrics["test_accuracy"],
        "best_epoch": fit.metrics["best_epoch"],
        "certified_accuracy": dict(zip(map(str, RADII), certified_accuracy(joint, RADII), strict=True)),
        "median_certified_radius": float(joint.median()),
        "median_ratio": tight.median_ratio,
        "tightness_samples": int(tight.indices.numel()),
        "violations": int(tight.violations),
        "train_time_s": train_s,
        "certify_time_s": cert_s,
        "certified_samples": len(sub),
        "units": "joint l2 radius on x_m / std_m (standardised)",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="jt:none,jt:ibp,jt:crown-ibp")
    p.add_argument("--data", default="avdigits")
    p.add_argument("--data-opt", action="append", default=[])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--eps", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--ramp", type=float, default=2.0)
    p.add_argument("--samples", type=int, default=100, help="test samples certified by CROWN")
    p.add_argument("--tight", type=int, default=20, help="correct samples attacked for the radius ratio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmark_results/certified_training")
    p.add_argument("--quick", action="store_true", help="synthetic data, 2 epochs, 20 samples")
    args = p.parse_args()
    if args.quick:
        args.data, args.epochs, args.samples, args.tight, args.ramp = "synthetic", 2, 20, 5, 1.0
    torch.set_num_threads(1)
    rows = []
    for cell in args.cells.split(","):
        method, _, certified = cell.partition(":")
        row = run_cell(method, certified or "none", args)
        rows.append(row)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"{method}-{row['certified']}.json").write_text(json.dumps(row, indent=1))
    head = f"{'method':10} {'certified':10} {'clean':>6} " + " ".join(f"{'r=' + str(r):>6}" for r in RADII)
    print(head + f" {'median r':>9} {'ratio':>7} {'viol':>4} {'train s':>8} {'cert s':>7}")
    for r in rows:
        acc = " ".join(f"{r['certified_accuracy'][str(x)]:6.3f}" for x in RADII)
        ratio = f"{r['median_ratio']:7.3f}" if r["median_ratio"] is not None else "      -"
        print(f"{r['method']:10} {r['certified']:10} {r['test_accuracy']:6.3f} {acc} {r['median_certified_radius']:9.3f} "
              f"{ratio} {r['violations']:4d} {r['train_time_s']:8.0f} {r['certify_time_s']:7.0f}")  # fmt: skip
    out = Path(args.out) / "certified_training.json"
    out.write_text(json.dumps({"schema_version": 2, "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
