"""Certificates of a model that standardises its own inputs: computed in the standardised
coordinates, so they equal those of the same weights on standardised data, with units stated."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mmrobust.certify.runner import certify_model
from mmrobust.data import DataConfig, load_data
from mmrobust.data.base import DatasetMeta, Normalization, Split
from mmrobust.errors import ConfigError, RunError
from mmrobust.eval.robust import missing_predictions
from mmrobust.models.fusion import ModelConfig, build_model

STD = 2.0  # a power of two: stored = 2 * standardised exactly, so both models see identical floats


@pytest.fixture(scope="module")
def pair():
    bundle = load_data(DataConfig("synthetic", options={"n_train": 64, "n_val": 16, "n_test": 48, "dim": 8}))
    meta = bundle.meta
    raw_specs = [
        dataclasses.replace(s, units="volts", normalization=Normalization((0.0,), (STD,))) if s.name == "strong" else s
        for s in meta.modalities
    ]
    raw_meta = DatasetMeta(meta.name, raw_specs, list(meta.class_names), dict(meta.info))

    def raw(split: Split) -> Split:
        return Split({**split.inputs, "strong": split.inputs["strong"] * STD}, split.labels)

    torch.manual_seed(0)
    std_model = build_model(meta, ModelConfig(feature_dim=16)).eval()
    raw_model = build_model(raw_meta, ModelConfig(feature_dim=16)).eval()
    assert raw_model.transforms is not None and std_model.transforms is None
    missing = raw_model.load_state_dict(std_model.state_dict(), strict=False)
    assert set(missing.missing_keys) == {"transforms.strong.mean", "transforms.strong.std"}
    with torch.no_grad():  # the same function of the data
        torch.testing.assert_close(raw_model(raw(bundle.test).inputs), std_model(bundle.test.inputs), rtol=0, atol=0)
    return bundle, meta, raw_meta, std_model, raw_model, raw


@pytest.mark.parametrize("certifier", ["sound", "crown", "empirical"])
def test_radii_of_a_standardising_model_are_those_in_standardised_coordinates(pair, certifier: str) -> None:
    bundle, meta, raw_meta, std_model, raw_model, raw = pair
    opts = {"steps": 6} if certifier == "crown" else None
    ref = certify_model(std_model, meta, bundle.test, certifier, bundle.train, options=opts)
    got = certify_model(raw_model, raw_meta, raw(bundle.test), certifier, raw(bundle.train), options=opts)
    torch.testing.assert_close(got.certificate.radii.joint, ref.certificate.radii.joint)
    for m in ref.certificate.radii.unimodal:
        torch.testing.assert_close(got.certificate.radii.unimodal[m], ref.certificate.radii.unimodal[m])
    assert got.certificate.radii.joint.max() > 0
    # radii measure delta / std: the units and scales say so; the stored-units model keeps its transforms
    assert got.units == {"strong": "volts", "weak": "standardised"} and got.scales == {"strong": STD, "weak": 1.0}
    assert raw_model.transforms is not None and "strong" in raw_model.transforms


def test_a_front_end_that_is_not_a_standardisation_is_refused(pair) -> None:
    bundle, meta, _, std_model, _, _ = pair
    model = build_model(meta, ModelConfig(feature_dim=16))
    model.set_transforms({"weak": nn.Tanh()})
    with pytest.raises(ConfigError, match=r"input front end of modality \['weak'\] \(Tanh\) is not bounded"):
        certify_model(model, meta, bundle.test, "sound", bundle.train)
    assert isinstance(model.transforms["weak"], nn.Tanh)


def test_missing_modality_fills_are_defined_in_the_standardised_space(pair) -> None:
    bundle, _, _, std_model, raw_model, raw = pair
    for fill in ("zero", "noise"):
        ref = missing_predictions(std_model, bundle.test, ["strong"], fill)
        got = missing_predictions(raw_model, raw(bundle.test), ["strong"], fill)
        assert torch.equal(got, ref), fill


def test_accuracy_curves_carry_their_radii_label_and_units(pair) -> None:
    bundle, _, raw_meta, _, raw_model, raw = pair
    res = certify_model(raw_model, raw_meta, raw(bundle.test), "sound", raw(bundle.train), radii=[0, 0.1, 0.5])
    curve = res.accuracy_curve("joint")
    assert curve.radii == (0.0, 0.1, 0.5) and len(curve) == 3 and curve.label == "sound (sound), joint l2"
    assert curve.units == {"strong": "volts", "weak": "standardised"} and curve.scales["strong"] == STD
    assert list(curve) == res.to_json()["certified_accuracy"]["joint"] and curve == list(curve)
    assert curve.at(0.0) == pytest.approx(res.clean_accuracy) and curve[0] >= curve[1] >= curve[2]
    strong = res.accuracy_curve("strong")
    assert strong.units == {"strong": "volts"} and strong.threat == "strong"
    with pytest.raises(ConfigError, match="unknown threat 'audio'; choose from: joint, strong, weak"):
        res.accuracy_curve("audio")
    with pytest.raises(ConfigError, match="radius 0.2 is not on the grid"):
        curve.at(0.2)


@pytest.mark.parametrize(("certifier", "options"), [("crown", {"steps": 4}), ("smoothing", {"n": 20, "n0": 5})])
def test_long_certifiers_report_progress_over_the_samples(pair, certifier: str, options: dict) -> None:
    bundle, meta, _, std_model, _, _ = pair
    calls: list[tuple[str, int, int]] = []
    certify_model(std_model, meta, bundle.test, certifier, bundle.train, options=options,
                  progress=lambda d, done, total: calls.append((d, done, total)))  # fmt: skip
    n = len(bundle.test)
    assert calls and calls[-1] == (certifier, n, n)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)  # done only grows


def test_a_run_with_nan_weights_is_refused_before_any_certificate(tmp_path, capsys) -> None:
    from mmrobust.certify.runner import certify_run
    from mmrobust.cli import main
    from mmrobust.io import load_tensors, save_tensors
    from mmrobust.runs import seal_run

    run = tmp_path / "run"
    tiny = ["--data-opt", "n_train=64", "--data-opt", "n_val=16", "--data-opt", "n_test=16"]
    assert main(["train", "--data", "synthetic", *tiny, "--epochs", "1", "--no-progress", "--out", str(run)]) == 0
    state = load_tensors(run / "model.safetensors")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    save_tensors(run / "model.safetensors", state)
    seal_run(run)  # an edit made on purpose: the run loads, its weights are NaN
    with pytest.raises(RunError, match=f"weight '{key}' holds NaN or inf values"):
        certify_run(run, "sound")
    capsys.readouterr()
    assert main(["certify", str(run), "--certifier", "sound", "--no-progress"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (run / "certify.json").exists()
