"""benchmarks/certified_routes.py: every route runs end to end on a tiny model (the grid itself is
the benchmark's job, not the test suite's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("certified_routes", ROOT / "benchmarks" / "certified_routes.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("route", ["standard", "certified", "lipschitz", "smoothing"])
def test_each_route_runs_on_a_tiny_model(route, tmp_path):
    bench = _bench()
    data = [f"synthetic:{k}={v}" for k, v in TINY.items()]
    argv = ["--quick", "--alpha", "--epochs", "1", "--samples", "8", "--tightness", "4", "--soundness", "4",
            "--alpha-iterations", "3", "--smoothing-n", "40", "--smoothing-n0", "10", "--attack-steps", "3"]  # fmt: skip
    for d in data:
        argv += ["--data-opt", d]
    args = bench.parse(argv)
    entry = bench.one_run("synthetic", route, bench.routes(args)[route], 0, args, tmp_path)
    if "skipped" in entry:  # only a method option this version lacks may skip a route
        assert route == "certified" and entry["skipped"].startswith("skipped: option not available")
        assert "certified" in entry["skipped"]
        return
    certs = entry["certifiers"]
    expected = {"smoothing": {"smoothing"}}.get(route, {"crown", "alpha-crown"})
    assert set(certs) == expected and 0 <= entry["clean_accuracy"] <= 1
    assert set(entry["attack_accuracy"]) == {"0.5", "1", "2"} and entry["train_seconds"] > 0
    for name, c in certs.items():
        assert set(c["certified_accuracy"]) == {"0.5", "1.0", "2.0"}
        assert c["violations"] == 0 and c["soundness_violations"] == 0
        assert (c["guarantee"] == "probabilistic") == (name == "smoothing")
        assert (c["alpha"] is not None) == (name == "smoothing")
    if "alpha-crown" in certs:  # never below plain CROWN
        assert (
            certs["alpha-crown"]["tightening"]["median_ratio"] in (None,)
            or certs["alpha-crown"]["tightening"]["median_ratio"] >= 1.0
        )
    doc = {"grid": args.grid, "summary": bench.aggregate([entry], args.grid)}
    headers, rows = bench.table_rows(doc)
    assert len(rows) == len(certs) and all(len(r) == len(headers) for r in rows)
