"""Soundness audit: patch every position of certified images with several contents and run detect.

The "attack" content is the detector-aware attack of ``scalecert.attacks`` (PGD on the patch that
pushes M(x') and every candidate masked prediction towards one wrong label).

A *violation* is a patched image x' of a certified image (x, y) for which ``detect(x')`` returns
a label other than y without an alert. The audit is exact and cheap: ``detect(x')`` can only
return a wrong label if ``M(x') != y``, so only those x' are passed to the detector, which may
stop at its first disagreeing window (that already means an alert); the windows that contain the patch, one of
which disagrees when the certificate holds, are tried first.

PatchCleanser (:mod:`scalecert.baselines.patchcleanser`, a *recovery* defence) is audited the same way by
:func:`audit_image_patchcleanser` / :func:`audit_records_patchcleanser`: for every image its certificate holds for
(every one- and two-mask prediction equals the label), each patch position x content must leave the double-masking
output equal to the label; a violation is any other output (there is no alert to fall back on). The double-masking
output does not depend on the plain model's, so every patched image is run through double masking (at least k^2
forwards each). Its "attack" content is :func:`patchcleanser_attack_loss`: PGD on the patch pushing the one-mask
predictions that still see the patch (masks that do not wholly contain it, the predictions the first round of double
masking relies on) towards one wrong label.
"""

from __future__ import annotations

import json

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attacks import apply_patch, detector_aware_attack, pgd_patch
from .defense import Engine
from .geometry import patch_boxes

CONTENTS = ("zeros", "ones", "noise", "attack")


def patch_positions(n: int, p: int, stride: int = 1) -> torch.Tensor:
    """Return every top-left corner (a, b) of a p x p patch (stride apart, last one included)."""
    pos = list(range(0, n - p + 1, stride))
    if pos[-1] != n - p:
        pos.append(n - p)
    a, b = torch.meshgrid(torch.tensor(pos), torch.tensor(pos), indexing="ij")
    return torch.stack([a.flatten(), b.flatten()], 1)


