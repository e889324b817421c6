"""ScaleCert engine: candidate windows, batched occluded inference, certify (Alg. 2) and detect (Alg. 1).

Two modes (see docs/design.md):

* ``mode="sound"`` (default): a window's occluded prediction removes the window's *footprint*
  (every superficial feature whose receptive field meets the window) from the SIN ranking and
  zeroes it; the stem runs once per image and only the layers after the SIN layer run per
  window. The window family is fixed (``tau`` merges it data-independently). Certificates
  hold by the invariance lemma.
* ``mode="paper"``: the window's pixels are filled, the stem re-runs on the filled image, and
  only the features whose receptive-field centre lies *inside* the window are lowered; with
  ``tau`` the candidate windows are merged per image. This is the paper as written.

A model without a SIN layer gives Minority Reports: every window is a candidate and the
occluded prediction is the plain model on the image with the window's pixels filled.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd
import torch

from .geometry import centre_inside, footprint, rect_masks
from .models import rest_channels_last
from .sin import importance, masked_topk_from_order, num_winners, sin_mask, strict_order
from .windows import WindowFamily, candidate_windows, mask_set, merge_per_image, patch_pixels

MODES = ("sound", "paper")
RULES = ("strict", "paper")


def check_images(images, n: int | None = None) -> torch.Tensor:
    """Return images as a float tensor (B, 3, n, n) after checking shape, dtype, range and NaN."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must have shape (B, 3, n, n), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if torch.isnan(images).any():
        raise ValueError("images contain NaN")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"image values must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
    if n is not None and images.shape[-1] != n:
        raise ValueError(f"images are {images.shape[-1]}x{images.shape[-1]}, expected {n}x{n}")
    return images


def check_labels(labels, b: int, num_classes: int) -> torch.Tensor:
    """Return labels as a long tensor (B,) after checking length and range."""
    labels = torch.as_tensor(labels)
    if labels.dim() == 0:
        labels = labels.view(1)
    if labels.dtype.is_floating_point or labels.dim() != 1 or len(labels) != b:
        raise ValueError(f"labels must be {b} integers, got shape {tuple(labels.shape)} dtype {labels.dtype}")
    if (labels < 0).any() or (labels >= num_classes).any():
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    return labels.long()


