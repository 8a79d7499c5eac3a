"""Time of the standard AutoAttack suite, ours against torchattacks (and against an older mmrobust).

Both libraries attack exactly the same function over the same box: the run's model with its input
standardisation taken out (inputs in standardised units, so a joint l2 eps means what mmrobust's
default threat model means by it), audio and image attacked jointly, the image box its pixel range
[0, 1] mapped to standardised units, the audio box the range of the attacked samples (it declares
none). torchattacks sees the two modalities laid out as one image in [0, 1]
(``benchmarks.attack_parity.UnitImage``, one common scale, so its eps is ``eps / scale``).

Settings are the reference's: APGD-CE (1 restart), APGD-T (9 targets), FAB-T (9 targets), 100
iterations each, Square with 5000 queries; torchattacks' ``AutoAttack(version="standard")`` is set
to the same counts. torchattacks' components are run through a copy of its ``MultiAttack`` loop so
that each component's time is measured (the loop is the same: each component attacks the samples
no earlier one broke).

Every cell (a model x a side: ``ours``, ``before`` = another mmrobust source tree, ``torchattacks``)
runs in its own process with the same thread count; the cells are interleaved (the order rotates
per repeat; ``--parallel N`` runs N at once) and the medians over repeats are reported, with the
ratio ours / torchattacks of wall time and of the process's CPU time (the one that means something
on a shared machine: it does not count the time other jobs held the cores). Per-component times
are CPU times.

    python benchmarks/autoattack_speed.py --runs RUN_JT,RUN_CRMT --eps 2.5,4.5 [--baseline OLD_SRC]
        [--ours SRC] [--samples 100] [--repeats 1] [--threads 1] [--parallel 1]
    python benchmarks/autoattack_speed.py --quick            # a tiny untrained model, 10 steps: a smoke test
    python benchmarks/autoattack_speed.py --sweep --runs ... --eps 2,3,4,5   # budget sweep, validation split

Prints a table and writes ``benchmarks/results/autoattack_speed.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "autoattack_speed.json"
SIDES = ("torchattacks", "before", "ours")
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")


def _setup(run_dir: str, split: str, samples: int) -> tuple[Any, dict, torch.Tensor, dict]:
    """The standardised-input model, the first ``samples`` of ``split`` (standardised), the labels and
    the boxes (standardised units) of both modalities."""
    if run_dir == "quick":
        from mmrobust.data import DataConfig, load_data
        from mmrobust.models.fusion import ModelConfig, build_model

        bundle = load_data(DataConfig("avdigits", 0))
        torch.manual_seed(0)
        model, meta, data = build_model(bundle.meta, ModelConfig()).eval(), bundle.meta, bundle
    else:
        from mmrobust.runs import load_run

        run = load_run(run_dir)
        model, meta, data = run.model.eval(), run.meta, run.data()
    inputs, labels = getattr(data, split).take(slice(0, samples))
    with torch.no_grad():
        z = model.transform(inputs)
    bare = copy.deepcopy(model)
    bare.set_transforms(None)
    ranges: dict[str, tuple[float, float]] = {}
    for spec in meta.modalities:
        m = spec.name
        if spec.valid_range is not None:
            with torch.no_grad():
                ends = [model.transform({m: torch.full_like(inputs[m][:1], float(v))})[m] for v in spec.valid_range]
            ranges[m] = (float(torch.minimum(*ends).min()), float(torch.maximum(*ends).max()))
        else:
            ranges[m] = (float(z[m].min()), float(z[m].max()))
    return bare.eval(), z, labels, ranges


def _ours(model: Any, z: dict, labels: torch.Tensor, ranges: dict, eps: float, steps: int, queries: int) -> dict:
    import mmrobust.attacks.autoattack as aa_module
    from mmrobust.attacks.autoattack import AutoAttackOptions, run_autoattack

    mods = tuple(ranges)
    opts = AutoAttackOptions(eps=eps, norm="l2", modalities=mods, steps=steps, queries=queries)
    # the protocol times its stages with time.perf_counter: make that the process's CPU time here
    aa_module.time = SimpleNamespace(perf_counter=time.process_time)  # type: ignore[attr-defined]
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_autoattack(model, z, labels, opts, valid_range=ranges)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": total, "cpu_seconds": cpu, "robust": res.robust.tolist(), "clean": res.clean_accuracy,
            "stages": [{"attack": s.attack, "cpu_seconds": s.seconds, "attacked": s.attacked,
                        "robust_accuracy": s.robust_accuracy} for s in res.stages]}  # fmt: skip


def _torchattacks(model: Any, z: dict, labels: torch.Tensor, ranges: dict, eps: float, steps: int,
                  queries: int) -> dict:  # fmt: skip
    import torchattacks

    from benchmarks.attack_parity import UnitImage

    wrapper = UnitImage(model, z, list(ranges), ranges).eval()
    u = wrapper.encode(z)
    k = int(model.num_classes)
    torch.manual_seed(0)
    aa = torchattacks.AutoAttack(wrapper, norm="L2", eps=eps / wrapper.scale, version="standard", n_classes=k, seed=0)
    names = ["apgd-ce", "apgd-t", "fab-t", "square"]
    for atk in aa._autoattack.attacks:
        if hasattr(atk, "n_queries"):
            atk.n_queries = queries
        else:
            atk.steps = steps
    stages = []
    t0, c0 = time.perf_counter(), time.process_time()
    # torchattacks.MultiAttack.forward, timed per component
    fails = torch.arange(len(labels))
    final = u.clone()
    for name, atk in zip(names, aa._autoattack.attacks, strict=True):
        t1, c1 = time.perf_counter(), time.process_time()
        adv = atk(u[fails], labels[fails])
        with torch.no_grad():
            corrects = wrapper(adv).argmax(1) == labels[fails]
        final[fails[~corrects]] = adv[~corrects]
        attacked = len(fails)
        fails = fails[corrects]
        stages.append({"attack": name, "seconds": time.perf_counter() - t1, "cpu_seconds": time.process_time() - c1,
                       "attacked": attacked,
                       "robust_accuracy": len(fails) / len(labels)})  # fmt: skip
        if len(fails) == 0:
            break
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():
        robust = wrapper(final).argmax(1) == labels
        clean = float((model(z).argmax(1) == labels).float().mean())
    return {"seconds": total, "cpu_seconds": cpu, "robust": robust.tolist(), "clean": clean, "stages": stages}


def cell(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, z, labels, ranges = _setup(args.run, args.split, args.samples)
    eps = float(args.eps)
    fn = _torchattacks if args.cell == "torchattacks" else _ours
    out = fn(model, z, labels, ranges, eps, args.steps, args.queries)
    print("RESULT " + json.dumps(out), flush=True)


def sweep(args: argparse.Namespace) -> None:
    """Robust accuracy of a cheap proxy (APGD-CE then APGD-T, ``--steps``) per eps, on validation data."""
    from mmrobust.attacks.autoattack import AutoAttackOptions, run_autoattack
    from mmrobust.io import write_json
    from mmrobust.report.tables import print_table

    torch.set_num_threads(args.threads)
    rows, records = [], []
    for run in args.runs.split(","):
        model, z, labels, ranges = _setup(run, "val", args.samples)
        for eps in (float(e) for e in args.eps.split(",")):
            opts = AutoAttackOptions(eps=eps, norm="l2", version="custom", attacks=("apgd-ce", "apgd-t"),
                                     modalities=tuple(ranges), steps=args.steps)  # fmt: skip
            res = run_autoattack(model, z, labels, opts, valid_range=ranges)
            records.append({"run": run, "eps": eps, "clean": res.clean_accuracy, "robust": res.robust_accuracy})
            rows.append([Path(run).name, eps, f"{res.clean_accuracy:.3f}", f"{res.robust_accuracy:.3f}"])
            print(rows[-1], flush=True)
    print_table(f"budget sweep (validation, {args.samples} samples, apgd-ce + apgd-t, {args.steps} steps, l2 joint, "
                "standardised units)", ["run", "eps", "clean", "robust"], rows)  # fmt: skip
    write_json(args.out, {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "sweep": records})
    print(f"wrote {args.out}")


def _command(side: str, src: str, run: str, eps: str, args: argparse.Namespace) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(ROOT)]), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", "ours" if side != "torchattacks" else side,
           "--run", run, "--eps", eps, "--samples", str(args.samples), "--steps", str(args.steps),
           "--queries", str(args.queries), "--threads", str(args.threads), "--split", args.split]  # fmt: skip
    return cmd, env


def _result(side: str, run: str, returncode: int, stdout: str, stderr: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if returncode != 0 or not lines:
        raise SystemExit(f"cell {side} {run} failed:\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _run_cells(jobs: list[tuple[int, str, str]], src: dict, eps_of: dict, args: argparse.Namespace, done: Any) -> None:
    """Run the cells ``(repeat, run, side)``, at most ``args.parallel`` at once, in the given order;
    ``done(repeat, run, side, result)`` after each."""
    pending = list(jobs)
    running: list[tuple[tuple[int, str, str], subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            job = pending.pop(0)
            cmd, env = _command(job[2], src[job[2]], job[1], eps_of[job[1]], args)
            running.append((job, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True)))  # fmt: skip
        job, proc = running.pop(0)
        out, err = proc.communicate()
        done(*job, _result(job[2], job[1], proc.returncode, out, err))


def summarize(cells: dict[tuple[str, str], list[dict]], runs: list[str], sides: list[str],
              eps_of: dict[str, str]) -> list[dict]:  # fmt: skip
    """Medians per (run, side), the ratios to torchattacks, robust accuracies and per-component CPU times."""
    out = []
    for run in runs:
        ta_cells = cells[(run, "torchattacks")]
        ta = statistics.median(c["seconds"] for c in ta_cells)
        ta_cpu = statistics.median(c["cpu_seconds"] for c in ta_cells)
        ta_robust = ta_cells[0]["robust"]
        for side in sides:
            cs = cells[(run, side)]
            if not cs:
                continue
            med = statistics.median(c["seconds"] for c in cs)
            cpu = statistics.median(c["cpu_seconds"] for c in cs)
            robust = cs[0]["robust"]
            comp = {n: statistics.median([s["cpu_seconds"] for c in cs for s in c["stages"] if s["attack"] == n] or [0.0])
                    for n in COMPONENTS}  # fmt: skip
            out.append({"run": run, "eps": float(eps_of[run]), "side": side, "samples": len(robust),
                        "median_seconds": med, "seconds": [c["seconds"] for c in cs], "ratio_to_torchattacks": med / ta,
                        "median_cpu_seconds": cpu, "cpu_seconds": [c["cpu_seconds"] for c in cs],
                        "cpu_ratio_to_torchattacks": cpu / ta_cpu,
                        "robust_accuracy": sum(robust) / len(robust), "clean_accuracy": cs[0]["clean"],
                        "robust_accuracy_per_repeat": [sum(c["robust"]) / len(c["robust"]) for c in cs],
                        "disagree_with_torchattacks": sum(a != b for a, b in zip(robust, ta_robust, strict=True)),
                        "component_cpu_seconds": comp,
                        "component_robust_accuracy": {s["attack"]: s["robust_accuracy"] for s in cs[0]["stages"]}})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="quick", help="comma list of run folders ('quick': an untrained avdigits model)")
    p.add_argument("--eps", default="3", help="joint l2 eps (standardised units), one per run or one for all")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--steps", type=int, default=100, help="APGD/FAB iterations (the reference: 100)")
    p.add_argument("--queries", type=int, default=5000, help="Square queries (the reference: 5000)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="cells run at once (CPU times stay comparable; wall times then include the contention)",
    )
    p.add_argument("--split", default="test")
    p.add_argument("--baseline", help="source tree of the mmrobust to compare with (e.g. a git archive of main)")
    p.add_argument("--ours", help="source tree of 'ours' (default: this checkout)")
    p.add_argument("--quick", action="store_true", help="smoke test: untrained model, 20 samples, 5 steps, 50 queries")
    p.add_argument("--sweep", action="store_true", help="budget sweep on the validation split (no timing)")
    p.add_argument("--cell", choices=["ours", "torchattacks"], help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.cell:
        cell(args)
        return
    if args.sweep:
        sweep(args)
        return
    if args.quick:
        args.runs, args.samples, args.steps, args.queries = "quick", 20, 5, 50
    from mmrobust.io import write_json
    from mmrobust.report.tables import print_table

    runs = args.runs.split(",")
    eps_list = args.eps.split(",")
    eps_of = dict(zip(runs, eps_list if len(eps_list) == len(runs) else eps_list * len(runs), strict=True))
    sides = [s for s in SIDES if s != "before" or args.baseline]
    src = {"ours": args.ours or str(ROOT), "before": args.baseline or "", "torchattacks": str(ROOT)}
    cells: dict[tuple[str, str], list[dict]] = {(r, s): [] for r in runs for s in sides}
    jobs = []
    for rep in range(args.repeats):
        for run in runs:
            order = sides[rep % len(sides) :] + sides[: rep % len(sides)]  # rotate: no side always goes first
            jobs += [(rep, run, side) for side in order]

    def done(rep: int, run: str, side: str, res: dict) -> None:
        cells[(run, side)].append(res)
        print(f"[{rep}] {Path(run).name} {side:12s} wall {res['seconds']:8.1f} s cpu {res['cpu_seconds']:8.1f} s "
              f"robust {sum(res['robust']) / len(res['robust']):.3f}  " +
              " ".join(f"{s['attack']} {s['cpu_seconds']:.1f}s" for s in res["stages"]), flush=True)  # fmt: skip
        write_json(args.out, {"settings": vars(args), "partial": True,
                              "cells": {f"{r}|{s}": v for (r, s), v in cells.items()}})  # fmt: skip

    _run_cells(jobs, src, eps_of, args, done)
    summary = summarize(cells, runs, sides, eps_of)
    rows = [[Path(r["run"]).name, r["eps"], r["side"], f"{r['median_seconds']:.1f}", f"{r['ratio_to_torchattacks']:.2f}",
             f"{r['median_cpu_seconds']:.1f}", f"{r['cpu_ratio_to_torchattacks']:.2f}", f"{r['robust_accuracy']:.3f}",
             r["disagree_with_torchattacks"], *(f"{r['component_cpu_seconds'][n]:.1f}" for n in COMPONENTS)]
            for r in summary]  # fmt: skip
    print_table(f"standard AutoAttack, l2 joint (standardised units), {args.samples} {args.split} samples, "
                f"{args.steps} iterations, {args.queries} queries, {args.threads} thread(s), median of {args.repeats}",
                ["run", "eps", "side", "wall s", "wall / ta", "cpu s", "cpu / ta", "robust acc", "samples differing",
                 *(f"{n} cpu s" for n in COMPONENTS)], rows)  # fmt: skip
    write_json(args.out, {"settings": vars(args), "summary": summary,
                          "cells": {f"{r}|{s}": v for (r, s), v in cells.items()}})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
