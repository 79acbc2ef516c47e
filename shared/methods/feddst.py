"""FedDST: clients prune and grow their masks locally (RigL-style); mask-weighted aggregation.

Bibikar et al., "Federated Dynamic Sparse Training: Computing Less, Communicating Less, Yet
Learning Better", AAAI 2022, https://arxiv.org/abs/2112.09824. Here:
- start: ERK layer densities at `pruning.density`, magnitude within each layer (the
  authors' code prunes the initial model by magnitude with ERK counts);
- readjustment rounds t = 1, 1 + `feddst.interval`, ... (the authors' rule (t - 1) % 15 == 0): each
  client drops the ceil(alpha_t x nnz_l) smallest-magnitude kept weights of every sparse
  layer and grows as many pruned positions of largest |dL/dw| on `feddst.batches`
  local batches (new weights start at zero), alpha_t = `feddst.alpha`/2 x (1 + cos(pi (t-1) / T)),
  T = rounds // 2; it readjusts before its local epochs rather than after them as the
  authors' code does, so grown weights are trained before upload instead of arriving as
  zeros that the server's magnitude step would always discard;
- the client uploads its weights at the global kept positions (so the shared update check
  holds: a locally dropped weight reads 0 there) plus its mask changes as sparse (index, value)
  pairs under ``mask-changes``: a flip at a kept position is a drop, at a pruned position a grow with
  its trained value; O(changes) extra bytes instead of a whole mask. FedDST checks them on its
  own before the round's aggregation (`check_reply`, `local_masks`), then averages each position over
  the clients that keep it (`shared.aggregate.mask_weighted_average`, sample-weighted) and re-derives the global mask:
  per layer, the top nnz_l positions by robust aggregated magnitude (`selection_scores`: a trimmed
  mean over clients, so one client cannot choose the grown positions), keeping layer counts and the
  density exact.
Other rounds are masked FedAvg. Client config keys: ``dst-fraction`` (alpha_t) and
``dst-batches`` (batches for the growth gradient), plus the shared training keys; settings
`feddst.alpha`, `feddst.interval`, `feddst.batches`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.aggregate import mask_weighted_average, trimmed_mean
from shared.global_model import GlobalModel
from shared.methods.api import ClientHalf, Method, MethodContext, Reply, TrainJob
from shared.methods.registry import register
from shared import codec, protocol as p
from shared.pruning import keep_top
from shared.pruning.prune_grow import RIGL
from shared.pruning.schedule import adjust_counts, cosine_fraction
from shared.training import TrainResult, local_scores

Tensors = dict[str, torch.Tensor]


@dataclass
class FedDSTSettings:
    alpha: float = 0.01  # readjustment ratio (cosine-decayed)
    interval: int = 15  # rounds between readjustments
    batches: int = 2  # local batches for the growth gradient

    def validate(self, c, check) -> None:
        check(0.0 <= self.alpha <= 1.0, "feddst.alpha", "must be in [0, 1]")
        check(self.interval >= 1, "feddst.interval", "must be >= 1")
        check(self.batches >= 1, "feddst.batches", "must be >= 1")


def readjust_masks(model: torch.nn.Module, masks: Tensors, batches: list, fraction: float, seed: int) -> Tensors:
    """FedDST's local readjustment (RigL-style, arXiv 2112.09824 / 1911.11134): in every sparse layer
    drop the ceil(fraction x nnz) smallest-|w| kept weights and grow as many pruned positions of
    largest |dL/dw| on `batches`; grown weights start at zero, so each layer keeps its count."""
    names = [n for n, m in masks.items() if not bool(m.all())]
    if not names:
        return masks
    grads = local_scores(model, "grad", batches, seed, names)
    params = dict(model.named_parameters())
    new_masks, new_weights = RIGL.update(
        {n: params[n].detach() for n in names}, {n: masks[n] for n in names}, grads, adjust_counts(masks, names, fraction)
    )
    with torch.no_grad():
        for n in names:
            params[n].copy_(new_weights[n])
    return {**masks, **new_masks}


def mask_changes(old: Tensors, new: Tensors, state: Tensors) -> dict:
    """Per changed layer, (flat indices where the mask flipped, values there, shape): a drop has value
    0, a grow its trained value. With the update's values at `old` kept positions this is the whole
    sparse model in O(changes) extra bytes, and `old` XOR indices gives the new mask."""
    out = {}
    for n, m in old.items():
        idx = (m ^ new[n]).reshape(-1).nonzero().squeeze(1)
        if idx.numel():
            out[n] = (idx, state[n].reshape(-1)[idx].float(), tuple(m.shape))
    return out


class FedDSTClient(ClientHalf):
    """Readjust the masks locally before training; send the mask changes beside the update."""

    def before_training(self, job: TrainJob) -> None:
        fraction = float(job.config.get(p.DST_FRACTION, 0.0))
        if fraction > 0 and job.masks:
            grow_batches = list(job.batches(0))[: int(job.config[p.DST_BATCHES])]
            job.local_masks = readjust_masks(job.model, job.masks, grow_batches, fraction, job.seed)

    def after_training(self, job: TrainJob, result: TrainResult) -> dict[str, bytes]:
        if job.local_masks is job.masks:
            return {}
        return {p.MASK_CHANGES: codec.encode_sparse(mask_changes(job.masks, job.local_masks, job.model.state_dict()))}


def local_masks(global_masks: Tensors, state: Tensors, changes: dict, limits: dict[str, int] | None = None,
                bounds: dict[str, float] | None = None) -> tuple[Tensors, Tensors] | str:
    """A client's masks and full sparse state from its mask changes, or why they are unusable.

    `changes` maps a layer to (flat indices, values, shape) of flipped positions: at globally kept
    positions drops (value must be 0), at pruned ones grows; each layer must keep its count, and
    drop at most `limits[layer]` (the readjustment the server asked for), so no client can replace
    a layer. A grown value is clipped to `bounds[layer]`, the largest |weight| the global layer
    keeps: a weight trained from zero for a few local epochs is not larger, so no client's magnitude
    decides the new mask.
    """
    masks, out = dict(global_masks), dict(state)
    for n, (idx, values, shape) in changes.items():
        if n not in global_masks or tuple(shape) != tuple(global_masks[n].shape):
            return f"mask change for {n} does not match a global mask"
        flat = global_masks[n].reshape(-1)
        dropped = flat[idx]
        if int(dropped.sum()) != int((~dropped).sum()):
            return f"layer {n}: {int(dropped.sum())} drops but {int((~dropped).sum())} grows"
        if limits is not None and int(dropped.sum()) > limits.get(n, 0):
            return f"layer {n}: {int(dropped.sum())} mask changes, more than the {limits.get(n, 0)} asked for"
        if not bool(torch.isfinite(values).all()):
            return f"layer {n}: non-finite values in the mask changes"
        if bounds is not None:
            values = values.clamp(-bounds[n], bounds[n])
        if bool((values[dropped] != 0).any()):
            return f"layer {n}: a dropped weight has a nonzero value"
        new = flat.clone()
        new[idx] = ~dropped
        masks[n] = new.reshape(global_masks[n].shape)
        weight = state[n].reshape(-1).clone()
        weight[idx] = values.to(weight.dtype)
        out[n] = weight.reshape(global_masks[n].shape)
    return masks, out


def selection_scores(states: list[Tensors], client_masks: list[Tensors], weights: list[float]) -> Tensors:
    """Per masked layer and position, the sample-weighted trimmed mean over clients of the client's
    weight there, 0 where its mask drops it (`shared.aggregate.trimmed_mean`): the magnitude the new
    global mask ranks by. From 3 clients on a position's highest and lowest value are left out, so a
    position that only one client grows scores 0 and one client in ten cannot choose which grow,
    where the paper's average over the clients that keep a position would give its value whole."""
    return {n: trimmed_mean([s[n].double() * m[n] for s, m in zip(states, client_masks)], weights, 0.1)
            for n in client_masks[0]}


