"""Does SIN help? The equal-budget ablation of notebook 12.

ScaleCert runs on its SIN model; Minority Reports (MR) runs on the *ablation twin* of that model (the same
fine-tuning from the same vanilla checkpoint, without the SIN layer, each training window's pixels filled as MR's
certification fills them) and, for reference, on the undefended vanilla model. Every defence runs on every window
family ScaleCert uses: 05's r = 3 family, 11's r = 1 family, 07's tau-merged families (at 2.4% / 2%) and
PatchCleanser's k x k mask set. The settings of each family are those of the notebook that runs it first, so that
their cached runs are shared.

Cost is counted as forward passes per image = 1 + the image's candidate windows: what ``detect`` spends on any
input and ``certify`` on an image it certifies (an early exit on a failing image does not count as a saving).

PatchCleanser (issue #36; :mod:`scalecert.baselines.patchcleanser`, a recovery defence, the paper does not report it)
adds one point per data set and patch size on its own k = 6 mask set (family "k=6 masks", the family the SIN prunes
above), on the undefended vanilla model and on the occlusion-trained twin (rows ``PC_VANILLA`` and ``PC_OCCL``: the
peer harness's runs, on at most ``PC_MAX_PER_CLASS`` images per class on a subset, 05's quick sizes, so that they are
05's cached runs). Its ``forwards_per_image`` is the cost of its *inference*, as for the others what it spends on an
input: the mean network evaluations double masking spends on the image (k^2 = 36 when the first round agrees, 35 more
per second round run). ``certify_forwards`` (k^2 (k^2 + 1) / 2 = 666, the pair table its certificate needs, and what
the run's seconds pay for) is a column of its own, empty for the other defences, whose certification costs what their
detection does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import data as D
from . import experiments as E
from . import results as R
from .baselines import harness as H
from .baselines.patchcleanser import PAPER_K
from .stats import holm, mcnemar_exact, paired_bootstrap
from .windows import candidate_windows, mask_set

SC, SC_PAPER, MR_VANILLA, MR_OCCL = (
    "ScaleCert",
    "ScaleCert (paper mode)",
    "MR (undefended model)",
    "MR (occlusion-trained)",
)
PC_VANILLA, PC_OCCL = E.PC_VANILLA, E.PC_OCCL
DEFENSES = (SC, SC_PAPER, MR_VANILLA, MR_OCCL)
#: 07's overlap ratios; their families are evaluated at 07's patch size only
TAUS = (0.3, 0.5, 0.6)
TAU_PATCH = {"cifar10": 2.4, "imagenette": 2.0}
#: PatchCleanser's masks per axis (k x k masks), as on the field's leaderboard
MASKS = 6
#: the note of a row whose run ``run_all`` was asked not to compute and the cache does not hold complete
NOT_COMPUTED = "not computed yet (python -m scalecert ablation computes 12's whole-split runs)"
#: PatchCleanser's images per class on a subset at most (666 forwards per image): 05's quick sizes, whose cached runs
#: 12 then reads
PC_MAX_PER_CLASS = {"cifar10": 1, "imagenette": 1}
TABLE_COLUMNS = [
    "dataset",
    "patch_pct",
    "family",
    "defense",
    "guarantee",
    "model",
    "images",
    "clean",
    "certified",
    "forwards_per_image",
    "seconds_per_image",
]
VERDICT_COLUMNS = [
    "dataset",
    "patch_pct",
    "family",
    "images",
    "scalecert_certified",
    "mr_occl_certified",
    "difference",
    "ci_low",
    "ci_high",
    "p_value",
]

#: columns of :func:`equal_forwards`
FRONTIER_COLUMNS = [
    "dataset",
    "patch_pct",
    "family",
    "forwards_per_image",
    "scalecert_certified",
    "mr_occl_family",
    "mr_occl_forwards",
    "mr_occl_certified",
    "mr_occl_complete",
]
#: family-wise level of the sentence's paired tests (Holm's correction over a data set's pairs)
ALPHA = 0.05


def profile_settings(profile: str, dataset: str) -> dict:
    """Return the patch sizes, r values and tau values 12 sweeps on a data set for a profile: tiny (nbval) takes one
    patch size, r = 3, the mask set and one tau family, enough to run every code path; quick and paper take all."""
    dataset = D.check_dataset(dataset)
    if profile == "tiny":
        return {"patches": [TAU_PATCH[dataset]], "rs": (3,), "taus": (0.5,)}
    return {"patches": list(E.PATCHES[dataset]), "rs": (3, 1), "taus": TAUS}


def families(dataset: str, patch_pct: float, rs=(3, 1), masks: int = MASKS, taus=TAUS) -> list[dict]:
    """Return the window families at a patch size: ``family`` label, certify options ``kw`` and whether paper mode
    runs on it (the r = 3 and tau families, where 05 and 07 run it)."""
    dataset = D.check_dataset(dataset)
    tau0 = E.DEFAULT_TAU[dataset]

    def label(r, t):
        return f"r={r}" + ("" if t is None else f" tau={t:g}")

    out = [{"family": label(r, tau0), "kw": dict(r=r, tau=tau0), "paper_mode": r == 3} for r in rs]
    out.append({"family": f"k={masks} masks", "kw": dict(masks=masks), "paper_mode": False})
    if float(patch_pct) == TAU_PATCH[dataset]:
        # 07 times its families without early exit; the records (and so every outcome) are the same either way
        out += [
            {"family": label(3, t), "kw": dict(r=3, tau=t, early_stop=False), "paper_mode": True}
            for t in taus
            if t != tau0
        ]
    return _merge_same_windows(dataset, patch_pct, out)


def _windows(dataset: str, patch_pct: float, kw: dict) -> torch.Tensor:
    """Return the boxes of a family's windows (the family ``kw`` of :func:`families` names)."""
    n = D.image_size(dataset)
    fam = mask_set(n, patch_pct, kw["masks"]) if "masks" in kw else candidate_windows(n, patch_pct, kw["r"], kw["tau"])
    return fam.boxes


