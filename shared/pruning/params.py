"""Which parameters are prunable: the weights of convolutions and linear layers.

Biases and batch-norm parameters stay dense (FedTiny, arXiv 2212.01977, as in most pruning work).
"""

from __future__ import annotations

from torch import nn

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the prunable weights of `model` (conv and linear, ndim >= 2), in registration order."""
    names = []
    for prefix, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, PRUNABLE_MODULES) and isinstance(weight, nn.Parameter) and weight.ndim >= 2:
            names.append(f"{prefix}.weight" if prefix else "weight")
    return names
