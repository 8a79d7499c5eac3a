"""The must-show matrix of a calibration example (avdigits-bind or notes-crepe): per modality, clean and robust
(AutoAttack worst-case) accuracy at 2/4/8 / 255 on the TEST split of the frozen "Bind" model and
after each stage-2 loss (l2, ce, infonce), with and without LoRA; trainable-parameter fraction;
wall and CPU time (the machine may be shared: CPU time is the process's own).

    python benchmarks/calibration_matrix.py [--calib-opt eps=2/255 --calib-opt lr=0.001 ...] [--tag NAME]
    python benchmarks/calibration_matrix.py --merge l2,ce,infonce --tag all   # runs split by loss, side by side
    python benchmarks/calibration_matrix.py --example notes-crepe --example-opt seed=1 --calib-opt seed=1 --tag s1
    python benchmarks/calibration_matrix.py --seeds notes_crepe_s0,notes_crepe_s1 --tag notes_crepe  # mean over seeds

Training options default to the example's (``EXAMPLE_DEFAULTS``), overridden by ``--calib-opt``
(chosen on the validation split with ``calibration_sweep.py``, never on the test split); the
evaluation protocol likewise (``--eval-opt``). Prints the matrix and writes
``benchmarks/results/calibration_matrix_<tag>.json`` (the whole study, as ``calibration.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.calibration.command import plan
from mmrobust.calibration.study import run_study

RESULTS = Path(__file__).resolve().parent / "results"


def _pairs(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def matrix_rows(study: dict[str, Any]) -> list[list[Any]]:
    """One row per (model, modality): clean, robust at each eps, trainable fraction, best epoch."""
    rows = []
    models = [("frozen", study["frozen"], None)] + [
        (n, v["evaluation"], v["calibration"]["heads"]) for n, v in study["variants"].items()
    ]
    for name, ev, heads in models:
        for m, e in ev["modalities"].items():
            head = heads[m] if heads else None
            frac = head["trainable_fraction"] if head else None
            rows.append([name, m, e["clean"]["accuracy"], *[b["worst"]["accuracy"] for b in e["budgets"]],
                         f"{frac:.2%}" if frac is not None else "-", head["best_epoch"] if head else "-"])  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", default="l2,ce,infonce")
    p.add_argument("--lora-rank", default="0,8")
    p.add_argument("--calib-opt", action="append", default=[])
    p.add_argument("--eval-opt", action="append", default=[])
    p.add_argument("--example-opt", action="append", default=[])
    p.add_argument("--example", default="avdigits-bind", help="avdigits-bind or notes-crepe")
    p.add_argument("--tag", help="name of the JSON file (default: the example's name)")
    p.add_argument("--merge", help="comma list of tags of finished runs (e.g. one per loss) to join into one matrix")
    p.add_argument("--seeds", help="comma list of tags of finished runs with different seeds: mean and spread")
    args = p.parse_args()
    args.tag = args.tag or args.example.replace("-", "_")
    if args.seeds:
        seeds_summary(args.seeds.split(","), args.tag)
        return
    if args.merge:
        merge(args.merge.split(","), args.tag)
        return
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    cal = _pairs(args.calib_opt)
    eps = cal.pop("eps", None)
    pl = plan(example=args.example, example_options=_pairs(args.example_opt), encoders=None, centres=None,
              data=None, losses=args.loss, lora_ranks=args.lora_rank, eps=eps, epochs=None,
              calibration_options=cal, eval_eps=None, eval_options=_pairs(args.eval_opt))  # fmt: skip
    setup = pl.build_setup()
    build_wall, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    study = run_study(setup, pl.losses, pl.lora_ranks, pl.calibration, pl.evaluation,
                      on_message=lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True))  # fmt: skip
    out = study.to_dict()
    out["timing"] = {"build_wall_s": build_wall, "build_cpu_s": build_cpu, "total_wall_s": time.perf_counter() - t0,
                     "total_cpu_s": time.process_time() - c0, "torch_threads": torch.get_num_threads()}  # fmt: skip
    show(out, args.tag)


def show(out: dict[str, Any], tag: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"calibration_matrix_{tag}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    eps = [b["eps"] for b in next(iter(out["frozen"]["modalities"].values()))["budgets"]]
    header = ["model", "modality", "clean", *[f"{round(e * 255)}/255" for e in eps], "trainable", "best epoch"]
    print(" | ".join(header))
    for row in matrix_rows(out):
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    t = out["timing"]
    print(f"wall {t['total_wall_s']:.0f} s, CPU {t['total_cpu_s']:.0f} s (build {t['build_wall_s']:.0f} s wall); "
          f"wrote {path}")  # fmt: skip


def merge(tags: list[str], tag: str) -> None:
    """One matrix from runs split by loss (the build is deterministic: the frozen model should be the same)."""
    runs = [json.loads((RESULTS / f"calibration_matrix_{t}.json").read_text()) for t in tags]
    first = runs[0]
    for t, r in zip(tags[1:], runs[1:], strict=True):
        if r["frozen"]["modalities"] != first["frozen"]["modalities"]:
            print(f"warning: run '{t}' measured the frozen model differently from '{tags[0]}'; showing '{tags[0]}'s")
    out = dict(first)
    out["variants"] = {n: v for r in runs for n, v in r["variants"].items()}
    out["timing"] = {k: max(r["timing"][k] for r in runs) for k in first["timing"]}
    out["timing"]["cpu_s_all_runs"] = sum(r["timing"]["total_cpu_s"] for r in runs)
    out["merged_from"] = tags
    show(out, tag)


def seeds_summary(tags: list[str], tag: str) -> None:
    """Per (model, modality): each seed's clean and robust accuracies and their mean; one table."""
    runs = [json.loads((RESULTS / f"calibration_matrix_{t}.json").read_text()) for t in tags]
    per_run = [{(r[0], r[1]): r[2:] for r in matrix_rows(run)} for run in runs]
    eps = [b["eps"] for b in next(iter(runs[0]["frozen"]["modalities"].values()))["budgets"]]
    header = ["model", "modality", "clean", *[f"{round(e * 255)}/255" for e in eps], "trainable", "best epoch"]
    rows = []
    for key in per_run[0]:
        vals = [pr[key] for pr in per_run if key in pr]
        n_acc = 1 + len(eps)
        accs = [[v[i] for v in vals] for i in range(n_acc)]
        cells = [f"{sum(a) / len(a):.3f} ({', '.join(f'{x:.2f}' for x in a)})" for a in accs]
        rows.append([*key, *cells, vals[0][n_acc], ", ".join(str(v[n_acc + 1]) for v in vals)])
    print(f"mean over {len(runs)} seeds (each seed in brackets)")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(v) for v in row))
    timing = [r["timing"] for r in runs]
    out = {"seeds_of": tags, "header": header, "rows": rows, "runs": runs,
           "timing": {"wall_s": [t["total_wall_s"] for t in timing], "cpu_s": [t["total_cpu_s"] for t in timing]}}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"calibration_seeds_{tag}.json"
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
