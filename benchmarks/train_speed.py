"""Training-step cost of CRMT-JT over JT, and the cost of the empirical Lipschitz estimate.

Same encoders, same batches, same optimiser; only the head (orthogonal vs concat) and the loss
(CE + rho * L1 vs CE) differ. Steps are timed in interleaved blocks so that load from other
processes hits both methods alike; the ratio of medians is reported (target <= 1.15).
The Lipschitz estimate (``lipschitz_samples`` training samples, and the whole training split) is
compared with one forward+backward epoch over the training split.

    python benchmarks/train_speed.py [--data avdigits] [--steps 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from mmrobust.certify.lipschitz import empirical_lipschitz
from mmrobust.data.base import iterate_batches
from mmrobust.data.registry import DataConfig, load_data
from mmrobust.io import write_json
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.report.tables import print_table
from mmrobust.training.base import StepContext
from mmrobust.training.crmt import CRMTJT, CRMTOptions
from mmrobust.training.jt import JointTraining


def step_timer(strategy, model, batches, gen):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()

    def run(i: int) -> float:
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss, _ = strategy.loss(model, x, y, StepContext(0, i, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="avdigits")
    p.add_argument("--steps", type=int, default=40, help="timed steps per method")
    p.add_argument("--block", type=int, default=5, help="steps per interleaved block")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lipschitz-samples", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/train_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_data(DataConfig(args.data, 0))
    meta = bundle.meta
    batches = list(iterate_batches(bundle.train, args.batch_size, shuffle=True, seed=0))
    torch.manual_seed(0)
    jt_model = build_model(meta, ModelConfig("concat", 128))
    torch.manual_seed(0)
    crmt_model = build_model(meta, ModelConfig("orthogonal", 128))
    gen = torch.Generator().manual_seed(0)
    runners = {
        "jt": step_timer(JointTraining(None, meta), jt_model, batches, gen),
        "crmt-jt (step 1)": step_timer(CRMTJT(CRMTOptions(), meta), crmt_model, batches, gen),
    }
    for run in runners.values():  # warm-up
        for i in range(3):
            run(i)
    times: dict[str, list[float]] = {k: [] for k in runners}
    i = 0
    while len(times["jt"]) < args.steps:
        for name, run in runners.items():
            times[name] += [run(i + j) for j in range(args.block)]
        i += args.block
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["crmt-jt (step 1)"] / med["jt"]

    # one forward+backward epoch of the CRMT model, as the unit for the Lipschitz cost
    crmt_model.train()
    crmt = CRMTJT(CRMTOptions(), meta)
    t0 = time.perf_counter()
    for x, y in batches:
        loss, _ = crmt.loss(crmt_model, x, y, StepContext(0, 0, gen))
        loss.backward()
    epoch_s = time.perf_counter() - t0
    crmt_model.eval()
    rows = {m: crmt_model.head.basis(m).detach() for m in crmt_model.modalities}
    lip = {}
    for n in (args.lipschitz_samples, len(bundle.train)):
        t0 = time.perf_counter()
        empirical_lipschitz(crmt_model, bundle.train, rows, batch_size=64, fit_samples=n)
        lip[n] = time.perf_counter() - t0

    table = [
        ["JT step (median)", f"{1e3 * med['jt']:.1f} ms", "1.00"],
        ["CRMT-JT step-1 step (median)", f"{1e3 * med['crmt-jt (step 1)']:.1f} ms", f"{ratio:.2f} (target <= 1.15)"],
        ["fwd+bwd epoch (CRMT model)", f"{epoch_s:.2f} s", "1.00 epoch"],
    ]
    for n, s in lip.items():
        table.append(
            [
                f"Lipschitz estimate, {n} samples, {meta.num_classes} rows x {len(rows)} modalities",
                f"{s:.2f} s",
                f"{s / epoch_s:.2f} epochs",
            ]
        )
    print_table(
        f"Training speed on {args.data} (batch {args.batch_size}, {args.threads} thread(s))",
        ["what", "time", "relative"],
        table,
    )
    out = {
        "data": args.data, "batch_size": args.batch_size, "threads": args.threads, "steps": args.steps,
        "median_step_s": med, "step_ratio_crmt_over_jt": ratio, "epoch_fwd_bwd_s": epoch_s,
        "lipschitz_s": {str(n): s for n, s in lip.items()},
        "lipschitz_over_epoch": {str(n): s / epoch_s for n, s in lip.items()},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
