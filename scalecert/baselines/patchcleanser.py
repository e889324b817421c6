"""PatchCleanser double masking (Xiang, Mahloujifar and Mittal, USENIX Security 2022) as a recovery peer.

Method
------
Xiang, Mahloujifar and Mittal, "PatchCleanser: Certifiably Robust Defense against Adversarial
Patches for Any Image Classifier", USENIX Security 2022. Model-agnostic: any classifier F is
evaluated on images with some pixels hidden.

* **Mask set** — :func:`scalecert.windows.mask_set`: k x k square masks (k = 6, 36 masks) of side
  ``m = p + s - 1`` at stride ``s = ceil((n - p + 1) / k)``, the last position on each axis always
  included, so every p x p patch lies wholly inside at least one mask (the paper's R-covering set).
  Masks are numbered in row-major order of their top-left corners (the reference code's order).
* **Masking** — the pixels of a mask (of the union of two masks) are set to ``FILL`` = 0.0 in
  [0, 1] image space, the fill of :meth:`scalecert.defense.Engine.fill_windows`; the models
  normalise inside, so a hidden pixel is black.
* **Double masking** (the paper's Algorithm 1, :func:`double_masking`): first round, the one-mask
  predictions ``F(x ⊙ m)`` of every mask m. Case I: all agree -> output that label. Otherwise the
  majority label of the first round is ``y_maj`` and the *disagreers* are the masks whose one-mask
  label differs from it. For each disagreer ``m_d`` (in mask order) the second round evaluates
  ``F(x ⊙ m_d ⊙ m)`` for every mask m; case II: if every one equals ``m_d``'s one-mask label, output
  that label (the first disagreer that passes). Case III: no disagreer passes -> output ``y_maj``.
  :func:`double_masking_decision` is the same decision as a pure function of a two-mask label table.
* **Certificate** (the paper's robustness theorem for double masking, :func:`certify_patchcleanser`): certified for
  label y iff every two-mask prediction ``F(x ⊙ m_i ⊙ m_j)``, every pair i <= j including i = j (the
  one-mask predictions), equals y. A patch lies inside some mask m*; every image double masking
  then sees with m* among its masks equals the clean image's, so the first round agrees on y or
  every disagreer fails its second round (its pair with m* is y) while m*'s second round passes.

Cost accounting
---------------
* ``forwards``: the network evaluations double-masking inference spends on the image, as
  :func:`double_masking` runs it: k^2 one-mask predictions, plus k^2 - 1 for every disagreer whose
  second round is run (in mask order, up to the first that passes; all disagreers in case III). The
  second round's pair of ``m_d`` with itself is the first-round image again, so it is not re-run
  (Algorithm 1 lists it; the reference code evaluates it). No unmasked forward: Algorithm 1 has none.
* ``certify_forwards``: k^2 (k^2 + 1) / 2 (666 for k = 6), the pair table a certified image needs.
  The harness run (:func:`certify_early_exit`) evaluates the first round for every image and the rest
  of the table only while it can still certify: an image with a wrong one-mask label costs the
  inference's ``forwards``, one with a wrong pair leaves at that group of pairs (``pairs_evaluated``).
  A test checks that its outputs equal those read off the full table by
  :func:`double_masking_decision` and those of :func:`double_masking` run on its own.

Deviations from the paper (say so beside any number made with this module)
-------------------------------------------------------------------------
* Majority ties (two labels with the same largest first-round count) go to the smaller label, the
  project's rule elsewhere. Neither the paper nor the reference code fixes one (the reference takes
  the last of ``np.argsort`` of the counts, which depends on numpy's sort kind).
* The fill is black in [0, 1] space; the reference code fills zeros *after* normalisation (the data
  mean colour). The default models are the project's vanilla ResNets, not PatchCleanser's
  mask-trained (Cutout) ViT / ResMLP / BiT models; any project checkpoint can be given.
* Float noise: one image evaluated in different batch compositions can give logits that differ in
  the last bits, so an argmax within that of a tie may flip between the certification run and an
  attack. Records keep ``min_lead``, the smallest lead of a pair prediction's top label over the
  runner-up, so such near ties are visible; the certificate itself is the exact-arithmetic rule.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..defense import check_images, check_labels, default_chunk
from ..geometry import rect_masks
from ..windows import WindowFamily, mask_set
from . import batch_ids, records_frame

KIND = "recovery"
DEFENSE = "PatchCleanser"
#: masks per axis of the PatchCleanser paper's main results (6 x 6 = 36 masks)
PAPER_K = 6
#: hidden pixels take this value in [0, 1] image space (Engine.fill's default; the models normalise inside)
FILL = 0.0
#: the groups in which ``certify_early_exit`` evaluates the two-mask pairs (an image leaves at its first wrong group)
EARLY_GROUPS = 6


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _item_bytes(model: nn.Module, n: int, device) -> int:
    """Return the activation memory of one masked input (every leaf module's output, fp32, x2) from a dry run."""
    total = [3 * n * n]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, n, n, device=device))
    finally:
        for h in handles:
            h.remove()
    return 8 * total[0]


