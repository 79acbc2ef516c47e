"""SNIP: prune once at initialization from client-computed connection sensitivity, then masked FedAvg.

Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019,
https://arxiv.org/abs/1810.02340. In federated form the server cannot see data, so
`snip.clients` sampled clients compute |w * dL/dw| on `snip.batches` local
batches of the (warmed-up) starting model; the server averages the scores weighted by the
clients' sample counts and keeps the top `pruning.density` of prunable weights globally
(the first layer stays dense when `pruning.keep_first_dense`). The mask never changes again.
Client config keys: ``score``, ``batches``, ``seed`` (query.scores, `MethodContext.client_scores`); training uses only the
shared keys (``round``, ``seed``, ``epochs``, ``lr``, ``fail``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.global_model import GlobalModel
from shared.methods.api import Method, MethodContext
from shared.methods.registry import register
from shared.pruning import masks_from_scores

Tensors = dict[str, torch.Tensor]


@dataclass
class SnipSettings:
    FLEET_BOUND = ("clients",)  # at most fl.num_clients unless set (shared.config)
    clients: int = 10  # clients sampled to compute scores
    batches: int = 2  # local batches each scores on

    def validate(self, c, check) -> None:
        check(1 <= self.clients <= c.fl.num_clients, "snip.clients", "must be in [1, fl.num_clients]")
        check(self.batches >= 1, "snip.batches", "must be >= 1")


@register("snip")
class Snip(Method):
    Settings = SnipSettings
    score = "snip"  # the data score clients compute (shared.pruning.scores)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.scores: Tensors = {}

    def prepare(self, ctx: MethodContext) -> GlobalModel:
        model = self.initial_model(ctx)
        c = ctx.config
        self.scores = ctx.client_scores(model, self.score, self.settings.clients, self.settings.batches)
        masks = masks_from_scores(self.scores, c.pruning.density, "global", c.seed, keep_dense=ctx.dense_layers(model))
        ctx.note(f"{self.name}: pruned at initialization from scores of {self.settings.clients} clients")
        return GlobalModel(model.state_dict(), masks)
