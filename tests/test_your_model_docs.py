"""docs/your-model.md runs as printed: its files are written and its commands run in a fresh folder.

Blocks: ```` ```python file=NAME ```` is written to NAME; ```` ```bash ```` is run (``mmrobust`` and
``python`` are this interpreter); ```` ```text ```` is output: every fragment between ``...`` of each
line must appear in what the commands before it printed; ```` ```python snippet ```` is an
illustration (not run). Each example's lines of user code are counted against the table at the top.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "your-model.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def blocks() -> list[tuple[str, str, str]]:
    return [(lang, info.strip(), body) for lang, info, body in FENCE.findall(DOC.read_text())]


def code_lines(text: str) -> int:
    """Lines of Python code: neither blank nor a comment nor a docstring line."""
    return sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith(("#", '"""')))


def test_every_block_is_of_a_known_kind() -> None:
    found = blocks()
    assert len(found) >= 10
    for lang, info, _ in found:
        assert (lang, info.split("=")[0]) in {("python", "file"), ("python", "snippet"), ("bash", ""), ("text", "")}, (
            lang,
            info,
        )


def test_the_stated_lines_of_user_code_are_counted() -> None:
    files = {info.split("=", 1)[1]: body for lang, info, body in blocks() if info.startswith("file=")}
    stated = dict(re.findall(r"^\| \[(\w)\. .*?\| (\d+) \|$", DOC.read_text(), re.M))
    counted = {
        "a": code_lines(files["my_encoders.py"]),
        "b": code_lines(files["my_model.py"]) + code_lines(files["train_plain.py"]),
        "c": code_lines(files["my_data.py"]),
    }
    assert {k: int(v) for k, v in stated.items()} == counted


def test_the_examples_run_as_printed(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("mmrobust", f'exec "{sys.executable}" -m mmrobust "$@"'),
        ("python", f'exec "{sys.executable}" "$@"'),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT),
           "COLUMNS": "200", "MMROBUST_NO_COLOR": "1"}  # fmt: skip
    printed = ""
    for lang, info, body in blocks():
        if info.startswith("file="):
            (work / info.split("=", 1)[1]).write_text(body)
        elif lang == "bash":
            res = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=work, env=env, capture_output=True,
                                 text=True, timeout=240)  # fmt: skip
            printed += res.stdout + res.stderr
            assert res.returncode == 0, f"{body}\n--- output:\n{res.stdout}\n{res.stderr}"
        elif lang == "text":
            flat = " ".join(printed.split())
            for line in body.splitlines():
                for fragment in (f.strip() for f in line.split("...")):
                    if fragment:
                        assert " ".join(fragment.split()) in flat, f"{fragment!r} not printed:\n{printed[-3000:]}"
            printed = ""
