"""Certified accuracy, tightness and cost of every certifier on trained runs.

For each run and certifier (``sound`` and ``empirical`` Lipschitz radii, ``crown``, ``smoothing``)
on the first ``--samples`` test samples: certified accuracy (joint l2) at the ``--radii``, wall
time, and, on the first ``--tightness`` of them, the smallest adversarial joint-l2 radius our
attacks find (CE/CW PGD + APGD-CE with bisection over eps; computed once per run) with the median
ratio certified / attack radius and the violations (certified > attack radius: must be 0 for a
sound certifier). The attack radii also give the attack accuracy at each radius (an upper bound
on the robust accuracy). Prints a table and writes ``benchmarks/results/certify_tightness.json``.

    python benchmarks/certify_tightness.py --run RUN [--run RUN2] [--samples 200] [--tightness 40]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.certify.radius import certified_accuracy
from mmrobust.certify.runner import certify_model, standardised_view
from mmrobust.certify.tightness import TightnessOptions, attack_radius, compare, robust_at
from mmrobust.io import write_json
from mmrobust.report.tables import print_table
from mmrobust.runs import load_run

OUT = Path(__file__).resolve().parent / "results" / "certify_tightness.json"
CERTIFIERS = ("sound", "empirical", "crown", "smoothing")


def certify(name: str, run: Any, split: Any, train: Any, args: argparse.Namespace) -> torch.Tensor:
    """Joint l2 radii of ``split`` by certifier ``name`` (through the registry, like the CLI)."""
    options: dict[str, Any] = {
        "empirical": {"fit_samples": args.lipschitz_samples},
        "sound": {},
        "crown": {
            "steps": args.crown_steps,
            "unimodal": False,
            "chunk": args.chunk,
            "intermediate": args.crown_intermediate,
        },
        "smoothing": {"sigma": args.sigma, "n0": args.smoothing_n0, "n": args.smoothing_n, "unimodal": False},
    }[name]
    return certify_model(run.model, run.meta, split, name, train, options=options).certificate.radii.joint.double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="run folder (repeatable)")
    ap.add_argument("--certifiers", default=",".join(CERTIFIERS))
    ap.add_argument("--samples", type=int, default=200, help="test samples certified")
    ap.add_argument("--tightness", type=int, default=40, help="test samples attacked (<= --samples)")
    ap.add_argument("--radii", default="0.1,0.5,1,2")
    ap.add_argument("--crown-steps", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=8, help="crown: samples bounded at once (its default)")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--smoothing-n0", type=int, default=50)
    ap.add_argument("--smoothing-n", type=int, default=500)
    ap.add_argument("--attack-steps", type=int, default=30)
    ap.add_argument("--lipschitz-samples", type=int, default=512, help="empirical: training samples to maximise over")
    ap.add_argument("--pgd-eps", type=float, default=0.5, help="also: worst-case attack accuracy at this joint eps")
    ap.add_argument("--crown-intermediate", default="auto", help="crown: intermediate bounds auto|crown|fast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = [float(r) for r in args.radii.split(",")]
    names = [c for c in args.certifiers.split(",") if c]
    results: list[dict[str, Any]] = []
    rows = []
    for path in args.run:
        run = load_run(path)
        bundle = run.data()
        split = bundle.test.subset(slice(0, args.samples))
        n_att = min(args.tightness, len(split))
        topts = TightnessOptions(steps=args.attack_steps, search_rounds=6, bisect_rounds=6)
        # attacks in the coordinates the certifiers' radii measure (standardised where the model standardises)
        with standardised_view(run.model, run.meta, split, None) as (_, split_v, *_):
            att_v = split_v.subset(slice(0, n_att))
            t0 = time.perf_counter()
            adv = attack_radius(run.model, att_v.inputs, att_v.labels, run.model.modalities, topts)
            attack_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            robust = torch.cat([
                robust_at(run.model, *split_v.take(slice(i, i + 100)), args.pgd_eps, run.model.modalities, topts)
                for i in range(0, len(split_v), 100)
            ])  # fmt: skip
            pgd_s = time.perf_counter() - t0
        with torch.no_grad():
            clean = float((run.model(split.inputs).argmax(1) == split.labels).double().mean())
        entry: dict[str, Any] = {
            "run": str(path),
            "method": run.config.train.method,
            "lipschitz_encoders": bool(getattr(run.config.model, "lipschitz_encoders", False)),
            "samples": len(split),
            "tightness_samples": n_att,
            "attack_accuracy": dict(zip(map(str, grid), certified_accuracy(adv, grid), strict=True)),
            "median_attack_radius": float(adv[torch.isfinite(adv) & (adv > 0)].median()),
            "attack_seconds": attack_s,
            "clean_accuracy": clean,
            "pgd_eps": args.pgd_eps,
            "pgd_accuracy": float(robust.double().mean()),
            "pgd_seconds": pgd_s,
            "certifiers": {},
        }
        for name in names:
            t0 = time.perf_counter()
            radii = certify(name, run, split, bundle.train, args)
            secs = time.perf_counter() - t0
            tight = compare("joint", torch.arange(n_att), radii[:n_att], adv)
            acc = certified_accuracy(radii, grid)
            entry["certifiers"][name] = {
                "certified_accuracy": dict(zip(map(str, grid), acc, strict=True)),
                "median_ratio": tight.median_ratio,
                "violations": tight.violations,
                "seconds": secs,
                "seconds_per_sample": secs / len(split),
            }
            rows.append([Path(path).name, name, *acc, tight.median_ratio, tight.violations, secs])
            print(f"{Path(path).name} {name}: {acc} ratio {tight.median_ratio} violations {tight.violations} {secs:.1f}s",
                  flush=True)  # fmt: skip
        rows.append([Path(path).name, "attack (upper bound)", *entry["attack_accuracy"].values(), 1.0, "-", attack_s])
        print(f"{Path(path).name}: clean {clean:.3f}, worst-case PGD/APGD accuracy at eps {args.pgd_eps}: "
              f"{entry['pgd_accuracy']:.3f} ({len(split)} samples, {pgd_s:.0f}s)", flush=True)  # fmt: skip
        results.append(entry)
    headers = ["run", "certifier", *[f"r={r:g}" for r in grid], "median cert/attack", "violations", "seconds"]
    print_table("certified accuracy (joint l2), tightness and cost", headers, rows)
    write_json(Path(args.out), {"args": vars(args), "results": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
