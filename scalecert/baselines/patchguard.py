"""CBN, PG-Mask-BN and PatchGuard++: patch defences on the local logits of a small-receptive-field BagNet.

All three read the local logits ``z`` (B, K, h, w) of a :class:`scalecert.baselines.bagnet.BagNet`
(one forward per image) and rely on one fact: a p x p patch changes only the local logits whose
receptive field meets it, its *footprint*, and every footprint lies inside one w x w window of the
fixed family of all w x w windows inside the h x w map (stride 1, so the corner and edge windows
are included).

Window side (:func:`feature_window`)
------------------------------------
``w`` is the largest footprint extent over every patch position, computed with
:func:`scalecert.geometry.footprint` from the model's (stride S, field K, padding P). Feature i
meets the pixel rows [a, a + p - 1] iff ``a - K + 1 + P <= i*S <= a + p - 1 + P``: an interval of
p + K - 1 integers, holding at most ``ceil((p + K - 1) / S)`` multiples of S; ``w`` never exceeds
that bound (nor h). Every footprint (extent <= w) fits in the family's window whose top-left
row is ``min(i0, h - w)``.

Defences
--------
* **CBN** (Zhang, Yuan, McCoyd and Wagner, "Clipped BagNet: Defending against sticker attacks
  with clipped bag-of-features", DLS 2020). Each local logit is clipped into a bounded range
  [lo, hi]; prediction = argmax of the sum of the clipped logits. Clipping (``clip``): ``"tanh"``
  (default) uses ``tanh(a*z + b)`` with a = 0.05, b = -1 (range (-1, 1); the scale/shift we recall
  from PatchGuard's re-implementation of CBN for ImageNet BagNets), ``"clamp"`` uses
  ``clamp(z, a, b)``. Certificate (recovery): for every window W, the adversary may set every
  clipped logit in W to anything in [lo, hi]; the worst case for class k != y lowers the true class
  to lo and raises k to hi in W, so the image is certified iff for all W and all k != y
  ``(S_y - S_k) - (W_y - W_k) - w^2 (hi - lo) > 0`` (S: sums over the map, W_.: sums over W).
* **PG-Mask-BN** (Xiang, Bhagoji, Sehwag and Mittal, "PatchGuard: A provably robust defense against
  adversarial patches via small receptive fields and masking", USENIX Security 2021): robust
  masking. Evidence ``u = max(z, 0)``; for each class k the window with the largest evidence sum is
  removed: ``s_k = T_k - max_W W_k(u)``; prediction = argmax s. Certificate (recovery), for a
  patch whose footprint lies in the window W0 (the adversary may set u in W0 to any value >= 0):

  - true class y: ``s'_y = min_W sum_{outside W} u'_y >= min_W sum_{outside (W u W0)} u_y
    = T_y - max_W sum_{W u W0} u_y`` =: L(W0) (evidence outside W0 is unchanged and u' >= 0);
  - other class k: the mask family contains W0, so ``s'_k <= sum_{outside W0} u'_k
    = T_k - W0_k(u)`` =: U_k(W0) whatever the patch puts inside W0;

  certified iff ``L(W0) > max_{k != y} U_k(W0)`` for every W0 (``max_W sum_{W u W0}`` is the sum
  over W0 plus the best window sum with W0 zeroed, for every W0 at once). This is the provable
  analysis of PatchGuard's robust masking with the detection threshold T = 0 (always mask).
* **PatchGuard++** (Xiang and Mittal, "PatchGuard++: Efficient provable attack detection against
  adversarial patches", 2021): certified *detection* by a feature-space sliding window. Unmasked
  prediction = argmax of the summed local logits (``clip=None``, default: the BagNet's own
  prediction up to float order; ``clip="relu"`` sums max(z, 0)); for every window W the masked
  prediction uses the logits outside W; alert (pred = -1) if any masked prediction differs from
  the unmasked one. Certified iff the unmasked prediction is the label and every masked
  prediction agrees (leading its runner-up by more than the float guard below): under any patch
  with footprint in W0 the masked prediction for W0 is computed from unchanged logits, so the
  output is the label or an alert. The masked sums are
  computed as ``z @ keep`` (exact zeros inside W), so they are bit-identical functions of the
  logits outside W (no cancellation of an integral image).

Tests (tests/test_baselines_bagnet.py) audit every certificate on random BagNets against every
patch position x (zeros, ones, noise) and a gradient patch attack, and check that the same audit
breaks deliberately loosened bounds.

Cost accounting: ``forwards`` = 1 per image for all three (one BagNet pass; the window
arithmetic on the h x w x K map is counted in ``seconds`` only).

Simplifications (say so beside any number made with this module)
-----------------------------------------------------------------
* Square patches and square windows of the fixed stride-1 family only; PatchGuard's detection
  threshold T is fixed at 0, and its mask / window sizes are derived, not tuned.
* CBN's clipping constants are tied to the logit scale of the model; with our small BagNets they
  are parameters (``a``, ``b``), and the BagNet is not fine-tuned with clipping as in the CBN paper.
* Float guard (``rtol``, default 1e-5): the bounds are evaluated in float64 on float32 local
  logits, and the float32 convolutions give logits that differ by up to ~5e-7 x max|z| between
  batch compositions (measured on CPU; the same batch shape is bit-exact, and a patch then leaves
  every logit outside its footprint bit-identical). A certificate therefore needs its margin (CBN,
  PG-Mask-BN) or every masked prediction's lead over the runner-up (PatchGuard++) to exceed
  ``rtol * h * w * L * max|z|`` (L: the clipping's Lipschitz constant, a for tanh); ``rtol=0`` gives
  the exact-arithmetic rule. The guard is an engineering margin, not a proof about float rounding.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
import torch.nn.functional as F

from ..defense import check_images, check_labels
from ..geometry import Geometry, footprint, rect_masks
from ..windows import patch_pixels, positions
from . import batch_ids, records_frame

DEFENSE_KINDS = {"CBN": "recovery", "PG-Mask-BN": "recovery", "PatchGuard++": "detection"}
CLIPS = ("tanh", "clamp")


# --------------------------------------------------------------------------- windows
def feature_window(geo: Geometry, n: int, p: int, size: int) -> int:
    """Return the side w of the feature windows: the largest footprint extent of a p x p patch (all positions).

    ``size`` is the side of the local-logit map; w <= min(size, ceil((p + rf - 1) / stride)).
    """
    if not 1 <= p <= n:
        raise ValueError(f"patch of {p} px does not fit a {n} x {n} image")
    a = torch.arange(n - p + 1)
    fp = footprint(geo, torch.stack([a, a, a + p - 1, a + p - 1], 1), size, size)
    return int(min(size, int((fp[:, 2] - fp[:, 0] + 1).max())))


def window_rects(h: int, w: int, win: int) -> torch.Tensor:
    """Return the inclusive rectangles (N, 4) of every win x win window inside an h x w map (row-major)."""
    r = torch.tensor(positions(h, win, 1))
    c = torch.tensor(positions(w, win, 1))
    r0, c0 = torch.meshgrid(r, c, indexing="ij")
    r0, c0 = r0.flatten(), c0.flatten()
    return torch.stack([r0, c0, r0 + win - 1, c0 + win - 1], 1)


def _integral(v: torch.Tensor) -> torch.Tensor:
    """Return the zero-padded 2-D prefix sums (..., h + 1, w + 1) of v (..., h, w)."""
    return F.pad(v.cumsum(-2).cumsum(-1), (1, 0, 1, 0))


def window_sums(v: torch.Tensor, win: int) -> torch.Tensor:
    """Return the sums of v (B, K, h, w) over every win x win window, (B, K, N) in :func:`window_rects` order."""
    s = _integral(v)
    out = s[..., win:, win:] - s[..., :-win, win:] - s[..., win:, :-win] + s[..., :-win, :-win]
    return out.flatten(-2)


def union_max(v: torch.Tensor, win: int, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Return, for every window W0, the largest sum of v (B, h, w) over a union W u W0 of two windows: (B, N).

    sum(W u W0) = sum(W0) + sum(W minus W0), and max_W sum(W minus W0) is the largest window sum of
    v with W0 zeroed; computed for every W0 at once (images chunked to ``chunk_elems`` values).
    """
    b, h, w = v.shape
    inside = rect_masks(window_rects(h, w, win).to(v.device), h, w)  # (N, h, w)
    sums = window_sums(v[:, None], win)[:, 0]  # (B, N)
    out = torch.empty_like(sums)
    step = max(1, chunk_elems // inside.numel())
    for s in range(0, b, step):
        rest = v[s : s + step, None].masked_fill(inside, 0.0)  # (b, N, h, w): v outside W0
        out[s : s + step] = sums[s : s + step] + window_sums(rest, win).amax(2)
    return out


# --------------------------------------------------------------------------- defences on local logits
def clip_logits(z: torch.Tensor, clip: str = "tanh", a: float = 0.05, b: float = -1.0):
    """Return (clipped logits, lo, hi): ``tanh(a*z + b)`` in [-1, 1] or ``clamp(z, a, b)`` in [a, b]."""
    if clip == "tanh":
        if not a > 0:
            raise ValueError(f"tanh clipping needs a scale a > 0, got {a}")
        return torch.tanh(a * z + b), -1.0, 1.0
    if clip == "clamp":
        if not a < b:
            raise ValueError(f"clamp clipping needs a < b, got [{a}, {b}]")
        return z.clamp(a, b), float(a), float(b)
    raise ValueError(f"unknown clipping {clip!r}: expected one of {CLIPS}")


def float_slack(z: torch.Tensor, rtol: float, lipschitz: float = 1.0) -> torch.Tensor:
    """Return the per-image float guard (B,) ``rtol * h * w * lipschitz * max|z|`` a certificate margin must exceed."""
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    return rtol * z.shape[2] * z.shape[3] * lipschitz * z.double().abs().amax((1, 2, 3))


def _other(t: torch.Tensor, y: torch.Tensor, fill: float) -> torch.Tensor:
    """Return t (B, K, ...) with the entries of class y[b] set to fill."""
    idx = y.view(-1, 1, *([1] * (t.dim() - 2))).expand(-1, 1, *t.shape[2:])
    return t.scatter(1, idx, fill)


def cbn_predict(z: torch.Tensor, clip: str = "tanh", a: float = 0.05, b: float = -1.0) -> torch.Tensor:
    """Return the CBN prediction (B,) of local logits z (B, K, h, w): argmax of the summed clipped logits."""
    return clip_logits(z.double(), clip, a, b)[0].sum((2, 3)).argmax(1)


def pg_mask_predict(z: torch.Tensor, win: int) -> torch.Tensor:
    """Return the robust-masking prediction (B,): per class, ReLU evidence minus its best win x win window."""
    u = z.double().clamp(min=0)
    return (u.sum((2, 3)) - window_sums(u, win).amax(2)).argmax(1)


def cbn_local(
    z: torch.Tensor,
    labels: torch.Tensor,
    win: int,
    clip: str = "tanh",
    a: float = 0.05,
    b: float = -1.0,
    rtol: float = 1e-5,
) -> dict:
    """CBN on local logits z (B, K, h, w): {pred, certified, margin} (margin: the worst-case margin over
    windows and classes; certified iff pred is the label and margin > :func:`float_slack`)."""
    c, lo, hi = clip_logits(z.double(), clip, a, b)
    total = c.sum((2, 3))  # (B, K)
    pred = total.argmax(1)  # = cbn_predict(z, clip, a, b)
    ws = window_sums(c, win)  # (B, K, N)
    y = labels.view(-1, 1)
    gap = total.gather(1, y) - total  # S_y - S_k
    wgap = ws.gather(1, y[:, :, None].expand(-1, 1, ws.shape[2])) - ws  # W_y - W_k
    margin = gap[:, :, None] - wgap - win * win * (hi - lo)
    worst = _other(margin, labels, float("inf")).amin((1, 2))
    slack = float_slack(z, rtol, a if clip == "tanh" else 1.0)
    return {"pred": pred, "certified": (pred == labels) & (worst > slack), "margin": worst}


def pg_mask_local(z: torch.Tensor, labels: torch.Tensor, win: int, rtol: float = 1e-5) -> dict:
    """PatchGuard robust masking on local logits z (B, K, h, w): {pred, certified, margin} (margin: the
    smallest L(W0) - max_k U_k(W0); certified iff pred is the label and margin > :func:`float_slack`)."""
    u = z.double().clamp(min=0)
    total = u.sum((2, 3))  # (B, K)
    ws = window_sums(u, win)  # (B, K, N)
    pred = (total - ws.amax(2)).argmax(1)  # = pg_mask_predict(z, win)
    upper = _other(total[:, :, None] - ws, labels, float("-inf")).amax(1)  # (B, N): max_k U_k(W0)
    uy = u[torch.arange(len(u), device=u.device), labels]  # (B, h, w)
    lower = total.gather(1, labels.view(-1, 1)) - union_max(uy, win)  # (B, N): L(W0)
    worst = (lower - upper).amin(1)
    return {"pred": pred, "certified": (pred == labels) & (worst > float_slack(z, rtol)), "margin": worst}


def pgpp_local(z: torch.Tensor, labels: torch.Tensor, win: int, clip: str | None = None, rtol: float = 1e-5) -> dict:
    """PatchGuard++ on local logits z (B, K, h, w): {pred (-1 on alert), alert, certified, disagree, gap}.

    gap: the smallest lead of a masked prediction over its runner-up; certified iff no alert, the
    unmasked prediction is the label and gap > :func:`float_slack` (so float noise cannot flip a
    masked prediction)."""
    if clip not in (None, "relu"):
        raise ValueError(f"unknown PatchGuard++ clipping {clip!r}: expected None or 'relu'")
    u = z.double()
    if clip == "relu":
        u = u.clamp(min=0)
    _, _, h, w = u.shape
    flat = u.flatten(2)  # (B, K, hw)
    keep = (~rect_masks(window_rects(h, w, win), h, w)).flatten(1).to(u)  # (N, hw)
    unmasked = flat.sum(2).argmax(1)
    scores = torch.matmul(flat, keep.T)  # (B, K, N): class scores outside each window
    masked = scores.argmax(1)  # (B, N): masked prediction per window
    top2 = scores.topk(2, dim=1).values if scores.shape[1] > 1 else torch.cat([scores, scores - float("inf")], 1)
    gap = (top2[:, 0] - top2[:, 1]).amin(1)
    disagree = (masked != unmasked[:, None]).sum(1)
    alert = disagree > 0
    ok = (unmasked == labels) & ~alert & (gap > float_slack(z, rtol))
    return {"pred": torch.where(alert, -1, unmasked), "alert": alert, "certified": ok, "disagree": disagree, "gap": gap}


# --------------------------------------------------------------------------- harness
def bagnet_logits(model, images, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """Return the BagNet's local logits (B, C, h, w) of images (B, 3, n, n), on the CPU, computed batch by batch."""
    x = check_images(images)
    model = model.to(device).eval()
    with torch.no_grad():
        return torch.cat(
            [
                model.local_logits(x[s : s + batch_size].to(device)).float().cpu()
                for s in range(0, x.shape[0], batch_size)
            ]
        )


def _run(
    defense: str, core, model, images, labels, patch, batch_size: int, device, ids, logits: torch.Tensor | None = None
) -> pd.DataFrame:
    """Check the inputs, compute local logits batch by batch (or take ``logits``, precomputed by
    :func:`bagnet_logits` for these images), apply ``core`` and return the common records."""
    if not hasattr(model, "local_logits") or not hasattr(model, "geometry"):
        raise ValueError(f"model must expose local_logits() and geometry() (a BagNet), got {type(model).__name__}")
    x = check_images(images)
    y = check_labels(labels, x.shape[0], model.num_classes)
    n, nb = x.shape[-1], x.shape[0]
    p = patch_pixels(patch, n)
    ids = batch_ids(batch_size, ids, nb)
    device = torch.device(device)
    model = model.to(device).eval()
    h, w = model.logit_shape(n)
    if logits is not None and tuple(logits.shape) != (nb, model.num_classes, h, w):
        raise ValueError(f"logits must have shape {(nb, model.num_classes, h, w)}, got {tuple(logits.shape)}")
    win = feature_window(model.geometry(), n, p, min(h, w))
    n_windows = len(window_rects(h, w, win))
    recs = []
    for s in range(0, nb, batch_size):
        t0 = time.perf_counter()
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        with torch.no_grad():
            z = model.local_logits(xb) if logits is None else logits[s : s + batch_size].to(device)
            out = core(z, yb, win)
        seconds = (time.perf_counter() - t0) / len(xb)
        pred = out["pred"].tolist()
        alert = out.get("alert", torch.zeros_like(yb, dtype=torch.bool)).tolist()
        extra = {k: v.tolist() for k, v in out.items() if k not in ("pred", "alert", "certified")}
        for j, (lab, ok) in enumerate(zip(yb.tolist(), out["certified"].tolist())):
            recs.append(
                {
                    "id": ids[s + j],
                    "label": lab,
                    "pred": pred[j],
                    "alert": alert[j],
                    "clean_correct": pred[j] == lab and not alert[j],
                    "certified": ok,
                    "forwards": 1,
                    "seconds": seconds,
                    "patch_px": p,
                    "window": win,
                    "windows": n_windows,
                    **{k: v[j] for k, v in extra.items()},
                }
            )
    return records_frame(recs, defense, DEFENSE_KINDS[defense])


def certify_cbn(
    model,
    images,
    labels,
    patch,
    clip: str = "tanh",
    a: float = 0.05,
    b: float = -1.0,
    rtol: float = 1e-5,
    batch_size: int = 64,
    device="cpu",
    ids=None,
    logits: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Clipped BagNet: one row per image (common peer records, defense "CBN", kind "recovery").

    INPUT: a BagNet; images (B, 3, n, n) in [0, 1]; labels (B,); patch in pixels (int) or % of the
    image (float); clipping ``clip`` in ("tanh", "clamp") with parameters a, b (see the module doc);
    ``rtol``: float guard of the certificate (see :func:`float_slack`; 0 = exact-arithmetic rule);
    ``logits``: the local logits of these images from :func:`bagnet_logits` (then no forward pass runs).
    OUTPUT: id, label, pred (argmax of the summed clipped local logits), alert (False),
    clean_correct, certified, forwards (1), seconds, patch_px, window (w, feature positions),
    windows (N), margin (the worst-case margin over windows and classes; certified iff > the guard).
    """
    clip_logits(torch.zeros(1), clip, a, b)  # validate the clipping before any work
    return _run(
        "CBN",
        lambda z, y, win: cbn_local(z, y, win, clip, a, b, rtol),
        model,
        images,
        labels,
        patch,
        batch_size,
        device,
        ids,
        logits,
    )


def certify_pg_mask_bn(
    model,
    images,
    labels,
    patch,
    rtol: float = 1e-5,
    batch_size: int = 64,
    device="cpu",
    ids=None,
    logits: torch.Tensor | None = None,
) -> pd.DataFrame:
    """PatchGuard robust masking on a BagNet: one row per image (defense "PG-Mask-BN", kind "recovery").

    INPUT: as :func:`certify_cbn` without the clipping parameters (the evidence is ReLU-clipped).
    OUTPUT: the common records plus patch_px, window, windows and margin (min over W0 of
    L(W0) - max_k U_k(W0); certified iff the prediction is the label and margin > the guard).
    """
    return _run(
        "PG-Mask-BN",
        lambda z, y, win: pg_mask_local(z, y, win, rtol),
        model,
        images,
        labels,
        patch,
        batch_size,
        device,
        ids,
        logits,
    )


def certify_pgpp(
    model,
    images,
    labels,
    patch,
    clip: str | None = None,
    rtol: float = 1e-5,
    batch_size: int = 64,
    device="cpu",
    ids=None,
    logits: torch.Tensor | None = None,
) -> pd.DataFrame:
    """PatchGuard++ certified detection on a BagNet: one row per image (defense "PatchGuard++", kind "detection").

    INPUT: as :func:`certify_cbn`; ``clip`` None (sum raw local logits) or "relu".
    OUTPUT: the common records (pred = -1 and alert = True when a masked prediction disagrees)
    plus patch_px, window, windows, disagree (number of windows whose masked prediction differs) and
    gap (smallest lead of a masked prediction over its runner-up).
    """
    if clip not in (None, "relu"):
        raise ValueError(f"unknown PatchGuard++ clipping {clip!r}: expected None or 'relu'")
    return _run(
        "PatchGuard++",
        lambda z, y, win: pgpp_local(z, y, win, clip, rtol),
        model,
        images,
        labels,
        patch,
        batch_size,
        device,
        ids,
        logits,
    )
