"""Normalisation is part of the model: raw stored data, Standardize buffers, legacy runs, calibrate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmrobust.config import RunConfig
from mmrobust.data import DataConfig, load_data
from mmrobust.data.base import DataBundle, DatasetMeta, ModalitySpec, Normalization, Split
from mmrobust.data.registry import fingerprint
from mmrobust.data.transforms import fit_normalizer, normalize, normalized_range, standardised_bundle
from mmrobust.errors import RunError
from mmrobust.io import save_tensors
from mmrobust.models import ModelConfig, build_model
from mmrobust.models.transform import Standardize
from mmrobust.runs import load_run, save_run, seal_run

#: fingerprint of avdigits (seed 0, default options) as mmrobust stored it before this change:
#: standardised by the loader (computed with the previous version of the code)
OLD_AVDIGITS_FINGERPRINT = "c8c27febf51161eac8c158d6a39fe822d54df9b7ba9615b3a6ec914f05b40734"


def test_standardize_equals_the_old_loader_bit_for_bit(avdigits):
    # the standardised view of the new raw data hashes to what the old loader stored
    view = standardised_bundle(avdigits)
    assert fingerprint(view) == OLD_AVDIGITS_FINGERPRINT
    assert fingerprint(avdigits) != OLD_AVDIGITS_FINGERPRINT  # the stored values really are raw now
    # the model's Standardize layer computes exactly those values
    model = build_model(avdigits.meta, ModelConfig(feature_dim=16)).eval()
    x = {m: v[:64] for m, v in avdigits.test.inputs.items()}
    got = model.transform(x)
    for m in ("audio", "image"):
        assert isinstance(model.transforms[m], Standardize)
        assert torch.equal(got[m], view.test.inputs[m][:64])
        assert not torch.equal(got[m], x[m])
    # the old audio formula (numpy, per coefficient over (frames, 13) clips) gives the same bits
    norm = avdigits.meta.spec("audio").normalization
    mean, std = np.array(norm.mean, np.float32), np.array(norm.std, np.float32)
    frames = x["audio"][:, :, :20].transpose(1, 2).numpy()
    old = ((frames - mean) / std).transpose(0, 2, 1)
    assert np.array_equal(old, got["audio"][:, :, :20].numpy())


def test_state_dict_unchanged_without_normalization():
    plain = DatasetMeta("t", [ModalitySpec("a", "vector", (5,)), ModalitySpec("b", "sequence", (3, 8))], ["x", "y"])
    model = build_model(plain, ModelConfig(feature_dim=8))
    assert model.transforms is None and not any(k.startswith("transforms") for k in model.state_dict())
    normed = DatasetMeta(
        "t",
        [ModalitySpec("a", "vector", (5,), None, "raw", Normalization((1.0,), (2.0,))), plain.modalities[1]],
        ["x", "y"],
    )
    with_t = build_model(normed, ModelConfig(feature_dim=8))
    extra = set(with_t.state_dict()) - set(model.state_dict())
    assert extra == {"transforms.a.mean", "transforms.a.std"}
    assert set(model.state_dict()) <= set(with_t.state_dict())
    x = torch.randn(4, 5)
    assert torch.equal(with_t.transforms["a"](x), (x - 1.0) / 2.0)


def _write_folder(root, rng, *, normalize_meta: bool | None = None, ranges: bool = True) -> None:
    root.mkdir(parents=True)
    for name, n in (("train", 60), ("val", 12), ("test", 20)):
        np.savez(
            root / f"{name}.npz",
            img=rng.uniform(0, 1, (n, 1, 6, 6)).astype(np.float32),
            seq=(rng.normal(3, 2, (n, 4, 10)) * np.arange(1, 5)[None, :, None]).astype(np.float32),
            label=rng.integers(0, 3, n),
        )
    meta: dict = {"class_names": ["a", "b", "c"]}
    if ranges:
        meta["valid_ranges"] = {"img": [0.0, 1.0]}
    if normalize_meta is not None:
        meta["normalize"] = normalize_meta
    (root / "meta.json").write_text(json.dumps(meta))


def _old_folder_bundle(new: DataBundle) -> DataBundle:
    """What the folder loader returned before: inputs standardised, ranges mapped, no normalization."""
    specs, stats = [], {}
    splits = {s: Split(dict(new.split(s).inputs), new.split(s).labels) for s in ("train", "val", "test")}
    for spec in new.meta.modalities:
        mean, std = fit_normalizer(new.train.inputs[spec.name], spec.kind, per_channel=spec.valid_range is None)
        for split in splits.values():
            split.inputs[spec.name] = normalize(split.inputs[spec.name], mean, std)
        specs.append(ModalitySpec(spec.name, spec.kind, spec.shape, normalized_range(spec.valid_range, mean, std)))
        stats[spec.name] = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    meta = DatasetMeta(new.meta.name, specs, new.meta.class_names)
    old = DataBundle(meta, splits["train"], splits["val"], splits["test"])
    old.source = {**{k: v for k, v in new.source.items() if k != "fingerprint"}, "normalization": stats}
    old.source["fingerprint"] = fingerprint(old)
    return old


def _legacy_run(tmp_path, folder):
    new = load_data(DataConfig(str(folder)))
    old = _old_folder_bundle(new)
    assert fingerprint(standardised_bundle(new)) == old.source["fingerprint"]  # bit for bit
    torch.manual_seed(0)
    model = build_model(old.meta, ModelConfig(feature_dim=8)).eval()  # an old model: no transforms
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    cfg = RunConfig(data=DataConfig(str(folder)), model=ModelConfig(feature_dim=8))
    out = tmp_path / "legacy"
    save_run(out, model, cfg, old, {"test_accuracy": 0.0})
    config = json.loads((out / "config.json").read_text())
    for m in config["dataset"]["modalities"]:  # written by the old code: no units nor normalization keys
        m.pop("units"), m.pop("normalization")
    (out / "config.json").write_text(json.dumps(config))
    seal_run(out)
    return out, model, old, new


def test_legacy_run_gets_the_input_transform_and_the_same_logits(tmp_path):
    folder = tmp_path / "data"
    _write_folder(folder, np.random.default_rng(0))
    out, old_model, old, new = _legacy_run(tmp_path, folder)
    run = load_run(out)
    assert run.legacy_inputs and run.meta.to_dict() == new.meta.to_dict()
    assert run.meta.spec("img").valid_range == (0.0, 1.0) and run.meta.spec("img").normalization.scalar
    assert len(run.meta.spec("seq").normalization.std) == 4  # per channel
    data = run.data()  # not refused as "data no longer match"
    with torch.no_grad():
        new_logits = run.model(data.test.inputs)
        old_logits = old_model(old.test.inputs)
    assert float((new_logits - old_logits).abs().max()) <= 1e-6
    assert not torch.equal(data.test.inputs["seq"], old.test.inputs["seq"])  # raw vs standardised inputs
    # data edited since: refused like any run whose data changed
    cfg = json.loads((out / "config.json").read_text())
    cfg["data_source"]["fingerprint"] = "0" * 64
    (out / "config.json").write_text(json.dumps(cfg))
    seal_run(out)
    with pytest.raises(RunError, match="changed since training"):
        load_run(out)
    assert load_run(out, allow_data_change=True).legacy_inputs


def test_folder_stores_raw_values_and_records_the_normalization(tmp_path):
    folder = tmp_path / "data"
    _write_folder(folder, np.random.default_rng(1))
    raw = np.load(folder / "test.npz")
    b = load_data(DataConfig(str(folder)))
    assert np.array_equal(b.test.inputs["img"].numpy(), raw["img"])
    assert b.meta.spec("img").units == "as stored in the npz files"
    assert b.meta.spec("seq").normalization.axis == 0
    off = tmp_path / "off"
    _write_folder(off, np.random.default_rng(1), normalize_meta=False)
    assert all(s.normalization is None for s in load_data(DataConfig(str(off))).meta.modalities)


def test_calibrate_data_folder_feeds_raw_values(tmp_path):
    from mmrobust.calibration.command import user_setup
    from tests.calibration_setups import nuisance_setup, write_folder_dataset

    setup = nuisance_setup()
    folder = tmp_path / "data"
    write_folder_dataset(folder, setup)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["normalize"]  # the folder default: a model trained on it would standardise
    (folder / "meta.json").write_text(json.dumps(meta))
    assert load_data(DataConfig(str(folder))).meta.spec("image").normalization is not None
    save_tensors(tmp_path / "centres.safetensors", {"centres": setup.model.centres("audio")})
    enc = "audio=tests.calibration_setups:nuisance_encoder,image=tests.calibration_setups:nuisance_encoder"
    got = user_setup(enc, str(tmp_path / "centres.safetensors"), str(folder))
    for m in ("audio", "image"):
        spec = got.meta.spec(m)
        assert spec.normalization is None and spec.valid_range == (0.0, 1.0)
        assert torch.equal(got.data.test.inputs[m], setup.data.test.inputs[m])  # the stored values
    seen = []
    hook = got.model.encoders["image"].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    got.model.features("image", got.data.test.inputs["image"][:4])
    hook.remove()
    assert torch.equal(seen[0], setup.data.test.inputs["image"][:4])
