"""A small, deterministic, labelled audio-visual clip set in ``mmrobust data import-av``'s layout.

The project ships no raw waveforms; this writes ``OUT/<class>/<clip_id>/`` folders, each with
``--frames`` PNG frames and one 16-bit mono WAV (``clip.wav``), for the waveform-space vs
feature-space robustness comparison of docs/units.md.

* audio of class ``k``: a linear chirp from ``f0_k`` to ``f1_k`` (classes spread over 300-3000 Hz;
  the per-class pair is drawn once from the seed), each clip with a random +-8 % frequency jitter,
  random amplitude 0.2-0.6, random onset within the first quarter, a 10 ms fade in/out and white
  noise (std 0.05), clipped to [-0.9, 0.9];
* frames of class ``k``: a grey 16x16 (``--size``) image holding a filled square at a class-specific
  position whose brightness varies per clip, plus Gaussian pixel noise (std 40 of 255) - a weak
  visual cue, so that the audio matters.

Everything comes from ``numpy.random.default_rng(seed)`` in a fixed order: the same arguments give
the same bytes. Then, e.g.::

    python benchmarks/make_clips.py --out /tmp/clips
    mmrobust data import-av /tmp/clips /tmp/clips-wave --waveform --frames 2 --size 16 \\
        --sample-rate 8000 --seconds 0.5 --n-fft 256 --hop 128 --n-mels 32
"""

from __future__ import annotations

import argparse
import wave
from pathlib import Path

import numpy as np
from PIL import Image


def chirp(rng: np.random.Generator, f0: float, f1: float, sr: int, n: int) -> np.ndarray:
    jitter = 1.0 + rng.uniform(-0.08, 0.08)
    amp = rng.uniform(0.2, 0.6)
    onset = int(rng.integers(0, n // 4))
    length = n - onset
    t = np.arange(length) / sr
    dur = length / sr
    phase = 2 * np.pi * jitter * (f0 * t + (f1 - f0) * t**2 / (2 * dur))
    tone = amp * np.sin(phase + rng.uniform(0, 2 * np.pi))
    fade = min(length // 2, int(0.01 * sr))
    env = np.ones(length)
    env[:fade] = np.linspace(0, 1, fade)
    env[length - fade :] = np.linspace(1, 0, fade)
    x = np.zeros(n)
    x[onset:] = tone * env
    x += rng.normal(0, 0.05, n)
    return np.clip(x, -0.9, 0.9)


def frame(rng: np.random.Generator, k: int, classes: int, size: int) -> np.ndarray:
    img = np.full((size, size), 96.0)
    side = max(2, size // 4)
    cells = size - side
    row, col = divmod(k, int(np.ceil(np.sqrt(classes))))
    n_cells = int(np.ceil(np.sqrt(classes)))
    top, left = (row * cells) // max(1, n_cells - 1), (col * cells) // max(1, n_cells - 1)
    img[top : top + side, left : left + side] = rng.uniform(120, 200)
    img += rng.normal(0, 40, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_wav(path: Path, x: np.ndarray, sr: int) -> None:
    pcm = np.round(x * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write (OUT/<class>/<clip_id>/)")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--clips", type=int, default=60, help="clips per class")
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--sample-rate", type=int, default=8000)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    n = round(args.seconds * args.sample_rate)
    edges = np.geomspace(300, 3000, args.classes + 1)
    bands = [(edges[k], edges[k + 1]) for k in range(args.classes)]
    sweeps = [(lo, hi) if rng.random() < 0.5 else (hi, lo) for lo, hi in bands]
    out = Path(args.out)
    for k in range(args.classes):
        for i in range(args.clips):
            clip = out / f"class{k}" / f"c{k}_{i:03d}"
            clip.mkdir(parents=True, exist_ok=True)
            write_wav(clip / "clip.wav", chirp(rng, *sweeps[k], args.sample_rate, n), args.sample_rate)
            for t in range(args.frames):
                Image.fromarray(frame(rng, k, args.classes, args.size)).convert("RGB").save(clip / f"{t:03d}.png")
    print(f"wrote {args.classes * args.clips} clips of {args.classes} classes into {out}")


if __name__ == "__main__":
    main()