def default_chunk(per_item_bytes: int, device) -> int:
    """Return a chunk size (windows per batch) from the device's free memory, or a cache-sized CPU budget.

    On a CPU, large batches are slower per image than small ones once the activations leave the
    caches (measured: ResNet-20 after layer 1 costs 1.8 ms/window at 32 windows per batch and
    4.2 ms at 1024), so the CPU budget is ``SCALECERT_CPU_CHUNK_MB`` (default 16 MB) per batch.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(max(8, min(1024, free // 3 // max(1, per_item_bytes))))
    budget = int(float(os.environ.get("SCALECERT_CPU_CHUNK_MB", 16)) * (1 << 20))
    return int(max(8, min(1024, budget // max(1, per_item_bytes))))


@dataclass
class Engine:
    """Occluded inference for one model, image size and window configuration."""

    model: torch.nn.Module
    n: int
    patch: int | float
    r: int = 3
    tau: float | None = None
    mode: str = "sound"
    rule: str = "strict"
    fill: float = 0.0
    chunk: int | None = None
    device: str | torch.device | None = None
    amp: bool = False  # autocast the layers after the SIN layer (fp16 on CUDA, bf16 on CPU)
    masks: int | None = None  # k: PatchCleanser's k x k mask set as the window family instead of the r-family
    family: WindowFamily = field(init=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: expected one of {MODES}")
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}: expected one of {RULES}")
        self.device = torch.device(self.device or next(self.model.parameters()).device)
        self.model = rest_channels_last(self.model.to(self.device).eval())
        self.p = patch_pixels(self.patch, self.n)
        if self.masks is not None:
            if self.tau is not None or self.rule != "strict":
                raise ValueError("the mask-set family (masks=k) takes no tau and only the strict rule")
            # any family that puts every patch wholly inside a member keeps the certificate sound
            self.family = mask_set(self.n, self.p, self.masks)
        else:
            # sound mode merges data-independently; paper mode merges each image's candidates
            self.family = candidate_windows(self.n, self.p, self.r, self.tau if self.mode == "sound" else None)
        self.base_side = self.p + self.r - 1
        self.geo = self.model.geometry()
        c, self.h, self.w = self.model.feature_shape(self.n)
        self.use_sin = self.model.sin is not None
        self.k = num_winners(self.model.sin.rate, self.h * self.w) if self.use_sin else None
        self.fp = footprint(self.geo, self.family.boxes, self.h, self.w).to(self.device)
        if self.chunk is None:
            per = 4 * c * self.h * self.w * (4 if self.mode == "sound" and self.use_sin else 12)
            self.chunk = default_chunk(per, self.device)

    def rest(self, f: torch.Tensor) -> torch.Tensor:
        """Return logits of the layers after the SIN layer, under autocast when ``amp`` is set.

        The stem and the ranking stay in fp32, so SIN(x), the candidates and the invariance lemma
        are unchanged; only the labels of the evaluated windows may move (measure them).
        """
        if not self.amp:
            return self.model.rest(f)
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype):
            return self.model.rest(f).float()

    # ------------------------------------------------------------------ pieces
    def stem(self, x: torch.Tensor):
        """Return superficial features, their strict order and SIN masks (B, h, w) of a batch."""
        f = self.model.stem(x)
        if not self.use_sin:
            return f, None, torch.ones(f.shape[0], self.h, self.w, dtype=torch.bool, device=f.device)
        order = strict_order(importance(f))
        keep = torch.zeros(f.shape[0], self.h * self.w, dtype=torch.bool, device=f.device)
        keep.scatter_(1, order[:, : self.k], True)
        return f, order, keep.view(-1, self.h, self.w)

    def candidates(self, sin: torch.Tensor) -> torch.Tensor:
        """Return (B, N) booleans: windows whose footprint meets SIN(x) (equivalently w ∩ R(x) ≠ ∅)."""
        s = torch.nn.functional.pad(sin.to(torch.int32).cumsum(1).cumsum(2), (1, 0, 1, 0))
        i0, j0, i1, j1 = self.fp.unbind(1)
        empty = (i0 > i1) | (j0 > j1)
        i0, j0, i1, j1 = i0.clamp(max=self.h - 1), j0.clamp(max=self.w - 1), i1.clamp(min=0), j1.clamp(min=0)
        cnt = s[:, i1 + 1, j1 + 1] - s[:, i0, j1 + 1] - s[:, i1 + 1, j0] + s[:, i0, j0]
        return (cnt > 0) & ~empty

    def fill_windows(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Return copies of images x (M, 3, n, n) with each box's pixels set to the fill value."""
        m = rect_masks(boxes.to(x.device), self.n, self.n).unsqueeze(1)
        return x.masked_fill(m, self.fill)

    def occluded_labels(
        self, x, feats, order, img: torch.Tensor, boxes: torch.Tensor, fprects: torch.Tensor
    ) -> torch.Tensor:
        """Return the occluded prediction of each (image index, window) pair of one chunk."""
        if self.mode == "sound" and self.use_sin:
            excl = rect_masks(fprects, self.h, self.w).flatten(1)
            keep = masked_topk_from_order(order[img], excl, self.k)
            f = feats[img] * keep.view(-1, 1, self.h, self.w).to(feats.dtype)
            return self.rest(f).argmax(1)
        xf = self.fill_windows(x[img], boxes)
        if not self.use_sin:  # Minority Reports: plain model on the occluded image
            return self.model(xf).argmax(1)
        f = self.model.stem(xf)
        inside = rect_masks(centre_inside(self.geo, boxes.cpu(), self.h, self.w).to(f.device), self.h, self.w)
        keep = sin_mask(f, self.model.sin.rate, inside)
        return self.rest(f * keep.unsqueeze(1).to(f.dtype)).argmax(1)

    # ------------------------------------------------------------------ main loop
    @torch.no_grad()
    def run(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        early_stop: bool = True,
        ids=None,
        observer=None,
        first: torch.Tensor | None = None,
    ) -> list[dict]:
        """Return one record per image: prediction, alert, certified (if labels), candidates, windows.

        ``observer`` (for tools that show the engine at work, e.g. the explorer) is called as ``observer("sin",
        mask)`` with the (b, h, w) SIN mask and ``observer("occluded", boxes, labels)`` after each chunk of occluded
        predictions, with their image windows and labels; it changes nothing the engine computes.

        ``first`` (b, 4), inclusive pixel boxes, one per image: when the run stops early, the candidate windows that
        wholly contain their image's box are evaluated before the others (the audit passes the patch, so that the
        window that must disagree comes first). The order changes only which disagreeing windows an early stop
        finds (``n_evaluated``, ``n_disagree``, ``disagree_labels``, ``suspected_box``), never pred, alert, output
        or certified."""
        t_start = time.perf_counter()
        x = check_images(images, self.n).to(self.device)
        b = x.shape[0]
        y = None if labels is None else check_labels(labels, b, self.model.num_classes).to(self.device)
        feats, order, sin = self.stem(x)
        if observer is not None:
            observer("sin", sin)
        f0 = feats * sin.unsqueeze(1).to(feats.dtype) if self.use_sin else feats
        pred = self.rest(f0).argmax(1)
        cand = (
            self.candidates(sin)
            if self.use_sin
            else torch.ones(b, len(self.family), dtype=torch.bool, device=self.device)
        )
        # the list of (image, window box, footprint rect) pairs to evaluate
        img_idx, win_idx = cand.nonzero(as_tuple=True)
        boxes_all = self.family.boxes.to(self.device)
        if self.mode == "paper" and self.tau is not None and self.tau < 1:
            per_img = [merge_per_image(boxes_all[win_idx[img_idx == i]].cpu(), self.tau, self.n) for i in range(b)]
            img_idx = torch.cat([torch.full((len(m),), i, dtype=torch.long) for i, m in enumerate(per_img)])
            img_idx = img_idx.to(self.device)
            pair_boxes = torch.cat(per_img).to(self.device)
            pair_grid = None
        else:
            pair_boxes = boxes_all[win_idx]
            pair_grid = self.family.grid.to(self.device)[win_idx]
        pair_fp = footprint(self.geo, pair_boxes.cpu(), self.h, self.w).to(self.device)
        n_cand = torch.bincount(img_idx, minlength=b).cpu()
        stop_early = early_stop and self.rule == "strict" and y is not None
        active = torch.ones(b, dtype=torch.bool, device=self.device)
        if stop_early:
            active &= pred == y  # Alg. 2 needs M(x) = y first
        out_labels = torch.full((len(img_idx),), -1, dtype=torch.long, device=self.device)
        evaluation = torch.arange(len(img_idx), device=self.device)  # pair order of evaluation
        if first is not None and stop_early:
            box = first.to(self.device).reshape(b, 4)[img_idx]
            inside = (pair_boxes[:, :2] <= box[:, :2]).all(1) & (pair_boxes[:, 2:] >= box[:, 2:]).all(1)
            evaluation = torch.cat([evaluation[inside], evaluation[~inside]])
        for s in range(0, len(evaluation), self.chunk):
            idx = evaluation[s : s + self.chunk]
            sel = active[img_idx[idx]] if stop_early else torch.ones_like(idx, dtype=torch.bool)
            if not sel.any():
                continue
            pos = idx[sel]
            lab = self.occluded_labels(x, feats, order, img_idx[pos], pair_boxes[pos], pair_fp[pos])
            out_labels[pos] = lab
            if observer is not None:
                observer("occluded", pair_boxes[pos], lab)
            if stop_early:
                bad = img_idx[pos][lab != pred[img_idx[pos]]]
                active[bad] = False
        seconds = (time.perf_counter() - t_start) / b
        return self._records(b, pred, y, img_idx, pair_boxes, pair_grid, out_labels, n_cand, stop_early, seconds, ids)

    def _records(
        self, b, pred, y, img_idx, pair_boxes, pair_grid, out_labels, n_cand, stop_early, seconds, ids
    ) -> list[dict]:
        pred, img_idx, out_labels = pred.cpu(), img_idx.cpu(), out_labels.cpu()
        pair_boxes = pair_boxes.cpu()
        pair_grid = None if pair_grid is None else pair_grid.cpu()
        starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), n_cand]), 0)
        recs = []
        for i in range(b):
            sl = slice(int(starts[i]), int(starts[i + 1]))
            labs = out_labels[sl]
            evaluated = labs >= 0
            disagree = evaluated & (labs != pred[i])
            complete = bool(evaluated.all())
            alert = bool(disagree.any()) if (disagree.any() or complete) else None
            yi = pred[i].item()
            if alert and self.rule == "paper":
                alert = self._paper_alert(
                    yi,
                    labs[evaluated],
                    None if pair_grid is None else pair_grid[sl][evaluated],
                    pair_boxes[sl][evaluated],
                )
            rec = {
                "id": i if ids is None else ids[i],
                "pred": yi,
                "alert": alert,
                "output": (-1 if alert else yi) if alert is not None else None,
                "n_windows": len(self.family),
                "n_candidates": int(n_cand[i]),
                "n_evaluated": int(evaluated.sum()),
                "n_disagree": int(disagree.sum()),
                "disagree_labels": sorted(set(labs[disagree].tolist())),
                "suspected_box": self._suspect(labs[disagree], pair_boxes[sl][disagree]),
                "seconds": seconds,
            }
            if y is not None:
                yl = int(y[i])
                rec["label"] = yl
                rec["certified"] = bool(yi == yl and complete and not disagree.any())
                rec["clean_correct"] = bool(yi == yl and alert is False) if alert is not None else False
            recs.append(rec)
        return recs

    def _paper_alert(self, y_star: int, labs: torch.Tensor, grid, boxes) -> bool:
        """Alg. 1 lines 10-16: alert on an r x r block agreeing on another label, or on a lost majority."""
        r = self.r
        for lab in set(labs.tolist()) - {y_star}:
            hit = labs == lab
            if grid is not None:
                gh, gw = self.family.grid_shape
                g = torch.zeros(gh, gw)
                g[grid[hit, 0], grid[hit, 1]] = 1
                if gh >= r and gw >= r:
                    block = torch.nn.functional.avg_pool2d(g[None, None], r, 1)
                    if (block >= 1 - 1e-6).any():
                        return True
            elif ((boxes[hit, 2] - boxes[hit, 0] + 1) >= self.base_side + r - 1).any():
                return True  # a merged window that contains an r x r block of base windows
        counts = Counter(labs.tolist())
        top = max(counts.values())
        return counts.get(y_star, 0) < top

    @staticmethod
    def _suspect(labs: torch.Tensor, boxes: torch.Tensor):
        """Return the box of the disagreeing window (most frequent disagreeing label) nearest their centroid."""
        if len(labs) == 0:
            return None
        lab = Counter(labs.tolist()).most_common(1)[0][0]
        bx = boxes[labs == lab].float()
        centres = (bx[:, :2] + bx[:, 2:]) / 2
        i = int(((centres - centres.mean(0)) ** 2).sum(1).argmin())
        return tuple(int(v) for v in boxes[labs == lab][i].tolist())


