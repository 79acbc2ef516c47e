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


from shared.aggregate import trimmed_mean
from shared.pruning.topk import top_indices

Masks = dict[str, Tensor]


class DropGrow:
    """Prune-and-grow of a layer at a fixed count: drop the k kept positions of lowest drop score,
    grow the k pruned positions of highest grow score; dropped and grown weights are exactly 0.

    The template of google-research/rigl's updaters: a method only overrides how the scores are
    computed (and, optionally, which drop/grow pairs it accepts). RigL and FedTiny drop by |w|
    and grow by |grad|; PruneFL scores both by its importance and swaps only when that gains.
    Ties: lower flat index first. Only positions pruned before the step can grow; if fewer than
    k are pruned (or kept), fewer are swapped.
    """

    def drop_scores(self, weight: Tensor, grad: Tensor) -> Tensor:
        return weight.detach().abs()

    def grow_scores(self, weight: Tensor, grad: Tensor) -> Tensor:
        return grad.detach().abs()

    def accept(self, dropped: Tensor, grown: Tensor) -> Tensor:
        """Which of the k (drop, grow) pairs, lowest drop and highest grow score first, are swapped."""
        return torch.ones_like(dropped, dtype=torch.bool)

    def update_layer(self, weight: Tensor, mask: Tensor, grad: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(new mask, new weight) of one layer after at most k swaps; inputs are untouched."""
        if k < 0:
            raise ValueError(f"prune/grow count must be >= 0, got {k}")
        if not weight.shape == mask.shape == grad.shape:
            shapes = f"weight {tuple(weight.shape)}, mask {tuple(mask.shape)}, grad {tuple(grad.shape)}"
            raise ValueError(f"shapes differ: {shapes}")
        flat_mask = mask.bool().reshape(-1)
        active = int(flat_mask.sum())
        k = min(k, active, flat_mask.numel() - active)
        inf = torch.tensor(torch.inf, dtype=torch.float64, device=weight.device)
        drop_score = -self.drop_scores(weight, grad).reshape(-1).double()
        grow_score = self.grow_scores(weight, grad).reshape(-1).double()
        drop = top_indices(torch.where(flat_mask, drop_score, -inf), k)
        grow = top_indices(torch.where(flat_mask, -inf, grow_score), k)
        keep = self.accept(-drop_score[drop], grow_score[grow])
        drop, grow = drop[keep], grow[keep]
        new_mask = flat_mask.clone()
        new_mask[drop] = False
        new_mask[grow] = True
        survivors = (flat_mask & new_mask).reshape(weight.shape)
        return new_mask.reshape(mask.shape), torch.where(survivors, weight.detach(), torch.zeros_like(weight))

    def update(
        self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], grads: Mapping[str, Tensor], counts: Mapping[str, int]
    ) -> tuple[Masks, dict[str, Tensor]]:
        """Update the layers named in `counts` (k_l swaps each); other entries are copied.

        Returns (new masks, new weights) with the keys of `masks` and `weights`; inputs are untouched.
        """
        missing = [n for n in counts if n not in masks or n not in weights or n not in grads]
        if missing:
            raise ValueError(f"prune/grow: layers {missing} need a weight, a mask and a gradient")
        new_masks = {n: m.clone() for n, m in masks.items()}
        new_weights = {n: w.clone() for n, w in weights.items()}
        for n, k in counts.items():
            new_masks[n], new_weights[n] = self.update_layer(weights[n], masks[n], grads[n], int(k))
        return new_masks, new_weights


RIGL = DropGrow()  # drop by |w|, grow by |grad|: RigL, FedTiny's server step, FedDST's client step


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
    index = top_indices(scores, k)
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


def merge_topk(parts: Sequence[tuple[Tensor, Tensor]], shape: Sequence[int] | torch.Size) -> Tensor:
    """Clients' top-k (index, gradient) parts merged per position by the unweighted trimmed mean over
    clients, a position a client did not send counting as 0 for it (FedTiny's server sums them,
    arXiv 2212.01977; `shared.aggregate.trimmed_mean`). From 3 clients on, every position's highest
    and lowest value are left out, so a position only one client sends merges to 0 and one client
    in ten cannot choose which positions grow, however large its values."""
    dense = [merge_sparse([part], shape, 1).double() for part in parts]
    return trimmed_mean(dense, [1.0] * len(dense), 0.1).float()


def grow_from_client_topk(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], parts: Mapping[str, Sequence[tuple[Tensor, Tensor]]],
    counts: Mapping[str, int],
) -> tuple[Masks, dict[str, Tensor]]:
    """The server's prune/grow from clients' top-k gradients (FedTiny, FedMef): per layer named in
    `counts`, the clients' (index, value) parts merged robustly (`merge_topk`), then RigL's step of
    k_l swaps. Returns the layers' (masks, weights)."""
    grads = {n: merge_topk(parts[n], weights[n].shape) for n in counts}
    return RIGL.update({n: weights[n] for n in counts}, {n: masks[n] for n in counts}, grads, counts)
