"""Pruning: scores, density allocations, masks, prune/grow and schedules.

``compute_masks`` is the one entry point for pruning at a target density; the server can also
turn client-averaged scores into masks with ``masks_from_scores``.
"""

from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from shared.pruning.allocation import ALLOCATIONS, budget, keep_top
from shared.pruning.masks import apply_masks, density, full_masks, layer_densities
from shared.pruning.params import prunable_names
from shared.pruning.scores import SCORES, average_scores, input_shape, linearize, synaptic_flow

__all__ = [
    "ALLOCATIONS",
    "SCORES",
    "SYNFLOW_ITERATIONS",
    "apply_masks",
    "average_scores",
    "compute_masks",
    "density",
    "full_masks",
    "keep_top",
    "layer_densities",
    "masks_from_scores",
    "shrink_by_magnitude",
    "prunable_names",
]

SYNFLOW_ITERATIONS = 100

Batches = Sequence[tuple[Tensor, Tensor]]


def masks_from_scores(
    scores: Mapping[str, Tensor],
    density: float,
    allocation: str = "global",
    seed: int = 0,
    keep_dense: Collection[str] = (),
    trusted: Collection[str] = (),
) -> dict[str, Tensor]:
    """Masks at exactly round(density * total) kept weights from `scores` (e.g. averaged over clients).

    `allocation` is an ALLOCATIONS name or `package.module:fn` from a `trusted` package.
    """
    return ALLOCATIONS.get(allocation, trusted)(dict(scores), density, seed=seed, keep_dense=tuple(keep_dense))


def compute_masks(
    model: nn.Module,
    density: float,
    score: str = "magnitude",
    allocation: str = "global",
    batches: Batches | None = None,
    seed: int = 0,
    keep_dense: Collection[str] = (),
    synflow_iterations: int = SYNFLOW_ITERATIONS,
    trusted: Collection[str] = (),
) -> dict[str, Tensor]:
    """Masks for the prunable weights of `model` at `density` (exact up to rounding to one weight).

    With ``score="synflow"`` pruning is iterative, as in Tanaka et al., "Pruning neural networks
    without any data by iteratively conserving synaptic flow", arXiv 2006.05467: over
    `synflow_iterations` steps the density follows density ** (i / iterations), and each step
    re-scores the masked model (already pruned weights rank last, so masks only shrink). The
    model itself is never changed. `score` and `allocation` are registered names or
    `package.module:fn` from a `trusted` package.
    """
    score_fn = SCORES.get(score, trusted)
    ALLOCATIONS.get(allocation, trusted)
    names = prunable_names(model)
    if score != "synflow":
        scores = score_fn(model, names, batches=batches, seed=seed)
        return masks_from_scores(scores, density, allocation, seed, keep_dense, trusted)
    if synflow_iterations < 1:
        raise ValueError(f"synflow_iterations must be >= 1, got {synflow_iterations}")
    shape = input_shape(model, batches)
    masks = full_masks(model, names)
    budget(masks, density, keep_dense)  # fail fast on an impossible density
    linear = linearize(model)  # |θ| of the masked model = mask * |θ|: linearize once, mask each step
    for i in range(1, synflow_iterations + 1):
        apply_masks(linear, masks)
        scores = synaptic_flow(linear, names, shape)
        scores = {n: torch.where(masks[n], s, torch.full_like(s, -torch.inf)) for n, s in scores.items()}
        masks = masks_from_scores(scores, density ** (i / synflow_iterations), allocation, seed, keep_dense)
    return masks


def shrink_by_magnitude(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], density: float, seed: int = 0,
    keep_dense: Collection[str] = (),
) -> dict[str, Tensor]:
    """Global magnitude masks at `density` among the still-kept weights: masks only shrink
    (iterative and gradual magnitude pruning: IMP, the centralized ceiling)."""
    scores = {n: torch.where(m, weights[n].detach().abs(), torch.full_like(weights[n], -torch.inf)) for n, m in masks.items()}
    return masks_from_scores(scores, density, "global", seed, keep_dense=keep_dense)
