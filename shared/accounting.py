"""Accounting: parameter counts, forward MACs and model bytes, dense and sparse.

Why: FedTiny ("Distributed Pruning Towards Tiny Neural Networks in Federated Learning",
arXiv 2212.01977) reports accuracy against computation (FLOPs) and memory footprint, so every
run reports the same three numbers, computed the same way for every method.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from shared import codec
from shared.pruning.params import PRUNABLE_MODULES, dummy_forward, prunable_names


def _kept(param: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Nonzero values that the mask keeps (a masked-off value counts as zero)."""
    nonzero = param.detach() != 0
    if mask is not None:
        nonzero &= mask.to(nonzero.device)
    return int(nonzero.sum())


def count_parameters(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Parameter counts: total, nonzero, prunable (conv/linear weights) and prunable nonzero."""
    masks = masks or {}
    prunable = set(prunable_names(model))
    counts = {"total": 0, "nonzero": 0, "prunable": 0, "prunable_nonzero": 0}
    for name, param in model.named_parameters():
        kept = _kept(param, masks.get(name))
        counts["total"] += param.numel()
        counts["nonzero"] += kept
        if name in prunable:
            counts["prunable"] += param.numel()
            counts["prunable_nonzero"] += kept
    return counts


def _macs_per_weight_use(module: nn.Module, output: torch.Tensor) -> int:
    """How many times each weight is used in one forward: output positions per output channel."""
    if isinstance(module, nn.Linear):
        return output.numel() // module.out_features
    return output.numel() // module.out_channels


@torch.no_grad()
def flops(
    model: nn.Module, input_shape: tuple[int, ...], masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, int]:
    """Forward multiply-accumulates for one example of `input_shape`, dense and with masks.

    Conv: out_h * out_w * C_out * C_in / groups * k_h * k_w; linear: in * out. The sparse count
    uses only kept weights (MACs scale with each layer's mask density). Measured with forward
    hooks on a dummy input of shape (1, *input_shape), in eval mode.
    """
    masks = masks or {}
    totals = {"dense": 0, "sparse": 0}

    def hook(name: str):
        def record(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            uses = _macs_per_weight_use(module, output)
            weight_name = f"{name}.weight" if name else "weight"
            mask = masks.get(weight_name)
            kept = module.weight.numel() if mask is None else int(mask.sum())
            totals["dense"] += uses * module.weight.numel()
            totals["sparse"] += uses * kept

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_MODULES)
    ]
    try:
        dummy_forward(model, input_shape)
    finally:
        for handle in handles:
            handle.remove()
    return totals


def model_size(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Bytes of the model: dense float32 state dict vs the codec's sparse encoding (masks included)."""
    state = model.state_dict()
    dense_bytes = sum(t.numel() * 4 for t in state.values())
    sparse_bytes = len(codec.encode(state, masks, send_masks=True))
    return {"dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes}
