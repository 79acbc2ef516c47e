"""SNIP: prune once at initialization from client-computed connection sensitivity, then masked FedAvg.

Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019,
https://arxiv.org/abs/1810.02340. In federated form the server cannot see data, so
`fedtiny.search_clients` sampled clients compute |w * dL/dw| on `fedtiny.score_batches` local
batches of the (warmed-up) starting model; the server averages the scores weighted by the
clients' sample counts and keeps the top `pruning.density` of prunable weights globally
(the first layer stays dense when `pruning.keep_first_dense`). The mask never changes again.
Client config keys: ``score``, ``batches``, ``seed`` (query.scores); training uses only the
shared keys (``round``, ``seed``, ``epochs``, ``lr``, ``fail``).
"""

from __future__ import annotations

import torch

from server import policy_search
from server.context import RunContext
from server.global_model import GlobalModel
from server.methods.base import METHODS, Method
from shared.pruning import masks_from_scores

Tensors = dict[str, torch.Tensor]


@METHODS.register("snip")
class Snip(Method):
    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.scores: Tensors = {}

    def prepare(self, ctx: RunContext) -> GlobalModel:
        model = self.initial_model(ctx)
        c = ctx.config
        if c.pruning.density >= 1.0:
            return GlobalModel(model.state_dict())
        self.scores = policy_search.client_scores(ctx, model, "snip")
        masks = masks_from_scores(self.scores, c.pruning.density, "global", c.seed, keep_dense=ctx.dense_layers(model))
        ctx.recorder.note(f"snip: pruned at initialization from scores of {c.fedtiny.search_clients} clients")
        return GlobalModel(model.state_dict(), masks)
