"""FedDST: clients prune and grow their masks locally (RigL-style); mask-weighted aggregation.

Bibikar et al., "Federated Dynamic Sparse Training: Computing Less, Communicating Less, Yet
Learning Better", AAAI 2022, https://arxiv.org/abs/2112.09824. Here:
- start: ERK layer densities at `pruning.density`, magnitude within each layer (the
  authors' code prunes the initial model by magnitude with ERK counts);
- readjustment rounds t = 1, 1 + `INTERVAL`, ... (the authors' rule (t - 1) % 15 == 0): each
  client drops the ceil(alpha_t x nnz_l) smallest-magnitude kept weights of every sparse
  layer and grows as many pruned positions of largest |dL/dw| on `fedtiny.score_batches`
  local batches (new weights start at zero), alpha_t = `ALPHA`/2 x (1 + cos(pi (t-1) / T)),
  T = rounds // 2; it readjusts before its local epochs rather than after them as the
  authors' code does, so grown weights are trained before upload instead of arriving as
  zeros that the server's magnitude step would always discard;
- the client uploads its weights with its own masks; the server averages each position over
  the clients that keep it (`server.aggregate.mask_weighted_average`, sample-weighted) and
  re-derives the global mask: per layer, the top nnz_l aggregated weights by magnitude, so
  layer counts and the density stay exact.
Other rounds are masked FedAvg. Client config keys: ``dst-fraction`` (alpha_t) and
``dst-batches`` (batches for the growth gradient), plus the shared training keys.
"""

from __future__ import annotations

import torch

from server.aggregate import mask_weighted_average
from server.context import RunContext
from server.fleet import Reply
from server.global_model import GlobalModel
from server.methods.base import METHODS, Method
from server.methods.snip import dense_layers
from shared import codec, protocol as p
from shared.pruning import compute_masks, keep_top
from shared.pruning.schedule import cosine_fraction

Tensors = dict[str, torch.Tensor]
ALPHA = 0.01  # readjustment ratio
INTERVAL = 15  # rounds between readjustments


def client_masks_reason(global_masks: Tensors, masks: Tensors) -> str | None:
    """Why a client's readjusted masks are unusable (names, shapes or per-layer counts differ), or None."""
    if set(masks) != set(global_masks):
        return "mask names differ from the global masks"
    for n, m in masks.items():
        if m.shape != global_masks[n].shape:
            return f"mask of {n} has shape {tuple(m.shape)}, expected {tuple(global_masks[n].shape)}"
        if int(m.sum()) != int(global_masks[n].sum()):
            return f"mask of {n} keeps {int(m.sum())} weights, expected {int(global_masks[n].sum())}"
    return None


def global_masks_from(state: Tensors, client_masks: list[Tensors], counts: dict[str, int]) -> Tensors:
    """Per layer, the `counts[n]` largest aggregated weights by magnitude among positions some client keeps."""
    out = {}
    for n, k in counts.items():
        union = torch.stack([m[n] for m in client_masks]).any(0)
        score = torch.where(union, state[n].abs().double(), torch.full_like(state[n], -torch.inf, dtype=torch.float64))
        out[n] = keep_top(score, k)
    return out


@METHODS.register("feddst")
class FedDST(Method):
    alpha = ALPHA
    interval = INTERVAL

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.readjusting = False
        self.t_end = max(1, ctx.config.fl.rounds // 2)

    def prepare(self, ctx: RunContext) -> GlobalModel:
        model = self.initial_model(ctx)
        c = ctx.config
        if c.pruning.density >= 1.0:
            return GlobalModel(model.state_dict())
        masks = compute_masks(model, c.pruning.density, "magnitude", "erk", seed=c.seed, keep_dense=dense_layers(ctx, model))
        return GlobalModel(model.state_dict(), masks)

    def round_config(self, ctx: RunContext, gm: GlobalModel, t: int) -> dict:
        fraction = cosine_fraction(self.alpha, t - 1, self.t_end)
        self.readjusting = bool(gm.masks) and (t - 1) % self.interval == 0 and fraction > 0
        if not self.readjusting:
            return {}
        return {"dst-fraction": fraction, "dst-batches": ctx.config.fedtiny.score_batches}

    def after_round(self, ctx: RunContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        if not self.readjusting:
            return
        states, masks, weights = [], [], []
        for r in replies:
            tensors, client = codec.decode(r.content[p.PAYLOAD][p.UPDATE], masks=gm.masks)
            client = {n: client[n] for n in gm.masks if n in client}
            reason = client_masks_reason(gm.masks, client)
            if reason is not None:
                ctx.recorder.note(f"feddst: node {r.node_id} masks ignored: {reason}")
                continue
            states.append(tensors)
            masks.append(client)
            weights.append(int(r.content[p.METRICS][p.NUM_EXAMPLES]))
        if not states:
            return
        state = mask_weighted_average(states, masks, weights)
        counts = {n: int(m.sum()) for n, m in gm.masks.items()}
        gm.state = state
        changed = gm.set_masks(global_masks_from(state, masks, counts))
        ctx.recorder.note(f"feddst: round {t} readjusted, {len(changed)} layers changed their global mask")

    def phase(self, t: int) -> str:
        return "adjust" if self.readjusting else "train"
