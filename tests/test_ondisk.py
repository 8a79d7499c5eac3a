"""The on-disk streaming format: writer, reader, DataLoader streaming, convert CLI, faults, resume."""

from __future__ import annotations

import json
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrobust.cli import main
from mmrobust.data import DataConfig, iterate_batches, load_data
from mmrobust.data.base import DatasetMeta, ModalitySpec
from mmrobust.data.ondisk import DiskSplit, DiskWriter, Storage, convert, reader, tools
from mmrobust.errors import DataError
from mmrobust.io import sha256_file
from tests.conftest import TINY

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def disk(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny synthetic bundle converted to float32 on disk (do not modify)."""
    path = tmp_path_factory.mktemp("ondisk") / "tiny"
    convert(tiny_bundle, path)
    return path


def _same_batches(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb)
        assert xa.keys() == xb.keys()
        for k in xa:
            assert xb[k].dtype == torch.float32
            assert torch.equal(xa[k], xb[k]), k


@pytest.mark.parametrize("workers", [0, 2])
def test_round_trip_same_batches_order_and_sharding(tiny_bundle, disk, workers):
    """Streamed batches equal the in-memory ones: plain, shuffled (two epochs) and rank 1 of 2."""
    bundle = load_data(DataConfig(str(disk), 0, {"workers": workers}))
    assert isinstance(bundle.train, DiskSplit)
    assert bundle.meta.to_dict() == {**tiny_bundle.meta.to_dict(), "info": bundle.meta.info}
    for split in SPLITS:
        mem, dsk = tiny_bundle.split(split), bundle.split(split)
        _same_batches(iterate_batches(mem, 32), iterate_batches(dsk, 32))
    for kw in ({"shuffle": True, "epoch": 0}, {"shuffle": True, "epoch": 1, "drop_last": True},
               {"shuffle": True, "rank": 1, "world_size": 2}, {"rank": 0, "world_size": 2}):  # fmt: skip
        _same_batches(
            iterate_batches(tiny_bundle.train, 24, seed=3, **kw), iterate_batches(bundle.train, 24, seed=3, **kw)
        )


def test_take_and_subset_read_only_requested_rows(tiny_bundle, disk, monkeypatch):
    """take() reads exactly the rows asked for (any order, repeats); subset() reads nothing."""
    bundle = load_data(DataConfig(str(disk)))
    reads: list[int] = []
    real = reader.read_rows
    monkeypatch.setattr(reader, "read_rows", lambda fd, f, rows: (reads.extend(rows.tolist()), real(fd, f, rows))[1])
    sub = bundle.test.subset(torch.tensor([7, 3, 3, 50]))
    assert reads == []
    x, y = sub.take(torch.tensor([3, 1, 0]))
    n_mod = len(bundle.meta.modalities)
    assert sorted(reads) == sorted([3, 7, 50] * n_mod)
    want_x, want_y = tiny_bundle.test.take(torch.tensor([50, 3, 7]))
    assert torch.equal(y, want_y) and all(torch.equal(x[k], want_x[k]) for k in x)


def test_uint8_storage_decodes_within_half_a_step(tmp_path):
    """A bring-your-own npz folder with a [0, 1] image converts with --uint8: decode within half a step."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for name, n in (("train", 40), ("val", 10), ("test", 12)):
        img = rng.integers(0, 256, (n, 1, 4, 4)).astype(np.float32) / 255
        np.savez(src / f"{name}.npz", image=img, audio=rng.normal(size=(n, 6)).astype(np.float32),
                 label=rng.integers(0, 3, n))  # fmt: skip
    (src / "meta.json").write_text(json.dumps({"valid_ranges": {"image": [0, 1]}}))
    assert main(["data", "convert", str(src), str(tmp_path / "dst"), "--uint8", "image", "--no-progress"]) == 0
    mem, dsk = load_data(DataConfig(str(src))), load_data(DataConfig(str(tmp_path / "dst")))
    meta = json.loads((tmp_path / "dst" / "meta.json").read_text())
    assert meta["storage"]["image"]["dtype"] == "uint8" and meta["storage"]["audio"]["dtype"] == "float32"
    assert np.load(tmp_path / "dst" / "test" / "image.npy").dtype == np.uint8
    lo, hi = mem.meta.spec("image").valid_range
    assert dsk.meta.spec("image").valid_range == pytest.approx((lo, hi))
    for split in SPLITS:
        (xm, ym), (xd, yd) = mem.split(split).take(slice(None)), dsk.split(split).take(slice(None))
        assert torch.equal(ym, yd) and torch.equal(xm["audio"], xd["audio"])
        # pixels were k/255: the byte grid holds them exactly (up to float rounding)
        assert (xm["image"] - xd["image"]).abs().max() < 1e-5 * (hi - lo)
    assert (tmp_path / "dst" / "train" / "image.npy").stat().st_size < (
        tmp_path / "dst" / "train" / "audio.npy"
    ).stat().st_size


def test_writer_checks_every_chunk(tmp_path):
    meta = DatasetMeta("t", [ModalitySpec("a", "vector", (3,)), ModalitySpec("b", "vector", (2,))], ["x", "y"])
    sizes = {"train": 4, "val": 2, "test": 2}
    w = DiskWriter.create(tmp_path / "w", meta, sizes, {"a": Storage(), "b": Storage("float16")})
    ok = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 2), np.float16)}
    labels = np.array([0, 1])
    bad = [
        ({**ok, "a": np.zeros((2, 4), np.float32)}, labels, 0, "shape"),
        ({**ok, "b": np.zeros((2, 2), np.float32)}, labels, 0, "dtype"),
        ({**ok, "a": np.full((2, 3), np.nan, np.float32)}, labels, 0, "NaN"),
        ({"a": ok["a"]}, labels, 0, "expected"),
        (ok, np.array([0, 2]), 0, "label values"),
        (ok, labels, 3, "past the split size"),
    ]
    for inputs, lab, start, msg in bad:
        with pytest.raises(DataError, match=msg):
            w.write("train", start, inputs, lab)
    w.write("train", 0, ok, labels)
    with pytest.raises(DataError, match="never written"):
        w.finish()
    with pytest.raises(DataError, match="not an empty folder"):
        DiskWriter.create(tmp_path / "w", meta, sizes, {"a": Storage(), "b": Storage()})
    with pytest.raises(DataError, match="storage dtype"):
        Storage("int32")
    with pytest.raises(DataError, match="> 0"):
        Storage("uint8", scale=0.0)


