"""Fault catalogue for the data boundary: every bad dataset option or file is refused up front.

Each CLI case asserts exit code 2, one line ``mmrobust: error: ...`` naming the problem, no
traceback, and that the run folder was never created.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmrobust.cli import main
from mmrobust.data import DataConfig, load_data
from mmrobust.errors import MMRobustError


def _folder(root: Path, n: int = 40, k: int = 3, test_override: dict | None = None, **override) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "audio": rng.normal(size=(n, 5, 8)).astype(np.float32),
        "video": rng.uniform(size=(n, 1, 6, 6)).astype(np.float32),
        "label": rng.integers(0, k, size=n),
    }
    arrays.update(override)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "train.npz", **arrays)
    test = {key: v[:10] for key, v in arrays.items()}
    test.update(test_override or {})
    np.savez(root / "test.npz", **test)
    return root


def _huge_header_npz(path: Path) -> None:
    """An npz whose 'audio' member declares a (10^6, 10^6) float32 array but holds a few bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("audio.npy", header.getvalue() + b"\0" * 64)
        buf = io.BytesIO()
        np.save(buf, np.zeros(4, dtype=np.int64))
        zf.writestr("label.npy", buf.getvalue())


def _meta(root: Path, meta: object) -> Path:
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    ok = _folder(tmp / "ok")
    huge = _folder(tmp / "huge")
    _huge_header_npz(huge / "train.npz")
    mismatch = _folder(tmp / "mismatch", test_override={"audio": np.zeros((10, 5, 9), np.float32)})
    labels2d = _folder(tmp / "labels2d", label=np.zeros((40, 2), np.int64))
    outside = _folder(tmp / "outside")
    return [
        (
            ["--data", "synthetic", "--data-opt", "nosuch=1"],
            "['nosuch']; valid: classes, dim, n_test, n_train, n_val, names, noise, signal",
        ),
        (["--data", "synthetic", "--data-opt", "classes=abc"], "option 'synthetic.classes' expects int, got 'abc'"),
        (["--data", "synthetic", "--data-opt", "classes=2.5"], "expects int, got '2.5'"),
        (["--data", "synthetic", "--data-opt", "signal=1,nan"], "'signal' must be finite"),
        (["--data", "synthetic", "--data-opt", "dim=99999999999"], "dim must be in 1..1000000"),
        (["--data", "avdigits", "--data-opt", "val_fraction=abc"], "'avdigits.val_fraction' expects float, got 'abc'"),
        (["--data", "avdigits", "--data-opt", "seq_len=1"], "seq_len must be in 4..4096"),
        (["--data", str(ok), "--data-opt", "val_fraction=abc"], "expects float, got 'abc'"),
        (["--data", str(ok), "--data-opt", "val_fraction=1.5"], "'val_fraction' must be in (0, 1)"),
        (["--data", str(ok), "--data-opt", "normalize_inputs=flase"], "expects bool, got 'flase'"),
        (["--data", str(ok), "--data-opt", "max_array_gb=-1"], "'max_array_gb' must be >= 0"),
        (["--data", str(huge)], "declares shape (1000000, 1000000)"),
        (["--data", str(mismatch)], "'audio' samples have shape (5, 9), train.npz has (5, 8)"),
        (["--data", str(labels2d)], "'label' must be 1-d"),
        (["--data", str(_meta(outside, {"valid_ranges": {"video": [0.0, 0.5]}}))], "outside its declared valid range"),
        (["--data", str(_meta(_folder(tmp / "m1"), {"valid_ranges": None}))], "'valid_ranges' must map modality"),
        (["--data", str(_meta(_folder(tmp / "m2"), {"class_names": 5}))], "'class_names' must be a list"),
        (["--data", str(_meta(_folder(tmp / "m3"), {"class_names": "xyz"}))], "'class_names' must be a list"),
        (["--data", str(_meta(_folder(tmp / "m4"), {"normalize": "no"}))], "'normalize' must be true or false"),
        (["--data", str(_meta(_folder(tmp / "m5"), {"valid_ranges": {"video": [1, 0]}}))], "finite low < high"),
        (["--data", str(_meta(_folder(tmp / "m6"), {"kinds": {"audio": "noise"}}))], "kinds['audio'] is 'noise'"),
        (["--data", str(_meta(_folder(tmp / "m7"), {"colour": 1}))], "unknown key(s) ['colour']"),
        (["--data", str(_meta(_folder(tmp / "m8"), [1, 2]))], "must hold a JSON object"),
        (
            ["--data", str(_meta(_folder(tmp / "m9"), {"normalize": False})), "--data-opt", "normalize_inputs=true"],
            "make them agree",
        ),
    ]


