"""Schedules for FedTiny's progressive fine pruning (Huang et al., arXiv 2212.01977).

Every `interval` rounds while t <= t_end, one block of layers (output side first, cycling) swaps
k_l = ceil(alpha_t * nnz_l) weights, alpha_t decaying by a cosine as in RigL (Evci et al.,
"Rigging the Lottery: Making All Tickets Winners", arXiv 1911.11134). t counts rounds.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from torch import Tensor


def cosine_fraction(alpha: float, t: int, t_end: int) -> float:
    """alpha / 2 * (1 + cos(pi * t / t_end)) for 0 <= t <= t_end, 0 after."""
    if t_end <= 0:
        raise ValueError(f"t_end must be positive, got {t_end}")
    if t < 0:
        raise ValueError(f"round t must be >= 0, got {t}")
    if t > t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / t_end))


def adjust_counts(masks: Mapping[str, Tensor], names: Sequence[str], fraction: float) -> dict[str, int]:
    """k_l = ceil(fraction * nnz_l) for each named layer (float round-off below 1e-9 ignored)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    missing = [n for n in names if n not in masks]
    if missing:
        raise ValueError(f"no masks for layers {missing}")
    return {n: math.ceil(round(fraction * int(masks[n].sum()), 9)) for n in names}


def is_adjust_round(t: int, interval: int, t_end: int) -> bool:
    """True on rounds 0 < t <= t_end that are multiples of `interval`."""
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    return 0 < t <= t_end and t % interval == 0


def block_for_adjustment(blocks: Sequence[Sequence[str]], step: int) -> list[str]:
    """The block adjusted at the `step`-th adjustment: output side first, cycling inward.

    step 0 -> last block, step 1 -> the one before, ..., then back to the last block.
    """
    if not blocks:
        raise ValueError("no blocks to adjust")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return list(blocks[len(blocks) - 1 - step % len(blocks)])


def gradual_density(step: int, start: int, end: int, final_density: float, initial_density: float = 1.0) -> float:
    """Density at `step` of gradual magnitude pruning, Zhu & Gupta, "To prune, or not to prune:
    exploring the efficacy of pruning for model compression", arXiv 1710.01878.

    Their equation (1) in sparsity s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3, written for
    density d = 1 - s (the same curve, since d_i - d_f = s_f - s_i):

        d_t = d_f + (d_i - d_f) (1 - (t - start) / (end - start))^3   for start <= t <= end,

    d_i before `start` and d_f after `end`: fast pruning early, while redundant weights abound,
    and slower towards the end. `start == end` is a one-shot step from d_i to d_f at `start`.
    """
    if not 0.0 <= final_density <= initial_density <= 1.0:
        raise ValueError(
            f"need 0 <= final_density <= initial_density <= 1, got final {final_density}, initial {initial_density}"
        )
    if end < start:
        raise ValueError(f"end must be >= start, got start {start}, end {end}")
    if step < start or (step == start and start < end):
        return initial_density
    if step >= end:
        return final_density
    progress = (step - start) / (end - start)
    return final_density + (initial_density - final_density) * (1.0 - progress) ** 3
