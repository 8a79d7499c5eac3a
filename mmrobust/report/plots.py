"""Matplotlib plots (Agg backend), saved atomically as PNG."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mmrobust.io import atomic_write_bytes  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Validation accuracy and training loss per epoch, one line per method."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        ax1.plot(epochs, [h["val_accuracy"] for h in hist], marker="o", label=name)
        ax2.plot(epochs, [h["train_loss"] for h in hist], marker="o", label=name)
    ax1.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy")
    ax2.set(xlabel="epoch", ylabel="training loss", title="Training loss", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_grouped_bars(
    groups: Sequence[str], series: Mapping[str, Sequence[float]], path: str | Path, ylabel: str, title: str
) -> Path:
    """Bars per group (x axis) and series (colour), e.g. accuracy per condition and method."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) * max(1, len(series)) / 2), 3.8))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width - 0.4 + width / 2 for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=15)
    ax.set(ylabel=ylabel, title=title, ylim=(0, 1.05))
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
