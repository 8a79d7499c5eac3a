"""alpha-CROWN against plain CROWN on trained runs: certified radii, their ratio, the cost per sample.

For each run, the first ``--samples`` test samples are certified once by the ``alpha-crown``
certifier, which bisects with plain CROWN first and then goes on above each plain radius with the
optimised slopes (so both radii come from one call, on the same samples, in the same process).
Prints per run: certified accuracy (joint l2) of both at ``--radii``, the median ratio alpha/plain
radius over the correctly classified samples with a positive plain radius, the fraction improved,
and the seconds per sample of each part. Writes ``benchmarks/results/alpha_crown_gain.json``.

    python benchmarks/alpha_crown_gain.py --run RUN [--run RUN2] [--samples 32] [--iterations 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.certify.radius import certified_accuracy
from mmrobust.certify.runner import certify_model
from mmrobust.io import write_json
from mmrobust.report.tables import print_table
from mmrobust.runs import load_run

OUT = Path(__file__).resolve().parent / "results" / "alpha_crown_gain.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="run folder (repeatable)")
    ap.add_argument("--samples", type=int, default=32, help="first test samples certified")
    ap.add_argument("--radii", default="0.1,0.5,1,2")
    ap.add_argument("--steps", type=int, default=7, help="bisection rounds (plain, then as many above it)")
    ap.add_argument("--iterations", type=int, default=20, help="gradient steps per radius tried")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seconds", type=float, default=30.0, help="optimisation budget per sample")
    ap.add_argument("--intermediate", default="auto", help="auto|crown|fast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = [float(r) for r in args.radii.split(",")]
    options = {"steps": args.steps, "iterations": args.iterations, "lr": args.lr, "seconds": args.seconds,
               "intermediate": args.intermediate, "unimodal": False}  # fmt: skip
    rows, results = [], []
    for path in args.run:
        run = load_run(path)
        split = run.data().test.subset(slice(0, args.samples))
        t0 = time.perf_counter()
        res = certify_model(run.model, run.meta, split, "alpha-crown", options=options)
        wall = time.perf_counter() - t0
        cert = res.certificate
        info = cert.info["alpha_crown"]
        alpha = cert.radii.joint.double()
        plain = torch.tensor(info["crown_radii"]["joint"], dtype=torch.float64)
        acc_a, acc_p = certified_accuracy(alpha, grid), certified_accuracy(plain, grid)
        name = Path(path).name
        entry: dict[str, Any] = {
            "run": str(path),
            "method": run.config.train.method,
            "lipschitz_encoders": bool(getattr(run.config.model, "lipschitz_encoders", False)),
            "samples": len(split),
            "clean_accuracy": float(cert.radii.correct.double().mean()),
            "crown_certified_accuracy": dict(zip(map(str, grid), acc_p, strict=True)),
            "alpha_certified_accuracy": dict(zip(map(str, grid), acc_a, strict=True)),
            "median_crown_radius": float(plain[cert.radii.correct].median()),
            "median_alpha_radius": float(alpha[cert.radii.correct].median()),
            "tightening": info["joint"],
            "crown_seconds_per_sample": info["crown_seconds_per_sample"],
            "alpha_seconds_per_sample": info["alpha_seconds_per_sample"],
            "cost": {k: info[k] for k in ("calls", "steps", "budget_stops", "skipped", "stalls")},
            "wall_seconds": wall,
        }
        results.append(entry)
        t = info["joint"]
        rows.append([name, "crown", *acc_p, entry["median_crown_radius"], "1", "-", info["crown_seconds_per_sample"]])
        rows.append([name, "alpha-crown", *acc_a, entry["median_alpha_radius"], t["median_ratio"], t["improved"],
                     info["crown_seconds_per_sample"] + info["alpha_seconds_per_sample"]])  # fmt: skip
        print(f"{name}: median ratio {t['median_ratio']} improved {t['improved']} "
              f"crown {info['crown_seconds_per_sample']:.2f}s/sample alpha +{info['alpha_seconds_per_sample']:.2f}s/sample",
              flush=True)  # fmt: skip
    headers = ["run", "certifier", *[f"r={r:g}" for r in grid], "median radius", "median ratio to crown",
               "improved", "s/sample"]  # fmt: skip
    print_table("alpha-CROWN vs CROWN (joint l2, normalised input space)", headers, rows)
    write_json(Path(args.out), {"args": vars(args), "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
