"""Prune-and-grow mask updates and the sparse top-k gradients they need.

RigL: Evci et al., "Rigging the Lottery: Making All Tickets Winners", arXiv 1911.11134.
FedTiny: Huang et al., "Distributed Pruning Towards Tiny Neural Networks in Federated
Learning", arXiv 2212.01977: clients upload only the top-k gradients of pruned positions as
(index, value) pairs, the server merges them and prunes/grows, keeping the density exact.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

Masks = dict[str, Tensor]


def _top_indices(scores: Tensor, k: int) -> Tensor:
    """Flat indices of the k highest scores, ties: lower index first."""
    return torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:k]


def prune_grow_layer(weight: Tensor, mask: Tensor, grad: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Drop the k smallest-|w| active weights, grow the k pruned positions with largest |grad|.

    Only positions pruned before this step can grow; if fewer than k exist (or fewer than k are
    active), fewer are swapped. Dropped and grown weights are exactly 0. Returns new tensors.
    """
    if k < 0:
        raise ValueError(f"prune/grow count must be >= 0, got {k}")
    if not weight.shape == mask.shape == grad.shape:
        shapes = f"weight {tuple(weight.shape)}, mask {tuple(mask.shape)}, grad {tuple(grad.shape)}"
        raise ValueError(f"shapes differ: {shapes}")
    mask = mask.bool()
    active = int(mask.sum())
    k = min(k, active, mask.numel() - active)
    flat_mask = mask.reshape(-1)
    inf = torch.tensor(torch.inf, dtype=torch.float64, device=weight.device)
    drop = _top_indices(torch.where(flat_mask, -weight.detach().reshape(-1).abs().double(), -inf), k)
    grow = _top_indices(torch.where(flat_mask, -inf, grad.detach().reshape(-1).abs().double()), k)
    new_mask = flat_mask.clone()
    new_mask[drop] = False
    new_mask[grow] = True
    survivors = (flat_mask & new_mask).reshape(weight.shape)
    new_weight = torch.where(survivors, weight.detach(), torch.zeros_like(weight))
    return new_mask.reshape(mask.shape), new_weight


def prune_grow(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], grads: Mapping[str, Tensor], counts: Mapping[str, int]
) -> tuple[Masks, dict[str, Tensor]]:
    """RigL-style update of the layers named in `counts` (k_l swaps each); other entries are copied.

    Returns (new masks, new weights) with the keys of `masks` and `weights`; inputs are untouched.
    """
    missing = [n for n in counts if n not in masks or n not in weights or n not in grads]
    if missing:
        raise ValueError(f"prune_grow: layers {missing} need a weight, a mask and a gradient")
    new_masks = {n: m.clone() for n, m in masks.items()}
    new_weights = {n: w.clone() for n, w in weights.items()}
    for n, k in counts.items():
        new_masks[n], new_weights[n] = prune_grow_layer(weights[n], masks[n], grads[n], int(k))
    return new_masks, new_weights


def topk_pruned(grad: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Flat indices and (signed) values of the k largest-|grad| positions among PRUNED positions.

    What a FedTiny client uploads: O(k) memory and bandwidth instead of a dense gradient.
    Fewer than k come back if fewer positions are pruned; sorted by |grad|, largest first.
    """
    if k < 0:
        raise ValueError(f"top-k count must be >= 0, got {k}")
    if grad.shape != mask.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from mask shape {tuple(mask.shape)}")
    pruned = ~mask.bool().reshape(-1)
    flat = grad.detach().reshape(-1)
    k = min(k, int(pruned.sum()))
    scores = torch.where(pruned, flat.abs().double(), torch.tensor(-torch.inf, dtype=torch.float64, device=flat.device))
    index = _top_indices(scores, k)
    return index, flat[index].clone()


def merge_sparse(parts: Sequence[tuple[Tensor, Tensor]], shape: Sequence[int] | torch.Size, num_clients: int) -> Tensor:
    """Dense tensor of `shape`: client (index, value) parts summed over the union of indices,
    divided by `num_clients` (positions a client did not send count as zero for it)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    numel = 1
    for s in shape:
        numel *= int(s)
    dtype = parts[0][1].dtype if parts else torch.float32
    device = parts[0][1].device if parts else torch.device("cpu")
    out = torch.zeros(numel, dtype=dtype, device=device)
    for index, values in parts:
        index = index.long().reshape(-1)
        if index.numel() != values.numel():
            raise ValueError(f"{index.numel()} indices but {values.numel()} values")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
            raise ValueError(f"indices out of range for shape {tuple(shape)}")
        out.index_add_(0, index.to(device), values.reshape(-1).to(dtype=dtype, device=device))
    return (out / num_clients).reshape(tuple(int(s) for s in shape))
