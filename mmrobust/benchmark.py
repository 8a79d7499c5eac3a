"""The comparison grid: train every (dataset, method, seed) cell, evaluate, optionally certify.

``run_benchmark(BenchmarkConfig(...), out)`` returns a :class:`BenchmarkResult`; it writes only
under ``out``: one run folder per cell (``out/runs/<dataset>/<method>/seed<k>/``) holding the model,
its evaluations and a manifest ``cell.json`` written last, atomically. A cell is *finished* when its
manifest names the current cell settings (a hash) and every file it lists still has the recorded
SHA-256; a re-run skips finished cells and redoes the others (an interrupted cell has no valid
manifest). Cells finished under different settings are refused unless ``force``. Tables, plots
and ``benchmark.json`` are presentation: :mod:`mmrobust.report.benchmark` builds them from the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import InitVar, asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmrobust.certify.results import normalize_certify
from mmrobust.certify.runner import CERTIFY_FILE, build_certifier, certify_model, split_on_device
from mmrobust.config import RECIPES, OptimConfig, RunConfig, options_dataclass, resolve_device
from mmrobust.data.base import DataBundle
from mmrobust.data.registry import DATASETS, DataConfig, dataset_folder, load_data
from mmrobust.errors import ConfigError, RunError
from mmrobust.eval.api import check_options, evaluate_model
from mmrobust.eval.compare import Column, ComparisonTable, Stat, comparison_tables, stat
from mmrobust.eval.results import EvalResult
from mmrobust.eval.suites import SUITES, parse_eps
from mmrobust.io import read_json, sha256_file, write_json
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.plugins import import_plugin
from mmrobust.progress import MessageFn, ProgressFn
from mmrobust.publish import Lock, check_destination, is_mmrobust_folder, resolve_target
from mmrobust.runs import RunFolder, load_run
from mmrobust.training import METHODS, FitResult, method_model_config, train
from mmrobust.training.checkpoint import CHECKPOINT_JSON

SETTINGS_FILE, MANIFEST_FILE = "settings.json", "cell.json"
#: a cell's evaluation under :data:`PAPER_ATTACK` (file name kept from the first releases: cell manifests list it)
PAPER_ATTACK_FILE = "eval_paper_protocol.json"
BENCH_SUITES = ("paper", "curves", "autoattack")
#: ``attack_strength``: ``strong`` (our suite only) or ``paper`` (also the paper's weaker attack settings)
ATTACK_STRENGTHS = ("strong", "paper")
#: the CRMT paper's attack settings: l2-PGD with the CE loss only, 4 steps of eps/3, no random start
PAPER_ATTACK: dict[str, Any] = {"losses": ("ce",), "steps": 4, "step_size": 1 / 3, "random_start": False}
#: version of the ``benchmark.json`` document (:meth:`BenchmarkResult.to_json`)
SCHEMA_VERSION = 2
#: certified-accuracy radii of the benchmark's summary table (l2, input space)
CERTIFY_RADII = (0.0, 0.01, 0.1, 0.5, 1.0, 2.0)
#: settings that change what a cell computes (the grid lists -- data, methods, seeds -- do not)
CELL_SETTINGS = ("epochs", "suite", "eps", "max_samples", "recipe", "attack_strength", "certifier", "batch_size",
                 "feature_dim", "data_options", "method_options")  # fmt: skip
#: the hash keeps the first names of renamed settings, so cells finished before a rename stay valid
_HASH_KEYS = {"attack_strength": "protocol", "max_samples": "samples", "certifier": "certify"}
#: old keyword -> new field of :class:`BenchmarkConfig` (accepted for one release)
_OLD_NAMES = {"protocol": "attack_strength", "samples": "max_samples", "certify": "certifier"}


@dataclass
class BenchmarkConfig:
    """What to run. Validated on construction: every name and value is checked before any training.

    ``data``: dataset names or folder paths; ``methods``: names in ``mmrobust.training.METHODS``, or
    variants ``METHOD@TAG`` (e.g. ``varmat@alpha100``: the same method under its own label, with its own
    ``method_options`` entry, so one grid compares settings of a method side by side);
    ``seeds``: seeds 0..N-1 (each seeds both the data split and the training); ``epochs``: None =
    the training default; ``suite``: the robustness suite (``eps`` overrides its budgets);
    ``max_samples``: attack only the first N test samples; ``recipe``: a :data:`~mmrobust.config.RECIPES`
    name applied to every method; ``attack_strength="paper"`` also evaluates the paper's CE-only
    4-step PGD (:data:`PAPER_ATTACK`); ``certifier``: a certifier name; ``data_options`` /
    ``method_options``: per dataset / method; ``device``: where cells train, attack and certify
    (``auto``: CUDA if available, else CPU; recorded in each cell's ``cell.json``, not part of the
    settings hash: a grid started on a GPU resumes on a laptop). The old keywords ``protocol``,
    ``samples`` and ``certify`` are still accepted for one release.
    """

    data: list[str]
    methods: list[str]
    seeds: int = 3
    epochs: int | None = None
    suite: str = "paper"
    eps: list[float] | None = None
    max_samples: int | None = None
    recipe: str = "tuned"
    attack_strength: str = "strong"
    certifier: str | None = None
    batch_size: int = 64
    feature_dim: int | None = None
    data_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "auto"
    #: the model every cell trains (a :class:`~mmrobust.models.fusion.ModelConfig` as a dict: encoders per
    #: modality, feature_dim, lipschitz_encoders...); the methods' heads apply on top. ``{}``: the defaults
    model: dict[str, Any] = field(default_factory=dict)
    #: plug-in modules imported first (they register the encoders or datasets the grid names)
    plugins: list[str] = field(default_factory=list)
    protocol: InitVar[str | None] = None  # old name of attack_strength
    samples: InitVar[int | None] = None  # old name of max_samples
    certify: InitVar[str | None] = None  # old name of certifier

    def __post_init__(self, protocol: str | None, samples: int | None, certify: str | None) -> None:
        defaults = {"attack_strength": "strong", "max_samples": None, "certifier": None}
        for old, value in (("protocol", protocol), ("samples", samples), ("certify", certify)):
            new = _OLD_NAMES[old]
            if value is None:
                continue
            if getattr(self, new) not in (defaults[new], value):
                raise ConfigError(f"give {new} or its old name {old}, not both", param=new)
            setattr(self, new, value)
        for name in ("data", "methods"):
            value = getattr(self, name)
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"benchmark option '{name}' must be a non-empty list of names, got {value!r}")
            if len(set(value)) != len(value):
                raise ConfigError(f"benchmark option '{name}' lists a name twice: {value}")
        self._check_model()  # plug-ins first: they may register the datasets and methods named below
        for d in self.data:
            folder = dataset_folder(d)
            if d not in DATASETS and (folder is None or not folder.is_dir()):
                raise ConfigError(
                    f"unknown dataset '{d}'; choose from: {', '.join(DATASETS.names())}, or give a folder path"
                )
        slugs = [_slug(d) for d in self.data]
        if len(set(slugs)) != len(slugs):
            raise ConfigError(f"datasets {self.data} would share a folder name; rename a folder")
        for m in self.methods:
            base, at, tag = m.partition("@")
            if at and not re.fullmatch(r"[A-Za-z0-9_.=-]+", tag):
                raise ConfigError(f"method variant '{m}': the tag after '@' may use letters, digits and _ . = - only")
            METHODS.get(base)  # unknown name -> one-line error listing the methods
        _check_int(self.seeds, "seeds", 1)
        resolve_device(self.device)  # a malformed name, or CUDA that is not there: refused before any work
        _check_int(self.batch_size, "batch_size", 1)
        for name in ("epochs", "max_samples", "feature_dim"):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, 1)
        _check_choice(self.suite, "suite", BENCH_SUITES)
        _check_choice(self.recipe, "recipe", tuple(RECIPES))
        _check_choice(self.attack_strength, "attack_strength", ATTACK_STRENGTHS)
        if self.eps is not None:
            self.eps = parse_eps(self.eps, "eps")
        check_options(self.suite, SUITES.get(self.suite), self.suite_options())
        if self.certifier is not None:
            build_certifier(self.certifier)
        for key, table, names in (("data_options", self.data_options, self.data),
                                  ("method_options", self.method_options, self.methods)):  # fmt: skip
            if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
                raise ConfigError(f"benchmark option '{key}' must map a name to a dict of options")
            stray = sorted(set(table) - set(names))
            if stray:
                raise ConfigError(f"benchmark option '{key}' names {stray}, which are not in the grid ({names})")
        for m, opts in self.method_options.items():
            options_dataclass(
                METHODS.get(method_name(m)).Options, dict(opts), m
            )  # bad keys/values fail now, not mid-grid

    def _check_model(self) -> None:
        if not isinstance(self.plugins, list) or not all(isinstance(m, str) and m for m in self.plugins):
            raise ConfigError(f"benchmark option 'plugins' must be a list of module names, got {self.plugins!r}")
        for module in self.plugins:
            import_plugin(module)
        if not isinstance(self.model, dict):
            raise ConfigError(f"benchmark option 'model' must be a mapping, got {self.model!r}", param="model")
        model = self.model_config()
        if model.factory:
            raise ConfigError(
                "benchmark option 'model.factory': a benchmark trains its models from scratch; a wrapped model does "
                "not apply (register its encoders in a plug-in and name them in model.encoders)",
                param="model",
            )
        if (
            self.feature_dim is not None
            and "feature_dim" in self.model
            and self.model["feature_dim"] != self.feature_dim
        ):
            raise ConfigError(
                f"give feature_dim or model.feature_dim, not both ({self.feature_dim} != {self.model['feature_dim']})",
                param="feature_dim",
            )
        from mmrobust.models.encoders import ENCODERS

        for name in model.encoders.values():
            ENCODERS.get(name)  # unknown encoder -> one-line error listing them, before any training

    def model_config(self) -> ModelConfig:
        """The cells' :class:`~mmrobust.models.fusion.ModelConfig` (strictly validated, like ``train``'s)."""
        return RunConfig.from_dict({"model": json.loads(json.dumps(self.model))}).model

    def suite_options(self) -> dict[str, Any]:
        return {"eps": list(self.eps)} if self.eps is not None else {}

    def cell_settings(self) -> dict[str, Any]:
        """What a finished cell depends on (its hash decides whether it can be reused), fixed attack
        constants included. The keys are those of the first cell manifests (``protocol`` for
        ``attack_strength``, ``paper_protocol`` for :data:`PAPER_ATTACK`), so old cells stay valid."""
        fixed = {"paper_protocol": PAPER_ATTACK, "certify_radii": CERTIFY_RADII}
        settings = {_HASH_KEYS.get(k, k): _plain(getattr(self, k)) for k in CELL_SETTINGS}
        if self.model:  # the model changes what a cell computes; absent when default, so older cells stay valid
            settings["model"] = _plain(self.model)
        return {**settings, "constants": _plain(fixed)}

    def cells(self) -> list[Cell]:
        """The grid in run order: per dataset, per seed, every method (all methods of seed 0 come first)."""
        return [Cell(d, m, s) for d in self.data for s in range(self.seeds) for m in self.methods]

    def to_json(self) -> dict[str, Any]:
        """The config as JSON; renamed settings are also written under their old keys (one release)."""
        d = _plain(asdict(self))
        units = ("joint l2 budgets measure delta_m / scale_m with the modality's standardisation std as scale; l-inf "
                 "budgets are in each modality's stored units; every result row states its units and scales")  # fmt: skip
        return {**d, "eps_units": units, **{old: d[new] for old, new in _OLD_NAMES.items()}}


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v))


def _check_int(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"benchmark option '{name}' must be an integer >= {low}, got {value!r}", param=name)


def _check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(
            f"benchmark option '{name}': unknown value {value!r}; choose from: {', '.join(choices)}", param=name
        )


def method_name(label: str) -> str:
    """The training method of a grid label: ``varmat@alpha100`` -> ``varmat``."""
    return label.partition("@")[0]


def _slug(dataset: str) -> str:
    folder = dataset_folder(dataset)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", folder.name if folder is not None else dataset) or "data"


@dataclass(frozen=True)
class Cell:
    dataset: str
    method: str
    seed: int

    def folder(self, out: Path) -> Path:
        return out / "runs" / _slug(self.dataset) / self.method / f"seed{self.seed}"

    def settings_hash(self, cfg: BenchmarkConfig) -> str:
        payload = {"cell": asdict(self), **cfg.cell_settings()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.dataset} / {self.method} / seed {self.seed}"


@dataclass
class CertifySummary:
    """Certified accuracy of one cell at the grid radii (joint threat), and the guarantee kind."""

    certifier: str
    guarantee: str
    alpha: float | None
    radii: list[float]
    joint: list[float]
    median_joint_radius: float | None


@dataclass
class CellResult:
    """One trained and evaluated cell; ``resumed``: read back from a finished cell's files."""

    cell: Cell
    metrics: dict[str, Any]
    evaluation: EvalResult
    paper_attack: EvalResult | None
    certificate: CertifySummary | None
    seconds: dict[str, float]
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self.cell),
            "resumed": self.resumed,
            "val_accuracy": self.metrics.get("val_accuracy"),
            "test_accuracy": self.metrics.get("test_accuracy"),
            "best_epoch": self.metrics.get("best_epoch"),
            "train_time_s": self.metrics.get("train_time_s"),
            "seconds": self.seconds,
            "evaluation": self.evaluation.to_json(),
            "paper_attack": self.paper_attack.to_json() if self.paper_attack else None,
            "paper_protocol": self.paper_attack.to_json() if self.paper_attack else None,  # old key
            "certificate": asdict(self.certificate) if self.certificate else None,
            "certify": asdict(self.certificate) if self.certificate else None,  # old key
        }


