import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrobust.data import DataConfig, Split, dataset_folder, iterate_batches, load_data, validate_batch
from mmrobust.data.fetch import WheelFile, fetch_wheel
from mmrobust.errors import ConfigError, DataError


def test_avdigits_splits_shapes_and_normalisation(avdigits):
    b = avdigits
    assert (len(b.train), len(b.val), len(b.test)) == (2100, 300, 600)
    assert b.meta.modality_names == ["audio", "image"]
    assert b.test.inputs["audio"].shape[1:] == (13, 32) and b.test.inputs["image"].shape[1:] == (1, 28, 28)
    # every class equally represented in every split (stratified)
    for split in (b.train, b.val, b.test):
        counts = torch.bincount(split.labels, minlength=10)
        assert counts.min() == counts.max()
    # stored raw: images in [0, 1] (black pixels 0), the standardisation is the model's, fitted on train only
    spec = b.meta.spec("image")
    assert spec.valid_range == (0.0, 1.0) and spec.units == "pixel intensity in [0, 1]"
    for split in (b.train, b.test):
        x = split.inputs["image"]
        assert float(x.min()) == 0.0 and float(x.max()) <= 1.0
    img = b.train.inputs["image"]
    norm = spec.normalization
    assert norm.scalar and norm.mean[0] == pytest.approx(float(img.mean()), abs=1e-3)  # all train images
    assert norm.std[0] == pytest.approx(float(img.std()), abs=1e-3)
    assert 0.30 < norm.std[0] < 0.32  # MNIST: 8/255 standardised was ~2.5/255 of the pixel range
    audio = b.meta.spec("audio")
    assert audio.units == "MFCC" and audio.normalization.axis == 0 and len(audio.normalization.std) == 13


def test_avdigits_no_image_in_two_splits(avdigits):
    def keys(split):
        return {x.numpy().tobytes() for x in split.inputs["image"]}

    tr, va, te = keys(avdigits.train), keys(avdigits.val), keys(avdigits.test)
    assert not (tr & te) and not (tr & va) and not (va & te)
    # each clip has its own image within a split (no reuse)
    assert len(te) == len(avdigits.test)


def test_avdigits_deterministic_by_seed(avdigits):
    again = load_data(DataConfig("avdigits", 0))
    other = load_data(DataConfig("avdigits", 1))
    for m in ("audio", "image"):
        assert torch.equal(again.test.inputs[m], avdigits.test.inputs[m])
        assert not torch.equal(other.test.inputs[m], avdigits.test.inputs[m])


def test_fetch_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MMROBUST_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    spec = WheelFile("mmrobust-no-such-package==0.0.1", "x-0.0.1-py3-none-any.whl", "0" * 64, "x")
    with pytest.raises(DataError, match="could not download mmrobust-no-such-package==0.0.1"):
        fetch_wheel(spec)
    assert list((tmp_path / "wheels").iterdir()) == []  # nothing half-written left behind


def test_synthetic_is_seeded_and_validates_options():
    a = load_data(DataConfig("synthetic", 3, {"n_train": "50", "n_val": "20", "n_test": "20"}))
    b = load_data(DataConfig("synthetic", 3, {"n_train": "50", "n_val": "20", "n_test": "20"}))
    assert torch.equal(a.train.inputs["strong"], b.train.inputs["strong"])
    three = load_data(DataConfig("synthetic", 0, {"names": "a,b,c", "signal": "1,2,3", "n_train": "30"}))
    assert three.meta.modality_names == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="'signal' has 3 value"):
        load_data(DataConfig("synthetic", 0, {"signal": "1,2,3"}))


def test_synthetic_signal_controls_preference():
    b = load_data(DataConfig("synthetic", 0, {"signal": "4.0,0.5", "n_train": "2000", "classes": "5"}))

    def nearest_mean_acc(m):  # the Bayes-like classifier per modality
        means = torch.stack([b.train.inputs[m][b.train.labels == k].mean(0) for k in range(5)])
        pred = torch.cdist(b.test.inputs[m], means).argmin(1)
        return float((pred == b.test.labels).float().mean())

    assert nearest_mean_acc("strong") > 0.9 > 0.5 > nearest_mean_acc("weak")


def test_iterate_batches_shards_match_single_process(tiny_bundle):
    single = [lab for _, lab in iterate_batches(tiny_bundle.train, 32, shuffle=True, seed=1, epoch=2)]
    shards = [
        [lab for _, lab in iterate_batches(tiny_bundle.train, 16, shuffle=True, seed=1, epoch=2, rank=r, world_size=2)]
        for r in range(2)
    ]
    for step, lab in enumerate(single):
        together = torch.cat([shards[0][step], shards[1][step]])
        assert sorted(together.tolist()) == sorted(lab.tolist())
    idx = torch.cat([lab for lab in single])
    assert len(idx) == len(tiny_bundle.train)


def _write_folder(root, n=40, k=3, **override):
    rng = np.random.default_rng(0)
    arrays = {
        "audio": rng.normal(size=(n, 5, 8)).astype(np.float32),
        "video": rng.uniform(size=(n, 1, 6, 6)).astype(np.float32),
        "label": rng.integers(0, k, size=n),
    }
    arrays.update(override)
    root.mkdir(exist_ok=True)
    np.savez(root / "train.npz", **arrays)
    np.savez(root / "test.npz", **{k2: v[:10] for k2, v in arrays.items()})
    return root


