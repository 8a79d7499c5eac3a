"""Certify a model or a run folder with any registered certifier; returns a :class:`CertifyResult`.

Certifiers are found by name in :data:`~mmrobust.certify.base.CERTIFIERS` (which imports the
built-in ones on its first look-up); their options are their ``Options`` dataclass, filled
from a dict such as the CLI's ``KEY=VALUE`` certifier options. Nothing here prints or writes: the CLI and
the demo show results and merge them into ``RUN/certify.json`` through :mod:`mmrobust.report.certify`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmrobust.certify.base import CERTIFIERS, Certifier, CertifyContext
from mmrobust.certify.results import DEFAULT_RADII, CertifyResult, normalize_certify
from mmrobust.data.base import STANDARDISED, DatasetMeta, Split
from mmrobust.data.transforms import standardised_meta, standardised_split
from mmrobust.errors import ConfigError, RunError
from mmrobust.io import read_json
from mmrobust.memory import input_gradient_plan, parse_bytes
from mmrobust.models.transform import Standardize
from mmrobust.options import build_options
from mmrobust.precision import full_precision
from mmrobust.progress import ProgressFn
from mmrobust.torchutil import to_device

CERTIFY_FILE = "certify.json"


def build_certifier(name: str, options: Mapping[str, Any] | None = None) -> Certifier:
    """The registered certifier ``name`` with its ``Options`` filled from ``options`` (strings are
    coerced to the field types; an unknown key is a one-line error listing the known ones)."""
    cls = CERTIFIERS.get(name)
    return cls(build_options(cls.Options, dict(options or {}), f"certifier '{name}'"))


def check_radii(radii: Sequence[float] | None) -> list[float]:
    grid = sorted(float(r) for r in (radii if radii is not None else DEFAULT_RADII))
    if not grid or any(not 0 <= r < float("inf") for r in grid):
        raise ConfigError(f"radii must be finite and >= 0, got {grid}", param="radii")
    return grid


def certify_model(
    model: torch.nn.Module,
    meta: DatasetMeta,
    split: Split,
    certifier: str | Certifier = "empirical",
    fit_data: Split | None = None,
    radii: Sequence[float] | None = None,
    batch_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    split_name: str = "test",
    fit_split: str | None = None,
    memory_budget: str | int | None = "auto",
    progress: ProgressFn | None = None,
) -> CertifyResult:
    """Certify every sample of ``split`` with ``certifier`` (a name and ``options``, or an instance);
    ``progress(description, done, total)`` hears the samples certified (CROWN and smoothing).

    ``fit_data`` is what a certifier may fit on (the empirical estimator maximises over it; the CLI
    passes the training split so the test split is never used to fit anything). Radii are l2 norms
    of ``delta_m / scale_m`` (recorded in the result's ``units``/``scales``; see
    :func:`standardised_view`); misclassified samples get radius 0. ``batch_size`` None (the
    default) sizes the forward batches to ``memory_budget`` (:mod:`mmrobust.memory`); an integer is
    used as given.

    Certification always computes in float32: the model's weights must be float32 and any autocast
    active around the call is switched off (a radius computed in bf16/fp16 is not a certificate).
    """
    grid = check_radii(radii)
    low = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        raise ConfigError(f"certification needs float32 weights, the model has {', '.join(low)}; load it in float32")
    if isinstance(certifier, Certifier):
        if options:
            raise ConfigError("give certifier options either in the Certifier instance or as options, not both")
        cert = certifier
    else:
        cert = build_certifier(certifier, options)
    with full_precision(), standardised_view(model, meta, split, fit_data) as (meta_v, split_v, fit_v, units, scales):
        if batch_size is None:  # the probe too: it sizes float32 passes
            batch_size = input_gradient_plan(model, split_v, memory_budget, _device(model)).batch_size
        certificate = cert.certify(
            model, meta_v, split_v, CertifyContext(fit_data=fit_v, batch_size=batch_size, progress=progress)
        )
    opts = cert.options
    used = dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) and not isinstance(opts, type) else {}
    for alias in getattr(opts, "aliases", {}):  # deprecated option names: recorded under their new name only
        used.pop(alias, None)
    reads_fit = getattr(cert, "uses_fit_data", False) and fit_data is not None
    return CertifyResult(certificate, split_name, grid, used, fit_split if reads_fit else None,
                         units=units, scales=scales)  # fmt: skip


@contextmanager
def standardised_view(
    model: torch.nn.Module, meta: DatasetMeta, split: Split, fit_data: Split | None
) -> Iterator[tuple[DatasetMeta, Split, Split | None, dict[str, str], dict[str, float]]]:
    """What the certifiers see, and the units of the radii they give.

    A model that standardises its inputs (``Standardize`` input transforms, :mod:`mmrobust.models.transform`)
    is certified in its standardised coordinates: while the certifier runs, the transforms are set
    aside and the data are standardised batch by batch. Standardising is a translation of
    ``x / std``, so the radii measure ``delta_m / std_m``: the scales of the default joint-l2 threat
    model, in which attacks measure their budgets too. A scalar normalization is recorded as the
    modality's units with scale ``std``; a per-coefficient one as ``standardised`` units, scale 1. A
    model without transforms is certified in its stored units, scale 1. Front ends that are not a
    standardisation (a waveform's log-mel features) are refused: no certifier bounds them.
    """
    transforms = getattr(model, "transforms", None)
    units = {s.name: s.units for s in meta.modalities}
    scales = dict.fromkeys(units, 1.0)
    if not transforms:
        yield meta, split, fit_data, units, scales
        return
    other = sorted(m for m, t in transforms.items() if not isinstance(t, Standardize))
    if other:
        raise ConfigError(
            f"the input front end of modality {other} ({type(transforms[other[0]]).__name__}) is not bounded by the "
            "certifiers; certify the feature-space model instead (the same data imported without its waveform)",
            param="certifier",
        )
    for s in meta.modalities:
        if s.name in transforms and s.normalization is not None:
            units[s.name], scales[s.name] = (
                (s.units, s.normalization.std[0]) if s.normalization.scalar else (STANDARDISED, 1.0)
            )
    fit_v = standardised_split(meta, fit_data) if fit_data is not None else None
    model.set_transforms(None)  # type: ignore[operator]
    try:
        yield standardised_meta(meta), standardised_split(meta, split), fit_v, units, scales
    finally:
        model.set_transforms(dict(transforms.items()))  # type: ignore[operator]


def certify_run(
    path: str | Path, certifier: str = "empirical", options: Mapping[str, Any] | None = None, **settings: Any
) -> CertifyResult:
    """Certify a run folder with one certifier: :func:`certify_run_many` with ``[(certifier, options)]``;
    ``settings`` are its keyword arguments (``split``, ``radii``, ``fit_split``, ``batch_size``, ...)."""
    return certify_run_many(path, [(certifier, options)], **settings)[0]


def certify_run_many(
    path: str | Path,
    certifiers: Sequence[tuple[str, Mapping[str, Any] | None]],
    split: str = "test",
    radii: Sequence[float] | None = None,
    fit_split: str = "train",
    batch_size: int | None = None,
    soundness_samples: int = 0,
    attack_steps: int = 50,
    allow_data_change: bool = False,
    tightness_samples: int = 0,
    precision: str = "fp32",
    memory_budget: str | int | None = "auto",
    device: str = "auto",
    data: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> list[CertifyResult]:
    """Certify a run folder's ``split`` with several ``(certifier, options)``, in order, on one loaded run;
    ``fit_split`` is the data a certifier may fit on.

    Every name and option is checked before any work. ``allow_data_change``: see
    :func:`~mmrobust.runs.load_run`. With ``tightness_samples > 0`` the smallest adversarial joint-l2
    radius of that many correctly classified samples is searched once
    (:func:`~mmrobust.certify.tightness.tightness`: the expensive part) and compared with every
    certifier's radii. With ``soundness_samples > 0`` the radii of that many samples are attacked
    (:func:`~mmrobust.certify.soundness.soundness_check`) and the violation rates kept.

    ``device`` (``auto``: CUDA if available, else CPU): the model and the in-memory splits are moved
    there and the certifiers compute there; ``data``: another copy of the run's data (a folder; see
    :func:`~mmrobust.runs.load_run`). Each result's ``info`` records the device and, where the data
    are not the recorded ones, which data were used.
    """
    from mmrobust.config import resolve_device
    from mmrobust.runs import MODEL_FILE, load_run

    dev = resolve_device(device)  # before any work: cuda without CUDA is refused here
    check_certify_precision(precision)
    if memory_budget is not None and memory_budget != "auto":
        parse_bytes(memory_budget, "memory_budget")
    certs = [build_certifier(name, options) for name, options in certifiers]  # fail before any work
    if not certs:
        raise ConfigError("give at least one certifier")
    grid = check_radii(radii)
    if tightness_samples < 0:
        raise ConfigError(f"tightness_samples must be >= 0, got {tightness_samples}", param="tightness_samples")
    if soundness_samples < 0:
        raise ConfigError(f"soundness_samples must be >= 0, got {soundness_samples}", param="soundness_samples")
    if attack_steps < 1:
        raise ConfigError(f"attack_steps must be >= 1, got {attack_steps}", param="attack_steps")
    run = load_run(path, allow_data_change=allow_data_change, device=dev, data=data)
    for name, t in run.model.state_dict().items():  # NaN weights give NaN bounds, not certificates
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RunError(f"{Path(path) / MODEL_FILE}: weight '{name}' holds NaN or inf values; retrain the run")
    bundle = run.data()
    record = run.data_record()
    moved_data = data is not None or bool(record.get("changed")) or record["path"] != run.config.data.name
    samples, fit_data = split_on_device(bundle.split(split), dev), split_on_device(bundle.split(fit_split), dev)
    if batch_size is None:  # one probe for all certifiers
        with full_precision():
            batch_size = input_gradient_plan(run.model, samples, memory_budget, _device(run.model)).batch_size
    results = []
    attack = None
    for cert in certs:
        result = certify_model(run.model, run.meta, samples, cert, fit_data, grid, batch_size,
                               split_name=split, fit_split=fit_split, memory_budget=memory_budget,
                               progress=progress)  # fmt: skip
        result.certificate.info["device"] = str(dev)
        if moved_data:
            result.certificate.info["data"] = record
        if soundness_samples > 0:
            from mmrobust.certify.soundness import soundness_check

            r = result.certificate.radii
            # attacked in the coordinates the radii measure (see standardised_view)
            with full_precision(), standardised_view(run.model, run.meta, samples, None) as (meta_v, data_v, *_):
                result.soundness = soundness_check(run.model, meta_v, data_v,
                                                   {"joint": r.joint, "unimodal": r.unimodal},
                                                   max_samples=soundness_samples, steps=attack_steps)  # fmt: skip
        if tightness_samples > 0:
            from mmrobust.certify.tightness import TightnessOptions, compare, tightness

            joint = result.certificate.radii.joint
            if attack is None:
                with full_precision(), standardised_view(run.model, run.meta, samples, None) as (_, data_v, *_):
                    attack = tightness(run.model, data_v, joint, "joint", TightnessOptions(samples=tightness_samples))
                result.tightness = attack
            else:
                result.tightness = compare("joint", attack.indices, joint[attack.indices], attack.attack_radius)
        results.append(result)
    return results


def check_certify_precision(precision: str) -> None:
    """Certification runs in float32 only: anything else is a one-line error."""
    if precision != "fp32":
        raise ConfigError(
            f"certification is always fp32 (a radius computed in {precision} is not a certificate); "
            "use precision='fp32'",
            param="precision",
        )


def split_on_device(split: Split, device: torch.device) -> Split:
    """An in-memory split's tensors on ``device`` (certifiers batch the split they are given; an
    on-disk split streams its batches and stays where it is)."""
    if device.type == "cpu" or getattr(split, "stream", None) is not None or not isinstance(split, Split):
        return split
    return Split(to_device(split.inputs, device), split.labels.to(device))


def _device(model: torch.nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def parse_radii(text: str) -> list[float]:
    """Parse ``"0,0.1,0.5"`` into radii; a bad entry raises a one-line :class:`ConfigError`."""
    try:
        radii = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"radii: expected comma-separated numbers, got '{text}'", param="radii") from None
    if not radii or any(not r >= 0 or r == float("inf") for r in radii):
        raise ConfigError(f"radii: expected finite numbers >= 0, got '{text}'", param="radii")
    return radii


def load_certify(path: str | Path) -> dict[str, Any]:
    """Read ``RUN/certify.json`` (or a path to the file itself), of any schema version: the entries
    are under both ``certifiers`` and ``estimators`` (:func:`~mmrobust.certify.results.normalize_certify`)."""
    path = Path(path)
    return normalize_certify(read_json(path / CERTIFY_FILE if path.is_dir() else path))
