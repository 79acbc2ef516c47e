"""Powerpropagation: train v where the layer uses w = sign(v)|v|^beta.

Schwarz et al., "Powerpropagation: A sparsity inducing weight reparameterisation", NeurIPS 2021,
arXiv 2110.00296, as SparsyFed's clients use it (Guastella et al., ICLR 2025, arXiv 2504.05153).
dw/dv = beta |v|^(beta-1): for beta > 1 a weight at exactly 0 gets gradient 0 and stays 0 under
SGD with weight decay (the "rich get richer" dynamics), while beta = 1 is plain training.
The weights are reparameterised in place for the training of one round (`powerpropagate`): v is
initialised from the received w (v = sign(w)|w|^(1/beta), so the layer starts from exactly the
received function up to float rounding) and w = sign(v)|v|^beta is written back afterwards, so
what travels and what the server holds are always plain weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class PowerProp(nn.Module):
    """The parametrization w = sign(v)|v|^beta, with v = sign(w)|w|^(1/beta) as its right inverse."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"Powerpropagation needs beta > 0, got {beta}")
        self.beta = float(beta)

    def forward(self, v: Tensor) -> Tensor:
        return v if self.beta == 1.0 else torch.sign(v) * v.abs().pow(self.beta)

    def right_inverse(self, w: Tensor) -> Tensor:
        return w if self.beta == 1.0 else torch.sign(w) * w.abs().pow(1.0 / self.beta)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


@contextmanager
def powerpropagate(model: nn.Module, names: Sequence[str], beta: float) -> Iterator[None]:
    """Within the block the named weights are trained as v (w = sign(v)|v|^beta); on exit each is a
    plain parameter again holding w. Optimizers must be built inside the block (they see v)."""
    owners = [_owner(model, n) for n in names]
    for module, attr in owners:
        parametrize.register_parametrization(module, attr, PowerProp(beta))
    try:
        yield
    finally:
        for module, attr in owners:
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
