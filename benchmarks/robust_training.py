"""Robust accuracy against training wall time for every adversarial-training method x training attack.

For each dataset and seed, JT and every ``method x train_attack`` are trained in one process, one
after the other, with the same epochs, data and seed (``train_eps`` joint l2 for all; PGD with
``--pgd-steps`` steps is the reference). ``train_s`` is the wall time of the whole ``train()`` call
(guard, CRMT step 2 and the final test pass included). Each model is then attacked on the test split
(``--max-samples``) by l2 PGD (``--eval-steps`` steps, random start) with the CE and the CW loss;
robust accuracy is the per-sample worst case of the two, at the joint eps of ``--eval-eps`` and at a
per-modality eps (``--per-modality-eps`` for every modality, each in its own ball; units in the JSON).

Target checked per dataset (the issue's): a fast variant of MMAT and of CRMT-AT reaching >= 95% of the
PGD variant's worst-case robust accuracy at joint eps ``--target-eps`` within <= 1.6x JT's train_s.

    python benchmarks/robust_training.py --quick              # synthetic, 1 seed, few epochs
    python benchmarks/robust_training.py [--data avdigits,synthetic] [--seeds 3] [--epochs 8]
    python benchmarks/robust_training.py --step-cost --data avdigits   # one step of each variant vs JT

Writes JSON (every run, the means over seeds, the target check), prints a table and saves a PNG of
robust accuracy at the target eps against training seconds, with the Pareto front of each dataset.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmrobust.attacks.gradient import PGD
from mmrobust.attacks.threat import ThreatModel
from mmrobust.config import RunConfig
from mmrobust.data.registry import DataConfig, load_data
from mmrobust.eval.metrics import accuracy, predict
from mmrobust.eval.robust import attack_predictions, worst_predictions
from mmrobust.io import write_json
from mmrobust.report.tables import print_table
from mmrobust.training import train

METHODS = ["mmat", "crmt-at", "varmat-input"]
ATTACKS = ["pgd", "fgsm-rs", "n-fgsm", "free"]
TARGET_METHODS = ("mmat", "crmt-at")


def robust_accuracies(model: Any, bundle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Clean and worst-case (CE, CW) PGD accuracy on the first ``max_samples`` test samples."""
    n = min(args.max_samples, len(bundle.test))
    split = bundle.test.subset(slice(0, n))
    labels = split.labels
    model.eval()
    out: dict[str, Any] = {"samples": n, "clean": accuracy(predict(model, split), labels)}
    threats = [
        (f"joint {e:g}", ThreatModel.parse(bundle.meta, eps=e, norm="l2", budget="joint")) for e in args.eval_eps
    ]
    threats.append(
        ("per-modality", ThreatModel.parse(bundle.meta, eps=args.per_modality_eps, norm="l2", budget="per-modality"))
    )
    for key, threat in threats:
        preds = {
            loss: attack_predictions(PGD(model, threat, steps=args.eval_steps, loss=loss, seed=0), split)
            for loss in ("ce", "cw")
        }
        out[key] = {
            "worst": accuracy(worst_predictions([preds["ce"], preds["cw"]], labels), labels),
            "ce": accuracy(preds["ce"], labels),
            "cw": accuracy(preds["cw"], labels),
            "threat": threat.describe(),
        }
    return out


