"""IBP certified patch defence (Chiang et al., ICLR 2020) as a recovery peer in the shared harness.

Method
------
Chiang, Ni, Abdelkader, Zhu, Studer and Goldstein, "Certified Defenses for Adversarial Patches",
ICLR 2020, extend interval bound propagation (IBP; Gowal et al. 2018) to patches. For a p x p patch
whose top-left corner is (r, c), the set of patched images is a box: every pixel outside the square
is fixed to x, every pixel inside may take any value in [0, 1]. IBP pushes the box through the
network layer by layer in centre/radius form (affine: ``mu' = W mu + b``, ``rad' = |W| rad``;
ReLU: clip both ends), and bounds the last layer with the *elision* of Gowal et al.: the margin
``logit[y] - logit[j] = (W_y - W_j) h + (b_y - b_j)`` is bounded directly on the penultimate
interval ``h``, which is tighter than subtracting the two logit intervals. An image is certified
for its label y when, for EVERY patch position, the lower bound of ``logit[y] - logit[j]`` is > 0 for
every j != y: then no patch anywhere can change the prediction (a recovery certificate; the clean
prediction is the plain forward, which these bounds also cover).

Training uses the IBP objective: ``kappa * CE(clean logits) + (1 - kappa) * CE(worst-case logits)``,
the worst-case logits being ``-lower_margin`` (0 for the true class), taken over a few patch
positions per image and maximised over them (Chiang et al.'s "random patch" training; their
"guided" variant is replaced by ``selection="worst"``: score ``candidates`` random positions
without gradients and train on the ``k`` with the largest robust loss). As in Gowal et al., a
warm-up of clean training (``warmup``, default 15 % of the steps) is followed by a ramp (``ramp``,
50 %) of the box size ``eps`` (the patch box is ``[x - eps, x + eps] ∩ [0, 1]``, so eps = 1 is the
full patch threat model) and of ``kappa`` from 1 to ``kappa_end`` (0.5, Gowal et al.'s value). Our
choices, not the paper's: eps grows as t^2 (``power``; a slow start, like the smooth ramps of Shi
et al. 2021), the gradient norm is clipped to 10, Adam with a cosine learning-rate decay. Every
schedule is a function of the global step, so resuming after an interrupted epoch is exact. With
a short linear ramp (5 % warm-up, 40 % ramp, no clipping) a 160-step trial collapsed to a constant
classifier (all ReLUs dead: robust CE = clean CE = ln 10), the known IBP failure mode.

Measured here (1 thread, two training jobs sharing the 2 cores): one step of batch 128 with k = 4
positions ≈ 1.0-1.3 s (k = 1: ≈ 0.5 s; a clean step 0.09 s), i.e. ≈ 7-8 min per CIFAR-10 epoch;
certifying one 32 x 32 image against all 784 positions of a 5 x 5 patch ≈ 0.8 s. A run of about
an hour: ``python -m scalecert.baselines.ibp train --name cifar10_ibp_2.4 --patch 2.4 --epochs 7
--threads 1`` (untested at that length here).

Architecture
------------
``ibp_small`` (default): conv 3x3/1 (16) - conv 4x4/2 (32) - conv 3x3/1 (32) - conv 4x4/2 (64) -
FC 256 - FC 10, ReLU between, normalisation inside (CIFAR mean/std); about 1.1 M parameters on
32 x 32, about 8 M multiply-adds per plain forward. ``ibp_chiang`` has the channel widths
(32, 32, 64, 64) and FC 512 of the CNN we recall from Chiang et al. (same kernel/stride pattern;
from memory, not checked against their code); it costs more. No batch norm, to keep the interval
arithmetic to conv/linear/ReLU (Shi et al. 2021 show BN helps IBP training; not tried here).

Cost accounting
---------------
``forwards`` per image = 1 (plain forward for the prediction) + 2 x (patch positions evaluated):
one interval pass propagates a centre and a radius through every layer, i.e. two forwards'
worth of multiply-adds. Certifying stops at the first failing position unless ``early_stop=False``.

Simplifications (say so beside any number made with this module)
-----------------------------------------------------------------
* Square patches only; Chiang et al.'s rectangular/shape variants and their "all patch" training
  are not reproduced; "guided" patch selection is the cheap worst-of-``candidates`` heuristic above.
* Our CPU budget: the small CNN, few epochs; numbers are not expected to reach the paper's.
* Bounds are computed in float32 without directed rounding: a certificate with a margin of the
  order of 1e-6 could in principle be a rounding artefact (``margin`` raises the threshold).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..audit import patch_positions
from ..defense import check_images, check_labels, default_chunk
from ..geometry import patch_boxes, rect_masks
from ..models import (
    CHECKPOINT_DIR,
    CIFAR_MEAN,
    CIFAR_STD,
    MEASURED_ON,
    Normalize,
    read_checkpoint,
    round_to_storage,
    save_checkpoint,
)
from ..paths import RUNS_DIR, relative
from ..runstate import ResumableRun, finished_card, prepare
from ..windows import patch_pixels
from . import add_run_args, balanced_ids, batch_ids, patch_arg, records_frame, summarise_records

DEFENSE, KIND = "IBP", "recovery"

#: channel widths of the four convolutions and the hidden FC width of each architecture
ARCHS = {"ibp_small": ((16, 32, 32, 64), 256), "ibp_chiang": ((32, 32, 64, 64), 512)}
#: (kernel, stride, padding) of the four convolutions: n -> n -> n/2 -> n/2 -> n/4
CONV_SHAPES = ((3, 1, 1), (4, 2, 1), (3, 1, 1), (4, 2, 1))


# --------------------------------------------------------------------------- model
class IBPNet(nn.Module):
    """A plain ReLU network on [0, 1] images: ``normalize`` -> ``body`` (Sequential) -> ``head`` (Linear).

    ``body`` may hold Conv2d (zero padding), Linear, ReLU, Flatten and Sequential modules only:
    those are the ones interval propagation knows.
    """

    sin_layer = None  # no SIN layer; present so scalecert.models.save_checkpoint can write the card
    sin_rate = None

    def __init__(
        self, layers: list[nn.Module], n: int, num_classes: int, arch: str = "custom", mean=CIFAR_MEAN, std=CIFAR_STD
    ):
        super().__init__()
        if not layers or not isinstance(layers[-1], nn.Linear) or layers[-1].out_features != num_classes:
            raise ValueError(f"the last layer must be nn.Linear(..., {num_classes})")
        self.normalize = Normalize(mean, std)
        self.body = nn.Sequential(*layers[:-1])
        self.head = layers[-1]
        self.n, self.num_classes, self.arch = int(n), int(num_classes), arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.normalize(x)))


def ibp_cnn(arch: str = "ibp_small", n: int = 32, num_classes: int = 10) -> IBPNet:
    """Return a freshly initialised 4-conv + 2-FC CNN for n x n inputs (n divisible by 4)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown IBP architecture {arch!r}: expected one of {sorted(ARCHS)}")
    if n < 4 or n % 4:
        raise ValueError(f"image side must be a multiple of 4, got {n}")
    widths, hidden = ARCHS[arch]
    layers: list[nn.Module] = []
    c_in = 3
    for c_out, (k, s, pad) in zip(widths, CONV_SHAPES):
        layers += [nn.Conv2d(c_in, c_out, k, s, pad), nn.ReLU()]
        c_in = c_out
    layers += [nn.Flatten(), nn.Linear(c_in * (n // 4) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return IBPNet(layers, n, num_classes, arch)


# --------------------------------------------------------------------------- interval propagation
def _propagate(module: nn.Module, mu: torch.Tensor, rad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (centre, radius) of the image of the box mu ± rad under one module (sound over-approximation)."""
    if isinstance(module, nn.Sequential):
        for m in module:
            mu, rad = _propagate(m, mu, rad)
        return mu, rad
    if isinstance(module, Normalize):
        return (mu - module.mean) / module.std, rad / module.std.abs()
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise TypeError("interval propagation needs numeric zero padding in Conv2d")
        rad = F.conv2d(rad, module.weight.abs(), None, module.stride, module.padding, module.dilation, module.groups)
        return module(mu), rad
    if isinstance(module, nn.Linear):
        return module(mu), F.linear(rad, module.weight.abs())
    if isinstance(module, nn.ReLU):
        lo, hi = F.relu(mu - rad), F.relu(mu + rad)
        return (hi + lo) / 2, (hi - lo) / 2
    if isinstance(module, nn.Flatten):
        return module(mu), module(rad)
    raise TypeError(f"interval propagation does not know {type(module).__name__}")


def interval_propagate(layers: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (lower, upper) bounds of a module's outputs over the box [lo, hi] (elementwise, batched)."""
    mu, rad = _propagate(layers, (hi + lo) / 2, (hi - lo) / 2)
    return mu - rad, mu + rad


def _penultimate(model: IBPNet, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu, rad = _propagate(model.normalize, (hi + lo) / 2, (hi - lo) / 2)
    return _propagate(model.body, mu, rad)


def interval_bounds(model: IBPNet, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (lower, upper) logit bounds (N, C) over image boxes [lo, hi] (no elision; for comparison)."""
    mu, rad = _propagate(model.head, *_penultimate(model, lo, hi))
    return mu - rad, mu + rad


def ibp_margins(model: IBPNet, lo: torch.Tensor, hi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return lower bounds (N, C) of logit[y] - logit[j] over image boxes [lo, hi]; column y is 0.

    The last layer is elided: the rows W_y - W_j are applied to the penultimate interval directly.
    Differentiable (used by training).
    """
    mu, rad = _penultimate(model, lo, hi)
    w, b = model.head.weight, model.head.bias
    diff = w[y].unsqueeze(1) - w.unsqueeze(0)  # (N, C, H)
    centre = torch.einsum("nch,nh->nc", diff, mu)
    if b is not None:
        centre = centre + (b[y].unsqueeze(1) - b.unsqueeze(0))
    return centre - torch.einsum("nch,nh->nc", diff.abs(), rad)


def patch_box(x: torch.Tensor, corners: torch.Tensor, p: int, eps: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the box (lo, hi) of images x (N, 3, n, n) under a p x p patch at corners (N, 2).

    Inside the square the pixel range is [x - eps, x + eps] ∩ [0, 1] (eps = 1: any patch); outside it is [x, x].
    """
    n = x.shape[-1]
    corners = corners.to(x.device)
    inside = rect_masks(patch_boxes(corners, p), n, n).unsqueeze(1)
    return torch.where(inside, (x - eps).clamp(min=0), x), torch.where(inside, (x + eps).clamp(max=1), x)


def _item_bytes(model: IBPNet) -> int:
    """Return the memory of one interval pass (centre, radius, two temporaries in fp32), from a dry run."""
    p = next(model.parameters())
    with torch.no_grad():
        h = model.normalize(torch.zeros(1, 3, model.n, model.n, device=p.device, dtype=p.dtype))
        total = h.numel()
        for m in model.body:
            h = m(h)
            total += h.numel()
    return 16 * total


def _corners(positions, n: int, p: int) -> torch.Tensor:
    """Return (K, 2) patch corners: every one of the (n - p + 1)^2 positions for "all", else checked ones."""
    if isinstance(positions, str):
        if positions != "all":
            raise ValueError(f"unknown positions {positions!r}: expected 'all' or (K, 2) corners")
        return patch_positions(n, p)
    c = torch.as_tensor(positions)
    if c.dtype.is_floating_point or c.dim() < 2 or c.shape[-1] != 2 or c.numel() == 0:
        raise ValueError(f"positions must be integer corners of shape (K, 2) or (B, K, 2), got {tuple(c.shape)}")
    if (c < 0).any() or (c > n - p).any():
        raise ValueError(f"patch corners must lie in [0, {n - p}] for a {p} px patch on {n} x {n}")
    return c.long()


def _setup(model: IBPNet, images, labels, device):
    """Return (model on device in eval mode, images, labels, device) after checking the inputs."""
    if not isinstance(model, IBPNet):
        raise ValueError(f"model must be an IBPNet, got {type(model).__name__}")
    x = check_images(images, model.n)
    y = check_labels(labels, x.shape[0], model.num_classes)
    device = torch.device(device or next(model.parameters()).device)
    return model.to(device).eval(), x.to(device), y.to(device), device


@torch.no_grad()
def margin_bounds(
    model: IBPNet, x: torch.Tensor, y, positions="all", p=2, eps: float = 1.0, chunk: int | None = None, device=None
) -> torch.Tensor:
    """Return lower bounds (B, K, C) of logit[y] - logit[j] for each image, patch position and class.

    INPUT: images x (B, 3, n, n) in [0, 1]; labels y (B,); positions "all" or corners (K, 2) shared by
    all images or (B, K, 2) per image; patch p in pixels (int) or % (float); eps < 1 shrinks the box.
    OUTPUT: bounds on ``device`` (default: the model's); column y is 0 (the margin to itself).
    Interval passes are batched over (image, position) pairs, ``chunk`` pairs at a time.
    """
    model, x, y, device = _setup(model, x, y, device)
    b, n = x.shape[0], x.shape[-1]
    p = patch_pixels(p, n)
    corners = _corners(positions, n, p).to(device)
    if corners.dim() == 2:
        corners = corners.unsqueeze(0).expand(b, -1, -1)
    if corners.shape[0] != b:
        raise ValueError(f"per-image positions must have {b} rows, got {corners.shape[0]}")
    k = corners.shape[1]
    img = torch.arange(b, device=device).repeat_interleave(k)
    flat = corners.reshape(-1, 2)
    chunk = chunk or default_chunk(_item_bytes(model), device)
    out = torch.empty(b * k, model.num_classes, device=device)
    for s in range(0, b * k, chunk):
        sl = slice(s, s + chunk)
        out[sl] = ibp_margins(model, *patch_box(x[img[sl]], flat[sl], p, eps), y[img[sl]])
    return out.view(b, k, -1)


# --------------------------------------------------------------------------- certification
@torch.no_grad()
def certify_ibp(
    model: IBPNet,
    images: torch.Tensor,
    labels,
    patch,
    positions="all",
    chunk: int | None = None,
    device=None,
    early_stop: bool = True,
    margin: float = 0.0,
    batch_size: int = 64,
    ids=None,
) -> pd.DataFrame:
    """Return one row per image (the common peer records, defense "IBP", kind "recovery").

    INPUT: images (B, 3, n, n) in [0, 1] with n = model.n; labels (B,); patch in pixels (int) or %
    (float); positions "all" (every one of the (n - p + 1)^2 corners) or explicit corners (K, 2) (then
    the certificate covers those positions only); ``margin``: certify only bounds > margin (default 0).
    OUTPUT: id, label, pred (plain forward), alert (False), clean_correct, certified (pred == label and
    every lower bound of logit[label] - logit[j], j != label, over every position is > margin),
    forwards (1 + 2 x positions evaluated), seconds (wall time per image), plus positions (K),
    evaluated (positions bounded; fewer after an early stop) and worst_bound (the smallest bound
    seen over j != label; the exact worst case when ``early_stop=False``).
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0 (a certificate needs positive bounds), got {margin}")
    model, x, y, device = _setup(model, images, labels, device)
    b, n = x.shape[0], x.shape[-1]
    p = patch_pixels(patch, n)
    corners = _corners(positions, n, p).to(device)
    if corners.dim() != 2:
        raise ValueError("certify_ibp takes corners (K, 2) shared by all images")
    k = len(corners)
    chunk = chunk or default_chunk(_item_bytes(model), device)
    ids = batch_ids(batch_size, ids, b)
    recs = []
    for s0 in range(0, b, batch_size):
        t0 = time.perf_counter()
        xb, yb = x[s0 : s0 + batch_size], y[s0 : s0 + batch_size]
        m = len(xb)
        pred = model(xb).argmax(1)
        active = pred == yb if early_stop else torch.ones(m, dtype=torch.bool, device=device)
        evaluated = torch.zeros(m, dtype=torch.long, device=device)
        worst = torch.full((m,), float("inf"), device=device)
        img = torch.arange(m, device=device).repeat_interleave(k)
        pos = torch.arange(k, device=device).repeat(m)
        for s in range(0, m * k, chunk):
            sel = torch.arange(s, min(s + chunk, m * k), device=device)
            sel = sel[active[img[sel]]]
            if len(sel) == 0:
                continue
            i = img[sel]
            bounds = ibp_margins(model, *patch_box(xb[i], corners[pos[sel]], p), yb[i])
            bounds.scatter_(1, yb[i, None], float("inf"))
            worst.scatter_reduce_(0, i, bounds.min(1).values, "amin")
            evaluated += torch.bincount(i, minlength=m)
            if early_stop:
                active &= worst > margin
        ok = (pred == yb) & (evaluated == k) & (worst > margin)
        seconds = (time.perf_counter() - t0) / m
        for j in range(m):
            recs.append(
                {
                    "id": ids[s0 + j],
                    "label": int(yb[j]),
                    "pred": int(pred[j]),
                    "alert": False,
                    "clean_correct": bool(pred[j] == yb[j]),
                    "certified": bool(ok[j]),
                    "forwards": 1 + 2 * int(evaluated[j]),
                    "seconds": seconds,
                    "patch_px": p,
                    "positions": k,
                    "evaluated": int(evaluated[j]),
                    "worst_bound": float(worst[j]) if evaluated[j] > 0 else float("nan"),
                }
            )
    return records_frame(recs, DEFENSE, KIND)


# --------------------------------------------------------------------------- training
def ramp_schedule(
    step: int, total: int, warmup: float = 0.15, ramp: float = 0.5, kappa_end: float = 0.5, power: float = 2.0
) -> tuple[float, float]:
    """Return (eps, kappa) at a global step: clean warm-up (fraction ``warmup`` of the steps), then over a
    fraction ``ramp`` eps grows as t ** power from 0 to 1 and kappa falls linearly from 1 to kappa_end."""
    t = (step / max(1, total) - warmup) / max(1e-12, ramp)
    t = min(1.0, max(0.0, t))
    return t**power, 1.0 + t * (kappa_end - 1.0)


def ibp_loss(
    model: IBPNet, x: torch.Tensor, y: torch.Tensor, corners: torch.Tensor, p: int, eps: float, kappa: float
) -> tuple[torch.Tensor, dict]:
    """Return (loss, stats): kappa * CE(clean) + (1 - kappa) * mean over images of max over positions of
    CE(worst-case logits), the worst-case logits being -lower_margin; corners (B, K, 2)."""
    logits = model(x)
    clean = F.cross_entropy(logits, y)
    stats = {"clean_ce": clean.item(), "acc": (logits.argmax(1) == y).float().mean().item()}
    if kappa >= 1 or eps <= 0:
        stats["robust_ce"] = float("nan")
        return clean, stats
    b, k = corners.shape[:2]
    yk = y.repeat_interleave(k)
    m = ibp_margins(model, *patch_box(x.repeat_interleave(k, 0), corners.reshape(-1, 2), p, eps), yk)
    robust = F.cross_entropy(-m, yk, reduction="none").view(b, k).max(1).values.mean()
    stats["robust_ce"] = robust.item()
    return kappa * clean + (1 - kappa) * robust, stats


def choose_corners(
    model: IBPNet,
    x: torch.Tensor,
    y: torch.Tensor,
    p: int,
    eps: float,
    k: int,
    gen: torch.Generator,
    selection: str = "random",
    candidates: int = 8,
) -> torch.Tensor:
    """Return training corners (B, k, 2): k random ones, or the k worst (largest robust CE) of ``candidates``."""
    b, n = x.shape[0], x.shape[-1]
    if selection == "random":
        return torch.randint(0, n - p + 1, (b, k, 2), generator=gen).to(x.device)
    if selection != "worst":
        raise ValueError(f"unknown selection {selection!r}: expected 'random' or 'worst'")
    cand = torch.randint(0, n - p + 1, (b, max(k, candidates), 2), generator=gen).to(x.device)
    if eps <= 0:
        return cand[:, :k]
    with torch.no_grad():
        m = cand.shape[1]
        lower = ibp_margins(
            model, *patch_box(x.repeat_interleave(m, 0), cand.reshape(-1, 2), p, eps), y.repeat_interleave(m)
        )
        score = F.cross_entropy(-lower, y.repeat_interleave(m), reduction="none").view(b, m)
    idx = score.topk(k, 1).indices
    return cand.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))


def train_step(
    model: IBPNet,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    p: int,
    eps: float,
    kappa: float,
    gen: torch.Generator,
    k: int = 4,
    selection: str = "random",
    candidates: int = 8,
    clip: float | None = None,
) -> dict:
    """Run one optimiser step of the IBP patch objective on a batch (gradient norm clipped to ``clip``);
    return its stats (loss before the step)."""
    model.train()
    corners = choose_corners(model, x, y, p, eps, k, gen, selection, candidates)
    loss, stats = ibp_loss(model, x, y, corners, p, eps, kappa)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return dict(stats, loss=loss.item(), eps=eps, kappa=kappa)


@torch.no_grad()
def clean_accuracy(model: IBPNet, ds, idx=None, batch: int = 500, device="cpu") -> float:
    """Return top-1 accuracy (%) of the plain model on an ImageSet (or a subset of indices)."""
    model.eval()
    idx = np.arange(len(ds)) if idx is None else np.asarray(idx)
    correct = 0
    for s in range(0, len(idx), batch):
        xb, yb = ds.tensors(idx[s : s + batch])
        correct += (model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
    return 100.0 * correct / max(1, len(idx))


def certified_accuracy(model: IBPNet, ds, idx, patch, device="cpu") -> float:
    """Return the % of images of ds[idx] that certify_ibp certifies (all positions)."""
    x, y = ds.tensors(idx)
    return 100.0 * float(certify_ibp(model, x, y, patch, device=device).certified.mean())


def train_ibp(
    name: str,
    patch=2.4,
    epochs: int = 20,
    dataset: str = "cifar10",
    arch: str = "ibp_small",
    batch_size: int = 128,
    lr: float = 1e-3,
    k: int = 4,
    selection: str = "random",
    candidates: int = 8,
    warmup: float = 0.15,
    ramp: float = 0.5,
    kappa_end: float = 0.5,
    power: float = 2.0,
    clip: float | None = 10.0,
    seed: int = 0,
    threads: int = 0,
    max_train: int = 0,
    eval_subset: int = 1000,
    cert_eval: int = 50,
    final_cert: int = 500,
    device="cpu",
    runs_dir=None,
    out_dir=None,
    train_set=None,
    eval_set=None,
    command: str = "",
    save_every: float = 600.0,
    stop_after: int = 0,
) -> dict:
    """Train (or resume) an IBP patch model; write data/runs/NAME/{state.pt,log.jsonl} and a checkpoint + card.

    One JSON line per epoch in log.jsonl (loss, clean/robust CE, train acc, clean test accuracy on
    ``eval_subset`` images, certified accuracy on ``cert_eval`` images, eps, kappa, lr, seconds).
    The fp16 checkpoint goes to ``out_dir``/NAME.pt (default data/checkpoints) with a JSON card
    (sha256, clean accuracy on the whole evaluation split, certified accuracy on ``final_cert``
    images, command). ``train_set``/``eval_set`` (ImageSets) replace the data set (tests).
    """
    from .. import data as D

    train_set, eval_set, n = prepare(seed, threads, dataset, train_set, eval_set)
    p = patch_pixels(patch, n)
    model = ibp_cnn(arch, n, len(train_set.classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n_train = min(max_train or len(train_set), len(train_set))
    steps_per_epoch = math.ceil(n_train / batch_size)
    total = epochs * steps_per_epoch
    config = {
        "patch": patch,
        "patch_px": p,
        "arch": arch,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "k": k,
        "selection": selection,
        "candidates": candidates,
        "warmup": warmup,
        "ramp": ramp,
        "kappa_end": kappa_end,
        "power": power,
        "clip": clip,
        "seed": seed,
        "max_train": max_train,
    }
    run_dir = Path(runs_dir or RUNS_DIR) / name
    log_path = run_dir / "log.jsonl"
    done = finished_card(Path(out_dir or CHECKPOINT_DIR) / f"{name}.json", config, epochs)
    if done is not None:
        return done
    run = ResumableRun(run_dir, config, device, save_every, stop_after, model=model, opt=opt)
    gen = torch.Generator().manual_seed(seed)
    eval_idx = balanced_ids(eval_set, eval_subset, seed)
    pad = max(1, n // 8)
    for epoch in range(run.start, epochs):
        sums = {"loss": 0.0, "clean_ce": 0.0, "robust_ce": 0.0, "acc": 0.0, "seen": 0, "rob_seen": 0}
        batches = run.batches(train_set, n_train, batch_size, pad, gen, seed, epoch, device, sums)
        for s, (xb, yb) in enumerate(batches, run.first_step):
            step = epoch * steps_per_epoch + s
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
            eps, kappa = ramp_schedule(step, total, warmup, ramp, kappa_end, power)
            st = train_step(model, opt, xb, yb, p, eps, kappa, gen, k, selection, candidates, clip)
            for key in ("loss", "clean_ce", "robust_ce", "acc"):
                sums[key] += (0.0 if math.isnan(st[key]) else st[key]) * len(yb)
            sums["seen"] += len(yb)
            sums["rob_seen"] += 0 if math.isnan(st["robust_ce"]) else len(yb)
        dt = run.epoch_seconds()
        eps, kappa = ramp_schedule((epoch + 1) * steps_per_epoch - 1, total, warmup, ramp, kappa_end, power)
        seen, rob_seen = sums.pop("seen"), sums.pop("rob_seen")
        rec = {
            "epoch": epoch + 1,
            **{key: v / max(1, seen) for key, v in sums.items()},
            "robust_ce": sums["robust_ce"] / rob_seen if rob_seen else None,
            "eps": eps,
            "kappa": kappa,
            "lr": opt.param_groups[0]["lr"],
            "test_acc": clean_accuracy(model, eval_set, eval_idx, device=device),
            "cert_acc": certified_accuracy(
                model, eval_set, balanced_ids(eval_set, cert_eval, seed)[:cert_eval], patch, device=device
            )
            if cert_eval
            else None,
            "cert_images": cert_eval,
            "seconds": dt,
        }
        run.end_epoch(rec, seconds=dt)
    elapsed = run.elapsed
    round_to_storage(model.eval())  # measure the weights that ship
    cert_idx = balanced_ids(eval_set, final_cert, seed)[:final_cert] if final_cert else []
    t0 = time.time()
    cert = certified_accuracy(model, eval_set, cert_idx, patch, device=device) if len(cert_idx) else None
    card = {
        "name": name,
        "defense": DEFENSE,
        "status": "final" if not max_train else f"provisional: trained on {n_train} images only",
        "dataset": D.DATASET_LABELS.get(eval_set.name, eval_set.name),
        "dataset_key": eval_set.name,
        **config,
        "image_side": n,
        "epochs_done": epochs,
        "eval_split": eval_set.split,
        "eval_images": len(eval_set),
        "clean_accuracy": clean_accuracy(model, eval_set, device=device),
        "accuracy_measured_on": MEASURED_ON,
        "certified_accuracy": cert,
        "certified_images": len(cert_idx),
        "certify_seconds_per_image": round((time.time() - t0) / max(1, len(cert_idx)), 3),
        "train_seconds": round(elapsed, 1),
        "command": command or "python -m scalecert.baselines.ibp " + shlex.join(sys.argv[1:]),
        "log": relative(log_path),
    }
    return save_checkpoint(model, Path(out_dir or CHECKPOINT_DIR) / f"{name}.pt", card)


def load_ibp(name_or_path, device="cpu") -> IBPNet:
    """Return an IBP model (eval mode) from a checkpoint name or .pt path, after checking its card's sha256."""
    blob, card, path = read_checkpoint(name_or_path)
    state = blob["state"]
    widths, hidden = ARCHS[blob["arch"]]
    fc_in = next(v.shape[1] for key, v in state.items() if key.startswith("body.") and v.dim() == 2)
    n = 4 * math.isqrt(fc_in // widths[-1])
    model = ibp_cnn(blob["arch"], n, blob["num_classes"])
    model.load_state_dict(state)
    model.card = dict(card, path=str(path))
    return model.to(device).eval()


# --------------------------------------------------------------------------- cost
def ibp_cost(
    n: int = 224,
    patch=2.0,
    arch: str = "ibp_small",
    num_classes: int = 10,
    sample: int = 8,
    repeats: int = 2,
    device="cpu",
    seed: int = 0,
) -> dict:
    """Return the measured cost of certifying one n x n image with the IBP CNN scaled to n.

    Times ``sample`` interval passes (one chunk, best of ``repeats`` after a warm-up) and one plain
    forward of a random network, then extrapolates to all (n - p + 1)^2 patch positions. The
    timing is of this machine with whatever else runs on it; ``seconds_per_image`` is an estimate.
    """
    torch.manual_seed(seed)
    p = patch_pixels(patch, n)
    model = ibp_cnn(arch, n, num_classes).to(device).eval()
    x = torch.rand(1, 3, n, n, generator=torch.Generator().manual_seed(seed)).to(device)
    corners = patch_positions(n, p)
    sel = corners[torch.randperm(len(corners), generator=torch.Generator().manual_seed(seed))[:sample]]

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        per_pass = best(lambda: margin_bounds(model, x, [0], sel, p, chunk=sample)) / len(sel)
        plain = best(lambda: model(x))
    k = len(corners)
    return {
        "n": n,
        "patch_px": p,
        "arch": arch,
        "params": sum(q.numel() for q in model.parameters()),
        "positions": k,
        "forwards_per_image": 1 + 2 * k,
        "seconds_per_pass": per_pass,
        "plain_forward_seconds": plain,
        "seconds_per_image": plain + k * per_pass,
        "hours_per_1000_images": (plain + k * per_pass) * 1000 / 3600,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


# --------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    """``python -m scalecert.baselines.ibp {train,certify,cost}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m scalecert.baselines.ibp", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train an IBP patch model (resumable)")
    t.add_argument("--name", required=True, help="checkpoint name (data/checkpoints/NAME.pt)")
    t.add_argument("--patch", type=patch_arg, default=2.4, help="patch size: %% of the image, or e.g. 5px")
    t.add_argument("--dataset", default="cifar10", choices=["cifar10"])
    t.add_argument("--arch", default="ibp_small", choices=sorted(ARCHS))
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--k", type=int, default=4, help="patch positions per image per step (max loss over them)")
    t.add_argument("--selection", default="random", choices=["random", "worst"])
    t.add_argument("--candidates", type=int, default=8, help="positions scored per image with --selection worst")
    t.add_argument("--warmup", type=float, default=0.15, help="fraction of steps of clean training")
    t.add_argument("--ramp", type=float, default=0.5, help="fraction of steps of the eps/kappa ramp")
    t.add_argument("--kappa-end", type=float, default=0.5)
    t.add_argument("--power", type=float, default=2.0, help="eps = t ** power during the ramp (t: 0 -> 1)")
    t.add_argument("--clip", type=float, default=10.0, help="clip the gradient norm to this value (0: off)")
    t.add_argument("--eval-subset", type=int, default=1000, help="clean accuracy per epoch on N images (0: all)")
    t.add_argument("--cert-eval", type=int, default=50, help="certified accuracy per epoch on N images")
    t.add_argument("--final-cert", type=int, default=500, help="certified accuracy for the card on N images")
    add_run_args(t)
    c = sub.add_parser("certify", help="certify images of the evaluation split with a trained model")
    c.add_argument("--model", required=True)
    c.add_argument("--patch", type=patch_arg, default=2.4)
    c.add_argument("--images", type=int, default=100, help="class-balanced subset size")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    k = sub.add_parser("cost", help="measure the cost of certifying one image (e.g. 224 x 224 Imagenette)")
    k.add_argument("--n", type=int, default=224)
    k.add_argument("--patch", type=patch_arg, default=2.0)
    k.add_argument("--arch", default="ibp_small", choices=sorted(ARCHS))
    k.add_argument("--sample", type=int, default=8)
    k.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        opts = {key: v for key, v in vars(a).items() if key != "cmd"}
        card = train_ibp(**opts, command="python -m scalecert.baselines.ibp " + shlex.join(argv))
        print(json.dumps({key: card[key] for key in ("name", "clean_accuracy", "certified_accuracy")}))
    elif a.cmd == "certify":
        from .. import data as D

        model = load_ibp(a.model, a.device)
        ds = D.load_dataset(model.card.get("dataset_key", "cifar10"), "eval")
        idx = balanced_ids(ds, a.images, a.seed)
        x, y = ds.tensors(idx)
        df = certify_ibp(model, x, y, a.patch, device=a.device, ids=idx.tolist())
        print(json.dumps(summarise_records(df, model=a.model, patch=a.patch)))
    else:
        print(json.dumps(ibp_cost(a.n, a.patch, a.arch, sample=a.sample, device=a.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
