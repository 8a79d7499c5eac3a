"""Evaluate a run folder with a named suite and write ``RUN/eval.json``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmrobust.data.base import Split
from mmrobust.eval.basic import evaluate_basic
from mmrobust.io import write_json
from mmrobust.registry import Registry
from mmrobust.report.tables import print_table
from mmrobust.runs import Run, load_run

#: name -> ``suite(run, split, **options) -> eval dict`` (the eval.json content)
SUITES: Registry[Callable[..., dict[str, Any]]] = Registry("evaluation suite")


def worst_case(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Lowest accuracy over all results and per attack name."""
    by_attack: dict[str, float] = {}
    for r in results:
        by_attack[r["attack"]] = min(by_attack.get(r["attack"], 1.0), r["accuracy"])
    return {"accuracy": min(by_attack.values()) if by_attack else None, "by_attack": by_attack}


@SUITES.register("basic")
def basic_suite(run: Run, split: Split, fill: str = "zero", batch_size: int = 256, **_: Any) -> dict[str, Any]:
    """Clean accuracy and accuracy with each modality missing."""
    res = evaluate_basic(run.model, split, run.meta.num_classes, fill=fill, batch_size=batch_size)
    return {**res, "worst_case": worst_case(res["results"]), "warnings": []}


def evaluate_run(path: str | Path, suite: str = "basic", split: str = "test", **options: Any) -> dict[str, Any]:
    """Run ``suite`` on a run folder's ``split``, print a table and write ``eval.json``."""
    fn = SUITES.get(suite)
    run = load_run(path)
    data = run.data().split(split)
    result = {"suite": suite, "split": split, **fn(run, data, **options)}
    expected = run.metrics.get(f"{split}_accuracy")
    rows: list[list[Any]] = [["clean", "–", "–", result["clean_accuracy"]]]
    for r in result["results"]:
        rows.append([r["attack"], ",".join(r["modalities"]), r.get("loss", "–"), r["accuracy"]])
    print_table(
        f"{run.path} — {suite} suite on {split} ({len(data)} samples)",
        ["attack", "modalities", "loss", "accuracy"],
        rows,
    )
    if expected is not None and abs(expected - result["clean_accuracy"]) > 1e-9:
        result["warnings"].append(
            f"clean {split} accuracy {result['clean_accuracy']:.6f} differs from the training run's {expected:.6f}"
        )
    for w in result["warnings"]:
        print_warning(w)
    write_json(Path(path) / "eval.json", result)
    return result


def print_warning(message: str) -> None:
    from mmrobust.report.console import console

    console.print(f"warning: {message}", style="yellow", markup=False)