def run_one(data: str, seed: int, method: str, attack: str | None, args: argparse.Namespace, bundle: Any) -> dict:
    cfg = RunConfig()
    cfg.data = DataConfig(data, seed)
    cfg.train.method, cfg.train.epochs, cfg.train.seed = method, args.epochs, seed
    cfg.train.progress = False
    if attack is not None:
        opts: dict[str, Any] = {"train_eps": args.train_eps, "train_attack": attack}
        if attack == "pgd":
            opts["steps"] = args.pgd_steps
        if attack == "free":
            opts["replays"] = args.replays
        if args.guard is not None:
            opts["guard"] = args.guard
        cfg.train.method_options = opts
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(cfg, bundle=bundle)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    m = result.metrics
    row: dict[str, Any] = {
        "data": data, "seed": seed, "method": method, "train_attack": attack or "none", "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "epochs": args.epochs, "epochs_run": m["epochs"], "best_epoch": m["best_epoch"], "test_accuracy": m["test_accuracy"],
    }  # fmt: skip
    adv = m.get("adversarial_training")
    if adv is not None:
        row["replays"] = adv["replays"]
        row["guard"] = adv["guard"]
    row["robust"] = robust_accuracies(result.model, bundle, args)
    return row


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Means over seeds per (data, method, attack), and the target check."""
    target_key = f"joint {args.target_eps:g}"
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["method"], r["train_attack"]), []).append(r)
    summary = []
    for (data, method, attack), rs in groups.items():
        s: dict[str, Any] = {"data": data, "method": method, "train_attack": attack, "seeds": len(rs)}
        s["train_s"], s["train_s_sd"] = mean_sd([r["train_s"] for r in rs])
        s["train_cpu_s"], _ = mean_sd([r.get("train_cpu_s", r["train_s"]) for r in rs])
        s["clean"], _ = mean_sd([r["robust"]["clean"] for r in rs])
        for key in [k for k in rs[0]["robust"] if k not in ("samples", "clean")]:
            s[key], s[key + " sd"] = mean_sd([r["robust"][key]["worst"] for r in rs])
        summary.append(s)
    by = {(s["data"], s["method"], s["train_attack"]): s for s in summary}
    for s in summary:
        jt = by.get((s["data"], "jt", "none"))
        s["time_vs_jt"] = s["train_s"] / jt["train_s"] if jt else None
        s["cpu_vs_jt"] = s["train_cpu_s"] / jt["train_cpu_s"] if jt else None
    checks = []
    for s in summary:
        if s["method"] not in TARGET_METHODS or s["train_attack"] in ("pgd", "none"):
            continue
        ref = by.get((s["data"], s["method"], "pgd"))
        if ref is None or s["time_vs_jt"] is None:
            continue
        share = s[target_key] / ref[target_key] if ref[target_key] > 0 else None
        checks.append({
            "data": s["data"], "method": s["method"], "train_attack": s["train_attack"],
            "robust": s[target_key], "pgd_robust": ref[target_key], "share_of_pgd": share,
            "time_vs_jt": s["time_vs_jt"], "pgd_time_vs_jt": ref["time_vs_jt"],
            "meets": share is not None and share >= 0.95 and s["time_vs_jt"] <= 1.6,
        })  # fmt: skip
    return summary, checks


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both (less time, more robust accuracy), by time."""
    front, best = [], -1.0
    for t, a in sorted(points):
        if a > best:
            front.append((t, a))
            best = a
    return front


