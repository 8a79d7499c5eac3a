"""`mmrobust data import-av`: spectrograms against a brute-force DFT, frames, splits, resume, errors."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrobust.cli import main
from mmrobust.data import DataConfig, audio, load_data
from mmrobust.data.importav import (
    Clip,
    ImportOptions,
    check_clip,
    even_indices,
    import_av,
    load_clip,
    load_frame,
    plan_import,
)
from mmrobust.data.ondisk import partial_path
from mmrobust.errors import ConfigError, DataError

SR = 16000
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]
#: small, fast settings for the tiny clips below
SMALL = dict(frames=2, size=16, n_mels=32, n_fft=256, hop=128, seconds=0.25)


def write_wav(path: Path, x: np.ndarray, rate: int = SR, width: int = 2, channels: int = 1) -> None:
    """PCM WAV with the standard library; ``x`` in [-1, 1], shape (n,) or (n, channels)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1, 1).reshape(len(x), channels)
    if width == 1:
        data = (x * 127 + 128).round().astype(np.uint8).tobytes()
    elif width == 2:
        data = (x * 32767).round().astype("<i2").tobytes()
    elif width == 3:
        v = (x * (2**23 - 1)).round().astype(np.int32).reshape(-1)
        data = np.stack([v & 255, (v >> 8) & 255, (v >> 16) & 255], 1).astype(np.uint8).tobytes()
    else:
        data = (x * (2**31 - 1)).round().astype("<i4").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)


