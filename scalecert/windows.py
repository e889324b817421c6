"""Occluding-window families: fixed (data-independent) squares that cover every p x p patch.

Base family (the paper's): squares of side ``m = p + r - 1`` at stride 1, so every p x p patch
lies wholly inside ``r x r`` members. Merged family for an overlap ratio ``tau`` (sound mode):
squares of side ``M = floor(m / sqrt(tau))`` — the largest square whose IoU with each base
window it contains is at least ``tau`` — at stride ``M - m + 1``, so every base window (and hence
every patch) lies wholly inside a member. The last position on each axis is always included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: The paper's (and its peers') rounding of patch sizes given as % of the image.
PAPER_PATCH_PX = {
    (224, 1.0): 23,
    (224, 2.0): 32,
    (224, 3.0): 39,
    (224, 5.0): 50,
    (224, 8.0): 64,
    (32, 0.4): 2,
    (32, 2.4): 5,
    (32, 5.0): 7,
    (32, 8.0): 9,
}


def patch_pixels(patch, n: int) -> int:
    """Return the side in pixels of a patch given in pixels (int) or as % of an n x n image (float)."""
    if isinstance(patch, bool) or not isinstance(patch, (int, float)) or not math.isfinite(patch) or patch <= 0:
        raise ValueError(f"patch must be a positive int (pixels) or float (% of the image), got {patch!r}")
    if isinstance(patch, int):
        p = patch
    else:
        if patch > 100:
            raise ValueError(f"patch {patch}% is more than the whole image")
        p = PAPER_PATCH_PX.get((n, round(float(patch), 3)), max(1, round(math.sqrt(patch / 100 * n * n))))
    if p > n:
        raise ValueError(f"patch of {p} px is larger than the {n}x{n} image")
    return p


def positions(n: int, side: int, stride: int) -> list[int]:
    """Return window start positions along one axis, the last one (n - side) always included."""
    last = n - side
    out = list(range(0, last + 1, stride))
    if out[-1] != last:
        out.append(last)
    return out


def square_grid(n: int, side: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (boxes, grid) of the square windows of a side at every ``positions`` start on both axes of an n x n
    image, row-major: boxes (K, 4) inclusive pixel boxes, grid (K, 2) their (row, column) grid indices."""
    pos = torch.tensor(positions(n, side, stride))
    gi, gj = torch.meshgrid(torch.arange(len(pos)), torch.arange(len(pos)), indexing="ij")
    gi, gj = gi.flatten(), gj.flatten()
    r0, c0 = pos[gi], pos[gj]
    return torch.stack([r0, c0, r0 + side - 1, c0 + side - 1], 1), torch.stack([gi, gj], 1)


@dataclass
class WindowFamily:
    """A fixed list of square pixel windows with their grid coordinates."""

    boxes: torch.Tensor  # (N, 4) inclusive pixel boxes (r0, c0, r1, c1)
    grid: torch.Tensor  # (N, 2) grid index (gi, gj) for the r x r block rule
    n: int
    patch: int
    side: int
    stride: int
    r: int
    tau: float | None
    masks: int | None = None  # k of a PatchCleanser mask set (k x k masks), None for the paper's families

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def grid_shape(self) -> tuple[int, int]:
        return int(self.grid[:, 0].max()) + 1, int(self.grid[:, 1].max()) + 1


def window_side(p: int, n: int, r: int = 3, tau: float | None = None) -> tuple[int, int]:
    """Return (side, stride) of the family for patch p: base m = p + r - 1, merged by tau when given."""
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r}")
    m = min(n, p + r - 1)
    if tau is None or tau >= 1:
        return m, 1
    if not 0 < tau < 1:
        raise ValueError(f"overlap ratio tau must lie in (0, 1], got {tau}")
    side = min(n, max(m, int(math.floor(m / math.sqrt(tau)))))
    return side, side - m + 1


def candidate_windows(n: int, patch, r: int = 3, tau: float | None = None) -> WindowFamily:
    """Return the data-independent window family for a patch (px or %) on an n x n image."""
    p = patch_pixels(patch, n)
    side, stride = window_side(p, n, r, tau)
    boxes, grid = square_grid(n, side, stride)
    return WindowFamily(boxes, grid, n, p, side, stride, r, tau)


def mask_set(n: int, patch, k: int = 6) -> WindowFamily:
    """Return PatchCleanser's k x k mask set for a patch (px or %) on an n x n image.

    Stride ``s = ceil((n - p + 1) / k)`` and mask side ``m = p + s - 1`` (Xiang et al., USENIX Security 2022), so
    every p x p patch lies wholly inside at least one mask; the last position on each axis is always included.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"masks per axis k must be a positive int, got {k!r}")
    p = patch_pixels(patch, n)
    stride = max(1, math.ceil((n - p + 1) / k))
    side = min(n, p + stride - 1)
    boxes, grid = square_grid(n, side, stride)
    return WindowFamily(boxes, grid, n, p, side, stride, stride, None, masks=k)


def family_label(family: WindowFamily) -> str:
    """Return a short name of a window family for tables: ``r=3``, ``r=3 tau=0.3`` or ``k=6 masks``."""
    if family.masks is not None:
        return f"k={family.masks} masks"
    return f"r={family.r}" + (f" tau={family.tau:g}" if family.tau is not None and family.tau < 1 else "")


def covers_all_patches(family: WindowFamily) -> bool:
    """Return True iff every p x p patch position lies wholly inside some window of the family."""
    n, p = family.n, family.patch
    ok = torch.zeros(n - p + 1, n - p + 1, dtype=torch.bool)
    for r0, c0, r1, c1 in family.boxes.tolist():
        # patches with top-left (a, b) inside: r0 <= a and a + p - 1 <= r1
        if r1 - r0 + 1 >= p and c1 - c0 + 1 >= p:
            ok[r0 : r1 - p + 2, c0 : c1 - p + 2] = True
    return bool(ok.all())


def merge_per_image(boxes: torch.Tensor, tau: float, n: int | None = None) -> torch.Tensor:
    """Return the paper-mode merge of one image's candidate windows: per tile of the tau grid, their bounding box.

    Each candidate base window joins the first square of side floor(m / sqrt(tau)) (the sound
    family's grid) that contains it; each group is replaced by the bounding box of its members, so
    every member has IoU >= tau with its merged window. Unlike the sound family, the merged boxes
    depend on the image's candidates, which is what the paper does and what may break soundness.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.long).reshape(-1, 4)
    if len(boxes) == 0:
        return boxes
    m = int(boxes[0, 2] - boxes[0, 0] + 1)
    n = n or int(boxes[:, 2:].max()) + 1
    side = min(n, max(m, int(math.floor(m / math.sqrt(tau))))) if tau < 1 else m
    pos = torch.tensor(positions(n, side, side - m + 1))
    ti = torch.searchsorted(pos, boxes[:, 0].contiguous(), right=True) - 1
    tj = torch.searchsorted(pos, boxes[:, 1].contiguous(), right=True) - 1
    group = torch.unique(ti * len(pos) + tj, return_inverse=True)[1]
    g = int(group.max()) + 1
    lo = torch.full((g, 2), n, dtype=torch.long).scatter_reduce(0, group[:, None].expand(-1, 2), boxes[:, :2], "amin")
    hi = torch.full((g, 2), -1, dtype=torch.long).scatter_reduce(0, group[:, None].expand(-1, 2), boxes[:, 2:], "amax")
    return torch.cat([lo, hi], 1)
