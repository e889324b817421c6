"""Receptive-field geometry derived from the modules: stride S, field size K and padding P.

Feature ``(i, j)`` of a layer with geometry ``(S, K, P)`` sees the pixel box
``[i*S - P, i*S - P + K - 1] x [j*S - P, j*S - P + K - 1]``. Residual blocks take the union of
their main path and their shortcut (both have the same stride).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Geometry:
    """Cumulative stride, receptive-field size and padding of a feature map w.r.t. the input."""

    stride: int = 1
    rf: int = 1
    pad: int = 0

    def then(self, k: int, s: int, p: int) -> Geometry:
        """Return the geometry after one more sliding layer with kernel k, stride s, padding p."""
        return Geometry(self.stride * s, self.rf + (k - 1) * self.stride, self.pad + p * self.stride)

    def compose(self, other: Geometry) -> Geometry:
        """Return the geometry of ``other`` applied after ``self``."""
        return self.then(other.rf, other.stride, other.pad)

    def union(self, other: Geometry) -> Geometry:
        """Return the smallest geometry whose boxes contain the boxes of both (same stride)."""
        if self.stride != other.stride:
            raise ValueError(f"branches of different strides {self.stride} and {other.stride}")
        pad = max(self.pad, other.pad)
        end = max(self.rf - 1 - self.pad, other.rf - 1 - other.pad)
        return Geometry(self.stride, end + pad + 1, pad)

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Return the unclipped pixel box (r0, c0, r1, c1), inclusive, of feature (i, j)."""
        r0, c0 = i * self.stride - self.pad, j * self.stride - self.pad
        return r0, c0, r0 + self.rf - 1, c0 + self.rf - 1


def _pair(v) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise ValueError(f"non-square kernel/stride/padding {v} is not supported")
        v = v[0]
    return int(v)


_POINTWISE = (nn.BatchNorm2d, nn.ReLU, nn.Identity, nn.Dropout, nn.GroupNorm, nn.ReLU6, nn.SiLU)


def module_geometry(m: nn.Module) -> Geometry:
    """Return the geometry of a module (conv, pool, pointwise, sequential or residual block)."""
    if isinstance(m, nn.Conv2d) or isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
        d = _pair(getattr(m, "dilation", 1))
        return Geometry().then(d * (k - 1) + 1, s, p)
    if isinstance(m, _POINTWISE) or getattr(m, "pointwise", False):
        return Geometry()
    if hasattr(m, "downsample") and hasattr(m, "conv1"):  # residual block (torchvision layout)
        main = Geometry()
        for name, child in m.named_children():
            if name != "downsample":
                main = main.compose(module_geometry(child))
        short = module_geometry(m.downsample) if m.downsample is not None else Geometry()
        return main.union(short)
    if isinstance(m, (nn.Sequential, nn.ModuleList)):
        return units_geometry(m)
    raise ValueError(f"cannot derive the receptive field of {type(m).__name__}")


def units_geometry(units) -> Geometry:
    """Return the geometry of a chain of units."""
    g = Geometry()
    for u in units:
        g = g.compose(module_geometry(u))
    return g


def feature_boxes(geo: Geometry, h: int, w: int, n: int) -> torch.Tensor:
    """Return the clipped pixel box (r0, c0, r1, c1) of every feature, shape (h, w, 4)."""
    i = torch.arange(h) * geo.stride - geo.pad
    j = torch.arange(w) * geo.stride - geo.pad
    r0, c0 = i.clamp(0, n - 1), j.clamp(0, n - 1)
    r1, c1 = (i + geo.rf - 1).clamp(0, n - 1), (j + geo.rf - 1).clamp(0, n - 1)
    return torch.stack(torch.broadcast_tensors(r0[:, None], c0[None, :], r1[:, None], c1[None, :]), -1)


def footprint(geo: Geometry, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Return the feature rectangles (i0, j0, i1, j1), inclusive, whose fields meet each pixel box (N, 4).

    Feature i meets rows [r0, r1] iff i*S - P <= r1 and i*S - P + K - 1 >= r0. A window that
    meets no feature gets an empty rectangle (i0 > i1).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.long).reshape(-1, 4)
    S, K, P = geo.stride, geo.rf, geo.pad

    def lo(a):  # smallest i with i*S - P + K - 1 >= a
        return torch.div(a - K + 1 + P + S - 1, S, rounding_mode="floor").clamp(min=0)

    def hi(b, size):  # largest i with i*S - P <= b
        return torch.div(b + P, S, rounding_mode="floor").clamp(max=size - 1)

    return torch.stack([lo(boxes[:, 0]), lo(boxes[:, 1]), hi(boxes[:, 2], h), hi(boxes[:, 3], w)], 1)


def centre_inside(geo: Geometry, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Return the feature rectangles whose receptive-field centres lie inside each pixel box (N, 4).

    This is the paper's reading of "the superficial features of the occluding region".
    """
    boxes = torch.as_tensor(boxes, dtype=torch.long).reshape(-1, 4)
    S, K, P = geo.stride, geo.rf, geo.pad
    half = (K - 1) / 2

    def lo(a):
        return torch.tensor([max(0, math.ceil((int(v) + P - half) / S)) for v in a])

    def hi(b, size):
        return torch.tensor([min(size - 1, math.floor((int(v) + P - half) / S)) for v in b])

    return torch.stack([lo(boxes[:, 0]), lo(boxes[:, 1]), hi(boxes[:, 2], h), hi(boxes[:, 3], w)], 1)


def patch_boxes(corners: torch.Tensor, p: int) -> torch.Tensor:
    """Return the inclusive pixel boxes (N, 4) (i0, j0, i1, j1) of p x p patches at top-left corners (N, 2)."""
    return torch.cat([corners, corners + p - 1], 1)


def rect_masks(rects: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Return boolean masks (N, h, w) that are True inside each inclusive rectangle (i0, j0, i1, j1)."""
    rects = rects.reshape(-1, 4)
    ii = torch.arange(h, device=rects.device)
    jj = torch.arange(w, device=rects.device)
    rows = (ii[None] >= rects[:, 0:1]) & (ii[None] <= rects[:, 2:3])
    cols = (jj[None] >= rects[:, 1:2]) & (jj[None] <= rects[:, 3:4])
    return rows[:, :, None] & cols[:, None, :]


def region(geo: Geometry, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Return R(x): the union (n, n) of the receptive fields of the True features of a mask (h, w)."""
    h, w = mask.shape
    idx = mask.nonzero()
    out = torch.zeros(n, n, dtype=torch.bool)
    boxes = feature_boxes(geo, h, w, n)[idx[:, 0], idx[:, 1]]
    for r0, c0, r1, c1 in boxes.tolist():
        out[r0 : r1 + 1, c0 : c1 + 1] = True
    return out
