"""Which parameters are prunable, defined once: conv and linear weights, in forward order.

Biases and batch-norm parameters stay dense (FedTiny, arXiv 2212.01977, as in most pruning work).
"""

from __future__ import annotations

import torch
from torch import nn

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


def prunable_names(model: nn.Module) -> list[str]:
    """Names of the weights of conv (any dimension, transposed too) and linear layers, in forward order.

    Forward order comes from hooks on one dummy input of `model.input_shape` (eval mode, no
    gradients, training flag restored) when the model has that attribute, else registration order.
    Layers never called in forward come last, in registration order. Tied weights appear once,
    under their first name; a layer whose weight is not a parameter of ndim >= 2 is not prunable.
    """
    params = dict(model.named_parameters())
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE_MODULES)]
    names = [f"{name}.weight" if name else "weight" for name, _ in modules]
    input_shape = getattr(model, "input_shape", None)
    if input_shape is not None:
        order = _forward_order(model, modules, tuple(input_shape))
        names = [f"{name}.weight" if name else "weight" for name in order] + [
            n for n in names if n.rpartition(".")[0] not in order and not (n == "weight" and "" in order)
        ]
    seen: set[str] = set()
    result = []
    for n in names:
        if n in params and n not in seen and params[n].ndim >= 2:
            seen.add(n)
            result.append(n)
    return result


def _forward_order(model: nn.Module, modules: list[tuple[str, nn.Module]], input_shape: tuple) -> list[str]:
    order: list[str] = []
    handles = []
    for name, module in modules:

        def hook(_module: nn.Module, _inputs: object, _output: object, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(module.register_forward_hook(hook))
    try:
        dummy_forward(model, input_shape)
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def dummy_forward(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """One eval-mode forward pass of a zero input (1, *input_shape), for hooks that inspect the model.

    The model's train/eval mode is restored; BN statistics do not move in eval mode.
    """
    was_training = model.training
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        model.eval()
        model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
