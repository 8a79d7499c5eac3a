"""Robustness tables and plots from ``eval.json`` results (terminal, markdown, PNG).

Rows of an evaluation are pivoted by threat setting, one column per loss and the ``worst`` column
(the per-sample worst case over the losses, the number to trust) beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmrobust.eval.robust import GAP_THRESHOLD, fmt_eps, is_masking_gap, setting_key, setting_label
from mmrobust.report.markdown import fmt, md_table
from mmrobust.report.plots import plt, save_figure

_LOSS_ORDER = ("ce", "cw", "dlr")


def pivot(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One entry per threat setting: its label/fields and the accuracy per loss (``worst`` included).

    A row without a loss (missing modality, FAB) puts its accuracy under ``worst``: it is the only
    number for that setting.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for r in result.get("results", []):
        g = groups.setdefault(setting_key(r), {"label": setting_label(r), "row": r, "acc": {}})
        g["acc"][r.get("loss") or "worst"] = r["accuracy"]
    out = []
    for g in groups.values():
        acc = g["acc"]
        if "worst" not in acc and acc:
            acc["worst"] = min(acc.values())
        gap = acc["ce"] - acc["cw"] if "ce" in acc and "cw" in acc else None
        out.append({**g, "gap": gap, "masked": is_masking_gap(gap, g["row"].get("steps"))})
    return out


def _loss_columns(entries: list[dict[str, Any]]) -> list[str]:
    present = {k for e in entries for k in e["acc"]} - {"worst"}
    return [k for k in _LOSS_ORDER if k in present] + sorted(present - set(_LOSS_ORDER))


def print_eval_table(result: Mapping[str, Any], title: str) -> None:
    """The rich terminal table of an evaluation, with a gradient-masking flag per setting."""
    from rich.table import Table

    from mmrobust.report.console import out

    entries = pivot(result)
    losses = _loss_columns(entries)
    table = Table(title=title)
    table.add_column("setting")
    table.add_column("eps", no_wrap=True)
    table.add_column("steps", justify="right")
    for loss in [*losses, "worst"]:
        table.add_column(loss.upper() if loss != "worst" else "worst", justify="right", no_wrap=True)
    table.add_column("note", no_wrap=True)
    table.add_row("clean", "–", "–", *["–"] * len(losses), fmt(result["clean_accuracy"]), "")
    for e in entries:
        r = e["row"]
        mods = "+".join(r.get("modalities") or [])
        if r.get("attack") == "missing":
            setting = f"{mods} missing ({r.get('fill') or 'zero'})"
        else:
            setting = f"{r['attack']} {mods}" + (" per-modality" if r.get("budget") == "per-modality" else "")
        note = f"masking? gap {e['gap']:.2f}" if e["masked"] else ""
        eps = fmt_eps(r["eps"]) if r.get("eps") is not None else "–"
        cells = [_num(e["acc"].get(k), 3) for k in losses]
        table.add_row(setting, eps, str(r.get("steps") or "–"), *cells, fmt(e["acc"]["worst"]), note,
                      style="yellow" if e["masked"] else None)  # fmt: skip
    wc = result.get("worst_case", {}).get("accuracy")
    if wc is not None:
        table.add_row("worst case", "", "", *[""] * len(losses), fmt(wc), "", style="bold")
    out.print(table)


def paper_suite_markdown(evals: Mapping[str, Mapping[str, Any]], digits: int = 3) -> str:
    """A markdown table comparing several methods' evaluations (any suite; made for ``paper``).

    ``evals`` maps a method name to its ``eval.json`` content. One row per threat setting, for each
    method the CE and CW accuracy and their per-sample worst case; settings where CE exceeds CW by
    more than the masking threshold are marked with a dagger, and every warning is listed below.
    """
    order: dict[str, None] = {}
    pivots = {name: {e["label"]: e for e in pivot(ev)} for name, ev in evals.items()}
    for p in pivots.values():
        for label in p:
            order.setdefault(label)
    losses = ["ce", "cw"]
    headers = ["setting"]
    for name in evals:
        headers += [f"{name} {loss.upper()}" for loss in losses] + [f"{name} worst"]
    rows: list[list[Any]] = [
        ["clean"] + sum(([None] * len(losses) + [ev["clean_accuracy"]] for ev in evals.values()), [])
    ]
    for label in order:
        row: list[Any] = [label]
        for name in evals:
            e = pivots[name].get(label)
            if e is None:
                row += [None] * (len(losses) + 1)
                continue
            worst = fmt(e["acc"]["worst"], digits) + (" †" if e["masked"] else "")
            row += [_num(e["acc"].get(loss), digits) for loss in losses] + [worst]
        rows.append(row)
    text = md_table(headers, rows)
    notes = [f"- **{name}**: {w}" for name, ev in evals.items() for w in ev.get("warnings", [])]
    legend = (
        "_worst_ = per-sample worst case over the CE and CW losses (a sample counts as broken if either attack "
        f"breaks it); † = CE accuracy exceeds CW by more than {GAP_THRESHOLD} under an iterative attack "
        "(gradient masking suspected)."
    )
    return "\n\n".join([text, legend, *(["Warnings:\n" + "\n".join(notes)] if notes else [])])


def _num(v: Any, digits: int) -> str:
    return fmt(v, digits) if v is not None else "–"


def plot_robustness_curves(evals: Mapping[str, Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Accuracy vs eps, one panel per attacked target (each modality alone, all jointly), one colour
    per run; solid = worst case over losses, dashed = CE, dotted = CW. ``evals`` maps a run name to
    the result of the ``curves`` suite."""
    first = next(iter(evals.values()))["curves"]
    targets = list(first["targets"])
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"worst": "-", "ce": "--", "cw": ":"}
    for ci, (name, ev) in enumerate(evals.items()):
        cur = ev["curves"]
        xs = [0.0, *cur["eps"]] if 0.0 not in cur["eps"] else list(cur["eps"])
        for ax, target in zip(axes[0], targets, strict=True):
            series = cur["targets"].get(target, {})
            for loss, ys in series.items():
                vals = [cur["clean_accuracy"], *ys] if len(xs) == len(ys) + 1 else ys
                label = f"{name} {loss}" if len(evals) > 1 else loss
                ax.plot(xs, vals, styles.get(loss, "-."), color=colors[ci % len(colors)], marker="o", ms=3, label=label,
                        lw=2 if loss == "worst" else 1)  # fmt: skip
    for ax, target in zip(axes[0], targets, strict=True):
        kind = "joint" if "+" in target else "alone"
        ax.set(xlabel=f"eps ({first['norm']})", ylabel="accuracy", ylim=(-0.02, 1.02), title=f"{target} ({kind})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"Robustness curves ({first['attack']}, worst case over losses = solid)")
    return save_figure(fig, path)


def plot_setting_bars(result: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Accuracy per threat setting of one evaluation: CE, CW and worst-case bars side by side."""
    entries = pivot(result)
    labels = ["clean", *[e["label"] for e in entries]]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(labels)), 4.0))
    width = 0.27
    for i, loss in enumerate(("ce", "cw", "worst")):
        vals = [result["clean_accuracy"]] + [e["acc"].get(loss, float("nan")) for e in entries]
        ax.bar(
            [x + (i - 1) * width for x in range(len(labels))],
            vals,
            width,
            label=loss.upper() if loss != "worst" else loss,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=title or f"{result.get('suite', '')} suite: accuracy per setting")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
