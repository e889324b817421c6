"""Figures shared by the notebooks: saved as PNG and PDF under figures/."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import os

FIG_DIR = Path(os.environ.get("SCALECERT_FIG_DIR", Path(__file__).resolve().parent.parent / "figures"))


def save(fig, name: str, fig_dir: Path | None = None) -> Path:
    """Write a figure as figures/NAME.png and .pdf; return the PNG path."""
    d = Path(fig_dir or FIG_DIR)
    d.mkdir(parents=True, exist_ok=True)
    png = d / f"{name}.png"
    fig.savefig(png, dpi=120, bbox_inches="tight")
    fig.savefig(d / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})
    return png


def save_table(df: pd.DataFrame, name: str, fig_dir: Path | None = None) -> Path:
    """Write a table as figures/NAME.csv and NAME.md; return the CSV path."""
    d = Path(fig_dir or FIG_DIR)
    d.mkdir(parents=True, exist_ok=True)
    df.to_csv(d / f"{name}.csv", index=False)
    (d / f"{name}.md").write_text(df.to_markdown(index=False) + "\n")
    return d / f"{name}.csv"


def to_hwc(x) -> np.ndarray:
    """Return a (3, n, n) tensor/array in [0, 1] as an (n, n, 3) numpy array."""
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.clip(a.transpose(1, 2, 0), 0, 1)


def class_grid(images, labels, classes: list[str], per_class: int, title: str):
    """Return a figure with per_class sample images (columns) for each class (rows)."""
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.1, len(classes) * 1.15),
                             squeeze=False)
    labels = np.asarray(labels)
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(idx):
                ax.imshow(to_hwc(images[idx[j]]), interpolation="nearest")
        axes[c, 0].text(-0.1, 0.5, name, transform=axes[c, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def patch_sizes_figure(image, sizes: dict[str, int], title: str):
    """Return a figure of one real image with each patch size drawn to scale as a square."""
    import matplotlib.patches as mpatches
    n = image.shape[-1]
    fig, axes = plt.subplots(1, len(sizes), figsize=(2.2 * len(sizes), 2.5), squeeze=False)
    for ax, (label, p) in zip(axes[0], sizes.items()):
        ax.imshow(to_hwc(image), interpolation="nearest")
        off = (n - p) / 2 - 0.5
        ax.add_patch(mpatches.Rectangle((off, off), p, p, fill=True, facecolor="red", alpha=0.55,
                                        edgecolor="yellow", linewidth=1))
        ax.set_title(f"{label}: {p}×{p} px", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return fig
