"""The paper profile's bookkeeping, read from the cache: every certification run complete on a whole test/val split
(``whole_split_results``), the plan of the runs left with their CPU-hours (``paper_plan``, ``cache --plan``) and the
cards' accuracy checked against the records (``card_accuracy_check``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from . import data as D
from . import results as R
from .experiments import (
    ARCH,
    DEFAULT_RATE,
    DEFAULT_TAU,
    LARGE_PATCHES,
    _peer_label,
    model_name,
    occlusion_model_name,
    patchcleanser_runs,
)
from .paper import PAPER_DATASET, paper_table
from .paths import CHECKPOINT_DIR


def _checkpoint_names() -> dict:
    """Return {sha256: checkpoint name} of every shipped checkpoint card."""
    return R.checkpoint_names(CHECKPOINT_DIR)


def _settings_05(config: dict, early_stop: bool = True) -> bool:
    """Return True iff a ScaleCert or MR run has 05's τ and r on the sliding-window family (not 12's mask set; and, with
    ``early_stop``, 05's early stopping: off only for the paper's rule; 07 times runs with it off, which changes the
    time but not a single record's outcome)."""
    dataset = config["dataset"]
    return (
        config.get("tau") == DEFAULT_TAU[dataset]
        and config.get("r") == 3
        and config.get("masks") is None
        and (not early_stop or config.get("early_stop") == (config.get("rule") == "strict"))
    )


def _is_05(dataset: str, config: dict, model: str, defense: str, early_stop: bool = True) -> bool:
    """Return True iff a certification run is one of 05's rows: a peer on its own model (PatchCleanser: on either model
    of ``patchcleanser_runs``), or ScaleCert on the default SIN model or MR on the vanilla one, at 05's settings
    (``_settings_05``)."""
    if "peer" in config:
        from .baselines import harness as H

        if config["peer"] == "PatchCleanser":
            return model in {ck for _, ck in patchcleanser_runs(dataset)}
        return model == H.peer(config["peer"]).checkpoint(dataset)
    want = model_name(dataset) if defense == "MR" else model_name(dataset, 1, DEFAULT_RATE[dataset])
    return model == want and _settings_05(config, early_stop)


def _paper_number(dataset: str, config: dict, model: str, defense: str) -> dict:
    """Return the paper's clean and certified accuracy of a whole-split row and the table they are from ({} if none):
    Table 2 or 5 for 05's configurations, Table 3/6 for 06's other top-k rates (layer 1, sound mode, 05's settings);
    none for the peers the paper does not report (``harness.EXTRA_PEER_NAMES``: PatchCleanser)."""
    from .baselines import harness as H

    if config.get("peer") in H.EXTRA_PEER_NAMES:
        return {}
    pd_name, patch = PAPER_DATASET[dataset], float(config["patch"])
    layer1_rate = {model_name(dataset, 1, r): r for r in (10, 15, 20)}
    if _is_05(dataset, config, model, defense, early_stop=False):
        t = paper_table("table2_certified")
        hit = t[(t.dataset == pd_name) & (t.patch_pct == patch) & (t.defense == defense.replace(" (paper mode)", ""))]
        table = "5" if patch in LARGE_PATCHES[dataset] else "2"
    elif model in layer1_rate and defense == "ScaleCert" and config.get("rule") == "strict" and _settings_05(config):
        t = paper_table("table3_6_topk_rate")
        hit = t[(t.dataset == pd_name) & (t.patch_pct == patch) & (t.topk_rate_pct == layer1_rate[model])]
        table = "3/6"
    else:
        return {}
    if hit.empty:
        return {}
    return {
        "paper_clean": float(hit.clean.iloc[0]),
        "paper_certified": float(hit.certified.iloc[0]),
        "paper_table": table,
    }


