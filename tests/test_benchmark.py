"""``mmrobust benchmark``: mean ± std tables, resume, refusal of changed settings, a silent core."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from rich.console import Console

import mmrobust.benchmark as bench
from mmrobust.benchmark import BenchmarkConfig, plan_benchmark, run_benchmark
from mmrobust.cli import main
from mmrobust.errors import ConfigError
from mmrobust.eval.compare import comparison_tables
from mmrobust.eval.results import EvalResult, EvalRow, MaskingReport
from mmrobust.report.benchmark import cell_text, table_csv, table_markdown
from tests.conftest import TINY

MODS = ("a", "v")


def _row(attack, loss, mods, acc, eps=0.5, steps=10):
    return EvalRow(attack, loss, "l2" if attack != "missing" else None, mods, "joint" if eps else None, eps,
                   steps if attack != "missing" else None, acc, acc, fill="zero" if attack == "missing" else None)  # fmt: skip


def _result(clean, joint_ce, joint_cw, uni_a, missing_v, suite="paper"):
    rows = [
        _row("pgd-l2", "ce", MODS, joint_ce),
        _row("pgd-l2", "cw", MODS, joint_cw),
        _row("pgd-l2", "worst", MODS, min(joint_ce, joint_cw) - 0.01),  # per-sample worst: below both
        _row("pgd-l2", "ce", ("a",), uni_a, eps=1.0),
        _row("missing", None, ("v",), missing_v, eps=None),
    ]
    return EvalResult(suite, "test", clean, clean, rows, MaskingReport(False, None, [], 0.05, 0.05), [], {})


def test_tables_are_mean_and_sample_std_over_seeds():
    evals = {
        "jt": [_result(0.9, 0.5, 0.4, 0.3, 0.2), _result(0.7, 0.7, 0.6, 0.5, 0.4), _result(0.8, 0.6, 0.5, 0.4, 0.3)],
        "crmt-jt": [_result(0.95, 0.8, 0.7, 0.6, 0.6)],
    }
    paper = {"jt": [_result(0.9, 0.55, 0.0, 0.0, 0.0)], "crmt-jt": [_result(0.9, 0.85, 0.0, 0.0, 0.0)]}
    multi, uni = comparison_tables("toy", evals, paper, notes=["recipe: tuned"])
    assert multi.name == "multimodal" and uni.name == "unimodal"
    headers = [c.header for c in multi.columns]
    assert headers == ["clean", "pgd-l2 a+v eps 0.5 worst", "pgd-l2 a+v eps 0.5 CE", "pgd-l2 a+v eps 0.5 CW",
                       "pgd-l2 a+v eps 0.5 paper protocol (CE)"]  # fmt: skip
    clean, worst, ce, cw, pp = multi.rows["jt"]
    assert clean.mean == pytest.approx(0.8) and clean.std == pytest.approx(0.1)  # sample std of 0.9, 0.7, 0.8
    assert worst.values == pytest.approx((0.39, 0.59, 0.49)) and worst.std == pytest.approx(0.1)
    assert ce.mean == pytest.approx(0.6) and cw.mean == pytest.approx(0.5)
    assert pp.mean == pytest.approx(0.55) and pp.n == 1  # from the paper-protocol evaluation, not the strong one
    one = multi.rows["crmt-jt"][0]
    assert one.n == 1 and one.std is None and cell_text(one) == "0.950"
    assert cell_text(clean) == "0.800 ± 0.100"
    # uni-modal table: the single-modality attack and the missing modality, no clean column
    assert [c.header for c in uni.columns] == ["pgd-l2 a eps 1 worst", "pgd-l2 a eps 1 CE", "v missing",
                                               "pgd-l2 a eps 1 paper protocol (CE)"]  # fmt: skip
    assert uni.rows["jt"][2].mean == pytest.approx(0.3)
    md = table_markdown(multi)
    # CE above CW by 0.1 under 10-step PGD: the worst-case cell is flagged for gradient masking
    assert multi.masked["jt"] == {1} and uni.masked["jt"] == set()
    assert "| jt | 0.800 ± 0.100 | 0.490 ± 0.100 † | 0.600 ± 0.100 |" in md and "_recipe: tuned_" in md
    csv_lines = table_csv(multi).splitlines()
    assert csv_lines[0].startswith("method,clean mean,clean std,") and csv_lines[0].endswith(",n")
    assert csv_lines[1].startswith("jt,0.8") and csv_lines[1].endswith(",3")


def _cfg(**kw):
    base = dict(data=["synthetic"], methods=["jt", "ojt"], seeds=2, epochs=1, samples=30, feature_dim=16,
                batch_size=32, data_options={"synthetic": dict(TINY)})  # fmt: skip
    return BenchmarkConfig(**{**base, **kw})


@pytest.fixture
def counted(monkeypatch):
    """Count trainings; silence the training log (the engine's epoch lines are not the benchmark core's)."""
    calls = []
    real = bench.train

    def train(cfg, out=None, bundle=None, **kw):
        calls.append((cfg.train.method, cfg.train.seed))
        if kw.get("resume"):
            calls.append("resumed")
        return real(cfg, out=out, bundle=bundle, **kw)

    monkeypatch.setattr(bench, "train", train)
    monkeypatch.setattr("mmrobust.training.engine.console", Console(file=io.StringIO()), raising=False)
    return calls


def _files(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_resume_skips_finished_cells_and_redoes_incomplete_ones(tmp_path, counted, capfd, monkeypatch):
    out = tmp_path / "bench"
    monkeypatch.chdir(tmp_path)
    first = run_benchmark(_cfg(), out)
    assert len(counted) == 4 and first.resumed == 0
    # the core printed nothing and wrote only under out
    assert capfd.readouterr() == ("", "")
    assert {p.parts[0] for p in _files(tmp_path)} == {"bench"}
    cell = out / "runs" / "synthetic" / "ojt" / "seed1"
    assert {"cell.json", "model.safetensors", "eval_paper.json", "metrics.json"} <= {p.name for p in cell.iterdir()}

    counted.clear()
    again = run_benchmark(_cfg(), out)
    assert counted == [] and again.resumed == 4
    assert [c.to_json()["evaluation"] for c in again.cells] == [c.to_json()["evaluation"] for c in first.cells]

    # an incomplete cell (a file cut short) and an interrupted one (no manifest) are redone, nothing else
    (out / "runs/synthetic/jt/seed0/eval_paper.json").write_text('{"suite": "pap')
    (out / "runs/synthetic/ojt/seed1/cell.json").unlink()
    third = run_benchmark(_cfg(), out)
    assert sorted(counted) == [("jt", 0), ("ojt", 1)] and third.resumed == 2

    # a longer grid (one more seed) reuses the finished cells
    counted.clear()
    run_benchmark(_cfg(seeds=3), out)
    assert sorted(counted) == [("jt", 2), ("ojt", 2)]

    # a cell killed during training continues from its epoch checkpoint (as `train --resume` does)
    import mmrobust.training.checkpoint as checkpoint

    real_save = checkpoint.save_checkpoint

    def save_then_stop(folder, state):
        real_save(folder, state)
        raise KeyboardInterrupt

    shutil.rmtree(out / "runs/synthetic/jt/seed1")
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(_cfg(seeds=3), out)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    counted.clear()
    run_benchmark(_cfg(seeds=3), out)
    assert counted == [("jt", 1), "resumed"]


@pytest.mark.slow
def test_changed_settings_are_refused_unless_forced(tmp_path, counted, capsys):
    out = tmp_path / "bench"
    run_benchmark(_cfg(methods=["jt"], seeds=1), out)
    with pytest.raises(ConfigError, match=r"1 finished cell\(s\) were run with other settings \(changed: epochs, "
                                          r"recipe\); pass force=True"):  # fmt: skip
        run_benchmark(_cfg(methods=["jt"], seeds=1, epochs=2, recipe="paper"), out)
    assert plan_benchmark(_cfg(methods=["jt"], seeds=1, epochs=2), out).invalidated
    counted.clear()
    forced = run_benchmark(_cfg(methods=["jt"], seeds=1, epochs=2, recipe="paper"), out, force=True)
    assert counted == [("jt", 0)] and forced.cells[0].metrics["epochs"] == 2
    saved = json.loads((out / "runs/synthetic/jt/seed0/config.json").read_text())["train"]["optim"]
    assert (saved["recipe"], saved["name"], saved["schedule"]) == ("paper", "sgd", "step")
    # the CLI turns the refusal into one line
    argv = ["benchmark", "--data", "synthetic", "--methods", "jt", "--seeds", "1", "--epochs", "1", "--out", str(out),
            "--feature-dim", "16", "--samples", "30", *[f"--data-opt={k}={v}" for k, v in TINY.items()]]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"methods": ["jt", "nosuch"]}, "unknown training method 'nosuch'"),
        ({"data": ["nosuch"]}, "unknown dataset 'nosuch'"),
        ({"seeds": 0}, "'seeds' must be an integer >= 1"),
        ({"suite": "basic"}, "'suite': unknown value 'basic'; choose from: paper, curves, autoattack"),
        ({"recipe": "fast"}, "'recipe': unknown value 'fast'; choose from: tuned, paper"),
        ({"certify": "guess"}, "unknown certifier 'guess'"),
        ({"eps": "abc"}, "not a number"),
        ({"method_options": {"jt": {"rho": "2"}}}, "method 'jt': unknown option(s) ['rho']"),
        ({"method_options": {"crmt-jt": {}}}, "names ['crmt-jt'], which are not in the grid"),
    ],
)
def test_bad_settings_fail_before_any_training(kw, needle):
    with pytest.raises(ConfigError) as exc:
        _cfg(**kw)
    assert needle in str(exc.value)


def test_bad_data_option_fails_before_training(tmp_path, counted):
    bad = _cfg(data_options={"synthetic": {**TINY, "classes": "1"}})
    with pytest.raises(ConfigError):
        run_benchmark(bad, tmp_path / "b")
    assert counted == [] and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_writes_tables_plots_and_json(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["benchmark", "--data", "synthetic", "--methods", "jt", "--seeds", "2", "--epochs", "1", "--out", str(out),
            "--feature-dim", "16", "--samples", "30", "--protocol", "paper", "--certify", "sound", "--no-progress",
            *[f"--data-opt={k}={v}" for k, v in TINY.items()]]  # fmt: skip
    assert main(argv) == 0
    names = {p.name for p in (out / "tables").iterdir()}
    for t in ("multimodal", "unimodal", "summary"):
        assert {f"synthetic_{t}.md", f"synthetic_{t}.csv", f"synthetic_{t}.png"} <= names
        assert (out / "tables" / f"synthetic_{t}.png").stat().st_size > 1000
    doc = json.loads((out / "benchmark.json").read_text())
    assert len(doc["cells"]) == 2 and doc["config"]["protocol"] == "paper"
    multi = next(t for t in doc["tables"] if t["name"] == "multimodal")
    assert any("paper protocol" in c for c in multi["columns"])
    assert json.loads((out / "settings.json").read_text())["methods"] == ["jt"]
    summary = (out / "tables" / "synthetic_summary.md").read_text()
    assert "certified r=0.1 (sound: sound)" in summary
    assert "jt" in capsys.readouterr().out


@pytest.mark.slow
def test_method_variants_train_the_base_method_with_their_own_options(tmp_path, counted):
    cfg = _cfg(methods=["gaussian@s0.1", "gaussian@s2"], seeds=1,
               method_options={"gaussian@s0.1": {"sigma": 0.1}, "gaussian@s2": {"sigma": 2.0}})  # fmt: skip
    result = run_benchmark(cfg, tmp_path / "b")
    assert counted == [("gaussian", 0), ("gaussian", 0)]
    saved = {
        label: json.loads((tmp_path / f"b/runs/synthetic/{label}/seed0/config.json").read_text())["train"]
        for label in cfg.methods
    }
    assert {k: (v["method"], v["method_options"]["sigma"]) for k, v in saved.items()} == {
        "gaussian@s0.1": ("gaussian", 0.1), "gaussian@s2": ("gaussian", 2.0)}  # fmt: skip
    summary = [t for t in result.tables() if t.name == "summary"][0]
    assert list(summary.rows) == cfg.methods


@pytest.mark.parametrize("label", ["nosuch@x", "gaussian@bad/tag"])
def test_bad_method_variant_is_refused(label):
    with pytest.raises(ConfigError, match="nosuch|tag after '@'"):
        _cfg(methods=[label])
