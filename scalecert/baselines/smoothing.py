"""De-randomized Smoothing (DS) with column ablation, and PG-Mask-DS, as recovery peers in the shared harness.

Method
------
**DS** — Levine and Feizi, "(De)Randomized Smoothing for Certifiable Defense against Patch Attacks",
NeurIPS 2020 ("column smoothing"). A base classifier f sees only a vertical band of ``b`` columns
of the image: :func:`column_ablate` keeps columns ``start, start + 1, ..., start + b - 1`` (mod n,
the band wraps around the right edge) and ablates the rest. An ablated pixel must be
distinguishable from a black one, so every pixel is encoded with 6 channels: ``(x, 1 - x)`` for a
kept pixel (r, g, b, 1 - r, 1 - g, 1 - b) and all zeros for an ablated one (the encoding the DS paper
takes over from Levine and Feizi's randomized ablation). The smoothed classifier evaluates f at all
n band positions (de-randomized: every position, no sampling) and counts votes: position i votes
for class c when ``softmax(f(ablate(x, i)))_c >= theta`` (a position may vote for several classes
when theta < 0.5, or for none); ``threshold=None`` takes the plain argmax (one vote per position).
Prediction = the class with the most votes, ties to the smaller class index.

A p-wide patch occupying columns [j, j + p - 1] is seen by the band starting at s iff
``s in {j - b + 1, ..., j + p - 1} (mod n)``: ``Delta = min(n, p + b - 1)`` band positions, a
circular window of consecutive starts (:func:`affected_bands`). Each of them may vote anything, so
the count of the true class y can drop by at most Delta and every other count can rise by at most
Delta. With the tie rule (ties to the smaller index) the prediction provably stays y iff for every
class c != y

* ``n_y > n_c + 2 Delta`` when c < y (c would win a tie), and
* ``n_y >= n_c + 2 Delta`` when c > y (y wins a tie),

which is the DS certificate with its tie-breaking made exact (:func:`ds_certificate`).

Floating point: a band the patch does not reach sees the same ablated input, but evaluated in
another batch its softmax may differ in the last bits, and a probability that lies on the threshold
could vote the other way. :func:`ds_vote_set` therefore also returns the votes that hold for any
probability within ``VOTE_EPS`` (``low``) and those that may hold (``high``, ``low`` ⊆ votes ⊆
``high``); the certificates take y's evidence from ``low`` and every other class's from ``high``
(exact arithmetic is the special case ``low = high``). Records count such ``fragile_bands``.

**PG-Mask-DS** — Xiang, Bhagoji, Sehwag and Mittal, "PatchGuard: A provably robust defense against
adversarial patches via small receptive fields and masking", USENIX Security 2021: robust masking
applied to the DS votes. Each class's votes form a 1-D evidence sequence ``u_c`` (0/1) over the n
band positions (circular). For every class the circular window of Delta consecutive positions with
the most evidence is removed: ``M_c = T_c - max_W W_c`` (T: total votes, W_c: votes in window W);
prediction = argmax M, ties to the smaller index (:func:`pg_mask_predict`). Provable analysis
(detection threshold T = 0, always mask), for a patch whose affected band positions form the
window W0 (one of the n mask windows):

* true class y — masking is monotone (raising one entry raises T by d and the max window by at
  most d), so the adversary's best is to zero y's evidence in W0:
  ``M'_y >= L(W0) = T_y - max_W sum_{W u W0} u_y`` (evidence outside W0 is unchanged);
* other class c — the mask family contains W0, so whatever the patch puts inside W0,
  ``M'_c = T'_c - max_W W'_c <= T'_c - W0'_c = T_c - W0_c =: U_c(W0)``;

certified iff, for every W0 and every c != y, ``L(W0) > U_c(W0)`` when c < y and ``>=`` when c > y
(:func:`pg_mask_certificate`). Both bounds treat each class independently, which over-approximates
what one patch can do (a position's votes are not independent across classes), so the test is sound.

Band widths and thresholds
--------------------------
Band ``b = 4`` for 32 x 32 images (CIFAR-10), the DS paper's column width, and ``b = 19`` for
224 x 224: the DS paper's 25 columns were for 299 x 299 ImageNet images (its 2 % patch is 42 px), so
they are scaled to keep the same share of the image, round(25 x 224 / 299) (:func:`default_band`).
Threshold ``theta = 0.3`` for CIFAR-10 and ``0.2`` for ImageNet-sized images
(:func:`default_threshold`): the values we recall from the DS paper's experiments, not re-tuned
here (PatchGuard's Mask-DS code is reported to use 0.2 on CIFAR-10 too; ``--threshold`` / ``threshold=``
takes another value); the comparison is ``>=``.

Base classifier
---------------
The project's ResNets (:func:`scalecert.models.build`, ``resnet20`` for 32 x 32, ``resnet18w16``
for 224 x 224) with the first convolution replaced by a 6-input-channel one (same width, kernel,
stride, padding) and the normalisation replaced by a per-channel scale ``x / std`` (std = the data
set's, repeated for the ``1 - x`` channels) without mean subtraction, so that ablated pixels stay
exactly 0 — like the convolution's zero padding (:func:`ds_model`). The band width is kept in the
model as the buffer ``ds_band`` (saved with the weights); the architecture is recorded as
``ds_<arch>`` so that :func:`scalecert.models.load_model` refuses these checkpoints instead of
loading them wrongly; use :func:`load_ds`.

Training (:func:`train_ds`): cross-entropy on ablated images, one uniformly random band position per
image per step, after the project's crop/flip augmentation; SGD (momentum 0.9, Nesterov) with a
one-cycle learning rate as in :mod:`scalecert.train`.

Cost accounting: ``forwards`` = n per image (one base-classifier pass per band position, none
extra for the prediction). PG-Mask-DS costs the same passes; its window arithmetic is in
``seconds`` only.

Simplifications (say so beside any number made with this module)
-----------------------------------------------------------------
* Column bands only (DS's block and row smoothing are not implemented); the DS paper's base models
  (ResNet-18 / ResNet-50, long schedules) are replaced by the project's small ResNets and our CPU
  budget, so accuracy is not expected to match the paper's.
* PatchGuard's detection threshold is fixed at T = 0 (always mask); the evidence is the same
  thresholded DS votes (not clipped logits).
* When ``Delta >= n`` every mask window is the whole sequence: all masked counts are 0, PG-Mask-DS
  predicts class 0 and "certifies" exactly the images of class 0 (sound but degenerate); DS then
  certifies nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..defense import check_images, check_labels, default_chunk
from ..models import (
    CHECKPOINT_DIR,
    CIFAR_STD,
    IMAGENET_STD,
    MEASURED_ON,
    Normalize,
    SplitNet,
    build,
    read_checkpoint,
    rest_channels_last,
    round_to_storage,
    save_checkpoint,
)
from ..paths import RUNS_DIR, relative
from ..runstate import ResumableRun, finished_card, prepare
from ..windows import patch_pixels
from . import add_run_args, balanced_ids, batch_ids, patch_arg, records_frame, summarise_records

KIND = "recovery"
DEFENSES = ("DS", "PG-Mask-DS")
#: DS paper's column widths by image side (CIFAR-10 32 px, ImageNet 299 px); other sides use round(25 n / 299)
PAPER_BAND = {32: 4, 299: 25}
#: DS softmax vote thresholds by image side (recalled from the DS paper)
PAPER_THRESHOLD = {32: 0.3, 224: 0.2}
#: a softmax probability may differ by this much between two evaluations of the same ablated input in
#: different batches (float32 reassociation moves it by ~1e-7): votes that close to a decision are fragile
VOTE_EPS = 1e-5


@dataclass(frozen=True)
class DSVotes:
    """DS votes (B, n, C) bool as computed, with ``low`` ⊆ ``votes`` ⊆ ``high`` under float noise, band and
    threshold."""

    votes: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    band: int
    threshold: float | None

    @property
    def shape(self) -> torch.Size:
        """Return the votes' shape (B, n, C)."""
        return self.votes.shape

    @classmethod
    def from_logits(cls, logits: torch.Tensor, band: int, threshold, eps: float = VOTE_EPS) -> DSVotes:
        """Return the votes of band logits (B, n, C) with their float-noise bounds (:func:`vote_bounds`)."""
        return cls(votes_from_logits(logits, threshold), *vote_bounds(logits, threshold, eps), band, threshold)

    def batch(self, sl: slice) -> DSVotes:
        """Return the votes of the images ``sl``."""
        return DSVotes(self.votes[sl], self.low[sl], self.high[sl], self.band, self.threshold)


