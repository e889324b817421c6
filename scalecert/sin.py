"""The sparse superficial layer: keep the top-k spatial positions of a feature map (all channels)."""

from __future__ import annotations

import torch
from torch import nn


def check_rate(rate: float) -> float:
    """Return rate as a float after checking it lies in (0, 1]."""
    rate = float(rate)
    if not (0.0 < rate <= 1.0):
        raise ValueError(f"SIN rate must lie in (0, 1], got {rate}")
    return rate


def num_winners(rate: float, positions: int) -> int:
    """Return k = round(rate * positions), at least 1."""
    return max(1, int(round(check_rate(rate) * positions)))


def importance(features: torch.Tensor) -> torch.Tensor:
    """Return the channel-summed importance map I (B, h*w) of features (B, C, h, w)."""
    return features.sum(1).flatten(1)


def strict_order(scores: torch.Tensor) -> torch.Tensor:
    """Return positions sorted by score, descending, ties broken by lower flat index (B, n)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def sin_mask(features: torch.Tensor, rate: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Return the boolean SIN mask (B, h, w): the strict top-k positions, never an excluded one."""
    b, _, h, w = features.shape
    scores = importance(features)
    if exclude is not None:
        exclude = exclude.reshape(b, h * w)
        scores = scores.masked_fill(exclude, float("-inf"))
    order = strict_order(scores)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, : num_winners(rate, h * w)], True)
    if exclude is not None:
        keep &= ~exclude
    return keep.view(b, h, w)


def masked_topk_from_order(order: torch.Tensor, exclude: torch.Tensor, k: int) -> torch.Tensor:
    """Return the strict top-k mask (B, n) after removing ``exclude`` (B, n), given each row's order.

    Equal to ``sin_mask(..., exclude=exclude)`` without sorting again: filtering a sorted
    list keeps it sorted, so the winners are the first k non-excluded entries of ``order``.
    """
    valid = ~exclude.gather(1, order)
    ranked = valid & (valid.cumsum(1) <= k)
    return torch.zeros_like(exclude).scatter_(1, order, ranked)


class SINLayer(nn.Module):
    """Winner-take-all layer: zero every spatial position outside the top-k (gradients flow through winners only)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = check_rate(rate)

    def forward(self, features: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        keep = sin_mask(features.detach(), self.rate, exclude)
        return features * keep.unsqueeze(1).to(features.dtype)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"
