"""Experiment runners the notebooks call: cached certification configs, paper tables, model lookup."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from . import data as D
from . import results as R
from .defense import certify
from .models import CHECKPOINT_DIR, load_model

PAPER_DIR = Path(__file__).resolve().parent.parent / "data" / "paper"
PAPER_DATASET = {"cifar10": "cifar10", "imagenette": "imagenet", "imagenet": "imagenet"}
PAPER_LABEL = {"cifar10": "paper (lossless CIFAR-10, ResNet-18)", "imagenette": "paper (ImageNet, ResNet-50)",
               "imagenet": "paper (ImageNet, ResNet-50)"}
ARCH = {"cifar10": "resnet20", "imagenette": "resnet18w16"}
#: patch sizes (% of the image) of the paper's tables
PATCHES = {"cifar10": [0.4, 2.4], "imagenette": [1.0, 2.0, 3.0]}
#: default window merging: none at 32x32 (676 windows), tau = 0.3 at 224x224 (the paper's best, Table 4)
DEFAULT_TAU = {"cifar10": None, "imagenette": 0.3}
DEFAULT_RATE = {"cifar10": 20, "imagenette": 10}


def model_name(dataset: str, layer: int | None = 1, rate_pct: int | None = None) -> str:
    """Return the shipped checkpoint name of a data set's model (vanilla when rate_pct is None)."""
    base = f"{dataset}_{ARCH[dataset]}"
    return f"{base}_vanilla" if rate_pct is None else f"{base}_sin{layer}_r{rate_pct}"


def available(name: str) -> bool:
    """Return True iff a checkpoint of that name is shipped."""
    return (CHECKPOINT_DIR / f"{name}.pt").is_file()


def paper_figure(item: str) -> float:
    """Return one number the paper reports outside its tables (data/paper/other_reported_figures.csv)."""
    df = pd.read_csv(PAPER_DIR / "other_reported_figures.csv").set_index("item")
    if item not in df.index:
        raise KeyError(f"{item!r} is not in data/paper/other_reported_figures.csv")
    return float(df.loc[item, "value"])


def paper_table(name: str, dataset: str | None = None) -> pd.DataFrame:
    """Return one of the paper's tables (data/paper/NAME.csv), optionally the rows of a data set's paper counterpart."""
    df = pd.read_csv(PAPER_DIR / f"{name}.csv")
    if dataset is not None and "dataset" in df.columns:
        df = df[df.dataset == PAPER_DATASET[dataset]]
    return df.reset_index(drop=True)


def certify_cached(dataset: str, checkpoint: str, patch: float, *, per_class: int | None, seed: int = 0,
                   mode: str = "sound", rule: str = "strict", tau: float | None = None, r: int = 3,
                   sin: bool = True, force: bool = False, device: str = "cpu", chunk_images: int = 50,
                   early_stop: bool | None = None, progress: bool = True) -> pd.DataFrame:
    """Return per-image certification records of one configuration, from the cache or computed (and cached)."""
    dataset = D.check_dataset(dataset)
    model = load_model(checkpoint, device=device)
    if not sin:
        model.set_sin(model.sin_layer, None)
    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    early = (rule == "strict") if early_stop is None else early_stop
    config = {"dataset": dataset, "checkpoint_sha256": model.card["sha256"], "patch": patch, "mode": mode,
              "rule": rule, "tau": tau, "r": r, "layer": model.sin_layer, "rate": model.sin_rate,
              "ids": R.config_key({"ids": ids}), "chunk_images": chunk_images, "early_stop": early}

    def one(rg):
        x, y = ds.tensors(ids[rg.start:rg.stop])
        return certify(model, x, y, patch, mode=mode, rule=rule, tau=tau, r=r, device=device,
                       ids=ids[rg.start:rg.stop], early_stop=early)

    return _cached(config, ids, chunk_images, one, force, progress)


def _cached(config: dict, ids: list, chunk_images: int, fn, force: bool, progress: bool) -> pd.DataFrame:
    """Return the merged records of a cached run, computing its missing chunks with ``fn(range)`` first."""
    run = R.open_run(config)
    if force:
        for f in [*run.glob("chunk-*.csv"), *run.glob("timings-*.csv")]:
            f.unlink()
    R.compute(run, len(ids), chunk_images, fn, progress=progress)
    df = R.merge(run, len(ids), chunk_images, ids)
    t = R.timings(run)
    df.attrs["seconds_per_image"] = float(t.seconds.sum() / max(1, t.images.sum())) if len(t) else float("nan")
    df.attrs["cache"] = str(run)
    return df