def plot(summary: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib.pyplot as plt

    from mmrobust.report.plots import save_figure

    key = f"joint {args.target_eps:g}"
    datas = sorted({s["data"] for s in summary})
    fig, axes = plt.subplots(1, len(datas), figsize=(5.2 * len(datas), 4.0), squeeze=False)
    colours = {"jt": "black", "mmat": "tab:blue", "crmt-at": "tab:red", "varmat-input": "tab:green"}  # by method
    markers = {"none": "s", "pgd": "o", "fgsm-rs": "^", "n-fgsm": "v", "free": "D", "fgsm": "x"}
    for ax, data in zip(axes[0], datas, strict=True):
        rows = [s for s in summary if s["data"] == data]
        for s in rows:
            label = s["method"] if s["train_attack"] == "none" else f"{s['method']} {s['train_attack']}"
            ax.errorbar(s["train_s"], s[key], xerr=s["train_s_sd"], yerr=s[key + " sd"], linestyle="none", label=label,
                        marker=markers.get(s["train_attack"], "o"), color=colours.get(s["method"], "0.2"))  # fmt: skip
        front = pareto([(s["train_s"], s[key]) for s in rows])
        ax.plot([t for t, _ in front], [a for _, a in front], color="0.4", linestyle="--", label="Pareto front")
        ax.set(xlabel="training wall time (s, whole train call)", ylabel=f"robust accuracy, l2 {key} (CE/CW worst)",
               title=f"{data}: robustness vs training time")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def step_cost(args: argparse.Namespace) -> int:
    """Median time of one engine step (loss, backward, after_backward, optimiser step) of every
    ``method x train_attack`` relative to JT's, on the same batches, interleaved rounds (round 0 warms
    up). ``free`` does one minibatch pass per step (and m passes per minibatch), so its per-epoch
    cost ratio equals its step ratio. Epoch hooks (the guard) and after-training work are not steps."""
    from method_step_cost import time_steps  # the sibling benchmark's interleaved step timer

    from mmrobust.config import options_dataclass
    from mmrobust.data.base import iterate_batches
    from mmrobust.models.fusion import build_model
    from mmrobust.training import METHODS as REGISTRY

    data = args.data.split(",")[0]
    bundle = load_data(DataConfig(data, 0))
    batches = [b for _, b in zip(range(args.block), iterate_batches(bundle.train, 64, shuffle=True), strict=False)]
    variants: list[tuple[str, str, dict[str, Any]]] = [("jt", "none", {})]
    for m in args.methods.split(","):
        for a in args.attacks.split(","):
            opts: dict[str, Any] = {"train_eps": args.train_eps, "train_attack": a}
            opts.update({"steps": args.pgd_steps} if a == "pgd" else {"replays": args.replays} if a == "free" else {})
            variants.append((m, a, opts))
    runners = []
    for m, a, opts in variants:
        cls = REGISTRY.get(m)
        strategy = cls(options_dataclass(cls.Options, opts, m), bundle.meta)
        torch.manual_seed(0)
        model = build_model(bundle.meta, cls.model_config(RunConfig().model, strategy.options))
        runners.append((f"{m} {a}", strategy, model, torch.optim.AdamW(model.parameters(), lr=1e-3)))
    gen = torch.Generator().manual_seed(0)  # one stream shared by every runner
    times = time_steps(
        {name: (strategy, model, opt, gen) for name, strategy, model, opt in runners}, batches, args.rounds
    )
    base = statistics.median(times["jt none"])
    out = {name: {"median_step_s": statistics.median(ts), "relative_to_jt": statistics.median(ts) / base}
           for name, ts in times.items()}  # fmt: skip
    print_table(
        f"one training step on {data}, batch 64, {torch.get_num_threads()} thread(s), train_eps {args.train_eps:g}",
        ["variant", "median ms", "vs JT"],
        [[n, f"{v['median_step_s'] * 1000:.1f}", f"{v['relative_to_jt']:.2f}x"] for n, v in out.items()],
    )
    write_json(Path(args.out), {"args": vars(args), "step_cost": out})
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="avdigits,synthetic")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-eps", type=float, default=2.0, help="joint l2 training budget (x / std)")
    p.add_argument("--pgd-steps", type=int, default=3)
    p.add_argument("--replays", type=int, default=4, help="m of the free attack")
    p.add_argument("--guard", choices=["true", "false"], default=None, help="default: each attack's default")
    p.add_argument("--eval-eps", default="0.5,2,4")
    p.add_argument("--per-modality-eps", type=float, default=1.0)
    p.add_argument("--target-eps", type=float, default=2.0)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--max-samples", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="synthetic only, 1 seed, 4 epochs, 100 samples")
    p.add_argument("--out", default="benchmarks/results/robust_training.json")
    p.add_argument("--plot", default=None, help="PNG path (default: beside --out)")
    p.add_argument("--step-cost", action="store_true", help="time one training step of each variant vs JT instead")
    p.add_argument("--rounds", type=int, default=6, help="--step-cost: interleaved timed rounds")
    p.add_argument("--block", type=int, default=3, help="--step-cost: steps per variant per round")
    p.add_argument(
        "--runs",
        nargs="*",
        default=None,
        help="summarise the runs of these JSON files (e.g. the "
        ".partial.json of an interrupted benchmark, several data sets) instead of training",
    )
    args = p.parse_args(argv)
    if args.step_cost:
        torch.set_num_threads(args.threads)
        return step_cost(args)
    if args.quick:
        args.data, args.seeds, args.epochs, args.max_samples, args.replays = "synthetic", 1, 4, 100, 2
    args.eval_eps = [float(e) for e in args.eval_eps.split(",")]
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    if args.runs is not None:
        import json

        for path in args.runs:
            rows += json.loads(Path(path).read_text())["runs"]
        return report(rows, args)
    for data in args.data.split(","):
        for seed in range(args.seeds):
            bundle = load_data(DataConfig(data, seed))
            if seed == 0:  # untimed warm-up: the first train() call pays for imports and allocator growth
                run_one(data, seed, "mmat", "free", argparse.Namespace(**{**vars(args), "epochs": 1, "guard": "false",
                                                                         "max_samples": 8}), bundle)  # fmt: skip
            todo: list[tuple[str, str | None]] = [("jt", None)]
            todo += [(m, a) for m in args.methods.split(",") for a in args.attacks.split(",")]
            for method, attack in todo:
                row = run_one(data, seed, method, attack, args, bundle)
                rows.append(row)
                write_json(Path(args.out).with_suffix(".partial.json"), {"args": vars(args), "runs": rows})
                r = row["robust"]
                print(f"{data} seed {seed} {method} {attack or '-'}: {row['train_s']:.1f}s clean {r['clean']:.3f} "
                      + " ".join(f"{k} {v['worst']:.3f}" for k, v in r.items() if isinstance(v, dict)),
                      file=sys.stderr, flush=True)  # fmt: skip
    return report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> int:
    """Print the tables, write the JSON and the plot of ``rows``."""
    summary, checks = summarize(rows, args)
    epochs = ",".join(str(e) for e in sorted({r.get("epochs", args.epochs) for r in rows}))
    seeds = max(s["seeds"] for s in summary)
    keys = [f"joint {e:g}" for e in args.eval_eps] + ["per-modality"]
    print_table(
        f"robust accuracy (l2 PGD {args.eval_steps} steps, worst of CE/CW; up to {seeds} seed(s), {epochs} epochs, "
        f"train_eps {args.train_eps:g} joint l2)",
        ["data", "method", "train_attack", "train s", "x JT", "CPU x JT", "clean", *keys],
        [[s["data"], s["method"], s["train_attack"], f"{s['train_s']:.1f}±{s['train_s_sd']:.1f}",
          f"{s['time_vs_jt']:.2f}" if s["time_vs_jt"] else "-", f"{s['cpu_vs_jt']:.2f}" if s["cpu_vs_jt"] else "-",
          f"{s['clean']:.3f}",
          *[f"{s[k]:.3f}±{s[k + ' sd']:.3f}" for k in keys]] for s in summary],
    )  # fmt: skip
    print_table(
        f"target: >= 95% of the PGD variant's robust accuracy at joint eps {args.target_eps:g} at <= 1.6x JT's time",
        ["data", "method", "train_attack", "robust", "pgd robust", "share", "x JT", "pgd x JT", "meets"],
        [[c["data"], c["method"], c["train_attack"], f"{c['robust']:.3f}", f"{c['pgd_robust']:.3f}",
          f"{c['share_of_pgd']:.2f}" if c["share_of_pgd"] is not None else "-", f"{c['time_vs_jt']:.2f}",
          f"{c['pgd_time_vs_jt']:.2f}", "yes" if c["meets"] else "no"] for c in checks],
    )  # fmt: skip
    out = Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    write_json(out, {"args": vars(args), "threads": torch.get_num_threads(), "runs": rows, "summary": summary,
                     "target": checks})  # fmt: skip
    plot(summary, args, png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