def test_writer_resumes_after_interruption(tiny_bundle, tmp_path, monkeypatch):
    """An interrupted convert leaves no DST; the rerun keeps the rows written and gives the same files."""
    fresh = convert(tiny_bundle, tmp_path / "fresh")
    monkeypatch.setattr(tools, "rows_per_chunk", lambda row_bytes: 50)
    calls = []

    def stop_after_two(what, done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_bundle, tmp_path / "dst", progress=stop_after_two)
    assert not (tmp_path / "dst").exists()
    writer = DiskWriter.reopen(tmp_path / ".dst.partial")
    assert writer.written["train"] == [[0, 100]] and writer.missing("train") == [(100, len(tiny_bundle.train))]
    writer.close()
    with pytest.raises(DataError, match="incomplete"):
        load_data(DataConfig(str(tmp_path / ".dst.partial")))
    res = convert(tiny_bundle, tmp_path / "dst")
    assert res.resumed_rows == 100
    assert not (tmp_path / ".dst.partial").exists()
    for split in SPLITS:
        for name in [*tiny_bundle.meta.modality_names, "label"]:
            rel = Path(split) / f"{name}.npy"
            assert sha256_file(fresh.path / rel) == sha256_file(tmp_path / "dst" / rel)
    digests = json.loads((tmp_path / "dst" / "meta.json").read_text())["sha256"]
    assert digests["train"]["label"] == sha256_file(tmp_path / "dst" / "train" / "label.npy")


