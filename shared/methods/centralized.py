"""The centralized ceiling: the same model trained on the union of the clients' training data, pruned
by gradual magnitude pruning. Not federated: it is the reference a federated pruned model is
measured against, labelled as the ceiling in every table.

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression",
arXiv 1710.01878. The server starts from the same (warmed-up) model as every method and runs
SGD with the run's batch size, momentum, weight decay and learning-rate schedule over the union
of every client's training split (holdouts excluded), for as many example passes as the
federated run makes (rounds x clients_per_round x local_epochs x the mean client size). Every
`centralized.prune_every` steps between `prune_start` and `prune_end` (fractions of the steps)
the global magnitude mask shrinks along d_t = d_f + (1 - d_f)(1 - progress)^3 (masks only
shrink), then training continues at exactly `pruning.density`. It trains on `device`, the union
moved there once. Round 0 records the result; no federated rounds run, so its bytes are the final
federated evaluation's only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.global_model import GlobalModel
from shared.methods.api import Method, MethodContext
from shared.methods.registry import register
from shared.data import to_tensor
from shared.device import DeviceBatches, on_device, to_cpu
from shared.partition import every_client_data
from shared.pruning import apply_masks, full_masks, shrink_by_magnitude
from shared.pruning.schedule import gradual_density
from shared.training import LR_SCHEDULES


@dataclass
class CentralizedSettings:
    prune_start: float = 0.0  # gradual pruning starts at this fraction of the training steps ...
    prune_end: float = 0.75  # ... and reaches the target here; the rest fine-tunes at the target
    prune_every: int = 20  # steps between mask updates

    def validate(self, c, check) -> None:
        check(0.0 <= self.prune_start <= self.prune_end <= 1.0, "centralized.prune_start",
              "and centralized.prune_end must satisfy 0 <= prune_start <= prune_end <= 1")
        check(self.prune_every >= 1, "centralized.prune_every", "must be >= 1")


def union_of_clients(ctx: MethodContext) -> tuple[np.ndarray, np.ndarray]:
    """Every client's training split (holdouts excluded), concatenated in partition order."""
    parts = every_client_data(ctx.bundle, ctx.config)
    return np.concatenate([p.x_train for p in parts]), np.concatenate([p.y_train for p in parts])


def example_passes(ctx: MethodContext, num_examples: int) -> int:
    """Examples the federated run trains on: rounds x clients per round x local epochs x mean client size."""
    f = ctx.config.fl
    return round(f.rounds * f.clients_per_round * f.local_epochs * num_examples / f.num_clients)


@register("centralized")
class Centralized(Method):
    Settings = CentralizedSettings
    federated = False

    def prepare(self, ctx: MethodContext) -> GlobalModel:
        model = self.initial_model(ctx).to(ctx.device)
        x, y = union_of_clients(ctx)
        masks = self.train_and_prune(ctx, model, x, y)
        model.to("cpu")
        masks = to_cpu(masks) if masks else None
        ctx.note(f"centralized: trained on the union of {len(y)} client examples, density {ctx.config.pruning.density}")
        return GlobalModel(model.state_dict(), masks)

    def train_and_prune(self, ctx: MethodContext, model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> dict | None:
        c, f, s = ctx.config, ctx.config.fl, self.settings
        steps_per_epoch = math.ceil(len(y) / f.batch_size)
        total = max(1, math.ceil(example_passes(ctx, len(y)) / f.batch_size))
        start, end = round(s.prune_start * total), round(s.prune_end * total)
        prune = c.pruning.density < 1.0
        dense = ctx.dense_layers(model)
        masks = full_masks(model, ctx.prunable(model) + dense) if prune else None
        opt = torch.optim.SGD(model.parameters(), lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
        schedule = LR_SCHEDULES.get(f.lr_schedule)
        xs, ys = on_device(to_tensor(ctx.bundle, x), y, ctx.device)  # moved once; `batches`' order and values
        model.train()
        step = 0
        for epoch in range(math.ceil(total / steps_per_epoch)):
            for xb, yb in DeviceBatches(xs, ys, f.batch_size, True, c.seed * 7919 + epoch):
                if step >= total:
                    break
                if prune and (step == end or (start <= step < end and (step - start) % s.prune_every == 0)):
                    masks = self.shrink(model, masks, gradual_density(step, start, end, c.pruning.density), dense, c.seed)
                for group in opt.param_groups:  # the run's schedule, by the round this step falls in
                    group["lr"] = schedule(f.lr, 1 + step * f.rounds // total, f.rounds)
                if len(yb) >= 2:
                    opt.zero_grad()
                    F.cross_entropy(model(xb), yb).backward()
                    opt.step()
                if masks:
                    apply_masks(model, masks)
                step += 1
        if prune and end >= total:  # the schedule never reached its end: prune to the target now
            masks = self.shrink(model, masks, c.pruning.density, dense, c.seed)
        return masks

    @staticmethod
    def shrink(model: torch.nn.Module, masks: dict, density: float, dense: list[str], seed: int) -> dict:
        """Global magnitude masks at `density` among still-kept weights (masks only shrink)."""
        new = shrink_by_magnitude(dict(model.named_parameters()), masks, density, seed, dense)
        apply_masks(model, new)
        return new

    def phase(self, t: int) -> str:
        return "centralized"