def _merge_same_windows(dataset: str, patch_pct: float, fams: list[dict]) -> list[dict]:
    """Return ``fams`` with each family whose windows equal an earlier one's left out and named in the earlier one's
    label (e.g. on 32 x 32 images tau = 0.5 and 0.6 merge a 2.4% patch's windows alike): one pair, not two."""
    out, boxes = [], []
    for f in fams:
        b = _windows(dataset, patch_pct, f["kw"])
        same = next((i for i, o in enumerate(boxes) if o.shape == b.shape and torch.equal(o, b)), None)
        if same is None:
            out.append(dict(f))
            boxes.append(b)
        else:
            out[same]["family"] += f" (= {f['family']})"
    return out


def defence_runs(dataset: str, family: dict) -> list[tuple[str, str, dict]]:
    """Return (defence, checkpoint, certify options) of every defence on a family."""
    sin = E.model_name(dataset, 1, E.DEFAULT_RATE[dataset])
    kw = family["kw"]
    runs = [(SC, sin, dict(mode="sound", rule="strict", **kw))]
    if family["paper_mode"]:
        runs.append((SC_PAPER, sin, dict(mode="paper", rule="paper", **kw)))
    runs += [
        (MR_VANILLA, E.model_name(dataset), dict(mode="sound", rule="strict", sin=False, **kw)),
        (MR_OCCL, E.occlusion_model_name(dataset), dict(mode="sound", rule="strict", **kw)),
    ]
    return runs


def _records_or_note(ckpt: str, labels: dict, rows: list, fetch):
    """Return ``fetch()``'s records, or None after adding a row with a ``note`` to ``rows``: the model is not shipped,
    or (``compute_missing=False``) its run is not complete in the cache."""
    if not E.available(ckpt):
        rows.append({**labels, "note": f"{ckpt} not trained yet"})
        return None
    try:
        return fetch()
    except R.NotComputed:
        rows.append({**labels, "note": NOT_COMPUTED})
        return None


