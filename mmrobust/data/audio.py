"""WAV reading, resampling and spectrograms with numpy/torch only (no torchaudio, no librosa).

* :func:`read_wav`: mono float32 samples in [-1, 1] and the sample rate. ``soundfile`` (the ``av``
  extra) is used when installed; otherwise the standard library's ``wave`` reads PCM WAV
  (8/16/24/32-bit integer). Channels are averaged.
* :func:`resample`: band-limited FFT resampling (numpy), exact for a periodic signal; no aliasing.
* :func:`fix_length`: crop to the first ``n`` samples or zero-pad at the end.
* :func:`spectrogram`: ``torch.stft`` with a periodic Hann window, ``center=True`` (zero padding),
  power ``P = |X|^2``; ``linear`` gives ``log(P + 1e-6)`` on the ``n_fft // 2 + 1`` linear
  frequency bins, ``logmel`` gives ``log(M @ P + 1e-6)`` with the HTK mel filterbank ``M`` of
  :func:`mel_filterbank`. Output shape ``(1, bins, frames)`` with ``frames = 1 + n // hop``.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch

from mmrobust.errors import ConfigError, DataError

#: added to the power before the logarithm (silence maps to log(1e-6) = -13.8)
LOG_EPS = 1e-6
SPECTROGRAMS = ("logmel", "linear")


def _not_pcm(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"{path}: not a PCM WAV file the standard library can read ({exc}); install the av extra "
        "(pip install 'mmrobust[av]') to read other WAV encodings with soundfile"
    )


def _read_wave_stdlib(path: Path) -> tuple[np.ndarray, int]:
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except wave.Error as exc:
        raise _not_pcm(path, exc) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable WAV file ({exc})") from None
    if len(raw) != n * channels * width:
        raise DataError(f"{path}: truncated WAV file ({len(raw)} of {n * channels * width} data bytes)")
    if width == 1:  # unsigned 8-bit
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:  # 24-bit little endian: sign-extend into int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    else:
        raise DataError(f"{path}: unsupported WAV sample width {width} bytes")
    return x.reshape(-1, channels).mean(axis=1, dtype=np.float32), rate


def wav_info(path: str | Path) -> tuple[int, int]:
    """``(sample_rate, samples)`` from a WAV header (reads no samples); errors name the file."""
    path = Path(path)
    try:
        import soundfile as sf
    except ImportError:
        try:
            with wave.open(str(path), "rb") as w:
                rate, n = w.getframerate(), w.getnframes()
        except wave.Error as exc:
            raise _not_pcm(path, exc) from None
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: unreadable WAV file ({exc})") from None
    else:
        try:
            info = sf.info(str(path))
        except (RuntimeError, OSError, ValueError, TypeError) as exc:
            raise DataError(f"{path}: unreadable WAV file ({exc})") from None
        rate, n = int(info.samplerate), int(info.frames)
    if n <= 0:
        raise DataError(f"{path}: WAV file holds no samples")
    if rate <= 0:
        raise DataError(f"{path}: WAV sample rate {rate} is not positive")
    return rate, n


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the sample rate of a WAV file; errors name the file."""
    path = Path(path)
    try:
        import soundfile as sf
    except ImportError:
        x, rate = _read_wave_stdlib(path)
    else:
        try:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, OSError, ValueError, TypeError) as exc:  # sf.LibsndfileError is a RuntimeError
            raise DataError(f"{path}: unreadable WAV file ({exc})") from None
        x = data.mean(axis=1, dtype=np.float32)
    if x.size == 0:
        raise DataError(f"{path}: WAV file holds no samples")
    if rate <= 0:
        raise DataError(f"{path}: WAV sample rate {rate} is not positive")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: WAV file holds NaN or inf samples")
    return np.ascontiguousarray(x, dtype=np.float32), int(rate)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling by zero-padding or truncating the real FFT (no aliasing).

    ``len(out) = round(len(x) * rate_out / rate_in)``; content above the new Nyquist frequency is
    dropped. Exact for periodic signals; the clip edges may ring slightly.
    """
    if rate_in == rate_out:
        return x
    n = len(x)
    m = max(1, round(n * rate_out / rate_in))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = min(len(spec), m // 2 + 1)
    out_spec = np.zeros(m // 2 + 1, dtype=np.complex128)
    out_spec[:keep] = spec[:keep]
    if m % 2 == 0 and keep == m // 2 + 1 and m < n:
        out_spec[-1] = out_spec[-1].real  # the new Nyquist bin of a real signal is real
    return (np.fft.irfft(out_spec, m) * (m / n)).astype(np.float32)


def fix_length(x: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` samples of ``x``, zero-padded at the end when shorter."""
    if len(x) >= n:
        return x[:n]
    return np.concatenate([x, np.zeros(n - len(x), dtype=x.dtype)])


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``2595 * log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """``(n_mels, n_fft // 2 + 1)`` triangular filters, HTK mel scale, peak weight 1 (no area normalisation).

    Band ``i`` rises linearly from the mel point ``i`` to ``i + 1`` and falls to ``i + 2`` of
    ``n_mels + 2`` points equally spaced in mel between ``fmin`` and ``fmax`` (default Nyquist),
    evaluated at the FFT bin frequencies ``k * sample_rate / n_fft``. Refuses settings where a band
    gets no FFT bin (it would be a constant row).
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ConfigError(f"mel filterbank needs 0 <= fmin < fmax <= {sample_rate / 2:g} Hz, got {fmin:g}..{fmax:g}")
    freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lower, centre, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (freqs[None, :] - lower) / (centre - lower)
    down = (upper - freqs[None, :]) / (upper - centre)
    fb = np.clip(np.minimum(up, down), 0.0, None)
    empty = int((fb.max(axis=1) == 0).sum())
    if empty:
        raise ConfigError(
            f"{n_mels} mel bands are too many for n_fft {n_fft} at {sample_rate} Hz: {empty} band(s) get no FFT bin; "
            "lower n_mels or raise n_fft",
            param=("n_mels", "n_fft"),
        )
    return fb.astype(np.float32)


def mel_centres(sample_rate: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Centre frequency (Hz) of each band of :func:`mel_filterbank`."""
    fmax = sample_rate / 2 if fmax is None else fmax
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))[1:-1]


