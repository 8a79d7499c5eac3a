"""Tables, the markdown report and the embedding plot of a calibration study."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from mmrobust.calibration.evaluate import Evaluation
from mmrobust.calibration.store import save_heads
from mmrobust.calibration.study import CalibrationStudy
from mmrobust.eval.results import fmt_eps
from mmrobust.io import SCHEMA_VERSION, atomic_write_bytes, write_json
from mmrobust.publish import Lock, check_destination, partial_path, publish_folder, resolve_target
from mmrobust.report.markdown import md_table
from mmrobust.report.plots import plt, save_figure


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Coordinates of the rows of ``x`` on its two leading principal axes (SVD of the centred data)."""
    centred = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def plot_embeddings(before: Evaluation, after: Evaluation, path: str | Path, after_name: str) -> Path:
    """Clean embeddings per modality (rows) of the frozen and a calibrated model (columns), PCA 2-D,
    coloured by class."""
    mods = list(before.embeddings)
    fig, axes = plt.subplots(len(mods), 2, figsize=(8, 3.6 * len(mods)), squeeze=False)
    for i, m in enumerate(mods):
        for j, (ev, title) in enumerate(((before, "frozen"), (after, after_name))):
            xy = pca_2d(ev.embeddings[m]).numpy()
            ax = axes[i][j]
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=ev.labels.numpy(), cmap="tab10", s=8)
            ax.set(title=f"{m}: {title}", xticks=[], yticks=[])
        fig.colorbar(sc, ax=axes[i].tolist(), label="class")
    return save_figure(fig, path)


def summary_rows(study: dict[str, Any], modality: str) -> tuple[list[str], list[list[Any]]]:
    """Per model: clean accuracy and F1, worst-case accuracy per eps, F1 and cosine at the largest eps,
    trainable fraction, best epoch."""
    frozen = study["frozen"]["modalities"][modality]
    eps = [b["eps"] for b in frozen["budgets"]]
    headers = ["model", "clean acc", "clean F1", *[f"robust acc {fmt_eps(e)}" for e in eps],
               f"robust F1 {fmt_eps(eps[-1])}", f"cos clean/adv {fmt_eps(eps[-1])}", "trainable", "best epoch"]  # fmt: skip
    rows = []
    entries = [("frozen", frozen, None)] + [
        (name, v["evaluation"]["modalities"][modality], v["calibration"]["heads"].get(modality))
        for name, v in study["variants"].items()
    ]
    for name, ev, head in entries:
        b = ev["budgets"]
        frac = head["trainable_fraction"] if head else None
        rows.append([name, ev["clean"]["accuracy"], ev["clean"]["f1"], *[x["worst"]["accuracy"] for x in b],
                     b[-1]["worst"]["f1"], b[-1]["embedding_cosine"], f"{frac:.2%}" if frac is not None else "–",
                     head["best_epoch"] if head else "–"])  # fmt: skip
    return headers, rows


def attack_rows(study: dict[str, Any], modality: str) -> tuple[list[str], list[list[Any]]]:
    """Accuracy after each AutoAttack component (cumulative), per model and eps."""
    frozen = study["frozen"]["modalities"][modality]
    attacks = list(frozen["budgets"][0]["by_attack"])
    headers = ["model", "eps", *attacks, "worst case"]
    rows = []
    models = {"frozen": frozen, **{n: v["evaluation"]["modalities"][modality] for n, v in study["variants"].items()}}
    for name, ev in models.items():
        for b in ev["budgets"]:
            rows.append([name, fmt_eps(b["eps"]), *[b["by_attack"][a] for a in attacks], b["worst"]["accuracy"]])
    return headers, rows


