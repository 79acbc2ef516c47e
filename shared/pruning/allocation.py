"""Density allocations: turn per-weight scores into masks at an exact overall density.

Every allocation is ``fn(scores, density, seed=0, keep_dense=()) -> masks``. The kept count over
all named layers, `keep_dense` layers included, is exactly ``round(density * total)``; within a
layer the highest scores are kept, ties broken by position (lower flat index first, earlier
layer first). Scores are importances (higher = keep); ``-inf`` marks positions that must go
first (used by iterative pruning so that new masks only prune what is still unpruned).
"""

from __future__ import annotations

import math
from typing import Callable, Collection, Mapping

import torch
from torch import Tensor

from shared.pruning.topk import keep_top
from shared.registry import Registry

Masks = dict[str, Tensor]
AllocationFn = Callable[..., Masks]

ALLOCATIONS: Registry[AllocationFn] = Registry("allocation", allow_import=True)

NOISE_TOLERANCE = 0.02  # uniform-noise: redraw until the overall density is within 2% (relative)
NOISE_MAX_DRAWS = 1000


def budget(scores: Mapping[str, Tensor], density: float, keep_dense: Collection[str] = ()) -> tuple[int, int]:
    """(kept count over all layers, kept count left for the layers not in `keep_dense`)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    unknown = sorted(set(keep_dense) - set(scores))
    if unknown:
        raise ValueError(f"keep_dense names {unknown} are not scored layers; known: {sorted(scores)}")
    total = sum(s.numel() for s in scores.values())
    kept = round(density * total)
    dense = sum(scores[n].numel() for n in set(keep_dense))
    if dense > kept:
        raise ValueError(
            f"keep_dense layers hold {dense} weights but density {density} keeps only {kept} of {total}; "
            "raise the density or keep fewer layers dense"
        )
    return kept, kept - dense


def _assemble(scores: Mapping[str, Tensor], counts: Mapping[str, int], keep_dense: Collection[str]) -> Masks:
    return {
        n: torch.ones_like(s, dtype=torch.bool) if n in keep_dense else keep_top(s, counts[n])
        for n, s in scores.items()
    }


def exact_counts(raw: Mapping[str, float], sizes: Mapping[str, int], kept: int) -> dict[str, int]:
    """Integer counts c_l <= n_l summing to `kept`, proportional to raw_l * n_l, capped at dense.

    Finds eps with sum_l min(n_l, eps * raw_l * n_l) = kept: layers whose density eps * raw_l
    would exceed 1 are made dense and the rest re-balanced (water-filling, as RigL's ERK),
    then rounds by largest remainder (ties: earlier layer first).
    """
    names = list(raw)
    capacity = sum(sizes[n] for n in names)
    if not 0 <= kept <= capacity:
        raise ValueError(f"cannot keep {kept} of {capacity} weights")
    if any(raw[n] < 0 for n in names):
        raise ValueError(f"relative densities must be nonnegative, got {dict(raw)}")
    dense: set[str] = set()
    ideal = {n: 0.0 for n in names}
    while True:
        left = kept - sum(sizes[n] for n in dense)
        mass = sum(raw[n] * sizes[n] for n in names if n not in dense)
        eps = left / mass if mass > 0 else 0.0
        over = [n for n in names if n not in dense and eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    for n in names:
        ideal[n] = float(sizes[n]) if n in dense else min(float(sizes[n]), eps * raw[n] * sizes[n])
    counts = {n: min(sizes[n], math.floor(ideal[n])) for n in names}
    short = kept - sum(counts.values())
    by_remainder = sorted(names, key=lambda n: -(ideal[n] - math.floor(ideal[n])))
    while short > 0:  # hand out the remainder; a second pass covers float round-off
        for n in by_remainder:
            if short > 0 and counts[n] < sizes[n]:
                counts[n] += 1
                short -= 1
    while short < 0:
        for n in reversed(by_remainder):
            if short < 0 and counts[n] > 0:
                counts[n] -= 1
                short += 1
    return counts


def _by_relative_density(
    scores: Mapping[str, Tensor], density: float, keep_dense: Collection[str], raw: Mapping[str, float]
) -> Masks:
    _, left = budget(scores, density, keep_dense)
    sizes = {n: scores[n].numel() for n in raw}
    return _assemble(scores, exact_counts(raw, sizes, left), keep_dense)


def _sparse_names(scores: Mapping[str, Tensor], keep_dense: Collection[str]) -> list[str]:
    return [n for n in scores if n not in keep_dense]


@ALLOCATIONS.register("global")
def global_threshold(
    scores: Mapping[str, Tensor], density: float, seed: int = 0, keep_dense: Collection[str] = ()
) -> Masks:
    """One threshold over all layers: keep the top scores globally (as torch's global_unstructured)."""
    _, left = budget(scores, density, keep_dense)
    names = _sparse_names(scores, keep_dense)
    masks = {n: torch.ones_like(scores[n], dtype=torch.bool) for n in scores if n in keep_dense}
    if names:
        flat = keep_top(torch.cat([scores[n].detach().reshape(-1).double().cpu() for n in names]), left)
        for n, piece in zip(names, torch.split(flat, [scores[n].numel() for n in names])):
            masks[n] = piece.reshape(scores[n].shape).to(scores[n].device)
    return {n: masks[n] for n in scores}


@ALLOCATIONS.register("uniform")
def uniform(scores: Mapping[str, Tensor], density: float, seed: int = 0, keep_dense: Collection[str] = ()) -> Masks:
    """Every (non-dense) layer at the same density; counts rounded by largest remainder."""
    raw = {n: 1.0 for n in _sparse_names(scores, keep_dense)}
    return _by_relative_density(scores, density, keep_dense, raw)


def noisy_densities(
    sizes: Mapping[str, int], base: float, target: float, dense: int, total: int, seed: int = 0
) -> dict[str, float]:
    """Per-layer densities base * (1 + U(-0.5, 0.5)), capped at 1, redrawn (seeded) until the
    overall density (with `dense` always-kept weights of `total`) is within 2% of `target`.

    As the FedTiny reference code builds its pruning-policy candidates (arXiv 2212.01977).
    If no draw is close enough after many tries, the closest draw is returned.
    """
    g = torch.Generator().manual_seed(seed)
    names = list(sizes)
    best, best_gap = {n: base for n in names}, math.inf
    for _ in range(NOISE_MAX_DRAWS):
        noise = torch.rand(len(names), generator=g, dtype=torch.float64) - 0.5
        draw = {n: min(1.0, base * (1.0 + float(u))) for n, u in zip(names, noise)}
        overall = (dense + sum(draw[n] * sizes[n] for n in names)) / total
        gap = abs(overall - target)
        if gap < best_gap:
            best, best_gap = draw, gap
        if gap <= NOISE_TOLERANCE * target:
            break
    return best


@ALLOCATIONS.register("uniform-noise")
def uniform_noise(
    scores: Mapping[str, Tensor], density: float, seed: int = 0, keep_dense: Collection[str] = ()
) -> Masks:
    """Uniform densities with +-50% seeded per-layer noise (FedTiny's candidate pool,
    arXiv 2212.01977), then rescaled so the kept count is exact (layers capped at density 1)."""
    kept, left = budget(scores, density, keep_dense)
    names = _sparse_names(scores, keep_dense)
    sizes = {n: scores[n].numel() for n in names}
    total = sum(s.numel() for s in scores.values())
    base = left / sum(sizes.values()) if names else 0.0
    raw = noisy_densities(sizes, base, kept / total if total else 0.0, kept - left, total, seed)
    return _by_relative_density(scores, density, keep_dense, raw)


def erk_raw_densities(shapes: Mapping[str, torch.Size]) -> dict[str, float]:
    """Erdos-Renyi-Kernel relative densities: (sum of dims) / (prod of dims) per layer."""
    return {n: sum(s) / math.prod(s) for n, s in shapes.items()}


@ALLOCATIONS.register("erk")
def erk(scores: Mapping[str, Tensor], density: float, seed: int = 0, keep_dense: Collection[str] = ()) -> Masks:
    """Erdos-Renyi-Kernel densities, from Evci et al., "Rigging the Lottery: Making All Tickets
    Winners", arXiv 1911.11134.

    Keeps true: sum_{l in D} n_l + sum_{l not in D} eps * (sum(shape_l) / prod(shape_l)) * n_l
    = round(density * total), where n_l = prod(shape_l), D holds the keep_dense layers and every
    layer whose ERK density eps * sum(shape_l) / prod(shape_l) would exceed 1 (those are made
    dense and eps is re-solved for the rest), up to rounding each count to an integer.
    """
    names = _sparse_names(scores, keep_dense)
    raw = erk_raw_densities({n: scores[n].shape for n in names})
    return _by_relative_density(scores, density, keep_dense, raw)


def lamp_scores(scores: Tensor) -> Tensor:
    """LAMP score of each entry: s_u^2 / sum_{v >= u} s_v^2 over the layer sorted ascending by s^2.

    Lee et al., "Layer-adaptive Sparsity for the Magnitude-based Pruning", arXiv 2010.07611.
    Negative scores (e.g. -inf, already pruned) get -inf; an all-zero tail gets 0.
    """
    flat = scores.detach().reshape(-1).double()
    negative = flat < 0
    sq = torch.where(negative, torch.zeros_like(flat), flat).square()
    sorted_sq, order = torch.sort(sq, stable=True)
    tail = sorted_sq.flip(0).cumsum(0).flip(0)  # tail[u] = sum_{v >= u} sorted_sq[v]
    ratio = torch.where(tail > 0, sorted_sq / tail.clamp_min(torch.finfo(tail.dtype).tiny), torch.zeros_like(tail))
    out = torch.empty_like(flat)
    out[order] = ratio
    out[negative] = -math.inf
    return out.reshape(scores.shape)


@ALLOCATIONS.register("lamp")
def lamp(scores: Mapping[str, Tensor], density: float, seed: int = 0, keep_dense: Collection[str] = ()) -> Masks:
    """LAMP (arXiv 2010.07611): per-layer LAMP scores, then one global threshold on them."""
    return global_threshold({n: lamp_scores(s) for n, s in scores.items()}, density, seed, keep_dense)