def test_fingerprint_reads_no_inputs(disk, monkeypatch):
    """Opening and fingerprinting read the labels only; the fingerprint changes with the content digest."""
    reads = []
    real = reader.read_rows
    monkeypatch.setattr(reader, "read_rows", lambda fd, f, rows: (reads.append(f.path.name), real(fd, f, rows))[1])
    bundle = load_data(DataConfig(str(disk)))
    assert set(reads) == {"label.npy"}
    meta = json.loads((disk / "meta.json").read_text())
    meta["sha256"]["test"]["label"] = "0" * 64
    from mmrobust.data.ondisk import ondisk_fingerprint

    other = disk.parent / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps(meta))
    for split in SPLITS:
        (other / split).symlink_to(disk / split)
    assert ondisk_fingerprint(other) != bundle.source["fingerprint"] == ondisk_fingerprint(disk)


def test_folder_values_are_checked_once(tmp_path, monkeypatch):
    """A bring-your-own folder: each array is checked for NaN/inf once per load, not three times."""
    rng = np.random.default_rng(0)
    for name, n in (("train", 30), ("test", 10)):
        np.savez(tmp_path / f"{name}.npz", a=rng.normal(size=(n, 5)), b=rng.normal(size=(n, 3)),
                 label=rng.integers(0, 2, n))  # fmt: skip
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: (calls.append(x.shape), real(x))[1])
    load_data(DataConfig(str(tmp_path)))
    assert len([s for s in calls if len(s) == 2 and s[0] >= 10]) == 4  # 2 files x 2 modalities


def _fault(disk: Path, tmp_path: Path, how: str) -> Path:
    bad = tmp_path / how
    shutil.copytree(disk, bad)
    meta = json.loads((bad / "meta.json").read_text())
    if how == "version":
        meta["version"] = 99
    elif how == "format":
        meta["format"] = "zarr"
    elif how == "incomplete":
        meta["complete"] = False
    elif how == "missing":
        (bad / "val" / "weak.npy").unlink()
    elif how == "truncated":
        with (bad / "test" / "label.npy").open("r+b") as fh:
            fh.truncate(200)
    elif how == "labels":
        labels = np.load(bad / "train" / "label.npy", mmap_mode="r+")
        labels[5] = 99
        labels.flush()
        del labels
    elif how == "dtype":
        meta["storage"]["strong"]["dtype"] = "float16"
    (bad / "meta.json").write_text(json.dumps(meta))
    return bad