def guarantee(defense: str) -> str:
    """Return what a defence's certificate promises: ``recovery`` (PatchCleanser: the right label under any patch) or
    ``detection`` (ScaleCert, MR: the right label or an alert)."""
    return H.peer("PatchCleanser").kind if defense in (PC_VANILLA, PC_OCCL) else "detection"


def row(df: pd.DataFrame, **labels) -> dict:
    """Return one row of 12's table from a run's records (forwards per image = 1 + candidate windows)."""
    return {
        **labels,
        "images": len(df),
        "clean": round(100 * df.clean_correct.mean(), 1),
        "certified": round(100 * df.certified.mean(), 1),
        "forwards_per_image": E.inference_forwards(df),
        "seconds_per_image": round(df.attrs.get("seconds_per_image", float("nan")), 4),
    }


def patchcleanser_row(df: pd.DataFrame, **labels) -> dict:
    """Return one row of 12's table from a PatchCleanser run's records: forwards per image = its inference's mean
    ``forwards``, and its ``certify_forwards`` beside them (see the module docstring)."""
    return {
        **labels,
        "images": len(df),
        "clean": round(100 * df.clean_correct.mean(), 1),
        "certified": round(100 * df.certified.mean(), 1),
        "forwards_per_image": round(float(df.forwards.mean()), 1),
        "seconds_per_image": round(df.attrs.get("seconds_per_image", float("nan")), 4),
        "certify_forwards": round(float(df.certify_forwards.mean()), 1),
    }


def patchcleanser_runs(
    dataset: str,
    pct: float,
    *,
    per_class: int | None,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
    compute_missing: bool = True,
    models=None,
) -> tuple[list[dict], dict]:
    """Return (rows, records keyed like ``run_all``'s) of PatchCleanser at one patch size on the vanilla model and on
    the occlusion-trained twin (``experiments.patchcleanser_runs``; a ``note`` row for a model not trained yet, and
    with ``compute_missing=False`` for a run not complete in the cache); ``models``: other (label, checkpoint) pairs."""
    dataset = D.check_dataset(dataset)
    family = f"k={PAPER_K} masks"
    rows, recs = [], {}
    for defense, ckpt in E.patchcleanser_runs(dataset) if models is None else models:
        labels = {
            "dataset": D.DATASET_LABELS[dataset],
            "patch_pct": float(pct),
            "family": family,
            "defense": defense,
            "model": ckpt,
        }
        df = _records_or_note(
            ckpt,
            labels,
            rows,
            lambda: H.peer_cached(
                "PatchCleanser",
                dataset,
                pct,
                per_class=per_class,
                seed=seed,
                force=force,
                device=device,
                progress=False,
                checkpoint=ckpt,
                compute_missing=compute_missing,
            ),
        )
        if df is None:
            continue
        recs[float(pct), family, defense] = df
        rows.append(patchcleanser_row(df, **labels))
    return rows, recs


