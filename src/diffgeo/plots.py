"""matplotlib figures for results (Agg backend: works headless, never opens a window)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def normalise01(values) -> np.ndarray:
    """Scale a curve to [0, 1] for shape comparisons (a flat curve becomes zeros)."""
    v = np.asarray(values, dtype=float)
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else np.zeros_like(v)


def _save(fig, path: str | Path) -> Path:
    from diffgeo.io import atomic_write

    path = Path(path)
    fig.tight_layout()
    try:
        # through a temporary file: a symlink at ``path`` is replaced, never written through
        atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png"))
    finally:
        plt.close(fig)
    return path


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
    return _save(fig, path)


def line_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], path: str | Path,
              xlabel: str, ylabel: str, title: str = "", logy: bool = False,
              invert_x: bool = False) -> Path:
    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=120)
    for name, ys in series.items():
        ax.plot(x, ys, label=name)
    if invert_x:
        ax.invert_xaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


_COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def curves_figure(image, timesteps: Sequence[int], values, labels: Sequence[str],
                  marks: Sequence[Sequence[tuple[int, int]]], path: str | Path,
                  title: str = "", normalise: bool = False) -> Path:
    """Fig. 2: the image with each component's pixels marked, beside its generation curves.

    ``image`` is (H, W, 3) uint8; ``values`` (K, N); ``marks[k]`` the (row, col) pixels of
    component k, drawn in the colour of its curve.
    """
    vals = np.asarray(values, dtype=float)
    fig, (ax_img, ax) = plt.subplots(1, 2, figsize=(9.0, 3.6), dpi=120,
                                     gridspec_kw={"width_ratios": [1, 1.7]})
    ax_img.imshow(image, interpolation="nearest")
    ax_img.set_axis_off()
    for i, (lab, pix) in enumerate(zip(labels, marks, strict=True)):
        col = _COLOURS[i % len(_COLOURS)]
        ys = [p[0] for p in pix]
        xs = [p[1] for p in pix]
        if len(pix) == 1:  # a pixel: a ringed dot that stays visible on top of regions
            ax_img.scatter(xs, ys, s=40, color=col, edgecolors="white", linewidths=1.2,
                           zorder=3)
        else:  # a region, row or column: translucent cells
            ax_img.scatter(xs, ys, s=10, color=col, marker="s", alpha=0.35, linewidths=0, zorder=2)
        v = normalise01(vals[i]) if normalise else vals[i]
        ax.plot(timesteps, v, color=col, label=lab, lw=1.4)
    ax.set_xlabel("t")
    ax.set_ylabel("generation rate" + (" (normalised)" if normalise else ""))
    ax.invert_xaxis()  # generation runs from t = T down to 0, left to right
    ax.grid(alpha=0.3)
    if len(labels) <= 10:
        ax.legend(frameon=False, fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def definitions_figure(timesteps_by_def: Mapping[str, Sequence[int]],
                       values_by_def: Mapping[str, Sequence[float]], path: str | Path,
                       title: str = "") -> Path:
    """Fig. 5: the curve of one component under each definition, each normalised to [0, 1]."""
    n = len(values_by_def)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.6), dpi=120, sharey=True, squeeze=False)
    for ax, (name, vals) in zip(axes[0], values_by_def.items(), strict=True):
        ax.plot(timesteps_by_def[name], normalise01(vals), lw=1.4)
        ax.set_title(name, fontsize=9)
        ax.invert_xaxis()
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalised rate")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def heatmap_figure(image, values, path: str | Path, title: str = "", alpha: float = 0.55,
                   label: str = "") -> Path:
    """A map over the image: the image, the map, and the map laid over the image."""
    v = np.asarray(values, dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(9.0, 3.2), dpi=120)
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    im = axes[1].imshow(v, cmap="inferno", interpolation="nearest")
    axes[1].set_title(label or "map", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(image, interpolation="nearest")
    axes[2].imshow(v, cmap="inferno", alpha=alpha, interpolation="nearest")
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def saliency_check_figure(salient: Sequence[float], background: Sequence[float],
                          path: str | Path, title: str = "") -> Path:
    """Fig. 3 (left): per image, the salient pixel's fluctuation against the background one's;
    points above the diagonal agree with saliency."""
    s = np.maximum(np.asarray(salient, dtype=float), 1e-12)
    b = np.maximum(np.asarray(background, dtype=float), 1e-12)
    fig, ax = plt.subplots(figsize=(3.6, 3.4), dpi=120)
    agree = s > b
    ax.scatter(b[agree], s[agree], s=14, color="tab:blue", label=f"salient higher ({agree.sum()})")
    ax.scatter(b[~agree], s[~agree], s=14, color="tab:red",
               label=f"background higher ({(~agree).sum()})")
    lo, hi = min(s.min(), b.min()), max(s.max(), b.max())
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("background pixel fluctuation")
    ax.set_ylabel("salient pixel fluctuation")
    ax.legend(frameon=False, fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
