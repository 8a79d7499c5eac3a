"""Routes to a certificate, side by side: how to train, how to certify, what each proves.

Routes (``--routes``, all by default):

* ``standard``: standard training (JT), certified by CROWN (``--alpha``: also alpha-CROWN);
* ``certified``: certified training (JT with the method option ``certified=crown-ibp``, or
  ``--certified-mode ibp``), certified by CROWN; skipped with "skipped: option not available" where
  training refuses the option;
* ``lipschitz``: 1-Lipschitz encoders (CRMT-JT, ``lipschitz_encoders``; ``--lipschitz-encoder
  MODALITY=NAME`` picks another registered encoder for a modality), certified by CROWN (and
  alpha-CROWN with ``--alpha``);
* ``smoothing``: Gaussian-noise training (``gaussian``, sigma ``--sigma``), certified by randomized
  smoothing (probabilistic: its failure probability alpha is stated; not a deterministic certificate).

For each dataset (``--datasets``), route and seed (``--seeds``; the data split seed stays 0), a run is
trained with :func:`mmrobust.training.train` and, on the first ``--samples`` test samples:

* clean accuracy; certified accuracy (joint l2, the radii in the standardised scales) at ``--radii``;
* worst-case attack accuracy at the same joint budgets (:func:`mmrobust.eval.evaluate_model`, suite
  ``curves``: l2 PGD with the CE and CW losses, per-sample worst case);
* median certified / attack radius over the first ``--tightness`` correctly classified samples (the
  smallest joint perturbation found by CE/CW PGD and APGD-CE with bisection), and the violations
  (certified beyond an attack: must be 0 for a sound certifier); with ``--soundness N``, the
  certified balls of N samples attacked at 0.999 of each radius (must be 0 violations too);
* training and certification time (wall seconds, this process).

Prints a table, writes ``benchmarks/results/certified_routes.json`` (every run and the mean ± sd
over seeds) and, with ``--markdown``, the table for docs/certify.md; ``--table FILE.json`` renders
the markdown table of a JSON written before. ``--quick``: synthetic data, one seed, few epochs and
samples (a smoke test of every route in a few minutes).

    python benchmarks/certified_routes.py --quick
    python benchmarks/certified_routes.py --datasets avdigits,synthetic --seeds 0,1,2 --alpha
    python benchmarks/certified_routes.py --table benchmarks/results/certified_routes.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmrobust.certify.radius import certified_accuracy
from mmrobust.certify.runner import certify_model, standardised_view
from mmrobust.certify.soundness import soundness_check
from mmrobust.certify.tightness import TightnessOptions, compare, tightness
from mmrobust.config import RunConfig
from mmrobust.data import DataConfig
from mmrobust.errors import ConfigError
from mmrobust.eval.api import evaluate_model
from mmrobust.io import read_json, write_json
from mmrobust.precision import full_precision
from mmrobust.report.markdown import md_table
from mmrobust.report.tables import print_table
from mmrobust.runs import load_run
from mmrobust.training import train

OUT = Path(__file__).resolve().parent / "results" / "certified_routes.json"
KIND = {"crown": "sound", "alpha-crown": "sound", "sound": "sound", "smoothing": "probabilistic"}


@dataclass
class Route:
    """How a route trains (method, its options, encoders, learning rate) and which certifiers it uses."""

    method: str
    certifiers: tuple[str, ...]
    method_options: dict[str, Any] = field(default_factory=dict)
    lipschitz: bool = False
    lr: float | None = None
    epochs: dict[str, int] = field(default_factory=dict)  # per dataset (full mode)


def routes(args: argparse.Namespace) -> dict[str, Route]:
    crown = ("crown", "alpha-crown") if args.alpha else ("crown",)
    return {
        "standard": Route("jt", crown, epochs={"avdigits": 8, "synthetic": 10}),
        "certified": Route("jt", crown, {"certified": args.certified_mode}, epochs={"avdigits": 8, "synthetic": 10}),
        "lipschitz": Route("crmt-jt", crown, lipschitz=True, lr=3e-3, epochs={"avdigits": 24, "synthetic": 10}),
        "smoothing": Route("gaussian", ("smoothing",), {"sigma": args.sigma}, epochs={"avdigits": 8, "synthetic": 10}),
    }


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"{what}: expected KEY=VALUE, got '{item}'")
        out[key] = value
    return out


def config(dataset: str, route: Route, seed: int, args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig()
    cfg.data = DataConfig(dataset, 0, dict(args.data_opts.get(dataset, {})))
    cfg.train.method, cfg.train.seed, cfg.train.progress = route.method, seed, False
    cfg.train.epochs = args.epochs or route.epochs.get(dataset, 10)
    cfg.train.method_options = {**route.method_options, **args.method_opts.get(route.method, {})}
    if route.lr is not None:
        cfg.train.optim.lr = route.lr
    cfg.model.lipschitz_encoders = route.lipschitz
    if route.lipschitz and args.lipschitz_encoder:
        cfg.model.encoders = dict(args.lipschitz_encoder)
    return cfg


def cert_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "crown": {"steps": args.crown_steps, "unimodal": False},
        "alpha-crown": {"steps": args.crown_steps, "unimodal": False, "iterations": args.alpha_iterations,
                        "seconds": args.alpha_seconds},
        "smoothing": {"sigma": args.sigma, "n0": args.smoothing_n0, "n": args.smoothing_n, "unimodal": False},
    }[name]  # fmt: skip


def attack_accuracy(run: Any, split: Any, grid: list[float], args: argparse.Namespace) -> dict[str, float]:
    """Worst case over CE- and CW-PGD (l2, all modalities jointly) at each budget of ``grid``."""
    res = evaluate_model(run.model, run.meta, split, "curves", eps=grid, steps=args.attack_steps, losses=("ce", "cw"))
    every = set(run.model.modalities)
    out = {}
    for row in res.rows:
        if row.loss == "worst" and set(row.modalities) == every and isinstance(row.eps, float):
            out[f"{row.eps:g}"] = row.accuracy
    return out


def one_run(dataset: str, name: str, route: Route, seed: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cfg = config(dataset, route, seed, args)
    out = root / dataset / name / f"seed{seed}"
    entry: dict[str, Any] = {"dataset": dataset, "route": name, "seed": seed, "method": route.method,
                             "method_options": cfg.train.method_options, "lipschitz_encoders": route.lipschitz,
                             "encoders": dict(cfg.model.encoders), "epochs": cfg.train.epochs}  # fmt: skip
    t0 = time.perf_counter()
    try:
        train(cfg, out=out, force=True)
    except ConfigError as exc:  # e.g. a method option this version does not have
        entry["skipped"] = f"skipped: option not available ({exc})"
        return entry
    entry["train_seconds"] = time.perf_counter() - t0
    run = load_run(out)
    split = run.data().test.subset(slice(0, args.samples))
    grid = args.grid
    t0 = time.perf_counter()
    entry["attack_accuracy"] = attack_accuracy(run, split, grid, args)
    entry["attack_seconds"] = time.perf_counter() - t0
    certs: dict[str, Any] = {}
    attack = None
    for cname in route.certifiers:
        t0 = time.perf_counter()
        res = certify_model(
            run.model, run.meta, split, cname, run.data().train, grid, options=cert_options(cname, args)
        )
        secs = time.perf_counter() - t0
        cert = res.certificate
        joint = cert.radii.joint.double()
        c: dict[str, Any] = {
            "guarantee": KIND.get(cname, cert.guarantee.value),
            "alpha": cert.alpha,
            "certified_accuracy": dict(zip(map(str, grid), certified_accuracy(joint, grid), strict=True)),
            "seconds": secs,
            "seconds_per_sample": secs / max(len(split), 1),
        }
        if "alpha_crown" in cert.info:
            info = cert.info["alpha_crown"]
            c["tightening"] = info["joint"]
            c["crown_seconds_per_sample"] = info["crown_seconds_per_sample"]
            c["alpha_seconds_per_sample"] = info["alpha_seconds_per_sample"]
        with full_precision(), standardised_view(run.model, run.meta, split, None) as (meta_v, data_v, *_):
            if args.tightness > 0:
                if attack is None:
                    attack = tightness(run.model, data_v, joint, "joint",
                                       TightnessOptions(samples=args.tightness, steps=args.attack_steps))  # fmt: skip
                    entry["median_attack_radius"] = (
                        float(attack.attack_radius[torch.isfinite(attack.attack_radius)].median())
                        if torch.isfinite(attack.attack_radius).any()
                        else None
                    )
                t = compare("joint", attack.indices, joint[attack.indices], attack.attack_radius)
                c["median_ratio"], c["violations"] = t.median_ratio, t.violations
            if args.soundness > 0:  # joint balls only (radius 0: not attacked)
                zeros = {m: torch.zeros_like(joint) for m in run.model.modalities}
                check = soundness_check(run.model, meta_v, data_v, {"joint": joint, "unimodal": zeros},
                                        max_samples=args.soundness, steps=args.attack_steps)  # fmt: skip
                c["soundness_violations"] = check["joint"]["violations"]
        certs[cname] = c
        entry.setdefault("clean_accuracy", res.clean_accuracy)
    entry["certifiers"] = certs
    return entry


def _mean_sd(values: list[float]) -> list[float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return []
    return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]


def aggregate(runs: list[dict[str, Any]], grid: list[float]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per dataset, route and certifier (skipped routes are listed once)."""
    out: list[dict[str, Any]] = []
    keys = sorted({(r["dataset"], r["route"]) for r in runs}, key=lambda k: (k[0], list(ORDER).index(k[1])))
    for ds, route in keys:
        group = [r for r in runs if r["dataset"] == ds and r["route"] == route]
        done = [r for r in group if "skipped" not in r]
        if not done:
            out.append({"dataset": ds, "route": route, "skipped": group[0]["skipped"], "seeds": len(group)})
            continue
        base = {"dataset": ds, "route": route, "seeds": len(done), "method": done[0]["method"],
                "clean_accuracy": _mean_sd([r["clean_accuracy"] for r in done]),
                "attack_accuracy": {str(g): _mean_sd([r["attack_accuracy"].get(f"{g:g}") for r in done]) for g in grid},
                "train_seconds": _mean_sd([r["train_seconds"] for r in done])}  # fmt: skip
        for cname in done[0]["certifiers"]:
            cs = [r["certifiers"][cname] for r in done]
            out.append({
                **base,
                "certifier": cname,
                "guarantee": cs[0]["guarantee"],
                "alpha": cs[0]["alpha"],
                "certified_accuracy": {str(g): _mean_sd([c["certified_accuracy"][str(g)] for c in cs]) for g in grid},
                "median_ratio": _mean_sd([c.get("median_ratio") for c in cs]),
                "violations": sum(c.get("violations", 0) or 0 for c in cs),
                "soundness_violations": sum(c.get("soundness_violations", 0) or 0 for c in cs),
                "certify_seconds": _mean_sd([c["seconds"] for c in cs]),
                "tightening": _mean_sd([c["tightening"]["median_ratio"] for c in cs if c.get("tightening")]),
            })  # fmt: skip
    return out


