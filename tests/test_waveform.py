"""Waveform-space audio: import-av keep_waveform, the log-mel front end in the model, attacks on
the waveform, certificates refused through the front end; and the Standardize bound rule."""

from __future__ import annotations

import json

import pytest
import torch

from mmrobust.attacks import build_attack
from mmrobust.certify.sound import chain_lipschitz, chain_units
from mmrobust.cli import main
from mmrobust.config import RunConfig
from mmrobust.data import DataConfig, iterate_batches, load_data
from mmrobust.data.importav import ImportOptions, import_av
from mmrobust.errors import ConfigError
from mmrobust.models import ModelConfig, build_model
from mmrobust.models.transform import LogMelFrontEnd, Standardize
from mmrobust.runs import load_run, save_run, seal_run
from tests.test_import_av import SMALL, make_clips


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("wave")
    src = make_clips(root / "src")
    import_av(src, root / "wave", ImportOptions(**SMALL, val=0.2, test=0.2, keep_waveform=True))
    import_av(src, root / "feat", ImportOptions(**SMALL, val=0.2, test=0.2))
    return load_data(DataConfig(str(root / "wave"))), load_data(DataConfig(str(root / "feat"))), root


def _batch(split):
    return next(iter(iterate_batches(split, 64)))


def test_front_end_reproduces_the_stored_features(imported):
    wave, feat, _ = imported
    spec = wave.meta.spec("audio")
    assert spec.units == "waveform amplitude in [-1, 1]" and spec.valid_range == (-1.0, 1.0)
    assert spec.shape == (1, 4000) and spec.normalization is None
    model = build_model(wave.meta, ModelConfig(feature_dim=8)).eval()
    fe = model.transforms["audio"]
    assert isinstance(fe, LogMelFrontEnd) and type(model.encoders["audio"]).__name__ == "SmallCNN"
    for split in ("train", "test"):
        (xw, yw), (xf, yf) = _batch(wave.split(split)), _batch(feat.split(split))
        assert torch.equal(yw, yf)
        assert float(xw["audio"].abs().max()) <= 1.0
        with torch.no_grad():
            assert float((fe.features(xw["audio"]) - xf["audio"]).abs().max()) <= 1e-5
            norm = feat.meta.spec("audio").normalization
            standardised = (xf["audio"] - norm.mean[0]) / norm.std[0]
            assert float((fe(xw["audio"]) - standardised).abs().max()) <= 1e-5
            # the two models share weights: the waveform model = the feature model behind the front end
            fmodel = build_model(feat.meta, ModelConfig(feature_dim=8)).eval()
            state = {k: v for k, v in model.state_dict().items() if not k.startswith("transforms.audio.")}
            fmodel.load_state_dict(state, strict=False)
            assert float((model(xw) - fmodel(xf)).abs().max()) <= 1e-4


@pytest.mark.parametrize(("norm", "eps"), [("l2", 0.5), ("linf", 0.05)])
def test_waveform_attacks_stay_in_range_and_in_the_ball(imported, norm, eps):
    wave, _, _ = imported
    torch.manual_seed(0)
    model = build_model(wave.meta, ModelConfig(feature_dim=8)).eval()
    x, y = _batch(wave.test)
    x = {**x, "audio": x["audio"] * 2.2}  # push clips to full scale so that clamping matters
    x["audio"] = x["audio"].clamp(-1, 1)
    attack = build_attack(f"pgd-{norm}", model, wave.meta, eps=eps, loss="ce", modalities=["audio"], steps=5)
    adv = attack(x, y)
    delta = (adv["audio"] - x["audio"]).flatten(1)
    assert float(adv["audio"].min()) >= -1.0 and float(adv["audio"].max()) <= 1.0
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(1)
    assert float(size.max()) <= eps * (1 + 1e-5) and float(size.max()) > 0
    assert torch.equal(adv["video"], x["video"])


def test_certificates_through_the_front_end_are_refused_in_one_line(imported):
    wave, _, _ = imported
    model = build_model(wave.meta, ModelConfig(feature_dim=8)).eval()
    with pytest.raises(ConfigError, match="not bounded by the certifiers; certify the feature-space model") as exc:
        chain_units(model.input_encoder("audio"), wave.meta.spec("audio").shape)
    assert "\n" not in str(exc.value)


def test_standardize_bound_rule_is_the_affine_map(imported):
    _, feat, _ = imported
    model = build_model(feat.meta, ModelConfig(feature_dim=8)).eval()
    shape = feat.meta.spec("video").shape
    t = model.transforms["video"]
    assert isinstance(t, Standardize)
    (unit,) = chain_units(t, shape)
    x = torch.rand(3, *shape, dtype=torch.float64)
    assert torch.allclose(unit.fn(x) + unit.offset, t.double()(x), atol=1e-12)
    bare = chain_lipschitz(chain_units(model.encoders["video"], shape))
    full = chain_lipschitz(chain_units(model.input_encoder("video"), shape))
    assert full == pytest.approx(bare / 0.225, rel=1e-5)


def test_waveform_run_round_trip_and_cli_flag(imported, tmp_path, capsys):
    wave, _, root = imported
    model = build_model(wave.meta, ModelConfig(feature_dim=8)).eval()
    out = tmp_path / "run"
    save_run(out, model, RunConfig(data=DataConfig(str(root / "wave")), model=ModelConfig(feature_dim=8)), wave, {})
    seal_run(out)
    run = load_run(out)
    assert not run.legacy_inputs
    x, _ = _batch(run.data().test)
    with torch.no_grad():
        assert torch.equal(run.model(x), model(x))
    dst = tmp_path / "cli"
    argv = ["data", "import-av", str(root / "src"), str(dst), "--waveform", "--frames", "2", "--size", "16",
            "--n-mels", "32", "--n-fft", "256", "--hop", "128", "--seconds", "0.25", "--val", "0.2", "--test", "0.2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    meta = json.loads((dst / "meta.json").read_text())
    assert meta["modalities"][0]["units"] == "waveform amplitude in [-1, 1]"
    assert meta["info"]["front_ends"]["audio"]["n_mels"] == 32
