"""Import a folder of audio-visual clips into the on-disk dataset format (``mmrobust data import-av``).

Two layouts (see docs/data.md); a *clip folder* holds the clip's frames (``*.jpg``, ``*.jpeg``,
``*.png``, in natural name order) and exactly one ``*.wav``, or the WAV lies beside it as
``<clip_folder>.wav``:

* class folders: ``SRC/<class>/<clip_id>/`` (class names = folder names, sorted);
* a CSV: ``--csv FILE`` with a header ``clip_id,label[,split]`` and the clip folders at
  ``SRC/<clip_id>/`` (class names = the sorted labels, or ``--classes``).

Per clip, ``frames`` frames sampled evenly (segment centres) are centre-cropped to a square and
resized to ``size`` x ``size`` (Pillow, bilinear), stored uint8 as a ``video`` ``(T, 3, S, S)``
decoded on the fly as pixel intensities ``x / 255`` in [0, 1] (the model standardises them with
``frame_mean``/``frame_std``: ``spec.normalization``); the WAV is mixed to mono, resampled to
``sample_rate`` (FFT), cropped/zero-padded to ``seconds`` and turned into a log spectrogram
``(1, bins, frames)`` (see :mod:`mmrobust.data.audio`), stored raw; the model standardises it by
one mean/std estimated on up to :data:`STATS_CLIPS` training clips.

With ``keep_waveform`` the audio modality is the waveform itself, ``(1, samples)`` float32 in
[-1, 1] (units "waveform amplitude in [-1, 1]"), and ``meta.info["front_ends"]`` records the
log-mel front end (same settings, same statistics) that the model applies as a differentiable
layer (:class:`mmrobust.models.transform.LogMelFrontEnd`): attacks can then perturb the waveform.

Datasets imported by earlier versions store standardised values (units "standardised", no
normalization) and keep working unchanged.

Every clip is checked (files present, enough frames, image and WAV headers readable) before
anything is written; bad clips are fatal unless ``skip_bad``. Rows are written in chunks through
:class:`~mmrobust.data.ondisk.DiskWriter` into ``.<DST>.partial``, renamed to DST once complete;
the writer records the rows on disk, so an interrupted import resumes where it stopped and gives
the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmrobust.data import audio
from mmrobust.data.base import (
    FRONT_ENDS,
    PIXEL_UNITS,
    WAVEFORM_UNITS,
    DatasetMeta,
    ModalitySpec,
    Normalization,
    stratified_split,
)
from mmrobust.data.ondisk import SPLITS, DiskWriter, Storage, partial_path, publish
from mmrobust.errors import ConfigError, DataError
from mmrobust.options import check_range
from mmrobust.publish import Lock, check_destination, resolve_target

if TYPE_CHECKING:
    from mmrobust.progress import ProgressFn

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: training clips (evenly spaced) whose spectrograms give the audio mean/std
STATS_CLIPS = 256
#: modality names of an imported dataset
AUDIO, VIDEO = "audio", "video"
_SPLIT_NAMES = set(SPLITS)


def _check_range(value: float, low: float | None, high: float | None, name: str, *, low_open: bool = False) -> None:
    """:func:`~mmrobust.options.check_range` of the option ``name``, its error carrying ``param=name``."""
    try:
        check_range(value, low, high, name, low_open=low_open)
    except ConfigError as exc:
        raise ConfigError(str(exc), param=name) from None


@dataclass
class ImportOptions:
    """Options of ``mmrobust data import-av`` (one field per flag)."""

    frames: int = 3  # video frames per clip, sampled evenly
    size: int = 64  # frames are resized to size x size
    spectrogram: str = "logmel"  # logmel | linear (log power on linear frequency bins)
    n_mels: int = 128
    n_fft: int = 1024
    hop: int = 160  # STFT hop in samples at sample_rate (160 = 10 ms at 16 kHz)
    sample_rate: int = 16000
    seconds: float = 2.0  # audio duration: crop or zero-pad
    spec_dtype: str = "float32"  # float32 | float16
    frame_mean: float = 0.45  # frames decode as (x / 255 - frame_mean) / frame_std
    frame_std: float = 0.225
    val: float = 0.1  # stratified split fractions (ignored when the CSV has a split column)
    test: float = 0.1
    split_seed: int = 0
    csv: str | None = None  # CSV of clip_id,label[,split]; clip folders are SRC/<clip_id>/
    classes: str | None = None  # comma list: fixes the class order and refuses other labels
    skip_bad: bool = False  # skip clips that fail the checks (counted) instead of stopping
    workers: int = 0  # threads decoding clips (0: in the calling thread); the bytes do not depend on it
    name: str | None = None  # dataset name (default: SRC's folder name)
    keep_waveform: bool = False  # store the waveform; the model computes the spectrogram (a front end)

    def __post_init__(self) -> None:
        _check_range(self.frames, 1, 256, "frames")
        _check_range(self.size, 1, 4096, "size")
        _check_range(self.n_mels, 1, 1024, "n_mels")
        _check_range(self.n_fft, 8, 1 << 16, "n_fft")
        _check_range(self.hop, 1, self.n_fft, "hop")
        _check_range(self.sample_rate, 1000, 384000, "sample_rate")
        _check_range(self.seconds, 0, 3600, "seconds", low_open=True)
        _check_range(self.frame_std, 0, None, "frame_std", low_open=True)
        _check_range(self.workers, 0, 256, "workers")
        _check_range(self.val, 0, 1, "val")
        _check_range(self.test, 0, 1, "test")
        _check_range(self.split_seed, 0, 2**32 - 1, "split_seed")
        if self.val + self.test >= 1:
            raise ConfigError(f"val + test must be < 1, got {self.val} + {self.test}", param=("val", "test"))
        if self.spectrogram not in audio.SPECTROGRAMS:
            raise ConfigError(
                f"spectrogram must be one of {', '.join(audio.SPECTROGRAMS)}, got {self.spectrogram!r}",
                param="spectrogram",
            )
        if self.spec_dtype not in ("float32", "float16"):
            raise ConfigError(f"spec_dtype must be float32 or float16, got {self.spec_dtype!r}", param="spec_dtype")
        if self.spectrogram == "logmel":
            audio.mel_filterbank(self.sample_rate, self.n_fft, self.n_mels)  # refuses empty bands
        if self.classes is not None:
            names = [c.strip() for c in self.classes.split(",")]
            if len(names) < 2 or not all(names) or len(set(names)) != len(names):
                raise ConfigError(
                    f"classes must list at least 2 distinct non-empty names, got {self.classes!r}", param="classes"
                )

    @property
    def samples(self) -> int:
        return max(1, round(self.seconds * self.sample_rate))

    @property
    def spec_shape(self) -> tuple[int, int, int]:
        bins = self.n_mels if self.spectrogram == "logmel" else self.n_fft // 2 + 1
        return (1, bins, 1 + self.samples // self.hop)

    @property
    def audio_shape(self) -> tuple[int, ...]:
        return (1, self.samples) if self.keep_waveform else self.spec_shape

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        return (self.frames, 3, self.size, self.size)

    def processing(self) -> dict[str, Any]:
        """The options that decide the stored bytes (recorded in meta.json, checked on resume)."""
        d = asdict(self)
        del d["skip_bad"], d["workers"]
        return d


@dataclass(frozen=True)
class Clip:
    """One source clip: its id, class index, folder, the split a CSV gives it (or None)."""

    clip_id: str
    label: int
    folder: Path
    split: str | None = None


@dataclass
class ClipFiles:
    """The files a clip contributes: the chosen frames (in order) and its WAV."""

    frames: list[Path]
    wav: Path


@dataclass
class ImportPlan:
    """What an import will write: classes, each split's clips in row order, the skipped clips."""

    src: Path
    options: ImportOptions
    class_names: list[str]
    rows: dict[str, list[tuple[Clip, ClipFiles]]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (clip_id, reason)

    @property
    def sizes(self) -> dict[str, int]:
        return {s: len(self.rows[s]) for s in SPLITS}

    def fingerprint(self) -> str:
        """sha256 of the processing options and every (split, row, clip, label, files) entry."""
        entries = [
            [s, i, c.clip_id, c.label, [p.name for p in f.frames], f.wav.name]
            for s in SPLITS
            for i, (c, f) in enumerate(self.rows[s])
        ]
        blob = json.dumps({"options": self.options.processing(), "classes": self.class_names, "rows": entries})
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class ImportResult:
    """What :func:`import_av` did."""

    dst: Path
    sizes: dict[str, int]
    class_names: list[str]
    skipped: list[tuple[str, str]]
    resumed_rows: int  # rows already on disk from an interrupted import (0 for a fresh one)
    written_rows: int  # rows written by this call
    seconds: float


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _visible(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _class_list(opts: ImportOptions) -> list[str] | None:
    return [c.strip() for c in opts.classes.split(",")] if opts.classes is not None else None


def scan_class_folders(src: Path, opts: ImportOptions) -> tuple[list[Clip], list[str]]:
    """Clips of the ``SRC/<class>/<clip_id>/`` layout; files at the top of SRC are ignored."""
    class_dirs = [p for p in _visible(src) if p.is_dir()]
    if not class_dirs:
        raise DataError(f"{src}: no class folders (expected SRC/<class>/<clip_id>/; or pass csv=FILE)", param="csv")
    given = _class_list(opts)
    names = given if given is not None else [p.name for p in class_dirs]
    if given is not None:
        unknown = [p.name for p in class_dirs if p.name not in given]
        if unknown:
            raise DataError(f"{src}: class folder(s) {unknown} not in classes {given}", param="classes")
    if len(names) < 2:
        raise DataError(f"{src}: found {len(names)} class folder ({names[0]}); need at least 2 classes")
    clips: list[Clip] = []
    seen: dict[str, str] = {}
    for label, name in enumerate(names):
        cdir = src / name
        if not cdir.is_dir():
            raise DataError(f"{cdir}: class '{name}' of classes has no folder", param="classes")
        entries = [p for p in _visible(cdir) if p.is_dir()]
        for p in _visible(cdir):
            if p.is_dir() or (p.suffix.lower() == ".wav" and (cdir / p.stem).is_dir()):
                continue  # a clip folder, or the WAV beside one
            if p.suffix.lower() == ".wav":
                raise DataError(f"{p}: a WAV without its frame folder {p.stem}/ beside it")
            raise DataError(
                f"{cdir}: unexpected file '{p.name}'; a class folder holds one folder per clip (a CSV layout? pass csv=FILE)",
                param="csv",
            )
        if not entries:
            raise DataError(f"{cdir}: class '{name}' has no clips")
        for d in entries:
            if d.name in seen:
                raise DataError(f"duplicate clip id '{d.name}': in class folders '{seen[d.name]}' and '{name}'")
            seen[d.name] = name
            clips.append(Clip(d.name, label, d))
    return clips, names


def scan_csv(src: Path, csv_path: Path, opts: ImportOptions) -> tuple[list[Clip], list[str]]:
    """Clips of the CSV layout: ``clip_id,label[,split]`` rows, clip folders ``SRC/<clip_id>/``."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{csv_path}: CSV file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: unreadable CSV file ({exc})") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"{csv_path}:{line}: a NUL byte; this is not a text CSV file")
    reader = csv.reader(text.splitlines())
    header = [h.strip() for h in next(reader, [])]
    if header[:2] != ["clip_id", "label"] or header[2:] not in ([], ["split"]):
        raise DataError(
            f"{csv_path}: the header must be 'clip_id,label' or 'clip_id,label,split', got {','.join(header)!r}"
        )
    has_split = len(header) == 3
    rows: list[tuple[int, str, str, str | None]] = []
    seen: dict[str, int] = {}
    root = src.resolve()
    for line, rec in enumerate(reader, start=2):
        if not rec or all(not v.strip() for v in rec):
            continue
        if len(rec) != len(header):
            raise DataError(f"{csv_path}:{line}: expected {len(header)} fields, got {len(rec)}")
        clip_id, label = rec[0].strip(), rec[1].strip()
        split = rec[2].strip() if has_split else None
        if not clip_id or not label:
            raise DataError(f"{csv_path}:{line}: empty clip_id or label")
        folder = (src / clip_id).resolve()
        if clip_id.startswith(("/", "\\")) or not folder.is_relative_to(root) or folder == root:
            raise DataError(f"{csv_path}:{line}: clip id '{clip_id}' points outside {src}")
        if clip_id in seen:
            raise DataError(f"{csv_path}:{line}: duplicate clip id '{clip_id}' (first on line {seen[clip_id]})")
        seen[clip_id] = line
        if split is not None and split not in _SPLIT_NAMES:
            raise DataError(f"{csv_path}:{line}: clip '{clip_id}' has split '{split}'; use train, val or test")
        rows.append((line, clip_id, label, split))
    if not rows:
        raise DataError(f"{csv_path}: no clips listed")
    given = _class_list(opts)
    names = given if given is not None else sorted({r[2] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    for line, clip_id, label, _ in rows:
        if label not in index:
            raise DataError(
                f"{csv_path}:{line}: clip '{clip_id}' has unknown label '{label}'; classes lists {names}",
                param="classes",
            )
    if len(names) < 2:
        raise DataError(f"{csv_path}: found {len(names)} class ('{names[0]}'); need at least 2 classes")
    return [Clip(cid, index[lab], src / cid, sp) for _, cid, lab, sp in rows], names


def even_indices(n: int, t: int) -> list[int]:
    """``t`` of ``n`` indices at the centres of ``t`` equal segments (all of them when ``n == t``)."""
    return [int((i + 0.5) * n / t) for i in range(t)]


def check_clip(clip: Clip, opts: ImportOptions) -> ClipFiles:
    """The files of one clip, checked cheaply (headers only); errors name the clip and file."""
    if not clip.folder.is_dir():
        raise DataError(f"clip '{clip.clip_id}': folder {clip.folder} not found")
    files = [p for p in _visible(clip.folder) if p.is_file()]
    wavs = [p for p in files if p.suffix.lower() == ".wav"]
    wavs += [b for b in (clip.folder.parent / f"{clip.folder.name}{e}" for e in (".wav", ".WAV")) if b.is_file()]
    images = sorted((p for p in files if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
    if not wavs:
        raise DataError(f"clip '{clip.clip_id}': no .wav file in {clip.folder} nor {clip.folder.name}.wav beside it")
    if len(wavs) > 1:
        names = ", ".join(str(p.relative_to(clip.folder.parent)) for p in wavs[:2])
        raise DataError(f"clip '{clip.clip_id}': {len(wavs)} WAV files ({names}); keep one")
    if len(images) < opts.frames:
        raise DataError(
            f"clip '{clip.clip_id}': frames={opts.frames}, but it has {len(images)} (*.jpg, *.jpeg, *.png) "
            f"in {clip.folder}",
            param="frames",
        )
    chosen = [images[i] for i in even_indices(len(images), opts.frames)]
    image_mod = _pillow()
    for p in chosen:
        try:
            with image_mod.open(p) as im:
                w, h = im.size
        except (OSError, ValueError, image_mod.DecompressionBombError) as exc:
            raise DataError(f"clip '{clip.clip_id}': unreadable image {p} ({exc})") from None
        if w < 1 or h < 1:
            raise DataError(f"clip '{clip.clip_id}': image {p} is empty")
    try:
        audio.wav_info(wavs[0])
    except DataError as exc:
        raise DataError(f"clip '{clip.clip_id}': {exc}") from None
    return ClipFiles(chosen, wavs[0])


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("reading frames needs Pillow: install the av extra (pip install 'mmrobust[av]')") from None
    return Image


def load_frame(path: Path, size: int) -> np.ndarray:
    """One frame as uint8 ``(3, size, size)``: RGB (16-bit grey scaled to 8 bits), centre-cropped to a
    square, bilinear resize."""
    image_mod = _pillow()
    try:
        with image_mod.open(path) as im:
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey PNG: convert("RGB") would clip at 255
                im = image_mod.fromarray((np.asarray(im, dtype=np.int64) // 257).clip(0, 255).astype(np.uint8))
            square = im.convert("RGB").crop((left, top, left + side, top + side))
            rgb = square.resize((size, size), image_mod.Resampling.BILINEAR)
    except (OSError, ValueError, image_mod.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_waveform(path: Path, opts: ImportOptions) -> np.ndarray:
    """The clip's mono float32 waveform at ``sample_rate``, ``samples`` long (cropped or zero-padded)."""
    x, rate = audio.read_wav(path)
    return audio.fix_length(audio.resample(x, rate, opts.sample_rate), opts.samples)


def load_audio(path: Path, opts: ImportOptions, fb: np.ndarray | None) -> np.ndarray:
    """The clip's float32 log spectrogram ``(1, bins, frames)``, not standardised."""
    x = load_waveform(path, opts)
    return audio.spectrogram(x, opts.sample_rate, opts.spectrogram, opts.n_fft, opts.hop, opts.n_mels, fb)


def stored_audio(path: Path, opts: ImportOptions, fb: np.ndarray | None) -> np.ndarray:
    """What the audio modality stores: the spectrogram, or with ``keep_waveform`` the waveform
    ``(1, samples)`` clipped to [-1, 1] (resampling may ring slightly past full scale)."""
    if not opts.keep_waveform:
        return load_audio(path, opts, fb)
    return np.clip(load_waveform(path, opts), -1.0, 1.0)[None, :]


def _filterbank(opts: ImportOptions) -> np.ndarray | None:
    return audio.mel_filterbank(opts.sample_rate, opts.n_fft, opts.n_mels) if opts.spectrogram == "logmel" else None


def load_clip(
    clip: Clip, files: ClipFiles, opts: ImportOptions, fb: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(video uint8 (T, 3, S, S), spectrogram (1, bins, frames) in spec_dtype)`` of one clip
    (with ``keep_waveform``: the float32 waveform ``(1, samples)`` instead of the spectrogram)."""
    try:
        video = np.stack([load_frame(p, opts.size) for p in files.frames])
        spec = stored_audio(files.wav, opts, fb)
    except DataError as exc:
        raise DataError(f"clip '{clip.clip_id}': {exc}") from None
    return video, spec.astype("float32" if opts.keep_waveform else opts.spec_dtype)


def plan_import(src: str | Path, opts: ImportOptions) -> ImportPlan:
    """Scan SRC, check every clip and assign splits (stratified by class, seeded, unless the CSV gives them)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: source folder not found")
    if opts.csv is not None:
        clips, names = scan_csv(src, Path(opts.csv), opts)
    else:
        clips, names = scan_class_folders(src, opts)
    good: list[tuple[Clip, ClipFiles]] = []
    skipped: list[tuple[str, str]] = []
    for clip in clips:
        try:
            good.append((clip, check_clip(clip, opts)))
        except DataError as exc:
            if not opts.skip_bad:
                raise DataError(
                    f"{exc} (or pass skip_bad=True to skip bad clips)", param=(*exc.params, "skip_bad")
                ) from None
            skipped.append((clip.clip_id, str(exc)))
    counts = np.bincount([c.label for c, _ in good], minlength=len(names))
    empty = [names[k] for k in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"{src}: class(es) {empty} have no usable clips")
    given = [c.split for c, _ in good]
    split_of: list[str]
    if any(s is not None for s in given):
        split_of = [str(s) for s in given]  # the CSV gives every clip's split
    else:
        labels = np.array([c.label for c, _ in good])
        # one stratified assignment in a fixed clip order: the same seed gives the same splits
        parts = stratified_split(labels, (opts.val, opts.test), np.random.default_rng(opts.split_seed))
        split_of = [""] * len(good)
        for split, idx in zip(("train", "val", "test"), parts, strict=True):
            for i in idx:
                split_of[int(i)] = split
    rows: dict[str, list[tuple[Clip, ClipFiles]]] = {s: [] for s in SPLITS}
    for (clip, files), split in zip(good, split_of, strict=True):
        rows[split].append((clip, files))
    for s in SPLITS:
        rows[s].sort(key=lambda cf: (cf[0].label, cf[0].clip_id))
        if not rows[s]:
            where = (
                "the CSV's split column"
                if any(x is not None for x in given)
                else f"the fractions val={opts.val}, test={opts.test}"
            )
            raise DataError(
                f"{src}: split '{s}' gets no clips from {where} ({len(good)} usable clips); every split needs one"
            )
    return ImportPlan(src, opts, names, rows, skipped)


def _audio_stats(plan: ImportPlan, fb: np.ndarray | None) -> tuple[float, float]:
    """Mean and std of the spectrogram values over up to STATS_CLIPS evenly spaced training clips."""
    train = plan.rows["train"]
    pick = sorted(set(np.linspace(0, len(train) - 1, min(STATS_CLIPS, len(train))).round().astype(int).tolist()))
    total, total_sq, count = 0.0, 0.0, 0
    for i in pick:
        clip, files = train[i]
        try:
            s = load_audio(files.wav, plan.options, fb).astype(np.float64)
        except DataError as exc:
            raise DataError(f"clip '{clip.clip_id}': {exc}") from None
        total, total_sq, count = total + s.sum(), total_sq + np.square(s).sum(), count + s.size
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    return float(mean), std if std > 1e-6 else 1.0


#: units of an imported spectrogram
SPECTROGRAM_UNITS = {"logmel": "log mel power, log(P + 1e-6)", "linear": "log power, log(P + 1e-6)"}


def build_meta(plan: ImportPlan, audio_mean: float, audio_std: float) -> tuple[DatasetMeta, dict[str, Storage]]:
    """Metadata and storage: values stored raw, the standardisation recorded for the model."""
    opts = plan.options
    frames = Normalization((opts.frame_mean,), (opts.frame_std,))
    if opts.keep_waveform:
        audio_spec = ModalitySpec(AUDIO, "sequence", opts.audio_shape, (-1.0, 1.0), WAVEFORM_UNITS)
        audio_storage = Storage("float32", 1.0, 0.0, 1.0)
    else:
        audio_spec = ModalitySpec(
            AUDIO, "spectrogram", opts.spec_shape, None, SPECTROGRAM_UNITS[opts.spectrogram],
            Normalization((audio_mean,), (audio_std,)),
        )  # fmt: skip
        audio_storage = Storage(opts.spec_dtype, 1.0, 0.0, 1.0)
    specs = [audio_spec, ModalitySpec(VIDEO, "video", opts.video_shape, (0.0, 1.0), PIXEL_UNITS, frames)]
    storage = {AUDIO: audio_storage, VIDEO: Storage("uint8", 1.0 / 255.0, 0.0, 1.0)}
    info: dict[str, Any] = {
        "importer": "import-av",
        "source": str(plan.src.resolve()),
        "options": opts.processing(),
        "mel_scale": "htk" if opts.spectrogram == "logmel" else None,
        "skipped": [cid for cid, _ in plan.skipped],
        "plan_sha256": plan.fingerprint(),
    }
    if opts.keep_waveform:
        info[FRONT_ENDS] = {
            AUDIO: {
                "type": "logmel", "spectrogram": opts.spectrogram, "sample_rate": opts.sample_rate,
                "n_fft": opts.n_fft, "hop": opts.hop, "n_mels": opts.n_mels, "mean": audio_mean, "std": audio_std,
            }
        }  # fmt: skip
    name = opts.name or plan.src.resolve().name or "clips"
    return DatasetMeta(name, specs, plan.class_names, info), storage


def _open_writer(plan: ImportPlan, partial: Path) -> tuple[DiskWriter, int]:
    """A writer for the partial folder: resumed when it holds an interrupted import of the same plan."""
    if partial.exists():
        writer: DiskWriter | None
        try:
            writer = DiskWriter.reopen(partial)
        except DataError:
            writer = None  # unreadable: start again
        if writer is not None and writer.meta.info.get("plan_sha256") == plan.fingerprint():
            return writer, sum(plan.sizes[s] - sum(b - a for a, b in writer.missing(s)) for s in SPLITS)
        if writer is not None:
            writer.close()  # other clips or options were being imported here: start again
        shutil.rmtree(partial)
    meta, storage = build_meta(plan, *_audio_stats(plan, _filterbank(plan.options)))
    return DiskWriter.create(partial, meta, plan.sizes, storage), 0


def import_av(
    src: str | Path,
    dst: str | Path,
    opts: ImportOptions,
    *,
    force: bool = False,
    progress: ProgressFn | None = None,
    chunk: int = 16,
) -> ImportResult:
    """Import the clips of ``src`` into the on-disk dataset ``dst``.

    The dataset is written to :func:`partial_path` and renamed to ``dst`` once complete, so ``dst``
    is absent or complete; rerunning an interrupted import resumes it (rows already written are kept)
    when the clips and options are the same, and starts again otherwise. ``force`` replaces an
    existing ``dst`` once the new dataset is complete.
    """
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    t0 = time.perf_counter()
    src, dst = Path(src), resolve_target(dst)
    check_destination(dst, force=force, param="dst", empty_ok=False, error=DataError)
    if dst.resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"DST {dst} lies inside SRC {src}; choose a folder outside it")
    with Lock(dst, "dataset"):
        return _import_locked(src, dst, opts, progress, chunk, t0)


def _import_locked(
    src: Path, dst: Path, opts: ImportOptions, progress: ProgressFn | None, chunk: int, t0: float
) -> ImportResult:
    """:func:`import_av` once DST is resolved, checked and locked."""
    plan = plan_import(src, opts)
    partial = partial_path(dst)
    writer, resumed = _open_writer(plan, partial)
    fb = _filterbank(opts)
    total, done, written = sum(plan.sizes.values()), resumed, 0
    # Pillow, numpy's FFT and torch.stft release the GIL: threads decode clips in parallel, in order
    pool = ThreadPoolExecutor(opts.workers) if opts.workers > 0 else None
    try:
        if progress is not None:
            progress("import", done, total)
        for split in SPLITS:
            rows = plan.rows[split]
            for a, b in writer.missing(split):
                for start in range(a, b, chunk):
                    part = rows[start : min(b, start + chunk)]
                    try:
                        if pool is not None:
                            loaded = list(pool.map(lambda cf: load_clip(cf[0], cf[1], opts, fb), part))
                        else:
                            loaded = [load_clip(c, f, opts, fb) for c, f in part]
                    except DataError as exc:
                        raise DataError(
                            f"{exc}; the rows written so far are kept in {partial}: fix the clip and rerun to resume"
                        ) from None
                    writer.write(
                        split,
                        start,
                        {VIDEO: np.stack([v for v, _ in loaded]), AUDIO: np.stack([s for _, s in loaded])},
                        np.array([c.label for c, _ in part], dtype=np.int64),
                    )
                    done, written = done + len(part), written + len(part)
                    if progress is not None:
                        progress("import", done, total)
        writer.finish(progress)
    finally:
        writer.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    publish(partial, dst)
    return ImportResult(dst, plan.sizes, plan.class_names, plan.skipped, resumed, written, time.perf_counter() - t0)


def parse_options(values: dict[str, Any]) -> ImportOptions:
    """Options from CLI values (``None`` = the default)."""
    from mmrobust.options import build_options

    return build_options(ImportOptions, {k: v for k, v in values.items() if v is not None}, "import-av")


__all__: Sequence[str] = [
    "Clip",
    "ImportOptions",
    "ImportPlan",
    "ImportResult",
    "check_clip",
    "import_av",
    "load_clip",
    "plan_import",
]