def _engine(model, images, patch, **options) -> tuple[Engine, dict]:
    run_keys = {"early_stop", "ids"}
    run_opts = {k: options.pop(k) for k in list(options) if k in run_keys}
    if "rate" in options:
        rate = options.pop("rate")
        model.set_sin(options.pop("layer", model.sin_layer), rate)
    elif "layer" in options:
        model.set_sin(options.pop("layer"), model.sin_rate)
    x = check_images(images)
    return Engine(model, x.shape[-1], patch, **options), run_opts


def certify(model, images, labels, patch, batch_size: int = 64, progress: bool = False, **options) -> pd.DataFrame:
    """Return one row per image: certified (Alg. 2), clean_correct, pred, alert, candidates, windows."""
    x = check_images(images)
    engine, run_opts = _engine(model, x, patch, **options)
    labels = check_labels(labels, x.shape[0], model.num_classes)
    return _batched(engine, x, labels, batch_size, progress, run_opts)


def detect(model, images, patch, batch_size: int = 64, progress: bool = False, **options) -> pd.DataFrame:
    """Return one row per image: output label or -1 on alert (Alg. 1), candidates and suspected box."""
    x = check_images(images)
    engine, run_opts = _engine(model, x, patch, **options)
    run_opts["early_stop"] = False
    return _batched(engine, x, None, batch_size, progress, run_opts)


def _batched(engine: Engine, x, labels, batch_size, progress, run_opts) -> pd.DataFrame:
    from tqdm.auto import tqdm

    ids = run_opts.pop("ids", None)
    ids = list(range(len(x))) if ids is None else list(ids)
    recs = []
    for s in tqdm(range(0, len(x), batch_size), disable=not progress, desc="certify"):
        recs += engine.run(
            x[s : s + batch_size],
            None if labels is None else labels[s : s + batch_size],
            ids=ids[s : s + batch_size],
            **run_opts,
        )
    return pd.DataFrame.from_records(recs)
