"""Figures shared by the notebooks: saved as PNG and PDF under figures/."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .paths import FIG_DIR, MEASURE_DIR


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


def save_measurement(df: pd.DataFrame, name: str, measure_dir: Path | None = None) -> Path:
    """Write a table of wall times measured on this machine as MEASURE_DIR/NAME.csv and .md (not under figures/: the
    committed figures hold only what the code and the committed cache reproduce), with the UTC date and the host's
    CPU count; return the CSV path."""
    import datetime
    import os

    out = df.assign(measured_utc=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"), cpus=os.cpu_count())
    return save_table(out, name, Path(measure_dir or MEASURE_DIR))


def to_hwc(x) -> np.ndarray:
    """Return a (3, n, n) tensor/array in [0, 1] as an (n, n, 3) numpy array."""
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.clip(a.transpose(1, 2, 0), 0, 1)


def class_grid(images, labels, classes: list[str], per_class: int, title: str):
    """Return a figure with per_class sample images (columns) for each class (rows)."""
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 1.1, len(classes) * 1.15), squeeze=False)
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
        ax.add_patch(
            mpatches.Rectangle(
                (off, off), p, p, fill=True, facecolor="red", alpha=0.55, edgecolor="yellow", linewidth=1
            )
        )
        ax.set_title(f"{label}: {p}×{p} px", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return fig


def sin_map_figure(images, points_list, titles, hw, title: str):
    """Return a figure: each image with its top-n SIN positions drawn (Fig. 1a)."""
    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.2), squeeze=False)
    for ax, img, pts, t in zip(axes[0], images, points_list, titles):
        n = img.shape[-1]
        ax.imshow(to_hwc(img), interpolation="nearest")
        scale = n / hw[0]
        ax.scatter(
            (pts[:, 1] + 0.5) * scale - 0.5,
            (pts[:, 0] + 0.5) * scale - 0.5,
            s=6,
            c="cyan",
            edgecolors="black",
            linewidths=0.3,
        )
        ax.set_title(t, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def distribution_figure(df: pd.DataFrame, x: str, hue: str, title: str, discrete: bool = False, xlabel=None):
    """Return a histogram figure of column x split by hue (Fig. 1b/1c style)."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(5, 3.2))
    sns.histplot(
        df,
        x=x,
        hue=hue,
        stat="percent",
        common_norm=False,
        discrete=discrete,
        element="step" if not discrete else "bars",
        multiple="dodge" if discrete else "layer",
        ax=ax,
    )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel or x)
    fig.tight_layout()
    return fig


def bars_figure(df: pd.DataFrame, x: str, y: str, hue: str | None, title: str, ylabel: str = "%"):
    """Return a grouped bar chart."""
    import seaborn as sns

    many = hue is not None and df[hue].nunique() > 4
    fig, ax = plt.subplots(figsize=(7.5 if many else 5.5, 3.2))
    sns.barplot(df, x=x, y=y, hue=hue, ax=ax)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if many:  # outside the axes, where it hides no bar
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title_fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def lines_figure(
    df: pd.DataFrame,
    x: str,
    ys: list[str],
    title: str,
    xlabel=None,
    ylabel="%",
    logx=False,
    hue: str | None = None,
    marker="o",
):
    """Return a line plot of one or more columns against x (or one column split by hue)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    if hue:
        for key, g in df.groupby(hue):
            ax.plot(g[x], g[ys[0]], marker=marker, label=str(key))
    else:
        for col in ys:
            ax.plot(df[x], df[col], marker=marker, label=col)
    if logx:
        ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def ours_vs_paper_figure(
    df: pd.DataFrame,
    x: str,
    y: str,
    paper_y: str,
    hue: str,
    title: str,
    paper_hue=None,
    xlabel=None,
    ylabel="%",
    paper_name="paper's",
):
    """Return a line plot of ours (solid, one colour per hue) against x and the paper's numbers (dashed, one line per
    paper_hue, in the colour of the hue of that name, labelled with paper_name)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    df = df.sort_values(x)
    colours = {key: f"C{i}" for i, key in enumerate(sorted(df[hue].unique()))}
    for key, g in df.groupby(hue, sort=True):
        ax.plot(g[x], g[y], marker="o", color=colours[key], label=f"{key} (ours)")
    theirs = df.dropna(subset=[paper_y])
    theirs = theirs.assign(_paper=theirs[paper_hue or hue])
    for i, (key, g) in enumerate(theirs.groupby("_paper", sort=True)):
        g = g.drop_duplicates(subset=[x])  # rows of ours that share one paper row (two modes of one defence)
        ax.plot(
            g[x],
            g[paper_y],
            marker="x",
            ls="--",
            color=colours.get(key, f"C{len(colours) + i}"),
            label=f"{key} ({paper_name})",
        )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def image_row_figure(images, titles, title: str, boxes=None):
    """Return a row of images with titles and optional red boxes (r0, c0, r1, c1)."""
    import matplotlib.patches as mpatches

    fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 2.7), squeeze=False)
    for k, (ax, img, t) in enumerate(zip(axes[0], images, titles)):
        ax.imshow(to_hwc(img), interpolation="nearest")
        if boxes is not None and boxes[k] is not None:
            r0, c0, r1, c1 = boxes[k]
            ax.add_patch(
                mpatches.Rectangle(
                    (c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, edgecolor="red", linewidth=1.2
                )
            )
        ax.set_title(t, fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def cost_accuracy_figure(
    df: pd.DataFrame,
    title: str,
    x: str = "forwards_per_image",
    y: str = "certified",
    hue: str = "defense",
    facet: str = "patch_pct",
    label: str = "family",
):
    """Return scatter panels (one per ``facet`` value) of y against x on a log axis, one marker per hue, each point
    annotated with its ``label``, so that equal-cost comparisons can be read off."""
    keys = sorted(df[facet].unique())
    hues = sorted(df[hue].unique())
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(
        1, len(keys), figsize=(max(5.5, 4.2 * len(keys)), 3.6), squeeze=False, sharey=True, sharex=True
    )
    for ax, key in zip(axes[0], keys):
        g = df[df[facet] == key]
        for i, h in enumerate(hues):
            gh = g[g[hue] == h]
            ax.scatter(gh[x], gh[y], marker="osD^v"[i % 5], color=f"C{i}", label=h, s=28)
            for _, r in gh.iterrows():
                ax.annotate(str(r[label]), (r[x], r[y]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{key:g}% patch" if isinstance(key, float) else str(key), fontsize=9)
        ax.set_xlabel("forward passes per image (log)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("certified accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