def audit_cached(dataset: str, checkpoint: str, patch: float, *, per_class: int | None, seed: int = 0,
                 mode: str = "sound", tau: float | None = None, r: int = 3, stride: int = 1,
                 attack_stride: int | None = None, attack_steps: int = 10, force: bool = False,
                 device: str = "cpu", progress: bool = True) -> pd.DataFrame:
    """Return per-image soundness-audit rows (``scalecert.audit.audit_records``), cached one image per chunk."""
    from .audit import CONTENTS, audit_records
    from .defense import Engine
    dataset = D.check_dataset(dataset)
    model = load_model(checkpoint, device=device)
    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    config = {"kind": "audit", "dataset": dataset, "checkpoint_sha256": model.card["sha256"], "patch": patch,
              "mode": mode, "tau": tau, "r": r, "layer": model.sin_layer, "rate": model.sin_rate,
              "ids": R.config_key({"ids": ids}), "stride": stride, "attack_stride": attack_stride or stride,
              "attack_steps": attack_steps, "contents": list(CONTENTS), "seed": seed}
    engine = Engine(model, D.image_size(dataset), patch, r=r, tau=tau, mode=mode, device=device)

    def one(rg):
        x, y = ds.tensors(ids[rg.start:rg.stop])
        return audit_records(engine, x.to(device), y, ids=ids[rg.start:rg.stop], progress=False, stride=stride,
                             attack_stride=attack_stride, attack_steps=attack_steps, seed=seed)

    return _cached(config, ids, 1, one, force, progress)


def summarise(df: pd.DataFrame, **labels) -> dict:
    """Return one table row: clean and certified accuracy (%), mean candidates, windows, forwards and seconds per image."""
    return {**labels, "images": len(df),
            "clean": round(100 * df.clean_correct.mean(), 1), "certified": round(100 * df.certified.mean(), 1),
            "candidates": round(float(df.n_candidates.mean()), 1), "windows": int(df.n_windows.iloc[0]),
            "forwards_per_image": round(1 + float(df.n_evaluated.mean()), 1),
            "seconds_per_image": round(df.attrs.get("seconds_per_image", float("nan")), 4)}


def cached_universal_patch(dataset: str, checkpoint: str, patch_pct: float, target: int, *, steps: int,
                           alpha: float = 0.0, train_images: int = 2000, seed: int = 0, force: bool = False,
                           device: str = "cpu"):
    """Return a universal targeted patch (3, p, p), trained once per configuration and cached under data/cache/patches."""
    import torch

    from .attacks import universal_patch
    from .windows import patch_pixels
    model = load_model(checkpoint, device=device)
    n = D.image_size(dataset)
    p = patch_pixels(patch_pct, n)
    key = R.config_key({"sha": model.card["sha256"], "p": p, "target": target, "steps": steps, "alpha": alpha,
                        "train_images": train_images, "seed": seed})
    path = R.CACHE_DIR / "patches" / f"{dataset}-{key}.pt"
    if path.is_file() and not force:
        return torch.load(path)
    ds = D.load_dataset(dataset, "train")
    idx = ds.subset(max(1, train_images // len(ds.classes)), seed)
    x, _ = ds.tensors(idx)
    patch = universal_patch(model, x, target, p, steps=steps, batch=32, alpha=alpha, seed=seed).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # notebooks running side by side may race
    torch.save(patch, tmp)
    tmp.replace(path)
    return patch


def eval_ids(ds: D.ImageSet, per_class: int | None, seed: int = 0) -> list[int]:
    """Return the image indices of a seeded class-balanced subset (every index if per_class is None)."""
    return list(range(len(ds))) if per_class is None else ds.subset(per_class, seed).tolist()


def eval_images(dataset: str, per_class: int | None, seed: int = 0):
    """Return (images, labels, ids) of a class-balanced evaluation subset (the whole split if per_class is None)."""
    ds = D.load_dataset(dataset, "eval")
    ids = eval_ids(ds, per_class, seed)
    x, y = ds.tensors(ids)
    return x, y, ids
