"""CRMT and its ablations against JT: methods x datasets x seeds -> table + JSON.

For every trained model, on the first ``--n-eval`` test samples: clean accuracy, joint l2-PGD
accuracy at two budgets and per-modality l2-PGD accuracy, each under CE and CW (margin) losses and
their per-sample worst case (a sample counts as robust only if it survives both), the mean |logit|,
and for orthogonal heads the validation mean certified radius (empirical tau: an estimate).

    python benchmarks/crmt_compare.py                        # full grid (~40 min on one CPU thread)
    python benchmarks/crmt_compare.py --seeds 0 --datasets synthetic --methods jt,crmt-jt

Results are written after every run to ``benchmarks/results/crmt_compare.json``; ``--resume``
skips the (dataset, method, seed) cells already there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.attacks import PGDL2
from mmrobust.config import RunConfig
from mmrobust.data.registry import DataConfig
from mmrobust.io import read_json, write_json
from mmrobust.report.markdown import md_table
from mmrobust.report.tables import print_table
from mmrobust.training import train

METHODS = ["jt", "ojt", "crmt-step1", "crmt-step2", "crmt-jt", "crmt-at", "crmt-mix"]
DEFAULT_METHODS = [*METHODS[:5], "crmt-jt-norm", *METHODS[5:]]

# Budgets are data-relative (DESIGN.md §4): eps_hi is where JT is clearly hurt. For synthetic it was
# read off a JT model's *validation* sweep (0.70 at 0.5, 0.47 at 1.0); for avdigits from DESIGN.md's
# prototype numbers (JT ~0.97 at 0.5, ~0.75 at 4). The AT training budget is fixed beforehand.
DATASETS: dict[str, dict[str, Any]] = {
    "avdigits": {
        "data": {}, "feature_dim": 128, "epochs": 6, "n_eval": 150, "eps": (0.5, 2.0, 4.0), "uni_eps": (1.0, 2.0),
        "at_eps": 2.0,
    },
    "synthetic": {
        "data": {"signal": "3.0,0.7", "n_train": 2000, "n_val": 500, "n_test": 1000, "dim": 16},
        "feature_dim": 32, "epochs": 20, "n_eval": 500, "eps": (0.5, 1.0), "uni_eps": (1.0,), "at_eps": 0.5,
    },
}  # fmt: skip


def method_options(method: str, ds: dict[str, Any], margin: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if method in ("crmt-jt", "crmt-at", "crmt-mix", "crmt-step1"):
        opts["margin"] = margin
    if method == "crmt-at":
        opts.update(at_eps=ds["at_eps"], at_steps=3)
    return opts


def robust(
    model: torch.nn.Module, meta: Any, x: dict, y: torch.Tensor, eps: float, steps: int, modalities: list[str] | None
) -> dict[str, float]:
    """Accuracy under CE-PGD, CW-PGD and their per-sample worst case."""
    ok = {}
    for loss in ("ce", "cw"):
        attack = PGDL2(model, eps, steps=steps, loss=loss, modalities=modalities, meta=meta, seed=1)
        with torch.no_grad():
            ok[loss] = model(attack(x, y)).argmax(1) == y
    return {
        "ce": float(ok["ce"].float().mean()),
        "cw": float(ok["cw"].float().mean()),
        "worst": float((ok["ce"] & ok["cw"]).float().mean()),
    }


def run_cell(dataset: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    ds = DATASETS[dataset]
    cfg = RunConfig()
    cfg.data = DataConfig(dataset, seed, dict(ds["data"]))
    cfg.model.feature_dim = ds["feature_dim"]
    cfg.train.method = method
    cfg.train.epochs = args.epochs or ds["epochs"]
    cfg.train.seed = seed
    cfg.train.progress = False
    cfg.train.method_options = method_options(
        method.removesuffix("-norm"), ds, "normalized" if method.endswith("-norm") else "faithful"
    )
    cfg.train.method = method.removesuffix("-norm")
    t0 = time.perf_counter()
    fit = train(cfg, out=Path(args.runs) / dataset / method / str(seed) if args.runs else None)
    train_s = time.perf_counter() - t0
    row = {
        "dataset": dataset,
        "method": method + args.tag,
        "seed": seed,
        "epochs": cfg.train.epochs,
        "train_s": train_s,
    }
    row["options"] = cfg.train.method_options
    return {**row, **evaluate(fit.model, fit.bundle, fit.metrics, ds, args)}


def evaluate(
    model: torch.nn.Module, bundle: Any, metrics: dict[str, Any], ds: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Clean, joint and per-modality worst-case PGD accuracy, mean |logit|, on the first test samples."""
    t0 = time.perf_counter()
    model, meta = model.eval(), bundle.meta
    x, y = bundle.test.take(slice(0, args.n_eval or ds["n_eval"]))
    with torch.no_grad():
        logits = model(x)
    row: dict[str, Any] = {
        "n_eval": len(y), "clean": float((logits.argmax(1) == y).float().mean()),
        "mean_abs_logit": float(logits.abs().mean()), "val_accuracy": metrics["val_accuracy"],
    }  # fmt: skip
    for eps in ds["eps"]:
        row[f"joint@{eps}"] = robust(model, meta, x, y, eps, args.steps, None)
    for m in meta.modality_names:
        for eps in ds["uni_eps"]:
            row[f"uni:{m}@{eps}"] = robust(model, meta, x, y, eps, args.steps, [m])
    crmt = metrics.get("crmt")
    if crmt:
        chosen = crmt["step2"]["selected"] if crmt.get("kept") == "step2" else crmt["step1"]
        row["val_mean_radius"] = chosen["val_mean_radius"]
        row["step2_kept"] = crmt.get("kept")
    row["eval_s"] = time.perf_counter() - t0
    return row


