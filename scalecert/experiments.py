"""Experiment runners the notebooks call: model naming, the study's settings and the cached runs (certification,
audits, predictions, SIN analyses, attacks). The paper's numbers live in :mod:`scalecert.paper`, the paper profile's
bookkeeping in :mod:`scalecert.paperprofile`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import data as D
from . import results as R
from .data import eval_ids  # lives in data (harness needs it too); E.eval_ids stays for the notebooks
from .defense import certify
from .models import CHECKPOINT_DIR, load_model, without_sin
from .paper import PAPER_DATASET, PAPER_LABEL, fig1c_paper, paper_figure, paper_table  # noqa: F401 (notebooks: E.*)

ARCH = {"cifar10": "resnet20", "imagenette": "resnet18w16"}
#: patch sizes (% of the image) of the paper's tables
PATCHES = {"cifar10": [0.4, 2.4], "imagenette": [1.0, 2.0, 3.0]}
#: the large patch sizes of the paper's Table 5 (appendix A.4)
LARGE_PATCHES = {"cifar10": [5.0, 8.0], "imagenette": [5.0, 8.0]}
#: default window merging: none at 32x32 (676 windows), tau = 0.3 at 224x224 (the paper's best, Table 4)
DEFAULT_TAU = {"cifar10": None, "imagenette": 0.3}
DEFAULT_RATE = {"cifar10": 20, "imagenette": 10}


def model_name(dataset: str, layer: int | None = 1, rate_pct: int | None = None) -> str:
    """Return the shipped checkpoint name of a data set's model (vanilla when rate_pct is None)."""
    base = f"{dataset}_{ARCH[dataset]}"
    return f"{base}_vanilla" if rate_pct is None else f"{base}_sin{layer}_r{rate_pct}"


def occlusion_model_name(dataset: str) -> str:
    """Return the checkpoint name of a data set's ablation twin: the SIN model's fine-tuning without SIN, the
    window's pixels filled instead (Minority Reports' occlusion)."""
    return f"{dataset}_{ARCH[dataset]}_occl"


#: 05's and 12's row labels of PatchCleanser (a peer any classifier can run) on the two models it runs on
PC_VANILLA, PC_OCCL = "PatchCleanser (undefended model)", "PatchCleanser (occlusion-trained)"


def patchcleanser_runs(dataset: str) -> list[tuple[str, str]]:
    """Return (row label, checkpoint) of PatchCleanser's rows on a data set: on the vanilla model (its harness default,
    the reference's "without masked training") and on the occlusion-trained twin (``occlusion_model_name``: the closest
    of the project's models to PatchCleanser's masked training; the twin hides windows of its SIN model's family with
    pixels filled, not Cutout squares)."""
    return [(PC_VANILLA, model_name(dataset)), (PC_OCCL, occlusion_model_name(dataset))]


def _peer_label(peer: str, dataset: str, model: str) -> str:
    """Return a peer run's row label: its name, or for PatchCleanser the label of the model it ran on (05's rows)."""
    if peer == "PatchCleanser":
        return {ck: label for label, ck in patchcleanser_runs(dataset)}.get(model, peer)
    return peer


def available(name: str) -> bool:
    """Return True iff a checkpoint of that name is shipped."""
    return (CHECKPOINT_DIR / f"{name}.pt").is_file()


def certify_setup(
    dataset: str,
    checkpoint: str,
    patch: float,
    *,
    per_class: int | None,
    seed: int = 0,
    mode: str = "sound",
    rule: str = "strict",
    tau: float | None = None,
    r: int = 3,
    sin: bool = True,
    device: str = "cpu",
    chunk_images: int = 50,
    early_stop: bool | None = None,
    masks: int | None = None,
):
    """Return (model, data set, image ids, cache config) of one certification configuration of ``certify_cached``."""
    dataset = D.check_dataset(dataset)
    model = load_model(checkpoint, device=device)
    if not sin:
        model.set_sin(model.sin_layer, None)
    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    early = (rule == "strict") if early_stop is None else early_stop
    config = {
        "dataset": dataset,
        "checkpoint_sha256": model.card["sha256"],
        "patch": patch,
        "mode": mode,
        "rule": rule,
        "tau": tau,
        "r": r,
        "layer": model.sin_layer,
        "rate": model.sin_rate,
        "ids": R.config_key({"ids": ids}),
        "chunk_images": chunk_images,
        "early_stop": early,
    }
    if masks is not None:  # only then: runs cached before this option keep their key
        config["masks"] = masks
    return model, ds, ids, config


