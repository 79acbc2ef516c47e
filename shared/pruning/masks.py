"""Masks: boolean tensors keyed by parameter name (True = weight kept).

Density is always computed from the masks, never stored beside them.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

Masks = dict[str, torch.Tensor]


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights of `model` in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"mask for unknown parameter {name!r}")
        params[name].mul_(mask.to(params[name].dtype))


def density(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of kept weights over all masked weights."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 1.0
    return sum(int(m.sum()) for m in masks.values()) / total


def layer_densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(m.float().mean()) for name, m in masks.items()}


def full_masks(model: nn.Module, names: list[str]) -> Masks:
    """All-True masks (a dense model) for the named parameters."""
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}
