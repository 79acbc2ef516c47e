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
- the client uploads its weights at the global kept positions (so the shared update check
  holds: a locally dropped weight reads 0 there) plus its mask changes as sparse (index, value)
  pairs under ``topk``: a flip at a kept position is a drop, at a pruned position a grow with
  its trained value; O(changes) extra bytes instead of a whole mask. FedDST checks them on its
  own (`local_masks`), then averages each position over the clients that keep it
  (`server.aggregate.mask_weighted_average`, sample-weighted) and re-derives the global mask:
  per layer, the top nnz_l aggregated weights by magnitude, so layer counts and the density
  stay exact.
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
from shared import codec, protocol as p
from shared.pruning import keep_top
from shared.pruning.schedule import cosine_fraction

Tensors = dict[str, torch.Tensor]
ALPHA = 0.01  # readjustment ratio
INTERVAL = 15  # rounds between readjustments


def local_masks(global_masks: Tensors, state: Tensors, changes: dict) -> tuple[Tensors, Tensors] | str:
    """A client's masks and full sparse state from its mask changes, or why they are unusable.

    `changes` maps a layer to (flat indices, values, shape) of flipped positions: at globally kept
    positions drops (value must be 0), at pruned ones grows; each layer must keep its count.
    """
    masks, out = dict(global_masks), dict(state)
    for n, (idx, values, shape) in changes.items():
        if n not in global_masks or tuple(shape) != tuple(global_masks[n].shape):
            return f"mask change for {n} does not match a global mask"
        flat = global_masks[n].reshape(-1)
        dropped = flat[idx]
        if int(dropped.sum()) != int((~dropped).sum()):
            return f"layer {n}: {int(dropped.sum())} drops but {int((~dropped).sum())} grows"
        if bool((values[dropped] != 0).any()):
            return f"layer {n}: a dropped weight has a nonzero value"
        new = flat.clone()
        new[idx] = ~dropped
        masks[n] = new.reshape(global_masks[n].shape)
        weight = state[n].reshape(-1).clone()
        weight[idx] = values.to(weight.dtype)
        out[n] = weight.reshape(global_masks[n].shape)
    return masks, out


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
        return self.pruned_at_start(ctx, "magnitude", "erk")

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
            blob = r.content[p.PAYLOAD].get(p.TOPK)
            try:
                changes = codec.decode_sparse(blob) if blob is not None else {}
            except ValueError as exc:
                changes = f"undecodable mask changes ({exc})"
            got = changes if isinstance(changes, str) else local_masks(gm.masks, r.decoded, changes)
            if isinstance(got, str):
                ctx.recorder.note(f"feddst: node {r.node_id} mask changes ignored: {got}")
                continue
            masks.append(got[0])
            states.append(got[1])
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
