"""Local training and evaluation in plain torch: what the Flower clients (and the server warm-up) call.

Masked training follows FedTiny's phase 2 (H. Huang et al., "Distributed Pruning Towards Tiny
Neural Networks in Federated Learning", ICDCS 2023, https://arxiv.org/abs/2212.01977): the mask
holds at every step and pruned weights keep no optimizer state (`MaskedSGD`), so a client only
ever moves its sparse model; for the layers being adjusted, the gradient at pruned
positions is summed over the last local epoch and only its top-k (indices, values) leave the
client, keeping the upload O(k) instead of a dense gradient.

Threads are the caller's business: nothing here calls ``torch.set_num_threads``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.pruning.masks import apply_masks
from shared.registry import Registry
from shared.pruning.params import prunable_names
from shared.pruning.prune_grow import topk_pruned
from shared.pruning.scores import SCORES

Batches = Iterable[tuple[Tensor, Tensor]]

# Client learning rate per round: fn(lr, t, rounds) -> lr of round t (1-based) of `rounds`.
LR_SCHEDULES: Registry[Callable[[float, int, int], float]] = Registry("lr schedule")


@LR_SCHEDULES.register("constant")
def constant_lr(lr: float, t: int, rounds: int) -> float:
    return lr


@LR_SCHEDULES.register("cosine")
def cosine_lr(lr: float, t: int, rounds: int) -> float:
    """Cosine annealing from lr at round 1 towards 0 after the last round (Loshchilov & Hutter,
    arXiv 1608.03983): with 10 of 20 non-IID clients per round the global model swings with each
    round's sample; small late steps let the final model settle instead of ending on a swing."""
    return lr / 2.0 * (1.0 + math.cos(math.pi * (t - 1) / rounds))


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


class MaskedSGD:
    """SGD with momentum whose state for a masked weight covers its kept positions only.

    The update is torch.optim.SGD's (dampening 0, no Nesterov: buf = mu * buf + g + wd * w;
    w -= lr * buf), restricted to kept weights, so pruned weights never move and keep no
    optimizer state at all: a masked layer's momentum is nnz values, not a dense buffer.
    Unmasked parameters (batch norm, biases, dense layers) use torch.optim.SGD.
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, Tensor], lr: float, momentum: float, weight_decay: float) -> None:
        params = dict(model.named_parameters())
        self.masked = [(params[n], m.reshape(-1).nonzero().squeeze(1)) for n, m in masks.items()]
        masked_ids = {id(p) for p, _ in self.masked}
        rest = [p for p in model.parameters() if id(p) not in masked_ids]
        self.dense = torch.optim.SGD(rest, lr=lr, momentum=momentum, weight_decay=weight_decay) if rest else None
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[Tensor | None] = [None] * len(self.masked)

    def zero_grad(self) -> None:
        if self.dense:
            self.dense.zero_grad(set_to_none=True)
        for param, _ in self.masked:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.dense:
            self.dense.step()
        for i, (param, kept) in enumerate(self.masked):
            if param.grad is None:
                continue
            flat = param.view(-1)
            g = param.grad.view(-1)[kept]
            if self.weight_decay:
                g = g + self.weight_decay * flat[kept]
            if self.momentum:
                buf = self.buffers[i]
                self.buffers[i] = g.clone() if buf is None else buf.mul_(self.momentum).add_(g)
                g = self.buffers[i]
            flat.index_add_(0, kept, g, alpha=-self.lr)
            param.grad = None  # the dense gradient is not kept between steps


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

    Masked weights are updated by `MaskedSGD` at their kept positions only, so pruned weights
    stay exactly zero and keep no optimizer state. `masks` None trains densely. `grad_layers` maps a masked parameter name to k: during
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
    optimizer = MaskedSGD(model, masks, lr, momentum, weight_decay)

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
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            with torch.no_grad():
                for n, buf in grad_sums.items():
                    if params[n].grad is not None:
                        buf.add_(params[n].grad.masked_fill(masks[n], 0.0))
            optimizer.step()
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
    trusted: Sequence[str] = (),
) -> dict[str, Tensor]:
    """A client's pruning scores (e.g. SNIP) on its data, for the server to average.

    `names` defaults to every prunable weight; `score_name` picks from `shared.pruning.scores.SCORES`
    (or is `package.module:fn` from a `trusted` package).
    """
    names = list(names) if names is not None else prunable_names(model)
    return SCORES.get(score_name, trusted)(model, names, batches=list(batches), seed=seed)


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

