"""Certification results on screen and on disk: the rich table and ``RUN/certify.json``.

``certify.json`` keeps one entry per certifier (``estimators.empirical``, ``estimators.sound``, ...),
so certifying with several leaves their results side by side; re-running one replaces its own
entry only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmrobust.certify.base import Guarantee
from mmrobust.certify.results import CertifyResult
from mmrobust.certify.runner import CERTIFY_FILE
from mmrobust.errors import RunError
from mmrobust.io import read_json, write_json
from mmrobust.publish import folder_update
from mmrobust.report.console import out
from mmrobust.report.tables import print_table
from mmrobust.runs import Run


def save_certify(run: Run, result: CertifyResult) -> Path:
    """Merge ``result`` into ``RUN/certify.json`` under its key (written atomically), under the run
    folder's update lock: concurrent ``certify`` runs on one folder never lose each other's results."""
    target = run.path / CERTIFY_FILE
    with folder_update(run.path):
        doc: dict[str, Any] = {}
        if target.is_file():
            try:
                doc = read_json(target)
            except RunError:
                doc = {}  # a corrupt previous file is replaced, never half-merged
        write_json(target, result.document(run, doc))
    return target


def save_certify_plot(run: Run, results: Sequence[CertifyResult]) -> Path:
    """``RUN/certified_accuracy.png``: every result's certified-accuracy curves side by side
    (sound solid, probabilistic dashed, estimates dotted)."""
    from mmrobust.report.certify_plots import plot_certified_accuracy

    entries = {r.key: r.to_json() for r in results}
    return plot_certified_accuracy(
        entries, run.path / "certified_accuracy.png", title=f"{run.path.name}: certified accuracy ({results[0].split})"
    )


def guarantee_label(result: CertifyResult) -> str:
    """How the radii may be read: a guarantee, a probabilistic certificate (with alpha) or an estimate."""
    c = result.certificate
    if c.guarantee is Guarantee.SOUND:
        return "a GUARANTEE"
    if c.guarantee is Guarantee.PROBABILISTIC:
        return f"PROBABILISTIC (holds except with probability alpha={c.alpha})"
    return "an ESTIMATE, not a guarantee"


def print_certify_table(title: str, result: CertifyResult, modalities: Sequence[str], max_cols: int = 7) -> None:
    """Certified accuracy at the grid radii (joint and per modality) as a rich table."""
    grid = result.grid
    cols = list(range(len(grid)))
    if len(cols) > max_cols:  # keep the table readable: evenly spaced radii incl. both ends
        step = (len(cols) - 1) / (max_cols - 1)
        cols = sorted({round(i * step) for i in range(max_cols)})
    headers = ["perturbation"] + [f"r={grid[i]:g}" for i in cols]
    joint = result.accuracy_curve("joint")
    rows: list[list[Any]] = [["joint"] + [joint[i] for i in cols]]
    for m in modalities:
        if m not in result.certificate.radii.unimodal:  # certified jointly only (unimodal=false)
            continue
        curve = result.accuracy_curve(m)
        rows.append([f"{m} only"] + [curve[i] for i in cols])
    print_table(title, headers, rows)


def show_certify(run: Run, result: CertifyResult) -> None:
    """The certified-accuracy table, the vulnerability indicators and the soundness check."""
    theorem = result.certificate.info.get("theorem")
    print_certify_table(
        f"{run.path} — certified accuracy on {result.split} ({result.n} samples), {result.name} "
        f"({guarantee_label(result)})" + (f", Theorem {theorem}" if theorem else ""),
        result,
        run.model.modalities,
    )
    vul = result.certificate.info.get("vulnerability")
    if vul:
        etas = ", ".join(f"{m} {v:.4g}" for m, v in vul["mean"].items() if v is not None)
        ratios = ", ".join(f"{k} {v:.3g}" for k, v in vul["ratio_of_means"].items() if v is not None)
        out.print(f"vulnerability eta (mean over correct samples): {etas}; ratio {ratios}")
    if result.soundness is not None:
        snd = result.soundness
        viol = ", ".join(f"{t} {snd[t]['violations']}/{snd[t]['checked']}" for t in ["joint", *run.model.modalities])
        out.print(f"soundness check on {snd['samples']} samples (attacks inside the certified ball): violations {viol}")
    if result.tightness is not None:
        t = result.tightness
        median = f"{t.median_ratio:.3f}" if t.median_ratio is not None else "n/a (no attack succeeded)"
        out.print(
            f"tightness on {t.indices.numel()} correct samples (joint l2): median certified / smallest attack radius "
            f"{median}; samples certified beyond an attack: {t.violations}"
        )
