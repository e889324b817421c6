"""The paper's numbers: its tables (``data/paper/*.csv``) and the figures it reports outside them."""

from __future__ import annotations

import pandas as pd

from .paths import PAPER_DIR

PAPER_DATASET = {"cifar10": "cifar10", "imagenette": "imagenet", "imagenet": "imagenet"}
PAPER_LABEL = {
    "cifar10": "paper (lossless CIFAR-10, ResNet-18)",
    "imagenette": "paper (ImageNet, ResNet-50)",
    "imagenet": "paper (ImageNet, ResNet-50)",
}


def paper_figure(item: str) -> float:
    """Return one number the paper reports outside its tables (data/paper/other_reported_figures.csv)."""
    df = pd.read_csv(PAPER_DIR / "other_reported_figures.csv").set_index("item")
    if item not in df.index:
        raise KeyError(f"{item!r} is not in data/paper/other_reported_figures.csv")
    return float(df.loc[item, "value"])


def fig1c_paper() -> dict:
    """Return the paper's Fig. 1c shares (%), keyed by the statistic names of ``analysis.FIG1C``."""
    from .analysis import FIG1C

    items = ("fig1c_patched_one_cluster_pct", "fig1c_patched_lt2_clusters_pct", "fig1c_benign_gt3_clusters_pct")
    return {stat: paper_figure(item) for stat, item in zip(FIG1C, items)}


def paper_table(name: str, dataset: str | None = None) -> pd.DataFrame:
    """Return one of the paper's tables (data/paper/NAME.csv), optionally the rows of a data set's paper counterpart."""
    df = pd.read_csv(PAPER_DIR / f"{name}.csv")
    if dataset is not None and "dataset" in df.columns:
        df = df[df.dataset == PAPER_DATASET[dataset]]
    return df.reset_index(drop=True)