@pytest.mark.parametrize(
    ("how", "message"),
    [("version", "version 99 is not supported"), ("format", "format is 'zarr'"),
     ("incomplete", "incomplete \\(interrupted write\\); rerun the import/convert to resume"),
     ("missing", "weak.npy: file missing"), ("truncated", "truncated"), ("dtype", "dtype float32, expected float16"),
     ("labels", "label.npy: values must be in 0..3, found 0..99")],
)  # fmt: skip
def test_bad_folders_one_line_errors_via_cli(disk, tmp_path, capsys, how, message):
    bad = _fault(disk, tmp_path, how)
    assert main(["train", "--data", str(bad), "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmrobust: error:")
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_verify_rehashes_every_array_and_names_the_changed_ones(disk, tmp_path, capsys):
    assert main(["data", "verify", str(disk), "--no-progress"]) == 0
    assert "all 9 arrays match meta.json" in capsys.readouterr().out
    bad = tmp_path / "edited"
    shutil.copytree(disk, bad)
    for split in ("val", "test"):  # a silent edit: still finite, same shape, so opening cannot see it
        arr = np.load(bad / split / "weak.npy", mmap_mode="r+")
        arr[0, 0] += 1.0
        arr.flush()
        del arr
    before = sorted(p.name for p in bad.rglob("*"))
    assert main(["data", "verify", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 of 9 arrays differ from the sha256 in meta.json (val/weak, test/weak)" in err
    assert sorted(p.name for p in bad.rglob("*")) == before  # nothing written
    with pytest.raises(DataError, match=r"val/weak.npy: changed since the dataset was written"):
        load_data(DataConfig(str(bad)))  # opening re-hashes the small splits (val, test): issue 22


def test_convert_cli_refusals(tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    cases = [
        (["data", "convert", "synthetic", str(out)], "already exists; pass --force"),
        (["data", "convert", "nosuchdata", str(tmp_path / "y")], "unknown dataset"),
        (["data", "convert", "synthetic", str(tmp_path / "y"), "--uint8", "strong"], "no valid range"),
        (["data", "convert", "synthetic", str(tmp_path / "y"), "--uint8", "zzz"], "unknown modality 'zzz'"),
        (["data", "convert", "synthetic", str(tmp_path / "y"), "--data-opt", "workers=-1"], "unknown option|workers"),
        (["data", "bogus"], "invalid choice"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) if argv[1] == "bogus" else nullcontext() as exc:
            rc = main(argv)
        rc = exc.value.code if argv[1] == "bogus" else rc  # type: ignore[union-attr]
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, (argv, err)
        assert re.search(msg, err), (argv, err)
        assert not (tmp_path / "y").exists()


def test_train_evaluate_certify_from_disk_via_cli(tmp_path, capsys, monkeypatch):
    """convert -> train -> evaluate (paper suite) -> certify, with no code path loading a whole split."""

    def whole_split(self):
        raise AssertionError("a whole on-disk split was loaded")

    monkeypatch.setattr(DiskSplit, "inputs", property(whole_split))
    dst = tmp_path / "data"
    opts = [x for k, v in TINY.items() for x in ("--data-opt", f"{k}={v}")]
    assert main(["data", "convert", "synthetic", str(dst), *opts, "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(dst), "--data-opt", "workers=1", "--epochs", "1", "--batch-size", "32",
                 "--feature-dim", "16", "--out", str(run), "--no-progress"]) == 0  # fmt: skip
    assert json.loads((run / "config.json").read_text())["data"]["name"] == str(dst)
    assert main(["evaluate", str(run), "--suite", "paper", "--steps", "2", "--no-progress"]) == 0
    assert main(["certify", str(run), "--lipschitz", "smoothing", "--cert-opt", "n=20", "--cert-opt", "n0=5"]) == 0
    assert (run / "eval.json").is_file() and (run / "certify.json").is_file()
    capsys.readouterr()


def test_training_from_disk_gives_the_same_weights(disk, tmp_path):
    """Same config, data in memory vs streamed from disk (float32): bit-identical trained weights."""
    from mmrobust.io import load_tensors
    from mmrobust.training import train
    from tests.conftest import tiny_config

    weights = {}
    for where, name in (("memory", "synthetic"), ("disk", str(disk))):
        cfg = tiny_config(epochs=1)
        cfg.data = DataConfig(name, 0, dict(TINY) if name == "synthetic" else {})
        train(cfg, out=tmp_path / where)
        weights[where] = load_tensors(tmp_path / where / "model.safetensors")
    assert weights["memory"].keys() == weights["disk"].keys()
    assert all(torch.equal(weights["memory"][k], weights["disk"][k]) for k in weights["memory"])


def test_convert_refusals_name_python_parameters(tiny_bundle, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="already exists; pass force=True to replace it") as info:
        convert(tiny_bundle, tmp_path / "x")
    assert info.value.param == "force"
    with pytest.raises(DataError, match="uint8 names modality 'strong', which has no valid range") as info:
        convert(tiny_bundle, tmp_path / "y", uint8=["strong"])
    assert info.value.param == "uint8" and not (tmp_path / "y").exists()
