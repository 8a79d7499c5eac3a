"""Robustness tables, plots and files from :class:`~mmrobust.eval.results.EvalResult` (terminal,
markdown, PNG, ``eval.json``).

Rows of an evaluation are pivoted by threat setting, one column per loss and the ``worst`` column
(the per-sample worst case over the losses, the number to trust) beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from mmrobust.eval.results import EvalResult, Setting, fmt_eps
from mmrobust.eval.robust import is_masking_gap
from mmrobust.io import write_json
from mmrobust.publish import folder_update
from mmrobust.report.console import console
from mmrobust.report.markdown import fmt
from mmrobust.report.plots import plt, save_figure

_LOSS_ORDER = ("ce", "cw", "dlr")


def _masked(e: Setting) -> bool:
    return is_masking_gap(e.gap, e.row.steps)


def _loss_columns(entries: list[Setting]) -> list[str]:
    present = {k for e in entries for k in e.acc} - {"worst"}
    return [k for k in _LOSS_ORDER if k in present] + sorted(present - set(_LOSS_ORDER))


def save_eval(run_dir: str | Path, result: EvalResult, plot: bool = True) -> list[Path]:
    """Write ``RUN/eval_<suite>.json`` and ``RUN/eval.json`` (the latest evaluation), plus the suite's
    plot (``paper_suite.png`` / ``robustness_curves.png``) when ``plot``, whose names the JSON
    records; returns the paths written."""
    run_dir = Path(run_dir)
    plots = []
    with folder_update(run_dir):  # the one writer protocol: files added to a run under its update lock
        if plot and result.suite == "paper":
            plots.append(plot_setting_bars(result, run_dir / "paper_suite.png"))
        if plot and result.curves is not None:
            plots.append(plot_robustness_curves({run_dir.name or "model": result}, run_dir / "robustness_curves.png"))
        doc = replace(result, plots=[p.name for p in plots]).to_json()
        files = [run_dir / f"eval_{result.suite}.json", run_dir / "eval.json"]
        for path in files:
            write_json(path, doc)
    return [*files, *plots]


def print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        console.print(f"warning: {w}", style="yellow", markup=False)


def print_eval_table(result: EvalResult, title: str) -> None:
    """The rich terminal table of an evaluation, with a gradient-masking flag per setting."""
    from rich.table import Table

    from mmrobust.report.console import out

    entries = result.settings()
    losses = _loss_columns(entries)
    table = Table(title=title)
    table.add_column("setting")
    table.add_column("eps", no_wrap=True)
    table.add_column("units")
    table.add_column("steps", justify="right")
    for loss in losses:
        table.add_column(loss.upper(), justify="right", no_wrap=True)
    table.add_column("worst of " + "/".join(k.upper() for k in losses) if losses else "accuracy", justify="right",
                     no_wrap=True)  # fmt: skip
    table.add_column("note", no_wrap=True)
    table.add_row("clean", "–", "–", "–", *["–"] * len(losses), fmt(result.clean_accuracy), "")
    for e in entries:
        r = e.row
        mods = "+".join(r.modalities)
        if r.attack == "missing":
            setting = f"{mods} missing ({r.fill or 'zero'})"
        else:
            attack = e.label.split(f" {mods}")[0] if r.attack == "autoattack" else r.attack
            setting = f"{attack} {mods}" + (" per-modality" if r.budget == "per-modality" else "")
        note = f"masking? gap {e.gap:.2f}" if _masked(e) and e.gap is not None else ""
        eps = fmt_eps(r.eps) if r.eps is not None else "–"
        cells = [_num(e.acc.get(k), 3) for k in losses]
        table.add_row(setting, eps, r.units_label or "–", str(r.steps or "–"), *cells, fmt(e.acc["worst"]), note,
                      style="yellow" if _masked(e) else None)  # fmt: skip
    wc = result.worst_case.accuracy
    if wc is not None and any(e.row.attack != "missing" for e in entries):  # a row with no attack has no worst case
        table.add_row("worst case over every attack", "", "", "", *[""] * len(losses), fmt(wc), "", style="bold")
    out.print(table)


def _num(v: Any, digits: int) -> str:
    return fmt(v, digits) if v is not None else "–"


def plot_robustness_curves(evals: Mapping[str, EvalResult], path: str | Path, title: str | None = None) -> Path:
    """Accuracy vs eps, one panel per attacked target (each modality alone, all jointly), one colour
    per run; solid = worst case over losses, dashed = CE, dotted = CW. ``evals`` maps a run name to
    the result of the ``curves`` suite."""
    curves = {name: ev.curves for name, ev in evals.items() if ev.curves is not None}
    if len(curves) != len(evals):
        raise ValueError("plot_robustness_curves needs results of the curves suite")
    first = next(iter(curves.values()))
    targets = list(first.targets)
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"worst": "-", "ce": "--", "cw": ":"}
    for ci, (name, cur) in enumerate(curves.items()):
        xs = [0.0, *cur.eps] if 0.0 not in cur.eps else list(cur.eps)
        for ax, target in zip(axes[0], targets, strict=True):
            series = cur.targets.get(target, {})
            for loss, ys in series.items():
                vals = [cur.clean_accuracy, *ys] if len(xs) == len(ys) + 1 else ys
                label = f"{name} {loss}" if len(evals) > 1 else loss
                ax.plot(xs, vals, styles.get(loss, "-."), color=colors[ci % len(colors)], marker="o", ms=3, label=label,
                        lw=2 if loss == "worst" else 1)  # fmt: skip
    for ax, target in zip(axes[0], targets, strict=True):
        kind = "joint" if "+" in target else "alone"
        units = sorted(set(first.units.get(target, {}).get("units", {}).values()))
        ax.set(
            xlabel=f"eps ({first.norm}; {', '.join(units) or 'standardised'})",
            ylabel="accuracy",
            ylim=(-0.02, 1.02),
            title=f"{target} ({kind})",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"Robustness curves ({first.attack}, worst case over losses = solid)")
    return save_figure(fig, path)


def plot_setting_bars(result: EvalResult, path: str | Path, title: str | None = None) -> Path:
    """Accuracy per threat setting of one evaluation: CE, CW and worst-case bars side by side."""
    entries = result.settings()
    labels = ["clean", *[e.label for e in entries]]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(labels)), 4.0))
    width = 0.27
    for i, loss in enumerate(("ce", "cw", "worst")):
        vals = [result.clean_accuracy] + [e.acc.get(loss, float("nan")) for e in entries]
        ax.bar(
            [x + (i - 1) * width for x in range(len(labels))],
            vals,
            width,
            label=loss.upper() if loss != "worst" else loss,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=title or f"{result.suite} suite: accuracy per setting")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