ORDER = ("standard", "certified", "lipschitz", "smoothing")


def _fmt(ms: list[float], digits: int = 3) -> str:
    if not ms:
        return "-"
    return f"{ms[0]:.{digits}f}" + (f" ± {ms[1]:.{digits}f}" if ms[1] else "")


def table_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    grid = [float(g) for g in doc["grid"]]
    headers = ["dataset", "route", "certifier", "clean", *[f"cert r={g:g}" for g in grid],
               *[f"attack r={g:g}" for g in grid], "median cert/attack", "violations", "train s", "certify s"]  # fmt: skip
    rows: list[list[Any]] = []
    for a in doc["summary"]:
        if "skipped" in a:
            rows.append([a["dataset"], a["route"], a["skipped"], *["-"] * (len(headers) - 3)])
            continue
        label = a["certifier"]
        if a["guarantee"] != "sound":
            label += f" ({a['guarantee']}, alpha {a['alpha']:g})" if a["alpha"] is not None else f" ({a['guarantee']})"
        if a["tightening"]:
            label += f" [x{a['tightening'][0]:.3f} vs crown]"
        rows.append([a["dataset"], f"{a['route']} ({a['method']}, {a['seeds']} seed{'s' * (a['seeds'] > 1)})", label,
                     _fmt(a["clean_accuracy"]), *[_fmt(a["certified_accuracy"][str(g)]) for g in grid],
                     *[_fmt(a["attack_accuracy"][str(g)]) for g in grid], _fmt(a["median_ratio"]),
                     f"{a['violations']} / {a['soundness_violations']}", _fmt(a["train_seconds"], 0),
                     _fmt(a["certify_seconds"], 0)])  # fmt: skip
    return headers, rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``: the command line without the program; None: ``sys.argv``), with
    ``--quick`` applied and the KEY=VALUE lists parsed (``grid``, ``method_opts``, ``data_opts``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="synthetic, 1 seed, 3 epochs, 40 samples")
    ap.add_argument("--table", help="print the markdown table of a JSON written before, and stop")
    ap.add_argument("--routes", default=",".join(ORDER))
    ap.add_argument("--datasets", default="avdigits,synthetic")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=0, help="override every route's epochs (0: the route's)")
    ap.add_argument("--samples", type=int, default=200, help="first test samples certified and attacked")
    ap.add_argument("--radii", default="0.5,1,2", help="joint l2 radii (standardised scales)")
    ap.add_argument("--tightness", type=int, default=32, help="samples for the certified/attack radius ratio")
    ap.add_argument("--soundness", type=int, default=0, help="samples whose certified balls are attacked")
    ap.add_argument("--attack-steps", type=int, default=20)
    ap.add_argument("--crown-steps", type=int, default=7)
    ap.add_argument("--alpha", action="store_true", help="also certify the CROWN routes with alpha-crown")
    ap.add_argument("--alpha-iterations", type=int, default=20)
    ap.add_argument("--alpha-seconds", type=float, default=30.0)
    ap.add_argument("--certified-mode", default="crown-ibp", help="the certified route's certified=... option")
    ap.add_argument("--lipschitz-encoder", action="append", default=[], help="MODALITY=ENCODER (lipschitz route)")
    ap.add_argument("--method-opt", action="append", default=[], help="METHOD:KEY=VALUE for that method's runs")
    ap.add_argument("--data-opt", action="append", default=[], help="DATASET:KEY=VALUE")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--smoothing-n0", type=int, default=50)
    ap.add_argument("--smoothing-n", type=int, default=500)
    ap.add_argument("--runs-dir", default="", help="where the runs are written (default: a temporary folder)")
    ap.add_argument("--markdown", action="store_true", help="also print the markdown table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets, args.seeds, args.epochs = "synthetic", "0", args.epochs or 3
        args.samples, args.tightness, args.attack_steps = min(args.samples, 40), min(args.tightness, 10), 10
        args.smoothing_n0, args.smoothing_n, args.crown_steps = 20, 100, 5
        args.alpha_iterations, args.soundness = 5, max(args.soundness, 10)
    args.grid = [float(r) for r in args.radii.split(",")]
    args.lipschitz_encoder = parse_pairs(args.lipschitz_encoder, "--lipschitz-encoder")
    args.method_opts = {}
    for item in args.method_opt:
        method, _, kv = item.partition(":")
        args.method_opts.setdefault(method, {}).update(parse_pairs([kv], "--method-opt"))
    args.data_opts = {}
    for item in args.data_opt:
        ds, _, kv = item.partition(":")
        args.data_opts.setdefault(ds, {}).update(parse_pairs([kv], "--data-opt"))
    return args


def main() -> None:
    args = parse()
    if args.table:
        headers, rows = table_rows(read_json(Path(args.table)))
        print(md_table(headers, rows))
        return
    torch.set_num_threads(args.threads)
    table = routes(args)
    chosen = [r for r in args.routes.split(",") if r]
    unknown = [r for r in chosen if r not in table]
    if unknown:
        raise SystemExit(f"unknown route(s) {unknown}; choose from: {', '.join(table)}")
    root = Path(args.runs_dir) if args.runs_dir else Path(tempfile.mkdtemp(prefix="certified_routes_"))
    runs: list[dict[str, Any]] = []
    for ds in [d for d in args.datasets.split(",") if d]:
        for name in chosen:
            for seed in [int(s) for s in args.seeds.split(",") if s]:
                entry = one_run(ds, name, table[name], seed, args, root)
                runs.append(entry)
                if "skipped" in entry:
                    print(f"{ds} {name} seed {seed}: {entry['skipped']}", flush=True)
                    continue
                accs = {c: v["certified_accuracy"] for c, v in entry["certifiers"].items()}
                print(f"{ds} {name} seed {seed}: clean {entry['clean_accuracy']:.3f} certified {accs} "
                      f"attack {entry['attack_accuracy']} train {entry['train_seconds']:.0f}s", flush=True)  # fmt: skip
    doc = {"args": {k: v for k, v in vars(args).items() if k not in ("grid",)}, "grid": args.grid, "runs": runs,
           "summary": aggregate(runs, args.grid)}  # fmt: skip
    headers, rows = table_rows(doc)
    print_table("certified routes (joint l2, standardised scales; mean ± sd over seeds)", headers, rows)
    if args.markdown:
        print(md_table(headers, rows))
    write_json(Path(args.out), doc)
    print(f"wrote {args.out} (runs in {root})")


if __name__ == "__main__":
    main()