def retrieval_rows(study: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    first = study["frozen"]["retrieval"]
    ks = list(first[0]["clean"]) if first else []
    headers = ["model", "query -> gallery", *[f"R@{k} clean" for k in ks], *[f"R@{k} adv" for k in ks]]
    rows = []
    models = {"frozen": study["frozen"], **{n: v["evaluation"] for n, v in study["variants"].items()}}
    for name, ev in models.items():
        for r in ev["retrieval"]:
            adv = r.get("adversarial", {})
            rows.append([name, f"{r['query']} -> {r['gallery']}", *[r["clean"][k] for k in ks],
                         *[adv.get(k) for k in ks]])  # fmt: skip
    return headers, rows


def _protocol_counts(proto: dict[str, Any]) -> str:
    """``20 steps, 5000 Square queries, 9 target classes``: only the counts of the components that ran."""
    attacks = set(proto["attacks"])
    parts = []
    if attacks - {"square"}:
        parts.append(f"{proto['steps']} steps")
    if "square" in attacks:
        parts.append(f"{proto['queries']} Square queries")
    if attacks & {"apgd-t", "fab-t"}:
        parts.append(f"{proto['targets']} target classes")
    return ", ".join(parts)


def _evaluations(study: dict[str, Any]) -> list[dict[str, Any]]:
    return [study["frozen"], *[v["evaluation"] for v in study["variants"].values()]]


def study_markdown(study: dict[str, Any], plot: str | None = None) -> str:
    """The report: setup, per-modality summary and per-attack tables, retrieval, plot, wall times."""
    setup, proto = study["setup"], study["frozen"]["protocol"]
    lines = [
        "# Adversarial calibration report", "",
        f"Setup: `{setup.get('example', 'user encoders')}`; {study['frozen']['samples']} test samples; "
        f"wall time {study['wall_time_s']:.0f} s.", "",
        f"Attacks (l-inf, on each modality's valid range): {', '.join(proto['attacks'])} at eps "
        f"{', '.join(fmt_eps(e) for e in proto['eps'])}; {_protocol_counts(proto)}. Robust accuracy is "
        "AutoAttack's per-sample worst case over the components that ran, each run on the samples the earlier "
        "ones and the smaller budgets left correct; the second table is cumulative: the accuracy after each "
        "component.", "",
    ]  # fmt: skip
    for m in study["frozen"]["modalities"]:
        skipped = study["frozen"]["modalities"][m]["skipped"]
        lines += [f"## {m}", "", md_table(*summary_rows(study, m)), ""]
        if skipped:
            lines += [f"Skipped: {'; '.join(skipped)}", ""]
        warned = sorted({w for ev in _evaluations(study) for w in ev["modalities"][m].get("warnings", [])})
        if warned:
            lines += [f"AutoAttack warnings: {'; '.join(warned)}", ""]
        lines += [md_table(*attack_rows(study, m)), ""]
    if study["frozen"]["retrieval"]:
        lines += ["## Cross-modal retrieval", "",
                  "Class-level recall@k through the shared space: a query counts as a hit if one of its k nearest "
                  "items (cosine) of the other modality has its class; adversarial queries are the APGD-CE examples "
                  "at the largest eps.", "", md_table(*retrieval_rows(study)), ""]  # fmt: skip
    else:
        lines += ["## Cross-modal retrieval", "", "None: retrieval needs two modalities in the shared space.", ""]
    lines += ["## Training", ""]
    rows = [[n, m, h["best_epoch"], len(h["history"]) - 1, h["trainable_parameters"], h["head_parameters"],
             h["encoder_parameters"], v["calibration"]["wall_time_s"]]
            for n, v in study["variants"].items() for m, h in v["calibration"]["heads"].items()]  # fmt: skip
    lines += [md_table(["variant", "modality", "best epoch", "epochs run", "trainable params", "head params",
                        "encoder params", "wall time (s)"], rows), ""]  # fmt: skip
    if plot:
        lines += ["## Embeddings (PCA, clean test samples)", "", f"![embeddings]({plot})", ""]
    return "\n".join(lines)


def write_study(folder: str | Path, study: CalibrationStudy) -> list[Path]:
    """``calibration.json``, ``report.md``, ``embeddings.png`` and each variant's heads under ``heads/``."""
    folder = Path(folder)
    data = {"schema_version": SCHEMA_VERSION, **study.to_dict()}
    written = []
    for v in study.variants:
        written += save_heads(folder / "heads", v.name.replace("+", "_"), v.result)
    plot = None
    if study.variants:
        best = max(study.variants, key=lambda v: _mean_robust(v.evaluation))
        plot = plot_embeddings(study.frozen, best.evaluation, folder / "embeddings.png", best.name).name
        written.append(folder / plot)
    write_json(folder / "calibration.json", data)
    atomic_write_bytes(folder / "report.md", (study_markdown(data, plot) + "\n").encode())
    return [*written, folder / "calibration.json", folder / "report.md"]


def _mean_robust(ev: Evaluation) -> float:
    """Mean over modalities of the worst-case accuracy at the largest eps (picks the plotted variant)."""
    return sum(e.budgets[-1].worst.accuracy for e in ev.modalities.values()) / len(ev.modalities)


def check_out_folder(out: str | Path, *, force: bool = False) -> Path:
    """Resolve ``out`` once (a symlink: its target) and refuse, before any work, what the study could
    not be published into: a file or device, a non-empty folder (unless ``force``: then only a study
    folder mmrobust wrote), a folder another mmrobust process is writing."""
    path = resolve_target(out)
    check_destination(path, force=force)
    Lock(path, "study").refuse_if_taken()
    return path


def write_study_folder(out: str | Path, study: CalibrationStudy, *, force: bool = False) -> Path:
    """Write the study into the hidden partial folder and publish it (:mod:`mmrobust.publish`): an
    interrupted or failed write never leaves a half-written ``out``."""
    path = check_out_folder(out, force=force)
    partial = partial_path(path)
    with Lock(path, "study"):
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
            write_study(partial, study)  # calibration.json is its record (and signature)
            publish_folder(partial, path)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return path