@dataclass
class BenchmarkResult:
    config: BenchmarkConfig
    cells: list[CellResult]
    seconds: float

    @property
    def resumed(self) -> int:
        return sum(c.resumed for c in self.cells)

    def tables(self) -> list[ComparisonTable]:
        """Per dataset the multi-modal and uni-modal tables (mean ± std over seeds) and the training table."""
        cfg = self.config
        notes = [
            f"recipe: {cfg.recipe}; attack strength: {cfg.attack_strength}; suite: {cfg.suite}; "
            f"epochs: {cfg.epochs or RunConfig().train.epochs}; seeds: {cfg.seeds}; attacked test samples: "
            + (str(cfg.max_samples) if cfg.max_samples else "all")
        ]
        out = []
        for d in cfg.data:
            cells = [c for c in self.cells if c.cell.dataset == d]
            evals = {m: [c.evaluation for c in cells if c.cell.method == m] for m in cfg.methods}
            paper = {m: [c.paper_attack for c in cells if c.cell.method == m and c.paper_attack] for m in cfg.methods}
            out += comparison_tables(d, evals, paper if cfg.attack_strength == "paper" else None, notes)
            out.append(self._summary_table(d, cells, notes))
        return out

    def _summary_table(self, dataset: str, cells: list[CellResult], notes: list[str]) -> ComparisonTable:
        """Training outcome per method (validation-selected model) and, with a certifier, certified accuracy."""
        cols = [Column("val accuracy", "value"), Column("test accuracy (full split)", "value"),
                Column("train time (s)", "value", unit="s")]  # fmt: skip
        cert = [c.certificate for c in cells if c.certificate is not None]
        radii = cert[0].radii if cert else []
        kind = f"{cert[0].certifier}: {cert[0].guarantee}" if cert else ""
        if cert and cert[0].alpha is not None:  # a probabilistic certificate states its failure probability
            kind += f", alpha={cert[0].alpha:g}"
        cols += [Column(f"certified r={r:g} ({kind})", "value") for r in radii]
        rows: dict[str, list[Stat | None]] = {}
        for m in self.config.methods:
            mine = [c for c in cells if c.cell.method == m]
            stats = [
                stat([c.metrics.get("val_accuracy") for c in mine]),
                stat([c.metrics.get("test_accuracy") for c in mine]),
                stat([c.metrics.get("train_time_s") for c in mine]),
            ]
            stats += [stat([c.certificate.joint[i] for c in mine if c.certificate]) for i in range(len(radii))]
            rows[m] = stats
        title = "Training (validation-selected models)" + (" and certification" if cert else "")
        return ComparisonTable("summary", title, dataset, cols, rows, list(notes))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "config": self.config.to_json(),
            "seconds": self.seconds,
            "resumed_cells": self.resumed,
            "cells": [c.to_json() for c in self.cells],
            "tables": [t.to_json() for t in self.tables()],
        }


