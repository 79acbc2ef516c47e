"""FedTiny: adaptive BN selection, then progressive layer-wise prune/grow under a memory budget.

Huang et al., "Distributed Pruning Towards Tiny Neural Networks in Federated Learning",
ICDCS 2023, https://arxiv.org/abs/2212.01977.

Every `fedtiny.adjust_interval` rounds until T_end = `fedtiny.end_fraction` x rounds,
one block of layers (output side first, cycling inwards) is adjusted: clients send
only the top-k_l gradients of that block's pruned positions, k_l = ceil(alpha_t x nnz_l)
with alpha_t cosine-decayed over rounds; the server merges them, drops the k_l
smallest active weights and grows the k_l largest merged gradients (new weights 0).
With `fedtiny.final_bn_clients` > 0 the final model's BN statistics are recalibrated once more
on clients and pooled exactly (ABNS's recalibration on one candidate).
Client config keys: ``adjust-names`` (list of layer names), ``adjust-k`` (list of k_l); the
client half returns the top-k gradients under payload ``topk``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from server import policy_search
from server.context import RunContext
from server.fleet import Reply
from server.global_model import GlobalModel
from server.methods.base import ClientHalf, Method, TrainJob, register
from shared import codec, protocol as p
from shared.batchnorm import load_stats, running_stat_names
from shared.config import resolve
from shared.pruning import ALLOCATIONS, SCORES
from shared.pruning.prune_grow import RIGL, clip_to_median_peak, merge_sparse
from shared.pruning.schedule import adjust_counts, block_for_adjustment, cosine_fraction, is_adjust_round
from shared.training import TrainResult


@dataclass
class FedTinySettings:
    FLEET_BOUND = ("search_clients", "final_bn_clients")  # at most fl.num_clients unless set (shared.config)
    abns: bool = True  # adaptive batch-norm selection among candidates (False: first candidate)
    progressive: bool = True  # progressive layer-wise prune/grow after selection
    allocations: list[str] = field(default_factory=lambda: ["uniform-noise", "global", "erk", "lamp"])
    scores: list[str] = field(default_factory=lambda: ["magnitude", "synflow"])
    search_clients: int = 10  # clients sampled for BN recalibration and candidate evaluation
    score_batches: int = 2  # local batches for client-computed scores (SNIP)
    adjust_interval: int = 5  # dT: rounds between block adjustments
    alpha: float = 0.2  # initial prune/grow fraction (cosine-decayed)
    end_fraction: float = 0.6  # T_end = end_fraction * rounds
    # Successive halving after ABNS: rounds of masked FedAvg per surviving candidate in the first
    # stage (0: ABNS alone picks); each later stage trains `search_growth` times as many (2: every
    # stage costs the same, as in Jamieson & Talwalkar). The winner restarts from the starting weights.
    search_rounds: int = 0
    search_growth: int = 1
    # Adaptive BN once more after the last round: this many sampled clients recalibrate the final
    # model's BN statistics on their held-out splits and the server installs the exact pool
    # (0: keep the FedAvg average of the clients' running statistics).
    final_bn_clients: int = 0

    def validate(self, c, check) -> None:
        check(len(self.allocations) > 0, "fedtiny.allocations", "must name at least one allocation")
        check(len(self.scores) > 0, "fedtiny.scores", "must name at least one score")
        check(1 <= self.search_clients <= c.fl.num_clients, "fedtiny.search_clients", "must be in [1, fl.num_clients]")
        check(self.score_batches >= 1, "fedtiny.score_batches", "must be >= 1")
        check(self.adjust_interval >= 1, "fedtiny.adjust_interval", "must be >= 1")
        check(0.0 <= self.alpha <= 1.0, "fedtiny.alpha", "must be in [0, 1]")
        check(0.0 <= self.end_fraction <= 1.0, "fedtiny.end_fraction", "must be in [0, 1]")
        check(self.search_rounds >= 0, "fedtiny.search_rounds", "must be >= 0 (0: ABNS alone)")
        check(self.search_growth >= 1, "fedtiny.search_growth", "must be >= 1 (1: the same rounds every stage)")
        check(0 <= self.final_bn_clients <= c.fl.num_clients, "fedtiny.final_bn_clients", "must be in [0, fl.num_clients]")
        for name in self.allocations:
            resolve(ALLOCATIONS, name, "fedtiny.allocations", c)
        for name in self.scores:
            resolve(SCORES, name, "fedtiny.scores", c)


class FedTinyClient(ClientHalf):
    """Top-k gradients of the adjusted block's pruned positions, summed over the last local epoch."""

    def grad_layers(self, job: TrainJob) -> dict[str, int] | None:
        names = list(job.config.get(p.ADJUST_NAMES, []))
        return dict(zip(names, (int(k) for k in job.config.get(p.ADJUST_K, [])), strict=True)) or None

    def after_training(self, job: TrainJob, result: TrainResult) -> dict[str, bytes]:
        if not result.topk:
            return {}
        params = dict(job.model.named_parameters())
        parts = {n: (idx, val, tuple(params[n].shape)) for n, (idx, val) in result.topk.items()}
        return {p.TOPK: codec.encode_sparse(parts)}


