"""Library errors speak Python; only the CLI speaks flags.

A message raised anywhere outside ``mmrobust/cli.py`` names Python parameters (``max_samples``),
never a flag (``--max-samples``): a Python caller has no flags. The CLI maps ``error.param`` to the
flag of the command that ran.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mmrobust
from mmrobust.cli import main
from mmrobust.errors import ConfigError, MMRobustError

ROOT = Path(mmrobust.__file__).parent


def _flag_messages(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str) and "--" in part.value:
                    out.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {part.value.strip()[:60]}")
    return out


def test_no_library_message_names_a_flag() -> None:
    found = [m for p in sorted(ROOT.rglob("*.py")) if p != ROOT / "cli.py" for m in _flag_messages(p)]
    assert not found, f"{len(found)} library messages name CLI flags:\n" + "\n".join(found)


def test_the_scan_finds_a_flag_in_a_raise(tmp_path: Path) -> None:
    bad = tmp_path / "m.py"
    bad.write_text('def f(n):\n    raise ValueError(f"--max-samples must be >= 1, got {n}")\n')
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert len(_flag_messages(bad)) == 1
    finally:
        ROOT = saved


def test_param_survives_pickling() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("max_samples must be >= 1, got 0", param="max_samples")))
    assert isinstance(err, ConfigError) and err.param == "max_samples" and "max_samples" in str(err)


def test_python_caller_reads_python_names() -> None:
    from mmrobust.eval.runner import evaluate_run

    with pytest.raises(MMRobustError) as info:
        evaluate_run("no-such-run-folder", max_samples=0)
    assert "--" not in str(info.value)


def test_cli_speaks_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["benchmark", "--data", "synthetic", "--methods", "jt", "--seeds", "0", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "--seeds" in err and err.startswith("mmrobust: error: ") and "error: mmrobust" not in err