def certify_cached(
    dataset: str,
    checkpoint: str,
    patch: float,
    *,
    per_class: int | None,
    force: bool = False,
    progress: bool = True,
    compute_missing: bool = True,
    **options,
) -> pd.DataFrame:
    """Return per-image certification records of one configuration, from the cache or computed (and cached);
    ``options``: those of ``certify_setup`` (seed, mode, rule, tau, r, sin, device, chunk_images, early_stop, and
    ``masks=k``: PatchCleanser's k x k mask set as the window family, r and tau unused); ``compute_missing=False``:
    a run not complete in the cache raises ``results.NotComputed``."""
    model, ds, ids, config = certify_setup(dataset, checkpoint, patch, per_class=per_class, **options)
    device = options.get("device", "cpu")

    def one(rg):
        x, y = ds.tensors(ids[rg.start : rg.stop])
        return certify(
            model,
            x,
            y,
            patch,
            mode=config["mode"],
            rule=config["rule"],
            tau=config["tau"],
            r=config["r"],
            device=device,
            ids=ids[rg.start : rg.stop],
            early_stop=config["early_stop"],
            masks=config.get("masks"),
        )

    return R.cached(config, ids, config["chunk_images"], one, force, progress, compute_missing=compute_missing)


def audit_cached(
    dataset: str,
    checkpoint: str,
    patch: float,
    *,
    per_class: int | None,
    seed: int = 0,
    mode: str = "sound",
    tau: float | None = None,
    r: int = 3,
    stride: int = 1,
    attack_stride: int | None = None,
    attack_steps: int = 10,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Return per-image soundness-audit rows (``scalecert.audit.audit_records``), cached one image per chunk."""
    from .audit import CONTENTS, audit_records
    from .defense import Engine

    dataset = D.check_dataset(dataset)
    model = load_model(checkpoint, device=device)
    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    config = {
        "kind": "audit",
        "dataset": dataset,
        "checkpoint_sha256": model.card["sha256"],
        "patch": patch,
        "mode": mode,
        "tau": tau,
        "r": r,
        "layer": model.sin_layer,
        "rate": model.sin_rate,
        "ids": R.config_key({"ids": ids}),
        "stride": stride,
        "attack_stride": attack_stride or stride,
        "attack_steps": attack_steps,
        "contents": list(CONTENTS),
        "seed": seed,
    }
    engine = Engine(model, D.image_size(dataset), patch, r=r, tau=tau, mode=mode, device=device)

    def one(rg):
        x, y = ds.tensors(ids[rg.start : rg.stop])
        return audit_records(
            engine,
            x.to(device),
            y,
            ids=ids[rg.start : rg.stop],
            progress=False,
            stride=stride,
            attack_stride=attack_stride,
            attack_steps=attack_steps,
            seed=seed,
        )

    return R.cached(config, ids, 1, one, force, progress)


def audit_patchcleanser_cached(
    dataset: str,
    checkpoint: str,
    patch: float,
    *,
    per_class: int | None,
    seed: int = 0,
    k: int = 6,
    stride: int = 1,
    attack_stride: int | None = None,
    attack_steps: int = 10,
    attack_masks: int = 16,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Return per-image soundness-audit rows of PatchCleanser (``scalecert.audit.audit_records_patchcleanser``) on a
    shipped checkpoint and the class-balanced subset of ``per_class`` images per class, cached one image per chunk:
    k x k masks; fixed contents every ``stride`` px, the PGD attack (``attack_steps`` steps, ``attack_masks``
    one-mask predictions per step) every ``attack_stride`` px (default ``stride``).

    The certificates are the peer harness's (``harness.peer_cached``; ``k`` must be its k, 6), read from its cache
    when 05 (or 12) certified the same images, computed and cached otherwise; ``force`` recomputes the audit only.
    The configuration has "kind": "audit" and "defense": "PatchCleanser" (ScaleCert's audits, ``audit_cached``, have
    no "defense" key), so the two never share a cache key, the peer's certificate ``version`` and the key of the
    certification run."""
    from .audit import CONTENTS, audit_records_patchcleanser
    from .baselines import harness as H

    dataset = D.check_dataset(dataset)
    model = load_model(checkpoint, device=device)
    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    cert = H.peer_cached(
        "PatchCleanser",
        dataset,
        patch,
        per_class=per_class,
        seed=seed,
        device=device,
        progress=progress,
        checkpoint=checkpoint,
    )
    if not (cert.masks == k * k).all():
        raise ValueError(f"the cached certificates use {int(cert.masks.iloc[0])} masks, not {k} x {k}")
    config = {
        "kind": "audit",
        "defense": "PatchCleanser",
        "version": H.peer("PatchCleanser").version,
        "dataset": dataset,
        "checkpoint_sha256": model.card["sha256"],
        "patch": patch,
        "masks": k,
        "ids": R.config_key({"ids": ids}),
        "certificates": Path(cert.attrs["cache"]).name,
        "stride": stride,
        "attack_stride": attack_stride or stride,
        "attack_steps": attack_steps,
        "attack_masks": attack_masks,
        "contents": list(CONTENTS),
        "seed": seed,
    }

    def one(rg):
        x, y = ds.tensors(ids[rg.start : rg.stop])
        return audit_records_patchcleanser(
            model,
            x,
            y,
            patch,
            k=k,
            ids=ids[rg.start : rg.stop],
            certificates=cert,
            progress=False,
            device=device,
            stride=stride,
            attack_stride=attack_stride,
            attack_steps=attack_steps,
            attack_masks=attack_masks,
            seed=seed,
        )

    return R.cached(config, ids, 1, one, force, progress)


def summarise(df: pd.DataFrame, **labels) -> dict:
    """Return one table row: clean and certified accuracy (%), mean candidates, windows, forwards and seconds per
    image."""
    return {
        **labels,
        "images": len(df),
        "clean": round(100 * df.clean_correct.mean(), 1),
        "certified": round(100 * df.certified.mean(), 1),
        "candidates": round(float(df.n_candidates.mean()), 1),
        "windows": int(df.n_windows.iloc[0]),
        "forwards_per_image": round(1 + float(df.n_evaluated.mean()), 1),
        "seconds_per_image": round(df.attrs.get("seconds_per_image", float("nan")), 4),
    }


def inference_forwards(df: pd.DataFrame) -> float:
    """Return the forward passes per image ``detect`` spends on an input of a ScaleCert or MR run: 1 + candidates."""
    return round(1 + float(df.n_candidates.mean()), 1)


def model_accuracy(df: pd.DataFrame) -> float:
    """Return the plain model's top-1 accuracy (%) on a certification run's images (its unoccluded ``pred``)."""
    return round(100 * float((df.pred == df.label).mean()), 1)


def predictions_cached(
    dataset: str,
    checkpoint: str,
    *,
    per_class: int | None,
    seed: int = 0,
    device: str = "cpu",
    chunk_images: int = 500,
    force: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Return one row per evaluation image of a shipped checkpoint: id, label, and without and with its SIN layer the
    prediction (-1 for a model without one) and its margin (top-1 minus top-2 logit; a margin near 0 is a tie that
    float rounding may break either way); computed chunk by chunk and cached by checkpoint hash (01's accuracies)."""
    import torch

    dataset = D.check_dataset(dataset)
    model = load_model(checkpoint, device=device).eval()
    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    config = {
        "kind": "predictions",
        "dataset": dataset,
        "checkpoint_sha256": model.card["sha256"],
        "layer": model.sin_layer,
        "rate": model.sin_rate,
        "ids": R.config_key({"ids": ids}),
        "chunk_images": chunk_images,
        "seed": seed,
    }

    def pred_margin(logits):
        top = logits.float().topk(2, dim=1)
        return top.indices[:, 0].cpu().tolist(), (top.values[:, 0] - top.values[:, 1]).cpu().tolist()

    @torch.no_grad()
    def one(rg):
        x, y = ds.tensors(ids[rg.start : rg.stop])
        x = x.to(device)
        with without_sin(model):
            plain, plain_margin = pred_margin(model(x))
        with_sin, sin_margin = (
            pred_margin(model(x)) if model.sin is not None else ([-1] * len(y), [float("nan")] * len(y))
        )
        return pd.DataFrame(
            {
                "id": ids[rg.start : rg.stop],
                "label": y.tolist(),
                "pred_without_sin": plain,
                "margin_without_sin": plain_margin,
                "pred_with_sin": with_sin,
                "margin_with_sin": sin_margin,
            }
        )

    return R.cached(config, ids, chunk_images, one, force, progress).drop(columns="config_key")


def prediction_accuracies(df: pd.DataFrame) -> dict:
    """Return the top-1 accuracy (%) without and with the SIN layer (None without one) of ``predictions_cached``."""
    with_sin = None if (df.pred_with_sin < 0).all() else 100 * float((df.pred_with_sin == df.label).mean())
    return {"acc_without_sin": 100 * float((df.pred_without_sin == df.label).mean()), "acc_with_sin": with_sin}


def cached_universal_patch(
    dataset: str,
    checkpoint: str,
    patch_pct: float,
    target: int,
    *,
    steps: int,
    alpha: float = 0.0,
    train_images: int = 2000,
    seed: int = 0,
    force: bool = False,
    device: str = "cpu",
):
    """Return a universal targeted patch (3, p, p), trained once per configuration and cached under
    data/cache/patches."""
    import torch

    from .attacks import universal_patch
    from .windows import patch_pixels

    model = load_model(checkpoint, device=device)
    n = D.image_size(dataset)
    p = patch_pixels(patch_pct, n)
    key = R.config_key(
        {
            "sha": model.card["sha256"],
            "p": p,
            "target": target,
            "steps": steps,
            "alpha": alpha,
            "train_images": train_images,
            "seed": seed,
        }
    )
    path = R.CACHE_DIR / "patches" / f"{dataset}-{key}.pt"
    if path.is_file() and not force:
        return torch.load(path)
    with R.exclusive(f"patch-{dataset}-{key}"):  # a notebook beside this one may be training the same patch
        if path.is_file() and not force:
            return torch.load(path)
        ds = D.load_dataset(dataset, "train")
        idx = ds.subset(max(1, train_images // len(ds.classes)), seed)
        x, _ = ds.tensors(idx)
        patch = universal_patch(model, x, target, p, steps=steps, batch=32, alpha=alpha, seed=seed).cpu()
        _atomic_torch_save(patch, path)
    return patch


def _atomic_torch_save(obj, path: Path) -> None:
    """Save a torch object through a temporary file and a rename."""
    import torch

    R.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def eval_images(dataset: str, per_class: int | None, seed: int = 0):
    """Return (images, labels, ids) of a class-balanced evaluation subset (the whole split if per_class is None)."""
    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    x, y = ds.tensors(ids)
    return x, y, ids


# --- per-image analyses of the SIN (02, 03, 04, 09), cached chunk by chunk like certification ---------------


@dataclass
class Chunk:
    """One chunk of evaluation images handed to a per-image analysis: images, labels, ids, patch corners, position."""

    x: object
    y: object
    ids: list
    corners: object
    start: int
    run: Path


def _tensor_key(t) -> str:
    """Return a short hash of a tensor's values (a patch is part of the configuration it is applied in)."""
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def patch_corners(n_images: int, dataset: str, patch_pct: float, seed: int = 0):
    """Return the seeded random top-left corners (n_images, 2) of a patch of patch_pct % in a data set's images."""
    import torch

    from .attacks import random_corners
    from .windows import patch_pixels

    n = D.image_size(dataset)
    return random_corners(n_images, n, patch_pixels(patch_pct, n), torch.Generator().manual_seed(seed))


def _per_image_cached(
    kind: str,
    dataset: str,
    checkpoint: str,
    patch_pct: float,
    settings: dict,
    fn,
    *,
    per_class: int | None,
    seed: int,
    device: str,
    chunk_images: int,
    force: bool,
    progress: bool,
    corner_seed: int | None = None,
) -> pd.DataFrame:
    """Return the records of a per-image analysis ``fn(model, Chunk) -> DataFrame``, computed chunk by chunk and cached.

    ``seed`` draws the image subset; the patch corners come from ``corner_seed`` (default: the same seed)."""
    dataset = D.check_dataset(dataset)
    model = load_model(checkpoint, device=device)
    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    corner_seed = seed if corner_seed is None else corner_seed
    corners = patch_corners(len(ids), dataset, patch_pct, corner_seed)
    config = {
        "kind": kind,
        "dataset": dataset,
        "checkpoint_sha256": model.card["sha256"],
        "layer": model.sin_layer,
        "rate": model.sin_rate,
        "ids": R.config_key({"ids": ids}),
        "chunk_images": chunk_images,
        "seed": seed,
        "patch_pct": patch_pct,
        **settings,
    }
    if corner_seed != seed:  # only then: runs cached before this option keep their key
        config["corner_seed"] = corner_seed
    run = R.open_run(config)

    def one(rg):
        x, y = ds.tensors(ids[rg.start : rg.stop])
        df = fn(model, Chunk(x, y, ids[rg.start : rg.stop], corners[rg.start : rg.stop], rg.start, run))
        df.insert(0, "id", ids[rg.start : rg.stop])
        return df

    return R.cached(config, ids, chunk_images, one, force, progress).drop(columns="config_key")


def _boxes(corners, p: int) -> list[tuple]:
    """Return the inclusive pixel boxes (r0, c0, r1, c1) of p x p patches at the given corners."""
    return [(a, b, a + p - 1, b + p - 1) for a, b in corners.tolist()]


def _loads_box(s):
    """Return a box tuple from its JSON text (None for null or a missing value)."""
    return None if not isinstance(s, str) else (tuple(v) if (v := json.loads(s)) is not None else None)


def patched_examples(dataset: str, patch_pct: float, patch, *, per_class: int | None, seed: int = 0, k: int = 1):
    """Return (benign, patched) images of the first k evaluation images, the patch at their ``patch_corners``."""
    from .attacks import apply_patch

    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    x, _ = ds.tensors(ids[:k])
    return x, apply_patch(x, patch, patch_corners(len(ids), dataset, patch_pct, seed)[:k])


def sin_statistics_cached(
    dataset: str,
    checkpoint: str,
    patch_pct: float,
    *,
    per_class: int | None,
    seed: int = 0,
    patch=None,
    force: bool = False,
    device: str = "cpu",
    chunk_images: int = 50,
    progress: bool = True,
):
    """Return (per-image, per-cluster) SIN statistics (``analysis.sin_statistics``) of the benign images, or of the
    patched ones when ``patch`` (3, p, p) is given (pasted at ``patch_corners``); cached chunk by chunk."""
    from .analysis import sin_statistics
    from .attacks import apply_patch
    from .windows import patch_pixels

    p = patch_pixels(patch_pct, D.image_size(dataset))
    kind = "benign" if patch is None else "patched"

    def fn(model, ch):
        x = ch.x if patch is None else apply_patch(ch.x, patch, ch.corners)
        per, cl = sin_statistics(model, x, kind=kind, patch_boxes=_boxes(ch.corners, p))
        per["image"] += ch.start
        per["box"] = [json.dumps(list(b)) for b in per.box]
        per["clusters"] = [
            json.dumps([[int(a), float(b)] for a, b in zip(g["size"], g["s_c"])])
            for _, g in cl.groupby("image", sort=True)
        ]
        return per

    settings = {"images": kind, "patch_sha256": None if patch is None else _tensor_key(patch)}
    df = _per_image_cached(
        "sin_statistics",
        dataset,
        checkpoint,
        patch_pct,
        settings,
        fn,
        per_class=per_class,
        seed=seed,
        device=device,
        chunk_images=chunk_images,
        force=force,
        progress=progress,
    )
    attrs = dict(df.attrs)
    clusters = pd.DataFrame(
        [
            {"image": im, "kind": kind, "cluster": c, "size": a, "s_c": b}
            for im, text in zip(df.image, df.clusters)
            for c, (a, b) in enumerate(json.loads(text))
        ]
    )
    per = df.drop(columns="clusters")
    per["box"] = per.box.map(_loads_box)
    per.attrs = attrs
    return per, clusters


def prediction_stability_cached(
    dataset: str,
    checkpoint: str,
    patch_pct: float,
    patch,
    *,
    per_class: int | None,
    seed: int = 0,
    force: bool = False,
    device: str = "cpu",
    chunk_images: int = 50,
    progress: bool = True,
):
    """Return (Fig. 1d table over the correctly classified images, per-image predictions before and after removing
    the most localised SINs), reusing the SIN statistics of 02; cached chunk by chunk.

    ``force`` recomputes this run only: the SIN statistics are read from 02's cache (computed there if missing)."""
    import torch

    from .analysis import predict_without, stability_table
    from .attacks import apply_patch

    kw = dict(per_class=per_class, seed=seed, device=device, chunk_images=chunk_images, progress=progress)
    stats = {
        "benign": sin_statistics_cached(dataset, checkpoint, patch_pct, **kw)[0],
        "patched": sin_statistics_cached(dataset, checkpoint, patch_pct, patch=patch, **kw)[0],
    }

    @torch.no_grad()
    def fn(model, ch):
        out = {"label": ch.y.numpy()}
        for kind, x in (("benign", ch.x), ("patched", apply_patch(ch.x, patch, ch.corners))):
            boxes = stats[kind].box.iloc[ch.start : ch.start + len(ch.ids)]
            out[f"{kind}_before"] = model(x.to(device)).argmax(1).cpu().numpy()
            out[f"{kind}_after"] = predict_without(model, x, boxes).numpy()
        return pd.DataFrame(out)

    settings = {"patch_sha256": _tensor_key(patch), "stats": [Path(s.attrs["cache"]).name for s in stats.values()]}
    per = _per_image_cached("prediction_stability", dataset, checkpoint, patch_pct, settings, fn, force=force, **kw)
    return stability_table(per[per.benign_before == per.label]), per


def share_detection_cached(
    dataset: str,
    checkpoint: str,
    patch_pct: float,
    *,
    per_class: int | None,
    seed: int = 0,
    corner_seed: int | None = None,
    patch=None,
    force: bool = False,
    device: str = "cpu",
    chunk_images: int = 200,
    progress: bool = True,
) -> pd.DataFrame:
    """Return per image the prediction and the SIN-share detector's verdict (``analysis.share_detection``) on the
    benign images, or on the patched ones when ``patch`` is given; cached chunk by chunk (Fig. 1e).

    ``seed`` draws the images, ``corner_seed`` (default: ``seed``) the patch positions."""
    from .analysis import share_detection
    from .attacks import apply_patch
    from .windows import patch_pixels

    p = patch_pixels(patch_pct, D.image_size(dataset))

    def fn(model, ch):
        if patch is None:
            return share_detection(model, ch.x, p).assign(label=ch.y.numpy())
        return share_detection(model, apply_patch(ch.x, patch, ch.corners), p, _boxes(ch.corners, p)).assign(
            label=ch.y.numpy()
        )

    settings = {
        "images": "benign" if patch is None else "patched",
        "patch_sha256": None if patch is None else _tensor_key(patch),
    }
    return _per_image_cached(
        "share_detection",
        dataset,
        checkpoint,
        patch_pct,
        settings,
        fn,
        per_class=per_class,
        seed=seed,
        corner_seed=corner_seed,
        device=device,
        chunk_images=chunk_images,
        force=force,
        progress=progress,
    )


#: example images kept beside each recovery run (the first ones attacked)
RECOVERY_EXAMPLES = 8


def pgd_init(ids, p: int, seed: int = 0):
    """Return the seeded random start (len(ids), 3, p, p) of a PGD patch per image id (the same whatever the batch)."""
    import torch

    return (
        torch.stack(
            [torch.rand(3, p, p, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))) for i in ids]
        )
        if len(ids)
        else torch.zeros(0, 3, p, p)
    )


def recovery_cached(
    dataset: str,
    checkpoint: str,
    patch_pct: float,
    *,
    per_class: int | None,
    seed: int = 0,
    steps: int = 100,
    tau: float | None = None,
    examples: int = 4,
    force: bool = False,
    device: str = "cpu",
    chunk_images: int = 50,
    progress: bool = True,
):
    """Return (summary, per-image table, examples) of empirical recovery (Sec. 4.4) on the correctly classified
    images: a PGD patch per image at ``patch_corners`` (seeded start per image id), detect, occlude the suspected
    window; cached chunk by chunk.

    ``examples`` (at most ``RECOVERY_EXAMPLES``) is (clean images, patched images, their rows of the table) of the
    first attacked images, kept beside the run so that a cached run shows the very images it measured."""
    import numpy as np
    import torch

    from .analysis import empirical_recovery, recovery_summary
    from .attacks import apply_patch, pgd_patch
    from .defense import Engine
    from .windows import patch_pixels

    if not 0 <= examples <= RECOVERY_EXAMPLES:
        raise ValueError(f"examples must be between 0 and {RECOVERY_EXAMPLES}, got {examples}")
    p = patch_pixels(patch_pct, D.image_size(dataset))
    engines = {}

    def fn(model, ch):
        if "e" not in engines:
            engines["e"] = Engine(model, D.image_size(dataset), patch_pct, tau=tau, device=device)
        with torch.no_grad():
            ok = (model(ch.x.to(device)).argmax(1).cpu() == ch.y).numpy()
        out = pd.DataFrame({"label": ch.y.numpy(), "correct": ok})
        for col in ("clean", "patched", "recovered", "alert", "localised", "patch_box", "suspected_box"):
            out[col] = None  # stays empty for the images the model gets wrong (they are not attacked)
        xp, c = ch.x[:0], ch.corners[:0]
        kept = [i for i, o in zip(ch.ids, ok) if o]
        if ok.any():
            x, y, c = ch.x[ok], ch.y[ok], ch.corners[ok]
            xp, c = pgd_patch(model, x, y, p, corners=c, steps=steps, init=pgd_init(kept, p, seed))
            _, per = empirical_recovery(engines["e"], x, y, xp.cpu(), c)
            for col in ("clean", "patched", "recovered", "alert", "localised"):
                out.loc[ok, col] = per[col].to_numpy()
            for col in ("patch_box", "suspected_box"):
                out.loc[ok, col] = [json.dumps(None if b is None else list(b)) for b in per[col]]
        if ch.start == 0:
            k = min(RECOVERY_EXAMPLES, len(xp))
            crops = (
                torch.stack([xp[i, :, a : a + p, b : b + p].cpu() for i, (a, b) in enumerate(c[:k].tolist())])
                if k
                else torch.zeros(0, 3, p, p)
            )
            _atomic_torch_save({"ids": kept[:k], "corners": c[:k].cpu(), "crops": crops}, ch.run / "examples.pt")
        return out

    settings = {"steps": steps, "tau": tau, "attack": "pgd_patch, start seeded per image id"}
    df = _per_image_cached(
        "empirical_recovery",
        dataset,
        checkpoint,
        patch_pct,
        settings,
        fn,
        per_class=per_class,
        seed=seed,
        device=device,
        chunk_images=chunk_images,
        force=force,
        progress=progress,
    )
    run = Path(df.attrs["cache"])
    per = df[df.correct.astype(bool)].drop(columns="correct").reset_index(drop=True)
    for col in ("clean", "patched", "recovered"):
        per[col] = per[col].astype(int)
    for col in ("alert", "localised"):
        per[col] = per[col].astype(bool)
    for col in ("patch_box", "suspected_box"):
        per[col] = per[col].map(_loads_box)
    if not (run / "examples.pt").is_file():
        raise R.CacheMismatch(f"{run / 'examples.pt'} is missing: run again with force=1 to recompute this run")
    ex = torch.load(run / "examples.pt")
    ids = np.asarray(ex["ids"][:examples], dtype=np.int64)
    xs, _ = D.load_dataset(dataset, "eval").tensors(ids)
    xp = apply_patch(xs, ex["crops"][: len(ids)], ex["corners"][: len(ids)])
    rows = per.set_index("id").loc[ids].reset_index()
    return recovery_summary(per), per, (xs, xp, rows)