@register("fedtiny")
class FedTiny(Method):
    Settings = FedTinySettings
    client = FedTinyClient()

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.adjustments = 0
        self.pending: dict[str, int] = {}
        self.t_end = math.floor(self.settings.end_fraction * ctx.config.fl.rounds)

    def prepare(self, ctx: RunContext) -> GlobalModel:
        model = self.initial_model(ctx)
        if ctx.config.pruning.density >= 1.0:
            return GlobalModel(model.state_dict())
        best, candidates = policy_search.search(ctx, model, self)
        self.summary["candidates"] = [
            {"name": c.name, "loss": c.loss, **({"abns_loss": c.abns_loss, "stages": c.stages} if c.stages else {})}
            for c in candidates
        ]
        self.summary["selected"] = best.name
        ctx.recorder.note(f"policy search selected {best.name} among {len(candidates)} candidates")
        self.blocks = ctx.blocks(model)
        return GlobalModel(model.state_dict(), best.masks)

    def round_config(self, ctx: RunContext, gm: GlobalModel, t: int) -> dict:
        self.pending = {}
        c = self.settings
        if not (c.progressive and gm.masks and is_adjust_round(t, c.adjust_interval, self.t_end)):
            return {}
        block = block_for_adjustment(self.blocks, self.adjustments)
        counts = adjust_counts(gm.masks, block, cosine_fraction(c.alpha, t, self.t_end))
        self.pending = {n: k for n, k in counts.items() if k > 0}
        if not self.pending:
            return {}
        return {p.ADJUST_NAMES: list(self.pending), p.ADJUST_K: list(self.pending.values())}

    def after_round(self, ctx: RunContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        if self.pending:
            self.adjust(ctx, gm, replies)
        if t == ctx.config.fl.rounds and self.settings.final_bn_clients and gm.masks:
            self.final_bn(ctx, gm)

    def adjust(self, ctx: RunContext, gm: GlobalModel, replies: list[Reply]) -> None:
        """Merge the clients' top-k gradients of the adjusted block; prune and grow k_l weights per layer."""
        parts: dict[str, list] = {n: [] for n in self.pending}
        senders = 0
        for r in replies:
            sparse, reason = check_topk(r, gm, self.pending)
            if reason:
                ctx.fleet.reject(r.node_id, p.TRAIN, reason)
                continue
            senders += 1
            for name, (idx, val, _) in sparse.items():
                parts[name].append((idx, val))
        if senders == 0:
            return
        grads = {n: merge_sparse(clip_to_median_peak(parts[n]), gm.state[n].shape, senders) for n in self.pending}
        weights = {n: gm.state[n] for n in self.pending}
        masks, new_weights = RIGL.update(weights, {n: gm.masks[n] for n in self.pending}, grads, self.pending)
        gm.state.update(new_weights)
        gm.set_masks({**gm.masks, **masks})
        self.adjustments += 1

    def final_bn(self, ctx: RunContext, gm: GlobalModel) -> None:
        """Install the exact pooled BN statistics of the final model (ABNS steps 2-3 on one candidate).

        Each client's running statistics are an average over an epoch in which its weights moved,
        and their FedAvg mean lacks the between-client variance of non-IID data. The central
        accuracy before the recalibration is kept in the summary (`final_bn.accuracy_before`).
        """
        before = ctx.evaluate_central(gm.state)
        model = ctx.new_model()
        model.load_state_dict(gm.state)
        pooled, examples = policy_search.pooled_bn(ctx, model, [gm.masks], self.settings.final_bn_clients, ctx.config.fl.rounds)
        load_stats(model, pooled[0])
        running = set(running_stat_names(gm.state))
        gm.state.update({n: v for n, v in model.state_dict().items() if n in running})
        self.summary["final_bn"] = {"clients": len(examples), "accuracy_before": before.accuracy, "loss_before": before.loss}

    def phase(self, t: int) -> str:
        return "adjust" if self.pending else "train"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "adjustments": self.adjustments, "blocks": getattr(self, "blocks", [])}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.adjustments = state["adjustments"]
        self.blocks = state["blocks"]



def check_topk(reply: Reply, gm: GlobalModel, pending: dict[str, int]) -> tuple[dict, str | None]:
    """A client's top-k gradients, or the reason they are rejected (not merged)."""
    if p.TOPK not in reply.content.get(p.PAYLOAD, {}):
        return {}, "no top-k gradients for the adjusted block"
    try:
        sparse = codec.decode_sparse(reply.content[p.PAYLOAD][p.TOPK], max_bytes=16 * sum(pending.values()) + 65536,
                                     expected={n: tuple(gm.masks[n].shape) for n in pending})
    except ValueError as exc:
        return {}, f"undecodable top-k gradients ({exc})"
    if set(sparse) != set(pending):
        return {}, f"top-k layers {sorted(sparse)} are not the adjusted block {sorted(pending)}"
    for name, (idx, val, shape) in sparse.items():
        if tuple(shape) != tuple(gm.masks[name].shape):
            return {}, f"top-k shape of {name} is {tuple(shape)}, expected {tuple(gm.masks[name].shape)}"
        if len(idx) > pending[name]:
            return {}, f"{len(idx)} top-k entries for {name}, more than k={pending[name]}"
        if gm.masks[name].flatten()[idx].any():
            return {}, f"top-k indices of {name} include active positions"
        if not torch.isfinite(val).all():
            return {}, f"non-finite top-k values in {name}"
    return sparse, None
