"""Certify a model or a run folder: per-sample radii, certified accuracy, vulnerability indicators.

``certify_run`` writes ``RUN/certify.json`` atomically. The file keeps one entry per Lipschitz
estimator (``estimators.empirical``, ``estimators.sound``), so certifying with both estimators
leaves both results side by side; re-running an estimator replaces its own entry only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmrobust.certify.estimators import head_lipschitz
from mmrobust.certify.radius import certified_accuracy, certified_radii, eta_summary
from mmrobust.data.base import DatasetMeta, Split, iterate_batches
from mmrobust.errors import ConfigError, RunError
from mmrobust.io import read_json, write_json
from mmrobust.models.fusion import LateFusionModel

CERTIFY_FILE = "certify.json"
#: default radius grid (l2, in the model's input space) for certified accuracy
DEFAULT_RADII = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@torch.no_grad()
def _logits(model: LateFusionModel, split: Split, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(inputs) for inputs, _ in iterate_batches(split, batch_size)])


def _plain(obj: Any) -> Any:
    """Tensors -> nested lists, recursively: callers (reports, tables) get plain Python values."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _median(x: torch.Tensor) -> float | None:
    return float(x.double().median()) if x.numel() else None


def certify_model(
    model: LateFusionModel,
    meta: DatasetMeta,
    split: Split,
    lipschitz: str = "empirical",
    lipschitz_data: Split | None = None,
    radii: Sequence[float] | None = None,
    batch_size: int = 256,
    max_samples: int | None = 512,
    theorem: str = "auto",
) -> dict[str, Any]:
    """Certify every sample of ``split``; returns the ``certify.json`` entry for this estimator.

    ``lipschitz_data`` is the data the empirical estimator maximises over (default: ``split``;
    the CLI passes the training split). Radii are l2 norms in the model's input space; samples
    that are misclassified get radius 0.
    """
    grid = sorted(float(r) for r in (radii if radii is not None else DEFAULT_RADII))
    if any(r < 0 for r in grid):
        raise ConfigError(f"radii must be >= 0, got {grid}")
    t0 = time.perf_counter()
    logits = _logits(model, split, batch_size)
    t1 = time.perf_counter()
    hl = head_lipschitz(
        model,
        meta,
        lipschitz,
        lipschitz_data if lipschitz_data is not None else split,
        theorem=theorem,
        max_samples=max_samples,
    )
    t2 = time.perf_counter()
    res = certified_radii(logits, split.labels, hl.pair_lip)
    vul = eta_summary(res["eta"], res["correct"], hl.pair_lip)
    t3 = time.perf_counter()
    correct = res["correct"]
    names = model.modalities
    return _plain(
        {
            "estimator": lipschitz,
            "guarantee": hl.guarantee,
            "theorem": hl.theorem,
            "note": hl.info["note"],
            "n": len(split),
            "clean_accuracy": float(correct.double().mean()),
            "summary": {
                "median_joint_radius_correct": _median(res["joint"][correct]),
                "median_unimodal_radius_correct": {m: _median(res["unimodal"][m][correct]) for m in names},
            },
            "certified_accuracy": {
                "radii": grid,
                "joint": certified_accuracy(res["joint"], grid),
                "unimodal": {m: certified_accuracy(res["unimodal"][m], grid) for m in names},
            },
            "vulnerability": vul,
            "lipschitz": {"tau": hl.tau, "info": {k: v for k, v in hl.info.items() if k != "note"}},
            "radii": {"joint": res["joint"], "unimodal": res["unimodal"]},
            "eta": res["eta"],
            "labels": split.labels,
            "runner_up": res["runner_up"],
            "margin": res["margin"],
            "correct": correct,
            "timing": {"forward_s": t1 - t0, "lipschitz_s": t2 - t1, "radii_s": t3 - t2, "total_s": t3 - t0},
        }
    )


def print_certify_table(title: str, result: dict[str, Any], modalities: Sequence[str], max_cols: int = 7) -> None:
    """Certified accuracy at the grid radii (joint and per modality) as a rich table."""
    from mmrobust.report.tables import print_table

    ca = result["certified_accuracy"]
    cols = list(range(len(ca["radii"])))
    if len(cols) > max_cols:  # keep the table readable: evenly spaced radii incl. both ends
        step = (len(cols) - 1) / (max_cols - 1)
        cols = sorted({round(i * step) for i in range(max_cols)})
    headers = ["perturbation"] + [f"r={ca['radii'][i]:g}" for i in cols]
    rows = [["joint"] + [ca["joint"][i] for i in cols]]
    rows += [[f"{m} only"] + [ca["unimodal"][m][i] for i in cols] for m in modalities]
    print_table(title, headers, rows)