def make_clip(folder: Path, label: int, rng: np.random.Generator, frames: int = 3, seconds: float = 0.25) -> None:
    """Frames: the class colour plus noise; audio: a 500 * 2^label Hz tone plus noise."""
    folder.mkdir(parents=True)
    for t in range(frames):
        img = np.array(COLOURS[label])[None, None, :] + rng.normal(0, 15, (20, 20, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"frame{t}.png")
    n = int(SR * seconds)
    write_wav(
        folder / "audio.wav", 0.5 * np.sin(2 * np.pi * 500 * 2**label * np.arange(n) / SR) + 0.02 * rng.normal(size=n)
    )


def make_clips(root: Path, per_class: int = 5, classes: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k in range(classes):
        for j in range(per_class):
            make_clip(root / f"class{k}" / f"c{k}_{j}", k, rng)
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_clips(tmp_path_factory.mktemp("clips") / "src")


def read_split(root: Path, split: str) -> dict[str, np.ndarray]:
    return {n: np.load(root / split / f"{n}.npy") for n in ("audio", "video", "label")}


# -- audio -------------------------------------------------------------------------------------


def test_spectrogram_of_a_tone_matches_a_brute_force_dft():
    f, n_fft, hop = 1000.0, 256, 64
    x = np.sin(2 * np.pi * f * np.arange(2048) / SR).astype(np.float32)
    t = 8  # a frame away from the zero padding of center=True: it covers x[t*hop - n_fft/2 : ... + n_fft]
    seg = x[t * hop - n_fft // 2 : t * hop + n_fft // 2].astype(np.float64)
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann
    k = np.arange(n_fft // 2 + 1)
    brute = np.abs(((window * seg)[None, :] * np.exp(-2j * np.pi * k[:, None] * n[None, :] / n_fft)).sum(1)) ** 2

    lin = audio.spectrogram(x, SR, "linear", n_fft, hop, 0)
    assert lin.shape == (1, n_fft // 2 + 1, 1 + len(x) // hop)
    power = np.exp(lin[0, :, t].astype(np.float64)) - audio.LOG_EPS
    np.testing.assert_allclose(power, brute, rtol=2e-3, atol=1e-4 * brute.max())
    assert power.argmax() == round(f * n_fft / SR) == 16

    n_mels = 32
    mel = audio.spectrogram(x, SR, "logmel", n_fft, hop, n_mels)
    assert mel.shape == (1, n_mels, 1 + len(x) // hop)
    # HTK mel points computed here independently of the module
    pts = np.linspace(0, 2595 * np.log10(1 + (SR / 2) / 700), n_mels + 2)
    centres = 700 * (10 ** (pts / 2595) - 1)[1:-1]
    assert mel[0, :, t].argmax() == np.abs(centres - f).argmin()
    fb = audio.mel_filterbank(SR, n_fft, n_mels)
    bin_hz = k * SR / n_fft
    for b in (3, 10, 20, 31):  # each triangle peaks at the FFT bin nearest its centre
        assert abs(bin_hz[fb[b].argmax()] - centres[b]) <= SR / n_fft / 2 + 1e-9
    np.testing.assert_allclose(
        np.exp(mel[0, :, t].astype(np.float64)) - audio.LOG_EPS, fb @ brute, rtol=2e-3, atol=1e-4 * brute.max()
    )


def test_resampling_keeps_the_band_and_does_not_alias():
    n = 48000  # one second at 48 kHz: integer cycles, exact FFT bins
    tt = np.arange(n) / 48000
    x = (0.5 * np.sin(2 * np.pi * 1000 * tt) + 0.5 * np.sin(2 * np.pi * 11000 * tt)).astype(np.float32)
    y = audio.resample(x, 48000, SR)
    assert len(y) == SR
    mag = np.abs(np.fft.rfft(y)) / (SR / 2)  # 1 Hz bins; a unit sine has magnitude 1
    assert mag[1000] == pytest.approx(0.5, abs=1e-3)
    assert mag[16000 - 11000] < 1e-3  # linear interpolation folds 11 kHz onto 5 kHz
    up = audio.resample(y, SR, 32000)
    assert len(up) == 32000
    assert np.abs(np.fft.rfft(up) / 16000)[1000] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_reading_all_pcm_widths_and_stereo(tmp_path, width):
    rng = np.random.default_rng(width)
    x = rng.uniform(-0.9, 0.9, size=(400, 2))
    write_wav(tmp_path / "a.wav", x, rate=22050, width=width, channels=2)
    y, rate = audio.read_wav(tmp_path / "a.wav")
    assert rate == 22050 and y.shape == (400,) and y.dtype == np.float32
    np.testing.assert_allclose(y, x.mean(1), atol=2.0 / 2 ** (8 * width - 1) + 1e-7)
    assert audio.wav_info(tmp_path / "a.wav") == (22050, 400)


def test_float_wav_needs_soundfile_or_names_the_extra(tmp_path):
    import struct

    x = np.linspace(-0.5, 0.5, 100, dtype="<f4")
    fmt = struct.pack("<HHIIHH", 3, 1, SR, SR * 4, 4, 32)  # WAVE_FORMAT_IEEE_FLOAT, mono, 32-bit
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", x.nbytes) + x.tobytes()
    (tmp_path / "f.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    try:
        import soundfile  # noqa: F401
    except ImportError:
        with pytest.raises(
            DataError, match=r"f\.wav: not a PCM WAV .* install the av extra \(pip install 'mmrobust\[av\]'\)"
        ):
            audio.read_wav(tmp_path / "f.wav")
    else:
        y, rate = audio.read_wav(tmp_path / "f.wav")
        assert rate == SR and np.array_equal(y, x)


def test_fix_length_crops_the_start_and_pads_the_end():
    x = np.arange(5, dtype=np.float32)
    assert audio.fix_length(x, 3).tolist() == [0, 1, 2]
    assert audio.fix_length(x, 7).tolist() == [0, 1, 2, 3, 4, 0, 0]


def test_too_many_mel_bands_are_refused():
    with pytest.raises(ConfigError, match="get no FFT bin"):
        ImportOptions(n_mels=128, n_fft=256)


# -- frames ------------------------------------------------------------------------------------


def test_frames_are_cropped_to_the_centre_square_and_resized(tmp_path):
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(square).save(tmp_path / "sq.png")
    got = load_frame(tmp_path / "sq.png", 8)
    want = np.asarray(Image.fromarray(square).resize((8, 8), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert got.shape == (3, 8, 8) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, :20] = (255, 0, 0)  # left and right thirds are cropped away
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    got = load_frame(tmp_path / "wide.png", 10)
    assert (got[1] == 255).all() and (got[0] == 0).all() and (got[2] == 0).all()
    deep = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # a 16-bit grey PNG keeps its range
    Image.fromarray(deep).save(tmp_path / "deep.png")
    got = load_frame(tmp_path / "deep.png", 8)
    np.testing.assert_array_equal(got, np.broadcast_to(deep // 257, (3, 8, 8)))


def test_frames_are_sampled_evenly_in_natural_order(tmp_path):
    assert even_indices(7, 3) == [1, 3, 5]
    assert even_indices(3, 3) == [0, 1, 2]
    d = tmp_path / "src" / "a" / "clip"
    d.mkdir(parents=True)
    for i in range(12):  # frame10 sorts before frame2 as text; the grey level encodes the true order
        Image.fromarray(np.full((4, 4, 3), 20 * i, np.uint8)).save(d / f"frame{i}.png")
    write_wav(d / "x.wav", np.zeros(100))
    files = check_clip(Clip("clip", 0, d), ImportOptions(**{**SMALL, "frames": 3}))
    assert [p.name for p in files.frames] == ["frame2.png", "frame6.png", "frame10.png"]
    video, _ = load_clip(Clip("clip", 0, d), files, ImportOptions(**{**SMALL, "frames": 3}), None)
    assert video[:, 0, 0, 0].tolist() == [40, 120, 200]


# -- import: labels, splits, layouts --------------------------------------------------------------


def test_import_labels_and_stratified_seeded_splits(clips, tmp_path):
    r = import_av(clips, tmp_path / "ds", ImportOptions(**SMALL, val=0.2, test=0.2))
    assert r.sizes == {"train": 9, "val": 3, "test": 3} and r.class_names == ["class0", "class1", "class2"]
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    # stored raw (pixel intensities, raw log spectrogram); the model standardises (spec normalization)
    assert meta["complete"] and meta["storage"]["video"] == {
        "dtype": "uint8",
        "scale": 1 / 255,
        "mean": 0.0,
        "std": 1.0,
    }
    assert meta["storage"]["audio"] == {"dtype": "float32", "scale": 1.0, "mean": 0.0, "std": 1.0}
    video, spec = meta["modalities"][1], meta["modalities"][0]
    assert video["valid_range"] == [0.0, 1.0] and video["units"] == "pixel intensity in [0, 1]"
    assert video["normalization"] == {"mean": [0.45], "std": [0.225], "axis": 0}
    assert spec["units"].startswith("log mel power") and len(spec["normalization"]["std"]) == 1
    assert [m["shape"] for m in meta["modalities"]] == [[1, 32, 1 + 4000 // 128], [2, 3, 16, 16]]
    members: dict[str, list[int]] = {}
    for split in ("train", "val", "test"):
        d = read_split(tmp_path / "ds", split)
        # every class once per held-out split (1 of 5 = 0.2), its colour in the frames, its tone in the audio
        assert np.bincount(d["label"], minlength=3).tolist() == ([3, 3, 3] if split == "train" else [1, 1, 1])
        dominant = d["video"].astype(float).mean(axis=(1, 3, 4)).argmax(1)
        np.testing.assert_array_equal(dominant, d["label"])
        bins = d["audio"][:, 0].mean(-1).argmax(-1)
        assert (np.diff(bins[np.argsort(d["label"], kind="stable")][:: max(1, len(bins) // 3)]) > 0).all()
        members[split] = d["video"][:, 0, 0, 0, 0].tolist()
    again = plan_import(clips, ImportOptions(**SMALL, val=0.2, test=0.2))
    other = plan_import(clips, ImportOptions(**SMALL, val=0.2, test=0.2, split_seed=1))
    ids = {s: [c.clip_id for c, _ in again.rows[s]] for s in again.rows}
    assert ids == {
        s: [c.clip_id for c, _ in plan_import(clips, ImportOptions(**SMALL, val=0.2, test=0.2)).rows[s]] for s in ids
    }
    assert ids != {s: [c.clip_id for c, _ in other.rows[s]] for s in ids}
    assert sorted(sum(ids.values(), [])) == sorted(f"c{k}_{j}" for k in range(3) for j in range(5))


def test_wav_beside_the_frame_folder_gives_the_same_dataset(clips, tmp_path):
    import shutil

    moved = tmp_path / "src"
    shutil.copytree(clips, moved)
    for wav in sorted(moved.glob("*/*/audio.wav")):
        wav.rename(wav.parent.parent / f"{wav.parent.name}.wav")  # SRC/<class>/<clip_id>.wav + SRC/<class>/<clip_id>/
    opts = ImportOptions(**SMALL, val=0.2, test=0.2, name="clips")
    import_av(clips, tmp_path / "a", opts)
    import_av(moved, tmp_path / "b", opts)
    for split in ("train", "val", "test"):
        for name in ("audio", "video", "label"):
            f = f"{split}/{name}.npy"
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_linear_float16_spectrograms_peak_at_each_class_tone(clips, tmp_path):
    opts = ImportOptions(**{**SMALL, "n_fft": 256}, spectrogram="linear", spec_dtype="float16", val=0.2, test=0.2)
    import_av(clips, tmp_path / "ds", opts)
    d = read_split(tmp_path / "ds", "train")
    assert d["audio"].dtype == np.float16 and d["audio"].shape[1:] == (1, 129, 1 + 4000 // 128)
    # class k is a 500 * 2^k Hz tone: FFT bin 500 * 2^k * 256 / 16000 = 8 * 2^k
    np.testing.assert_array_equal(d["audio"][:, 0].astype(np.float32).mean(-1).argmax(-1), 8 * 2 ** d["label"])


def test_csv_layout_with_split_column_and_label_checks(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "clips"
    rows = ["clip_id,label,split"]
    for j, (lab, split) in enumerate([(0, "train"), (1, "train"), (0, "val"), (1, "test"), (1, "train")]):
        make_clip(src / f"id{j}", lab, rng)
        rows.append(f"id{j},{['cat', 'dog'][lab]},{split}")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    plan = plan_import(src, ImportOptions(**SMALL, csv=str(tmp_path / "l.csv")))
    assert plan.class_names == ["cat", "dog"]
    assert {s: [(c.clip_id, c.label) for c, _ in plan.rows[s]] for s in plan.rows} == {
        "train": [("id0", 0), ("id1", 1), ("id4", 1)],
        "val": [("id2", 0)],
        "test": [("id3", 1)],
    }
    with pytest.raises(DataError, match=r"l.csv:3: clip 'id1' has unknown label 'dog'"):
        plan_import(src, ImportOptions(**SMALL, csv=str(tmp_path / "l.csv"), classes="cat,bird"))
    bad = {
        "dup.csv": (
            "clip_id,label\nid0,cat\nid1,dog\nid0,dog\n",
            r"dup.csv:4: duplicate clip id 'id0' \(first on line 2\)",
        ),
        "split.csv": ("clip_id,label,split\nid0,cat,dev\n", r"split.csv:2: clip 'id0' has split 'dev'"),
        "out.csv": ("clip_id,label\n../x,cat\nid1,dog\n", r"out.csv:2: clip id '../x' points outside"),
        "head.csv": ("id,label\nid0,cat\n", "the header must be 'clip_id,label'"),
        "nul.csv": ("clip_id,label\nid0,c\x00at\n", r"nul.csv:2: a NUL byte; this is not a text CSV file"),
        "empty.csv": ("clip_id,label\n", "no clips listed"),
    }
    for name, (text, msg) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=msg):
            plan_import(src, ImportOptions(**SMALL, csv=str(tmp_path / name)))


# -- bad input -----------------------------------------------------------------------------------


def _break(kind: str, clip: Path) -> None:
    if kind == "no wav":
        (clip / "audio.wav").unlink()
    elif kind == "two wavs":
        (clip / "b.wav").write_bytes((clip / "audio.wav").read_bytes())
    elif kind == "wav beside too":
        (clip.parent / f"{clip.name}.wav").write_bytes((clip / "audio.wav").read_bytes())
    elif kind == "few frames":
        (clip / "frame2.png").unlink()
        (clip / "frame1.png").unlink()
    elif kind == "bad image":
        (clip / "frame0.png").write_bytes(b"not an image")
    elif kind == "bad wav":
        (clip / "audio.wav").write_bytes(b"RIFF....WAVEjunk")
    elif kind == "empty wav":
        write_wav(clip / "audio.wav", np.zeros(0))


@pytest.mark.parametrize(
    ("kind", "msg"),
    [
        ("no wav", r"clip 'c1_2': no \.wav file in .* nor c1_2\.wav beside it"),
        ("two wavs", r"clip 'c1_2': 2 WAV files \(c1_2/audio\.wav, c1_2/b\.wav\)"),
        ("wav beside too", r"clip 'c1_2': 2 WAV files \(c1_2/audio\.wav, c1_2\.wav\)"),
        ("few frames", r"clip 'c1_2': frames=2, but it has 1 \(\*\.jpg, \*\.jpeg, \*\.png\) in "),
        ("bad image", r"clip 'c1_2': unreadable image .*frame0\.png"),
        ("bad wav", r"clip 'c1_2': .*audio\.wav: (unreadable|not a PCM) WAV"),
        ("empty wav", r"clip 'c1_2': .*audio\.wav: WAV file holds no samples"),
    ],
)
def test_bad_clips_are_fatal_or_skipped(tmp_path, kind, msg):
    src = make_clips(tmp_path / "src", per_class=3)
    _break(kind, src / "class1" / "c1_2")
    opts = ImportOptions(**{**SMALL, "frames": 2}, val=0.34, test=0.34)
    with pytest.raises(DataError, match=msg):
        import_av(src, tmp_path / "ds", opts)
    assert not (tmp_path / "ds").exists()  # checked before anything is written
    r = import_av(src, tmp_path / "ds", ImportOptions(**{**SMALL, "frames": 2}, val=0.34, test=0.34, skip_bad=True))
    assert [c for c, _ in r.skipped] == ["c1_2"] and sum(r.sizes.values()) == 8
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["info"]["skipped"] == ["c1_2"]


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        plan_import(tmp_path / "empty", ImportOptions(**SMALL))
    src = make_clips(tmp_path / "src", per_class=2, classes=2)
    (src / "class1" / "c0_0").mkdir()
    with pytest.raises(DataError, match="duplicate clip id 'c0_0': in class folders 'class0' and 'class1'"):
        plan_import(src, ImportOptions(**SMALL))
    (src / "class1" / "c0_0").rmdir()
    (src / "class1" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="class1: unexpected file 'notes.txt'"):
        plan_import(src, ImportOptions(**SMALL))
    (src / "class1" / "notes.txt").unlink()
    (src / "class1" / "lost.wav").write_bytes(b"")
    with pytest.raises(DataError, match=r"lost\.wav: a WAV without its frame folder lost/"):
        plan_import(src, ImportOptions(**SMALL))
    (src / "class1" / "lost.wav").unlink()
    (src / "class2").mkdir()
    with pytest.raises(DataError, match="class 'class2' has no clips"):
        plan_import(src, ImportOptions(**SMALL))
    (src / "class2").rmdir()
    with pytest.raises(DataError, match="split 'val' gets no clips"):
        plan_import(src, ImportOptions(**SMALL, val=0.1, test=0.1))
    with pytest.raises(DataError, match=r"class folder\(s\) \['class1'\] not in classes"):
        plan_import(src, ImportOptions(**SMALL, classes="class0,other"))


# -- resume --------------------------------------------------------------------------------------


class _Interrupt:
    """A progress callback that presses Ctrl-C once ``after`` clips are imported."""

    def __init__(self, after: int) -> None:
        self.after = after

    def __call__(self, what: str, done: int, total: int) -> None:
        if what == "import" and done >= self.after:
            raise KeyboardInterrupt


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_interrupted_import_resumes_to_the_same_bytes(clips, tmp_path):
    opts = ImportOptions(**SMALL, val=0.2, test=0.2)
    # the reference is decoded by 2 threads: the bytes must not depend on it
    import_av(clips, tmp_path / "whole", ImportOptions(**SMALL, val=0.2, test=0.2, workers=2), chunk=2)
    dst = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        import_av(clips, dst, opts, chunk=2, progress=_Interrupt(4))
    partial = partial_path(dst)
    assert not dst.exists() and json.loads((partial / "meta.json").read_text())["complete"] is False
    with pytest.raises(DataError, match="incomplete"):
        load_data(DataConfig(str(partial)))
    r = import_av(clips, dst, opts, chunk=2)
    assert (r.resumed_rows, r.written_rows) == (4, 11)  # only the missing rows are decoded again
    assert not partial.exists()
    assert _files(dst) == _files(tmp_path / "whole")
    # a partial import of other options is not resumed: it starts again
    with pytest.raises(KeyboardInterrupt):
        import_av(clips, tmp_path / "b", opts, chunk=2, progress=_Interrupt(4))
    r = import_av(clips, tmp_path / "b", ImportOptions(**{**SMALL, "size": 8}, val=0.2, test=0.2), chunk=2)
    assert (
        r.resumed_rows == 0
        and json.loads((tmp_path / "b" / "meta.json").read_text())["modalities"][1]["shape"][-1] == 8
    )


def test_a_clip_that_fails_to_decode_leaves_no_complete_dataset(tmp_path):
    src = make_clips(tmp_path / "src", per_class=3)
    png = src / "class2" / "c2_2" / "frame2.png"
    png.write_bytes(png.read_bytes()[:60])  # the header reads, the pixels do not
    dst = tmp_path / "ds"
    with pytest.raises(DataError, match=r"clip 'c2_2': .*frame2\.png: unreadable image .*fix the clip and rerun"):
        import_av(src, dst, ImportOptions(**SMALL, val=0.34, test=0.34))
    assert not dst.exists()
    with pytest.raises(DataError, match="incomplete"):
        load_data(DataConfig(str(partial_path(dst))))


@pytest.mark.parametrize(
    ("options", "param", "needle"),
    [
        ({"size": 0}, "size", "option 'size' must be in [1, 4096], got 0"),
        ({"n_mels": 0}, "n_mels", "option 'n_mels' must be in [1, 1024], got 0"),
        ({"val": 0.6, "test": 0.5}, ("val", "test"), "val + test must be < 1, got 0.6 + 0.5"),
        ({"spec_dtype": "int8"}, "spec_dtype", "spec_dtype must be float32 or float16"),
        ({"classes": "a"}, "classes", "classes must list at least 2"),
    ],
)
def test_option_errors_name_python_parameters(options, param, needle):
    """Python callers read Python names; ``param`` lets the CLI put its flag in their place."""
    with pytest.raises(ConfigError) as info:
        ImportOptions(**options)
    assert needle in str(info.value) and "--" not in str(info.value) and info.value.param == param


def test_existing_destination_names_force(clips, tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=r"already exists; pass force=True to replace it") as info:
        import_av(clips, tmp_path / "ds", ImportOptions(**SMALL))
    assert info.value.param == "force"


# -- CLI -----------------------------------------------------------------------------------------


def _one_line_error(capsys, argv: list[str], needle: str) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmrobust: error: "), err
    assert needle in err[0], err[0]


def test_cli_errors_exit_2_on_one_line(clips, tmp_path, capsys):
    imp = ["data", "import-av", str(clips), str(tmp_path / "ds"), "--no-progress"]
    # the library names Python parameters (error.param); the CLI shows its flags in their place
    _one_line_error(capsys, [*imp, "--size", "0"], "option '--size' must be in [1, 4096], got 0")
    _one_line_error(capsys, [*imp, "--frames", "-2"], "option '--frames' must be in [1, 256], got -2")
    _one_line_error(capsys, [*imp, "--seconds", "0"], "option '--seconds' must be in (0, 3600], got 0")
    _one_line_error(capsys, [*imp, "--frames", "4"], "clip 'c0_0': --frames=4, but it has 3 (*.jpg")
    _one_line_error(capsys, [*imp, "--frames", "4"], "(or pass --skip-bad to skip bad clips)")
    _one_line_error(capsys, [*imp, "--val", "0.6", "--test", "0.5"], "--val + --test must be < 1")
    _one_line_error(
        capsys, ["data", "import-av", str(tmp_path / "none"), str(tmp_path / "ds")], "source folder not found"
    )
    _one_line_error(capsys, [*imp, "--spectrogram", "mfcc"], "argument --spectrogram: invalid choice")
    _one_line_error(capsys, ["data", "import-av", str(clips), str(clips / "ds")], "lies inside SRC")
    assert not (tmp_path / "ds").exists() and not partial_path(tmp_path / "ds").exists()
    (tmp_path / "ds").mkdir()
    _one_line_error(capsys, imp, "already exists; pass --force to replace it")


@pytest.mark.slow
def test_cli_end_to_end_import_train_attack_certify(tmp_path, capsys):
    """A clip folder -> on-disk dataset -> JT run -> paper attack suite -> certificate, all through the CLI."""
    src = make_clips(tmp_path / "src", per_class=6)
    ds, run = tmp_path / "ds", tmp_path / "run"
    argv = ["data", "import-av", str(src), str(ds), "--frames", "2", "--size", "16", "--n-mels", "32", "--n-fft",
            "256", "--hop", "128", "--seconds", "0.25", "--val", "0.17", "--test", "0.17", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "imported 18 clips of 3 classes (train 12, val 3, test 3; 0 skipped)" in capsys.readouterr().out
    assert main(["train", "--data", str(ds), "--method", "jt", "--epochs", "2", "--batch-size", "4",
                 "--feature-dim", "16", "--no-progress", "--out", str(run)]) == 0  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 2 / 3, metrics  # colours and tones are easy: chance is 1/3
    assert main(["evaluate", str(run), "--suite", "paper", "--steps", "2", "--no-progress"]) == 0
    rows = json.loads((run / "eval.json").read_text())["results"]
    assert {tuple(r["modalities"]) for r in rows if r["attack"] == "pgd-l2"} == {
        ("audio", "video"),
        ("audio",),
        ("video",),
    }
    assert main(["certify", str(run), "--lipschitz-samples", "8"]) == 0
    assert (run / "certify.json").is_file()


def test_cli_ctrl_c_then_the_same_command_continues(clips, tmp_path, capsys, monkeypatch):
    import mmrobust.data.importav as importav

    real, calls = importav.load_clip, []

    def load_clip(*args):
        calls.append(1)
        if len(calls) == 10:  # the train split (9 clips, one chunk) is on disk; val is being decoded
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(importav, "load_clip", load_clip)
    argv = ["data", "import-av", str(clips), str(tmp_path / "ds"), "--val", "0.2", "--test", "0.2", "--no-progress"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == "mmrobust: interrupted; rerun the same command to continue"
    assert not (tmp_path / "ds").exists()
    assert main(argv) == 0
    assert "imported 15 clips" in (out := capsys.readouterr().out) and "resumed after 9 clips already written" in out
    assert len(calls) == 10 + 6
