"""The main job: train JT and CRMT on avdigits, attack and certify them, write ``DIR/report.md``.

Everything in the report is computed on the test split from models selected on validation; every
robust accuracy is the worst case over CE and CW (margin) attacks, shown beside each of them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrobust.certify.results import CertifyResult
from mmrobust.certify.runner import certify_model, split_on_device
from mmrobust.config import RunConfig, resolve_device
from mmrobust.data.registry import DataConfig, load_data
from mmrobust.eval.api import evaluate_model
from mmrobust.eval.compare import comparison_tables
from mmrobust.eval.results import EvalResult
from mmrobust.io import atomic_write_bytes
from mmrobust.report.benchmark import LEGEND, table_markdown
from mmrobust.report.certify import save_certify
from mmrobust.report.certify_plots import plot_certified_accuracy, plot_eta_heatmaps
from mmrobust.report.console import console, echo, progress_callback
from mmrobust.report.markdown import md_table
from mmrobust.report.plots import plot_grouped_bars, plot_training_curves
from mmrobust.report.robustness import plot_robustness_curves, save_eval
from mmrobust.runs import load_run
from mmrobust.training import train

CERTIFY_RADII = (0.0, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0)


@dataclass
class DemoConfig:
    """What the demo runs. The defaults finish in about 5-8 minutes on 2 CPU cores."""

    epochs: int = 8
    seed: int = 0
    data: DataConfig = field(default_factory=lambda: DataConfig("avdigits"))
    methods: Sequence[str] = ("jt", "crmt-jt", "crmt-at")
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"crmt-at": {"train_eps": 2.0, "at_steps": 3}}
    )
    joint_eps: Sequence[float] = (0.5, 2.0)  # the paper's 0.5, and a budget where JT is clearly hurt
    unimodal_eps: Sequence[float] = (1.0, 3.0)
    attack_steps: int = 10
    curve_eps: Sequence[float] = (0.0, 1.0, 2.0, 4.0)
    curve_steps: int = 5
    lipschitz_samples: int = 512  # training samples for the empirical Lipschitz estimate
    #: also train CRMT-JT with 1-Lipschitz encoders ("crmt-jt-lip"; off by default: it adds about 6 min on
    #: 2 CPU cores with ``lipschitz_epochs``), certified with CROWN as well
    lipschitz_model: bool = False
    lipschitz_epochs: int = 24
    lipschitz_lr: float = 3e-3  # the recipe of benchmarks/certify_crmt_jt_lipschitz.yaml
    #: certifiers per model: empirical and sound on the whole test split; the others (smoothing for
    #: every model, CROWN for the Lipschitz model; CROWN on the standard CNNs costs ~3 s a sample and is
    #: no tighter than sound there) on its first ``cert_samples`` samples
    cert_samples: int = 100
    smoothing_options: dict[str, Any] = field(
        default_factory=lambda: {"sigma": 0.25, "n0": 20, "n": 100, "alpha": 0.001, "unimodal": False}
    )
    crown_options: dict[str, Any] = field(default_factory=lambda: {"steps": 8, "unimodal": False})
    eval_samples: int | None = 300  # attack the first N test samples (keeps the demo < 10 min; the report says so)
    progress: bool = True
    device: str = "auto"  # where everything computes: auto (CUDA if available, else CPU), cpu, cuda, cuda:N


LIPSCHITZ_MODEL = "crmt-jt-lip"


def model_names(cfg: DemoConfig) -> list[str]:
    """The demo's models (run folder names): the methods, plus CRMT-JT with Lipschitz encoders."""
    return [*cfg.methods, *([LIPSCHITZ_MODEL] if cfg.lipschitz_model else [])]


def _train_all(cfg: DemoConfig, out: Path, bundle: Any) -> dict[str, dict[str, Any]]:
    metrics = {}
    for name in model_names(cfg):
        lip = name == LIPSCHITZ_MODEL
        method = "crmt-jt" if lip else name
        rc = RunConfig()
        rc.data = DataConfig(cfg.data.name, cfg.seed, dict(cfg.data.options))
        epochs = cfg.lipschitz_epochs if lip else cfg.epochs
        rc.train.method, rc.train.epochs, rc.train.seed, rc.train.progress = method, epochs, cfg.seed, cfg.progress
        rc.train.method_options = dict(cfg.method_options.get(method, {}))
        rc.train.device = cfg.device
        if lip:
            rc.model.lipschitz_encoders = True
            rc.train.optim.lr = cfg.lipschitz_lr
        console.print(f"== training {name} on {cfg.data.name} ({epochs} epochs)", markup=False)
        with progress_callback(cfg.progress) as progress:
            metrics[name] = train(rc, out=out / name, bundle=bundle, on_epoch=echo, progress=progress).metrics
    return metrics


