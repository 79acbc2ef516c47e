"""Aggregation of client states: sample-weighted averages over active positions, made robust.

Pure torch, so the server's rounds and the methods' hooks (`shared.methods`) share it. One client
of ten must not be able to poison the round: `screen_updates` rejects or clips every update by its
distance from the global model in multiples of the round's median distance (adaptive, so honest
rounds are untouched), `cap_weights` bounds any client's share of the sample weights, and `combine`
aggregates by an aggregator of `AGGREGATORS` (`fl.aggregator`): coordinate-wise trimmed mean (the
default) or median (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018, arXiv 1803.01498)
besides FedAvg.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from shared.pruning import average_scores
from shared.pruning.prune_grow import MIN_CLIENTS_TO_CLIP, median_peak
from shared.registry import Registry

Tensors = dict[str, torch.Tensor]


def weighted_average(states: Sequence[Tensors], weights: Sequence[float], masks: Tensors | None = None) -> Tensors:
    """FedAvg (McMahan et al., arXiv 1602.05629): weights by sample count.

    Float tensors are averaged; integer buffers (BN's num_batches_tracked) take the
    maximum. With masks, pruned positions stay exactly zero.
    """
    return combine(states, weights, masks)


# An aggregator: (one layer's float64 values of every client, their sample weights, fl.trim_fraction) ->
# that layer's aggregate. Picked by `fl.aggregator`; a user's is `package.module:fn` from a trusted package.
AGGREGATORS: Registry = Registry("aggregator", allow_import=True)


@AGGREGATORS.register("mean")
def mean(values: Sequence[torch.Tensor], weights: Sequence[float], trim_fraction: float) -> torch.Tensor:
    """Sample-weighted mean (FedAvg)."""
    total = float(sum(weights))
    value = torch.zeros_like(values[0])
    for v, w in zip(values, weights):
        value += v * (w / total)
    return value


@AGGREGATORS.register("trimmed-mean")
def trimmed_mean(values: Sequence[torch.Tensor], weights: Sequence[float], trim_fraction: float) -> torch.Tensor:
    """Per coordinate, the sample-weighted mean of the client values ranked k .. n-1-k,
    k = max(1, trim_fraction x n) from 4 clients on (all below 4 clients)."""
    stacked = torch.stack(list(values))
    n = stacked.shape[0]
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64).reshape(-1, *[1] * (stacked.dim() - 1))
    if n < 4:
        return (stacked * w).sum(0) / w.sum()
    k = max(1, int(math.floor(trim_fraction * n)))
    rank = stacked.argsort(0).argsort(0)
    keep = ((rank >= k) & (rank <= n - 1 - k)).double() * w
    return (stacked * keep).sum(0) / keep.sum(0)


@AGGREGATORS.register("median")
def median(values: Sequence[torch.Tensor], weights: Sequence[float], trim_fraction: float) -> torch.Tensor:
    """Per coordinate, the median of the client values (unweighted)."""
    ordered = torch.stack(list(values)).sort(0).values
    return (ordered[(len(values) - 1) // 2] + ordered[len(values) // 2]) / 2


def combine(states: Sequence[Tensors], weights: Sequence[float], masks: Tensors | None = None,
            aggregator: str = "mean", trim_fraction: float = 0.1, trusted: Iterable[str] = ()) -> Tensors:
    """Float tensors by the `aggregator` of `AGGREGATORS`: "mean" (sample-weighted, FedAvg),
    "trimmed-mean" (per coordinate the extreme clients left out, the rest sample-weighted) or "median"
    (per coordinate), or a trusted `package.module:fn`. Integer buffers take the maximum; with masks,
    pruned positions stay exactly zero.

    Why trimmed by default: norm clipping bounds an update's length, not its direction, and one client
    in ten that pushes every weight the same way ruins the model in three rounds even when clipped
    (measured: the `huge` attack of the drill). Clipping its values to the honest range per coordinate
    (winsorizing) still biases every weight towards the honest maximum, which ruined it as well; left
    out per coordinate, with the honest extreme on the other side, the mean stays unbiased."""
    if not states:
        raise ValueError("nothing to aggregate")
    fn = AGGREGATORS.get(aggregator, trusted)
    out: Tensors = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = torch.stack([s[name] for s in states]).amax(0)
            continue
        value = fn([s[name].double() for s in states], weights, trim_fraction)
        if not (isinstance(value, torch.Tensor) and value.shape == first.shape):
            raise ValueError(f"aggregator {aggregator!r} returned no tensor shaped {tuple(first.shape)} for {name}")
        value = value.to(first.dtype)
        out[name] = value * masks[name] if masks and name in masks else value
    return out


def distance(reference: Tensors, update: Tensors) -> float:
    """L2 distance of an update's float tensors from `reference` (in float64: no overflow)."""
    return math.sqrt(sum(float(((update[n].double() - reference[n].double()) ** 2).sum())
                         for n in update if update[n].is_floating_point()))


def clip_update(reference: Tensors, update: Tensors, max_norm: float) -> Tensors:
    """Scale the update's distance from `reference` down to `max_norm` (float tensors only)."""
    norm = distance(reference, update)
    if norm <= max_norm:
        return update
    scale = max_norm / norm
    return {n: (reference[n].double() + (v.double() - reference[n].double()) * scale).to(v.dtype)
            if v.is_floating_point() else v for n, v in update.items()}


def screen_updates(reference: Tensors, updates: Sequence[Tensors], clip_multiple: float,
                   reject_multiple: float) -> tuple[list[Tensors | None], list[str | None]]:
    """Adaptive bounds on every update's distance from `reference`, in multiples of the round's
    median distance (the honest majority's scale, so honest updates, which sit near the median,
    pass unchanged): beyond `reject_multiple` an update is an outlier and rejected (None, with the
    reason), beyond `clip_multiple` it is scaled back to that distance (0 turns either off)."""
    if len(updates) < 2:
        return list(updates), [None] * len(updates)
    norms = [distance(reference, u) for u in updates]
    median = sorted(norms)[(len(norms) - 1) // 2]
    out: list[Tensors | None] = []
    reasons: list[str | None] = []
    for u, n in zip(updates, norms):
        if reject_multiple > 0 and n > reject_multiple * median:
            out.append(None)
            reasons.append(f"update distance {n:.3g} is {n / max(median, 1e-300):.3g} x the round's median "
                           f"(fl.reject_multiple={reject_multiple:g})")
        elif clip_multiple > 0 and n > clip_multiple * median:
            out.append(clip_update(reference, u, clip_multiple * median))
            reasons.append(None)
        else:
            out.append(u)
            reasons.append(None)
    return out, reasons


def cap_weights(weights: Sequence[float], share: float) -> list[float]:
    """Sample weights with none above `share` of their total (0: unchanged): the largest are lowered
    to a common cap c with c = share x sum(min(w, c)) (water-filling), so the cap holds after capping."""
    weights = [float(w) for w in weights]
    if share <= 0 or share * len(weights) < 1:
        return weights
    cap = share * sum(weights)
    for _ in range(100):
        new = share * sum(min(w, cap) for w in weights)
        if abs(new - cap) <= 1e-12 * cap:
            break
        cap = new
    return [min(w, cap) for w in weights]


def clip_to_mad(values: Sequence[float], k: float = 5.0) -> list[float]:
    """Scalars (e.g. clients' mean losses of one candidate) clipped to median +- k x MAD: a robust
    bound on one client's pull (a loss of 0 or 1e30 cannot pick or sink a candidate), while an honest
    majority's values, which sit within a few MADs, are unchanged. Unchanged below three clients."""
    s = sorted(values)
    if len(s) < MIN_CLIENTS_TO_CLIP:
        return list(values)
    med = s[(len(s) - 1) // 2]
    mad = sorted(abs(v - med) for v in s)[(len(s) - 1) // 2]
    return [min(max(v, med - k * mad), med + k * mad) for v in values]


def robust_mean_loss(loss_sums: Sequence[float], counts: Sequence[int]) -> float:
    """Pooled per-example loss of clients' (loss sum, examples), robust to one client in ten: each
    client's mean loss is clipped to the median +- 5 MAD (`clip_to_mad`), then with 4 or more clients
    the max(1, n // 10) highest and as many lowest are left out (trimmed), and the rest weighted by
    examples. A client reporting 0 for one candidate and 1e30 for the others then changes nothing."""
    means = clip_to_mad([s / n for s, n in zip(loss_sums, counts)])
    cut = max(1, len(means) // 10) if len(means) >= 4 else 0
    kept = sorted(range(len(means)), key=means.__getitem__)[cut : len(means) - cut]
    return sum(means[i] * counts[i] for i in kept) / sum(counts[i] for i in kept)


def clip_bn_stats(stats: Sequence[dict], k: float = 6.0) -> list[dict]:
    """Clients' BN statistics of one candidate with every channel's mean clipped to the clients' median
    mean +- k standard deviations (the median variance) and its variance to at most k^2 times the
    median variance: one client cannot move the pooled statistics (and so every candidate's loss) far,
    while honest clients, whose inputs share a distribution, are untouched."""
    if len(stats) < MIN_CLIENTS_TO_CLIP:
        return list(stats)
    out = [dict(s) for s in stats]
    for name in stats[0]:
        means = torch.stack([s[name][0] for s in stats])
        variances = torch.stack([s[name][1] for s in stats])
        centre, spread = means.median(0).values, variances.median(0).values
        half = k * spread.sqrt()
        for s, mean, var in zip(out, means, variances):
            s[name] = (torch.maximum(torch.minimum(mean, centre + half), centre - half),
                       torch.minimum(var, k * k * spread), s[name][2])
    return out


def robust_scores(scores: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Sample-weighted mean of clients' importance scores (SNIP, PruneFL's squared gradients) after
    clipping every client's scores of a layer to the median over clients of their largest |score|
    there (`median_peak`): one client's scale cannot decide which weights a mask keeps."""
    if len(scores) < MIN_CLIENTS_TO_CLIP:
        return average_scores(scores, weights)
    clipped = [dict(s) for s in scores]
    for name in scores[0]:
        bound = median_peak([s[name] for s in scores])
        for s in clipped:
            s[name] = s[name].clamp(-bound, bound)
    return average_scores(clipped, weights)


def mask_weighted_average(states: Sequence[Tensors], masks: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Average each position only over the clients whose mask keeps it (FedDST, arXiv 2112.09824)."""
    plain = weighted_average(states, weights)
    for name in masks[0]:
        num = sum(s[name].double() * m[name] * w for s, m, w in zip(states, masks, weights))
        den = sum(m[name].double() * w for m, w in zip(masks, weights))
        plain[name] = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)).to(states[0][name].dtype)
    return plain