@dataclass
class BenchmarkPlan:
    """Which cells of the grid are finished (skipped), invalidated (other settings) or to run."""

    cells: list[Cell]
    finished: list[Cell]
    invalidated: dict[Cell, list[str]]  # cell -> the settings that changed

    @property
    def todo(self) -> list[Cell]:
        done = set(self.finished)
        return [c for c in self.cells if c not in done]


def _manifest(cell: Cell, out: Path) -> dict[str, Any] | None:
    try:
        m = read_json(cell.folder(out) / MANIFEST_FILE)
    except RunError:
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


def _files_intact(folder: Path, manifest: dict[str, Any]) -> bool:
    for name, digest in manifest["files"].items():
        p = folder / name
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True


def plan_benchmark(cfg: BenchmarkConfig, out: str | Path) -> BenchmarkPlan:
    """Read ``out`` (nothing is written): finished cells, cells finished under other settings."""
    out = Path(out)
    finished, invalidated = [], {}
    current = cfg.cell_settings()
    for cell in cfg.cells():
        m = _manifest(cell, out)
        if m is None:
            continue
        if m.get("settings_hash") != cell.settings_hash(cfg):
            old = m.get("settings", {})
            invalidated[cell] = [k for k in current if old.get(k) != current[k]] or ["(unknown)"]
        elif _files_intact(cell.folder(out), m):
            finished.append(cell)
    return BenchmarkPlan(cfg.cells(), finished, invalidated)


