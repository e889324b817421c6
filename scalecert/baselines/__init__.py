"""Peer defences of the paper's Tables 2 and 5, in the same harness as ScaleCert.

Every peer returns the same per-image records (one dict per image, a pandas row each):

* ``id``, ``label``: image id and true label;
* ``pred``: the defended output label (``-1`` for an alert / abstention);
* ``alert``: True when a detection defence alerts (always False for recovery defences);
* ``clean_correct``: the defended output equals the label with no alert;
* ``certified``: the certificate holds for the true label against every patch of the size;
* ``forwards``: network evaluations (or equivalent passes) spent on the image;
* ``seconds``: wall time per image.

``kind`` is "recovery" (the certificate guarantees the right label) or "detection" (the right
label or an alert), as in the paper's tables; ``records_frame`` also writes it as ``guarantee``.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

RECORD_COLUMNS = ("id", "label", "pred", "alert", "clean_correct", "certified", "forwards", "seconds")
KINDS = ("recovery", "detection")


def batch_ids(batch_size, ids, b: int) -> list:
    """Return the ids of b images (default 0..b-1) after checking them and that batch_size is a positive int."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    ids = list(range(b)) if ids is None else list(ids)
    if len(ids) != b:
        raise ValueError(f"ids must have {b} entries, got {len(ids)}")
    return ids


def balanced_ids(ds, n_images: int, seed: int) -> np.ndarray:
    """Return a class-balanced seeded subset of about n_images indices of an ImageSet (all of them when n_images <= 0
    or >= its length)."""
    if n_images <= 0 or n_images >= len(ds):
        return np.arange(len(ds))
    return ds.subset(max(1, n_images // len(ds.classes)), seed)


def patch_arg(text: str):
    """argparse type of a patch size: "5px" -> 5 pixels (int), "2.4" -> 2.4 % (float)."""
    return int(text[:-2]) if text.endswith("px") else float(text)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Add the options every peer's ``train`` command shares (seed, threads, resumable state, device, folders)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--save-every",
        type=float,
        default=600.0,
        help="save a mid-epoch state every N seconds (an interrupted epoch resumes at its step)",
    )
    p.add_argument(
        "--max-train", type=int, default=0, help="use only N training images per epoch (a provisional checkpoint)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=None, help="checkpoint folder (default data/checkpoints)")
    p.add_argument("--runs-dir", default=None, help="per-epoch state and log go to RUNS_DIR/NAME (default data/runs)")


def records_frame(records: list[dict], defense: str, kind: str) -> pd.DataFrame:
    """Return the records as a DataFrame with the common columns first and ``defense``/``kind``/``guarantee`` set."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")
    df = pd.DataFrame.from_records(records)
    missing = [c for c in RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"records of {defense} lack columns {missing}")
    df["defense"], df["kind"], df["guarantee"] = defense, kind, kind
    named = (*RECORD_COLUMNS, "defense", "kind", "guarantee")
    return df[[*named, *[c for c in df.columns if c not in named]]]


def summarise_records(df: pd.DataFrame, **labels) -> dict:
    """Return one table row: clean and certified accuracy (%), forwards and seconds per image."""
    return {
        **labels,
        "defense": df.defense.iloc[0],
        "kind": df.kind.iloc[0],
        "images": len(df),
        "clean": round(100 * df.clean_correct.mean(), 1),
        "certified": round(100 * df.certified.mean(), 1),
        "forwards_per_image": round(float(df.forwards.mean()), 1),
        "images_per_second": round(1.0 / max(1e-12, float(df.seconds.mean())), 2),
    }
