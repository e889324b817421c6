"""Commands ``python -m scalecert certify | bench | audit | data | models | cache | ablation``; their argument errors
are one line (``error: …`` on stderr, exit status 2, :mod:`scalecert.args`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import data as D
from .args import Parser, device_name, int_at_least, overlap_ratio, usage_errors
from .defense import Engine
from .defense import certify as run_certify
from .models import ARCHS, CHECKPOINT_DIR, load_model, resolve_checkpoint, without_sin
from .windows import patch_pixels

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_MODELS = {
    "cifar10": ["cifar10_resnet20_sin1_r20", "cifar10_resnet20_sin1_r10", "cifar10_resnet20_vanilla"],
    "imagenette": ["imagenette_resnet18w16_sin1_r10", "imagenette_resnet18w16_vanilla"],
}


def default_checkpoint(dataset: str) -> str:
    """Return the first shipped checkpoint for a data set, or raise FileNotFoundError."""
    for name in DEFAULT_MODELS.get(dataset, []):
        if (CHECKPOINT_DIR / f"{name}.pt").is_file():
            return name
    raise FileNotFoundError(f"no shipped checkpoint for {dataset} in {CHECKPOINT_DIR}; pass --checkpoint")


def eval_subset(dataset: str, n: int | None, seed: int = 0):
    """Return (images, labels, ids) of a seeded class-balanced subset of about n evaluation images (all if n is 0)."""
    ds = D.load_dataset(dataset, "eval")
    if not n:
        idx = list(range(len(ds)))
    else:
        idx = ds.subset(max(1, n // len(ds.classes)), seed).tolist()
    x, y = ds.tensors(idx)
    return x, y, idx


def dist_setup(device: str) -> tuple[int, int, str]:
    """Initialise torch.distributed when launched by torchrun; return (rank, world size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _common(p: argparse.ArgumentParser):
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--checkpoint", default=None, help="shipped name or .pt path")
    p.add_argument("--patch", type=float, default=None, help="patch size in %% of the image")
    p.add_argument(
        "--images",
        type=int_at_least(0, " (0 = the whole evaluation split)"),
        default=100,
        help="number of evaluation images (class-balanced; 0 = all)",
    )
    p.add_argument("--mode", default="sound", choices=["sound", "paper"])
    p.add_argument("--rule", default="strict", choices=["strict", "paper"])
    p.add_argument("--rate", type=float, default=None, help="SIN rate (default: the checkpoint's)")
    p.add_argument("--layer", type=int, default=None, help="superficial layer (default: the checkpoint's)")
    p.add_argument("--tau", type=overlap_ratio, default=None, help="window merging, in (0, 1] (default and 1: none)")
    p.add_argument("--window-r", dest="r", type=int_at_least(1), default=3, help="r: windows have side p + r - 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")


def _parse_common(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Return the arguments of a command built on ``_common`` after the package's own checks of the data set, the
    patch size (on that data set's images) and the checkpoint; a failure is ``p.error``, before any work starts."""
    a = p.parse_args(argv)
    with usage_errors(p):
        name = D.check_dataset(a.dataset)
        if a.patch is not None:
            patch_pixels(a.patch, D.image_size(name))
        resolve_checkpoint(a.checkpoint or default_checkpoint(name))
    return a


def _model(p: argparse.ArgumentParser, a):
    """Return (data set, model) of parsed arguments; a checkpoint that does not load (altered file, no card) or a SIN
    layer or rate it cannot take is ``p.error``."""
    name = D.check_dataset(a.dataset)
    with usage_errors(p):
        model = load_model(a.checkpoint or default_checkpoint(name), device=a.device)
        if a.layer is not None or a.rate is not None:
            model.set_sin(
                a.layer if a.layer is not None else model.sin_layer, a.rate if a.rate is not None else model.sin_rate
            )
    return name, model


def certify(argv=None) -> int:
    """``python -m scalecert certify``: per-image records, cached per chunk, sharded over torchrun ranks."""
    from . import results as R

    p = Parser(prog="python -m scalecert certify", description=certify.__doc__)
    _common(p)
    p.add_argument("--out", default=None, help="merged CSV (written atomically by rank 0)")
    p.add_argument("--cache-dir", default=str(R.CACHE_DIR))
    p.add_argument("--chunk-images", type=int_at_least(1), default=32, help="images per cached chunk")
    p.add_argument("--fail-after", type=int, default=None, help=argparse.SUPPRESS)  # fault injection (tests)
    a = _parse_common(p, argv)
    rank, world, a.device = dist_setup(a.device)
    name, model = _model(p, a)
    patch = a.patch if a.patch is not None else (2.4 if name == "cifar10" else 2.0)
    x, y, ids = eval_subset(name, a.images, a.seed)
    config = {
        "dataset": name,
        "checkpoint_sha256": model.card["sha256"],
        "patch": patch,
        "mode": a.mode,
        "rule": a.rule,
        "tau": a.tau,
        "r": a.r,
        "layer": model.sin_layer,
        "rate": model.sin_rate,
        "images": a.images,
        "seed": a.seed,
        "ids": R.config_key({"ids": ids}),
        "chunk_images": a.chunk_images,
    }
    if rank == 0:
        run = R.open_run(config, a.cache_dir)
    barrier(world)
    if rank != 0:
        run = R.open_run(config, a.cache_dir)

    def one_chunk(r):
        return run_certify(
            model,
            x[r.start : r.stop],
            y[r.start : r.stop],
            patch,
            batch_size=a.batch_size,
            mode=a.mode,
            rule=a.rule,
            tau=a.tau,
            r=a.r,
            device=a.device,
            ids=ids[r.start : r.stop],
        )

    R.compute(run, len(ids), a.chunk_images, one_chunk, rank, world, fail_after=a.fail_after)
    barrier(world)
    if rank == 0:
        df = R.merge(run, len(ids), a.chunk_images, ids)
        if a.out:
            R.atomic_write_text(Path(a.out), df.to_csv(index=False))
        print(
            json.dumps(
                {
                    "dataset": D.DATASET_LABELS[name],
                    "images": len(df),
                    "patch_pct": patch,
                    "mode": a.mode,
                    "world_size": world,
                    "cache": str(run),
                    "clean": round(100 * df.clean_correct.mean(), 2),
                    "certified": round(100 * df.certified.mean(), 2),
                    "candidates_mean": round(float(df.n_candidates.mean()), 1),
                }
            )
        )
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def plain_forward_seconds(model, x, total: int, batch_sizes=(16, 32, 64, 128, 256)) -> float:
    """Return seconds per image of ``total`` plain forwards at the fastest batch size of a short sweep.

    The limit ScaleCert is measured against is (1 + candidates) plain forwards per image, so the
    reference runs that many forwards for real, in one timed stretch like the certify run (both
    see the same machine load), at the batch size that suits the plain model best.
    """

    def batch(bs):
        return x.repeat((bs + len(x) - 1) // len(x), 1, 1, 1)[:bs]

    sweep = {}
    for bs in batch_sizes:
        xb = batch(bs)
        model(xb)
        t = time.perf_counter()
        model(xb)
        sweep[bs] = (time.perf_counter() - t) / bs
    bs = min(sweep, key=sweep.get)
    xb = batch(bs)
    steps = max(1, round(total / bs))
    t = time.perf_counter()
    for _ in range(steps):
        model(xb)
    return (time.perf_counter() - t) / (steps * bs)


@torch.no_grad()
def bench_one(model, x, patch, tau=None, repeat: int = 3) -> dict:
    """Return timing of certify (all candidates) against plain forwards and Minority Reports on one batch.

    Each of the three is timed ``repeat`` times, interleaved, and its fastest time kept (as timeit does),
    so a burst of other work on the machine does not land on one side of the ratio only.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    eng = Engine(model, x.shape[-1], patch, tau=tau)
    eng.run(x[:1], early_stop=False)  # warm-up
    with without_sin(model):  # Minority Reports: same family and model, no SIN, every window
        mr = Engine(model, x.shape[-1], patch, tau=tau)
        mr.run(x[:1], early_stop=False)  # warm-up
    sc_times, fwd_times, mr_times = [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        recs = eng.run(x, early_stop=False)
        sc_times.append((time.perf_counter() - t) / len(x))
        cand = sum(r["n_candidates"] for r in recs) / len(recs)
        fwd_times.append(plain_forward_seconds(model, x, round((1 + cand) * len(x))))
        with without_sin(model):
            t = time.perf_counter()
            mr.run(x, early_stop=False)
            mr_times.append((time.perf_counter() - t) / len(x))
    sc_time, fwd, mr_time = min(sc_times), min(fwd_times), min(mr_times)
    return {
        "n": x.shape[-1],
        "patch_px": eng.p,
        "windows_total": len(eng.family),
        "candidates_mean": cand,
        "certify_images_per_s": 1 / sc_time,
        "plain_forward_images_per_s": 1 / fwd,
        "efficiency": (1 + cand) * fwd / sc_time,
        "mr_seconds_per_image": mr_time,
        "speedup_vs_mr": mr_time / sc_time,
        "chunk": eng.chunk,
    }


def _vm_kb(field: str) -> int:
    """Return a field of /proc/self/status in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_peak_mb(fn) -> tuple[float, float]:
    """Return (host resident MB before, peak host resident MB during fn()); the kernel's peak is reset first.

    Linux only (/proc/self/clear_refs and VmHWM); raises OSError elsewhere. Device (CUDA) memory is not
    included: see ``memory_probe``.
    """
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _vm_kb("VmRSS")
    fn()
    return before / 1024, _vm_kb("VmHWM") / 1024


def memory_probe(dataset: str, patch: float, tau: float | None, images: int, device: str = "cpu") -> dict:
    """Return windows and the host resident memory (MB) before and at the peak of one certify run, in a fresh
    process; on CUDA also the peak device memory allocated during the run."""
    import subprocess

    code = (
        "import json, torch; from scalecert import cli; "
        f"m = cli.load_model(cli.default_checkpoint({dataset!r}), device={device!r}); "
        f"x, _, _ = cli.eval_subset({dataset!r}, max({images}, 10), 0); x = x[:{images}].to({device!r}); "
        f"e = cli.Engine(m, x.shape[-1], {patch!r}, tau={tau!r}); e.run(x[:1], early_stop=False); "
        "cuda = x.is_cuda; cuda and torch.cuda.reset_peak_memory_stats(); "
        "b, p = cli.run_peak_mb(lambda: e.run(x, early_stop=False)); "
        "r = {'windows': len(e.family), 'chunk': e.chunk, 'rss_before_mb': round(b, 1), "
        "'run_peak_rss_mb': round(p, 1)}; "
        "cuda and r.update(run_peak_cuda_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1)); "
        "print(json.dumps(r))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory probe failed ({dataset}, tau={tau}): {out.stderr.strip().splitlines()[-1:]}")
    return {"dataset": D.DATASET_LABELS[dataset], "tau": tau, **json.loads(out.stdout.strip().splitlines()[-1])}


def bench(argv=None) -> int:
    """``python -m scalecert bench``: certify throughput vs plain forwards and vs Minority Reports."""
    from tqdm.auto import tqdm

    p = Parser(prog="python -m scalecert bench", description=bench.__doc__)
    p.add_argument("--quick", action="store_true", help="a few images per data set")
    p.add_argument("--images", type=int_at_least(0, " (0 = the default: 4 with --quick, else 32)"), default=None)
    p.add_argument(
        "--tau", type=overlap_ratio, default=0.3, help="window merging for the 224 case (paper: 0.3; 1 = none)"
    )
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--memory",
        action="store_true",
        help="also the peak RSS of certify with few and with many windows, each in a fresh process",
    )
    a = p.parse_args(argv)
    cases = (("cifar10", 2.4), ("imagenette", 2.0))
    with usage_errors(p):
        checkpoints = {dataset: default_checkpoint(dataset) for dataset, _ in cases}
    n = a.images or (4 if a.quick else 32)
    rows = []
    for dataset, patch in tqdm(cases, desc="bench (data sets)", file=sys.stderr):
        model = load_model(checkpoints[dataset], device=a.device)
        x, _, _ = eval_subset(dataset, max(n, 10), 0)
        row = bench_one(model, x[:n].to(a.device), patch, tau=a.tau if dataset == "imagenette" and a.tau < 1 else None)
        row.update(dataset=D.DATASET_LABELS[dataset], model=model.card.get("name"))
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}))
    summary = {
        "efficiency": round(min(r["efficiency"] for r in rows), 3),
        "candidates_mean": round(sum(r["candidates_mean"] for r in rows) / len(rows), 1),
        "windows_total": sum(r["windows_total"] for r in rows),
        "speedup_vs_mr": round(min(r["speedup_vs_mr"] for r in rows), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if a.memory:  # memory must stay flat in the number of windows: CIFAR merged (few) vs unmerged (many)
        probes = [memory_probe("cifar10", 2.4, tau, n, a.device) for tau in (0.3, None)]
        for row in probes:
            print(json.dumps(row))
        summary["run_peak_rss_mb_by_windows"] = {str(r["windows"]): r["run_peak_rss_mb"] for r in probes}
    print(json.dumps(summary))
    return 0


def audit_with_progress(engine: Engine, x: torch.Tensor, y: torch.Tensor, desc: str, **kw) -> dict:
    """Return ``audit.audit``'s totals over images x (labels y), one image at a time under one progress bar shown from
    the start (``audit.audit`` certifies all images before its bar appears: minutes of silence on a whole split)."""
    from tqdm.auto import tqdm

    from .audit import audit as run_audit

    total = {"images": 0, "certified": 0, "cases": 0, "flipped": 0, "violations": 0, "examples": []}
    for i in tqdm(range(len(x)), desc=desc, file=sys.stderr):
        res = run_audit(engine, x[i : i + 1].to(engine.device), y[i : i + 1], progress=False, **kw)
        for k in ("images", "certified", "cases", "flipped", "violations"):
            total[k] += res[k]
        total["examples"] += [dict(e, image=i) for e in res["examples"]]
    return total


def audit(argv=None) -> int:
    """``python -m scalecert audit``: soundness audit of both modes; ends with one line of JSON."""
    p = Parser(prog="python -m scalecert audit", description=audit.__doc__)
    _common(p)
    p.add_argument("--quick", action="store_true", help="10 images, attack of 3 steps at <= 5 positions per axis")
    p.add_argument(
        "--stride",
        type=int_at_least(1),
        default=None,
        help="patch position stride (default 1 = every position; --quick: at most 32 positions per axis)",
    )
    a = _parse_common(p, argv)
    name, model = _model(p, a)
    patch = a.patch if a.patch is not None else (2.4 if name == "cifar10" else 2.0)
    n = 10 if a.quick else a.images
    x, y, _ = eval_subset(name, n, a.seed)
    span = x.shape[-1] - patch_pixels(patch, x.shape[-1]) + 1  # patch positions per axis
    if a.stride is None:
        a.stride = math.ceil(span / 32) if a.quick else 1
    attack_stride = math.ceil(span / 4) if a.quick else a.stride
    out = {}
    for mode in ("sound", "paper"):
        eng = Engine(model, x.shape[-1], patch, r=a.r, tau=a.tau, mode=mode, device=a.device)
        res = audit_with_progress(
            eng,
            x,
            y,
            f"audit {mode} (images)",
            stride=a.stride,
            attack_steps=3 if a.quick else 10,
            attack_stride=attack_stride,
        )
        print(json.dumps({"mode": mode, "stride": a.stride, "attack_stride": attack_stride, **res}), file=sys.stderr)
        out[mode] = res
    print(
        json.dumps(
            {
                "mode_sound_violations": out["sound"]["violations"],
                "mode_paper_violations": out["paper"]["violations"],
                "cases": out["sound"]["cases"] + out["paper"]["cases"],
            }
        )
    )
    return 0


#: issue 4's accuracy targets on the whole test/val split: vanilla models' top-1 ...
VANILLA_TARGET = {"cifar10": 90.0, "imagenette": 80.0}
#: ... and SIN-finetuned models within this many points of their data set's vanilla model, SIN layer active
SIN_TARGET_GAP = 3.0


def accuracy_target(card: dict, vanilla: dict | None) -> float | None:
    """Return the accuracy (%) issue 4 asks of a ScaleCert model's card (None for peers, the ablation twins, or a SIN
    model without vanilla)."""
    key = card.get("dataset_key")
    if card.get("arch") not in ARCHS or key not in VANILLA_TARGET:  # peers have architectures of their own
        return None
    if card.get("twin"):  # an ablation twin (issue #35) trains like its SIN twin; issue 4 sets it no target
        return None
    if not card.get("sin_rate"):
        return VANILLA_TARGET[key]
    return None if vanilla is None else round(vanilla["accuracy_without_sin"] - SIN_TARGET_GAP, 2)


def models_table(checkpoint_dir: Path = CHECKPOINT_DIR) -> pd.DataFrame:
    """Return one row per shipped checkpoint card: name, status, data set, arch, SIN, accuracy, issue 4's target
    and whether it is reached, epochs, hours, and its ablation twin (12's SIN model and the model trained the same way
    without SIN name each other, and the twin's row follows its SIN model's)."""
    import pandas as pd

    rows = []
    cards = [json.loads(p.read_text()) | {"_stem": p.stem} for p in sorted(Path(checkpoint_dir).glob("*.json"))]
    vanilla = {
        c.get("dataset_key"): c
        for c in cards
        if c.get("arch") in ARCHS and not c.get("sin_rate") and c["_stem"].endswith("_vanilla")
    }
    for c in cards:
        sin = f"layer {c['sin_layer']} at {round(100 * c['sin_rate'])}%" if c.get("sin_rate") else "none"
        # ScaleCert models: with the SIN layer active if they have one; peers: their clean (or DS base) accuracy
        plain = [c.get(k) for k in ("accuracy_without_sin", "clean_accuracy", "base_accuracy", "accuracy")]
        acc = c.get("accuracy_with_sin") if c.get("sin_rate") else next((a for a in plain if a is not None), None)
        target = accuracy_target(c, vanilla.get(c.get("dataset_key")))
        rows.append(
            {
                "checkpoint": c.get("name", c["_stem"]),
                "status": str(c.get("status", "?")).split(":")[0],
                "dataset": c.get("dataset", "?"),
                "arch": c.get("arch", "?"),
                "SIN": sin,
                "accuracy_%": None if acc is None else round(float(acc), 2),
                "target_%": "" if target is None else target,
                "reached": "" if target is None or acc is None else "yes" if acc >= target else "no",
                "epochs": f"{c.get('epochs_done', '?')}/{c.get('epochs', '?')}",
                "train_hours": round(c["train_seconds"] / 3600, 1) if c.get("train_seconds") else None,
                "twin": c.get("twin") or "",
            }
        )
    sin_of = {r["checkpoint"]: r["twin"] for r in rows if r["twin"]}  # ablation twin -> its SIN model
    ablation_of = {v: k for k, v in sin_of.items()}
    for r in rows:
        r["twin"] = r["twin"] or ablation_of.get(r["checkpoint"], "")
    rows.sort(key=lambda r: (sin_of.get(r["checkpoint"], r["checkpoint"]), r["checkpoint"] in sin_of))
    return pd.DataFrame(rows)


def data(argv=None) -> int:
    """``python -m scalecert data [NAME ...] [--decode]``: ``scalecert.data``'s step (extract or fetch, and decode),
    the data set names checked first."""
    p = Parser(prog="python -m scalecert data", description=data.__doc__)
    p.add_argument("datasets", nargs="*", help="data sets (default: cifar10 imagenette)")
    p.add_argument("--decode", action="store_true", help="also decode to the uint8 cache")
    a = p.parse_args(argv)
    with usage_errors(p):
        for name in a.datasets:
            D.check_dataset(name)
    return D.main(a.datasets + ["--decode"] * a.decode)


def models(argv=None) -> int:
    """``python -m scalecert models``: a Markdown table of the shipped checkpoints, read from their cards."""
    p = Parser(prog="python -m scalecert models", description=models.__doc__)
    p.add_argument("--dir", default=str(CHECKPOINT_DIR), help="checkpoint folder")
    a = p.parse_args(argv)
    table = models_table(Path(a.dir))
    print(table.to_markdown(index=False) if len(table) else f"no checkpoint cards in {a.dir}")
    return 0


def cache(argv=None) -> int:
    """``python -m scalecert cache``: progress of every cached run (chunks and images done, seconds, ETA); last line
    is JSON."""
    import pandas as pd

    from . import results as R

    p = Parser(prog="python -m scalecert cache", description=cache.__doc__)
    p.add_argument("--dir", default=str(R.CACHE_DIR), help="cache folder")
    p.add_argument(
        "--unfinished",
        action="store_true",
        help="only runs with chunks left (runs cached before sizes were recorded have no total and are left out)",
    )
    p.add_argument(
        "--whole-splits",
        action="store_true",
        help="instead: the certification runs complete on a whole test/val split, with the paper's numbers",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="instead: the whole-split counterpart of every certification run cached on a subset, with the "
        "CPU-hours left at the measured seconds per image (the paper profile's certification, priced)",
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="instead: turn every complete run into one records.parquet (its chunk and timing files "
        "removed; partial runs and runs being computed are left alone) and write INDEX.csv",
    )
    a = p.parse_args(argv)
    if a.compact:
        done = R.compact_all(Path(a.dir))
        for row in done[done.outcome == "refused"].itertuples():
            print(f"{row.key}: refused: {row.detail}")
        print(
            json.dumps(
                {
                    "runs": len(done),
                    **{
                        k: int((done.outcome == k).sum())
                        for k in ("compacted", "already", "partial", "busy", "refused")
                    },
                }
            )
        )
        return 0
    if a.plan:
        from . import paperprofile as PP

        plan = PP.paper_plan(Path(a.dir))
        with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_rows", None):
            print(plan.drop(columns=["key"]).to_string(index=False) if len(plan) else f"no subset runs in {a.dir}")
            if len(plan):
                print(
                    plan.groupby(["dataset", "status"])
                    .agg(configurations=("key", "size"), cpu_hours_left=("cpu_hours_left", "sum"))
                    .round(2)
                )
        print(
            json.dumps(
                {
                    "configurations": len(plan),
                    "left": int((plan.status != "done").sum()) if len(plan) else 0,
                    "cpu_hours_left": round(float(plan.cpu_hours_left.sum()), 2) if len(plan) else 0.0,
                }
            )
        )
        return 0
    if a.whole_splits:
        from . import paperprofile as PP

        whole = PP.whole_split_results(Path(a.dir))
        print(whole.to_markdown(index=False) if len(whole) else f"no whole-split certification runs in {a.dir}")
        return 0
    table = R.status(Path(a.dir))
    if a.unfinished:
        left = table.chunks.notna() & (table.chunks_done < table.chunks) if "chunks" in table else None
        table = table[left] if left is not None else table.iloc[:0]
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(
            table.to_string(index=False)
            if len(table)
            else f"no {'unfinished ' if a.unfinished else ''}cached runs in {a.dir}"
        )
    known = table.dropna(subset=["eta_hours"]) if "eta_hours" in table else table.iloc[:0]
    print(
        json.dumps(
            {
                "runs": len(table),
                "eta_hours": round(float(known.eta_hours.sum()), 2) if len(known) else 0.0,
                "eta_unknown": len(table) - len(known),
            }
        )
    )  # no size recorded, or no chunk timed yet
    return 0


def ablation(argv=None) -> int:
    """``python -m scalecert ablation``: notebook 12's whole-split runs of a data set (ScaleCert on its SIN model and
    MR on the occlusion-trained twin, every family and patch size; PatchCleanser's with pc_occl, pc_vanilla), priced
    and run cheapest pair first; last line is JSON."""
    import pandas as pd

    from . import ablation as A

    names = {
        "sc": A.SC,
        "mr_occl": A.MR_OCCL,
        "mr_vanilla": A.MR_VANILLA,
        "paper": A.SC_PAPER,
        "pc_occl": A.PC_OCCL,
        "pc_vanilla": A.PC_VANILLA,
    }
    p = Parser(prog="python -m scalecert ablation", description=ablation.__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--patch", type=float, action="append", help="patch size in %% (repeat; default: 12's sizes)")
    p.add_argument(
        "--defences",
        default="sc,mr_occl",
        help=f"comma-separated, of {','.join(names)} (default: the verdict's pair sc,mr_occl)",
    )
    p.add_argument("--plan", action="store_true", help="only print the plan (status, CPU-hours left); run nothing")
    p.add_argument("--max-hours", type=float, default=None, help="stop before a run that would pass this many CPU-h")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    with usage_errors(p):
        name = D.check_dataset(a.dataset)
        for pct in a.patch or ():
            patch_pixels(pct, D.image_size(name))
        unknown = [d for d in a.defences.split(",") if d not in names]
        if unknown:
            raise ValueError(f"unknown defence(s) {','.join(unknown)}: expected some of {','.join(names)}")
    defences = tuple(names[d] for d in a.defences.split(","))
    if a.plan:
        plan = A.whole_split_jobs(name, a.patch, defences=defences, seed=a.seed)
    else:
        plan = A.run_whole_split(
            name,
            a.patch,
            defences=defences,
            max_hours=a.max_hours,
            seed=a.seed,
            device=a.device,
            log=lambda m: print(f"{time.strftime('%FT%TZ', time.gmtime())} {m}", flush=True),
        )
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(
            plan.drop(columns=["key", "options"]).to_string(index=False) if len(plan) else "no runs (models missing?)"
        )
    print(
        json.dumps(
            {
                "runs": len(plan),
                "left": int((plan.status != "done").sum()),
                "cpu_hours_left": round(float(plan.cpu_hours_left.sum()), 2),
                "unpriced": int(plan.cpu_hours_left.isna().sum()),
            }
        )
    )
    return 0