def global_masks_from(scores: Tensors, client_masks: list[Tensors], counts: dict[str, int]) -> Tensors:
    """Per layer, the `counts[n]` largest |`scores`| (`selection_scores`) among positions some client keeps."""
    out = {}
    for n, k in counts.items():
        union = torch.stack([m[n] for m in client_masks]).any(0)
        out[n] = keep_top(torch.where(union, scores[n].abs().double(), torch.tensor(-torch.inf, dtype=torch.float64)), k)
    return out


@register("feddst")
class FedDST(Method):
    Settings = FedDSTSettings
    client = FedDSTClient()

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.readjusting = False
        self.limits: dict[str, int] | None = None  # mask changes per layer a client may make this round
        self.client_masks: list[Tensors] = []  # the accepted clients' masks of a readjustment round
        self.scores: Tensors = {}  # their robust magnitudes, which the new global mask keeps the top of
        self.t_end = max(1, ctx.config.fl.rounds // 2)

    def prepare(self, ctx: MethodContext) -> GlobalModel:
        return self.pruned_at_start(ctx, "magnitude", "erk")

    def round_config(self, ctx: MethodContext, gm: GlobalModel, t: int) -> dict:
        s = self.settings
        fraction = cosine_fraction(s.alpha, t - 1, self.t_end)
        self.readjusting = bool(gm.masks) and (t - 1) % s.interval == 0 and fraction > 0
        if not self.readjusting:
            return {}
        sparse = [n for n, m in gm.masks.items() if not bool(m.all())]  # the layers clients readjust
        self.limits = adjust_counts(gm.masks, sparse, fraction)
        return {p.DST_FRACTION: fraction, p.DST_BATCHES: s.batches}

    def check_reply(self, ctx: MethodContext, gm: GlobalModel, reply: Reply) -> str | None:
        """In readjustment rounds, the client's mask changes must be a valid readjustment
        (`check_mask_changes`); they are kept, decoded, for `aggregate`."""
        if not self.readjusting:
            return None
        got = check_mask_changes(reply, gm, self.limits)
        if isinstance(got, str):
            return f"feddst mask changes: {got}"
        reply.extras[p.MASK_CHANGES] = got
        return None

    def aggregate(self, ctx: MethodContext, gm: GlobalModel, replies: list[Reply]) -> Tensors:
        """In readjustment rounds, each position averaged over the clients that keep it (mask-weighted),
        each client's sparse state its screened update with its mask changes applied."""
        if not self.readjusting:
            return super().aggregate(ctx, gm, replies)
        bounds = grow_bounds(gm)
        local = [local_masks(gm.masks, r.decoded, r.extras[p.MASK_CHANGES], self.limits, bounds) for r in replies]
        self.client_masks, states, weights = [m for m, _ in local], [s for _, s in local], ctx.weights(replies)
        self.scores = selection_scores(states, self.client_masks, weights)
        return mask_weighted_average(states, self.client_masks, weights)

    def after_round(self, ctx: MethodContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        if not (self.readjusting and replies):
            return
        counts = {n: int(m.sum()) for n, m in gm.masks.items()}
        changed = gm.set_masks(global_masks_from(self.scores, self.client_masks, counts))
        ctx.note(f"feddst: round {t} readjusted, {len(changed)} layers changed their global mask")

    def phase(self, t: int) -> str:
        return "adjust" if self.readjusting else "train"


def grow_bounds(gm: GlobalModel) -> dict[str, float]:
    """Per masked layer, the largest |weight| the global layer keeps: the bound of a grown value."""
    return {n: float(gm.state[n].abs().max()) for n in gm.masks}


def check_mask_changes(reply: Reply, gm: GlobalModel, limits: dict[str, int] | None = None) -> dict | str:
    """A client's decoded mask changes, or why they are unusable: decodable within the global masks'
    shapes and a valid readjustment of them (`local_masks` on the reply's update)."""
    blob = reply.payload(p.MASK_CHANGES)
    try:
        expected = {n: tuple(m.shape) for n, m in gm.masks.items()}
        changes = codec.decode_sparse(blob, expected=expected) if blob is not None else {}
    except ValueError as exc:
        return f"undecodable mask changes ({exc})"
    got = local_masks(gm.masks, reply.decoded, changes, limits, grow_bounds(gm))
    return got if isinstance(got, str) else changes