def _describe_change(plan: BenchmarkPlan) -> str:
    changed = sorted({k for keys in plan.invalidated.values() for k in keys})
    return ", ".join(changed)


def run_benchmark(
    cfg: BenchmarkConfig,
    out: str | Path,
    force: bool = False,
    progress: ProgressFn | None = None,
    on_message: MessageFn | None = None,
) -> BenchmarkResult:
    """Run (or resume) the grid into ``out``; see the module docstring. ``progress("benchmark", done,
    total)`` hears the cells finished; ``on_message`` gets one line per finished cell (its time, the
    elapsed time and an estimate of the time left)."""
    out = check_benchmark_out(out)
    with Lock(out, "benchmark"):
        return _run_locked(cfg, out, force, progress, on_message)


def check_benchmark_out(out: str | Path) -> Path:
    """Resolve ``out`` once (a symlink: its target) and refuse, before any work, what the grid could not
    be published into: a file or device, a non-empty folder mmrobust did not write (a benchmark resumes
    into its own folder), a folder another mmrobust process is writing."""
    path = resolve_target(out)
    check_destination(path, existing_ok=True)
    if path.is_dir() and any(path.iterdir()) and not is_mmrobust_folder(path):
        raise RunError(f"{path}: not empty and not a benchmark folder (no {SETTINGS_FILE}); choose another out",
                       param="out")  # fmt: skip
    Lock(path, "benchmark").refuse_if_taken()
    return path


