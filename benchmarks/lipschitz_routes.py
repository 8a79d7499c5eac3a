"""1-Lipschitz routes side by side: encoders (AOL ``lip-*`` vs SLL ``sll-*``) x loss (``crmt-jt`` vs ``lmt``).

For each cell: train on ``--data`` (seed, epochs, lr as given), then on the first ``--samples`` test
samples: clean accuracy, certified accuracy (joint l2, standardised units) at ``--radii`` by
``sound`` (Theorem 3.3 form: ``min_k (h_y - h_k) / ||(L^m[y, k])_m||``) and ``crown``, the
worst-case attack accuracy (PGD-CE, PGD-CW, APGD-CE, ``--attack-steps``) at the same radii, and a
soundness check of the CROWN radii (PGD CE and CW inside each ball at 0.999x its radius, jointly and
per modality: violations must be 0). Prints a table and writes ``benchmarks/results/lipschitz_routes.json``.

    python benchmarks/lipschitz_routes.py --quick                     # synthetic data, seconds
    python benchmarks/lipschitz_routes.py --data avdigits --epochs 15 \\
        --cells sll:lmt:1.5,lip:lmt:2,lip:crmt-jt --samples 600
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.certify.radius import certified_accuracy
from mmrobust.certify.runner import certify_model, standardised_view
from mmrobust.certify.soundness import soundness_check
from mmrobust.certify.tightness import TightnessOptions, robust_at
from mmrobust.config import RunConfig
from mmrobust.data.registry import DataConfig
from mmrobust.io import write_json
from mmrobust.models.lipschitz import LIPSCHITZ_ENCODERS
from mmrobust.report.tables import print_table
from mmrobust.runs import load_run
from mmrobust.training import train

OUT = Path(__file__).resolve().parent / "results" / "lipschitz_routes.json"
SLL = {"vector": "sll-mlp", "sequence": "sll-tcn", "image": "sll-cnn", "spectrogram": "sll-cnn"}


def run_cell(cell: str, args: argparse.Namespace, grid: list[float]) -> dict[str, Any]:
    family, method, *eps = cell.split(":")
    cfg = RunConfig()
    cfg.data = DataConfig(args.data, args.seed, dict(args.data_opt))
    cfg.train.method, cfg.train.epochs, cfg.train.seed = method, args.epochs, args.seed
    cfg.train.optim.lr = args.lr
    cfg.train.progress = False
    if method == "lmt":
        cfg.train.method_options = {"margin_eps": float(eps[0]) if eps else 2.0, "margin_ramp": args.ramp}
    if args.feature_dim:
        cfg.model.feature_dim = args.feature_dim
    out = Path(args.runs) / cell.replace(":", "-")
    from mmrobust.data.registry import load_data

    meta = load_data(cfg.data).meta
    table = SLL if family == "sll" else LIPSCHITZ_ENCODERS
    cfg.model.encoders = {s.name: table[s.kind] for s in meta.modalities}
    t0 = time.perf_counter()
    train(cfg, out=out, force=True)
    train_s = time.perf_counter() - t0
    run = load_run(out)
    test = run.data().test
    split = test.subset(slice(0, min(args.samples, len(test))))
    with torch.no_grad():
        clean = float((run.model(split.inputs).argmax(1) == split.labels).double().mean())
    entry: dict[str, Any] = {"cell": cell, "samples": len(split), "clean": clean, "train_seconds": train_s}
    crown = None
    for name, opts in (("sound", {"theorem": "3.3"}), ("crown", {"steps": args.crown_steps, "unimodal": False})):
        t0 = time.perf_counter()
        cert = certify_model(run.model, run.meta, split, name, options=opts).certificate
        radii = cert.radii.joint.double()
        entry[name] = {"certified": certified_accuracy(radii, grid), "seconds": time.perf_counter() - t0}
        crown = radii if name == "crown" else crown
    assert crown is not None
    topts = TightnessOptions(steps=args.attack_steps)
    zeros = {m: torch.zeros(len(split)) for m in run.model.modalities}
    # attacks in the coordinates the radii measure (the model's standardised inputs, as the CLI does)
    with standardised_view(run.model, run.meta, split, None) as (meta_v, split_v, *_):
        t0 = time.perf_counter()
        entry["attack"] = [
            float(
                torch.cat([
                    robust_at(run.model, *split_v.take(slice(i, i + 100)), eps_, run.model.modalities, topts)
                    for i in range(0, len(split_v), 100)
                ]).double().mean()
            )
            for eps_ in grid
        ]  # fmt: skip
        entry["attack_seconds"] = time.perf_counter() - t0
        check = soundness_check(run.model, meta_v, split_v, {"joint": crown, "unimodal": zeros},
                                max_samples=args.soundness, steps=args.attack_steps)  # fmt: skip
    entry["soundness"] = {"checked": check["joint"]["checked"], "violations": check["joint"]["violations"]}
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny synthetic grid (seconds)")
    p.add_argument("--data", default="avdigits")
    p.add_argument("--data-opt", action="append", default=[], type=lambda s: tuple(s.split("=", 1)))
    p.add_argument("--cells", default="lip:crmt-jt,lip:lmt:2,sll:lmt:1.5", help="FAMILY:METHOD[:MARGIN_EPS],...")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ramp", type=int, default=3, help="lmt: margin_ramp epochs")
    p.add_argument("--feature-dim", type=int, default=0, help="0: the default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=600)
    p.add_argument("--radii", default="0.5,1,2")
    p.add_argument("--crown-steps", type=int, default=4)
    p.add_argument("--attack-steps", type=int, default=50)
    p.add_argument("--soundness", type=int, default=100, help="samples whose CROWN balls are attacked")
    p.add_argument("--runs", default="benchmarks/results/lipschitz_routes_runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.epochs, args.samples, args.soundness, args.attack_steps = "synthetic", 2, 40, 20, 10
        args.data_opt = [("n_train", "200"), ("n_val", "60"), ("n_test", "60"), ("dim", "12"), ("classes", "4")]
        args.feature_dim = 16
    torch.set_num_threads(args.threads)
    grid = [float(r) for r in args.radii.split(",")]
    results, rows = [], []
    for cell in args.cells.split(","):
        e = run_cell(cell, args, grid)
        results.append(e)
        for name in ("sound", "crown"):
            rows.append([cell, f"{e['clean']:.3f}", name, *[f"{v:.3f}" for v in e[name]["certified"]],
                         f"{e[name]['seconds']:.0f}"])  # fmt: skip
        rows.append([cell, f"{e['clean']:.3f}", "attack (worst case)", *[f"{v:.3f}" for v in e["attack"]],
                     f"{e['attack_seconds']:.0f}"])  # fmt: skip
        print(f"{cell}: train {e['train_seconds']:.0f}s, CROWN soundness: {e['soundness']}", flush=True)
    headers = ["cell", "clean", "certifier", *[f"r={r:g}" for r in grid], "seconds"]
    print_table(
        f"certified / attack accuracy (joint l2, {args.data}, first {args.samples} test samples)", headers, rows
    )
    write_json(Path(args.out), {"args": {k: v for k, v in vars(args).items()}, "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