def default_band(n: int) -> int:
    """Return the band width b for n x n images: 4 (32), 25 (299), else round(25 n / 299) (19 for 224)."""
    return PAPER_BAND.get(int(n), max(1, round(25 * int(n) / 299)))


def default_threshold(n: int) -> float:
    """Return the vote threshold theta for n x n images: 0.3 up to 64 px (CIFAR-like), else 0.2."""
    return PAPER_THRESHOLD.get(int(n), 0.3 if n <= 64 else 0.2)


def _check_band(band, n: int) -> int:
    if isinstance(band, bool) or not isinstance(band, (int, np.integer)) or not 1 <= band <= n:
        raise ValueError(f"band must be an int in [1, {n}] for {n}-wide images, got {band!r}")
    return int(band)


def _model_band(model: nn.Module, band, n: int) -> int:
    """Return the band width to use: ``band`` if given, else the model's ``ds_band`` buffer (checked against n)."""
    if band is None:
        if not hasattr(model, "ds_band"):
            raise ValueError("band is required for a model without a ds_band buffer")
        band = int(model.ds_band)
    return _check_band(band, n)


def _threshold(threshold, n: int):
    """Return the vote threshold: None (argmax votes) or a float in (0, 1]; "paper" -> :func:`default_threshold`."""
    if threshold == "paper":
        return default_threshold(n)
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be None, 'paper' or a float in (0, 1], got {threshold!r}")
    return float(threshold)


def delta(n: int, p: int, band: int) -> int:
    """Return Delta = min(n, p + band - 1): the number of band positions a p-wide patch can reach."""
    return min(int(n), int(p) + int(band) - 1)


