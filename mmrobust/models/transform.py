"""Input transforms: what a model does to a modality's *stored* values before its encoder.

Datasets store values in their natural units (pixel intensity in [0, 1], waveform amplitude, raw
MFCCs; see docs/units.md) and the model owns the rest, as buffers saved with its weights:

* :class:`Standardize` ``(x - mean) / std`` from ``spec.normalization`` (one value, or one per entry
  along a per-sample axis), computed in float32 exactly as the data loaders used to compute it, so a
  model trained on raw data + this layer has the logits the same model had on standardised data;
* :class:`LogMelFrontEnd` turns a waveform ``(1, samples)`` into the standardised log spectrogram
  ``(1, bins, frames)`` the audio encoder reads, through the project's own ``torch.stft`` code
  (:func:`mmrobust.data.audio.log_spectrogram`), so attacks can perturb the waveform itself.

Attacks, smoothing and certificates therefore work in the stored units. A modality gets a
transform only when it has a normalization or a front end: a model of data without either has no
transform and exactly the state_dict it had before transforms existed.

Bounds: :class:`Standardize` is an affine map and registers its rule with
:mod:`mmrobust.layer_rules` (Lipschitz constant ``max 1/std``; CROWN uses the affine unit). The
log-mel front end has no sound bound here; its rules refuse with one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from mmrobust.data.audio import log_spectrogram, mel_filterbank
from mmrobust.data.base import FRONT_ENDS, DatasetMeta, ModalitySpec, Normalization
from mmrobust.errors import ConfigError, DataError
from mmrobust.layer_rules import Unit, register_layer

#: relative pad on Standardize's Lipschitz constant: the model computes ``(x - mean) / std`` in float32
STANDARDIZE_PAD = 1e-6
FRONT_END_REFUSAL = (
    "the log-mel front end ({name}) is not bounded by the certifiers; certify the feature-space model instead "
    "(the same clips imported without keep_waveform)"
)


class Standardize(nn.Module):
    """``(x - mean) / std`` with float32 buffers broadcasting over one sample (see module docstring)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, normalization: Normalization, sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        mean, std = normalization.tensors(tuple(sample_shape))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.sample_shape = tuple(int(s) for s in sample_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LogMelFrontEnd(nn.Module):
    """Waveform ``(N, 1, samples)`` -> standardised log spectrogram ``(N, 1, bins, frames)``.

    ``log(M @ |STFT(x)|^2 + 1e-6)`` (or the linear-frequency version), the exact computation of
    :func:`mmrobust.data.audio.spectrogram`, then ``(s - mean) / std`` with the dataset's spectrogram
    statistics. Window and filterbank are buffers. Differentiable everywhere.
    """

    window: torch.Tensor
    fb: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        hop: int,
        n_mels: int,
        spectrogram: str = "logmel",
        mean: float = 0.0,
        std: float = 1.0,
    ) -> None:
        super().__init__()
        if spectrogram not in ("logmel", "linear"):
            raise ConfigError(f"front end: unknown spectrogram '{spectrogram}'; choose from: logmel, linear")
        self.sample_rate, self.n_fft, self.hop, self.n_mels = int(sample_rate), int(n_fft), int(hop), int(n_mels)
        self.spectrogram = spectrogram
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True))
        fb = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels) if spectrogram == "logmel" else None
        self.register_buffer("fb", torch.from_numpy(fb) if fb is not None else torch.zeros(0))
        self.register_buffer("mean", torch.tensor(float(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(float(std), dtype=torch.float32))

    @property
    def bins(self) -> int:
        return self.n_mels if self.spectrogram == "logmel" else self.n_fft // 2 + 1

    def output_shape(self, samples: int) -> tuple[int, int, int]:
        return (1, self.bins, 1 + samples // self.hop)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The unstandardised log spectrogram ``(N, 1, bins, frames)`` of waveforms ``(N, 1, samples)``."""
        fb = self.fb if self.spectrogram == "logmel" else None
        return log_spectrogram(x.flatten(1), self.n_fft, self.hop, self.window, fb).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.features(x) - self.mean) / self.std

    def config(self) -> dict[str, Any]:
        """What :func:`front_end_from_config` needs (stored in ``meta.info['front_ends']``)."""
        return {
            "type": "logmel",
            "spectrogram": self.spectrogram,
            "sample_rate": self.sample_rate,
            "n_fft": self.n_fft,
            "hop": self.hop,
            "n_mels": self.n_mels,
            "mean": float(self.mean),
            "std": float(self.std),
        }


def front_end_from_config(d: Mapping[str, Any], where: str = "front end") -> LogMelFrontEnd:
    if not isinstance(d, Mapping) or d.get("type") != "logmel":
        raise DataError(f"{where}: unknown front end {d!r}; this version knows type 'logmel'")
    try:
        return LogMelFrontEnd(
            int(d["sample_rate"]), int(d["n_fft"]), int(d["hop"]), int(d["n_mels"]),
            str(d.get("spectrogram", "logmel")), float(d.get("mean", 0.0)), float(d.get("std", 1.0)),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: malformed front end ({exc})") from None


def front_end_configs(meta: DatasetMeta) -> dict[str, dict[str, Any]]:
    """``meta.info['front_ends']`` checked against the modalities (``{}`` when there is none)."""
    fes = meta.info.get(FRONT_ENDS) or {}
    if not isinstance(fes, Mapping):
        raise DataError(f"dataset '{meta.name}': info['{FRONT_ENDS}'] must map modality names to front ends")
    for m in fes:
        spec = meta.spec(m)
        if spec.kind != "sequence" or spec.shape[0] != 1:
            raise DataError(
                f"dataset '{meta.name}': front end of '{m}' needs a (1, samples) waveform, got {spec.shape}"
            )
        if spec.normalization is not None:
            raise DataError(f"dataset '{meta.name}': '{m}' has a front end and a normalization; keep one")
    return {str(m): dict(v) for m, v in fes.items()}


def encoder_spec(meta: DatasetMeta, name: str) -> ModalitySpec:
    """The spec an encoder is built for: the front end's output for a waveform, else the stored spec."""
    spec = meta.spec(name)
    fe = front_end_configs(meta).get(name)
    if fe is None:
        return spec
    shape = front_end_from_config(fe, f"front end of '{name}'").output_shape(spec.shape[1])
    return ModalitySpec(name, "spectrogram", shape)


def build_transforms(meta: DatasetMeta) -> dict[str, nn.Module]:
    """One input transform per modality that has a normalization or a front end (none otherwise)."""
    fes = front_end_configs(meta)
    out: dict[str, nn.Module] = {}
    for spec in meta.modalities:
        if spec.name in fes:
            out[spec.name] = front_end_from_config(fes[spec.name], f"front end of '{spec.name}'")
        elif spec.normalization is not None:
            out[spec.name] = Standardize(spec.normalization, spec.shape)
    return out


# --- bound rules (mmrobust.layer_rules) ---


def _standardize_units(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Unit]:
    """``x -> x / std - mean / std``: diagonal, so its l2 (and l-inf) Lipschitz constant is ``max 1/std``."""
    inv = (1.0 / layer.std.detach().double()).expand(in_shape).clone()
    offset = (-layer.mean.detach().double() / layer.std.detach().double()).expand(in_shape).clone()

    def scale(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v * w.to(v.dtype)

    lip = float(inv.max()) * (1.0 + STANDARDIZE_PAD)
    fn, abs_fn, sq_fn = (partial(scale, w=w) for w in (inv, inv.abs(), inv**2))
    return [Unit(name, "linear", lip, tuple(in_shape), tuple(in_shape), fn, abs_fn, sq_fn, offset)]


def _front_end_refusal(name: str, layer: Any, in_shape: tuple[int, ...]) -> list[Any]:
    raise ConfigError(FRONT_END_REFUSAL.format(name=name), param="certifier")


register_layer(Standardize, lipschitz=_standardize_units)
register_layer(LogMelFrontEnd, lipschitz=_front_end_refusal, crown=_front_end_refusal)
