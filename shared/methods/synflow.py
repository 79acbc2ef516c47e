"""SynFlow: data-free pruning at initialization, then masked FedAvg.

Tanaka et al., "Pruning neural networks without any data by iteratively conserving synaptic
flow", NeurIPS 2020, https://arxiv.org/abs/2006.05467. The server scores the (warmed-up)
starting model with 100 iterations of SynFlow on an all-ones input (no client is asked
anything), keeps the top `pruning.density` of prunable weights globally (the first layer stays
dense when `pruning.keep_first_dense`), and the mask never changes again.
Client config keys: only the shared training keys (``round``, ``seed``, ``epochs``, ``lr``, ``fail``).
"""

from __future__ import annotations

from shared.global_model import GlobalModel
from shared.methods.api import Method, MethodContext
from shared.methods.registry import register


@register("synflow")
class SynFlow(Method):
    def prepare(self, ctx: MethodContext) -> GlobalModel:
        gm = self.pruned_at_start(ctx, "synflow", "global")
        ctx.note("synflow: pruned at initialization without data")
        return gm