def run_demo(out: Path, cfg: DemoConfig | None = None) -> Path:
    """Run the whole demo (``DemoConfig()`` by default) into ``out``; returns the path of ``report.md``."""
    cfg = cfg or DemoConfig()
    device = resolve_device(cfg.device)  # before anything is written
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_data(DataConfig(cfg.data.name, cfg.seed, dict(cfg.data.options)))
    metrics = _train_all(cfg, out, bundle)
    timings = {"train": time.perf_counter() - t0}

    t1 = time.perf_counter()
    basic, paper, curves = {}, {}, {}
    for method in model_names(cfg):
        run = load_run(out / method, device=device)
        full = run.data().test
        test = full.subset(slice(0, cfg.eval_samples)) if cfg.eval_samples is not None else full
        basic[method] = evaluate_model(run.model, run.meta, full, "basic")
        console.print(f"== attacking {method}: paper protocol and robustness curves", markup=False)
        with progress_callback(cfg.progress) as progress:
            paper[method] = evaluate_model(run.model, run.meta, test, "paper", eps=list(cfg.joint_eps), unimodal_eps=list(cfg.unimodal_eps),
                                     steps=cfg.attack_steps, progress=progress)  # fmt: skip
            curves[method] = evaluate_model(run.model, run.meta, test, "curves", eps=list(cfg.curve_eps), steps=cfg.curve_steps,
                                      progress=progress)  # fmt: skip
        for result in (paper[method], curves[method], basic[method]):  # basic last: it is eval.json
            save_eval(out / method, result, plot=False)
    timings["attacks"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    certs: dict[str, CertifyResult] = {}
    groups: dict[str, str] = {}
    for method in model_names(cfg):
        run = load_run(out / method, device=device)
        bundle_m = run.data()
        train_d = split_on_device(bundle_m.train, device)
        part = bundle_m.test.subset(slice(0, cfg.cert_samples))
        plan: list[tuple[str, Any, dict[str, Any]]] = [
            ("empirical", bundle_m.test, {"fit_samples": cfg.lipschitz_samples}),
            ("sound", bundle_m.test, {}),
            ("smoothing", part, dict(cfg.smoothing_options)),
        ]
        if method == LIPSCHITZ_MODEL:
            plan.append(("crown", part, dict(cfg.crown_options)))
        for est, data, opts in plan:
            label = f"{method} ({est})" if data is bundle_m.test else f"{method} ({est}, first {len(part)})"
            console.print(f"== certifying {label}", markup=False)
            certs[label] = res = certify_model(
                run.model,
                run.meta,
                split_on_device(data, device),
                est,
                train_d,
                CERTIFY_RADII,
                options=opts,
                fit_split="train",
            )
            groups[label] = method
            if data is bundle_m.test:  # certify.json holds whole-split results
                save_certify(run, res)
    timings["certify"] = time.perf_counter() - t2

    report = _write_report(out, cfg, bundle, metrics, basic, paper, curves, certs, groups, timings, t0)
    console.print(f"wrote {report}", markup=False)
    return report


def _write_report(
    out: Path,
    cfg: DemoConfig,
    bundle: Any,
    metrics: dict[str, dict[str, Any]],
    basic: dict[str, EvalResult],
    paper: dict[str, EvalResult],
    curves: dict[str, EvalResult],
    certs: dict[str, CertifyResult],
    cert_groups: dict[str, str],
    timings: dict[str, float],
    t0: float,
) -> Path:
    methods, modalities = model_names(cfg), bundle.meta.modality_names
    header = ["method", "val acc", "test acc"] + [f"{m} missing" for m in modalities] + ["train time (s)"]
    rows = []
    for method in methods:
        missing = {r.modalities[0]: r.accuracy for r in basic[method].rows if r.attack == "missing"}
        rows.append([method, metrics[method]["val_accuracy"], metrics[method]["test_accuracy"],
                     *[missing[m] for m in modalities], f"{metrics[method]['train_time_s']:.1f}"])  # fmt: skip
    plot_training_curves({m: metrics[m]["history"] for m in methods}, out / "training_curves.png")
    groups = ["clean"] + [f"{m} missing" for m in modalities]
    series = {m: [basic[m].clean_accuracy] + [r.accuracy for r in basic[m].rows] for m in methods}
    plot_grouped_bars(
        groups, series, out / "missing_modality.png", "test accuracy", "Clean and missing-modality accuracy"
    )
    plot_robustness_curves(curves, out / "robustness_curves.png", title="l2-PGD accuracy vs eps (test split)")
    entries = {name: c.to_json() for name, c in certs.items()}
    plot_certified_accuracy(entries, out / "certified_accuracy.png", groups=cert_groups)
    plot_eta_heatmaps({k: v for k, v in entries.items() if k.endswith("(empirical)")}, out / "eta_ratio.png",
                      class_names=bundle.meta.class_names)  # fmt: skip

    cert_rows = []
    for name, c in certs.items():
        g = c.certificate.guarantee.value
        kind = (
            "yes"
            if g == "sound"
            else f"probabilistic (alpha={c.certificate.alpha:g})"
            if g == "probabilistic"
            else "no (estimate)"
        )
        cert_rows.append([name, kind, c.n, *c.accuracy_curve("joint")])
    eta_rows = []
    for name, entry in entries.items():
        if "vulnerability" not in entry:  # only the Lipschitz certifiers compute the indicators
            continue
        vul = entry["vulnerability"]
        eta_rows.append([name, *[vul["mean"].get(m) for m in modalities],
                         ", ".join(f"{k} {v:.3g}" for k, v in vul["ratio_of_means"].items() if v is not None)])  # fmt: skip
    warnings = sorted({w for m in methods for w in paper[m].warnings + curves[m].warnings})

    sections = [
        "# mmrobust demo report",
        f"Dataset: **{bundle.meta.name}** ({bundle.meta.info.get('description', ', '.join(modalities))}), "
        f"{len(bundle.train)}/{len(bundle.val)}/{len(bundle.test)} train/val/test samples, seed {cfg.seed}. "
        f"Methods: {', '.join(methods)} ({cfg.epochs} epochs each"
        + "".join(f"; {m} options {o}" for m, o in cfg.method_options.items() if m in methods)
        + "). Models are "
        "selected on validation; every number below is on the test split"
        + (f" (attacks on its first {cfg.eval_samples} samples)." if cfg.eval_samples else "."),
        "## Clean and missing-modality accuracy",
        "A missing modality is replaced by zeros in the normalised input space (the training mean).",
        md_table(header, rows),
        "![clean and missing-modality accuracy](missing_modality.png)",
        "## Paper protocol (CRMT, ICLR 2024)",
        f"FGM and l2-PGD ({cfg.attack_steps} steps) on both modalities jointly (eps {', '.join(map(str, cfg.joint_eps))}, "
        f"budget over the joint vector) and on each modality alone (eps {', '.join(map(str, cfg.unimodal_eps))}); "
        "each with the cross-entropy (CE) and the margin (CW) loss and their per-sample worst case. "
        "Budgets are data-relative (small normalised inputs have small norms), so a larger budget is shown "
        "beside the paper's.",
        *[
            table_markdown(t, transposed=True)
            for t in comparison_tables(bundle.meta.name, {m: [paper[m]] for m in methods})
        ],
        LEGEND,
        "## Robustness curves",
        f"l2-PGD ({cfg.curve_steps} steps); worst case over CE and CW (solid), CE (dashed), CW (dotted); each "
        "modality attacked alone, then both.",
        "![robustness curves](robustness_curves.png)",
        "## Certified robustness",
        "Certified accuracy = share of test samples that are correctly classified **and** whose certified l2 "
        "radius (joint perturbation) is at least r. `empirical` uses the paper's Lipschitz estimate (max local "
        "gradient norm over training data, Theorem 3.3 for the concat head, 3.5 for the orthogonal head): an "
        "estimate, **not** a guarantee (dotted in the plot). `sound` uses composed per-layer operator-norm bounds: "
        "a real certificate, usually far looser (solid). `crown` (linear bound propagation) is sound as well; "
        "`smoothing` (randomized smoothing, sigma "
        f"{cfg.smoothing_options.get('sigma', 0.25)}) certifies the *smoothed* classifier and holds except with "
        "probability alpha per sample (dashed); on models not trained with noise it certifies little. "
        f"smoothing{' and crown' if cfg.lipschitz_model else ''} run on the first {cfg.cert_samples} test samples."
        + (
            f" `{LIPSCHITZ_MODEL}`: CRMT-JT with 1-Lipschitz encoders (AOL layers, MaxMin), {cfg.lipschitz_epochs} "
            "epochs."
            if cfg.lipschitz_model
            else " (`mmrobust demo --lipschitz-encoders` adds CRMT-JT with 1-Lipschitz encoders, certified by CROWN.)"
        ),
        md_table(["model (certifier)", "guarantee", "samples", *[f"r={r}" for r in CERTIFY_RADII]], cert_rows),
        "![certified accuracy](certified_accuracy.png)",
        "Vulnerability indicators eta^(m) (mean over correctly classified samples; larger = more vulnerable) "
        "and their ratio:",
        md_table(["model (Lipschitz)", *[f"eta {m}" for m in modalities], "ratio"], eta_rows),
        "![eta ratio heatmap](eta_ratio.png)",
        "## Training curves",
        "![training curves](training_curves.png)",
    ]
    if warnings:
        sections += ["## Warnings", "\n".join(f"* {w}" for w in warnings)]
    sections.append(
        f"_Timings: training {timings['train']:.0f} s, attacks {timings['attacks']:.0f} s, certification "
        f"{timings['certify']:.0f} s, total {time.perf_counter() - t0:.0f} s._"
    )
    report = out / "report.md"
    atomic_write_bytes(report, ("\n\n".join(sections) + "\n").encode())
    return report
