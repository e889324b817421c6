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
    return {**labels, "defense": df.defense.iloc[0], "kind": df.kind.iloc[0], "images": len(df),
            "clean": round(100 * df.clean_correct.mean(), 1), "certified": round(100 * df.certified.mean(), 1),
            "forwards_per_image": round(float(df.forwards.mean()), 1),
            "images_per_second": round(1.0 / max(1e-12, float(df.seconds.mean())), 2)}