def run_all(
    dataset: str,
    patches,
    *,
    per_class: int | None,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
    rs=(3, 1),
    masks: int = MASKS,
    taus=TAUS,
    patchcleanser: bool = True,
    pc_per_class: int | None | str = "auto",
    compute_missing: bool = True,
    pc_models=None,
) -> tuple[pd.DataFrame, dict]:
    """Return (table, records) of every defence on every family and patch size of a data set: the table has
    ``TABLE_COLUMNS`` (a ``note`` for a model not trained yet; ``certify_forwards`` for PatchCleanser's rows), records
    map (patch, family, defence) to the run's per-image records (cached certification runs, computed where missing).

    With ``patchcleanser``, each patch size also gets PatchCleanser's two rows (:func:`patchcleanser_runs`) after the
    other defences' rows, on ``pc_per_class`` images per class (None: the whole split); "auto": ``per_class`` capped at
    ``PC_MAX_PER_CLASS`` at 07's patch size only (666 forwards per image; 05's quick sizes, so the runs are 05's cached
    ones), the whole split at every patch size when ``per_class`` is None; ``pc_models``: its (label, checkpoint) pairs
    (default both). ``compute_missing=False``: read the cache
    only; a run not complete there gives a row with the note ``NOT_COMPUTED`` (the paper profile's 12 renders what
    ``python -m scalecert ablation`` and 05 have computed)."""
    dataset = D.check_dataset(dataset)
    auto = pc_per_class == "auto"
    if auto:
        pc_per_class = None if per_class is None else min(per_class, PC_MAX_PER_CLASS[dataset])
    rows, recs = [], {}
    for pct in patches:
        for fam in families(dataset, pct, rs, masks, taus):
            for defense, ckpt, kw in defence_runs(dataset, fam):
                labels = {
                    "dataset": D.DATASET_LABELS[dataset],
                    "patch_pct": float(pct),
                    "family": fam["family"],
                    "defense": defense,
                    "model": ckpt,
                }
                df = _records_or_note(
                    ckpt,
                    labels,
                    rows,
                    lambda: E.certify_cached(
                        dataset,
                        ckpt,
                        pct,
                        per_class=per_class,
                        seed=seed,
                        force=force,
                        device=device,
                        progress=False,
                        compute_missing=compute_missing,
                        **kw,
                    ),
                )
                if df is None:
                    continue
                recs[float(pct), fam["family"], defense] = df
                rows.append(row(df, **labels))
        # "auto" on a subset: only at 07's patch size, where 05's quick profile runs it too (666 forwards per image)
        if patchcleanser and not (auto and pc_per_class is not None and float(pct) != TAU_PATCH[dataset]):
            pc_rows, pc_recs = patchcleanser_runs(
                dataset,
                pct,
                per_class=pc_per_class,
                seed=seed,
                device=device,
                force=force,
                compute_missing=compute_missing,
                models=pc_models,
            )
            rows += pc_rows
            recs.update(pc_recs)
    table = pd.DataFrame(rows)
    table["guarantee"] = table["defense"].map(guarantee)
    for c in TABLE_COLUMNS:
        if c not in table:
            table[c] = np.nan
    table["images"] = table["images"].astype("Int64")  # whole numbers beside the rows of models not trained yet
    return table[TABLE_COLUMNS + [c for c in table.columns if c not in TABLE_COLUMNS]], recs


def verdict(dataset: str, recs: dict, n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Return ``VERDICT_COLUMNS``: per patch size and family, ScaleCert (sound) minus MR (occlusion-trained) in
    certified accuracy on the same images, with its 95% paired-bootstrap interval and McNemar's exact p value."""
    rows = []
    for (pct, fam, defense), sc in recs.items():
        mr = recs.get((pct, fam, MR_OCCL))
        if defense != SC or mr is None:
            continue
        both = sc[["id", "certified"]].merge(mr[["id", "certified"]], on="id", suffixes=("_sc", "_mr"), validate="1:1")
        if len(both) != len(sc) or len(both) != len(mr):
            raise ValueError(f"{dataset} {pct}% {fam}: the two runs do not hold the same images")
        a, b = both.certified_sc.to_numpy(bool), both.certified_mr.to_numpy(bool)
        diff, lo, hi = paired_bootstrap(a, b, n_boot=n_boot, seed=seed)
        rows.append(
            {
                "dataset": D.DATASET_LABELS[dataset],
                "patch_pct": pct,
                "family": fam,
                "images": len(both),
                "scalecert_certified": round(100 * a.mean(), 1),
                "mr_occl_certified": round(100 * b.mean(), 1),
                "difference": round(diff, 1),
                "ci_low": round(lo, 1),
                "ci_high": round(hi, 1),
                "p_value": float(f"{mcnemar_exact(a, b):.3g}"),
            }
        )
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS)


