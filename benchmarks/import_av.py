"""Cost of ``mmrobust data import-av`` per clip at Kinetics-Sounds-like sizes, and with decode threads.

Generates ``--clips`` synthetic clips (``--frames-per-clip`` random-noise JPEG frames of 340x256 and a
10 s stereo 44.1 kHz 16-bit WAV each; noise is the worst case for JPEG decoding) in a scratch folder,
then

1. times each stage on every clip (CPU seconds of this process): decoding + resizing 3 frames to
   224, reading the WAV, resampling to 16 kHz, the 128-band log-mel (1024-point STFT, hop 160);
2. imports the folder with ``--workers`` 0 and each value of ``--threads``, interleaved ``--repeats``
   times, and reports the median wall time, clips/s and the speed-up over 0 threads (ratios within
   one run), plus this process's peak RSS. The imports with threads are checked to write the same
   bytes as without.

    python benchmarks/import_av.py [--clips 48] [--threads 2,4] [--repeats 2] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmrobust.data import audio
from mmrobust.data.importav import Clip, ImportOptions, check_clip, import_av, load_frame
from mmrobust.io import write_json
from mmrobust.report.tables import print_table

SR_IN = 44100


def make_clips(root: Path, n: int, frames: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        clip = root / f"class{i % 2}" / f"clip{i:04d}"
        clip.mkdir(parents=True)
        for t in range(frames):
            Image.fromarray(rng.integers(0, 256, (256, 340, 3), dtype=np.uint8)).save(clip / f"{t:03d}.jpg", quality=90)
        x = (0.3 * rng.normal(size=(SR_IN * 10, 2))).clip(-1, 1)
        with wave.open(str(clip / "audio.wav"), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(SR_IN)
            w.writeframes((x * 32767).astype("<i2").tobytes())


def stage_times(root: Path, opts: ImportOptions) -> dict[str, float]:
    """Mean CPU milliseconds per clip of each stage."""
    fb = audio.mel_filterbank(opts.sample_rate, opts.n_fft, opts.n_mels)
    totals = dict.fromkeys(("frames", "read wav", "resample", "log-mel"), 0.0)
    clips = sorted(root.glob("*/*"))
    for d in clips:
        files = check_clip(Clip(d.name, 0, d), opts)
        t0 = time.process_time()
        for p in files.frames:
            load_frame(p, opts.size)
        t1 = time.process_time()
        x, rate = audio.read_wav(files.wav)
        t2 = time.process_time()
        y = audio.fix_length(audio.resample(x, rate, opts.sample_rate), opts.samples)
        t3 = time.process_time()
        audio.spectrogram(y, opts.sample_rate, "logmel", opts.n_fft, opts.hop, opts.n_mels, fb)
        t4 = time.process_time()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            totals[key] += dt
    return {k: 1e3 * v / len(clips) for k, v in totals.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--frames-per-clip", type=int, default=10)
    p.add_argument("--threads", default="2,4", help="comma list of --workers values compared with 0")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=None, help="scratch folder (deleted afterwards)")
    p.add_argument("--out", default="benchmarks/results/import_av.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="mmrobust-importav-", dir=args.dir))
    try:
        src = scratch / "clips"
        make_clips(src, args.clips, args.frames_per_clip)
        base = dict(size=224, seconds=10.0, val=0.1, test=0.1)
        stages = stage_times(src, ImportOptions(**base))
        print_table("CPU ms per clip", ["stage", "ms"], [*stages.items(), ("total", sum(stages.values()))])
        workers = [0] + [int(w) for w in args.threads.split(",") if w.strip()]
        walls: dict[int, list[float]] = {w: [] for w in workers}
        for r in range(args.repeats):
            for w in workers:
                dst = scratch / f"ds-{w}-{r}"
                t0 = time.perf_counter()
                import_av(src, dst, ImportOptions(**base, workers=w))
                walls[w].append(time.perf_counter() - t0)
                if w:
                    ref = scratch / "ds-0-0"  # kept as the reference
                    same = all((ref / f.relative_to(dst)).read_bytes() == f.read_bytes() for f in dst.rglob("*.npy"))
                    if not same:
                        raise SystemExit(f"--workers {w} wrote other bytes than --workers 0")
                if r or w:
                    shutil.rmtree(dst)
        t0 = statistics.median(walls[0])
        rows = [(w, statistics.median(walls[w]), args.clips / statistics.median(walls[w]), t0 / statistics.median(walls[w]))
                for w in workers]  # fmt: skip
        print_table(
            f"import-av, {args.clips} clips (median of {args.repeats})", ["workers", "s", "clips/s", "speed-up"], rows
        )
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {rss:.0f} MiB")
        write_json(
            args.out,
            {
                "clips": args.clips,
                "stage_ms_per_clip": stages,
                "imports": [{"workers": w, "seconds": s, "clips_per_s": c, "speedup": x} for w, s, c, x in rows],
                "peak_rss_mib": rss,
                "cpu_count": os.cpu_count(),
            },
        )
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
