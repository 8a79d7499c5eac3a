"""Paper-ready benchmark output, checked on the text itself (no LaTeX install assumed)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from mmrobust.eval.compare import Column, ComparisonTable, Stat
from mmrobust.report.benchmark import cell_text
from mmrobust.report.paper import TIDY_FIELDS, latex_escape, table_latex


def _table() -> ComparisonTable:
    cols = [
        Column("clean", "worst"),
        Column("pgd-l2 a+v eps 0.5", "worst", ("k",)),
        Column("pgd-l2 a+v eps 0.5", "ce", ("k",)),
        Column("pgd-l2 a+v eps 0.5", "cw", ("k",)),
        Column("train time (s)", "value", unit="s"),
    ]
    rows = {
        "jt": [Stat((0.9, 0.8)), Stat((0.5, 0.5)), Stat((0.7, 0.6)), Stat((0.55,)), Stat((10.0, 12.0))],
        "crmt_jt": [Stat((0.95, 0.85)), Stat((0.6, 0.4)), Stat((0.6, 0.6)), None, Stat((20.0, 22.0))],
    }
    return ComparisonTable("multimodal", "Attacks 100% joint", "data/my_set", cols, rows, ["recipe: tuned"],
                           masked={"jt": {1}})  # fmt: skip


def test_latex_has_booktabs_grouped_headers_and_escapes() -> None:
    tex = table_latex(_table())
    lines = tex.splitlines()
    assert lines[0] == "\\begin{table}[t]" and lines[-1] == "\\end{table}"
    assert "\\begin{tabular}{lrrrrr}" in tex
    assert [line for line in lines if line in ("\\toprule", "\\midrule", "\\bottomrule")] == [
        "\\toprule", "\\midrule", "\\bottomrule",
    ]  # fmt: skip
    header = lines[lines.index("\\toprule") + 1]
    assert header == "method & clean & \\multicolumn{3}{c}{pgd-l2 a+v eps 0.5} & train time (s) \\\\"
    assert lines[lines.index("\\toprule") + 2] == "\\cmidrule(lr){3-5}"
    assert lines[lines.index("\\toprule") + 3] == " &  & worst & CE & CW & (s) \\\\"
    assert "Attacks 100\\% joint" in tex and "crmt\\_jt &" in tex and "my\\_set" in tex


def test_latex_marks_the_best_of_each_column_and_skips_empty_spread() -> None:
    rows = {line.split(" & ")[0]: line.split(" & ")[1:] for line in table_latex(_table()).splitlines()
            if line.startswith(("jt &", "crmt\\_jt &"))}  # fmt: skip
    jt, crmt = rows["jt"], rows["crmt\\_jt"]
    assert crmt[0] == "\\textbf{0.900 $\\pm$ 0.071}" and jt[0] == "0.850 $\\pm$ 0.071"  # highest accuracy
    assert jt[1] == "\\textbf{0.500}$^\\dagger$" and crmt[1] == "\\textbf{0.500 $\\pm$ 0.141}"  # a tie: both
    assert jt[2] == "\\textbf{0.650 $\\pm$ 0.071}" and crmt[2] == "0.600"  # identical seeds: no spread
    assert jt[3] == "0.550" and crmt[3] == "--"  # one seed: no spread; a lone value is not "best"
    assert jt[4].startswith("\\textbf{11.000") and not crmt[4].startswith("\\textbf")  # time: lowest is best


def test_markdown_cells_drop_spread_for_one_seed_or_identical_values() -> None:
    assert cell_text(Stat((0.5, 0.5, 0.5))) == "0.500"
    assert cell_text(Stat((0.5,))) == "0.500"
    assert cell_text(Stat((0.4, 0.6))) == "0.500 ± 0.141"


def test_latex_escape() -> None:
    assert latex_escape("a_b & 50% #1 {x} ~^\\") == (
        "a\\_b \\& 50\\% \\#1 \\{x\\} \\textasciitilde{}\\textasciicircum{}\\textbackslash{}"
    )


@pytest.mark.slow
def test_a_real_benchmark_writes_latex_tidy_csv_and_certified_curves(tmp_path: Path) -> None:
    from mmrobust.benchmark import BenchmarkConfig, run_benchmark
    from mmrobust.report.benchmark import write_benchmark

    tiny = {"n_train": 96, "n_val": 32, "n_test": 32}
    cfg = BenchmarkConfig(data=["synthetic"], methods=["jt", "ojt"], seeds=2, epochs=1, samples=16, feature_dim=16,
                          batch_size=32, data_options={"synthetic": tiny}, certify="sound")  # fmt: skip
    result = run_benchmark(cfg, tmp_path / "b")
    paths = write_benchmark(tmp_path / "b", result)
    tables = tmp_path / "b" / "tables"
    assert tables / "tables.tex" in paths and (tables / "synthetic_multimodal.tex").is_file()
    tex = (tables / "tables.tex").read_text()
    assert tex.count("\\begin{table}") == len(result.tables()) and "\\textbf{" in tex
    curves = tables / "synthetic_certified.png"
    assert curves in paths and curves.stat().st_size > 1000

    rows = list(csv.DictReader(io.StringIO((tmp_path / "b" / "results.csv").read_text())))
    assert tuple(rows[0]) == TIDY_FIELDS
    # one row per (method, seed, setting, loss, metric): every cell of the grid is there, nothing twice
    keys = [(r["method"], r["seed"], r["source"], r["setting"], r["loss"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {(r["method"], r["seed"]) for r in rows} == {("jt", "0"), ("jt", "1"), ("ojt", "0"), ("ojt", "1")}
    # the numbers are the result's own
    cell = result.cells[0]
    mine = [r for r in rows if (r["method"], r["seed"]) == (cell.cell.method, str(cell.cell.seed))]
    for row in cell.evaluation.rows:
        got = next(r for r in mine if r["source"] == "evaluation" and r["setting"] == row.label
                   and r["loss"] == (row.loss or ""))  # fmt: skip
        assert float(got["value"]) == pytest.approx(row.accuracy, abs=1e-6)
    cert = [r for r in mine if r["source"] == "certificate"]
    assert len(cert) == len(cell.certificate.radii) and all(r["metric"] == "certified_accuracy (sound)" for r in cert)