def _run_locked(
    cfg: BenchmarkConfig, out: Path, force: bool, progress: ProgressFn | None, on_message: MessageFn | None
) -> BenchmarkResult:
    plan = plan_benchmark(cfg, out)
    if plan.invalidated and not force:
        raise ConfigError(
            f"{out}: {len(plan.invalidated)} finished cell(s) were run with other settings "
            f"(changed: {_describe_change(plan)}); pass force=True to redo them, or choose another out",
            param="force",
        )
    t0 = time.perf_counter()
    todo = plan.todo
    bundles: dict[tuple[str, int], DataBundle] = {}

    def bundle(dataset: str, seed: int) -> DataBundle:  # one data split per (dataset, seed), shared by the methods
        if (dataset, seed) not in bundles:
            bundles[(dataset, seed)] = load_data(DataConfig(dataset, seed, dict(cfg.data_options.get(dataset, {}))))
        return bundles[(dataset, seed)]

    _check_cells(cfg, todo, bundle)
    write_json(out / SETTINGS_FILE, cfg.to_json())
    results = {c: _read_cell(c, out, cfg) for c in plan.finished}
    n = len(todo)
    for i, cell in enumerate(todo):
        if progress:
            progress("benchmark", i, n)
        results[cell] = _run_cell(cell, out, cfg, bundle(cell.dataset, cell.seed))
        elapsed = time.perf_counter() - t0
        if progress:
            progress("benchmark", i + 1, n)
        if on_message:
            seconds, eta = sum(results[cell].seconds.values()), elapsed / (i + 1) * (n - i - 1)
            on_message(f"[{i + 1}/{n}] {cell.label}: {seconds:.0f} s; elapsed {elapsed:.0f} s, ETA {eta:.0f} s")
    return BenchmarkResult(cfg, [results[c] for c in plan.cells], time.perf_counter() - t0)