def affected_bands(n: int, col: int, p: int, band: int) -> torch.Tensor:
    """Return the (sorted) band starts whose band meets the columns [col, col + p - 1] of an n-wide image."""
    starts = torch.arange(n)
    cols = (col + torch.arange(p))[None, :]
    return starts[(((cols - starts[:, None]) % n) < band).any(1)]


# --------------------------------------------------------------------------- ablation and model
def column_ablate(x: torch.Tensor, start, band: int) -> torch.Tensor:
    """Return the 6-channel column ablation (B, 6, H, W) of images x (B, 3, H, W) or (3, H, W).

    Columns ``start .. start + band - 1`` (mod W) keep ``(x, 1 - x)``; every other pixel is 0 in all six
    channels. ``start`` is an int (all images) or a (B,) integer tensor (one band per image).
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(x.shape)}")
    w = x.shape[-1]
    band = _check_band(band, w)
    start = torch.as_tensor(start, device=x.device)
    if start.dtype.is_floating_point or start.dim() > 1 or (start.dim() == 1 and len(start) != len(x)):
        raise ValueError(f"start must be an int or {len(x)} integers, got {tuple(start.shape)} {start.dtype}")
    start = start.long().reshape(-1, 1)
    keep = ((torch.arange(w, device=x.device)[None, :] - start) % w) < band  # (B or 1, W)
    return torch.cat([x, 1 - x], 1) * keep[:, None, None, :].to(x.dtype)


def ds_model(arch: str = "resnet20", num_classes: int = 10, band: int = 4) -> SplitNet:
    """Return a fresh project ResNet taking 6-channel ablated images (first conv and normalisation adapted)."""
    if not isinstance(band, int) or band < 1:
        raise ValueError(f"band must be a positive int, got {band!r}")
    model = build(arch, num_classes)
    old = model.units[0][0]
    model.units[0][0] = nn.Conv2d(6, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    std = CIFAR_STD if arch.startswith(("resnet20", "cifar")) else IMAGENET_STD
    model.normalize = Normalize((0.0,) * 6, tuple(std) * 2)
    model.arch = f"ds_{arch}"
    model.register_buffer("ds_band", torch.tensor(int(band)))
    return model


def load_ds(name_or_path, device="cpu") -> SplitNet:
    """Return a DS base model (eval mode) from a checkpoint name or .pt path, after checking its card's sha256."""
    blob, card, path = read_checkpoint(name_or_path)
    if not str(blob.get("arch", "")).startswith("ds_"):
        raise ValueError(f"{path} is not a DS checkpoint (arch {blob.get('arch')!r})")
    model = ds_model(blob["arch"][3:], blob["num_classes"], int(blob["state"]["ds_band"]))
    model.load_state_dict(blob["state"])
    model.card = dict(card, path=str(path))
    return model.to(device).eval()


# --------------------------------------------------------------------------- votes
def _item_bytes(model: nn.Module, n: int, device) -> int:
    """Return the activation memory of one ablated input (sum of every leaf module's output, fp32, x2)."""
    total = [6 * n * n]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 6, n, n, device=device))
    finally:
        for h in handles:
            h.remove()
    return 8 * total[0]


def _device_of(model: nn.Module, device):
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def band_logits(
    model: nn.Module, images: torch.Tensor, band: int | None = None, chunk: int | None = None, device=None
) -> torch.Tensor:
    """Return the base classifier's logits (B, n, C) at every band position of every image.

    INPUT: a model mapping (N, 6, n, n) ablated images to logits (N, C); images (B, 3, n, n) in [0, 1];
    band width (default: the model's ``ds_band``). The B x n ablated inputs are built and evaluated
    ``chunk`` at a time (default: from :func:`scalecert.defense.default_chunk`).
    OUTPUT: float logits on the CPU; row i of image b is f(column_ablate(x_b, i, band)).
    """
    x = check_images(images)
    b, n = x.shape[0], x.shape[-1]
    band = _model_band(model, band, n)
    device = _device_of(model, device)
    model = rest_channels_last(model.to(device).eval())  # measured 1.14x on this CPU; votes carry float bounds
    x = x.to(device)
    chunk = chunk or default_chunk(_item_bytes(model, n, device), device)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    img = torch.arange(b, device=device).repeat_interleave(n)
    start = torch.arange(n, device=device).repeat(b)
    out = []
    for s in range(0, b * n, chunk):
        sl = slice(s, s + chunk)
        out.append(model(column_ablate(x[img[sl]], start[sl], band)).float().cpu())
    return torch.cat(out).view(b, n, -1)


def votes_from_logits(logits: torch.Tensor, threshold=None) -> torch.Tensor:
    """Return boolean votes (..., C): softmax >= threshold, or one-hot argmax (ties to the smaller class) for None."""
    if threshold is None:
        return F.one_hot(_first_argmax(logits), logits.shape[-1]).bool()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be None or a float in (0, 1], got {threshold!r}")
    return logits.float().softmax(-1) >= threshold


