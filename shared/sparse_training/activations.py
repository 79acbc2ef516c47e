"""Activation pruning for the weight gradient only.

SparsyFed (Guastella et al., ICLR 2025, arXiv 2504.05153) and FedMef's scaled activation pruning
(Huang et al., CVPR 2024, arXiv 2403.14737) keep only the largest |x| of a layer's input for the
backward pass: the forward output is computed from the full input and the input gradient is exact;
only the weight gradient, dL/dW = f(x, dL/dy), uses the pruned x. What backward keeps is the
kept values plus their int32 flat indices (8 bytes per kept entry instead of 4 per entry), so
the saving is real when fewer than half the entries are kept; the reference implementations keep a
dense tensor full of zeros and save nothing.

Per batch the kept count is exactly ceil(keep * numel). SparsyFed's reference code learns a threshold on a conv layer's first batch
and reuses it for later batches, a speed shortcut whose kept fraction drifts; here every batch
keeps its exact count.
"""

from __future__ import annotations

import math
import types
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn



def kept_count(numel: int, keep: float) -> int:
    """ceil(keep * numel), float round-off below 1e-9 ignored."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep fraction must be in [0, 1], got {keep}")
    return min(numel, math.ceil(round(keep * numel, 9)))


def prune_input(x: Tensor, keep: float) -> tuple[Tensor, Tensor]:
    """(int32 flat indices, values) of the ceil(keep * numel) largest |x|.

    `torch.topk`, not the stable sort of `shared.pruning.topk`: on a conv input of 800k entries it
    is 8x faster (a full sort costs twice the layer's forward and backward on one CPU thread), and
    how ties are broken does not matter here: tied entries of equal |x| are most often ReLU zeros,
    which add nothing to the gradient wherever they are kept."""
    flat = x.detach().reshape(-1)
    index = torch.topk(flat.abs(), kept_count(flat.numel(), keep), sorted=False).indices
    return index.to(torch.int32), flat[index].clone()


def restore_input(index: Tensor, values: Tensor, shape: torch.Size) -> Tensor:
    """The pruned input as a dense tensor (zeros where not kept), for one backward computation."""
    flat = torch.zeros(math.prod(shape), dtype=values.dtype, device=values.device)
    flat[index.long()] = values
    return flat.reshape(shape)


class _SparseInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, keep: float) -> Tensor:
        index, values = prune_input(x, keep)
        ctx.save_for_backward(index, values, weight)
        ctx.shape, ctx.has_bias = x.shape, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        index, values, weight = ctx.saved_tensors
        x = restore_input(index, values, ctx.shape)
        grad_x = grad_out @ weight
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class _SparseInputConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, keep: float, stride, padding, dilation, groups) -> Tensor:
        index, values = prune_input(x, keep)
        ctx.save_for_backward(index, values, weight)
        ctx.shape, ctx.has_bias = x.shape, bias is not None
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        index, values, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        x = restore_input(index, values, ctx.shape)
        grad_x = torch.nn.grad.conv2d_input(ctx.shape, weight, grad_out, stride, padding, dilation, groups)
        grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad_out, stride, padding, dilation, groups)
        grad_b = grad_out.sum((0, 2, 3)) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


def sparse_input_linear(x: Tensor, weight: Tensor, bias: Tensor | None, keep: float) -> Tensor:
    """F.linear whose weight gradient sees only the top ceil(keep * numel) |x| of the batch."""
    return _SparseInputLinear.apply(x, weight, bias, keep)


def sparse_input_conv2d(x: Tensor, conv: nn.Conv2d, keep: float) -> Tensor:
    """`conv`(x) whose weight gradient sees only the top ceil(keep * numel) |x| of the batch."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("activation pruning supports Conv2d with numeric zero padding only")
    return _SparseInputConv2d.apply(x, conv.weight, conv.bias, keep, conv.stride, conv.padding, conv.dilation, conv.groups)


def _forward(module: nn.Module, keep: float):
    if isinstance(module, nn.Conv2d):
        return lambda self, x: sparse_input_conv2d(x, self, keep) if self.training else F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
    if isinstance(module, nn.Linear):
        return lambda self, x: sparse_input_linear(x, self.weight, self.bias, keep) if self.training else F.linear(
            x, self.weight, self.bias)
    raise ValueError(f"activation pruning supports Conv2d and Linear layers, not {type(module).__name__}")


@contextmanager
def prune_activations(model: nn.Module, keep: Mapping[str, float]) -> Iterator[None]:
    """Within the block, in training mode, the module named `m` (a Conv2d or Linear) keeps the top
    `keep[m]` fraction of its input for its weight gradient; keep 1 leaves a module as it is.
    Evaluation is untouched. Works under `powerpropagate` (the weight is read at each call)."""
    patched = []
    for name, fraction in keep.items():
        if fraction < 1.0:
            module = model.get_submodule(name)
            module.forward = types.MethodType(_forward(module, fraction), module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
