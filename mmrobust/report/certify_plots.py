"""Certification plots: certified accuracy vs radius, and the eta-ratio heatmap (CRMT paper Fig. 3).

Both take entries of ``certify.json`` (``doc["estimators"][name]``) so the demo and users can
overlay any runs and estimators.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmrobust.errors import ConfigError
from mmrobust.report.plots import plt, save_figure

#: line style per kind of certificate: a sound (deterministic) bound solid, a probabilistic one
#: (randomized smoothing, holds except with probability alpha) dashed, an estimate dotted
STYLES = {"sound": "-", "probabilistic": "--", "estimate": ":"}
KIND_LABELS = {"sound": "", "probabilistic": "probabilistic", "estimate": "estimate"}
MARKERS = "osD^vP*X"


def certificate_kind(entry: Mapping[str, Any]) -> str:
    """``sound``, ``probabilistic`` or ``estimate`` for a ``certify.json`` entry (older entries have
    only the ``guarantee`` flag: true is sound, false an estimate)."""
    kind = entry.get("guarantee_kind")
    if kind in STYLES:
        return str(kind)
    return "sound" if entry.get("guarantee") else "estimate"


def curve_styles(
    results: Mapping[str, Mapping[str, Any]], groups: Mapping[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """Matplotlib style per label: line style by kind of certificate, colour by model group, marker
    by certifier, and the legend text (which names probabilistic curves with their alpha and
    estimates as such)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = {label: groups.get(label, label) if groups else label for label in results}
    colour = {k: cycle[i % len(cycle)] for i, k in enumerate(dict.fromkeys(keys.values()))}
    names = list(dict.fromkeys(str(e.get("estimator", "")) for e in results.values()))
    out = {}
    for label, entry in results.items():
        kind = certificate_kind(entry)
        note = KIND_LABELS[kind]
        if kind == "probabilistic" and entry.get("alpha") is not None:
            note += f", alpha={entry['alpha']:g}"
        out[label] = {
            "ls": STYLES[kind],
            "color": colour[keys[label]],
            "marker": MARKERS[names.index(str(entry.get("estimator", ""))) % len(MARKERS)],
            "label": f"{label} ({note})" if note else label,
        }
    return out


def plot_certified_accuracy(
    results: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    title: str | None = None,
    groups: Mapping[str, str] | None = None,
) -> Path:
    """Certified accuracy vs l2 radius, one panel per threat (joint, each modality alone).

    ``results`` maps a legend label (e.g. ``"JT (sound)"``) to a ``certify.json`` estimator entry;
    every certifier can be drawn side by side. The line style says what kind of statement a curve
    is: solid for a sound (deterministic) certificate, dashed for a probabilistic one (the legend
    gives its alpha), dotted for an estimate that is not a guarantee. ``groups`` maps labels to a
    model name: the curves of one model share a colour (default: one colour per label).
    """
    if not results:
        raise ConfigError("plot_certified_accuracy: nothing to plot")
    modalities: list[str] = []
    for entry in results.values():
        for m in entry["certified_accuracy"]["unimodal"]:
            if m not in modalities:
                modalities.append(m)
    panels = ["joint", *modalities]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    positive = [r for e in results.values() for r in e["certified_accuracy"]["radii"] if r > 0]
    linthresh = min(positive) if positive else 1e-3
    styles = curve_styles(results, groups)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, entry in results.items():
            ca = entry["certified_accuracy"]
            ys = ca["joint"] if panel == "joint" else ca["unimodal"].get(panel)
            if ys is not None:
                ax.plot(ca["radii"], ys, ms=3, **styles[label])
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set(xlabel="l2 radius", title="joint perturbation" if panel == "joint" else f"{panel} only", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("certified accuracy")
    # one legend for every panel: a curve drawn only in some panels (e.g. a joint-only smoothing run)
    # must still be named
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    axes[0][-1].legend(
        list(handles.values()),
        list(handles),
        fontsize=7,
        title="solid: sound certificate\ndashed: probabilistic (fails w.p. alpha)\ndotted: estimate, no guarantee",
        title_fontsize=7,
        loc="center left",
        bbox_to_anchor=(1.02, 0.5),
    )
    if title:
        fig.suptitle(title, y=1.03)
    return save_figure(fig, path)


def plot_eta_heatmaps(
    results: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    class_names: Sequence[str] | None = None,
    ratio: str | None = None,
) -> Path:
    """Heatmaps of the vulnerability-indicator ratio over (true class, runner-up class), one per entry.

    ``ratio`` picks which ``"m/ref"`` ratio to draw (default: the first). Colours are log2 of the
    ratio on a diverging scale shared by all panels (white = equally vulnerable); cells show the
    ratio. Above 1: the numerator modality is the weak point for that class pair.
    """
    if not results:
        raise ConfigError("plot_eta_heatmaps: nothing to plot")
    mats, keys = {}, set()
    for label, entry in results.items():
        pr = entry["vulnerability"]["pair_ratio"]
        key = ratio or next(iter(pr))
        if key not in pr:
            raise ConfigError(f"plot_eta_heatmaps: '{label}' has no ratio '{key}' (has {', '.join(pr)})")
        mats[label] = pr[key]
        keys.add(key)
    logs = [
        math.log2(v) for m in mats.values() for row in m for v in row if v is not None and v > 0 and math.isfinite(v)
    ]
    vmax = max(1.0, max((abs(v) for v in logs), default=1.0))
    n = len(mats)
    k = len(next(iter(mats.values())))
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n + 0.8, 4.0), squeeze=False)
    im = None
    for ax, (label, mat) in zip(axes[0], mats.items(), strict=True):
        grid = [
            [math.log2(v) if v is not None and v > 0 and math.isfinite(v) else math.nan for v in row] for row in mat
        ]
        im = ax.imshow(grid, cmap="coolwarm", vmin=-vmax, vmax=vmax)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    v = mat[i][j]
                    if v is not None and math.isfinite(v):
                        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6)
        ticks = list(range(k))
        names = list(class_names) if class_names is not None else [str(i) for i in ticks]
        ax.set_xticks(ticks, names, fontsize=7, rotation=90 if max(len(s) for s in names) > 2 else 0)
        ax.set_yticks(ticks, names, fontsize=7)
        ax.set(xlabel="runner-up class j", ylabel="true class y", title=label)
    assert im is not None  # results is not empty
    fig.colorbar(im, ax=axes[0].tolist(), label=f"log2 eta ratio ({', '.join(sorted(keys))})", shrink=0.8)
    return save_figure(fig, path)
