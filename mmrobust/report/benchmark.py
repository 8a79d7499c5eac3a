"""Comparison tables on screen and on disk: markdown, CSV, one PNG per table, ``benchmark.json``."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from mmrobust.benchmark import BenchmarkResult
from mmrobust.eval.compare import ComparisonTable, Stat
from mmrobust.eval.robust import GAP_THRESHOLD
from mmrobust.io import atomic_write_bytes, write_json
from mmrobust.report.console import out
from mmrobust.report.markdown import md_table
from mmrobust.report.paper import plot_certified_curves, spread, table_latex, tidy_csv
from mmrobust.report.plots import plt, save_figure

LEGEND = (
    "Cells: mean ± sample standard deviation over seeds. _worst_ = per-sample worst case over the CE and CW "
    "attack losses (a sample counts as broken if either loss breaks it): the number to trust; CE and CW are "
    "each shown beside it. _paper protocol_ = the CRMT paper's CE-only l2-PGD (4 steps of eps/3, no random "
    f"start), shown for comparison only. † = CE accuracy above CW by more than {GAP_THRESHOLD} under an "
    "iterative attack for some seed (gradient masking suspected)."
)


def cell_text(s: Stat | None, digits: int = 3) -> str:
    """``0.812 ± 0.010`` (``0.812`` for one seed or identical values; ``–`` where there is no number)."""
    if s is None:
        return "–"
    sd = spread(s)
    return f"{s.mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def table_markdown(table: ComparisonTable, digits: int = 3, transposed: bool = False) -> str:
    """The table as markdown: one row per method (the paper's layout), or with ``transposed`` one
    row per column and one column per method (narrower when there are many settings)."""

    def text(method: str, i: int) -> str:
        return cell_text(table.rows[method][i], digits) + (" †" if i in table.masked.get(method, ()) else "")

    if transposed:
        headers = ["", *table.rows]
        rows = [[c.header, *[text(m, i) for m in table.rows]] for i, c in enumerate(table.columns)]
    else:
        headers = ["method", *[c.header for c in table.columns]]
        rows = [[m, *[text(m, i) for i in range(len(table.columns))]] for m in table.rows]
    parts = [f"### {table.title} — {table.dataset}", md_table(headers, rows)]
    return "\n\n".join(parts + [f"_{n}_" for n in table.notes])


def table_csv(table: ComparisonTable) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", *[f"{c.header} {part}" for c in table.columns for part in ("mean", "std")], "n"])
    for m, stats in table.rows.items():
        cells: list[object] = []
        for s in stats:
            cells += [round(s.mean, 6), None if s.std is None else round(s.std, 6)] if s else ["", ""]
        cells.append(max((s.n for s in stats if s), default=0))
        w.writerow([m, *["" if v is None else v for v in cells]])
    return buf.getvalue()


def plot_table(table: ComparisonTable, path: str | Path) -> Path:
    """Bars per accuracy column (clean, worst-case, paper protocol, plain accuracies; the CE/CW columns
    and non-accuracies such as times are left to the table) and method, std as error bars."""
    idx = [
        i
        for i, c in enumerate(table.columns)
        if c.kind in ("worst", "paper", "value") and c.unit == "accuracy" and not c.setting.startswith("certified")
    ]  # certified accuracy is a curve over the radius (plot_certified_curves), not bars
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(idx) * max(1, len(table.rows)) / 1.5), 4.2))
    width = 0.8 / max(1, len(table.rows))
    for j, (method, stats) in enumerate(table.rows.items()):
        xs = [g + j * width - 0.4 + width / 2 for g in range(len(idx))]
        cells = [stats[i] for i in idx]
        means = [s.mean if s else float("nan") for s in cells]
        errs = [(s.std or 0.0) if s else 0.0 for s in cells]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=method)
    ax.set_xticks(range(len(idx)), [table.columns[i].header for i in idx], rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title=f"{table.title} — {table.dataset}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_benchmark(out_dir: str | Path, result: BenchmarkResult) -> list[Path]:
    """Write ``tables/<dataset>_<table>.{md,csv,tex,png}``, ``tables/<dataset>_certified.png`` (with a
    certifier), ``tables/tables.tex`` and ``tables/README.md`` (all tables), ``results.csv`` (every
    number, one per row) and ``benchmark.json`` under ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    sections = ["# Benchmark", LEGEND]
    latex = []
    for t in result.tables():
        stem = out_dir / "tables" / f"{Path(t.dataset).name}_{t.name}"
        md, tex = table_markdown(t), table_latex(t)
        atomic_write_bytes(stem.with_suffix(".md"), (md + "\n").encode())
        atomic_write_bytes(stem.with_suffix(".csv"), table_csv(t).encode())
        atomic_write_bytes(stem.with_suffix(".tex"), tex.encode())
        latex.append(tex)
        written += [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".tex")]
        written.append(plot_table(t, stem.with_suffix(".png")))
        sections += [md, f"![{t.title}]({stem.name}.png)"]
    for d in result.config.data:
        curves = plot_certified_curves(result, d, out_dir / "tables" / f"{Path(d).name}_certified.png")
        if curves is not None:
            written.append(curves)
            sections.append(f"![certified accuracy — {Path(d).name}]({curves.name})")
    all_tex = out_dir / "tables" / "tables.tex"
    header = "% paper-ready tables of one mmrobust benchmark; needs \\usepackage{booktabs}\n"
    atomic_write_bytes(all_tex, (header + "\n".join(latex)).encode())
    atomic_write_bytes(out_dir / "results.csv", tidy_csv(result).encode())
    written += [all_tex, out_dir / "results.csv"]
    warnings = [f"{c.cell.label}: {w}" for c in result.cells for w in c.evaluation.warnings]
    if warnings:
        sections += ["## Warnings", "\n".join(f"* {w}" for w in warnings)]
    readme = out_dir / "tables" / "README.md"
    atomic_write_bytes(readme, ("\n\n".join(sections) + "\n").encode())
    write_json(out_dir / "benchmark.json", result.to_json())
    return [*written, readme, out_dir / "benchmark.json"]


def print_tables(tables: Sequence[ComparisonTable]) -> None:
    """The tables on the terminal, transposed (one row per column, one column per method) to fit."""
    from rich.table import Table

    for t in tables:
        table = Table(title=f"{t.title} — {t.dataset}")
        table.add_column("")
        for m in t.rows:
            table.add_column(m, justify="right", no_wrap=True)
        for i, c in enumerate(t.columns):
            table.add_row(c.header, *[cell_text(stats[i]) for stats in t.rows.values()])
        out.print(table)
        for n in t.notes:
            out.print(n, style="dim", markup=False)