def test_data_fault_catalogue(tmp_path, capsys):
    cases = _cases(tmp_path / "data")
    assert len(cases) >= 20
    for i, (args, expected) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code = main(["train", *args, "--epochs", "1", "--no-progress", "--out", str(out)])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("mmrobust: error: "), (args, err)
        assert expected in lines[0], (args, lines[0])
        assert "Traceback" not in err
        assert not out.exists(), args


def test_meta_normalize_false_is_honoured(tmp_path):
    root = _meta(_folder(tmp_path / "ds"), {"normalize": False})
    raw = np.load(root / "test.npz")["audio"]
    bundle = load_data(DataConfig(str(root), 0))
    assert torch.equal(bundle.test.inputs["audio"], torch.from_numpy(raw))  # untouched
    assert bundle.meta.spec("audio").normalization is None  # and the model will not standardise it
    normed = load_data(DataConfig(str(_folder(tmp_path / "ds2")), 0))
    # by default the data stay as stored and the model standardises them (the normalization in the meta)
    assert torch.equal(normed.test.inputs["audio"], torch.from_numpy(raw))
    assert normed.meta.spec("audio").normalization is not None


def test_array_limit_is_configurable(tmp_path, monkeypatch):
    root = _folder(tmp_path / "ds")  # train audio is 40*5*8*4 bytes = 6400 B
    with pytest.raises(MMRobustError, match=r"\(6,400 bytes\), over the limit of 1,073 bytes"):
        load_data(DataConfig(str(root), 0, {"max_array_gb": "0.000001"}))
    monkeypatch.setenv("MMROBUST_MAX_ARRAY_GB", "0.000001")
    with pytest.raises(MMRobustError, match="raise it with the data option max_array_gb"):
        load_data(DataConfig(str(root), 0))
    assert len(load_data(DataConfig(str(root), 0, {"max_array_gb": "1"})).test) == 10


def test_avdigits_cache_is_verified_and_rebuilt(tmp_path, monkeypatch):
    from mmrobust.data import avdigits
    from mmrobust.data.fetch import cache_dir

    wheels = cache_dir() / "wheels"
    if not wheels.is_dir():
        pytest.skip("the avdigits wheels are not cached on this machine")
    shutil.copytree(wheels, tmp_path / "wheels")
    monkeypatch.setenv("MMROBUST_CACHE", str(tmp_path))
    first = avdigits._raw_arrays()  # builds the cache and its checksum
    cache = tmp_path / "avdigits-v1.npz"
    assert (tmp_path / "avdigits-v1.npz.sha256").is_file()
    cache.write_bytes(cache.read_bytes()[:1000])  # truncate
    with pytest.warns(UserWarning, match="does not match its checksum"):
        again = avdigits._raw_arrays()
    assert np.array_equal(first["image"], again["image"])
    data = bytearray(cache.read_bytes())
    data[-200] ^= 0xFF  # a flipped byte inside the archive: same size, wrong content
    cache.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding"):
        avdigits._raw_arrays()
    assert avdigits._read_cache(cache) is not None  # the rebuilt cache verifies


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    meta=st.dictionaries(
        st.sampled_from(["class_names", "kinds", "valid_ranges", "name", "normalize", "other"]), _json, max_size=3
    )
)
def test_fuzzed_meta_json_loads_or_fails_cleanly(tmp_path, meta):
    root = tmp_path / "fuzz"
    if not root.exists():
        _folder(root)
    (root / "meta.json").write_text(json.dumps(meta))
    try:
        load_data(DataConfig(str(root), 0))
    except MMRobustError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    options=st.dictionaries(
        st.sampled_from(["names", "signal", "noise", "dim", "classes", "n_train", "bogus"]),
        st.one_of(st.text(max_size=6), st.integers(-3, 40), st.floats(allow_nan=True), st.booleans(), st.none()),
        max_size=3,
    )
)
def test_fuzzed_synthetic_options_load_or_fail_cleanly(options):
    options = {"n_train": 30, "n_val": 10, "n_test": 10, "dim": 4, **options}
    try:
        bundle = load_data(DataConfig("synthetic", 0, options))
    except MMRobustError as exc:
        assert "\n" not in str(exc)
    else:
        assert len(bundle.meta.modalities) >= 2
