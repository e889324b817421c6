"""Notebook 05's tables: every defence of the paper's Tables 2 and 5 in one harness (ScaleCert in both modes and MR
on the same window family, each peer on its own checkpoint, PatchCleanser on the vanilla model and on the
occlusion-trained twin), one row per defence and patch size, with the paper's numbers beside ours."""

from __future__ import annotations

import pandas as pd

from . import data as D
from . import experiments as E
from . import results as R
from .baselines import harness as H
from .baselines.patchcleanser import evaluations
from .paper import PAPER_DATASET, paper_table

#: the note of a row whose run the cache does not hold complete when 05 reads the cache only (the paper profile)
NOT_COMPUTED = (
    "not computed yet (COMPUTE=1 tools/paper_profile.sh; PatchCleanser: python -m scalecert ablation --defences "
    "pc_occl,pc_vanilla)"
)
#: the columns of 05's tables, in order (those a table has)
COLUMNS = [
    "dataset",
    "patch_pct",
    "defense",
    "guarantee",
    "images",
    "clean",
    "certified",
    "paper_clean",
    "paper_certified",
    "candidates",
    "windows",
    "forwards_per_image",
    "inference_forwards",
    "certify_forwards",
    "seconds_per_image",
    "note",
    "images_per_s",
]


def table_sizes(dataset: str, per_class, large, peer_per_class) -> list[tuple]:
    """Return (paper table, patch %, images per class of ScaleCert and MR, of the peers) of every patch size of a
    data set: Table 2's sizes at ``per_class``, Table 5's large ones at ``large``; the peers keep one size across
    patches, so that DS's votes (shared work, cached per image set) are computed once per data set."""
    dataset = D.check_dataset(dataset)
    return [(2, pct, per_class, peer_per_class) for pct in E.PATCHES[dataset]] + [
        (5, pct, large, peer_per_class) for pct in E.LARGE_PATCHES[dataset]
    ]


def rows(
    dataset: str,
    sizes: list[tuple],
    *,
    pc_patches=(),
    pc_per_class=None,
    pc_models=None,
    seed: int = 0,
    force: bool = False,
    device: str = "cpu",
    compute_missing: bool = True,
) -> list[dict]:
    """Return 05's rows of a data set (cached runs, computed where missing): ScaleCert (sound and paper mode) and MR
    at every size of ``table_sizes``, every peer of Table 2 that has a checkpoint for the data set, and PatchCleanser
    on its models (``pc_models``, (label, checkpoint) pairs; default both of ``experiments.patchcleanser_runs``) at the
    sizes in ``pc_patches`` (``pc_per_class`` images per class); a model not shipped gives a row with a ``note``.
    Costs, in network evaluations per image: ``forwards_per_image`` what the certification run spent (early exit
    included; what ``seconds_per_image`` times), ``inference_forwards`` what the defence spends on an input (ScaleCert
    and MR: 1 + candidate windows, all of which ``detect`` evaluates; PatchCleanser: double masking's), and
    ``certify_forwards`` what a certified image's certificate needs (PatchCleanser: its 666-prediction pair table; the
    others: their inference). ``compute_missing=False`` reads the cache only: a run not complete there gives a
    row with the note ``NOT_COMPUTED`` and nothing is computed."""
    dataset = D.check_dataset(dataset)
    label_of = D.DATASET_LABELS[dataset]
    sin_ckpt, van, tau = (
        E.model_name(dataset, 1, E.DEFAULT_RATE[dataset]),
        E.model_name(dataset),
        E.DEFAULT_TAU[dataset],
    )
    common = dict(seed=seed, force=force, device=device, progress=False, compute_missing=compute_missing)
    out = []

    def cached(row, fetch):
        """Return fetch()'s records, or None after adding ``row`` with the not-computed note to ``out``."""
        try:
            return fetch()
        except R.NotComputed:
            out.append({**row, "note": NOT_COMPUTED})
            return None

    for table_no, pct, pc, _ in sizes:
        configs = [
            ("ScaleCert", sin_ckpt, dict(mode="sound", rule="strict", tau=tau)),
            ("ScaleCert (paper mode)", sin_ckpt, dict(mode="paper", rule="paper", tau=tau)),
            ("MR", van, dict(mode="sound", rule="strict", tau=tau, sin=False)),
        ]
        for label, ckpt, kw in configs:
            row = {"table": table_no, "dataset": label_of, "patch_pct": pct, "defense": label, "guarantee": "detection"}
            if not E.available(ckpt):
                out.append({**row, "note": f"{ckpt} not trained yet"})
                continue
            df = cached(row, lambda: E.certify_cached(dataset, ckpt, pct, per_class=pc, **common, **kw))
            if df is None:
                continue
            s = E.summarise(df, **row)
            full = E.inference_forwards(df)  # detect and a certified image: every candidate
            out.append({**s, "inference_forwards": full, "certify_forwards": full})
    for table_no, pct, _, pc in sizes:  # the peers of Table 2 on their own checkpoints (IBP: CIFAR only, as the paper)
        for peer in H.PEER_NAMES:
            ck = H.peer(peer).checkpoint(dataset)
            if ck is None:
                continue
            row = {
                "table": table_no,
                "dataset": label_of,
                "patch_pct": pct,
                "defense": peer,
                "guarantee": H.peer(peer).kind,
            }
            if not H.peer_available(peer, dataset):
                out.append({**row, "note": f"{ck} not trained yet"})
                continue
            df = cached(row, lambda: H.peer_cached(peer, dataset, pct, per_class=pc, **common))
            if df is None:
                continue
            s = H.summarise_peer(df, **row)
            out.append(
                {**s, "inference_forwards": s["forwards_per_image"], "certify_forwards": s["forwards_per_image"]}
            )
    for table_no, pct, _, _ in sizes:  # PatchCleanser (recovery; not in the paper's tables) on both models
        if pct not in pc_patches:
            continue
        for label, ck in E.patchcleanser_runs(dataset) if pc_models is None else pc_models:
            row = {"table": table_no, "dataset": label_of, "patch_pct": pct, "defense": label}
            row["guarantee"] = H.peer("PatchCleanser").kind
            if not E.available(ck):
                out.append({**row, "note": f"{ck} not trained yet"})
                continue
            df = cached(
                row,
                lambda: H.peer_cached("PatchCleanser", dataset, pct, per_class=pc_per_class, checkpoint=ck, **common),
            )
            if df is None:
                continue
            out.append(patchcleanser_row(df, **row))
    return out


