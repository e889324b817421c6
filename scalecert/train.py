"""Training from scratch and SIN fine-tuning with occluded windows; resumable, logged per epoch.

Fine-tuning follows the paper (winner-take-all SIN layer active, random occluding windows) and
matches what the sound engine evaluates: an occluded window removes its *footprint* from the
SIN ranking (the re-ranked top-k then fills in), so the model is trained on exactly the
occluded predictions ``certify`` will ask of it. An optional consistency term pulls the
occluded prediction towards the clean one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .args import Parser, device_name, int_at_least, overlap_ratio, usage_errors
from .geometry import footprint, rect_masks
from .models import (
    CHECKPOINT_DIR,
    MEASURED_ON,
    build,
    load_model,
    resolve_checkpoint,
    round_to_storage,
    save_checkpoint,
    without_sin,
    write_card,
)
from .paths import RUNS_DIR
from .runstate import Interrupted, ResumableRun
from .windows import patch_pixels, window_side

OCCLUSIONS = ("footprint", "pixels")
#: Pixel occlusion fills a window with the value Minority Reports' certification fills it with (Engine.fill).
PIXEL_FILL = 0.0


def random_window_boxes(n: int, sizes: list[int], b: int, gen: torch.Generator) -> torch.Tensor:
    """Return (b, 4) inclusive pixel boxes of one random square window per image, sides drawn from sizes."""
    side = torch.tensor(sizes)[torch.randint(0, len(sizes), (b,), generator=gen)]
    r0 = (torch.rand(b, generator=gen) * (n - side + 1)).long()
    c0 = (torch.rand(b, generator=gen) * (n - side + 1)).long()
    return torch.stack([r0, c0, r0 + side - 1, c0 + side - 1], 1)


def footprint_masks(model, n: int, boxes: torch.Tensor) -> torch.Tensor:
    """Return footprint masks (b, h*w): the superficial features whose receptive field meets each box."""
    _, h, w = model.feature_shape(n)
    return rect_masks(footprint(model.geometry(), boxes, h, w), h, w).flatten(1)


def random_window_exclude(model, n: int, sizes: list[int], b: int, gen: torch.Generator) -> torch.Tensor:
    """Return footprint masks (b, h*w) of one random square window per image, sides drawn from sizes."""
    return footprint_masks(model, n, random_window_boxes(n, sizes, b, gen))


def occlude(model, x: torch.Tensor, boxes: torch.Tensor, occlusion: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (images, footprint exclusion or None) of a batch with each image's box occluded.

    ``footprint``: the images unchanged and the box's footprint removed from the SIN ranking (what the sound
    engine certifies with); ``pixels``: the box's pixels filled and no exclusion (what Minority Reports
    certifies with)."""
    if occlusion == "footprint":
        return x, footprint_masks(model, x.shape[-1], boxes).to(x.device)
    if occlusion == "pixels":
        m = rect_masks(boxes.to(x.device), x.shape[-2], x.shape[-1]).unsqueeze(1)
        return x.masked_fill(m, PIXEL_FILL), None
    raise ValueError(f"unknown occlusion {occlusion!r}: expected one of {OCCLUSIONS}")


@torch.no_grad()
def worst_window_boxes(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    sizes: list[int],
    k: int,
    gen: torch.Generator,
    occlusion: str = "footprint",
) -> torch.Tensor:
    """Return (b, 4) boxes: per image, of k random windows the one whose occlusion costs the most loss.

    Certification needs every candidate window's occluded prediction right, so training on the worst of a
    few draws aims at that worst case (k = 1: one random window, as in the paper). The choice is made with
    the model in eval mode, so it does not touch the BatchNorm statistics."""
    b, n = len(y), x.shape[-1]
    draws = torch.stack([random_window_boxes(n, sizes, b, gen) for _ in range(k)])  # (k, b, 4)
    if k == 1:
        return draws[0]
    was = model.training
    model.eval()
    try:
        xo, excl = occlude(model, x.repeat(k, 1, 1, 1), draws.flatten(0, 1), occlusion)
        out = model(xo, excl) if excl is not None else model(xo)
        loss = F.cross_entropy(out, y.repeat(k), reduction="none").view(k, b)
    finally:
        model.train(was)
    return draws[loss.argmax(0).cpu(), torch.arange(b)]