def equal_forwards(table: pd.DataFrame) -> pd.DataFrame:
    """Return per patch size and ScaleCert (sound) point, the best MR (occlusion-trained) point of that patch size at no
    more forward passes per image (NaN where MR has none that cheap), and ``mr_occl_complete``: whether every MR family
    of that patch size is computed (else the best point is the best so far)."""
    out = []
    for (ds, pct), g in table.groupby(["dataset", "patch_pct"], sort=True):
        every_mr = g[g.defense == MR_OCCL]
        complete = bool(len(every_mr)) and bool(every_mr.certified.notna().all())
        g = g.dropna(subset=["certified"])
        mr = g[g.defense == MR_OCCL]
        for _, s in g[g.defense == SC].iterrows():
            cheap = mr[mr.forwards_per_image <= s.forwards_per_image]
            best = cheap.loc[cheap.certified.idxmax()] if len(cheap) else None
            out.append(
                {
                    "dataset": ds,
                    "patch_pct": pct,
                    "family": s.family,
                    "forwards_per_image": s.forwards_per_image,
                    "scalecert_certified": s.certified,
                    "mr_occl_family": None if best is None else best.family,
                    "mr_occl_forwards": np.nan if best is None else best.forwards_per_image,
                    "mr_occl_certified": np.nan if best is None else best.certified,
                    "mr_occl_complete": complete,
                }
            )
    return pd.DataFrame(out, columns=FRONTIER_COLUMNS)


def resolved(verdict_rows: pd.DataFrame, alpha: float = ALPHA) -> pd.Series:
    """Return per verdict row +1 (ScaleCert certifies more), -1 (fewer) or 0 (not resolved): resolved when the
    interval excludes 0 and McNemar's p is rejected by Holm's procedure at ``alpha`` over the rows of its data set."""
    out = pd.Series(0, index=verdict_rows.index, dtype=int)
    for _, v in verdict_rows.groupby("dataset", sort=False):
        sig = holm(v.p_value.to_numpy(float), alpha)
        out[v.index[sig & (v.ci_low > 0).to_numpy()]] = 1
        out[v.index[sig & (v.ci_high < 0).to_numpy()]] = -1
    return out


def _count(values) -> str:
    lo, hi = int(min(values)), int(max(values))
    return f"{lo}" if lo == hi else f"{lo} to {hi}"


def sentence(dataset_label: str, verdict_rows: pd.DataFrame, frontier: pd.DataFrame, table=None) -> str:
    """Return one sentence (written from the tables) on whether SIN adds certified accuracy over occlusion training
    alone: the same-family paired differences, and ScaleCert against MR's best point at no more forwards (patch sizes
    whose MR families are all computed). ``table`` (12's table) adds how many pairs are not computed yet."""
    v = verdict_rows[verdict_rows.dataset == dataset_label]
    if v.empty:
        return f"{dataset_label}: no paired comparison yet (the occlusion-trained model or its runs are missing)."
    r = resolved(v)
    above, below = int((r > 0).sum()), int((r < 0).sum())
    level = int(round(100 * (1 - 0.05)))
    pairs = f"{len(v)} (patch, family) pairs"
    if table is not None:
        t = table[(table.dataset == dataset_label) & (table.defense.isin([SC, MR_OCCL]))]
        total = t.groupby(["patch_pct", "family"]).ngroups
        if total > len(v):
            pairs = f"{len(v)} (patch, family) pairs computed so far (of {total})"
    same = (
        f"on the same images and window family, ScaleCert (sound) certifies more than MR on the occlusion-trained "
        f"model in {above}, fewer in {below} and with no resolved difference in {len(v) - above - below} of {pairs} "
        f"(resolved: the {level}% paired-bootstrap interval excludes 0 and McNemar's exact p "
        f"passes Holm's correction at {ALPHA:g} over the pairs; differences from {v.difference.min():+.1f} to "
        f"{v.difference.max():+.1f} points, {_count(v.images)} images each)"
    )
    fr = frontier[frontier.dataset == dataset_label]
    done = fr[fr.mr_occl_complete.astype(bool)]
    f = done.dropna(subset=["mr_occl_certified"])
    sizes = f"{done.patch_pct.nunique()} of {fr.patch_pct.nunique()} patch sizes"
    if done.empty:
        cost = "; no patch size has every MR family computed yet, so there is no cost comparison"
    elif len(f):
        wins = int((f.scalecert_certified > f.mr_occl_certified).sum())
        gap = f.scalecert_certified - f.mr_occl_certified
        cost = (
            f"; at no more forward passes per image (across families, no interval), ScaleCert is ahead of MR's best "
            f"point in {wins} of {len(f)} ScaleCert points (by {gap.min():+.1f} to {gap.max():+.1f} points; {sizes} "
            f"with every MR family computed)"
        )
    else:
        cost = f"; MR has no point as cheap as any ScaleCert point ({sizes} with every MR family computed)"
    answer = (
        "SIN adds certified accuracy over occlusion training alone"
        if above and not below
        else "SIN does not add certified accuracy over occlusion training alone"
        if below and not above
        else "SIN's effect over occlusion training alone is mixed"
        if above and below
        else "no difference between SIN and occlusion training alone is resolved"
    )
    return f"{dataset_label}: {answer}: {same}{cost}."


