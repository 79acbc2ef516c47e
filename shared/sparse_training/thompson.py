"""FedRTS's topology adjustment by Thompson sampling over a Beta posterior per weight position.

Huang et al., "FedRTS: Federated Robust Pruning via Combinatorial Thompson Sampling", NeurIPS 2025,
arXiv 2501.19122: each link (weight position) of a sparse layer holds Beta(alpha, beta), both
starting at 1. Outcomes r in [0, 1] add c * r to alpha and c * (1 - r) to beta:
- active links, every round: r = (1 - gamma) * G + gamma * sum_i p_i C_i, where G = 1 if the link
  is among the top-kappa |w| of the active links of the aggregated model and C_i = 1 if it is among
  the top-kappa of client i's uploaded weights, p_i the clients' sample shares, kappa = K - k the
  "core links" (K active, k the round's adjustment count);
- inactive links, in adjustment rounds: r = (1 - gamma) * 0.5 + gamma * sum_i p_i 1[link in I_i],
  I_i client i's top-k gradient positions among inactive links (the server has no gradient of its
  own, so its vote is the prior's 0.5).
In an adjustment round the new mask keeps, per layer, the K links of largest theta ~ Beta(alpha,
beta): the density is exact, the number of links that change is random. Gamma weights the
clients' votes as in the FedPruning code (`--aggregated_gamma`; its README says the opposite; the
two agree at the default 0.5).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from shared.pruning.topk import keep_top


def top_active(weight: Tensor, mask: Tensor, kappa: int) -> Tensor:
    """Bool mask of the kappa active positions of largest |weight| (ties: lower flat index first)."""
    active = mask.bool()
    kappa = min(int(kappa), int(active.sum()))
    score = torch.where(active, weight.detach().abs().double(), torch.full_like(weight, -torch.inf, dtype=torch.float64))
    return keep_top(score, kappa)


def observe(alpha: Tensor, beta: Tensor, where: Tensor, reward: Tensor, c: float) -> None:
    """alpha += c * r and beta += c * (1 - r) at the positions `where` (in place)."""
    r = reward.to(alpha.dtype)
    alpha.add_(torch.where(where, c * r, torch.zeros_like(r)))
    beta.add_(torch.where(where, c * (1.0 - r), torch.zeros_like(r)))


def active_reward(global_weight: Tensor, client_weights: Sequence[Tensor], shares: Sequence[float], mask: Tensor,
                  kappa: int, gamma: float) -> Tensor:
    """r = (1 - gamma) G + gamma sum_i p_i C_i (meaningful at active positions only)."""
    votes = sum(p * top_active(w, mask, kappa).double() for p, w in zip(shares, client_weights))
    return (1.0 - gamma) * top_active(global_weight, mask, kappa).double() + gamma * votes


def inactive_reward(client_indices: Sequence[Tensor], shares: Sequence[float], shape: torch.Size, gamma: float) -> Tensor:
    """r = (1 - gamma) * 0.5 + gamma sum_i p_i 1[position in I_i] (I_i: flat indices, meaningful at inactive positions)."""
    votes = torch.zeros(int(np.prod(shape)), dtype=torch.float64)
    for p, idx in zip(shares, client_indices):
        hit = torch.zeros_like(votes)
        hit[idx.long()] = 1.0
        votes += p * hit
    return (1.0 - gamma) * 0.5 + gamma * votes.reshape(shape)


def sample_mask(alpha: Tensor, beta: Tensor, count: int, rng: np.random.Generator) -> Tensor:
    """Thompson sampling: theta ~ Beta(alpha, beta) per position, keep the `count` largest."""
    theta = rng.beta(alpha.double().numpy().reshape(-1), beta.double().numpy().reshape(-1))
    return keep_top(torch.from_numpy(theta).reshape(alpha.shape), count)