def _check_cells(cfg: BenchmarkConfig, cells: Sequence[Cell], bundle: Callable[[str, int], DataBundle]) -> None:
    """Everything that could fail mid-grid fails now: data options (each dataset loads), run configs,
    and each method's model on each dataset (e.g. an orthogonal head needs feature dim >= classes)."""
    seen = set()
    for cell in cells:
        rc = _run_config(cell, cfg)
        if (cell.dataset, cell.method) in seen:
            continue
        seen.add((cell.dataset, cell.method))
        meta = bundle(cell.dataset, 0).meta
        build_model(meta, method_model_config(rc))


def _run_config(cell: Cell, cfg: BenchmarkConfig) -> RunConfig:
    rc = RunConfig()
    rc.data = DataConfig(cell.dataset, cell.seed, dict(cfg.data_options.get(cell.dataset, {})))
    rc.model = cfg.model_config()
    if cfg.feature_dim is not None:
        rc.model.feature_dim = cfg.feature_dim
    rc.train.method, rc.train.seed, rc.train.batch_size = method_name(cell.method), cell.seed, cfg.batch_size
    if cfg.epochs is not None:
        rc.train.epochs = cfg.epochs
    rc.train.optim = OptimConfig.from_recipe(cfg.recipe)
    rc.train.method_options = dict(cfg.method_options.get(cell.method, {}))
    rc.train.progress = False
    rc.train.device = cfg.device
    rc.validate()
    return rc


