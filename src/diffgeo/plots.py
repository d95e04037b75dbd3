"""matplotlib figures for results (Agg backend: works headless, never opens a window)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def grouped_bars(labels: Sequence[str], series: Mapping[str, Sequence[float]], path: str | Path,
                 ylabel: str, title: str = "") -> Path:
    """One group of bars per label, one bar per series (e.g. PSNR per scene, plain vs exact)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.2), dpi=120)
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, values, width=width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=0)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def line_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], path: str | Path,
              xlabel: str, ylabel: str, title: str = "", logy: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=120)
    for name, ys in series.items():
        ax.plot(x, ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