def vote_bounds(logits: torch.Tensor, threshold=None, eps: float = VOTE_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (low, high) bool (..., C): the votes that hold for every, resp. for some, softmax whose entries
    lie within ``eps`` of the computed ones (``low`` ⊆ :func:`votes_from_logits` ⊆ ``high``)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 0.5:
        raise ValueError(f"eps must be a float in [0, 0.5), got {eps!r}")
    votes = votes_from_logits(logits, threshold)
    p = logits.float().softmax(-1)
    if threshold is None:  # argmax votes: a class within 2 eps of the top may be the argmax, the top surely is if
        top = p.amax(-1, keepdim=True)  # every other class lies more than 2 eps below it
        high = p >= top - 2 * eps
        low = votes & (high.sum(-1, keepdim=True) == 1)
        return low, high
    return (p >= threshold + eps) & votes, (p + eps >= threshold) | votes


def ds_vote_set(
    model: nn.Module,
    images: torch.Tensor,
    band: int | None = None,
    threshold="paper",
    chunk: int | None = None,
    device=None,
    eps: float = VOTE_EPS,
) -> DSVotes:
    """Return the :class:`DSVotes` of images (B, 3, n, n): votes as :func:`ds_votes`, their float-noise bounds
    (:func:`vote_bounds`), the band and the threshold used."""
    x = check_images(images)
    n = x.shape[-1]
    band, theta = _model_band(model, band, n), _threshold(threshold, n)
    return DSVotes.from_logits(band_logits(model, x, band, chunk, device), band, theta, eps)


def ds_votes(
    model: nn.Module,
    images: torch.Tensor,
    band: int | None = None,
    threshold="paper",
    chunk: int | None = None,
    device=None,
) -> torch.Tensor:
    """Return the DS votes (B, n, C) bool of images (B, 3, n, n): position i votes for class c or not.

    ``threshold``: "paper" (:func:`default_threshold` of the image side), a float theta in (0, 1]
    (vote iff softmax >= theta; zero or several votes per position possible) or None (the argmax,
    exactly one vote per position). Vote counts: ``votes.sum(1)``; the top class per position with
    ``threshold=None``: ``votes.float().argmax(-1)``.
    """
    x = check_images(images)
    return votes_from_logits(band_logits(model, x, band, chunk, device), _threshold(threshold, x.shape[-1]))


# --------------------------------------------------------------------------- aggregation (pure functions)
def _first_argmax(t: torch.Tensor) -> torch.Tensor:
    """Return the index of the largest entry along the last dim, ties to the smaller index (explicitly)."""
    idx = torch.arange(t.shape[-1], device=t.device).expand_as(t)
    return torch.where(t == t.amax(-1, keepdim=True), idx, t.shape[-1]).amin(-1)


def _check_votes(votes: torch.Tensor, labels=None):
    if not isinstance(votes, torch.Tensor) or votes.dim() != 3 or votes.shape[1] < 1 or votes.shape[2] < 2:
        raise ValueError(
            f"votes must be a (B, n, C) tensor with C >= 2, got "
            f"{tuple(votes.shape) if isinstance(votes, torch.Tensor) else type(votes).__name__}"
        )
    if votes.dtype != torch.bool:
        raise ValueError(f"votes must be boolean, got {votes.dtype}")
    if labels is None:
        return votes
    return votes, check_labels(labels, votes.shape[0], votes.shape[2]).to(votes.device)


def ds_predict(counts: torch.Tensor) -> torch.Tensor:
    """Return the DS prediction (B,) from vote counts (B, C): most votes, ties to the smaller class."""
    return _first_argmax(counts)


def _tie_ok(lower: torch.Tensor, upper: torch.Tensor, y: torch.Tensor, cls_dim: int) -> torch.Tensor:
    """Return lower > upper for classes c < y and lower >= upper for c > y (True at c == y)."""
    c = torch.arange(upper.shape[cls_dim], device=upper.device)
    shape = [1] * upper.dim()
    shape[cls_dim] = -1
    c = c.view(shape)
    yv = y.view(-1, *([1] * (upper.dim() - 1)))
    return torch.where(c < yv, lower > upper, lower >= upper) | (c == yv)


def ds_certificate(counts: torch.Tensor, labels, delta_: int, upper: torch.Tensor | None = None) -> torch.Tensor:
    """Return DS certificates (B,) bool from vote counts (B, C) for labels (B,) and Delta band positions.

    Certified iff n_y > n_c + 2 Delta for every c < y and n_y >= n_c + 2 Delta for every c > y (the
    prediction, ties to the smaller class, stays y whatever the Delta affected positions vote).
    ``upper``: counts (B, C) that bound the other classes' counts (default ``counts``; with float-noise
    bounds, y's count comes from the ``low`` votes and ``upper`` from the ``high`` ones).
    """
    if not isinstance(counts, torch.Tensor) or counts.dim() != 2 or counts.shape[1] < 2:
        raise ValueError(f"counts must be a (B, C) tensor with C >= 2, got {getattr(counts, 'shape', counts)}")
    if isinstance(delta_, bool) or not isinstance(delta_, (int, np.integer)) or delta_ < 0:
        raise ValueError(f"Delta must be a non-negative int, got {delta_!r}")
    y = check_labels(labels, counts.shape[0], counts.shape[1]).to(counts.device)
    upper = counts if upper is None else upper
    if not isinstance(upper, torch.Tensor) or upper.shape != counts.shape:
        raise ValueError(f"upper must be a tensor of shape {tuple(counts.shape)}, got {getattr(upper, 'shape', upper)}")
    ny = counts.long().gather(1, y[:, None])
    return _tie_ok(ny, upper.long() + 2 * int(delta_), y, 1).all(1)


def window_sums(u: torch.Tensor, d: int) -> torch.Tensor:
    """Return circular window sums (..., n): entry s = u[..., s] + ... + u[..., s + d - 1] (indices mod n), d <= n."""
    n = u.shape[-1]
    if not 1 <= d <= n:
        raise ValueError(f"window length must lie in [1, {n}], got {d}")
    c = F.pad(torch.cat([u, u[..., : d - 1]], -1).cumsum(-1), (1, 0))
    return c[..., d : d + n] - c[..., :n]


def pg_mask_counts(votes: torch.Tensor, delta_: int) -> torch.Tensor:
    """Return the masked counts (B, C): total votes of each class minus its largest circular Delta-window."""
    votes = _check_votes(votes)
    u = votes.long().transpose(1, 2)  # (B, C, n)
    return u.sum(-1) - window_sums(u, min(int(delta_), u.shape[-1])).amax(-1)


def pg_mask_predict(votes: torch.Tensor, delta_: int) -> torch.Tensor:
    """Return the PG-Mask-DS prediction (B,) from votes (B, n, C): argmax of the masked counts, ties to the
    smaller class."""
    return _first_argmax(pg_mask_counts(votes, delta_))


def pg_mask_certificate(
    votes: torch.Tensor, labels, delta_: int, upper: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (certified (B,) bool, worst margin (B,) long) of PatchGuard robust masking on DS votes.

    For every patch window W0 (the n circular windows of d = min(Delta, n) positions):
    L(W0) = T_y - max_W |u_y on W u W0| and U_c(W0) = T_c - W0_c; certified iff L > U_c for c < y and
    L >= U_c for c > y, for every W0. ``margin`` = min over W0 and c != y of L(W0) - U_c(W0).
    ``upper``: votes (B, n, C) ⊇ ``votes`` for the other classes' evidence (default ``votes``; with
    float-noise bounds, ``votes`` = the ``low`` votes and ``upper`` = the ``high`` ones; both bounds
    are monotone in the evidence).
    """
    votes, y = _check_votes(votes, labels)
    upper = votes if upper is None else _check_votes(upper)
    if upper.shape != votes.shape:
        raise ValueError(f"upper must have the votes' shape {tuple(votes.shape)}, got {tuple(upper.shape)}")
    if isinstance(delta_, bool) or not isinstance(delta_, (int, np.integer)) or delta_ < 1:
        raise ValueError(f"Delta must be a positive int, got {delta_!r}")
    b, n, _ = votes.shape
    d = min(int(delta_), n)
    u = votes.long().transpose(1, 2)  # (B, C, n)
    uh = upper.long().transpose(1, 2)
    upper = uh.sum(-1)[:, :, None] - window_sums(uh, d)  # (B, C, n): U_c(W0 starting at t)
    uy = u[torch.arange(b, device=u.device), y]  # (B, n)
    inside = (torch.arange(n, device=u.device)[None, :] - torch.arange(n, device=u.device)[:, None]) % n < d
    zeroed = uy[:, None, :] * (~inside).long()[None]  # (B, n W0, n): y's evidence outside W0
    lower = zeroed.sum(-1) - window_sums(zeroed, d).amax(-1)  # (B, n): L(W0)
    ok = _tie_ok(lower[:, None, :], upper, y, 1).all(2).all(1)
    gap = lower[:, None, :] - upper
    gap = gap.masked_fill(
        torch.arange(gap.shape[1], device=u.device)[None, :, None] == y[:, None, None], torch.iinfo(gap.dtype).max
    )
    return ok, gap.amin((1, 2))


# --------------------------------------------------------------------------- certification (harness)
def _setup(model, images, labels, patch, band, threshold, votes):
    x = check_images(images)
    b, n = x.shape[0], x.shape[-1]
    band = _model_band(model, band, n)
    p = patch_pixels(patch, n)
    theta = _threshold(threshold, n)
    if votes is not None:
        if isinstance(votes, DSVotes):
            if (votes.band, votes.threshold) != (band, theta):
                raise ValueError(
                    f"votes were made with band {votes.band} and threshold {votes.threshold}, "
                    f"not band {band} and threshold {theta}"
                )
            for v in (votes.votes, votes.low, votes.high):
                _check_votes(v)
        else:  # plain votes: exact arithmetic assumed (no float-noise bounds)
            votes = _check_votes(votes)
            votes = DSVotes(votes, votes, votes, band, theta)
        if votes.shape[:2] != (b, n):
            raise ValueError(f"votes must have shape ({b}, {n}, C), got {tuple(votes.shape)}")
    classes = votes.shape[2] if votes is not None else getattr(model, "num_classes", None)
    y = check_labels(labels, b, classes) if classes is not None else None  # else checked on the first votes
    return x, b, n, band, p, theta, votes, y


def _certify(
    defense: str, model, images, labels, patch, band, threshold, chunk, device, batch_size, ids, votes
) -> pd.DataFrame:
    x, b, n, band, p, theta, votes, y_all = _setup(model, images, labels, patch, band, threshold, votes)
    ids = batch_ids(batch_size, ids, b)
    dl = delta(n, p, band)
    recs = []
    for s0 in range(0, b, batch_size):
        t0 = time.perf_counter()
        if votes is not None:
            vs = votes.batch(slice(s0, s0 + batch_size))
        else:
            vs = DSVotes.from_logits(band_logits(model, x[s0 : s0 + batch_size], band, chunk, device), band, theta)
        vb = vs.votes
        if y_all is None:
            y_all = check_labels(labels, b, vb.shape[2])
        yb = y_all[s0 : s0 + batch_size].to(vb.device)
        counts = vb.long().sum(1)
        if defense == "DS":
            pred = ds_predict(counts)
            cert = ds_certificate(vs.low.long().sum(1), yb, dl, upper=vs.high.long().sum(1)) & (pred == yb)
            ny = counts.gather(1, yb[:, None])[:, 0]
            other = counts.scatter(1, yb[:, None], -1).amax(1)
            extra = {"votes_label": ny.tolist(), "votes_other": other.tolist()}
        else:
            masked = pg_mask_counts(vb, dl)
            pred = _first_argmax(masked)
            ok, margin = pg_mask_certificate(vs.low, yb, dl, upper=vs.high)
            cert = ok & (pred == yb)
            extra = {"masked_label": masked.gather(1, yb[:, None])[:, 0].tolist(), "margin": margin.tolist()}
        extra["fragile_bands"] = (vs.low != vs.high).any(-1).sum(1).tolist()
        seconds = (time.perf_counter() - t0) / len(vb)
        for j, (lab, pr, ok_) in enumerate(zip(yb.tolist(), pred.tolist(), cert.tolist())):
            recs.append(
                {
                    "id": ids[s0 + j],
                    "label": lab,
                    "pred": pr,
                    "alert": False,
                    "clean_correct": pr == lab,
                    "certified": ok_,
                    "forwards": n,
                    "seconds": seconds,
                    "patch_px": p,
                    "band": band,
                    "delta": dl,
                    "threshold": theta,
                    **{k: v[j] for k, v in extra.items()},
                }
            )
    return records_frame(recs, defense, KIND)


def certify_ds(
    model,
    images,
    labels,
    patch,
    band: int | None = None,
    threshold="paper",
    chunk: int | None = None,
    device=None,
    batch_size: int = 64,
    ids=None,
    votes: DSVotes | torch.Tensor | None = None,
) -> pd.DataFrame:
    """De-randomized (column) smoothing: one row per image (common peer records, defense "DS", kind "recovery").

    INPUT: a base model on 6-channel ablated images (e.g. :func:`ds_model`); images (B, 3, n, n) in
    [0, 1]; labels (B,); patch in pixels (int) or % of the image (float); band (default: the
    model's ``ds_band``); threshold as in :func:`ds_votes`; ``votes`` (B, n, C) precomputed by
    :func:`ds_vote_set` for these images with this band and threshold (then no forward pass runs and
    ``seconds`` is the aggregation only; a plain bool tensor from :func:`ds_votes` is taken as exact, with no
    float-noise bounds).
    OUTPUT: id, label, pred (most votes, ties to the smaller class), alert (False), clean_correct,
    certified (:func:`ds_certificate` with Delta = min(n, p + b - 1)), forwards (n), seconds,
    patch_px, band, delta, threshold, votes_label (n_y), votes_other (max over c != y of n_c),
    fragile_bands (band positions with a vote within ``VOTE_EPS`` of changing; see the module docstring).
    """
    return _certify("DS", model, images, labels, patch, band, threshold, chunk, device, batch_size, ids, votes)


def certify_pg_mask_ds(
    model,
    images,
    labels,
    patch,
    band: int | None = None,
    threshold="paper",
    chunk: int | None = None,
    device=None,
    batch_size: int = 64,
    ids=None,
    votes: DSVotes | torch.Tensor | None = None,
) -> pd.DataFrame:
    """PatchGuard robust masking on the DS votes: one row per image (defense "PG-Mask-DS", kind "recovery").

    INPUT: as :func:`certify_ds`.
    OUTPUT: the common records (pred = :func:`pg_mask_predict`, certified = :func:`pg_mask_certificate`
    and pred == label) plus patch_px, band, delta, threshold, masked_label (M_y) and margin (min over
    patch windows and c != y of L - U_c; certified needs > 0 for c < y, >= 0 for c > y).
    """
    return _certify("PG-Mask-DS", model, images, labels, patch, band, threshold, chunk, device, batch_size, ids, votes)


# --------------------------------------------------------------------------- training
def ds_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, starts: torch.Tensor, band: int):
    """Return (loss, logits): cross-entropy of the model on column-ablated images, band ``starts`` (B,)."""
    out = model(column_ablate(x, starts, band))
    return F.cross_entropy(out, y), out


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    band: int,
    gen: torch.Generator | None = None,
    starts: torch.Tensor | None = None,
) -> tuple[float, int]:
    """Run one step on ablated images (random band per image from ``gen`` unless ``starts`` is given).

    Returns (loss before the step, correct predictions).
    """
    model.train()
    if starts is None:
        starts = torch.randint(0, x.shape[-1], (len(x),), generator=gen)
    loss, out = ds_loss(model, x, y, starts.to(x.device), band)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), int((out.argmax(1) == y).sum())


@torch.no_grad()
def base_accuracy(
    model: nn.Module, ds, idx=None, band: int | None = None, batch: int = 500, device="cpu", seed: int = 0
) -> float:
    """Return the base classifier's accuracy (%) on ablated images of ds[idx], one seeded random band each."""
    model.eval()
    band = int(model.ds_band) if band is None else band
    idx = np.arange(len(ds)) if idx is None else np.asarray(idx)
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for s in range(0, len(idx), batch):
        xb, yb = ds.tensors(idx[s : s + batch])
        starts = torch.randint(0, xb.shape[-1], (len(xb),), generator=gen)
        correct += (model(column_ablate(xb.to(device), starts.to(device), band)).argmax(1).cpu() == yb).sum().item()
    return 100.0 * correct / max(1, len(idx))


def smoothed_accuracy(model: nn.Module, ds, idx, patch, threshold="paper", device="cpu") -> dict:
    """Return {ds_clean, ds_certified, pg_clean, pg_certified} (%) on ds[idx] from one set of votes."""
    x, y = ds.tensors(idx)
    votes = ds_vote_set(model, x, threshold=threshold, device=device)
    a = certify_ds(model, x, y, patch, threshold=threshold, votes=votes)
    b = certify_pg_mask_ds(model, x, y, patch, threshold=threshold, votes=votes)
    return {
        "ds_clean": 100 * float(a.clean_correct.mean()),
        "ds_certified": 100 * float(a.certified.mean()),
        "pg_clean": 100 * float(b.clean_correct.mean()),
        "pg_certified": 100 * float(b.certified.mean()),
    }


def train_ds(
    name: str,
    dataset: str = "cifar10",
    arch: str | None = None,
    band: int | None = None,
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 0.1,
    wd: float = 5e-4,
    seed: int = 0,
    threads: int = 0,
    max_train: int = 0,
    eval_subset: int = 1000,
    cert_eval: int = 50,
    final_cert: int = 500,
    cert_patch=None,
    threshold="paper",
    device="cpu",
    runs_dir=None,
    out_dir=None,
    train_set=None,
    eval_set=None,
    command: str = "",
    save_every: float = 600.0,
    stop_after: int = 0,
) -> dict:
    """Train (or resume) a DS base model; write runs_dir/NAME/{state.pt,log.jsonl} and out_dir/NAME.{pt,json}.

    One JSON line per epoch in log.jsonl: loss and train accuracy (ablated), base accuracy on
    ``eval_subset`` ablated evaluation images, DS / PG-Mask-DS clean and certified accuracy on
    ``cert_eval`` images for the patch ``cert_patch`` (default 2.4 % for 32 x 32, 1 % otherwise), lr,
    seconds. The card holds the base accuracy on the whole evaluation split and the smoothed
    accuracies on ``final_cert`` images. ``train_set``/``eval_set`` (ImageSets) replace the data set
    (tests); ``max_train`` > 0 uses only that many training images per epoch (provisional checkpoint).
    """
    from .. import data as D

    train_set, eval_set, n = prepare(seed, threads, dataset, train_set, eval_set)
    arch = arch or ("resnet20" if n <= 64 else "resnet18w16")
    band = _check_band(default_band(n) if band is None else band, n)
    theta = _threshold(threshold, n)
    cert_patch = cert_patch if cert_patch is not None else (2.4 if n == 32 else 1.0)
    model = ds_model(arch, len(train_set.classes), band).to(device)
    n_train = min(max_train or len(train_set), len(train_set))
    steps = math.ceil(n_train / batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, epochs * steps), pct_start=0.15)
    config = {
        "arch": arch,
        "band": band,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "wd": wd,
        "seed": seed,
        "max_train": max_train,
    }
    run_dir = Path(runs_dir or RUNS_DIR) / name
    log_path = run_dir / "log.jsonl"
    done = finished_card(
        Path(out_dir or CHECKPOINT_DIR) / f"{name}.json", {k: v for k, v in config.items() if k != "arch"}, epochs
    )  # the card says ds_<arch>
    if done is not None:
        return done
    run = ResumableRun(run_dir, config, device, save_every, stop_after, model=model, opt=opt, sched=sched)
    gen = torch.Generator().manual_seed(seed)
    eval_idx = balanced_ids(eval_set, eval_subset, seed)
    pad = {32: 4, 224: 16}.get(n, max(1, n // 8))
    for epoch in range(run.start, epochs):
        t = {"tot": 0.0, "correct": 0, "seen": 0}
        for xb, yb in run.batches(train_set, n_train, batch_size, pad, gen, seed, epoch, device, t):
            loss, right = train_step(model, opt, xb, yb, band, gen)
            sched.step()
            t["tot"], t["correct"], t["seen"] = t["tot"] + loss * len(yb), t["correct"] + right, t["seen"] + len(yb)
        dt = run.epoch_seconds()
        rec = {
            "epoch": epoch + 1,
            "loss": t["tot"] / t["seen"],
            "train_acc": 100 * t["correct"] / t["seen"],
            "base_acc": base_accuracy(model, eval_set, eval_idx, device=device, seed=seed),
            **(
                {
                    f"{k}_{cert_eval}": v
                    for k, v in smoothed_accuracy(
                        model, eval_set, balanced_ids(eval_set, cert_eval, seed)[:cert_eval], cert_patch, theta, device
                    ).items()
                }
                if cert_eval
                else {}
            ),
            "lr": sched.get_last_lr()[0],
            "seconds": round(dt, 1),
        }
        run.end_epoch(rec, seconds=dt)
    elapsed = run.elapsed
    round_to_storage(model.eval())  # measure the weights that ship
    cert_idx = balanced_ids(eval_set, final_cert, seed)[:final_cert] if final_cert else []
    t0 = time.time()
    smooth = smoothed_accuracy(model, eval_set, cert_idx, cert_patch, theta, device) if len(cert_idx) else {}
    card = {
        "name": name,
        "defense": "DS / PG-Mask-DS base model",
        **config,
        "status": "final" if not max_train else f"provisional: trained on {n_train} images per epoch only",
        "dataset": D.DATASET_LABELS.get(eval_set.name, eval_set.name),
        "dataset_key": eval_set.name,
        "image_side": n,
        "threshold": theta,
        "epochs_done": epochs,
        "eval_split": eval_set.split,
        "eval_images": len(eval_set),
        "base_accuracy": base_accuracy(model, eval_set, device=device, seed=seed),
        "accuracy_measured_on": MEASURED_ON,
        "cert_patch": cert_patch,
        "cert_patch_px": patch_pixels(cert_patch, n),
        "cert_images": len(cert_idx),
        **smooth,
        "certify_seconds_per_image": round((time.time() - t0) / max(1, len(cert_idx)), 3),
        "train_seconds": round(elapsed, 1),
        "command": command or "python -m scalecert.baselines.smoothing " + shlex.join(sys.argv[1:]),
        "log": relative(log_path),
    }
    return save_checkpoint(model, Path(out_dir or CHECKPOINT_DIR) / f"{name}.pt", card)


# --------------------------------------------------------------------------- command line
def _threshold_arg(text: str):
    return None if text == "none" else text if text == "paper" else float(text)


def main(argv=None) -> int:
    """``python -m scalecert.baselines.smoothing {train,certify}``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m scalecert.baselines.smoothing", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) a DS base model; writes data/checkpoints/NAME.{pt,json}")
    t.add_argument("--name", required=True)
    t.add_argument("--dataset", default="cifar10")
    t.add_argument("--arch", default=None, help="resnet20 (32 px) / resnet18w16 (224 px) by default")
    t.add_argument(
        "--band",
        type=int,
        default=None,
        help="band width (default 4 for 32 px, 19 for 224 px: the DS paper's 25 of 299 px scaled)",
    )
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--wd", type=float, default=5e-4)
    t.add_argument("--eval-subset", type=int, default=1000, help="ablated images evaluated after each epoch")
    t.add_argument("--cert-eval", type=int, default=50, help="images certified after each epoch (0: none)")
    t.add_argument("--final-cert", type=int, default=500, help="images certified for the card")
    t.add_argument("--cert-patch", type=patch_arg, default=None, help="patch for the logged certificates")
    t.add_argument("--threshold", type=_threshold_arg, default="paper", help="'paper', 'none' or theta")
    add_run_args(t)
    c = sub.add_parser("certify", help="certify evaluation images with DS and PG-Mask-DS")
    c.add_argument("--model", required=True)
    c.add_argument("--patch", type=patch_arg, default=2.4)
    c.add_argument("--images", type=int, default=100, help="class-balanced subset size")
    c.add_argument("--threshold", type=_threshold_arg, default="paper")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        opts = {k: v for k, v in vars(a).items() if k != "cmd"}
        card = train_ds(**opts, command="python -m scalecert.baselines.smoothing " + shlex.join(argv))
        print(json.dumps({k: card.get(k) for k in ("name", "base_accuracy", "ds_certified", "sha256")}))
        return 0
    from .. import data as D

    model = load_ds(a.model, a.device)
    ds = D.load_dataset(model.card.get("dataset_key", "cifar10"), "eval")
    idx = balanced_ids(ds, a.images, a.seed)
    x, y = ds.tensors(idx)
    t0 = time.perf_counter()
    votes = ds_votes(model, x, threshold=a.threshold, device=a.device)  # shared by both defences
    vote_seconds = (time.perf_counter() - t0) / max(1, len(x))
    for fn in (certify_ds, certify_pg_mask_ds):
        df = fn(model, x, y, a.patch, threshold=a.threshold, ids=idx.tolist(), votes=votes)
        df["seconds"] += vote_seconds  # the aggregation alone is in df.seconds: add the n passes
        print(json.dumps(summarise_records(df, model=a.model, patch=a.patch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