def _certification_runs(cache_dir: Path | None = None, datasets=None):
    """Yield (run folder, config, model name, defence, split size, whole-split ids key) of every cached certification
    run (ScaleCert, MR or a peer) made with a shipped checkpoint and, for a peer, the current certificate version."""
    from .baselines import harness as H

    names, whole = _checkpoint_names(), {}
    for meta in sorted(Path(cache_dir or R.CACHE_DIR).glob("*/config.json")):
        run, config = meta.parent, json.loads(meta.read_text())
        dataset = config.get("dataset")
        if "kind" in config or dataset not in D.EVAL_SPLIT or R.run_size(run) is None:
            continue  # an analysis or attack run, not a certificate
        if datasets is not None and dataset not in datasets:
            continue
        model = names.get(config.get("checkpoint_sha256"))
        if model is None:
            continue  # made with a checkpoint that is no longer shipped
        if "peer" in config:
            if (
                config["peer"] not in H.PEER_NAMES + H.EXTRA_PEER_NAMES
                or config.get("version") != H.peer(config["peer"]).version
            ):
                continue  # a certificate of an older version of the peer: not what the harness computes now
            defense = _peer_label(config["peer"], dataset, model)
        elif "mode" in config:
            defense = (
                "MR"
                if config["rate"] is None
                else ("ScaleCert (paper mode)" if config["mode"] == "paper" else "ScaleCert")
            )
        else:
            continue
        if dataset not in whole:
            n = len(D.load_dataset(dataset, "eval"))
            whole[dataset] = (n, R.config_key({"ids": list(range(n))}))
        yield run, config, model, defense, *whole[dataset]


def whole_split_results(cache_dir: Path | None = None, datasets=None) -> pd.DataFrame:
    """Return one row per certification run (ScaleCert, MR or a peer) complete on a whole test/val split in the cache:
    model, defence (PatchCleanser labelled by its model, ``patchcleanser_runs``), guarantee (detection or recovery),
    patch, whether it is one of 05's rows, images, clean and certified accuracy (%), worker-hours (the
    chunks' wall times summed), and the paper's number
    where it has one (Tables 2 and 5 for 05's rows, 3 and 6 for the other top-k rates; PatchCleanser has none: the paper
    does not report it); ``datasets``: only those."""
    from .baselines import harness as H

    rows = []
    for run, config, model, defense, n, ids in _certification_runs(cache_dir, datasets):
        dataset = config["dataset"]
        size = R.run_size(run)
        if (size["images"], config["ids"]) != (n, ids):
            continue
        try:
            df = R.merge(run, size["images"], size["chunk_images"])
        except R.CacheMismatch:
            continue  # chunks still missing: in progress
        in_05 = _is_05(dataset, config, model, defense)
        row = {
            "dataset": D.DATASET_LABELS[dataset],
            "model": model,
            "defense": defense,
            "guarantee": H.peer(config["peer"]).kind if "peer" in config else "detection",
            "patch_pct": float(config["patch"]),
            "tau": config.get("tau"),
            "in_05": in_05,
            "images": len(df),
            "clean": round(100 * df.clean_correct.mean(), 1),
            "certified": round(100 * df.certified.mean(), 1),
            # the chunks' wall times summed over the workers (one torch thread each): core-hours when nothing else ran
            "worker_hours": round(float(R.timings(run).seconds.sum()) / 3600, 2),
            "key": run.name,
        }
        rows.append({**row, **_paper_number(dataset, config, model, defense)})
    cols = [
        "dataset",
        "model",
        "defense",
        "guarantee",
        "patch_pct",
        "tau",
        "in_05",
        "images",
        "clean",
        "certified",
        "paper_clean",
        "paper_certified",
        "paper_table",
        "worker_hours",
        "key",
    ]
    out = pd.DataFrame(rows, columns=cols).astype({"in_05": bool})  # so that out[out.in_05] selects rows when empty
    return out.sort_values(["dataset", "defense", "model", "patch_pct"], ignore_index=True)


#: a top-1 minus top-2 logit margin below this is a tie that float rounding (batching, threads) may break either way
TIE_MARGIN = 1e-4