def paste(x: torch.Tensor, patch: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Return copies of one image x (3, n, n) with a patch (3, p, p) or patches (M, 3, p, p) at each corner."""
    return apply_patch(x.unsqueeze(0).expand(len(corners), -1, -1, -1), patch, corners)


def _patched_batches(
    x: torch.Tensor,
    y: int,
    n: int,
    p: int,
    contents,
    stride: int,
    attack_stride: int | None,
    batch: int,
    attack_batch: int,
    seed: int,
    attack,
):
    """Yield (content, corners (M, 2), patched images (M, 3, n, n)) of one image x (3, n, n) over positions x contents.

    The fixed contents visit every position ``stride`` apart, ``batch`` at a time; noise draws one patch per
    position from a generator seeded with ``seed`` (in content and batch order). The attack visits positions
    ``attack_stride`` apart (default ``stride``), ``attack_batch`` at a time: ``attack(images, labels, corners, seed)``
    returns the patched images, run with gradients on and seeded with ``seed`` + the batch's first position index.
    """
    unknown = [c for c in contents if c not in CONTENTS]
    if unknown:
        raise ValueError(f"unknown patch content {unknown[0]!r}: expected one of {CONTENTS}")
    g = torch.Generator().manual_seed(seed)
    for content in contents:
        corners = patch_positions(n, p, attack_stride or stride if content == "attack" else stride)
        # the attack keeps an autograd graph per (position, window or mask): a small batch bounds its memory
        bs = attack_batch if content == "attack" else batch
        for s in range(0, len(corners), bs):
            cs = corners[s : s + bs]
            if content == "attack":
                xs = x.unsqueeze(0).expand(len(cs), -1, -1, -1)
                with torch.enable_grad():
                    xp = attack(xs, torch.full((len(cs),), y), cs, seed + s)
                yield content, cs, xp
                continue
            if content == "zeros":
                pt = torch.zeros(3, p, p)
            elif content == "ones":
                pt = torch.ones(3, p, p)
            else:  # noise
                pt = torch.rand(len(cs), 3, p, p, generator=g)
            yield content, cs, paste(x, pt.to(x.device), cs.to(x.device))


@torch.no_grad()
def audit_image(
    engine: Engine,
    x: torch.Tensor,
    y: int,
    contents=CONTENTS,
    stride: int = 1,
    attack_steps: int = 5,
    seed: int = 0,
    batch: int = 256,
    attack_batch: int = 32,
    attack_stride: int | None = None,
) -> dict:
    """Return counts {cases, flipped, violations} for one certified image over positions x contents.

    ``batch`` positions are patched at once (``attack_batch`` for the gradient attack). The fixed
    contents visit every position ``stride`` apart; the attack, which costs ``attack_steps`` forward and
    backward passes per position and window, visits positions ``attack_stride`` apart (default ``stride``).
    """

    def attack(xs, ys, cs, s):  # detector-aware: wrong label for M(x') and every candidate M_w(x')
        return detector_aware_attack(engine, xs, ys, cs, steps=attack_steps, seed=s, max_windows=16)[0]

    cases = flipped = violations = 0
    examples = []
    for content, cs, xp in _patched_batches(
        x, y, engine.n, engine.p, contents, stride, attack_stride, batch, attack_batch, seed, attack
    ):
        pred = engine.model(xp).argmax(1)
        wrong = (pred != y).nonzero().flatten()
        cases += len(cs)
        flipped += len(wrong)
        if len(wrong):
            # the windows that contain the patch go first: for a certified image one of them must disagree
            recs = engine.run(xp[wrong], pred[wrong].cpu(), early_stop=True, first=patch_boxes(cs[wrong], engine.p))
            for j, rec in zip(wrong.tolist(), recs):
                if rec["certified"]:  # every candidate agrees with the wrong label: no alert
                    violations += 1
                    if len(examples) < 5:
                        examples.append({"corner": cs[j].tolist(), "content": content, "pred": rec["pred"]})
    return {"cases": cases, "flipped": flipped, "violations": violations, "examples": examples}


def audit_records(
    engine: Engine, images: torch.Tensor, labels: torch.Tensor, ids=None, progress: bool = True, **kw
) -> pd.DataFrame:
    """Return one audit row per image (id, label, certified, cases, flipped, violations, example); uncertified
    images get zero cases."""
    recs = engine.run(images, labels)
    rows = []
    for i, rec in enumerate(tqdm(recs, disable=not progress, desc=f"audit {engine.mode}")):
        row = {
            "id": int(ids[i]) if ids is not None else i,
            "label": int(labels[i]),
            "certified": bool(rec["certified"]),
            "cases": 0,
            "flipped": 0,
            "violations": 0,
            "example": "",
        }
        if rec["certified"]:
            r = audit_image(engine, images[i].to(engine.device), int(labels[i]), **kw)
            row.update({k: r[k] for k in ("cases", "flipped", "violations")})
            row["example"] = json.dumps(r["examples"][0]) if r["examples"] else ""
        rows.append(row)
    return pd.DataFrame(rows)


def audit(engine: Engine, images: torch.Tensor, labels: torch.Tensor, progress: bool = True, **kw) -> dict:
    """Return audit totals over the images that ``engine`` certifies (others are skipped)."""
    df = audit_records(engine, images, labels, progress=progress, **kw)
    total = {"images": len(df), "certified": int(df.certified.sum())}
    total.update({k: int(df[k].sum()) for k in ("cases", "flipped", "violations")})
    total["examples"] = [dict(json.loads(e), image=i) for i, e in zip(df.id, df.example) if e]
    return total


# --------------------------------------------------------------------------- PatchCleanser (recovery)
#: one-mask predictions per image and PGD step of the PatchCleanser attack (sampled among the masks that see the patch)
ATTACK_MASKS = 16


def patchcleanser_attack_loss(
    family, corners: torch.Tensor, max_masks: int | None = ATTACK_MASKS, seed: int = 0, fill: float | None = None
):
    """Return a ``pgd_patch`` loss against double masking for patches at ``corners`` (B, 2) of the mask set ``family``.

    Per image, the masks that do not wholly contain its patch (their one-mask prediction still sees the patch: the
    predictions double masking's first round relies on), at most ``max_masks`` of them sampled once (seeded); the
    loss (B,) pushes those one-mask predictions towards one wrong label: the mean over them of CE(label) minus
    CE(wrong), the wrong label being the strongest other class of their summed logits (re-chosen each step).
    """
    from .baselines import patchcleanser as PC
    from .geometry import rect_masks

    fill = PC.FILL if fill is None else fill
    p, boxes = family.patch, family.boxes
    c = corners.cpu()
    inside = (
        (boxes[None, :, 0] <= c[:, None, 0])
        & (boxes[None, :, 1] <= c[:, None, 1])
        & (boxes[None, :, 2] >= c[:, None, 0] + p - 1)
        & (boxes[None, :, 3] >= c[:, None, 1] + p - 1)
    )
    score = torch.rand(inside.shape, generator=torch.Generator().manual_seed(seed))
    score[inside] = -1.0  # masks holding the patch are never sampled
    take = min(max_masks or len(family), len(family))
    top = score.topk(take, 1).indices  # (B, take), the sampled masks first
    keep = score.gather(1, top) >= 0
    img, mask = torch.arange(len(c))[:, None].expand_as(top)[keep], top[keep]
    hidden = rect_masks(boxes, family.n, family.n)
    counts = torch.bincount(img, minlength=len(c)).clamp(min=1)

    def loss(m, xp, y):
        dev = xp.device
        i, k = img.to(dev), mask.to(dev)
        logits = m(xp[i].masked_fill(hidden.to(dev)[k].unsqueeze(1), fill))
        summed = torch.zeros(len(y), logits.shape[1], device=dev).index_add(0, i, logits.detach().float())
        summed[torch.arange(len(y), device=dev), y] = -float("inf")
        y_adv = summed.argmax(1)
        per = F.cross_entropy(logits, y[i], reduction="none") - F.cross_entropy(logits, y_adv[i], reduction="none")
        return torch.zeros(len(y), device=dev, dtype=per.dtype).index_add(0, i, per) / counts.to(dev)

    return loss


@torch.no_grad()
def audit_image_patchcleanser(
    model,
    family,
    x: torch.Tensor,
    y: int,
    contents=CONTENTS,
    stride: int = 1,
    attack_steps: int = 5,
    seed: int = 0,
    batch: int = 64,
    attack_batch: int = 4,
    attack_stride: int | None = None,
    attack_masks: int | None = ATTACK_MASKS,
    chunk: int | None = None,
) -> dict:
    """Return counts {cases, flipped, violations, second_round} of one image (3, n, n) that PatchCleanser certifies
    for y on the mask set ``family``, over positions x contents of a ``family.patch`` px patch.

    ``flipped``: the plain model's output on the patched image is not y (the patch fools the undefended model);
    ``violations``: double masking's output (:func:`scalecert.baselines.patchcleanser.double_masking`, run round by
    round) is not y; ``second_round``: cases double masking did not decide in its first round (case 2 or 3). The
    positions and contents are those of :func:`audit_image`; the attack is PGD (``attack_steps`` steps) with
    :func:`patchcleanser_attack_loss` over at most ``attack_masks`` masks per position.
    """
    # the module, not the function: looked up at each call, so that a test may replace double_masking
    from .baselines import patchcleanser as PC

    def attack(xs, ys, cs, s):
        return pgd_patch(
            model,
            xs,
            ys,
            family.patch,
            corners=cs,
            steps=attack_steps,
            seed=s,
            loss_fn=patchcleanser_attack_loss(family, cs, attack_masks, seed=s),
        )[0]

    cases = flipped = violations = second = 0
    examples = []
    for content, cs, xp in _patched_batches(
        x, y, family.n, family.patch, contents, stride, attack_stride, batch, attack_batch, seed, attack
    ):
        plain = model(xp).argmax(1).cpu()
        out = PC.double_masking(model, xp, family=family, chunk=chunk)
        bad = (out["pred"] != y).nonzero().flatten()
        cases += len(cs)
        flipped += int((plain != y).sum())
        second += int((out["case"] > 1).sum())
        violations += len(bad)
        for j in bad.tolist()[: max(0, 5 - len(examples))]:
            examples.append({"corner": cs[j].tolist(), "content": content, "pred": int(out["pred"][j])})
    return {"cases": cases, "flipped": flipped, "violations": violations, "second_round": second, "examples": examples}


def audit_records_patchcleanser(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    patch,
    k: int | None = None,
    ids=None,
    certificates: pd.DataFrame | None = None,
    progress: bool = True,
    chunk: int | None = None,
    device=None,
    **kw,
) -> pd.DataFrame:
    """Return one PatchCleanser audit row per image (id, label, certified, min_lead, cases, flipped, violations,
    second_round, example): the images its certificate holds for (patch in px or %, k x k masks, default the paper's 6)
    are audited by :func:`audit_image_patchcleanser` (``kw``); the others get zero cases. ``min_lead`` is the
    certificate's smallest top-1 lead (a near tie there may flip under float noise).

    The certificates are ``certificates`` (records of :func:`scalecert.baselines.patchcleanser.certify_patchcleanser`
    holding every id, e.g. the peer harness's cached run of the same images) or, if None, computed here."""
    from .baselines import patchcleanser as PC
    from .windows import mask_set

    k = PC.PAPER_K if k is None else k
    dev = PC._device_of(model, device)
    model = model.to(dev).eval()
    family = mask_set(images.shape[-1], patch, k)
    ids = list(range(len(images))) if ids is None else [int(i) for i in ids]
    if certificates is None:
        certificates = PC.certify_patchcleanser(model, images, labels, patch, k=k, chunk=chunk, device=dev, ids=ids)
    cert = certificates.set_index("id")
    missing = sorted(set(ids) - set(cert.index))
    if missing:
        raise ValueError(f"certificates lack the images {missing[:5]}")
    rows = []
    for i, id_ in enumerate(tqdm(ids, disable=not progress, desc="audit PatchCleanser")):
        rec = cert.loc[id_]
        if int(rec.label) != int(labels[i]):
            raise ValueError(f"image {id_}: the certificate is for label {int(rec.label)}, not {int(labels[i])}")
        row = {
            "id": id_,
            "label": int(labels[i]),
            "certified": bool(rec.certified),
            "min_lead": float(rec.min_lead),
            "cases": 0,
            "flipped": 0,
            "violations": 0,
            "second_round": 0,
            "example": "",
        }
        if rec.certified:
            r = audit_image_patchcleanser(model, family, images[i].to(dev), int(labels[i]), chunk=chunk, **kw)
            row.update({c: r[c] for c in ("cases", "flipped", "violations", "second_round")})
            row["example"] = json.dumps(r["examples"][0]) if r["examples"] else ""
        rows.append(row)
    return pd.DataFrame(rows)


def audit_patchcleanser(model, images: torch.Tensor, labels: torch.Tensor, patch, progress: bool = True, **kw) -> dict:
    """Return PatchCleanser audit totals over the images it certifies (others are skipped), like :func:`audit`."""
    df = audit_records_patchcleanser(model, images, labels, patch, progress=progress, **kw)
    total = {"images": len(df), "certified": int(df.certified.sum())}
    total.update({c: int(df[c].sum()) for c in ("cases", "flipped", "violations", "second_round")})
    total["examples"] = [dict(json.loads(e), image=i) for i, e in zip(df.id, df.example) if e]
    return total
