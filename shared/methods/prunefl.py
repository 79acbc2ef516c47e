"""PruneFL: adaptive re-masking from aggregated squared gradients at intervals.

Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices", IEEE TNNLS
2022, https://arxiv.org/abs/1909.12326. PruneFL starts from a model pruned on one client and
then, every few rounds, re-selects the kept weights to maximise the estimated loss reduction
sum_{j kept} g_j^2 per unit of time, from squared gradients that clients accumulate over
their local iterations. Here:
- start: global magnitude pruning of the (warmed-up) starting model at `pruning.density`
  (the server's small labelled warm-up set stands in for PruneFL's initial client);
- every `prunefl.interval` rounds (never on the last round, whose new weights could not train),
  sampled clients also return the per-batch mean of squared gradients of every prunable
  weight, pruned positions included (a dense upload, as in the paper), and the server
  averages them weighted by sample counts;
- within each layer, the server swaps the lowest-importance kept weights for the
  highest-importance pruned ones while that raises the kept importance, at most
  ceil(f_j x nnz_l) swaps with f_j = `prunefl.max_change` x 0.5^j at the j-th re-masking (the decaying
  change budget of the FedDST authors' PruneFL implementation). Our time model is the same
  per weight, so the paper's ratio of importance to time reduces to importance, and layer
  counts stay fixed so that no layer can be emptied. Grown weights start at zero.
Client config keys: ``sq-grads`` (bool: also send squared gradients, payload ``sq-grads``),
plus the shared training keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shared.aggregate import robust_scores
from shared.global_model import GlobalModel
from shared.methods.api import ClientHalf, Method, MethodContext, Reply, TrainJob
from shared.methods.registry import register
from shared import codec, protocol as p
from shared.pruning import compute_masks
from shared.pruning.prune_grow import DropGrow
from shared.pruning.scores import accumulate_gradients
from shared.training import TrainResult

Tensors = dict[str, torch.Tensor]


@dataclass
class PruneFLSettings:
    interval: int = 5  # rounds between re-maskings (FedTiny's default adjustment interval, for equal budgets)
    max_change: float = 0.3  # fraction of a layer's kept weights that the first re-masking may swap

    def validate(self, c, check) -> None:
        check(self.interval >= 1, "prunefl.interval", "must be >= 1")
        check(0.0 <= self.max_change <= 1.0, "prunefl.max_change", "must be in [0, 1]")


class Remask(DropGrow):
    """PruneFL's swap: kept weights of lowest importance for pruned ones of highest importance,
    pair by pair, while the pruned one is strictly more important (gains form a prefix)."""

    def drop_scores(self, weight: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        return importance

    def grow_scores(self, weight: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        return importance

    def accept(self, dropped: torch.Tensor, grown: torch.Tensor) -> torch.Tensor:
        return grown > dropped


REMASK = Remask()


def squared_gradients(model: torch.nn.Module, names: list[str], batches) -> Tensors:
    """PruneFL's importance (arXiv 1909.12326): per-batch mean of (dL/dw)^2 over `batches`, dense,
    pruned positions included."""
    sums, count = accumulate_gradients(model, names, batches, square=True)
    return {n: t / max(1, count) for n, t in zip(names, sums)}


class PruneFLClient(ClientHalf):
    """When asked, squared gradients of every prunable weight over the last local epoch's batches."""

    def after_training(self, job: TrainJob, result: TrainResult) -> dict[str, bytes]:
        if not (job.config.get(p.SEND_SQ_GRADS, False) and job.masks):
            return {}
        last_epoch = job.batches(int(job.config[p.EPOCHS]) - 1)
        return {p.SQ_GRADS: codec.encode(squared_gradients(job.model, list(job.masks), last_epoch))}


@register("prunefl")
class PruneFL(Method):
    Settings = PruneFLSettings
    client = PruneFLClient()

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.remaskings = 0
        self.asked = False
        self.dense: list[str] = []

    def prepare(self, ctx: MethodContext) -> GlobalModel:
        model = self.initial_model(ctx)
        c = ctx.config
        self.dense = ctx.dense_layers(model)
        masks = compute_masks(model, c.pruning.density, "magnitude", "global", seed=c.seed, keep_dense=self.dense)
        return GlobalModel(model.state_dict(), masks)

    def round_config(self, ctx: MethodContext, gm: GlobalModel, t: int) -> dict:
        self.asked = bool(gm.masks) and t % self.settings.interval == 0 and t < ctx.config.fl.rounds
        return {p.SEND_SQ_GRADS: True} if self.asked else {}

    def check_reply(self, ctx: MethodContext, gm: GlobalModel, reply: Reply) -> str | None:
        if not self.asked:
            return None
        got = check_sq_grads(reply, gm)
        if isinstance(got, str):
            return f"prunefl: {got}"
        reply.extras[p.SQ_GRADS] = got
        return None

    def after_round(self, ctx: MethodContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        if not (self.asked and replies):
            return
        importance = robust_scores([r.extras[p.SQ_GRADS] for r in replies], ctx.weights(replies))
        fraction = self.settings.max_change * 0.5**self.remaskings
        sparse = [n for n in gm.masks if n not in self.dense]
        counts = {n: math.ceil(fraction * int(gm.masks[n].sum())) for n in sparse}
        new, _ = REMASK.update(gm.state, gm.masks, importance, counts)
        changed = gm.set_masks(new)
        self.remaskings += 1
        ctx.note(f"prunefl: round {t} re-masked {len(changed)} layers from squared gradients")

    def phase(self, t: int) -> str:
        return "adjust" if self.asked else "train"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "remaskings": self.remaskings, "dense": self.dense}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.remaskings, self.dense = state["remaskings"], state["dense"]


def check_sq_grads(reply: Reply, gm: GlobalModel) -> Tensors | str:
    """A client's squared gradients, or why they are unusable: one finite, non-negative dense tensor
    per masked layer, shaped like it (decoding bounded by that size)."""
    blob = reply.payload(p.SQ_GRADS)
    if blob is None:
        return "no squared gradients"
    try:
        grads, _ = codec.decode(blob, max_bytes=8 * sum(m.numel() for m in gm.masks.values()) + 65536,
                                expected={n: (tuple(m.shape), codec.FLOAT_DTYPES) for n, m in gm.masks.items()})
    except ValueError as exc:
        return f"undecodable squared gradients ({exc})"
    if set(grads) != set(gm.masks):
        return f"squared gradients for {sorted(grads)[:3]}, expected the masked layers"
    for n, g in grads.items():
        if g.shape != gm.masks[n].shape or not g.is_floating_point() or not torch.isfinite(g).all() or (g < 0).any():
            return f"squared gradients of {n} must be finite, >= 0 and shaped {tuple(gm.masks[n].shape)}"
    return grads
