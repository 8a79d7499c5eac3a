"""One device setting on every computing command: refusals before any work, recorded in results,
not part of a run's identity; on CUDA, results match the CPU (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from mmrobust.benchmark import BenchmarkConfig
from mmrobust.cli import COMPUTING_COMMANDS, build_parser, main
from mmrobust.config import TrainConfig, parse_device, resolve_device
from mmrobust.errors import ConfigError
from mmrobust.io import read_json
from mmrobust.training.checkpoint import config_difference

from .conftest import TINY

TINY_ARGS = ["--data", "synthetic", *[a for k, v in TINY.items() for a in ("--data-opt", f"{k}={v}")]]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine: the GPU parity test needs one")


def _err(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_device_names_of_the_right_form(name):
    assert parse_device(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:-1", "CUDA", "cuda:", "cpu:0", "", "cuda:01"])
def test_malformed_device_names_are_refused(name):
    with pytest.raises(ConfigError, match="unknown device"):
        parse_device(name)
    with pytest.raises(ConfigError, match="unknown device"):
        TrainConfig(device=name)


def test_defaults_are_auto():
    assert TrainConfig().device == "auto"
    assert BenchmarkConfig(data=["synthetic"], methods=["jt"]).device == "auto"
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device 'cuda' requested but CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_index_beyond_the_device_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"'cuda:3' requested but only 2 CUDA device\(s\)"):
        resolve_device("cuda:3")


def test_every_computing_command_takes_device():
    parser = build_parser()
    for command in COMPUTING_COMMANDS:
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        assert "--device" in sub._option_string_actions, command


@pytest.mark.parametrize(
    "argv",
    [
        ["train", *TINY_ARGS, "--epochs", "1", "--out", "{tmp}/run"],
        ["benchmark", "--data", "synthetic", "--methods", "jt", "--seeds", "1", "--out", "{tmp}/bench"],
        ["demo", "--out", "{tmp}/demo"],
        ["calibrate", "--example", "avdigits-bind", "--out", "{tmp}/cal"],
    ],
)
def test_cuda_refused_in_one_line_before_any_work(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([*argv, "--device", "cuda"]) == 2
    err = _err(capsys)
    assert "'cuda' requested but CUDA is not available" in err and "--device" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cuda_refused_by_evaluate_and_certify(tiny_run, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = sorted(p.name for p in tiny_run.iterdir())
    for argv in (["evaluate", str(tiny_run)], ["certify", str(tiny_run)]):
        assert main([*argv, "--device", "cuda:0"]) == 2
        assert "CUDA is not available" in _err(capsys)
    assert sorted(p.name for p in tiny_run.iterdir()) == before


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:-1"])
def test_malformed_device_flag_is_one_line(value, tiny_run, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tiny_run), "--device", value])
    assert exc.value.code == 2
    assert "unknown device" in capsys.readouterr().err


def test_device_is_not_part_of_a_runs_identity():
    a = {"train": {"device": "cuda", "epochs": 3}}
    b = {"train": {"device": "cpu", "epochs": 3}}
    assert config_difference(a, b) is None
    assert config_difference(a, {"train": {"device": "cpu", "epochs": 4}}) == "train.epochs"


def test_benchmark_settings_hash_ignores_the_device():
    from mmrobust.benchmark import Cell

    cpu = BenchmarkConfig(data=["synthetic"], methods=["jt"], device="cpu")
    auto = BenchmarkConfig(data=["synthetic"], methods=["jt"], device="auto")
    cell = cpu.cells()[0]
    assert isinstance(cell, Cell) and cell.settings_hash(cpu) == cell.settings_hash(auto)
    with pytest.raises(ConfigError, match="unknown device"):
        BenchmarkConfig(data=["synthetic"], methods=["jt"], device="gpu")


def test_resume_on_another_device_continues(tmp_path, monkeypatch):
    """A run interrupted with device=auto resumes with --device cpu (device is not a setting)."""
    import mmrobust.training.checkpoint as checkpoint

    args = ["train", *TINY_ARGS, "--epochs", "3", "--no-progress", "--out", str(tmp_path / "r")]
    calls = {"n": 0}
    real = checkpoint.save_checkpoint

    def interrupt(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", interrupt)
    assert main([*args, "--device", "auto"]) == 130
    assert main([*args, "--device", "cpu", "--resume"]) == 0
    assert read_json(tmp_path / "r" / "metrics.json")["resumed_from_epoch"] == 1


def test_device_recorded_in_results(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run), "--device", "cpu", "--no-progress"]) == 0
    assert read_json(tiny_run / "eval.json")["parameters"]["device"] == "cpu"


@needs_cuda
def test_cuda_matches_cpu(tiny_run):
    """Model, batches and attack tensors live on the GPU; results match the CPU's."""
    from mmrobust.attacks import build_attack
    from mmrobust.certify.runner import certify_run
    from mmrobust.eval.runner import evaluate_run
    from mmrobust.runs import load_run

    run = load_run(tiny_run, device="cuda")
    assert all(p.device.type == "cuda" for p in run.model.parameters())
    from mmrobust.torchutil import to_device

    inputs, labels = run.data().test.take(slice(0, 8))
    inputs, labels = to_device(inputs, run.device), labels.to(run.device)
    attack = build_attack("pgd-l2", run.model, run.meta, eps=0.5, steps=3)
    adv, logits = attack.perturb(inputs, labels)
    assert all(v.device.type == "cuda" for v in adv.values()) and logits.device.type == "cuda"

    kw = {"suite": "paper", "eps": [0.5], "unimodal_eps": [1.0], "steps": 5}
    on_gpu = evaluate_run(tiny_run, device="cuda", **kw)
    on_cpu = evaluate_run(tiny_run, device="cpu", **kw)
    assert on_gpu.parameters["device"].startswith("cuda") and on_cpu.parameters["device"] == "cpu"
    assert on_gpu.clean_accuracy == pytest.approx(on_cpu.clean_accuracy, abs=1e-6)
    gpu_rows = {str(r.setting()): r.accuracy for r in on_gpu.rows}
    for r in on_cpu.rows:  # PGD robust accuracy: at most one sample of 120 may flip on float differences
        assert gpu_rows[str(r.setting())] == pytest.approx(r.accuracy, abs=1 / 120 + 1e-9)
    c_gpu = certify_run(tiny_run, "sound", device="cuda")
    c_cpu = certify_run(tiny_run, "sound", device="cpu")
    torch.testing.assert_close(c_gpu.certificate.radii.joint.cpu(), c_cpu.certificate.radii.joint.cpu(),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
