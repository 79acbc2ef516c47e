"""Local training and evaluation in plain torch: what the Flower clients (and the server warm-up) call.

Masked training follows FedTiny's phase 2 (H. Huang et al., "Distributed Pruning Towards Tiny
Neural Networks in Federated Learning", ICDCS 2023, https://arxiv.org/abs/2212.01977): the mask
is applied after every optimizer step and the optimizer state of pruned weights is reset, so a
client only ever moves its sparse model; for the layers being adjusted, the gradient at pruned
positions is summed over the last local epoch and only its top-k (indices, values) leave the
client, keeping the upload O(k) instead of a dense gradient.

Threads are the caller's business: nothing here calls ``torch.set_num_threads``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.pruning.masks import apply_masks
from shared.pruning.params import prunable_names
from shared.pruning.prune_grow import topk_pruned
from shared.pruning.scores import SCORES

Batches = Iterable[tuple[Tensor, Tensor]]


@dataclass
class TrainResult:
    """What one call of `train_masked` reports.

    num_examples: samples seen in one epoch (the last), the FedAvg weight.
    loss: sample-weighted mean cross-entropy over all batches of all epochs.
    topk: parameter name -> (flat indices, values) of the top-k summed last-epoch gradients at
        pruned positions, for the layers named in ``grad_layers``.
    """

    num_examples: int
    loss: float
    topk: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Summed cross-entropy, correct predictions and sample count: sums, so clients pool exactly."""

    loss_sum: float
    correct: int
    count: int

    @property
    def loss(self) -> float:
        if self.count == 0:
            raise ValueError("EvalResult has no samples; evaluate on at least one batch")
        return self.loss_sum / self.count

    @property
    def accuracy(self) -> float:
        if self.count == 0:
            raise ValueError("EvalResult has no samples; evaluate on at least one batch")
        return self.correct / self.count


def set_seed(seed: int) -> None:
    """Seed Python, numpy and torch so that a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_grad_layers(grad_layers: Mapping[str, int], masks: Mapping[str, Tensor] | None) -> None:
    for name, k in grad_layers.items():
        if masks is None or name not in masks:
            raise ValueError(f"grad_layers names {name!r}, which has no mask; only masked parameters can grow")
        if k < 0:
            raise ValueError(f"grad_layers[{name!r}] = {k}; k must be >= 0")


@torch.no_grad()
def enforce_masks(model: nn.Module, optimizer: torch.optim.Optimizer, masks: Mapping[str, Tensor]) -> None:
    """Zero the pruned weights and their momentum buffers, so pruned weights keep no optimizer state."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        param = params[name]
        param.mul_(mask)
        buf = optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            buf.mul_(mask)


def train_masked(
    model: nn.Module,
    masks: Mapping[str, Tensor] | None,
    batches_per_epoch: Callable[[int], Batches],
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    grad_layers: Mapping[str, int] | None = None,
) -> TrainResult:
    """Train with SGD while keeping pruned weights exactly zero; optionally report top-k pruned gradients.

    After every step the masks are re-applied and the momentum of pruned positions is zeroed;
    gradients are masked before the step so neither momentum nor weight decay moves a pruned
    weight. `masks` None trains densely. `grad_layers` maps a masked parameter name to k: during
    the last epoch that parameter's gradient at pruned positions is summed over batches (one
    buffer per named layer only) and its top-k by magnitude is returned as (flat indices,
    values) by `shared.pruning.prune_grow.topk_pruned`.
    `batches_per_epoch(epoch)` yields the (x, y) batches of that epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs = {epochs}; train for at least 1 epoch")
    grad_layers = dict(grad_layers or {})
    _check_grad_layers(grad_layers, masks)
    device = _device(model)
    params = dict(model.named_parameters())
    masks = {n: m.to(device=device, dtype=torch.bool) for n, m in (masks or {}).items()}
    apply_masks(model, masks)
    masked = [(params[n], m) for n, m in masks.items()]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    grad_sums: dict[str, Tensor] = {}
    loss_total, seen_total, last_epoch_examples = 0.0, 0, 0
    model.train()
    for epoch in range(epochs):
        last = epoch == epochs - 1
        if last:
            grad_sums = {n: torch.zeros_like(params[n]) for n in grad_layers}
        examples = 0
        for x, y in batches_per_epoch(epoch):
            if len(y) < 2:  # batch norm cannot train on a single example (a client's last batch)
                continue
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            with torch.no_grad():
                for n, buf in grad_sums.items():
                    if params[n].grad is not None:
                        buf.add_(params[n].grad.masked_fill(masks[n], 0.0))
                for param, mask in masked:
                    if param.grad is not None:
                        param.grad.mul_(mask)
            optimizer.step()
            enforce_masks(model, optimizer, masks)
            loss_total += float(loss.detach()) * len(y)
            examples += len(y)
        seen_total += examples
        last_epoch_examples = examples

    topk = {n: topk_pruned(grad_sums[n], masks[n], k) for n, k in grad_layers.items()}
    return TrainResult(
        num_examples=last_epoch_examples,
        loss=loss_total / seen_total if seen_total else float("nan"),
        topk=topk,
    )


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches) -> EvalResult:
    """Summed cross-entropy and correct count in eval mode (BN uses running statistics); mode restored."""
    was_training = model.training
    device = _device(model)
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            count += len(y)
    finally:
        model.train(was_training)
    return EvalResult(loss_sum=loss_sum, correct=correct, count=count)


def local_scores(
    model: nn.Module,
    score_name: str,
    batches: Batches,
    seed: int,
    names: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """A client's pruning scores (e.g. SNIP) on its data, for the server to average.

    `names` defaults to every prunable weight; `score_name` picks from `shared.pruning.scores.SCORES`.
    """
    names = list(names) if names is not None else prunable_names(model)
    return SCORES.get(score_name)(model, names, batches=list(batches), seed=seed)


def warmup(
    model: nn.Module,
    batches_fn: Callable[[int], Batches],
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> TrainResult:
    """Dense centralized pre-training on the server's small labelled set (FedTiny's optional phase 0)."""
    return train_masked(model, None, batches_fn, epochs, lr, momentum=momentum, weight_decay=weight_decay)

