"""Merging clients' numbers so that one client cannot outweigh the fleet: bounded counts, capped
weight shares, a trimmed coordinate-wise mean for few replies, a rank-median merge of scores.

Why: in FedAvg (McMahan et al., arXiv 1602.05629) a client's weight is the example count it
claims, so one client that claims 10^9 examples is the whole aggregate, and a count of 1.8e308
overflows it to infinity. Robust aggregation (Yin et al., "Byzantine-robust distributed learning",
arXiv 1803.01498: coordinate-wise median and trimmed mean) bounds what a minority of clients can
move, but only if it trims: with 3 replies a mean is not robust, a median is. Scores, votes and
grows that decide a mask (SNIP, GraSP, FedDST, FedTiny's top-k) are merged by rank, so a client's
magnitudes carry no weight, only its order, and the median over clients decides.

Pure functions on numpy arrays and torch tensors; no Flower. Every function computes in float64
from clamped inputs and returns finite numbers for finite inputs.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

MAX_COUNT = 2**53  # above this a float64 no longer holds every integer
COUNT_MULTIPLE = 4.0  # deployment: a count may be at most this multiple of the fleet's median claim
DEFAULT_MAX_SHARE = 0.25  # no client weighs more than this share of a round (at least 1 / replies)
TRIM_FRACTION = 0.1  # trimmed mean: this fraction of replies left out at each end, at least one


def bounded_counts(claimed: Sequence, known: Sequence[int] | None = None, fleet: Sequence | None = None,
                   multiple: float = COUNT_MULTIPLE) -> np.ndarray:
    """Each client's count, bounded by what does not come from that client alone (float64).

    With `known` (simulation: what each client's partition holds) a claim is at most that; else, with
    `fleet` (deployment: every registered node's claim), at most `multiple` x the fleet's median claim.
    A claim that is not a non-negative integer counts 0, so it carries no weight.
    """
    counts = np.array([_count(c) for c in claimed], dtype=np.float64)
    if known is not None:
        return np.minimum(counts, np.array([_count(k) for k in known], dtype=np.float64))
    if fleet is not None and len(fleet):
        cap = multiple * float(np.median([_count(c) for c in fleet]))
        return np.minimum(counts, max(cap, 1.0))
    return counts


def _count(value) -> float:
    """A claimed count as a float64 in [0, MAX_COUNT], or 0 when it is not a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return 0.0
    value = float(value) if not isinstance(value, int) else value
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        return 0.0
    return float(min(max(value, 0), MAX_COUNT))


def weight_shares(counts: Sequence[float], max_share: float = DEFAULT_MAX_SHARE) -> np.ndarray:
    """Normalised weights proportional to `counts`, none above max(`max_share`, 1 / n): the excess of
    a capped client goes to the others in proportion (water filling). Sums to 1; all zero counts
    give equal shares. Never overflows: counts are scaled by their maximum before they are summed."""
    c = np.clip(np.nan_to_num(np.asarray(counts, dtype=np.float64), nan=0.0, posinf=MAX_COUNT), 0.0, MAX_COUNT)
    n = len(c)
    if n == 0:
        return c
    cap = max(float(max_share), 1.0 / n)
    c = c / c.max() if c.max() > 0 else np.ones(n)
    shares = c / c.sum()
    capped = np.zeros(n, dtype=bool)
    for _ in range(n):
        over = (shares > cap) & ~capped
        if not over.any():
            break
        capped |= over
        free = 1.0 - cap * capped.sum()
        rest = c * ~capped
        shares = np.where(capped, cap, rest / rest.sum() * free if rest.sum() > 0 else free / max((~capped).sum(), 1))
    return shares


def trimmed_mean(values: torch.Tensor, weights: Sequence[float] | None = None,
                 trim_fraction: float = TRIM_FRACTION) -> torch.Tensor:
    """Coordinate-wise weighted mean of `values` (replies x ...) after leaving out, per coordinate,
    the max(1, floor(trim_fraction x replies)) highest and lowest replies whenever at least one stays
    (3 or more replies); with 3 replies that is the median. Computed in float64, returned in the
    replies' dtype; finite for finite replies (it lies between the kept replies' extremes)."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError("replies with non-finite values must be rejected before they are merged")
    k = values.shape[0]
    w = torch.as_tensor(weight_shares(np.ones(k) if weights is None else weights, 1.0), dtype=torch.float64)
    x = values.to(torch.float64)
    trim = max(1, int(trim_fraction * k)) if k >= 3 else 0
    trim = min(trim, (k - 1) // 2)
    order = torch.argsort(x, dim=0)
    kept = order[trim: k - trim]
    sorted_w = w[kept]
    kept_x = torch.gather(x, 0, kept)
    total = sorted_w.sum(dim=0)
    merged = torch.where(total > 0, (kept_x * sorted_w).sum(dim=0) / total.clamp_min(1e-300), kept_x.mean(dim=0))
    return merged.to(values.dtype)


def rank_merge(scores: torch.Tensor) -> torch.Tensor:
    """Clients' scores (clients x positions) merged by rank: each client's scores become ranks in
    [0, 1] (its highest score 1; NaN the lowest), and each position gets the (lower) median of its ranks
    over clients. One client in three or more moves no position past what the others' ranks allow, whatever
    its magnitudes. Ties within a client keep their order of position."""
    k, n = scores.shape[0], scores[0].numel()
    flat = torch.nan_to_num(scores.reshape(k, n).to(torch.float64), nan=-math.inf)
    ranks = torch.empty_like(flat)
    order = torch.argsort(flat, dim=1, stable=True)
    ranks.scatter_(1, order, torch.arange(n, dtype=torch.float64).expand(k, n) / max(n - 1, 1))
    return ranks.median(dim=0).values.reshape(scores.shape[1:])  # the lower median for an even count
