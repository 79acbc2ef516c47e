"""Folding eval-mode batch norm into the conv or linear layer before it.

Why: a tiny model's BN statistics cost four dense values per channel, which at 1% density
outweigh the kept weights (docs/export.md). Folded, a channel keeps one bias.
Folding scales each output channel's row of weights by gamma / sqrt(var + eps), so a pruned
(zero) weight stays zero and the masks are unchanged.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(producer, BN) module names where a BN directly follows a conv / linear inside an nn.Sequential.

    Only Sequential neighbours are sure to run one after the other, so other BNs stay (a
    ResNet's stem, for example).
    """
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (a, first), (b, second) in zip(children, children[1:]):
            if _can_fold(first, second):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def _can_fold(producer: nn.Module, bn: nn.Module) -> bool:
    if not (isinstance(producer, _PRODUCERS) and isinstance(bn, _BN) and bn.running_mean is not None):
        return False
    return producer.weight.shape[0] == bn.num_features


def fold_pair(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: Mapping[str, torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of producer-then-BN as one layer: w * s per output row, (b - mean) * s + beta.

    `bn` holds running_mean, running_var and, when affine, weight and bias. Computed in float64.
    """
    var, mean = bn["running_var"].double(), bn["running_mean"].double()
    gamma = bn["weight"].double() if "weight" in bn else torch.ones_like(var)
    beta = bn["bias"].double() if "bias" in bn else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + eps)
    b = bias.double() if bias is not None else torch.zeros_like(var)
    w = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), ((b - mean) * scale + beta).to(weight.dtype)


def fold_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The eval-mode state dict with every `foldable_pairs` BN folded in and its entries removed; the BN names."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folded = []
    for producer, bn_name in foldable_pairs(model):
        bn = model.get_submodule(bn_name)
        stats = {k: state.pop(f"{bn_name}.{k}") for k in _BN_KEYS if f"{bn_name}.{k}" in state}
        w, b = fold_pair(state[f"{producer}.weight"], state.get(f"{producer}.bias"), stats, bn.eps)
        state[f"{producer}.weight"], state[f"{producer}.bias"] = w, b
        folded.append(bn_name)
    return state, folded


def drop_modules(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named submodules (folded BNs) by nn.Identity, in place; returns the model."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(getattr(parent, child, None), _BN):
            raise ValueError(f"packed file folds {name!r}, which is not a batch norm of this architecture")
        setattr(parent, child, nn.Identity())
    return model


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every conv->BN and linear->BN pair folded into one layer (eval-mode BN), for ONNX.

    Uses torch.fx's fuse (it also finds pairs outside nn.Sequential); a model fx cannot trace is
    returned as a copy unfused.
    """
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        return fuse(model, inplace=False)
    except Exception:  # fx cannot trace every user model; BN then stays (onnx also folds in eval mode)
        return copy.deepcopy(model)