def log_spectrogram(
    x: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor, fb: torch.Tensor | None
) -> torch.Tensor:
    """``(..., bins, 1 + samples // hop)`` log power spectrogram of waveforms ``(..., samples)`` (torch).

    The one implementation: :func:`spectrogram` (precomputed features) and the model's differentiable
    front end (:class:`mmrobust.models.transform.LogMelFrontEnd`) both call it. ``fb`` is the mel
    filterbank ``(n_mels, n_fft // 2 + 1)`` (``None``: linear frequency bins).
    """
    lead = x.shape[:-1]
    stft = torch.stft(
        x.reshape(-1, x.shape[-1]),
        n_fft,
        hop_length=hop,
        win_length=n_fft,
        window=window,
        center=True,
        pad_mode="constant",
        return_complex=True,
    )
    power = stft.abs().square()  # (batch, n_fft // 2 + 1, frames)
    if fb is not None:
        power = fb @ power
    return torch.log(power + LOG_EPS).reshape(*lead, *power.shape[-2:])


def spectrogram(
    x: np.ndarray, sample_rate: int, kind: str, n_fft: int, hop: int, n_mels: int, fb: np.ndarray | None = None
) -> np.ndarray:
    """``(1, bins, 1 + len(x) // hop)`` float32 log spectrogram of mono samples (see module docstring)."""
    if kind not in SPECTROGRAMS:
        raise ConfigError(f"unknown spectrogram '{kind}'; choose from: {', '.join(SPECTROGRAMS)}")
    if kind == "logmel" and fb is None:
        fb = mel_filterbank(sample_rate, n_fft, n_mels)
    out = log_spectrogram(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        n_fft,
        hop,
        torch.hann_window(n_fft, periodic=True),
        torch.from_numpy(fb) if kind == "logmel" and fb is not None else None,
    )
    return out.unsqueeze(0).numpy()
