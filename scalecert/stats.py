"""Paired comparisons of two defences on the same images: difference in certified accuracy, its paired-bootstrap
interval and McNemar's exact test on the discordant images."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("paired outcomes need at least one image")
    return a, b


def discordant(a, b) -> tuple[int, int]:
    """Return (images where only a holds, images where only b holds)."""
    a, b = _paired(a, b)
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact(a, b) -> float:
    """Return McNemar's exact two-sided p value: the discordant images under a fair coin (1.0 with none)."""
    only_a, only_b = discordant(a, b)
    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(min(only_a, only_b), n, 0.5).pvalue)


def paired_bootstrap(a, b, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Return (difference, low, high) in percentage points of mean(a) - mean(b), with the percentile interval of a
    paired bootstrap (images resampled with replacement, the two outcomes of an image kept together)."""
    a, b = _paired(a, b)
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    d = a.astype(np.int8) - b.astype(np.int8)
    rng = np.random.default_rng(seed)
    # an image's paired difference is -1, 0 or +1, so resampling n images is a multinomial draw over those three
    # values with the observed shares: the same distribution as resampling indices, without an n x n_boot array
    shares = np.array([(d == v).mean() for v in (-1, 0, 1)])
    counts = rng.multinomial(len(d), shares, size=n_boot)
    boots = (counts[:, 2] - counts[:, 0]) / len(d)
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return 100 * float(d.mean()), 100 * float(lo), 100 * float(hi)


def holm(p_values, alpha: float = 0.05) -> np.ndarray:
    """Return which hypotheses Holm's step-down procedure rejects at family-wise level alpha (bool, input order)."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.isnan(p).any() or ((p < 0) | (p > 1)).any():
        raise ValueError(f"p values must be a 1-D array in [0, 1], got {p_values!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"need 0 < alpha < 1, got {alpha}")
    order = np.argsort(p, kind="stable")
    # the i-th smallest p (0-based) is compared with alpha / (m - i); the first failure stops the rejections
    passed = p[order] <= alpha / (len(p) - np.arange(len(p)))
    rejected = np.zeros(len(p), dtype=bool)
    rejected[order] = np.cumprod(passed).astype(bool)
    return rejected
