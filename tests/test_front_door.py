"""The front door: `mmrobust list`, `--set`, one error prefix, whole lines in pipes, the wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mmrobust.cli import main
from mmrobust.options import apply_overrides, parse_scalar

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "synthetic", "--data-opt", "n_train=64", "--data-opt", "n_val=32", "--data-opt", "n_test=32"]


def test_list_shows_every_kind_with_options_and_no_markup(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for header in ("datasets", "encoders", "methods", "attacks", "suites", "certifiers"):
        assert f"\n{header}  (" in "\n" + text
    assert "  crmt-jt: " in text and "      rho (float) = 2.0" in text  # a method option with its default
    assert "  pgd-l2: " in text and "      steps (int) = 10" in text
    assert "  smallcnn: " in text and "  sound [sound]: " in text
    assert "``" not in text and ":class:" not in text


def test_list_one_kind_and_unknown_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "methods"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("methods  (") and "\nattacks  (" not in text
    assert main(["list", "method"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "mmrobust: error: list: unknown kind(s) ['method']; choose from: "
        "datasets, encoders, methods, attacks, suites, certifiers"
    )


def test_parse_scalar_types_like_a_config_file() -> None:
    assert parse_scalar("1e-3") == 1e-3 and isinstance(parse_scalar("3"), int) and parse_scalar(" true ") is True
    assert parse_scalar("none") is None and parse_scalar("cnn") == "cnn" and parse_scalar("nan") != parse_scalar("nan")


def test_apply_overrides_sets_nested_fields_without_touching_the_input() -> None:
    tree = {"train": {"optim": {"lr": 0.1}}, "model": {}}
    got = apply_overrides(tree, ["train.optim.lr=1e-3", "model.encoders.image=cnn", "train.method_options.rho=3"],
                          ("data", "model", "train"))  # fmt: skip
    assert got["train"]["optim"]["lr"] == 1e-3 and got["model"]["encoders"] == {"image": "cnn"}
    assert got["train"]["method_options"] == {"rho": 3} and tree["train"]["optim"]["lr"] == 0.1


def test_set_overrides_nested_config_fields(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "1", "--no-progress", "--method", "crmt-jt", "--out", str(out),
            "--set", "train.optim.lr=2e-3", "--set", "train.method_options.rho=3", "--set", "model.feature_dim=16",
            "--set", "model.encoders.weak=mlp"]  # fmt: skip
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["optim"]["lr"] == 2e-3 and config["train"]["method_options"]["rho"] == 3
    assert config["model"]["feature_dim"] == 16 and config["model"]["encoders"] == {"weak": "mlp"}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.optim.lrr=1", "config 'train.optim': unknown key(s) ['lrr']"),
        ("train.optim.lr=nan", "option 'train.optim.lr' must be a finite number"),
        ("train.epochs=two", "option 'train.epochs' expects int, got the string 'two'"),
        ("nosection.x=1", "--set 'nosection.x=1': unknown section 'nosection'; choose from: data, model, train"),
        ("train.epochs", "--set 'train.epochs' must look like SECTION.KEY=VALUE"),
        ("train.epochs.x=1", "--set 'train.epochs.x=1': 'train.epochs' is a value, not a section"),
        ("train.method_options.nosuch=1", "unknown option(s) ['nosuch']"),
    ],
)
def test_set_refuses_bad_values_before_any_work(
    setting: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *TINY, "--method", "crmt-jt", "--no-progress", "--set", setting, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmrobust: error: ") and message in err
    assert not out.exists()


def test_one_error_prefix_for_usage_errors() -> None:
    proc = subprocess.run([sys.executable, "-m", "mmrobust", "evaluate", "--nosuch"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mmrobust: error: evaluate: ") and proc.stderr.count("mmrobust") == 2  # + help hint
    assert "error: mmrobust" not in proc.stderr


def test_paths_are_not_wrapped_when_output_is_a_pipe(tmp_path: Path) -> None:
    out = tmp_path / ("a-rather-long-folder-name-" * 4) / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mmrobust", "train", *TINY, "--epochs", "1", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if "wrote" in line]
    assert len(lines) == 1 and lines[0].endswith(f"wrote {out}")


def test_top_level_exports() -> None:
    import mmrobust

    for name in ("train", "load_run", "evaluate_run", "certify_run", "certify_model", "run_benchmark"):
        assert callable(getattr(mmrobust, name)), name
    assert "run_benchmark" in mmrobust.__all__


@pytest.mark.slow
def test_wheel_builds_and_installs_into_a_clean_venv(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mmrobust", src / "mmrobust", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("mmrobust-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    modules = {str(p.relative_to(REPO)) for p in (REPO / "mmrobust").rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)[:5]}"
    assert "Requires-Dist: torch<3,>=2.4" in metadata or "Requires-Dist: torch>=2.4,<3" in metadata
    assert "mmrobust = mmrobust.cli:main" in entry_points

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True)  # fmt: skip
    version = subprocess.run([str(venv / "bin" / "mmrobust"), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip().startswith("mmrobust ")
    # the installed copy (not this checkout) runs a command, with the dependencies of this environment
    deps = sysconfig.get_paths()["purelib"]
    code = (f"import sys; sys.path.append({deps!r}); import mmrobust, mmrobust.cli; "
            "assert mmrobust.__file__.startswith(sys.prefix), mmrobust.__file__; "
            "sys.exit(mmrobust.cli.main(['list', 'certifiers']))")  # fmt: skip
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "crown" in proc.stdout