def test_folder_dataset_loads_and_carves_val(tmp_path):
    root = _write_folder(tmp_path / "ds")
    (root / "meta.json").write_text(json.dumps({"valid_ranges": {"video": [0, 1]}, "class_names": ["a", "b", "c"]}))
    b = load_data(DataConfig(str(root), 0))
    assert len(b.train) + len(b.val) == 40 and len(b.val) == 4
    assert b.meta.spec("audio").kind == "sequence" and b.meta.spec("video").kind == "image"
    lo, hi = b.meta.spec("video").valid_range
    assert float(b.train.inputs["video"].min()) >= lo - 1e-5 and float(b.train.inputs["video"].max()) <= hi + 1e-5
    assert b.meta.class_names == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"audio": np.full((40, 5, 8), np.nan, dtype=np.float32)}, "'audio' contains NaN or inf values in"),
        ({"audio": np.zeros((39, 5, 8), dtype=np.float32)}, "'audio' has 39 samples but 'label' has"),
        ({"label": np.linspace(0, 1, 40)}, "'label' must be an integer array"),
        ({"label": -np.ones(40, dtype=np.int64)}, "'label' values must be >= 0"),
    ],
)
def test_folder_dataset_errors_name_the_array(tmp_path, override, message):
    root = _write_folder(tmp_path / "bad", **override)
    with pytest.raises(DataError, match=message):
        load_data(DataConfig(str(root), 0))


def test_folder_dataset_label_out_of_range_and_meta_errors(tmp_path):
    root = _write_folder(tmp_path / "ds", k=3)
    (root / "meta.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    with pytest.raises(DataError, match=r"'label' values must be in 0..1, found 0..2"):
        load_data(DataConfig(str(root), 0))
    (root / "meta.json").write_text(json.dumps({"kinds": {"lidar": "vector"}}))
    with pytest.raises(DataError, match=r"names unknown modality \['lidar'\]"):
        load_data(DataConfig(str(root), 0))


def test_folder_dataset_corrupt_and_pickled_files(tmp_path):
    root = _write_folder(tmp_path / "ds")
    data = (root / "train.npz").read_bytes()
    (root / "train.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train.npz: not a readable npz file"):
        load_data(DataConfig(str(root), 0))
    root2 = _write_folder(tmp_path / "ds2")
    np.savez(root2 / "train.npz", audio=np.array([{"evil": 1}] * 40, dtype=object), label=np.zeros(40, dtype=int))
    with pytest.raises(DataError, match="train.npz: not a readable npz file"):
        load_data(DataConfig(str(root2), 0))
    with pytest.raises(DataError, match="unknown dataset 'nosuch'"):
        load_data(DataConfig("nosuch", 0))


def test_single_modality_folder_is_refused(tmp_path):
    root = tmp_path / "one"
    root.mkdir()
    for name in ("train", "test"):
        np.savez(root / f"{name}.npz", x=np.zeros((10, 3), np.float32), label=np.zeros(10, np.int64))
    with pytest.raises(DataError, match="has 1 modality; mmrobust needs at least 2"):
        load_data(DataConfig(str(root), 0))


def test_validate_batch_errors(tiny_bundle):
    inputs, labels = tiny_bundle.test.take(slice(0, 4))
    validate_batch(tiny_bundle.meta, inputs, labels)
    with pytest.raises(DataError, match="unknown modality array"):
        validate_batch(tiny_bundle.meta, {**inputs, "depth": inputs["strong"]}, labels)
    with pytest.raises(DataError, match="samples have shape"):
        validate_batch(tiny_bundle.meta, {**inputs, "weak": inputs["weak"][:, :3]}, labels)
    bad = Split(inputs, labels + 10)
    with pytest.raises(DataError, match="'label' values must be in 0..3"):
        validate_batch(tiny_bundle.meta, bad.inputs, bad.labels)


def test_dataset_folder_is_the_one_path_rule(tmp_path, monkeypatch):
    """Registered names are never folders; a path-like name or an existing directory is, made absolute."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "synthetic").mkdir()  # a registered name wins over a directory of the same name
    assert dataset_folder("synthetic") is None and dataset_folder("avdigits") is None
    assert dataset_folder("nosuch") is None
    assert dataset_folder("mine") == tmp_path / "mine"
    assert dataset_folder("./later") == tmp_path / "later"  # written like a path: existence is checked on load
    assert dataset_folder("~/x") == Path("~/x").expanduser()
    assert DataConfig("mine").name == str(tmp_path / "mine") and DataConfig("synthetic").name == "synthetic"
    with pytest.raises(DataError, match="dataset folder not found"):
        load_data(DataConfig("./later"))


def test_registry_lists_bundled_datasets_lazily():
    """Importing the data package registers nothing; the first look-up imports the bundled datasets."""
    code = (
        "import sys; from mmrobust.data import DATASETS; "
        "assert 'mmrobust.data.synthetic' not in sys.modules; print(','.join(DATASETS.names()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    ).stdout
    assert out.strip() == "avdigits,synthetic"