def _train_cell(rc: RunConfig, folder: Path, bundle: DataBundle) -> FitResult:
    """Train one cell; a cell whose training was interrupted continues from its last epoch checkpoint
    (the same mechanism as ``mmrobust train --resume``), or starts over if its settings changed."""
    if (RunFolder(folder).partial / CHECKPOINT_JSON).is_file():
        try:
            return train(rc, out=folder, bundle=bundle, resume=True)
        except ConfigError:  # the interrupted training used other settings: redo it
            pass
    return train(rc, out=folder, bundle=bundle, force=True)


def _run_cell(cell: Cell, out: Path, cfg: BenchmarkConfig, bundle: DataBundle) -> CellResult:
    folder = cell.folder(out)
    if folder.exists():  # an interrupted or invalidated cell: start clean, no stale file survives
        shutil.rmtree(folder)
    seconds: dict[str, float] = {}
    device = resolve_device(cfg.device)
    t = time.perf_counter()
    fit = _train_cell(_run_config(cell, cfg), folder, bundle)
    seconds["train"] = time.perf_counter() - t
    test = bundle.test if cfg.max_samples is None else bundle.test.subset(slice(0, cfg.max_samples))
    files = ["model.safetensors", "config.json", "metrics.json"]

    t = time.perf_counter()
    evaluation = evaluate_model(fit.model, bundle.meta, test, cfg.suite, **cfg.suite_options())
    write_json(folder / f"eval_{cfg.suite}.json", evaluation.to_json())
    files.append(f"eval_{cfg.suite}.json")
    paper = None
    if cfg.attack_strength == "paper":
        paper_eps = cfg.suite_options() if cfg.suite == "paper" else {}
        paper = evaluate_model(fit.model, bundle.meta, test, "paper", **paper_eps, **PAPER_ATTACK)
        write_json(folder / PAPER_ATTACK_FILE, paper.to_json())
        files.append(PAPER_ATTACK_FILE)
    seconds["evaluate"] = time.perf_counter() - t

    summary = None
    if cfg.certifier is not None:
        t = time.perf_counter()
        res = certify_model(fit.model, bundle.meta, split_on_device(test, device), cfg.certifier,
                            split_on_device(bundle.train, device), CERTIFY_RADII, fit_split="train")  # fmt: skip
        write_json(folder / CERTIFY_FILE, res.document(load_run(folder)))  # the cell's sealed run folder
        files.append(CERTIFY_FILE)
        summary = _certify_summary(res.to_json())
        seconds["certify"] = time.perf_counter() - t

    manifest = {
        "cell": asdict(cell),
        "settings_hash": cell.settings_hash(cfg),
        "settings": cfg.cell_settings(),
        "seconds": seconds,
        "device": str(device),  # where the cell computed (timings depend on it; not a setting)
        "files": {name: sha256_file(folder / name) for name in files},
    }
    write_json(folder / MANIFEST_FILE, manifest)  # last: its presence marks the cell finished
    return CellResult(cell, fit.metrics, evaluation, paper, summary, seconds)


def _certify_summary(entry: dict[str, Any]) -> CertifySummary:
    ca = entry["certified_accuracy"]
    median = entry["summary"]["median_joint_radius_correct"]
    return CertifySummary(entry["estimator"], entry["guarantee_kind"], entry["alpha"], ca["radii"], ca["joint"],
                          median if median is None or math.isfinite(median) else None)  # fmt: skip


def _read_cell(cell: Cell, out: Path, cfg: BenchmarkConfig) -> CellResult:
    folder = cell.folder(out)
    m = read_json(folder / MANIFEST_FILE)
    paper = folder / PAPER_ATTACK_FILE
    cert = folder / CERTIFY_FILE
    return CellResult(
        cell,
        read_json(folder / "metrics.json"),
        EvalResult.from_json(read_json(folder / f"eval_{cfg.suite}.json")),
        EvalResult.from_json(read_json(paper)) if cfg.attack_strength == "paper" else None,
        _certify_summary(next(iter(normalize_certify(read_json(cert))["certifiers"].values())))
        if cfg.certifier is not None
        else None,
        dict(m.get("seconds", {})),
        resumed=True,
    )
