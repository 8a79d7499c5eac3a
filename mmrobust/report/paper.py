"""Paper-ready benchmark output: LaTeX tables (booktabs), a tidy long CSV, certified-accuracy curves.

* :func:`table_latex`: one ``table`` environment per comparison table, columns grouped under their
  threat setting (a ``\\multicolumn`` header with a ``\\cmidrule`` under it, the losses beneath),
  the best value of each column in bold (the highest accuracy; the lowest time), ``mean ± std``
  over seeds and no ``±`` where there is nothing to spread (one seed, or identical values).
  Needs ``\\usepackage{booktabs}`` only.
* :func:`tidy_rows` / :func:`tidy_csv`: one row per (dataset, method, seed, setting, loss, metric) with
  the value: the form pandas, R and plotting tools want.
* :func:`plot_certified_curves`: certified accuracy against the radius, one line per method
  (mean over seeds, the band one standard deviation wide).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmrobust.benchmark import BenchmarkResult, CellResult
from mmrobust.eval.compare import ComparisonTable, Stat
from mmrobust.report.plots import plt, save_figure

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def spread(s: Stat) -> float | None:
    """The standard deviation worth printing: None for one seed or identical values."""
    return s.std if s.std is not None and s.std > 0 else None


def _best(table: ComparisonTable, i: int) -> float | None:
    """The best mean of column ``i`` over the methods (highest accuracy, lowest time)."""
    means = [s.mean for s in (stats[i] for stats in table.rows.values()) if s is not None]
    if len(means) < 2:
        return None  # nothing to compare
    return min(means) if table.columns[i].unit == "s" else max(means)


def _groups(table: ComparisonTable) -> list[tuple[str, list[int]]]:
    """Consecutive columns of one threat setting: ``[(setting, [column indexes]), ...]``."""
    out: list[tuple[str, list[int]]] = []
    for i, c in enumerate(table.columns):
        if out and out[-1][0] == c.setting and c.kind != "value":
            out[-1][1].append(i)
        else:
            out.append((c.setting, [i]))
    return out


def _sub_header(table: ComparisonTable, i: int) -> str:
    c = table.columns[i]
    if c.kind == "worst":
        return "worst" if c.setting != "clean" else ""
    if c.kind == "paper":
        return "paper (CE)"
    if c.kind == "value":
        return f"({c.unit})" if c.unit not in ("accuracy", "") else ""
    return c.kind.upper()


def table_latex(table: ComparisonTable, digits: int = 3) -> str:
    """The table as a LaTeX ``table`` with booktabs rules (see the module docstring)."""
    ncols = len(table.columns)
    groups = _groups(table)
    two_rows = any(len(cols) > 1 for _, cols in groups)
    best = [_best(table, i) for i in range(ncols)]
    tol = 0.5 * 10**-digits

    def cell(method: str, i: int) -> str:
        s = table.rows[method][i]
        if s is None:
            return "--"
        text = f"{s.mean:.{digits}f}"
        sd = spread(s)
        if sd is not None:
            text += f" $\\pm$ {sd:.{digits}f}"
        top = best[i]
        if top is not None and abs(s.mean - top) < tol:
            text = f"\\textbf{{{text}}}"
        if i in table.masked.get(method, ()):
            text += "$^\\dagger$"
        return text

    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\caption{{{latex_escape(table.title)} --- {latex_escape(Path(table.dataset).name)}}}",
        f"\\label{{tab:{latex_escape(Path(table.dataset).name)}-{table.name}}}".replace("\\_", "-"),
        f"\\begin{{tabular}}{{l{'r' * ncols}}}",
        "\\toprule",
    ]
    if two_rows:
        top, rules = ["method"], []
        for setting, cols in groups:
            first = cols[0] + 2  # column 1 is the method
            if len(cols) > 1:
                top.append(f"\\multicolumn{{{len(cols)}}}{{c}}{{{latex_escape(setting)}}}")
                rules.append(f"\\cmidrule(lr){{{first}-{first + len(cols) - 1}}}")
            else:
                top.append(latex_escape(setting))
        lines.append(" & ".join(top) + " \\\\")
        lines.append(" ".join(rules))
        lines.append(" & ".join(["", *[latex_escape(_sub_header(table, i)) for i in range(ncols)]]) + " \\\\")
    else:
        lines.append(" & ".join(["method", *[latex_escape(c.header) for c in table.columns]]) + " \\\\")
    lines.append("\\midrule")
    for method in table.rows:
        lines.append(" & ".join([latex_escape(method), *[cell(method, i) for i in range(ncols)]]) + " \\\\")
    lines.append("\\bottomrule")
    lines.append("\\end{tabular}")
    notes = [latex_escape(n) for n in table.notes]
    notes.append(
        "Bold: best in column. Mean $\\pm$ sample std over seeds ($\\pm$ omitted for one seed or identical values)."
    )
    if any(table.masked.values()):
        notes.append("$^\\dagger$: CE accuracy above CW accuracy (gradient masking suspected).")
    lines.append("\\par\\smallskip\\footnotesize " + " \\quad ".join(notes))
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


#: the columns of the tidy CSV, in order
TIDY_FIELDS = (
    "dataset", "method", "seed", "source", "setting", "attack", "norm", "modalities", "budget", "eps", "steps",
    "loss", "metric", "value", "unit",
)  # fmt: skip


def _eps_text(eps: Any) -> str:
    if isinstance(eps, dict):
        return ";".join(f"{k}={v:g}" for k, v in sorted(eps.items()))
    return "" if eps is None else f"{eps:g}"


def _cell_rows(c: CellResult) -> Iterator[dict[str, Any]]:
    base = {"dataset": c.cell.dataset, "method": c.cell.method, "seed": c.cell.seed}
    for metric, unit in (("val_accuracy", "accuracy"), ("test_accuracy", "accuracy"), ("train_time_s", "s")):
        value = c.metrics.get(metric)
        if value is not None:
            yield {**base, "source": "training", "setting": "training", "metric": metric, "value": value, "unit": unit}
    for source, evaluation in (("evaluation", c.evaluation), ("paper_attack", c.paper_attack)):
        if evaluation is None:
            continue
        yield {**base, "source": source, "setting": "clean", "metric": "accuracy",
               "value": evaluation.clean_accuracy, "unit": "accuracy"}  # fmt: skip
        for row in evaluation.rows:
            yield {
                **base, "source": source, "setting": row.label, "attack": row.attack, "norm": row.norm or "",
                "modalities": "+".join(row.modalities), "budget": row.budget or "", "eps": _eps_text(row.eps),
                "steps": "" if row.steps is None else row.steps, "loss": row.loss or "", "metric": "accuracy",
                "value": row.accuracy, "unit": "accuracy",
            }  # fmt: skip
    cert = c.certificate
    if cert is not None:
        label = cert.certifier + (f" (alpha={cert.alpha:g})" if cert.alpha is not None else "")
        for r, acc in zip(cert.radii, cert.joint, strict=True):
            yield {**base, "source": "certificate", "setting": f"{label} joint r={r:g}", "attack": cert.certifier,
                   "norm": "l2", "modalities": "joint", "eps": f"{r:g}", "metric": f"certified_accuracy ({cert.guarantee})",
                   "value": acc, "unit": "accuracy"}  # fmt: skip


def tidy_rows(result: BenchmarkResult) -> list[dict[str, Any]]:
    """Every number of the benchmark as one row per (dataset, method, seed, setting, loss, metric)."""
    return [{f: row.get(f, "") for f in TIDY_FIELDS} for c in result.cells for row in _cell_rows(c)]


def tidy_csv(result: BenchmarkResult) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=TIDY_FIELDS, lineterminator="\n")
    w.writeheader()
    for row in tidy_rows(result):
        w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def certified_curves(result: BenchmarkResult, dataset: str) -> dict[str, tuple[list[float], list[Stat]]]:
    """``{method: (radii, [Stat of certified accuracy at each radius])}`` over the seeds of ``dataset``."""
    out: dict[str, tuple[list[float], list[Stat]]] = {}
    for method in result.config.methods:
        certs = [c.certificate for c in result.cells
                 if c.cell.dataset == dataset and c.cell.method == method and c.certificate]  # fmt: skip
        if not certs:
            continue
        radii = certs[0].radii
        out[method] = (list(radii), [Stat(tuple(c.joint[i] for c in certs)) for i in range(len(radii))])
    return out


def plot_certified_curves(result: BenchmarkResult, dataset: str, path: str | Path) -> Path | None:
    """Certified accuracy vs joint l2 radius per method (None when no cell was certified)."""
    curves = certified_curves(result, dataset)
    if not curves:
        return None
    cert = next(c.certificate for c in result.cells if c.certificate)
    kind = f"{cert.certifier}, {cert.guarantee}" + (f", alpha={cert.alpha:g}" if cert.alpha is not None else "")
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for method, (radii, stats) in curves.items():
        means = [s.mean for s in stats]
        sds = [spread(s) or 0.0 for s in stats]
        (line,) = ax.plot(radii, means, marker="o", markersize=3, label=method)
        if any(sds):
            lo = [max(0.0, m - s) for m, s in zip(means, sds, strict=True)]
            hi = [min(1.0, m + s) for m, s in zip(means, sds, strict=True)]
            ax.fill_between(radii, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set(xlabel="joint l2 radius (standardised input units)", ylabel="certified accuracy", ylim=(0, 1.02),
           title=f"Certified accuracy ({kind}) — {Path(dataset).name}")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