def _family(n: int, patch, k: int, family: WindowFamily | None) -> WindowFamily:
    """Return the mask set to use: ``family`` if given (checked against n), else ``mask_set(n, patch, k)``."""
    if family is None:
        return mask_set(n, patch, k)
    if not isinstance(family, WindowFamily) or family.n != n:
        raise ValueError(f"family must be a WindowFamily for {n}x{n} images")
    return family


def _setup(model, images, family, chunk, device):
    x = check_images(images, family.n)
    device = _device_of(model, device)
    model = model.to(device).eval()
    masks = rect_masks(family.boxes.to(device), family.n, family.n)
    chunk = chunk or default_chunk(_item_bytes(model, family.n, device), device)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return x.to(device), model, masks, chunk


@torch.no_grad()
def masked_predictions(
    model: nn.Module,
    x: torch.Tensor,
    masks: torch.Tensor,
    img: torch.Tensor,
    first: torch.Tensor,
    second: torch.Tensor,
    chunk: int,
    fill: float = FILL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the label (P,) and its lead over the runner-up (P,) of each (image, mask, mask) triple, on the CPU.

    INPUT: images x (B, 3, n, n); boolean masks (K, n, n), True where hidden; index tensors ``img``,
    ``first``, ``second`` (P,) (``first == second`` for a one-mask prediction). Triple t is the image
    ``x[img[t]]`` with the pixels of both masks set to ``fill``; they are evaluated ``chunk`` at a time.
    OUTPUT: argmax labels (ties to the smaller class) and top-1 minus top-2 logits.
    """
    labels, leads = [], []
    for s in range(0, len(img), chunk):
        sl = slice(s, s + chunk)
        hide = (masks[first[sl]] | masks[second[sl]]).unsqueeze(1)
        logits = model(x[img[sl]].masked_fill(hide, fill)).float()
        top2 = logits.topk(min(2, logits.shape[1]), 1).values
        labels.append(logits.argmax(1).cpu())
        leads.append((top2[:, 0] - top2[:, -1]).cpu())  # 0 for a one-class model
    if not labels:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(labels), torch.cat(leads)


def pair_table(
    model: nn.Module,
    images: torch.Tensor,
    family: WindowFamily,
    chunk: int | None = None,
    device=None,
    fill: float = FILL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the two-mask labels (B, K, K) and leads (B, K, K) of images (B, 3, n, n), symmetric, on the CPU.

    Entry (i, j) is ``F(x ⊙ m_i ⊙ m_j)``, the diagonal the one-mask predictions; each of the K (K + 1) / 2
    pairs i <= j is evaluated once per image (``chunk`` triples at a time, default from
    :func:`scalecert.defense.default_chunk`) and mirrored.
    """
    x, model, masks, chunk = _setup(model, images, family, chunk, device)
    b, k = x.shape[0], len(family)
    i, j = torch.triu_indices(k, k, device=x.device)
    img = torch.arange(b, device=x.device).repeat_interleave(len(i))
    lab, lead = masked_predictions(model, x, masks, img, i.repeat(b), j.repeat(b), chunk, fill)
    labels = torch.zeros(b, k, k, dtype=torch.long)
    leads = torch.zeros(b, k, k)
    i, j = i.cpu(), j.cpu()
    labels[:, i, j], leads[:, i, j] = lab.view(b, -1), lead.view(b, -1)
    labels[:, j, i], leads[:, j, i] = lab.view(b, -1), lead.view(b, -1)
    return labels, leads


# --------------------------------------------------------------------------- decision (pure functions)
def _first_argmax(t: torch.Tensor) -> torch.Tensor:
    """Return the index of the largest entry along the last dim, ties to the smaller index."""
    idx = torch.arange(t.shape[-1], device=t.device).expand_as(t)
    return torch.where(t == t.amax(-1, keepdim=True), idx, t.shape[-1]).amin(-1)


def first_round(one: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (majority label (B,), disagreer masks (B, K) bool) of one-mask labels (B, K); majority ties to the
    smaller label."""
    counts = F.one_hot(one, int(one.max()) + 1).sum(1)
    majority = _first_argmax(counts)
    return majority, one != majority[:, None]


def _check_table(table) -> torch.Tensor:
    if (
        not isinstance(table, torch.Tensor)
        or table.dim() != 3
        or table.shape[1] != table.shape[2]
        or table.shape[1] < 1
        or table.dtype.is_floating_point
        or table.dtype == torch.bool
    ):
        raise ValueError(
            f"table must be an integer tensor (B, K, K), got "
            f"{tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}"
        )
    if (table < 0).any():
        raise ValueError("table labels must be non-negative")
    if not torch.equal(table, table.transpose(1, 2)):
        raise ValueError("table must be symmetric: entry (i, j) is the prediction with masks i and j both applied")
    return table.long()


def double_masking_decision(table: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return PatchCleanser's output for two-mask label tables (B, K, K): ``pred``, ``case`` (1 agreed, 2 disagreer,
    3 majority), ``disagreers`` (first-round count) and ``forwards`` (evaluations :func:`double_masking` spends).

    The table's diagonal holds the one-mask labels and row i the two-mask labels of mask i with every mask
    (Algorithm 1 on a precomputed table, as :func:`double_masking` decides it round by round).
    """
    table = _check_table(table)
    b, k, _ = table.shape
    one = table.diagonal(dim1=1, dim2=2)
    majority, dis = first_round(one)
    order = torch.arange(k, device=table.device)
    passes = dis & (table == one[:, :, None]).all(2)
    first = torch.where(passes, order, k).amin(1)  # k when no disagreer passes
    found = first < k
    dis_label = one.gather(1, first.clamp(max=k - 1)[:, None])[:, 0]
    # second rounds run in mask order up to the first disagreer that passes (every disagreer in case III)
    examined = (dis & (order[None] <= first[:, None])).sum(1)
    agreed = ~dis.any(1)
    return {
        "pred": torch.where(found, dis_label, majority),
        "case": torch.where(agreed, 1, torch.where(found, 2, 3)),
        "disagreers": dis.sum(1),
        "forwards": k + examined * (k - 1),
    }


# --------------------------------------------------------------------------- inference
@torch.no_grad()
def double_masking(
    model: nn.Module,
    images: torch.Tensor,
    patch=None,
    k: int = PAPER_K,
    family: WindowFamily | None = None,
    chunk: int | None = None,
    device=None,
    fill: float = FILL,
) -> dict[str, torch.Tensor]:
    """Return double-masking inference of images (B, 3, n, n) run round by round: ``pred``, ``case``, ``disagreers``
    and ``forwards`` (network evaluations actually run per image), each (B,) on the CPU.

    INPUT: any model mapping (N, 3, n, n) images in [0, 1] to logits; the mask set ``family`` or a patch
    (pixels or % of the image) and k for :func:`scalecert.windows.mask_set`. The first round evaluates all
    B x K one-mask images in chunks; second round t evaluates, for every image still undecided, its t-th
    disagreer paired with each other mask, all images at once.
    """
    x = check_images(images)
    family = _family(x.shape[-1], patch, k, family)
    x, model, masks, chunk = _setup(model, x, family, chunk, device)
    b, k = x.shape[0], len(family)
    img = torch.arange(b, device=x.device).repeat_interleave(k)
    mi = torch.arange(k, device=x.device).repeat(b)
    one = masked_predictions(model, x, masks, img, mi, mi, chunk, fill)[0].view(b, k)
    return second_rounds(model, x, masks, one, chunk, fill)


@torch.no_grad()
def second_rounds(
    model: nn.Module, x: torch.Tensor, masks: torch.Tensor, one: torch.Tensor, chunk: int, fill: float = FILL
) -> dict[str, torch.Tensor]:
    """Return double masking's ``pred``, ``case``, ``disagreers`` and ``forwards`` (B,) given the first round's
    one-mask labels ``one`` (B, K) of images x (B, 3, n, n) under boolean masks (K, n, n): second round t evaluates,
    for every image still undecided, its t-th disagreer paired with each other mask, all images at once."""
    b, k = one.shape
    dev = x.device
    majority, dis = first_round(one)
    pred, forwards = majority.clone(), torch.full((b,), k, dtype=torch.long)
    case = torch.where(dis.any(1), 3, 1)
    rank = dis.long().cumsum(1) * dis  # 1-based rank of each disagreer, else 0
    undecided = dis.any(1)
    partners = torch.arange(k)
    for t in range(1, int(dis.sum(1).max()) + 1):
        bi, di = (undecided[:, None] & (rank == t)).nonzero(as_tuple=True)
        if len(bi) == 0:
            break
        other = partners[None, :].expand(len(bi), k)
        other = other[other != di[:, None]].view(len(bi), k - 1)  # the pair (d, d) is the first-round image
        bb, dd = bi.repeat_interleave(k - 1), di.repeat_interleave(k - 1)
        lab = masked_predictions(model, x, masks, bb.to(dev), dd.to(dev), other.flatten().to(dev), chunk, fill)[0].view(
            len(bi), k - 1
        )
        forwards[bi] += k - 1
        ok = (lab == one[bi, di][:, None]).all(1)
        pred[bi[ok]], case[bi[ok]], undecided[bi[ok]] = one[bi[ok], di[ok]], 2, False
    return {"pred": pred, "case": case, "disagreers": dis.sum(1), "forwards": forwards}


@torch.no_grad()
def certify_early_exit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    family: WindowFamily,
    chunk: int | None = None,
    device=None,
    fill: float = FILL,
    groups: int = EARLY_GROUPS,
) -> dict[str, torch.Tensor]:
    """Return double masking's output (as :func:`double_masking`) plus ``certified``, ``wrong_pairs``, ``min_lead``
    and ``pairs_evaluated`` (B,) of images (B, 3, n, n) for their labels (B,), evaluating no more pairs than needed.

    The first round (K one-mask predictions) runs for every image; an image with a one-mask label other than its
    own cannot be certified, and only double masking's second rounds are run for it. The others evaluate the
    K (K - 1) / 2 two-mask pairs in ``groups`` groups, an image leaving at the first group holding a wrong label.
    The certificate is the one of the full pair table (a test checks it); ``wrong_pairs`` and ``min_lead`` are over
    the pairs evaluated, ``wrong_pairs`` NaN for an image that left early (its count is not known).
    """
    x, model, masks, chunk = _setup(model, images, family, chunk, device)
    b, k = x.shape[0], len(family)
    dev = x.device
    y = labels.cpu().long()
    img = torch.arange(b, device=dev).repeat_interleave(k)
    mi = torch.arange(k, device=dev).repeat(b)
    lab, lead = masked_predictions(model, x, masks, img, mi, mi, chunk, fill)
    one, lead = lab.view(b, k), lead.view(b, k)
    out = second_rounds(model, x, masks, one, chunk, fill)
    wrong = (one != y[:, None]).sum(1).double()
    min_lead = lead.amin(1)
    alive = wrong == 0
    evaluated = torch.full((b,), k, dtype=torch.long)
    i, j = torch.triu_indices(k, k, 1)
    for gi, gj in zip(i.tensor_split(groups), j.tensor_split(groups)):
        idx = alive.nonzero()[:, 0]
        if len(idx) == 0 or len(gi) == 0:
            break
        g = len(gi)
        lab, lead = masked_predictions(
            model,
            x,
            masks,
            idx.repeat_interleave(g).to(dev),
            gi.repeat(len(idx)).to(dev),
            gj.repeat(len(idx)).to(dev),
            chunk,
            fill,
        )
        bad = (lab.view(-1, g) != y[idx, None]).sum(1)
        wrong[idx] += bad.double()
        min_lead[idx] = torch.minimum(min_lead[idx], lead.view(-1, g).amin(1))
        evaluated[idx] += g
        alive[idx] = bad == 0
    certified = alive
    # an image that left after the first round or a group has a count over part of its table only
    left_early = ~certified & (evaluated < k * (k + 1) // 2)
    wrong[left_early] = float("nan")
    return {**out, "certified": certified, "wrong_pairs": wrong, "min_lead": min_lead, "pairs_evaluated": evaluated}


def evaluations(records: pd.DataFrame) -> pd.Series:
    """Return the network evaluations a :func:`certify_patchcleanser` run spent on each image (per record).

    Early exit: the first round, the second rounds (``forwards`` - K) and the pairs beyond the one-mask images
    (``pairs_evaluated`` - K); an image that reached the whole table had no disagreer (its one-mask labels were all its
    own), so that is the table. Without early exit every image costs the table, which then also decides double masking
    (so do runs cached before the early exit, whose records have no ``pairs_evaluated``).
    """
    if "pairs_evaluated" not in records:
        return records.certify_forwards.copy()
    full = records.pairs_evaluated == records.certify_forwards
    return records.certify_forwards.where(full, records.forwards + records.pairs_evaluated - records.masks)


# --------------------------------------------------------------------------- certification (harness)
def certify_patchcleanser(
    model: nn.Module,
    images: torch.Tensor,
    labels,
    patch,
    k: int = PAPER_K,
    chunk: int | None = None,
    device=None,
    batch_size: int = 16,
    ids=None,
    fill: float = FILL,
    early_exit: bool = True,
) -> pd.DataFrame:
    """PatchCleanser: one row per image (common peer records, defense "PatchCleanser", kind "recovery").

    INPUT: any model on (N, 3, n, n) images in [0, 1] (e.g. :func:`scalecert.models.load_model`, its own
    forward, SIN layer included if it has one); images (B, 3, n, n); labels (B,); patch in pixels (int) or
    % of the image (float); k masks per axis (:func:`scalecert.windows.mask_set`); ``batch_size`` images
    per timed batch, whose pair tables are evaluated ``chunk`` masked images at a time.
    OUTPUT: id, label, pred (double masking, :func:`double_masking_decision`), alert (False), clean_correct,
    certified (every pair prediction equals the label), forwards (inference cost, see the module docstring),
    seconds (wall time per image of the pairs evaluated and the decision), certify_forwards (K (K + 1) / 2),
    patch_px, masks (K), mask_side, mask_stride, case (1-3), disagreers, wrong_pairs (pairs i <= j whose label
    is not the true one), min_lead (smallest top-1 lead over the runner-up among the pair predictions evaluated)
    and pairs_evaluated. ``early_exit`` (:func:`certify_early_exit`): an image stops at the first group of pairs
    that rules its certificate out (``wrong_pairs`` NaN then); False evaluates the whole table of every image.
    Both give the same id, pred, clean_correct, certified, forwards, case and disagreers (a test checks it).
    """
    x = check_images(images)
    b, n = x.shape[0], x.shape[-1]
    y = check_labels(labels, b, getattr(model, "num_classes", None) or torch.iinfo(torch.long).max)
    ids = batch_ids(batch_size, ids, b)
    family = mask_set(n, patch, k)
    if chunk is None:  # sized once (a one-image dry run), not per batch
        dev = _device_of(model, device)
        chunk = default_chunk(_item_bytes(model.to(dev).eval(), n, dev), dev)
    kk = len(family)
    n_pairs = kk * (kk + 1) // 2
    upper = torch.ones(kk, kk, dtype=torch.bool).triu()
    recs = []
    for s0 in range(0, b, batch_size):
        t0 = time.perf_counter()
        xb, yb = x[s0 : s0 + batch_size], y[s0 : s0 + batch_size]
        if early_exit:
            out = certify_early_exit(model, xb, yb, family, chunk, device, fill)
        else:
            table, leads = pair_table(model, xb, family, chunk, device, fill)
            out = double_masking_decision(table)
            wrong = ((table != yb[:, None, None]) & upper).sum((1, 2))
            out.update(
                certified=wrong == 0,
                wrong_pairs=wrong.double(),
                min_lead=leads.flatten(1).amin(1),
                pairs_evaluated=torch.full_like(wrong, n_pairs),
            )
        seconds = (time.perf_counter() - t0) / len(yb)
        cols = {c: v.tolist() for c, v in out.items()}
        for j, lab in enumerate(yb.tolist()):
            pr = cols["pred"][j]
            recs.append(
                {
                    "id": ids[s0 + j],
                    "label": lab,
                    "pred": pr,
                    "alert": False,
                    "clean_correct": pr == lab,
                    "certified": bool(cols["certified"][j]),
                    "forwards": cols["forwards"][j],
                    "seconds": seconds,
                    "certify_forwards": n_pairs,
                    "patch_px": family.patch,
                    "masks": kk,
                    "mask_side": family.side,
                    "mask_stride": family.stride,
                    "case": cols["case"][j],
                    "disagreers": cols["disagreers"][j],
                    "wrong_pairs": cols["wrong_pairs"][j],
                    "min_lead": float(cols["min_lead"][j]),
                    "pairs_evaluated": cols["pairs_evaluated"][j],
                }
            )
    return records_frame(recs, DEFENSE, KIND)