def redo_step2(dataset: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Re-run step 2 (current code) on a saved run from its recorded step-1 weights, then evaluate."""
    from types import SimpleNamespace

    from mmrobust.runs import load_run
    from mmrobust.training.engine import make_strategy

    run = load_run(Path(args.runs) / dataset / method / str(seed))
    bundle = run.data()
    with torch.no_grad():
        for m, p in run.model.head.a.items():
            p.copy_(torch.tensor(run.metrics["crmt"]["modality_weights_step1"][m]))
    strategy = make_strategy(run.config, bundle)
    t0 = time.perf_counter()
    extra = strategy.after_training(SimpleNamespace(model=run.model, bundle=bundle, device="cpu", cfg=run.config))
    metrics = {**run.metrics, **extra}
    metrics["val_accuracy"] = float((run.model.eval()(bundle.val.inputs).argmax(1) == bundle.val.labels).float().mean())
    row = {"dataset": dataset, "method": method + args.tag, "seed": seed, "epochs": run.config.train.epochs}
    row.update(
        train_s=time.perf_counter() - t0, options=run.config.train.method_options, reason=extra["crmt"]["reason"]
    )
    return {**row, **evaluate(run.model, bundle, metrics, DATASETS[dataset], args)}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds per (dataset, method)."""
    out = []
    keys = sorted({(r["dataset"], r["method"]) for r in rows}, key=lambda k: (k[0], _order(k[1])))
    for dataset, method in keys:
        group = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
        s: dict[str, Any] = {"dataset": dataset, "method": method, "seeds": len(group)}
        for k, v in group[0].items():
            if isinstance(v, dict) and "worst" in v:
                s[k] = {t: statistics.fmean(g[k][t] for g in group) for t in ("ce", "cw", "worst")}
            elif k in ("clean", "mean_abs_logit", "val_mean_radius", "train_s", "eval_s"):
                s[k] = statistics.fmean(g[k] for g in group)
        out.append(s)
    return out


def _order(method: str) -> tuple[int, str]:
    tag = method.split("+", 1)[1] if "+" in method else ""
    base = method.split("+", 1)[0]
    core = base.removesuffix("-norm")
    return (METHODS.index(core) * 2 + base.endswith("-norm") if core in METHODS else 99, tag)


def print_summary(summary: list[dict[str, Any]]) -> None:
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        group = [s for s in summary if s["dataset"] == dataset]
        attack_keys = [k for k, v in group[0].items() if isinstance(v, dict)]
        uni_eps = sorted({k.split("@")[1] for k in attack_keys if k.startswith("uni:")}, key=float)
        cols = ["method", "n", "clean"] + [f"{k} worst (ce/cw)" for k in attack_keys]
        cols += [f"gap@{e}" for e in uni_eps] + ["|logit|", "val radius"]
        rows = []
        for s in group:
            gaps = []
            for e in uni_eps:
                uni = [s[k]["worst"] for k in attack_keys if k.startswith("uni:") and k.endswith(f"@{e}")]
                gaps.append(f"{max(uni) - min(uni):.3f}")
            cells = [f"{s[k]['worst']:.3f} ({s[k]['ce']:.3f}/{s[k]['cw']:.3f})" for k in attack_keys]
            radius = f"{s['val_mean_radius']:.3f}" if "val_mean_radius" in s else "-"
            rows.append(
                [s["method"], str(s["seeds"]), f"{s['clean']:.3f}", *cells, *gaps, f"{s['mean_abs_logit']:.1f}", radius]
            )
        print_table(f"CRMT comparison on {dataset} (mean over seeds)", cols, rows)
        print(f"\n{dataset}\n\n" + md_table(cols, rows) + "\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="synthetic,avdigits")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="add '-norm' for margin=normalized (ours), e.g. crmt-jt-norm",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=0, help="0 = the per-dataset default")
    p.add_argument("--n-eval", type=int, default=0, help="test samples attacked (the first n; 0 = per-dataset default)")
    p.add_argument("--steps", type=int, default=10, help="PGD steps (step 2.5 eps / steps, random start)")
    p.add_argument("--out", default="benchmarks/results/crmt_compare.json")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--tag", default="", help="suffix for the method names in the rows (e.g. '+check')")
    p.add_argument("--redo-step2", action="store_true", help="re-run step 2 on the saved runs under --runs")
    p.add_argument("--show", nargs="*", help="only print the summary of these result files (merged)")
    p.add_argument("--runs", default="", help="if given, save every run folder under it (for later evaluation)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.show:
        print_summary(summarise([r for f in args.show for r in read_json(f)["runs"]]))
        return 0
    out = Path(args.out)
    rows: list[dict[str, Any]] = read_json(out)["runs"] if args.resume and out.is_file() else []
    done = {(r["dataset"], r["method"], r["seed"]) for r in rows}
    for dataset in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in args.methods.split(","):
                if (dataset, method + args.tag, seed) in done:
                    continue
                row = (redo_step2 if args.redo_step2 else run_cell)(dataset, method, seed, args)
                rows.append(row)
                print(
                    f"{dataset} {method} seed {seed}: clean {row['clean']:.3f}  train {row['train_s']:.0f}s eval {row['eval_s']:.0f}s",
                    flush=True,
                )
                write_json(
                    out, {"settings": vars(args), "datasets": DATASETS, "runs": rows, "summary": summarise(rows)}
                )
    summary = summarise(rows)
    write_json(out, {"settings": vars(args), "datasets": DATASETS, "runs": rows, "summary": summary})
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