def card_accuracy_check(cache_dir: Path | None = None) -> pd.DataFrame:
    """Return one row per shipped checkpoint, SIN setting (on / off) and source with whole-split records in the cache
    (a ScaleCert or MR run's unoccluded predictions, or 01's ``predictions_cached``): the images its card says it
    classifies correctly so and those the records say, and (01's records only) how many images have a top-2 logit
    margin below ``TIE_MARGIN``: a measurement with other batches or threads may break those ties the other way."""
    cards = {c.stem: json.loads(c.read_text()) for c in CHECKPOINT_DIR.glob("*.json")}
    rows = {}
    for run, config, model, defense, n, ids in _certification_runs(cache_dir):
        size, card, with_sin = R.run_size(run), cards[model], config.get("rate") is not None
        if (
            (model, with_sin, "certification") in rows
            or "peer" in config
            or (size["images"], config["ids"]) != (n, ids)
        ):
            continue
        if (
            card.get("eval_images") != n
            or with_sin
            and (config.get("layer"), config["rate"]) != (card.get("sin_layer"), card.get("sin_rate"))
        ):
            continue  # another split, or the checkpoint run with SIN settings other than its own (certify --rate)
        try:
            df = R.merge(run, n, size["chunk_images"])
        except R.CacheMismatch:
            continue  # in progress
        acc = card["accuracy_with_sin"] if with_sin else card["accuracy_without_sin"]
        rows[model, with_sin, "certification"] = {
            "model": model,
            "sin": with_sin,
            "source": "certification",
            "images": n,
            "card_correct": round(acc * n / 100),
            "records_correct": int((df.pred == df.label).sum()),
            "key": run.name,
        }
    names = _checkpoint_names()
    for meta in sorted(Path(cache_dir or R.CACHE_DIR).glob("*/config.json")):  # 01's predictions, every model
        run, config = meta.parent, json.loads(meta.read_text())
        model = names.get(config.get("checkpoint_sha256"))
        size = R.run_size(run)
        if config.get("kind") != "predictions" or model not in cards or size is None:
            continue
        card = cards[model]
        n = size["images"]
        if card.get("eval_images") != n or config["ids"] != R.config_key({"ids": list(range(n))}):
            continue
        try:
            df = R.merge(run, n, size["chunk_images"])
        except R.CacheMismatch:
            continue  # in progress
        for with_sin, col in ((False, "pred_without_sin"), (True, "pred_with_sin")):
            acc = card.get("accuracy_with_sin" if with_sin else "accuracy_without_sin")
            if acc is None or with_sin and (df[col] < 0).all():
                continue
            margin = df["margin_with_sin" if with_sin else "margin_without_sin"]
            rows[model, with_sin, "predictions"] = {
                "model": model,
                "sin": with_sin,
                "source": "predictions",
                "images": n,
                "card_correct": round(acc * n / 100),
                "records_correct": int((df[col] == df.label).sum()),
                "near_ties": int((margin < TIE_MARGIN).sum()),
                "key": run.name,
            }
    out = pd.DataFrame(
        list(rows.values()),
        columns=["model", "sin", "source", "images", "card_correct", "records_correct", "near_ties", "key"],
    )
    out["near_ties"] = out.near_ties.fillna(0).astype(int)  # certification records keep no logits
    return out.sort_values(["model", "sin", "source"], ignore_index=True)


def study_models(dataset: str) -> set[str]:
    """Return the checkpoint names the notebooks use on a data set: vanilla, SIN layers 1-3 and rates 10/15/20%,
    the occlusion-trained twin, peers."""
    from .baselines import harness as H

    ours = {model_name(dataset)} | {model_name(dataset, layer, rate) for layer in (1, 2, 3) for rate in (10, 15, 20)}
    ours |= {occlusion_model_name(dataset)}
    return ours | {H.peer(p).checkpoint(dataset) for p in H.PEER_NAMES + H.EXTRA_PEER_NAMES} - {None}