# --- the whole-split runs of the verdict, priced and run cheapest first ---------------------------------------------

#: images per class of the subset run that prices a whole-split run (12's quick profile, whose cached runs these are)
PRICE_PER_CLASS = 2
PLAN_COLUMNS = [
    "dataset",
    "patch_pct",
    "family",
    "defense",
    "model",
    "status",
    "images_left",
    "seconds_per_image",
    "cpu_hours_left",
    "key",
]


def whole_split_jobs(
    dataset: str,
    patches=None,
    *,
    defences=(SC, MR_OCCL),
    rs=(3, 1),
    masks: int = MASKS,
    taus=TAUS,
    seed: int = 0,
    cache_dir=None,
) -> pd.DataFrame:
    """Return ``PLAN_COLUMNS``: one row per whole-split run of 12 (``defences`` on every family and patch size; default
    the verdict's pair), its status in the cache (done, partial, missing), images left and CPU-hours left at the seconds
    per image measured on its own chunks or else on its ``PRICE_PER_CLASS`` subset run (NaN: not priced yet), and
    the run's ``certify_cached`` options (``options``)."""
    dataset = D.check_dataset(dataset)
    cache = R.CACHE_DIR if cache_dir is None else cache_dir
    status = R.status(cache).set_index("key")
    rows = []

    def add(pct, fam, defense, ckpt, config, n, sub_ids, options):
        key = R.config_key(config)
        # the subset run's key: the same configuration on the subset's ids (no second model load)
        sub = R.config_key({**config, "ids": R.config_key({"ids": sub_ids})})
        done = int(status.loc[key, "images_done"]) if key in status.index else 0
        per_image = float("nan")
        for k in (key, sub):  # its own chunks first, else the subset run
            t = R.timings(cache / k) if k in status.index else None
            if t is not None and len(t):
                per_image = float(t.seconds.sum() / t.images.sum())
                break
        rows.append(
            {
                "dataset": dataset,
                "patch_pct": float(pct),
                "family": fam,
                "defense": defense,
                "model": ckpt,
                "status": "done" if done >= n else ("partial" if done else "missing"),
                "images_left": n - done,
                "seconds_per_image": round(per_image, 4),
                "cpu_hours_left": round((n - done) * per_image / 3600, 2),
                "key": key,
                "options": options,
            }
        )

    for pct in E.PATCHES[dataset] if patches is None else patches:
        for fam in families(dataset, pct, rs, masks, taus):
            for defense, ckpt, kw in defence_runs(dataset, fam):
                if defense not in defences or not E.available(ckpt):
                    continue
                _, ds, ids, config = E.certify_setup(dataset, ckpt, pct, per_class=None, seed=seed, **kw)
                sub_ids = E.eval_ids(ds, PRICE_PER_CLASS, seed)
                add(pct, fam["family"], defense, ckpt, config, len(ids), sub_ids, kw)
        for defense, ckpt in E.patchcleanser_runs(dataset):  # PatchCleanser on its mask set: the peer harness's runs
            if defense not in defences or not E.available(ckpt):
                continue
            _, _, ds, ids, config = H.peer_setup(
                "PatchCleanser", dataset, pct, per_class=None, seed=seed, checkpoint=ckpt
            )
            sub_ids = E.eval_ids(ds, PC_MAX_PER_CLASS[dataset], seed)
            opts = {"peer": "PatchCleanser", "checkpoint": ckpt}
            add(pct, f"k={PAPER_K} masks", defense, ckpt, config, len(ids), sub_ids, opts)
    return pd.DataFrame(rows, columns=PLAN_COLUMNS + ["options"])