def certify_run(
    path: str | Path,
    lipschitz: str = "empirical",
    split: str = "test",
    radii: Sequence[float] | None = None,
    lipschitz_split: str = "train",
    max_samples: int | None = 512,
    batch_size: int = 256,
    soundness_samples: int = 0,
    attack_steps: int = 50,
    theorem: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Certify a run folder's ``split`` with the ``lipschitz`` estimator; writes ``RUN/certify.json``.

    The empirical estimator maximises over the first ``max_samples`` samples of ``lipschitz_split``
    (the training split by default, so the test split is never used to fit anything). With
    ``soundness_samples > 0`` the radii of that many samples are attacked
    (:func:`~mmrobust.certify.soundness.soundness_check`) and the violation rates stored.
    ``theorem`` (``auto``/``3.3``/``3.5``) picks the bound (see
    :func:`~mmrobust.certify.estimators.resolve_theorem`); a non-default choice is stored under
    ``estimators["<lipschitz>@<theorem>"]``. Returns this estimator's entry of ``certify.json``.
    """
    from mmrobust.certify.estimators import ESTIMATORS, THEOREMS
    from mmrobust.runs import load_run

    ESTIMATORS.get(lipschitz)  # unknown names -> ConfigError before any work
    if theorem not in THEOREMS:
        raise ConfigError(f"unknown theorem '{theorem}'; choose from: {', '.join(THEOREMS)}")
    run = load_run(path)
    bundle = run.data()
    data = bundle.split(split)
    result = certify_model(
        run.model, run.meta, data, lipschitz, bundle.split(lipschitz_split), radii, batch_size, max_samples, theorem
    )
    result["split"] = split
    if soundness_samples > 0:
        from mmrobust.certify.soundness import soundness_check

        result["soundness"] = soundness_check(
            run.model, run.meta, data, result["radii"], max_samples=soundness_samples, steps=attack_steps
        )
    result["lipschitz"]["info"]["data_split"] = lipschitz_split if lipschitz == "empirical" else None
    target = Path(path) / CERTIFY_FILE
    key = lipschitz if theorem == "auto" else f"{lipschitz}@{theorem}"  # one entry per estimator/theorem
    doc: dict[str, Any] = {}
    if target.is_file():
        try:
            doc = read_json(target)
        except RunError:
            doc = {}  # a corrupt previous file is replaced, never half-merged
    doc = {
        "run": str(path),
        "head": run.config.model.head,
        "modalities": run.model.modalities,
        "class_names": run.meta.class_names,
        "estimators": {**doc.get("estimators", {}), key: result},
    }
    write_json(target, doc)
    if not quiet:
        from mmrobust.report.console import out

        label = "a GUARANTEE" if result["guarantee"] else "an ESTIMATE, not a guarantee"
        print_certify_table(
            f"{path} — certified accuracy on {split} ({len(data)} samples), {lipschitz} Lipschitz ({label}), "
            f"Theorem {result['theorem']}",
            result,
            run.model.modalities,
        )
        vul = result["vulnerability"]
        etas = ", ".join(f"{m} {v:.4g}" for m, v in vul["mean"].items() if v is not None)
        ratios = ", ".join(f"{k} {v:.3g}" for k, v in vul["ratio_of_means"].items() if v is not None)
        out.print(f"vulnerability eta (mean over correct samples): {etas}; ratio {ratios}")
        if "soundness" in result:
            snd = result["soundness"]
            viol = ", ".join(
                f"{t} {snd[t]['violations']}/{snd[t]['checked']}" for t in ["joint", *run.model.modalities]
            )
            out.print(
                f"soundness check on {snd['samples']} samples (attacks inside the certified ball): violations {viol}"
            )
        out.print(f"wrote {target}")
    return result


def parse_radii(text: str) -> list[float]:
    """Parse ``"0,0.1,0.5"`` into radii; a bad entry raises a one-line :class:`ConfigError`."""
    try:
        radii = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--radii: expected comma-separated numbers, got '{text}'") from None
    if not radii or any(not r >= 0 or r == float("inf") for r in radii):
        raise ConfigError(f"--radii: expected finite numbers >= 0, got '{text}'")
    return radii


def load_certify(path: str | Path) -> dict[str, Any]:
    """Read ``RUN/certify.json`` (or a path to the file itself)."""
    path = Path(path)
    return read_json(path / CERTIFY_FILE if path.is_dir() else path)