def _add_paper_only_rs(plan: dict, quick_rs: set, extra_rs: set) -> None:
    """Add to a paper plan (keyed by configuration key) the rows of the r values only the paper profile sweeps, for
    every sweep whose quick r values are all in the plan, priced at the slowest of them."""
    sweeps = {}
    for row in plan.values():
        if row["_config"].get("r") in quick_rs and "peer" not in row["_config"]:
            rest = json.dumps({k: v for k, v in row["_config"].items() if k != "r"}, sort_keys=True, default=str)
            sweeps.setdefault(rest, []).append(row)
    for rows in sweeps.values():
        if {row["_config"]["r"] for row in rows} != quick_rs:
            continue  # not a sweep over r (05-08 certify with r = 3 only)
        for r in extra_rs:
            config = {**rows[0]["_config"], "r": r}
            key = R.config_key(config)
            plan.setdefault(
                key,
                {
                    **rows[0],
                    "key": key,
                    "r": r,
                    "_config": config,
                    "_subset_per_image": max(row["_subset_per_image"] for row in rows),
                },
            )


def paper_plan(cache_dir: Path | None = None) -> pd.DataFrame:
    """Return one row per whole-split counterpart of every certification run cached on a subset (the quick profile's):
    its settings, status (done, partial, missing), images left and the CPU-hours they need at the measured seconds per
    image (of the partial run itself, else the fastest of its subset runs). A peer's shared work (DS's votes, BagNet's
    local logits), which one process computes once for every configuration and patch, is counted once per data set
    and model: in its configuration with the most images left, the others marked ``shared``. The window parameters r
    that only the paper profile sweeps (``notebook.WINDOW_RS``; 11's r = 2) have no subset run: they are priced at the
    slower of the quick profile's r values of the same sweep. Models the notebooks do not use (see ``study_models``)
    are left out; subset runs of settings the notebooks no longer use are not."""
    from .baselines import harness as H
    from .notebook import WINDOW_RS

    cache = Path(cache_dir or R.CACHE_DIR)
    status = R.status(cache).set_index("key")
    plan, ours = {}, {name: study_models(name) for name in ARCH}  # the data sets with shipped models
    for run, config, model, defense, n, ids in _certification_runs(cache):
        t = R.timings(run)
        if config["ids"] == ids or not len(t) or model not in ours.get(config["dataset"], ()):
            continue
        target = R.config_key({**config, "ids": ids})
        per_image = float(t.seconds.sum() / t.images.sum())
        if target in plan:
            plan[target]["_subset_per_image"] = min(plan[target]["_subset_per_image"], per_image)
            continue
        plan[target] = {
            "key": target,
            **{k: config[k] for k in R.STATUS_FIELDS if k in config},
            "model": model,
            "defense": defense,
            "r": config.get("r"),
            "early_stop": config.get("early_stop"),
            "images": n,
            "_subset_per_image": per_image,
            "_shared": (config["dataset"], model) if "peer" in config and H.peer(config["peer"]).shared else None,
            "_config": {**config, "ids": ids},
        }
    _add_paper_only_rs(plan, set(WINDOW_RS["quick"]), set(WINDOW_RS["paper"]) - set(WINDOW_RS["quick"]))
    rows = []
    for row in sorted(plan.values(), key=lambda r: r["key"]):
        key, n = row["key"], row["images"]
        done = int(status.loc[key, "images_done"]) if key in status.index and pd.notna(status.loc[key, "images"]) else 0
        own = R.timings(cache / key) if done else None
        per_image = own.seconds.sum() / own.images.sum() if done and len(own) else row["_subset_per_image"]
        row.update(
            status="done" if done >= n else ("partial" if done else "missing"),
            images_left=n - done,
            cpu_hours_left=round((n - done) * per_image / 3600, 2),
        )
        rows.append(row)
    # the shared work of a group is redone for the images its member with the most left still needs (a new process
    # has none of it); the other members' own part (certifying from the votes or logits) is small and not priced
    charged = {}
    for row in rows:
        g = row["_shared"]
        if (
            g is not None
            and row["images_left"] > 0
            and (g not in charged or row["images_left"] > charged[g]["images_left"])
        ):
            charged[g] = row
    for row in rows:
        row["shared"] = row["_shared"] is not None and row["images_left"] > 0 and charged[row["_shared"]] is not row
        if row["shared"]:
            row["cpu_hours_left"] = 0.0
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
    return pd.DataFrame(rows)