def worst_window_exclude(
    model, x: torch.Tensor, y: torch.Tensor, sizes: list[int], k: int, gen: torch.Generator
) -> torch.Tensor:
    """Return footprint masks (b, h*w) of the worst of k random windows per image (``worst_window_boxes``)."""
    return footprint_masks(model, x.shape[-1], worst_window_boxes(model, x, y, sizes, k, gen))


@torch.no_grad()
def evaluate(model, ds: D.ImageSet, idx=None, batch: int = 500, device="cpu", sin: bool = True) -> float:
    """Return top-1 accuracy (%) of the model on a split (or a subset), with or without its SIN layer."""
    model.eval()
    idx = np.arange(len(ds)) if idx is None else np.asarray(idx)
    correct = 0
    with without_sin(model) if not sin else contextlib.nullcontext():
        for s in range(0, len(idx), batch):
            x, y = ds.tensors(idx[s : s + batch])
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    return 100.0 * correct / max(1, len(idx))


@torch.no_grad()
def recalibrate_bn(model, ds: D.ImageSet, images: int, batch: int = 128, seed: int = 0, device="cpu") -> int:
    """Re-estimate every BatchNorm's running statistics as the plain average over a seeded sample of training
    images (SIN layer active, no augmentation or occlusion, i.e. as evaluated); return how many images were used.

    The result depends only on the weights and the images, not on the statistics the model had before."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:images])
    model.train()
    try:
        for s in range(0, len(idx), batch):
            x, _ = ds.tensors(idx[s : s + batch])
            model(x.to(device))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return len(idx)


def recalibrate_main(argv=None) -> int:
    """``python -m scalecert recalibrate NAME``: re-estimate a shipped checkpoint's BatchNorm statistics, re-measure
    its accuracy on the whole evaluation split and rewrite checkpoint and card (the card keeps the numbers before)."""
    p = Parser(prog="python -m scalecert recalibrate", description=recalibrate_main.__doc__)
    p.add_argument("name", help="checkpoint name (data/checkpoints/NAME.pt) or path")
    p.add_argument("--images", type=int_at_least(1), default=10000, help="training images averaged over")
    p.add_argument("--batch-size", type=int_at_least(1), default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(0), default=0)
    p.add_argument("--device", type=device_name, default="cpu")
    a = p.parse_args(argv)
    with usage_errors(p):
        path = resolve_checkpoint(a.name)
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(path, device=a.device)
    card = dict(model.card)
    settings = {"images": a.images, "batch_size": a.batch_size, "seed": a.seed}
    done = card.get("bn_recalibration")
    if done and {k: done.get(k) for k in settings} == settings:
        print(f"{card['name']} is already recalibrated with {settings}; nothing to do", file=sys.stderr)
        return 0
    name = card["dataset_key"]
    train_ds, test_ds = D.load_dataset(name, "train"), D.load_dataset(name, "eval")
    t = time.perf_counter()
    used = recalibrate_bn(model, train_ds, a.images, a.batch_size, a.seed, a.device)
    before = {k: card.get(k) for k in ("accuracy_with_sin", "accuracy_without_sin", "sha256")}
    round_to_storage(model)
    card["accuracy_with_sin"] = evaluate(model, test_ds, device=a.device) if model.sin is not None else None
    card["accuracy_without_sin"] = evaluate(model, test_ds, device=a.device, sin=False)
    card["accuracy_measured_on"] = MEASURED_ON
    card["bn_recalibration"] = {
        **settings,
        "images_used": used,
        "before": before,
        "seconds": round(time.perf_counter() - t, 1),
        "command": "python -m scalecert recalibrate " + shlex.join(list(argv or sys.argv[1:])),
    }
    card = save_checkpoint(model, path, card)
    print(json.dumps({k: card[k] for k in ("name", "accuracy_with_sin", "accuracy_without_sin")} | {"before": before}))
    return 0


def remeasure(name_or_path, device="cpu", force: bool = False) -> dict | None:
    """Return a ScaleCert checkpoint's card after re-measuring its whole-split accuracies (with and without its SIN
    layer) on the stored weights and rewriting the card, the numbers before kept; None if already measured so."""
    path = resolve_checkpoint(name_or_path)
    card = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
    if "accuracy_without_sin" not in card or "dataset_key" not in card:
        raise ValueError(
            f"{path.stem}: not a ScaleCert checkpoint card (no dataset_key / accuracy_without_sin); "
            "remeasure handles the vanilla and SIN models, not the peers' (BagNet, DS, IBP)"
        )
    if card.get("accuracy_measured_on") == MEASURED_ON and not force:
        return None
    model = load_model(path, device=device)
    card = dict(model.card)
    test_ds = D.load_dataset(card["dataset_key"], "eval")
    if card.get("eval_images") not in (None, len(test_ds)):
        raise ValueError(
            f"{path.stem}: its card counts {card['eval_images']} evaluation images, the split today "
            f"{len(test_ds)}; nothing rewritten"
        )
    keys = ("accuracy_with_sin", "accuracy_without_sin")
    before = {k: card.get(k) for k in keys}
    card["accuracy_with_sin"] = evaluate(model, test_ds, device=device) if model.sin is not None else None
    card["accuracy_without_sin"] = evaluate(model, test_ds, device=device, sin=False)
    if card.get("accuracy_measured_on") != MEASURED_ON:
        card["accuracy_before_remeasure"] = dict(
            before,
            measured_on="the fp32 weights before their fp16 storage",
            note="numbers quoted in the card's notes before the re-measurement",
        )
    card["accuracy_measured_on"] = MEASURED_ON
    return write_card(path, card)


def remeasure_main(argv=None) -> int:
    """``python -m scalecert remeasure NAME...``: re-measure shipped ScaleCert checkpoints' accuracies on their stored
    weights and rewrite their cards (earlier cards measured the fp32 weights before the fp16 rounding)."""
    p = Parser(prog="python -m scalecert remeasure", description=remeasure_main.__doc__)
    p.add_argument("names", nargs="+", help="checkpoint names or .pt paths")
    p.add_argument("--force", action="store_true", help="re-measure cards already measured on the stored weights")
    p.add_argument("--threads", type=int_at_least(0), default=0)
    p.add_argument("--device", type=device_name, default="cpu")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    failed = []
    for name in a.names:
        try:
            card = remeasure(name, a.device, a.force)
        except ValueError as e:  # one bad name does not stop the others
            print(f"error: {e}", file=sys.stderr)
            failed.append(name)
            continue
        if card is None:
            print(f"{name}: already measured on the stored weights (--force to redo)", file=sys.stderr)
            continue
        print(
            json.dumps(
                {
                    k: card.get(k)
                    for k in ("name", "accuracy_with_sin", "accuracy_without_sin", "accuracy_before_remeasure")
                }
            ),
            flush=True,
        )
    if failed:
        print(f"not re-measured: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def parse(argv=None) -> argparse.Namespace:
    p = Parser(prog="python -m scalecert train", description="Train or SIN-finetune a model.")
    p.add_argument("--name", required=True, help="checkpoint name (data/checkpoints/NAME.pt)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--arch", default=None, help="architecture (default: resnet20 / resnet18w16)")
    p.add_argument("--init", default=None, help="start from this checkpoint (fine-tuning)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--sin-layer", type=int, default=1)
    p.add_argument("--sin-rate", type=float, default=None, help="SIN rate (omit for a vanilla model)")
    p.add_argument("--occlude", default="", help="comma-separated patch sizes in %% for occlusion windows")
    p.add_argument("--occlude-prob", type=float, default=1.0)
    p.add_argument("--occlude-tau", type=overlap_ratio, default=None, help="also occlude the tau-merged window sizes")
    p.add_argument("--consistency", type=float, default=0.0, help="weight of KL(clean || occluded)")
    p.add_argument(
        "--occlude-worst-of",
        type=int_at_least(1),
        default=1,
        help="occlude, per image, the worst (highest-loss) of this many random windows",
    )
    p.add_argument(
        "--occlusion",
        choices=OCCLUSIONS,
        default="footprint",
        help="how a window is occluded in training: footprint (removed from the SIN ranking, as the "
        "sound engine certifies; needs a SIN layer) or pixels (filled, as Minority Reports certifies; "
        "no SIN)",
    )
    p.add_argument(
        "--twin", default=None, help="name of the model this one is an ablation twin of (recorded in the card)"
    )
    p.add_argument("--r", type=int_at_least(1), default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int_at_least(0), default=0)
    p.add_argument("--max-train", type=int, default=0, help="use only the first N training images (tests)")
    p.add_argument("--eval-subset", type=int, default=0, help="evaluate per epoch on N images (0: all)")
    p.add_argument("--device", type=device_name, default="cpu")
    p.add_argument("--out-dir", default=str(CHECKPOINT_DIR))
    p.add_argument(
        "--save-every",
        type=float,
        default=600.0,
        help="also save a mid-epoch state every N seconds (0: after every step), so that an "
        "interrupted epoch resumes at the step where it stopped",
    )
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=0,
        help="stop after N optimiser steps of this process, as if interrupted (tests)",
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="write a provisional checkpoint from the run's last saved state (a finished epoch or a "
        "mid-epoch step), without training",
    )
    a = p.parse_args(argv)
    with usage_errors(p):  # the checks train() makes, before any data or model is loaded
        n = D.image_size(a.dataset)
        for s in filter(None, a.occlude.split(",")):
            patch_pixels(float(s), n)
        if a.init:
            resolve_checkpoint(a.init)
    return a


def finished_card(a: argparse.Namespace) -> dict | None:
    """Return the card of this job if its run finished every epoch and its final card was written, else None."""
    state_path, card_path = RUNS_DIR / a.name / "state.pt", Path(a.out_dir) / f"{a.name}.json"
    if a.snapshot or not (state_path.is_file() and card_path.is_file()):
        return None
    card = json.loads(card_path.read_text())
    return card if card.get("status") == "final" and card.get("epochs_done", 0) >= a.epochs else None


def train(a: argparse.Namespace, argv_text: str = "") -> dict:
    """Return the card of one training job after running (or resuming) it and writing checkpoint + card;
    None if it stopped early on ``--stop-after-steps`` (its state saved)."""
    done = finished_card(a)
    if done is not None:
        # Re-running a finished job would only re-evaluate it and overwrite hand-written card notes.
        print(f"{a.name} is already final; nothing to do", file=sys.stderr)
        return done
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    name = D.check_dataset(a.dataset)
    n = D.image_size(name)
    arch = a.arch or ("resnet20" if n == 32 else "resnet18w16")
    train_ds, test_ds = D.load_dataset(name, "train"), D.load_dataset(name, "eval")
    n_train = a.max_train or len(train_ds)
    if a.init:
        model = load_model(a.init)
        model.set_sin(a.sin_layer, a.sin_rate)
    else:
        model = build(arch, len(train_ds.classes), a.sin_layer, a.sin_rate)
    model.to(a.device)
    occl = []
    for s in filter(None, a.occlude.split(",")):
        p = patch_pixels(float(s), n)
        occl.append(window_side(p, n, a.r)[0])
        if a.occlude_tau:
            occl.append(window_side(p, n, a.r, a.occlude_tau)[0])
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.wd, nesterov=True)
    steps_per_epoch = math.ceil(n_train / a.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, a.lr, total_steps=a.epochs * steps_per_epoch, pct_start=0.15 if not a.init else 0.05
    )
    run_dir = RUNS_DIR / a.name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        k: getattr(a, k)
        for k in (
            "dataset",
            "arch",
            "init",
            "epochs",
            "batch_size",
            "lr",
            "wd",
            "sin_layer",
            "sin_rate",
            "occlude",
            "occlude_prob",
            "occlude_tau",
            "consistency",
            "r",
            "seed",
            "max_train",
        )
    }
    if a.occlude_worst_of != 1:  # recorded only when used, so that earlier runs keep resuming
        config["occlude_worst_of"] = a.occlude_worst_of
    if a.occlusion != "footprint":  # recorded only when not the default, so that earlier runs keep resuming
        config["occlusion"] = a.occlusion
    if a.occlude_worst_of < 1:
        raise ValueError(f"--occlude-worst-of must be >= 1, got {a.occlude_worst_of}")
    if occl and a.occlusion == "footprint" and model.sin is None:
        raise ValueError(
            "--occlude with footprint occlusion needs a SIN layer (--sin-rate); "
            "use --occlusion pixels to occlude a model without one"
        )
    if a.occlusion == "pixels" and model.sin is not None:
        raise ValueError("--occlusion pixels trains a model without a SIN layer (omit --sin-rate)")
    # states written before configurations were recorded are resumed (accept_legacy)
    run = ResumableRun(
        run_dir,
        config,
        a.device,
        a.save_every,
        a.stop_after_steps,
        accept_legacy=True,
        model=model,
        opt=opt,
        sched=sched,
    )
    start = run.start
    partial = run.partial
    gen = torch.Generator().manual_seed(a.seed)
    eval_idx = test_ds.subset(a.eval_subset // len(test_ds.classes), a.seed) if a.eval_subset else None
    pad = 4 if n == 32 else 16
    try:
        for epoch in range(start, a.epochs if not a.snapshot else start):
            model.train()
            t = {"tot": 0.0, "correct": 0, "seen": 0}
            for x, y in run.batches(
                train_ds,
                n_train,
                a.batch_size,
                pad,
                gen,
                a.seed,
                epoch,
                a.device,
                t,
                desc=f"{a.name} {epoch + 1}/{a.epochs}",
            ):
                if occl:
                    b = len(y)
                    boxes = worst_window_boxes(model, x, y, occl, a.occlude_worst_of, gen, a.occlusion)
                    keep = torch.rand(b, generator=gen) < a.occlude_prob
                    xo, excl = occlude(model, x, boxes, a.occlusion)
                    if excl is not None:
                        excl[~keep.to(a.device)] = False
                    else:
                        xo = torch.where(keep.to(a.device)[:, None, None, None], xo, x)
                    if a.consistency > 0:
                        if excl is not None:
                            out = model(torch.cat([x, x]), torch.cat([torch.zeros_like(excl), excl]))
                        else:
                            out = model(torch.cat([x, xo]))
                        clean, occ = out[:b], out[b:]
                        loss = (F.cross_entropy(clean, y) + F.cross_entropy(occ, y)) / 2 + a.consistency * F.kl_div(
                            F.log_softmax(occ, 1), F.softmax(clean.detach(), 1), reduction="batchmean"
                        )
                        out = clean
                    else:
                        out = model(xo, excl) if excl is not None else model(xo)
                        loss = F.cross_entropy(out, y)
                else:
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                t["tot"] += loss.item() * len(y)
                t["correct"] += (out.argmax(1) == y).sum().item()
                t["seen"] += len(y)
                run.bar.set_postfix(loss=f"{t['tot'] / t['seen']:.3f}", acc=f"{100 * t['correct'] / t['seen']:.1f}")
            dt = run.epoch_seconds()
            acc = evaluate(model, test_ds, eval_idx, device=a.device)
            run.end_epoch(
                {
                    "epoch": epoch + 1,
                    "loss": t["tot"] / t["seen"],
                    "train_acc": 100 * t["correct"] / t["seen"],
                    "test_acc": acc,
                    "seconds": dt,
                    "lr": sched.get_last_lr()[0],
                },
                seconds=dt,
            )
    except Interrupted as stop:
        print(f"{stop} (state saved)", file=sys.stderr)
        return None
    elapsed = run.elapsed + (partial["seconds"] if a.snapshot and partial else 0.0)
    round_to_storage(model)  # measure the weights that ship, not their fp32 originals
    # a run on the first --max-train images only (tests) is provisional: its card measures the eval subset
    card_idx = eval_idx if a.max_train and eval_idx is not None else None
    acc_sin = evaluate(model, test_ds, card_idx, device=a.device)
    acc_plain = evaluate(model, test_ds, card_idx, device=a.device, sin=False)
    finished = start if a.snapshot else a.epochs
    more = f" and {partial['step']} steps of the next" if partial else ""
    card = {
        "name": a.name,
        "status": "final"
        if finished >= a.epochs and not a.max_train
        else f"provisional: trained on the first {a.max_train} images only"
        if a.max_train
        else f"provisional: snapshot after epoch {finished} of {a.epochs}{more} (training continues)",
        "epochs_done": finished,
        "dataset": D.DATASET_LABELS[name],
        "dataset_key": name,
        "epochs": a.epochs,
        "seed": a.seed,
        "init": a.init,
        "occlude_pct": a.occlude,
        "occlude_tau": a.occlude_tau,
        "occlude_sides_px": occl,
        "consistency": a.consistency,
        "occlude_worst_of": a.occlude_worst_of,
        "occlusion": a.occlusion if occl else None,
        "twin": a.twin,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "eval_split": test_ds.split,
        "eval_images": len(test_ds) if card_idx is None else len(card_idx),
        "accuracy_with_sin": acc_sin if model.sin is not None else None,
        "accuracy_without_sin": acc_plain,
        "accuracy_measured_on": MEASURED_ON,
        "train_seconds": round(elapsed, 1),
        "command": argv_text or "python -m scalecert train " + " ".join(sys.argv[1:]),
        "log": str((run_dir / "log.jsonl").relative_to(RUNS_DIR.parent.parent)),
    }
    card = save_checkpoint(model, Path(a.out_dir) / f"{a.name}.pt", card)
    print(json.dumps({k: card[k] for k in ("name", "accuracy_with_sin", "accuracy_without_sin")}))
    return card


def main(argv=None) -> int:
    """Entry point of ``python -m scalecert train``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    train(a, "python -m scalecert train " + shlex.join([x for x in argv if x != "--snapshot"]))
    return 0