def patchcleanser_row(df: pd.DataFrame, **labels) -> dict:
    """Return 05's row of a PatchCleanser run: ``forwards_per_image`` the evaluations its early-exit run spent (first
    round, second rounds, and the pairs evaluated beyond the one-mask images), ``inference_forwards`` double masking's
    and ``certify_forwards`` the pair table's (666 for 36 masks)."""
    s = H.summarise_peer(df, **labels)
    spent = evaluations(df)
    return {
        **s,
        "forwards_per_image": round(float(spent.mean()), 1),
        "inference_forwards": s["forwards_per_image"],
        "certify_forwards": round(float(df.certify_forwards.mean()), 1),
    }


def tables(ours: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """Return 05's tables by paper table number (2 and 5): our rows with the paper's clean and certified accuracy
    beside them (ScaleCert's paper mode beside the paper's ScaleCert), images per second, in ``COLUMNS`` order, columns
    empty in a table left out."""
    paper = paper_table("table2_certified").rename(columns={"clean": "paper_clean", "certified": "paper_certified"})
    ours = ours.assign(
        paper_defense=ours.defense.replace({"ScaleCert (paper mode)": "ScaleCert"}),
        paper_dataset=ours.dataset.map({v: PAPER_DATASET[k] for k, v in D.DATASET_LABELS.items()}),
    )
    table = ours.merge(
        paper,
        left_on=["paper_dataset", "patch_pct", "paper_defense"],
        right_on=["dataset", "patch_pct", "defense"],
        how="left",
        suffixes=("", "_p"),
    )
    if "seconds_per_image" in table:
        table["images_per_s"] = (1 / table.seconds_per_image).round(2)
    if "images" in table:
        table["images"] = table["images"].astype("Int64")  # whole numbers beside the rows with a note
    return {
        no: g[[c for c in COLUMNS if c in g]].dropna(axis=1, how="all").reset_index(drop=True)
        for no, g in table.groupby("table")
    }
