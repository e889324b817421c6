"""Patch attacks: universal targeted patch (Eq. 3), per-image PGD, the adaptive alpha attack (Eq. 6),
and a detector-aware attack on ScaleCert's detect. All batched, seeded, device-agnostic; images stay in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .geometry import centre_inside, patch_boxes, rect_masks
from .sin import importance, masked_topk_from_order, sin_mask, strict_order

#: target classes chosen for the universal patch (ImageNet used 859 "toaster")
UNIVERSAL_TARGET = {"cifar10": 3, "imagenette": 8}  # cat; golf ball


def random_corners(b: int, n: int, p: int, gen: torch.Generator) -> torch.Tensor:
    """Return b random top-left corners of a p x p patch in an n x n image."""
    return torch.randint(0, n - p + 1, (b, 2), generator=gen)


def apply_patch(x: torch.Tensor, patch: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Return images x (B, 3, n, n) with patch (3, p, p) or patches (B, 3, p, p) pasted at per-image corners
    (differentiable)."""
    b, _, n, _ = x.shape
    p = patch.shape[-1]
    corners = corners.to(x.device)
    pt = patch.expand(b, 3, p, p) if patch.dim() == 3 else patch
    rows = (corners[:, 0:1] + torch.arange(p, device=x.device))[:, None, :, None]
    cols = (corners[:, 1:2] + torch.arange(p, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(3, device=x.device)[None, :, None, None]
    canvas = torch.zeros_like(x).index_put((bi, ci, rows, cols), pt.to(x.dtype))
    inside = rect_masks(patch_boxes(corners, p), n, n).unsqueeze(1)
    return torch.where(inside, canvas, x)


def patch_activation(model, x: torch.Tensor, corners: torch.Tensor, p: int) -> torch.Tensor:
    """Return the superficial-layer activation inside each patch (mean channel-summed feature whose field centre lies
    in it)."""
    f = model.stem(x)
    _, _, h, w = f.shape
    boxes = patch_boxes(corners, p)
    inside = rect_masks(centre_inside(model.geometry(), boxes, h, w), h, w).to(f.device)
    imp = f.sum(1)
    return (imp * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)


def universal_patch(
    model,
    images: torch.Tensor,
    target: int,
    p: int,
    steps: int = 200,
    batch: int = 32,
    lr: float = 0.05,
    alpha: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Return a universal p x p patch that drives the model to ``target`` at random positions (Eq. 3; Eq. 6 with
    alpha)."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[-1]
    patch = torch.rand(3, p, p, generator=gen).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=lr)
    model.eval()
    for _ in tqdm(range(steps), disable=not progress, desc=f"universal patch (alpha={alpha})"):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx].to(dev)
        corners = random_corners(batch, n, p, gen)
        xp = apply_patch(x, patch, corners)
        loss = F.cross_entropy(model(xp), torch.full((batch,), target, device=dev))
        if alpha:
            loss = loss + alpha * patch_activation(model, xp, corners.to(dev), p).mean()
        # grad w.r.t. the patch only: backward() would also compute (and accumulate) every weight's gradient
        (patch.grad,) = torch.autograd.grad(loss, patch)
        opt.step()
        with torch.no_grad():
            patch.clamp_(0, 1)
    return patch.detach()


@torch.no_grad()
def targeted_success(
    model, patch: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, target: int, seed: int = 1, batch: int = 256
) -> float:
    """Return the % of held-out images (not of the target class) classified as target with the patch at a random
    position."""
    keep = labels != target
    x = images[keep]
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    hits = 0
    for s in range(0, len(x), batch):
        xb = x[s : s + batch].to(dev)
        corners = random_corners(len(xb), x.shape[-1], patch.shape[-1], gen)
        hits += (model(apply_patch(xb, patch.to(dev), corners)).argmax(1) == target).sum().item()
    return 100.0 * hits / max(1, len(x))


def pgd_patch(
    model,
    images: torch.Tensor,
    labels: torch.Tensor,
    p: int,
    corners: torch.Tensor | None = None,
    steps: int = 40,
    step_size: float = 0.1,
    restarts: int = 1,
    search: int = 0,
    seed: int = 0,
    loss_fn=None,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (patched images, corners) of an untargeted PGD patch attack per image.

    With ``corners`` given, the patch sits there; with ``search`` > 0 each image tries that many
    random positions (plus ``restarts`` random starts) and keeps the one with the lowest margin.
    ``loss_fn(model, x_patched, labels)`` (to maximise) defaults to the cross-entropy. ``init``
    (B, 3, p, p) replaces the first random start (e.g. seeded per image, so that a result does not
    depend on which images share its batch).
    """
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    b, _, n, _ = images.shape
    x, y = images.to(dev), labels.to(dev)
    loss_fn = loss_fn or (lambda m, xp, yy: F.cross_entropy(m(xp), yy, reduction="none"))
    tries = [corners] if corners is not None else [random_corners(b, n, p, gen) for _ in range(max(1, search))]
    best_x, best_c = x.clone(), tries[0].clone()
    best_margin = torch.full((b,), float("inf"), device=dev)
    model.eval()
    for c in tries:
        for k in range(restarts):
            given = init is not None and k == 0 and c is tries[0]
            patch = (init if given else torch.rand(b, 3, p, p, generator=gen)).to(dev)
            for _ in range(steps):
                patch.requires_grad_(True)
                loss = loss_fn(model, apply_patch(x, patch, c), y).sum()
                (grad,) = torch.autograd.grad(loss, patch)
                patch = (patch.detach() + step_size * grad.sign()).clamp(0, 1)
            with torch.no_grad():
                xp = apply_patch(x, patch, c)
                logits = model(xp)
                other = logits.clone()
                other[torch.arange(b), y] = -float("inf")
                margin = logits.gather(1, y[:, None])[:, 0] - other.max(1).values
                better = margin < best_margin
                best_x[better], best_c[better.cpu()] = xp[better], c[better.cpu()]
                best_margin = torch.minimum(best_margin, margin)
    return best_x.detach(), best_c


def detector_aware_loss(engine, max_windows: int = 64, beta: float = 1.0, seed: int = 0):
    """Return a loss for ``pgd_patch`` that pushes M(x') and every candidate masked prediction M_w(x') to one wrong
    label.

    For each image the wrong label is the current strongest other class of M(x'); the candidate
    windows are those of x' (re-computed each step), at most ``max_windows`` sampled per image.
    Works for both engine modes: sound (footprint removed from the ranking) and paper (pixels filled,
    in-window features lowered).
    """
    gen = torch.Generator().manual_seed(seed)
    model = engine.model

    def loss(m, xp, y):
        logits = m(xp)
        other = logits.detach().clone()
        other[torch.arange(len(y)), y] = -float("inf")
        y_adv = other.argmax(1)
        total = F.cross_entropy(logits, y, reduction="none") - F.cross_entropy(logits, y_adv, reduction="none")
        if not engine.use_sin:
            return total
        with torch.no_grad():
            _, _, sin = engine.stem(xp)
            cand = engine.candidates(sin)
        f = model.stem(xp)
        order = strict_order(importance(f.detach()))
        terms = torch.zeros(len(y), device=xp.device)
        for i in range(len(y)):
            ws = cand[i].nonzero().flatten().cpu()
            if len(ws) == 0:
                continue
            ws = ws[torch.randperm(len(ws), generator=gen)[:max_windows]]
            if engine.mode == "sound":
                excl = rect_masks(engine.fp[ws], engine.h, engine.w).flatten(1)
                keep = masked_topk_from_order(order[i].expand(len(ws), -1), excl, engine.k)
                out = model.rest(f[i : i + 1] * keep.view(-1, 1, engine.h, engine.w).to(f.dtype))
            else:
                boxes = engine.family.boxes[ws].to(xp.device)
                xf = engine.fill_windows(xp[i : i + 1].expand(len(ws), -1, -1, -1), boxes)
                ff = model.stem(xf)
                inside = rect_masks(
                    centre_inside(engine.geo, boxes.cpu(), engine.h, engine.w).to(ff.device), engine.h, engine.w
                )
                keep = sin_mask(ff.detach(), model.sin.rate, inside)
                out = model.rest(ff * keep.unsqueeze(1).to(ff.dtype))
            terms[i] = -F.cross_entropy(out, y_adv[i].expand(len(ws)), reduction="mean")
        return total + beta * terms

    return loss


def detector_aware_attack(
    engine,
    images: torch.Tensor,
    labels: torch.Tensor,
    corners: torch.Tensor,
    steps: int = 20,
    step_size: float = 0.1,
    seed: int = 0,
    **kw,
):
    """Return (patched images, corners): PGD at given corners against detect (wrong label, no alert)."""
    return pgd_patch(
        engine.model,
        images,
        labels,
        engine.p,
        corners=corners,
        steps=steps,
        step_size=step_size,
        seed=seed,
        loss_fn=detector_aware_loss(engine, seed=seed, **kw),
    )
