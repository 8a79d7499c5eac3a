"""Run folders on disk: ``model.safetensors`` + ``config.json`` + ``metrics.json`` + ``manifest.json``.

``config.json`` holds everything needed to rebuild the model and the data pipeline; the data are
re-derived deterministically from the data config (seeded splits, train-only statistics).

A run folder is a unit. :class:`RunFolder` writes it into a hidden sibling (``.NAME.partial``)
and renames it into place only when complete; ``manifest.json`` (written last) lists the sha256
of every file, and :func:`load_run` refuses a folder without it or whose files do not match it
(an interrupted or mixed folder). A lock file (``.NAME.lock``) stops two writers.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmrobust import __version__
from mmrobust.config import RunConfig, resolve_device
from mmrobust.data.base import STANDARDISED, DataBundle, DatasetMeta
from mmrobust.data.registry import DATASETS, DataConfig, dataset_folder, fingerprint, load_data
from mmrobust.data.transforms import standardised_bundle
from mmrobust.errors import ConfigError, RunError
from mmrobust.io import SCHEMA_VERSION, load_tensors, read_json, save_tensors, sha256_file, write_json
from mmrobust.models.fusion import LateFusionModel, build_model
from mmrobust.models.transform import build_transforms
from mmrobust.plugins import import_plugin
from mmrobust.publish import Lock, check_destination, partial_path, publish_folder, resolve_target

MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"
MANIFEST_FILE = "manifest.json"
#: files whose hashes the manifest pins (evaluation outputs are added later and are not pinned)
_PINNED = (MODEL_FILE, CONFIG_FILE, METRICS_FILE)


class RunFolder:
    """Transactional writer of one run folder (a context manager), on :mod:`mmrobust.publish`.

    On enter, before any work: ``out`` is resolved once (a symlink is followed: the run is published
    at its target) and must be a folder path whose parent is writable; an existing non-empty ``out``
    is refused unless ``force`` (replace it whole, stale evaluation files included; only a folder
    mmrobust wrote) or ``resume`` (continue from the checkpoint in ``partial``); the lock file is
    taken (a second writer gets a one-line error; a lock left by a dead process is taken over).
    Files go to :attr:`partial`; :meth:`commit` writes the manifest and renames ``partial`` into place.
    """

    def __init__(self, out: str | Path, *, force: bool = False, resume: bool = False) -> None:
        if force and resume:
            raise ConfigError(
                "force and resume exclude each other: replace the run or continue it", param=("force", "resume")
            )
        self.out = resolve_target(out)
        self.force, self.resume = force, resume
        self.partial = partial_path(self.out)
        self._lock = Lock(self.out, "run")
        self.lock = self._lock.path

    def _check_target(self) -> None:
        out = self.out
        check_destination(out, force=self.force, resumable=True)
        self._lock.refuse_if_taken()
        if not (self.force or self.resume) and (self.partial / "checkpoint.json").is_file():
            raise RunError(
                f"{out}: an interrupted run of this folder has a checkpoint; pass resume=True to continue it "
                "or force=True to start over",
                param=("resume", "force"),
            )
        if out.is_dir() and any(out.iterdir()) and not (self.force or self.resume):
            raise RunError(
                f"{out}: already exists; pass force=True to replace it or resume=True to continue it",
                param=("force", "resume"),
            )
        if self.resume and not (self.partial / "checkpoint.json").is_file():
            if (out / MANIFEST_FILE).is_file():
                raise RunError(
                    f"{out}: this run is already complete; nothing to resume (pass force=True to retrain)",
                    param="force",
                )
            raise RunError(f"{out}: no interrupted run to resume (no checkpoint in {self.partial.name})")

    def __enter__(self) -> RunFolder:
        self._check_target()
        self._lock.acquire()
        try:
            # again under the lock: another writer may have completed this run since the first check
            self._check_target()
        except BaseException:
            self.__exit__()
            raise
        if not self.resume and self.partial.exists():
            shutil.rmtree(self.partial)  # leftovers of an interrupted run we are not resuming
        self.partial.mkdir(parents=True, exist_ok=True)
        return self

    def commit(self) -> Path:
        """Pin the written files in ``manifest.json`` and move the folder into place atomically."""
        for name in os.listdir(self.partial):
            if name.startswith("checkpoint"):
                (self.partial / name).unlink()
        seal_run(self.partial)
        return publish_folder(self.partial, self.out)

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


def seal_run(path: str | Path) -> None:
    """Write ``manifest.json``: the sha256 of the run's model, config and metrics files.

    Training does this itself. Call it only after changing a run's files on purpose (e.g. editing
    weights for an experiment): :func:`load_run` refuses runs whose files do not match.
    """
    path = Path(path)
    missing = [name for name in _PINNED if not (path / name).is_file()]
    if missing:
        raise RunError(f"{path}: cannot seal an incomplete run (missing {missing})")
    files = {name: sha256_file(path / name) for name in _PINNED}
    write_json(path / MANIFEST_FILE, {"mmrobust_version": __version__, "files": files})


def save_run(
    out: str | Path, model: LateFusionModel, cfg: RunConfig, bundle: DataBundle, metrics: dict[str, Any]
) -> Path:
    """Write the files of a run into ``out`` (a :class:`RunFolder`'s ``partial`` folder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / MODEL_FILE, model.state_dict())
    config = {
        "schema_version": SCHEMA_VERSION,
        "mmrobust_version": __version__,
        **cfg.to_dict(),
        "dataset": bundle.meta.to_dict(),
        "data_source": _with_relative_path(bundle.source, out),
    }
    write_json(out / CONFIG_FILE, config)
    write_json(out / METRICS_FILE, metrics)
    return out


#: the data folder relative to the run folder, beside the absolute path in ``data_source["name"]``
RELATIVE_DATA_KEY = "relative_path"


def _with_relative_path(source: dict[str, Any], out: Path) -> dict[str, Any]:
    """``source`` plus the data folder's path relative to the run folder (a folder dataset only).

    ``out`` may be the run's ``.NAME.partial`` sibling: it sits at the same depth as the final folder,
    so the relative path is the same."""
    name = source.get("name")
    folder = dataset_folder(name) if isinstance(name, str) and name not in DATASETS else None
    if folder is None:
        return source
    try:
        rel = os.path.relpath(folder, out.absolute())
    except ValueError:  # another drive (Windows): no relative path
        return source
    return {**source, RELATIVE_DATA_KEY: Path(rel).as_posix()}


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, to compute results that could not be written into ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: run folder not found")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunError(f"{path}: not writable; results could not be saved there")


@dataclass
class Run:
    """A loaded run: its config, dataset metadata, model (eval mode) and metrics."""

    path: Path
    config: RunConfig
    meta: DatasetMeta
    model: LateFusionModel
    metrics: dict[str, Any]
    _bundle: DataBundle | None = field(default=None, repr=False)

    data_fingerprint: str | None = None
    allow_data_change: bool = False
    #: written before models standardised their inputs: the input transforms were added at load
    legacy_inputs: bool = False
    #: where the model lives (``load_run(device=...)``)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the data given in place of the recorded ones (``load_run(data=...)``), else None
    data_path: str | None = None
    #: the data folder relative to the run folder, as recorded at training time (None: not recorded)
    relative_data_path: str | None = None

    def data(self) -> DataBundle:
        """Rebuild the run's data exactly (cached after the first call).

        The data are those of config.json; ``load_run(data=PATH)`` gives another copy instead, and a
        folder dataset that is gone from its absolute path is looked for at the path recorded relative
        to the run folder (runs and data moved together). The rebuilt arrays must hash to the
        fingerprint recorded at training time: other data are refused (``allow_data_change`` accepts
        them, and :meth:`data_record` says which were used).
        """
        if self._bundle is None:
            bundle = load_data(self.data_config())
            if not _same_dataset(bundle.meta, self.meta, moved=self.data_config() is not self.config.data):
                raise RunError(
                    f"{self.path}: the data rebuilt from {self._data_origin()} no longer match the run's dataset"
                )
            self._check_fingerprint(bundle.source.get("fingerprint"))
            self._bundle = bundle
        return self._bundle

    def data_config(self) -> DataConfig:
        """The data this run reads: the recorded ones, another copy (``data``) or the recorded relative
        path when the absolute one is gone."""
        cfg = self.config.data
        name = self.data_path
        gone = cfg.name not in DATASETS and not Path(cfg.name).is_dir()
        if name is None and self.relative_data_path is not None and gone:
            moved = Path(os.path.normpath((self.path / self.relative_data_path).absolute()))
            if moved.is_dir():
                name = str(moved)
        if name is None:
            return cfg
        return DataConfig(name, cfg.seed, dict(cfg.options))

    def data_record(self) -> dict[str, Any]:
        """Which data were used, for results files: ``path`` (and, where the data differ from the
        run's, ``fingerprint`` vs ``run_fingerprint`` and ``changed: true``)."""
        cfg = self.data_config()
        record: dict[str, Any] = {"path": cfg.name}
        if self._bundle is not None:
            got = self._bundle.source.get("fingerprint")
            if self.data_fingerprint is not None and got != self.data_fingerprint:
                record.update(changed=True, fingerprint=got, run_fingerprint=self.data_fingerprint)
        return record

    def _data_origin(self) -> str:
        cfg = self.data_config()
        return "config.json" if cfg is self.config.data else f"'{cfg.name}'"

    def _check_fingerprint(self, got: Any) -> None:
        if self.data_fingerprint is None or got == self.data_fingerprint or self.allow_data_change:
            return
        cfg = self.data_config()
        what = "changed since training" if cfg is self.config.data else f"at '{cfg.name}' differ from the run's"
        raise RunError(
            f"{self.path}: the data of '{self.config.data.name}' {what} (fingerprint {str(got)[:12]} != "
            f"{self.data_fingerprint[:12]}); pass allow_data_change=True to use them anyway",
            param="allow_data_change",
        )


def load_run(
    path: str | Path,
    *,
    allow_data_change: bool = False,
    device: str | torch.device = "cpu",
    data: str | Path | None = None,
) -> Run:
    """Load a run folder written by :func:`save_run`; never unpickles anything.

    Refuses incomplete or mixed folders (see :func:`seal_run`). ``device``: where the model is put
    (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``; checked before the folder is read).
    ``data``: another copy of the run's data (a folder), read by :meth:`Run.data` in place of the
    recorded path; it must hash to the recorded fingerprint. ``allow_data_change`` accepts data whose
    fingerprint differs from the one recorded at training time.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if data is not None:
        data = _data_folder(data)
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: run folder not found")
    _verify_manifest(path)  # before config.json is trusted: an edited, unsealed config never builds a model
    raw = read_json(path / CONFIG_FILE)
    if not isinstance(raw, dict):
        raise RunError(f"{path / CONFIG_FILE}: must hold a JSON object")
    _import_run_plugins(path, raw.get("plugins", []))  # they register the run's encoders and dataset
    try:
        cfg = RunConfig.from_dict({k: raw[k] for k in ("data", "model", "train", "plugins") if k in raw})
        meta = DatasetMeta.from_dict(raw["dataset"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise RunError(f"{path / CONFIG_FILE}: invalid run config ({detail})") from None
    metrics = read_json(path / METRICS_FILE)
    if not isinstance(metrics, dict):
        raise RunError(f"{path / METRICS_FILE}: must hold a JSON object")
    model = build_model(meta, cfg.model)
    state = load_tensors(path / MODEL_FILE)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise RunError(f"{path / MODEL_FILE}: weights do not match the model in config.json ({first})") from None
    model.eval()
    source = raw.get("data_source")
    fp = source.get("fingerprint") if isinstance(source, dict) else None
    rel = source.get(RELATIVE_DATA_KEY) if isinstance(source, dict) else None
    run = Run(path, cfg, meta, model, metrics, data_fingerprint=fp, allow_data_change=allow_data_change,
              data_path=data, relative_data_path=rel if isinstance(rel, str) and rel else None)  # fmt: skip
    if _legacy_standardised(meta, source):
        _upgrade_legacy(run)
    run.model.to(dev)
    run.device = dev
    return run


def _same_dataset(got: DatasetMeta, recorded: DatasetMeta, *, moved: bool) -> bool:
    """Metadata of rebuilt data match the run's; data read from another folder may be named after it
    (a folder without meta.json takes its folder's name)."""
    a, b = got.to_dict(), recorded.to_dict()
    if moved:
        a.pop("name", None)
        b.pop("name", None)
    return a == b


def _data_folder(data: str | Path) -> str:
    """The folder of ``load_run(data=...)``: an existing folder, made absolute."""
    folder = dataset_folder(str(data))
    if folder is None or not folder.is_dir():
        raise RunError(f"{data}: data folder not found (data must be a folder holding a copy of the run's data)")
    return str(folder)


def _import_run_plugins(path: Path, plugins: Any) -> None:
    """Import the plug-ins recorded in a run's config.json; one that is missing is a one-line error
    naming it and the run."""
    if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
        raise RunError(f"{path / CONFIG_FILE}: 'plugins' must be a list of module names, got {plugins!r}")
    for module in plugins:
        try:
            import_plugin(module)
        except ConfigError as exc:
            raise RunError(
                f"{path}: this run needs the plug-in '{module}' (recorded in config.json), which cannot be imported "
                f"({str(exc).split(': ', 1)[-1]}); make it importable, e.g. add its folder to PYTHONPATH"
            ) from None


def _legacy_standardised(meta: DatasetMeta, source: Any) -> bool:
    """A run written before datasets stored raw values: its data source recorded the loader's
    standardisation statistics and its metadata has every modality in standardised units."""
    return (
        isinstance(source, dict)
        and "normalization" in source
        and all(s.units == STANDARDISED and s.normalization is None for s in meta.modalities)
    )


def _upgrade_legacy(run: Run) -> None:
    """Give a legacy run the input transforms of its rebuilt (raw) data.

    Its model was trained on inputs the loader had standardised; the data now store raw values and
    carry the normalization, so the model gets that standardisation as its input transform: its
    logits on the raw inputs are the old logits on the standardised ones. The rebuilt data must be
    the run's data: in the standardised view (:func:`~mmrobust.data.transforms.standardised_bundle`)
    the metadata equals config.json's and the arrays hash to the recorded fingerprint.
    """
    bundle = load_data(run.data_config())
    view = standardised_bundle(bundle)
    if not _same_dataset(view.meta, run.meta, moved=run.data_config() is not run.config.data):
        raise RunError(f"{run.path}: the data rebuilt from {run._data_origin()} no longer match the run's dataset")
    if run.data_fingerprint is not None and not run.allow_data_change:
        run._check_fingerprint(fingerprint(view))
    run.model.set_transforms(build_transforms(bundle.meta))
    run.model.eval()
    run.meta, run._bundle, run.legacy_inputs = bundle.meta, bundle, True
    run.data_fingerprint = bundle.source.get("fingerprint")


def _verify_manifest(path: Path) -> None:
    """A run is complete and unmixed only if its pinned files match ``manifest.json``."""
    if not (path / MANIFEST_FILE).is_file():
        raise RunError(
            f"{path}: incomplete run folder (no {MANIFEST_FILE}: interrupted, or written by mmrobust < 0.2); retrain it"
        )
    manifest = read_json(path / MANIFEST_FILE)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or set(files) != set(_PINNED):
        raise RunError(f"{path / MANIFEST_FILE}: malformed manifest")
    changed = [name for name in _PINNED if not (path / name).is_file() or sha256_file(path / name) != files[name]]
    if changed:
        raise RunError(f"{path}: {', '.join(changed)} changed after the run was written (mixed or edited run folder)")
    _check_metrics(path / METRICS_FILE)


#: metrics.json fields every command reads as numbers (a sealed file may still hold nonsense)
_NUMERIC_METRICS = ("val_accuracy", "test_accuracy")


def _check_metrics(path: Path) -> None:
    """The fields of ``metrics.json`` that commands compute with must be numbers (or null)."""
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise RunError(f"{path}: must hold a JSON object")
    for key in _NUMERIC_METRICS:
        v = metrics.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1):
            raise RunError(f"{path}: '{key}' must be a number in [0, 1] or null, got {v!r}")
