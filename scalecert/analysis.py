"""SIN analysis (paper Sec. 3.1, App. A.1): localisation statistics, prediction stability, empirical recovery.

Conventions (stated once, used everywhere):

* The *top-n SINs* of an image are the n spatial positions of the superficial layer with the
  largest channel-summed activation (strict order), as (row, col) feature coordinates.
  n = 200 at 224x224 (the paper's choice, 1.6% of the 112x112 first-layer positions) and
  n = 20 at 32x32 (2% of 1,024 positions: the closest share that a 2.4% patch's footprint can hold).
* Clusters: scikit-learn's MeanShift on those coordinates with a fixed bandwidth of 10% of the
  feature-map side (11.2 at 112x112, 3.2 at 32x32), so benign and patched images are compared
  on the same scale.
* The distance deviation of a cluster is Eq. 5: sqrt(mean((x - x_c)^2 + (y - y_c)^2)).
* The *most localised SINs* of an image are the top-n SINs of its densest cluster (most members;
  ties: smaller distance deviation). *Removing* them excludes the bounding box of that cluster
  (in feature coordinates) from the SIN ranking: the box is zeroed and the top-k re-filled from
  the rest, exactly like an occluded window in the sound engine.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, cpu_count, delayed
from sklearn.cluster import MeanShift

from .geometry import footprint, rect_masks
from .sin import importance, strict_order

TOP_N = {32: 20, 224: 200}


def top_n(n_image: int) -> int:
    """Return the number of top SINs analysed for an image side (20 at 32, 200 at 224)."""
    return TOP_N.get(n_image, max(1, round(0.016 * (n_image / 2) ** 2)))


@torch.no_grad()
def top_sin_points(model, images: torch.Tensor, n: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Return the top-n SIN coordinates (B, n, 2) as (row, col) feature positions, and the map size (h, w)."""
    f = model.stem(images.to(next(model.parameters()).device))
    h, w = f.shape[-2:]
    order = strict_order(importance(f))[:, :n].cpu()
    pts = torch.stack([order // w, order % w], -1)
    return pts.numpy(), (h, w)


def cluster_points(points: np.ndarray, bandwidth: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels, centres) of MeanShift clusters of 2-D points."""
    ms = MeanShift(bandwidth=bandwidth).fit(points.astype(float))
    return ms.labels_, ms.cluster_centers_


def distance_deviation(points: np.ndarray) -> float:
    """Return Eq. 5, the standard distance of points (N, 2) around their mean (Eq. 4)."""
    p = np.asarray(points, dtype=float)
    c = p.mean(0)
    return float(np.sqrt(((p - c) ** 2).sum(1).mean()))


def sin_statistics(
    model,
    images: torch.Tensor,
    n: int | None = None,
    bandwidth: float | None = None,
    kind: str = "benign",
    patch_boxes=None,
    n_jobs: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (per-image table: clusters, densest cluster and its box; per-cluster table: size, s_c).

    With ``patch_boxes`` (pixel boxes (r0, c0, r1, c1) per image) the per-image table also holds
    ``in_patch_share``: the share of the top-n SINs inside the patch's footprint. MeanShift runs on
    ``n_jobs`` processes (default: every core the process may use, once there are 32 images or more; same result).
    """
    n = n or top_n(images.shape[-1])
    pts, (h, w) = top_sin_points(model, images, n)
    bw = bandwidth or 0.1 * h
    fps = (
        footprint(model.geometry(), torch.as_tensor(np.asarray(patch_boxes)), h, w).numpy()
        if patch_boxes is not None
        else None
    )
    if n_jobs is None:  # worker start-up (imports) costs about a second: only worth it for many images
        n_jobs = min(cpu_count(), len(pts)) if len(pts) >= 32 else 1
    fits = Parallel(n_jobs=n_jobs)(delayed(cluster_points)(p, bw) for p in pts)
    rows, crow = [], []
    for i, (p, (labels, _)) in enumerate(zip(pts, fits)):
        sizes = np.bincount(labels)
        devs = np.array([distance_deviation(p[labels == c]) for c in range(len(sizes))])
        best = sorted(range(len(sizes)), key=lambda c: (-sizes[c], devs[c]))[0]
        members = p[labels == best]
        (r0, c0), (r1, c1) = members.min(0), members.max(0)
        rows.append(
            {
                "image": i,
                "kind": kind,
                "n_clusters": len(sizes),
                "densest_size": int(sizes[best]),
                "densest_sc": devs[best],
                "overall_sc": distance_deviation(p),
                "box": (int(r0), int(c0), int(r1), int(c1)),
            }
        )
        if fps is not None:
            i0, j0, i1, j1 = fps[i]
            inside = (p[:, 0] >= i0) & (p[:, 0] <= i1) & (p[:, 1] >= j0) & (p[:, 1] <= j1)
            rows[-1]["in_patch_share"] = float(inside.mean())
        crow += [
            {"image": i, "kind": kind, "cluster": c, "size": int(sizes[c]), "s_c": devs[c]} for c in range(len(sizes))
        ]
    return pd.DataFrame(rows), pd.DataFrame(crow)


# Fig. 1c's three statistics: the images they count and the test on an image's cluster count
FIG1C = {
    "patched images with exactly one cluster (%)": ("patched", lambda k: k == 1),
    "patched images with fewer than two clusters (%)": ("patched", lambda k: k < 2),
    "benign images with more than three clusters (%)": ("benign", lambda k: k > 3),
}


def significant_cluster_counts(clusters: pd.DataFrame, min_share: float = 0.0) -> pd.Series:
    """Return per (kind, image) the number of clusters holding at least ``min_share`` % of that image's top-n SINs.

    ``clusters`` is ``sin_statistics``' per-cluster table (every image has at least one row); an image whose
    clusters are all smaller than the share counts 0. With ``min_share`` 0 this is ``n_clusters``."""
    n = clusters.groupby(["kind", "image"])["size"].transform("sum")
    keep = clusters["size"] >= min_share / 100 * n
    return keep.groupby([clusters["kind"], clusters["image"]]).sum().astype(int).rename("n_clusters")


def fig1c_statistics(counts: pd.Series) -> dict:
    """Return Fig. 1c's three shares (%) of images from cluster counts per (kind, image)."""
    return {stat: round(100 * float(test(counts.xs(kind)).mean()), 1) for stat, (kind, test) in FIG1C.items()}


def cluster_count_sensitivity(clusters: pd.DataFrame, shares=(0, 2.5, 5, 10, 20)) -> pd.DataFrame:
    """Return Fig. 1c's statistics (long form: min_share_pct, statistic, ours) when only the clusters holding at
    least each share of an image's top-n SINs count. The paper does not say how small a cluster it counted."""
    return pd.DataFrame(
        [
            {"min_share_pct": s, "statistic": stat, "ours": v}
            for s in shares
            for stat, v in fig1c_statistics(significant_cluster_counts(clusters, s)).items()
        ]
    )


@torch.no_grad()
def predict_without(model, images: torch.Tensor, boxes) -> torch.Tensor:
    """Return predictions with each image's feature box (r0, c0, r1, c1) removed from the SIN ranking."""
    dev = next(model.parameters()).device
    x = images.to(dev)
    f = model.stem(x)
    h, w = f.shape[-2:]
    excl = rect_masks(torch.as_tensor(np.asarray(list(boxes)), dtype=torch.long).to(dev), h, w)
    if model.sin is not None:
        f = model.sin(f, excl)
    else:
        f = f * (~excl).unsqueeze(1).to(f.dtype)
    return model.rest(f).argmax(1).cpu()


@torch.no_grad()
def prediction_stability(
    model, benign: torch.Tensor, patched: torch.Tensor, labels: torch.Tensor, n: int | None = None
) -> pd.DataFrame:
    """Return accuracy (%) of benign and patched images before and after removing their most localised SINs."""
    per = {"label": labels.numpy()}
    for kind, x in (("benign", benign), ("patched", patched)):
        stats, _ = sin_statistics(model, x, n, kind=kind)
        per[f"{kind}_before"] = model(x.to(next(model.parameters()).device)).argmax(1).cpu().numpy()
        per[f"{kind}_after"] = predict_without(model, x, stats["box"]).numpy()
    return stability_table(pd.DataFrame(per))


def stability_table(per: pd.DataFrame) -> pd.DataFrame:
    """Return the stability table (Fig. 1d) from per-image predictions: label, {benign,patched}_{before,after}."""
    return pd.DataFrame(
        [
            {
                "images": kind,
                "before": round(100 * (per[f"{kind}_before"] == per.label).mean(), 1),
                "after_removing_localised_sins": round(100 * (per[f"{kind}_after"] == per.label).mean(), 1),
                "n": len(per),
            }
            for kind in ("benign", "patched")
        ]
    )


def sin_share_detector(model, images: torch.Tensor, p: int, n: int | None = None, threshold: float = 0.9):
    """Return (detected, box) per image: the patch-sized feature window holding the largest share of the top-n SINs.

    The window side is the number of feature positions whose receptive-field centre lies in a
    p x p patch (ceil(p / stride)); an image is flagged when the share exceeds ``threshold``
    (the paper's appendix: 90%). Returned boxes are in pixel coordinates.
    """
    n = n or top_n(images.shape[-1])
    pts, (h, w) = top_sin_points(model, images, n)
    geo = model.geometry()
    side = max(1, -(-p // geo.stride))
    detected, boxes = [], []
    for pt in pts:
        grid = torch.zeros(1, 1, h, w)
        grid[0, 0, pt[:, 0], pt[:, 1]] = 1
        share = torch.nn.functional.avg_pool2d(grid, side, 1)[0, 0] * side * side / n
        best = int(share.argmax())
        i, j = divmod(best, share.shape[1])
        detected.append(bool(share.max() > threshold))
        r0, c0 = i * geo.stride - geo.pad + (geo.rf - 1) // 2, j * geo.stride - geo.pad + (geo.rf - 1) // 2
        boxes.append((r0, c0, r0 + side * geo.stride - 1, c0 + side * geo.stride - 1))
    return np.array(detected), boxes


@torch.no_grad()
def share_detection(model, images: torch.Tensor, p: int, patch_boxes=None) -> pd.DataFrame:
    """Return per image: the model's prediction, ``detected`` (``sin_share_detector``) and ``localised`` (detected
    on the patch box)."""
    pred = model(images.to(next(model.parameters()).device)).argmax(1).cpu().numpy()
    det, boxes = sin_share_detector(model, images, p)
    hit = [
        bool(d) and patch_boxes is not None and boxes_overlap(b, pb)
        for d, b, pb in zip(det, boxes, patch_boxes if patch_boxes is not None else [None] * len(det))
    ]
    return pd.DataFrame({"pred": pred, "detected": det.astype(bool), "localised": hit})


def adaptive_summary(benign: pd.DataFrame, patched: pd.DataFrame, target: int) -> dict:
    """Return Fig. 1e's numbers (%): attack success on images not of the target class, detection rate, benign false
    alarms."""
    keep = patched.label != target
    return {
        "attack_success": round(100 * (patched.pred[keep] == target).mean(), 1),
        "detection_rate": round(100 * patched.localised.mean(), 1),
        "benign_false_alarms": round(100 * benign.detected.mean(), 1),
    }


def boxes_overlap(a, b) -> bool:
    """Return True iff two inclusive boxes (r0, c0, r1, c1) intersect."""
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


@torch.no_grad()
def empirical_recovery(
    engine, images: torch.Tensor, labels: torch.Tensor, patched: torch.Tensor, corners: torch.Tensor
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (summary, per-image table) of clean -> patched -> recovered accuracy (Sec. 4.4).

    Recovery: ``detect`` runs on the patched image; on an alert, the suspected window it reports
    is occluded (the engine's occluded prediction for that box) and that label is the answer; without
    an alert the detector's output stands.
    """
    model = engine.model
    dev = engine.device
    clean = model(images.to(dev)).argmax(1).cpu()
    attacked = model(patched.to(dev)).argmax(1).cpu()
    recs = engine.run(patched, early_stop=False)
    rec_pred = []
    for i, r in enumerate(recs):
        if not r["alert"] or r["suspected_box"] is None:
            rec_pred.append(r["pred"])
            continue
        box = torch.tensor([r["suspected_box"]])
        x = patched[i : i + 1].to(dev)
        feats, order, _ = engine.stem(x)
        fp = footprint(engine.geo, box, engine.h, engine.w).to(dev)
        rec_pred.append(
            int(
                engine.occluded_labels(x, feats, order, torch.zeros(1, dtype=torch.long, device=dev), box.to(dev), fp)[
                    0
                ]
            )
        )
    rec_pred = torch.tensor(rec_pred)
    p = engine.p
    per = pd.DataFrame(
        {
            "label": labels.numpy(),
            "clean": clean.numpy(),
            "patched": attacked.numpy(),
            "recovered": rec_pred.numpy(),
            "alert": [bool(r["alert"]) for r in recs],
            "patch_box": [tuple(c) + (c[0] + p - 1, c[1] + p - 1) for c in corners.tolist()],
            "suspected_box": [r["suspected_box"] for r in recs],
        }
    )
    per["localised"] = [s is not None and boxes_overlap(s, b) for s, b in zip(per.suspected_box, per.patch_box)]
    return recovery_summary(per), per


def recovery_summary(per: pd.DataFrame) -> pd.DataFrame:
    """Return the one-row summary (images, clean/patched/recovered accuracy, alert rate, patch localised; %) of a
    per-image table."""
    return pd.DataFrame(
        [
            {
                "images": len(per),
                "clean_acc": 100 * (per.clean == per.label).mean(),
                "patched_acc": 100 * (per.patched == per.label).mean(),
                "recovered_acc": 100 * (per.recovered == per.label).mean(),
                "alert_rate": 100 * per.alert.mean(),
                "patch_localised": 100 * per.localised.mean(),
            }
        ]
    )
