"""Server-side aggregation: sample-weighted averages of client states over active positions."""

from __future__ import annotations

from typing import Sequence

import torch

Tensors = dict[str, torch.Tensor]


def weighted_average(states: Sequence[Tensors], weights: Sequence[float], masks: Tensors | None = None) -> Tensors:
    """FedAvg (McMahan et al., arXiv 1602.05629): weights by sample count.

    Float tensors are averaged; integer buffers (BN's num_batches_tracked) take the
    maximum. With masks, pruned positions stay exactly zero.
    """
    if not states:
        raise ValueError("nothing to aggregate")
    total = float(sum(weights))
    out: Tensors = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for state, w in zip(states, weights):
                acc += state[name].double() * (w / total)
            value = acc.to(first.dtype)
            if masks and name in masks:
                value = value * masks[name]
            out[name] = value
        else:
            out[name] = torch.stack([s[name] for s in states]).amax(0)
    return out


def mask_weighted_average(states: Sequence[Tensors], masks: Sequence[Tensors], weights: Sequence[float]) -> Tensors:
    """Average each position only over the clients whose mask keeps it (FedDST, arXiv 2112.09824)."""
    plain = weighted_average(states, weights)
    for name in masks[0]:
        num = sum(s[name].double() * m[name] * w for s, m, w in zip(states, masks, weights))
        den = sum(m[name].double() * w for m, w in zip(masks, weights))
        plain[name] = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)).to(states[0][name].dtype)
    return plain