def pair_order(jobs: pd.DataFrame) -> pd.DataFrame:
    """Return the runs left of a plan in the order to run them: the (patch, family) pairs of the verdict whose runs
    left cost least first, an unpriced pair (NaN) last; within a pair, cheaper first."""
    left = jobs[jobs.status != "done"].copy()
    if left.empty:
        return left
    # PatchCleanser's runs are a pair of their own (its two models), not part of the verdict's pair on its mask set
    left["_pair"] = [("PatchCleanser" if d in (PC_OCCL, PC_VANILLA) else "") for d in left.defense]
    pair_cost = left.groupby(["patch_pct", "family", "_pair"]).cpu_hours_left.transform(
        lambda s: s.sum(min_count=len(s))
    )
    left["_pair_cost"] = pair_cost
    return left.sort_values(["_pair_cost", "patch_pct", "family", "cpu_hours_left"], na_position="last").drop(
        columns=["_pair_cost", "_pair"]
    )


def run_whole_split(
    dataset: str,
    patches=None,
    *,
    defences=(SC, MR_OCCL),
    max_hours: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    log=print,
    **family_kw,
) -> pd.DataFrame:
    """Run 12's missing whole-split runs of a data set cheapest pair first (each priced first by its subset run, which
    12's quick profile reads) and return the plan after; stop before a run that would pass ``max_hours`` CPU-hours
    in all (at its price). Every run is cached chunk by chunk, so an interrupted call resumes where it stopped;
    ``family_kw``: ``rs``, ``masks``, ``taus`` of :func:`whole_split_jobs`."""

    def compute(job, per_class):
        if "peer" in job.options:
            H.peer_cached(
                job.options["peer"],
                dataset,
                job.patch_pct,
                per_class=per_class,
                seed=seed,
                device=device,
                progress=per_class is None,
                checkpoint=job.options["checkpoint"],
            )
        else:
            E.certify_cached(
                dataset,
                job.model,
                job.patch_pct,
                per_class=per_class,
                seed=seed,
                device=device,
                progress=per_class is None,
                **job.options,
            )

    jobs = whole_split_jobs(dataset, patches, defences=defences, seed=seed, **family_kw)
    for job in jobs[jobs.cpu_hours_left.isna()].itertuples():
        per_class = PC_MAX_PER_CLASS[dataset] if "peer" in job.options else PRICE_PER_CLASS
        log(f"pricing {job.patch_pct:g}% {job.family} {job.defense}: {per_class} images per class")
        compute(job, per_class)
    jobs = whole_split_jobs(dataset, patches, defences=defences, seed=seed, **family_kw)
    spent = 0.0
    for job in pair_order(jobs).itertuples():
        if max_hours is not None and spent + job.cpu_hours_left > max_hours:
            log(
                f"stopping: {job.patch_pct:g}% {job.family} {job.defense} needs {job.cpu_hours_left} CPU-h "
                f"({spent:.2f} of {max_hours} spent)"
            )
            break
        log(
            f"running {job.patch_pct:g}% {job.family} {job.defense} on {job.model}: {job.images_left} images, "
            f"about {job.cpu_hours_left} CPU-h"
        )
        compute(job, None)
        spent += job.cpu_hours_left
    return whole_split_jobs(dataset, patches, defences=defences, seed=seed, **family_kw)
