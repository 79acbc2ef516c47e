"""FedMef's budget-aware extrusion (BaE): pull the weights about to be pruned towards zero.

Huang et al., "FedMef: Towards Memory-efficient Federated Dynamic Pruning", CVPR 2024,
arXiv 2403.14737: before a prune step, the parameters that will be pruned are regularised
towards 0 so that their information moves into the surviving weights. The exact loss of the paper
could not be read; the reading chosen here adds lambda * sum_l ||w_l[P_l]||^2 (squared L2) to the
local loss, where P_l are the k_l ACTIVE weights of smallest |w| in the received global model and
k_l is the count the server will prune at its next adjustment. The reference code
(FedPruning `calc_bae_loss`) takes P_l among all entries, masked ones included, so P_l is almost
always already-zero weights and the penalty does nothing; that is not copied.

The penalty is applied as its gradient, 2 * lambda * w on P_l, added by a hook on each weight's
gradient: the same update as the extra loss term, without changing how the loss is computed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from shared.pruning.topk import keep_top


def about_to_prune(weight: Tensor, mask: Tensor, k: int) -> Tensor:
    """Bool mask of the k active positions of smallest |weight| (ties: lower flat index first),
    the weights a magnitude prune step of k would remove."""
    active = mask.bool()
    k = min(int(k), int(active.sum()))
    score = torch.where(active, -weight.detach().abs().double(), torch.full_like(weight, -torch.inf, dtype=torch.float64))
    return keep_top(score, k)


def penalty_masks(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], counts: Mapping[str, int]) -> dict[str, Tensor]:
    """`about_to_prune` for every layer named in `counts`."""
    return {n: about_to_prune(weights[n], masks[n], k) for n, k in counts.items()}


def bae_gradient(weight: Tensor, penalised: Tensor, lam: float) -> Tensor:
    """The gradient of lam * ||weight[penalised]||^2: 2 * lam * weight on the penalised positions, 0 elsewhere."""
    return torch.where(penalised, 2.0 * lam * weight.detach(), torch.zeros_like(weight))


@contextmanager
def extrude(model: nn.Module, penalised: Mapping[str, Tensor], lam: float) -> Iterator[None]:
    """Within the block every backward pass adds BaE's gradient to the named weights' gradients."""
    params = dict(model.named_parameters())
    handles = []
    for name, where in penalised.items():
        param = params[name]
        where = where.to(param.device)
        handles.append(param.register_hook(lambda g, p=param, w=where: g + bae_gradient(p, w, lam)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
