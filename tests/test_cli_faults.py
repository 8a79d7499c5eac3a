"""Fault catalogue of every subcommand: exit code 2, one line naming the problem, no traceback,
and the file system left exactly as it was."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from mmrobust.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture()
def workspace(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_run, incomplete)
    (incomplete / "manifest.json").unlink()
    return tmp_path


CASES = [
    (["train", "--data", "synthetic", "--lr", "nan", "--out", "{tmp}/new"], "--lr: expected a finite number"),
    (["train", "--data", "synthetic", "--weight-decay", "-5", "--out", "{tmp}/new"], "'train.optim.weight_decay'"),
    (
        ["train", "--data", "synthetic", "--seed", str(2**64), "--out", "{tmp}/new"],
        "--seed must be an integer in [0, 4294967295]",
    ),
    (["train", "--data", "synthetic", "--feature-dim", str(10**9), "--out", "{tmp}/new"], "'model.feature_dim'"),
    (["train", "--data", "synthetic", "--optimizer", "lbfgs", "--out", "{tmp}/new"], "invalid choice: 'lbfgs'"),
    (["train", "--data", "synthetic", "--out", "{tmp}/run"], "already exists; pass --force"),
    (["train", "--data", "synthetic", "--force", "--resume", "--out", "{tmp}/run"], "exclude each other"),
    (["train", "--data", "synthetic", "--resume", "--out", "{tmp}/run"], "already complete; nothing to resume"),
    (["train", "--data", "synthetic", "--method", "nosuch", "--out", "{tmp}/new"], "unknown training method"),
    (["train", "--data", "synthetic", "--method-opt", "rho=2", "--out", "{tmp}/new"], "unknown option(s) ['rho']"),
    (["train", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/new"], "config file not found"),
    (["evaluate", "{tmp}/nothing"], "run folder not found"),
    (["evaluate", "{tmp}/incomplete"], "incomplete run folder"),
    (["evaluate", "{tmp}/run", "--suite", "paper", "--step-size", "nan"], "--step-size: expected a finite number"),
    (["evaluate", "{tmp}/run", "--suite", "paper", "--eps", "inf"], "eps must be finite"),
    (["evaluate", "{tmp}/run", "--suite", "nosuch"], "unknown evaluation suite 'nosuch'"),
    (["evaluate", "{tmp}/run", "--eps", "0.5"], "does not apply to the 'basic' suite"),
    (["evaluate", "{tmp}/run", "--suite", "paper", "--steps", "0"], "steps must be >= 1"),
    (["evaluate", "{tmp}/run", "--max-samples", "0"], "--max-samples must be >= 1"),
    (["certify", "{tmp}/run", "--lipschitz-samples", "0"], "--fit-samples must be an integer >= 1, got 0"),
    (["certify", "{tmp}/run", "--lipschitz-samples", "-5"], "--fit-samples must be an integer >= 1, got -5"),
    (["certify", "{tmp}/run", "--radii", "0,-1"], "--radii"),
    (["certify", "{tmp}/run", "--lipschitz", "guess"], "unknown certifier 'guess'"),
    (["certify", "{tmp}/incomplete"], "incomplete run folder"),
    (["benchmark", "--data", "synthetic", "--methods", "jt,nosuch", "--out", "{tmp}/bench"], "nosuch"),
    (["benchmark", "--data", "synthetic", "--methods", "jt", "--seeds", "0", "--out", "{tmp}/bench"], "seeds"),
    (["demo", "--epochs", "0", "--out", "{tmp}/demo"], "--epochs must be >= 1"),
    (["demo", "--methods", "jt,nosuch", "--out", "{tmp}/demo"], "unknown training method 'nosuch'"),
    (["calibrate", "--example", "avdigits-bind", "--eps", "2", "--out", "{tmp}/cal"], "eps"),
    (["calibrate", "--example", "nosuch", "--out", "{tmp}/cal"], "nosuch"),
    (["nosuch"], "invalid choice: 'nosuch'"),
]


def _run(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exc:  # argparse usage errors exit through the parser
        return int(exc.code or 0)


def test_cli_fault_catalogue(workspace, capsys):
    assert len(CASES) >= 30
    before = _snapshot(workspace)
    for argv, expected in CASES:
        code = _run([a.replace("{tmp}", str(workspace)) for a in argv])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("mmrobust: error: "), (argv, err)
        assert expected in lines[0], (argv, lines[0])
        assert "Traceback" not in err
        assert _snapshot(workspace) == before, argv  # nothing written, nothing half-written
