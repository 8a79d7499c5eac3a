"""Evaluate a run folder with a named suite and write ``RUN/eval.json``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmrobust.errors import ConfigError
from mmrobust.io import write_json
from mmrobust.registry import Registry
from mmrobust.runs import load_run

#: name -> ``suite(run, split, **options) -> eval dict`` (the eval.json content)
SUITES: Registry[Callable[..., dict[str, Any]]] = Registry("evaluation suite")


def worst_case(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Lowest accuracy over all results, per attack name, and per threat setting.

    ``by_setting`` gives, for each setting (attack, modalities, budget, eps, ...), the worst accuracy
    over its rows (the per-sample ``worst`` row where there is one) and each loss beside it.
    """
    from mmrobust.eval.robust import setting_key, setting_label

    by_attack: dict[str, float] = {}
    settings: dict[tuple, dict[str, Any]] = {}
    for r in results:
        by_attack[r["attack"]] = min(by_attack.get(r["attack"], 1.0), r["accuracy"])
        s = settings.setdefault(setting_key(r), {"setting": setting_label(r), "accuracy": 1.0})
        s["accuracy"] = min(s["accuracy"], r["accuracy"])
        if r.get("loss"):
            s[r["loss"]] = r["accuracy"]
    return {
        "accuracy": min(by_attack.values()) if by_attack else None,
        "by_attack": by_attack,
        "by_setting": list(settings.values()),
    }


def evaluate_run(
    path: str | Path, suite: str = "basic", split: str = "test", max_samples: int | None = None, **options: Any
) -> dict[str, Any]:
    """Run ``suite`` on a run folder's ``split``, print a table and write ``eval.json``.

    The result also goes to ``eval_<suite>.json`` so that several suites can sit side by side;
    ``max_samples`` evaluates only the first samples of the split (quick looks; say so in reports).
    """
    from mmrobust.report.robustness import print_eval_table

    fn = SUITES.get(suite)
    _check_options(suite, fn, options)
    run = load_run(path)
    data = run.data().split(split)
    if max_samples is not None:
        if max_samples < 1:
            raise ConfigError(f"--max-samples must be >= 1, got {max_samples}")
        data = data.subset(slice(0, max_samples))
    result = {"suite": suite, "split": split, **fn(run, data, **options)}
    expected = run.metrics.get(f"{split}_accuracy")
    print_eval_table(result, f"{run.path} — {suite} suite on {split} ({len(data)} samples)")
    if max_samples is None and expected is not None and abs(expected - result["clean_accuracy"]) > 1e-9:
        result["warnings"].append(
            f"clean {split} accuracy {result['clean_accuracy']:.6f} differs from the training run's {expected:.6f}"
        )
    for w in result["warnings"]:
        print_warning(w)
    write_json(Path(path) / f"eval_{suite}.json", result)
    write_json(Path(path) / "eval.json", result)
    return result


def _check_options(suite: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Refuse options the suite would silently ignore (e.g. ``--eps`` with the basic suite)."""
    import inspect

    accepted = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD}
    common = {"progress", "fill", "batch_size"}  # passed by the CLI to every suite
    bad = sorted(k for k in options if k not in accepted and k not in common)
    if bad:
        flags = ", ".join("--" + k.replace("_", "-") for k in bad)
        raise ConfigError(f"option {flags} does not apply to the '{suite}' suite")


def print_warning(message: str) -> None:
    from mmrobust.report.console import console

    console.print(f"warning: {message}", style="yellow", markup=False)


# the suites (basic, paper, curves, autoattack) register themselves in SUITES on import
from mmrobust.eval import suites as _suites  # noqa: E402, F401
