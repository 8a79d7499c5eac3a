"""Every training method on AV-digits and on the synthetic set with a strongly preferred modality.

For each (dataset, method, seed): train with the Python API (``mmrobust.training.train``), reload the
saved run (so MSEFM's memory is evaluated as deployed), and run the ``paper`` evaluation suite on the
first ``n_eval`` test samples: clean; l2-PGD (and FGM) on all modalities jointly at each joint eps and
on each modality alone at each per-modality eps, each under CE and CW losses with the per-sample
worst case; each modality missing (zero fill). Rows are written to JSON after every cell
(``--resume`` skips finished cells); the summary (mean +- std over seeds) is printed and, with
``--markdown``, written as a markdown table.

    python benchmarks/method_compare.py                          # the committed grid
    python benchmarks/method_compare.py --datasets synthetic --seeds 0 --methods jt,mmat

Budgets are small for a shared 2-core CPU (see ``DATASETS``); they are stated in the output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.config import RunConfig
from mmrobust.data.registry import DataConfig
from mmrobust.eval.suites import paper_suite
from mmrobust.io import read_json, write_json
from mmrobust.report.markdown import md_table
from mmrobust.report.tables import print_table
from mmrobust.runs import load_run
from mmrobust.training import train

METHODS = [
    "jt", "crmt-jt", "crmt-at", "crmt-mix", "mmat", "mixup", "gb", "ogm-ge", "pmr", "msefm", "varmat", "varmat-input",
]  # fmt: skip

# AT budgets fixed before any evaluation (the CRMT comparison's: 2.0 on AV-digits, 0.5 on synthetic);
# MMAT and VARMAT-input use the same budget and steps as CRMT-AT so the comparison isolates CRMT.
DATASETS: dict[str, dict[str, Any]] = {
    "avdigits": {
        "data": {}, "feature_dim": 128, "epochs": 2, "n_eval": 100, "eps": (0.5, 2.0, 4.0), "uni_eps": (2.0,),
        "at_eps": 2.0,
    },
    "synthetic": {
        "data": {"signal": "3.0,0.7", "n_train": 2000, "n_val": 500, "n_test": 1000, "dim": 16},
        "feature_dim": 32, "epochs": 10, "n_eval": 300, "eps": (0.5, 2.0, 4.0), "uni_eps": (1.0,), "at_eps": 0.5,
    },
}  # fmt: skip


def method_options(method: str, ds: dict[str, Any]) -> dict[str, Any]:
    if method == "crmt-at":
        return {"at_eps": ds["at_eps"], "at_steps": 3}
    if method in ("mmat", "varmat-input"):
        return {"eps": ds["at_eps"], "steps": 3}
    return {}


def run_cell(dataset: str, label: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one cell; ``label`` is a method name, or ``name:key=value,...`` for a variant."""
    ds = DATASETS[dataset]
    method, _, extra = label.partition(":")
    cfg = RunConfig()
    cfg.data = DataConfig(dataset, seed, dict(ds["data"]))
    cfg.model.feature_dim = ds["feature_dim"]
    cfg.train.method, cfg.train.epochs, cfg.train.seed, cfg.train.progress = method, ds["epochs"], seed, False
    cfg.train.method_options = {**method_options(method, ds), **dict(kv.split("=", 1) for kv in extra.split(",") if kv)}
    out = Path(args.runs) / dataset / label.replace(":", "_").replace("=", "") / str(seed)
    t0 = time.perf_counter()
    train(cfg, out=out, force=True)
    train_s = time.perf_counter() - t0
    run = load_run(out)
    split = run.data().test.subset(slice(0, ds["n_eval"]))
    t0 = time.perf_counter()
    res = paper_suite(run, split, eps=list(ds["eps"]), unimodal_eps=list(ds["uni_eps"]), steps=args.steps)
    row: dict[str, Any] = {
        "dataset": dataset, "method": label, "seed": seed, "epochs": ds["epochs"], "options": cfg.train.method_options,
        "train_s": train_s, "eval_s": time.perf_counter() - t0, "n_eval": len(split),
        "test_accuracy_full": run.metrics["test_accuracy"], "clean": res.clean_accuracy, "warnings": res.warnings,
    }  # fmt: skip
    for r in res.rows:
        if r.attack == "missing":
            row[f"missing:{r.modalities[0]}"] = r.accuracy
            continue
        if r.attack != "pgd-l2":
            continue
        where = "joint" if len(r.modalities) > 1 else r.modalities[0]
        row.setdefault(f"{where}@{r.eps}", {})[r.loss] = r.accuracy
    return row


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def summary_tables(rows: list[dict[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per dataset: columns and one row per method (mean ± std over seeds; attacks: worst (ce/cw))."""
    out = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        group = [r for r in rows if r["dataset"] == dataset]
        attack_keys = [k for k, v in group[0].items() if isinstance(v, dict) and "worst" in v]
        missing_keys = [k for k in group[0] if k.startswith("missing:")]
        cols = ["method", "seeds", "clean", *[f"{k} worst (ce/cw)" for k in attack_keys], *missing_keys, "train s"]
        table = []
        labels = list(dict.fromkeys(r["method"] for r in group))
        for method in sorted(labels, key=lambda m: (METHODS.index(m.partition(":")[0]), m)):
            g = [r for r in group if r["method"] == method]
            cells = [method, str(len(g)), mean_std([r["clean"] for r in g])]
            for k in attack_keys:
                ce, cw = statistics.fmean(r[k]["ce"] for r in g), statistics.fmean(r[k]["cw"] for r in g)
                cells.append(f"{mean_std([r[k]['worst'] for r in g])} ({ce:.3f}/{cw:.3f})")
            cells += [mean_std([r[k] for r in g]) for k in missing_keys]
            cells.append(f"{statistics.fmean(r['train_s'] for r in g):.0f}")
            table.append(cells)
        out[dataset] = (cols, table)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="synthetic,avdigits")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the evaluation attacks")
    p.add_argument("--runs", default="/tmp/mmrobust-method-compare", help="where the run folders go")
    p.add_argument("--json", default="benchmarks/results/method_compare.json")
    p.add_argument("--markdown", default=None, help="also write the summary tables to this markdown file")
    p.add_argument("--resume", action="store_true", help="skip cells already in --json")
    p.add_argument("--summarize", default=None, help="comma list of JSON files: only print/write their summary")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.summarize:
        rows = [r for f in args.summarize.split(",") for r in read_json(Path(f))["rows"]]
        return report(rows, args.markdown)
    rows: list[dict[str, Any]] = read_json(Path(args.json))["rows"] if args.resume and Path(args.json).is_file() else []
    done = {(r["dataset"], r["method"], r["seed"]) for r in rows}
    for dataset in args.datasets.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in args.methods.split(","):
                if (dataset, method, seed) in done:
                    continue
                row = run_cell(dataset, method, seed, args)
                rows.append(row)
                settings = {k: dict(v) for k, v in DATASETS.items()}
                write_json(Path(args.json), {"settings": settings, "eval_pgd_steps": args.steps, "rows": rows})
                print(f"{dataset} {method} seed {seed}: clean {row['clean']:.3f}  train {row['train_s']:.0f}s  "
                      f"eval {row['eval_s']:.0f}s", flush=True)  # fmt: skip
    return report(rows, args.markdown)


def report(rows: list[dict[str, Any]], markdown: str | None) -> int:
    text = []
    for dataset, (cols, table) in summary_tables(rows).items():
        print_table(f"{dataset} (mean ± std over seeds)", cols, table)
        text.append(f"### {dataset}\n\n{md_table(cols, table)}\n")
    if markdown:
        Path(markdown).write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
