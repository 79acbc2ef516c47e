"""PruneFL: adaptive re-masking from aggregated squared gradients at intervals.

Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices", IEEE TNNLS
2022, https://arxiv.org/abs/1909.12326. PruneFL starts from a model pruned on one client and
then, every few rounds, re-selects the kept weights to maximise the estimated loss reduction
sum_{j kept} g_j^2 per unit of time, from squared gradients that clients accumulate over
their local iterations. Here:
- start: global magnitude pruning of the (warmed-up) starting model at `pruning.density`
  (the server's small labelled warm-up set stands in for PruneFL's initial client);
- every `INTERVAL` rounds (never on the last round, whose new weights could not train),
  sampled clients also return the per-batch mean of squared gradients of every prunable
  weight, pruned positions included (a dense upload, as in the paper), and the server
  averages them weighted by sample counts;
- within each layer, the server swaps the lowest-importance kept weights for the
  highest-importance pruned ones while that raises the kept importance, at most
  ceil(f_j x nnz_l) swaps with f_j = `MAX_CHANGE` x 0.5^j at the j-th re-masking (the decaying
  change budget of the FedDST authors' PruneFL implementation). Our time model is the same
  per weight, so the paper's ratio of importance to time reduces to importance, and layer
  counts stay fixed so that no layer can be emptied. Grown weights start at zero.
Client config keys: ``sq-grads`` (bool: also send squared gradients, payload ``scores``),
plus the shared training keys.
"""

from __future__ import annotations

import math

import torch

from server.context import RunContext
from server.fleet import Reply
from server.global_model import GlobalModel
from server.methods.base import METHODS, Method
from shared import codec, protocol as p
from shared.pruning import average_scores, compute_masks

Tensors = dict[str, torch.Tensor]
INTERVAL = 5  # rounds between re-maskings (FedTiny's default adjustment interval, for equal budgets)
MAX_CHANGE = 0.3  # fraction of a layer's kept weights that the first re-masking may swap


def remask(mask: torch.Tensor, importance: torch.Tensor, max_swaps: int) -> torch.Tensor:
    """Swap kept weights of lowest importance for pruned ones of highest importance, pair by pair,
    while the pruned one is strictly more important, at most `max_swaps` times; count is kept."""
    flat_mask, flat = mask.reshape(-1), importance.reshape(-1).double()
    kept, pruned = flat_mask.nonzero().squeeze(1), (~flat_mask).nonzero().squeeze(1)
    k = min(max_swaps, kept.numel(), pruned.numel())
    drop = kept[torch.sort(flat[kept], stable=True).indices[:k]]
    grow = pruned[torch.sort(flat[pruned], descending=True, stable=True).indices[:k]]
    gain = flat[grow] > flat[drop]  # both sorted, so gains form a prefix
    out = flat_mask.clone()
    out[drop[gain]] = False
    out[grow[gain]] = True
    return out.reshape(mask.shape)


@METHODS.register("prunefl")
class PruneFL(Method):
    interval = INTERVAL

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.remaskings = 0
        self.asked = False

    def prepare(self, ctx: RunContext) -> GlobalModel:
        model = self.initial_model(ctx)
        c = ctx.config
        if c.pruning.density >= 1.0:
            return GlobalModel(model.state_dict())
        self.dense = ctx.dense_layers(model)
        masks = compute_masks(model, c.pruning.density, "magnitude", "global", seed=c.seed, keep_dense=self.dense)
        return GlobalModel(model.state_dict(), masks)

    def round_config(self, ctx: RunContext, gm: GlobalModel, t: int) -> dict:
        self.asked = bool(gm.masks) and t % self.interval == 0 and t < ctx.config.fl.rounds
        return {"sq-grads": True} if self.asked else {}

    def after_round(self, ctx: RunContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        if not self.asked:
            return
        parts = [(r, r.content[p.PAYLOAD].get(p.SCORE_TENSORS)) for r in replies]
        parts = [(r, blob) for r, blob in parts if blob is not None]
        if not parts:
            return
        scores = [codec.decode(blob)[0] for _, blob in parts]
        importance = average_scores(scores, [int(r.content[p.METRICS][p.NUM_EXAMPLES]) for r, _ in parts])
        fraction = MAX_CHANGE * 0.5**self.remaskings
        new = {
            n: m if n in self.dense else remask(m, importance[n], math.ceil(fraction * int(m.sum())))
            for n, m in gm.masks.items()
        }
        changed = gm.set_masks(new)
        self.remaskings += 1
        ctx.recorder.note(f"prunefl: round {t} re-masked {len(changed)} layers from squared gradients")

    def phase(self, t: int) -> str:
        return "adjust" if self.asked else "train"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "remaskings": self.remaskings, "dense": getattr(self, "dense", [])}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.remaskings, self.dense = state["remaskings"], state["dense"]
