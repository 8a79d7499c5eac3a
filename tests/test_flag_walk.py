"""A walk over every flag of every command, generated from ``build_parser()`` (issue 22).

For each subcommand (``data convert`` etc. included) and each of its flags that takes a value, the
command is run in-process on a tiny valid base command with NaN, inf, negative, zero, huge and
malformed values, each under a time cap. A case must either succeed (exit 0) or exit 2 with exactly
one stderr line and nothing written; never a traceback, another exit code or a hang. New and renamed
flags are covered automatically; a flag is skipped only through :data:`EXEMPT`, with its reason.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from mmrobust.cli import build_parser, main

VALUES = ["nan", "inf", "-1", "0", "100000000000000000000", "1,x=:/"]
CAP_S = 20

DATA = ["--data", "synthetic", *[f"--data-opt={kv}" for kv in ("n_train=48", "n_val=16", "n_test=16", "dim=6")]]

#: command -> the tiny valid base command ({run}: a trained run, {disk}: an on-disk dataset, {clips}: clips)
BASES: dict[str, list[str]] = {
    "train": ["train", *DATA, "--epochs", "1", "--feature-dim", "8", "--batch-size", "16", "--no-progress", "--out", "out/run"],
    "evaluate": ["evaluate", "{run}", "--max-samples", "4", "--no-progress"],
    "certify": ["certify", "{run}", "--fit-samples", "8", "--radii", "0,1"],
    "benchmark": ["benchmark", *DATA, "--methods", "jt", "--seeds", "1", "--epochs", "1", "--max-samples", "4",
                  "--suite", "curves", "--eps", "0.5", "--feature-dim", "8", "--out", "out/bench", "--no-progress"],
    "data convert": ["data", "convert", "synthetic", "out/ds", "--data-opt=n_train=48", "--data-opt=n_val=16",
                     "--data-opt=n_test=16", "--data-opt=dim=6", "--no-progress"],
    "data verify": ["data", "verify", "{disk}", "--no-progress"],
    "data import-av": ["data", "import-av", "{clips}", "out/av", "--frames", "1", "--size", "8", "--n-mels", "8",
                       "--n-fft", "64", "--hop", "32", "--seconds", "0.25", "--val", "0.2", "--test", "0.2", "--no-progress"],
}  # fmt: skip

#: (command, flag or "*") -> why it is not walked
EXEMPT: dict[tuple[str, str], str] = {
    ("demo", "*"): "trains avdigits for minutes per successful case; its flags are checked in test_cli_faults",
    ("calibrate", "*"): "needs the calibration extra and trains encoders; walked in test_calibration_cli",
    ("train", "--device"): "'0'/'-1' name CUDA devices on a GPU machine; validated by TrainConfig",
    ("train", "--config"): "a path: every value is a missing file (one line), covered by test_cli_faults",
    ("wrap", "*"): "needs a user module and a weights file; its refusals (pickle, mismatched keys, missing factory, "
    "missing file) are tested in tests/test_wrap.py",
}  # fmt: skip


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    out.update(_subcommands(sub, (*prefix, name)))
                else:
                    out[" ".join((*prefix, name))] = sub
    return out


def _value_flags(parser: argparse.ArgumentParser) -> list[str]:
    """The long flags that take a value (store/append with nargs != 0), one per action."""
    flags = []
    for a in parser._actions:
        longs = [o for o in a.option_strings if o.startswith("--")]
        if longs and a.nargs != 0 and not isinstance(a, argparse._VersionAction | argparse._HelpAction):
            flags.append(longs[0])
    return flags


def walk_plan() -> tuple[list[tuple[str, str, str]], dict[str, list[str]]]:
    """(command, flag, value) cases and the flags exempted per command."""
    cases, skipped = [], {}
    for command, sub in _subcommands(build_parser()).items():
        for flag in _value_flags(sub):
            reason = EXEMPT.get((command, flag)) or EXEMPT.get((command, "*"))
            if reason is not None or command not in BASES:
                skipped.setdefault(command, []).append(flag)
                continue
            cases += [(command, flag, v) for v in VALUES]
    return cases, skipped


def _argv(command: str, flag: str, value: str, paths: dict[str, str]) -> list[str]:
    base = [a.format(**paths) for a in BASES[command]]
    if flag in base:  # replace the base's value of this flag
        i = base.index(flag)
        del base[i : i + 2]
    base = [a for a in base if not a.startswith(flag + "=")]
    return [*base, f"{flag}={value}"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root``; files with their size and mtime (a folder's mtime changes when a lock
    file comes and goes)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (0, 0)
        for p in root.rglob("*")
    }


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001
    raise _Hang()


@pytest.fixture(scope="module")
def walk_paths(tmp_path_factory) -> dict[str, str]:
    from mmrobust.cli import main as cli

    root = tmp_path_factory.mktemp("walk")
    assert (
        cli(["train", *DATA, "--epochs", "1", "--feature-dim", "8", "--no-progress", "--out", str(root / "run")]) == 0
    )
    disk = root / "disk"
    assert cli(["data", "convert", "synthetic", str(disk), *BASES["data convert"][4:]]) == 0
    clips = root / "clips"
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        for i in range(5):
            folder = clips / f"class{c}" / f"c{c}clip{i}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / "f0.png")
            import wave

            with wave.open(str(folder / "audio.wav"), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes((rng.standard_normal(4000) * 3000).astype("<i2").tobytes())
    return {"run": str(root / "run"), "disk": str(disk), "clips": str(clips)}


def test_flag_walk(walk_paths, tmp_path, capsys, monkeypatch):
    """Every value flag of every walked command x NaN, inf, -1, 0, 1e20, malformed: success or one line, exit 2,
    nothing written; the size (commands x flags x values) is in the assertion message."""
    cases, skipped = walk_plan()
    commands = {c for c, _, _ in cases}
    flags = {(c, f) for c, f, _ in cases}
    size = f"{len(commands)} commands x {len(flags)} flags x {len(VALUES)} values = {len(cases)} cases"
    failures: list[str] = []
    t0 = time.perf_counter()
    for command in sorted(commands):  # each base command is valid on its own, so a refusal is the value's
        work = tmp_path / f"base-{command.replace(' ', '-')}"
        (work / "out").mkdir(parents=True)
        monkeypatch.chdir(work)
        base = [a.format(**walk_paths) for a in BASES[command]]
        assert main(base) == 0, (base, capsys.readouterr().err)
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i, (command, flag, value) in enumerate(cases):
            work = tmp_path / f"c{i}"
            (work / "out").mkdir(parents=True)
            monkeypatch.chdir(work)
            argv = _argv(command, flag, value, walk_paths)
            watched = [work, Path(walk_paths["run"]), Path(walk_paths["disk"])]
            before = [_snapshot(w) for w in watched]
            signal.alarm(CAP_S)
            try:
                rc: object = main(argv)
            except SystemExit as exc:  # argparse usage errors
                rc = exc.code
            except _Hang:
                rc = "hang"
            except BaseException as exc:  # a traceback
                rc = f"{type(exc).__name__}: {exc}"
            finally:
                signal.alarm(0)
            err = capsys.readouterr().err
            lines = err.strip().splitlines()
            what = f"{' '.join(argv[:2])} {flag}={value}"
            if rc == 0:
                continue
            if rc != 2:
                failures.append(f"{what}: exit {rc!r}; {lines[-1:] or ''}")
            elif len(lines) != 1 or not lines[0].startswith("mmrobust: error: ") or "Traceback" in err:
                failures.append(f"{what}: stderr {err!r}")
            elif [_snapshot(w) for w in watched] != before:
                failures.append(f"{what}: refused but wrote files")
    finally:
        signal.signal(signal.SIGALRM, previous)
        os.chdir(tmp_path)
    seconds = time.perf_counter() - t0
    print(f"flag walk: {size} in {seconds:.0f} s; exempt: {skipped}")
    assert not failures, f"{size}: {len(failures)} failed:\n" + "\n".join(failures)
