"""The one top-k selection every pruning step uses: highest scores first, ties to the lower flat index."""

from __future__ import annotations

import torch
from torch import Tensor


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Flat indices of the k highest scores, highest first; ties: lower flat index first."""
    return torch.sort(scores.detach().reshape(-1), descending=True, stable=True).indices[:k]


def keep_top(scores: Tensor, k: int) -> Tensor:
    """Bool mask (shaped like `scores`) keeping the `k` highest scores; ties: lower flat index first."""
    n = scores.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} entries")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    mask[top_indices(scores, k)] = True
    return mask.reshape(scores.shape)
