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
client half returns the top-k gradients under payload ``topk``, checked before the round's
aggregation (`check_reply`, `check_topk`).

Phase 1, the pruning policy search (`search`): the server builds a pool of coarse-pruned
candidates (allocation x score), sampled clients recalibrate each candidate's BN statistics on
their held-out data, the server pools them exactly (within- plus between-client variance), clients
evaluate every candidate with the pooled statistics, and the candidate with the lowest
sample-weighted loss wins (adaptive BN selection, ABNS); optionally successive halving follows.
The exchanges are services of the server's context (`MethodContext.pooled_bn`, `candidate_losses`,
`client_scores`), which check every reply and clip outliers before pooling, so one client cannot
steer the selection. Clients keep the candidates between the two steps, so each candidate travels once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from shared import protocol as p
from shared.batchnorm import load_stats, running_stat_names
from shared.config_checks import resolve
from shared.draws import Draw
from shared.global_model import GlobalModel
from shared.methods.api import Method, MethodContext, Reply
from shared.methods.registry import register
from shared.methods.topk_gradients import TopkGradientClient, accept_topk
from shared.pruning import ALLOCATIONS, SCORES, compute_masks, masks_from_scores
from shared.pruning.scores import needs_data
from shared.pruning.prune_grow import grow_from_client_topk
from shared.pruning.schedule import adjust_counts, block_for_adjustment, cosine_fraction, is_adjust_round

Tensors = dict[str, torch.Tensor]


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


@dataclass
class Candidate:
    name: str  # "<allocation>+<score>"
    masks: Tensors
    loss: float | None = None  # the selection's score: ABNS loss, or the last successive-halving stage's
    abns_loss: float | None = None  # with successive halving: the ABNS loss it started from
    stages: list[float] = field(default_factory=list)  # successive halving: held-out loss after each stage


def build_candidates(ctx: MethodContext, model: torch.nn.Module, s: FedTinySettings) -> list[Candidate]:
    """One candidate per (allocation, score) pair; identical masks are kept once."""
    c = ctx.config
    dense = ctx.dense_layers(model)
    out: list[Candidate] = []
    for score in s.scores:
        data = needs_data(score, c.trusted)
        averaged = ctx.client_scores(model, score, s.search_clients, s.score_batches) if data else None
        for i, allocation in enumerate(s.allocations):
            if averaged is not None:
                masks = masks_from_scores(averaged, c.pruning.density, allocation, c.seed + i, dense, c.trusted)
            else:
                masks = compute_masks(model, c.pruning.density, score, allocation, seed=c.seed + i, keep_dense=dense,
                                      trusted=c.trusted)
            if not any(all(torch.equal(m, other.masks[n]) for n, m in masks.items()) for other in out):
                out.append(Candidate(f"{allocation}+{score}", masks))
    return out


def select(ctx: MethodContext, model: torch.nn.Module, candidates: list[Candidate], s: FedTinySettings) -> list:
    """ABNS: recalibrate BN per candidate on clients, pool exactly, evaluate; sets every candidate's
    `loss` (sample-weighted held-out loss) and returns the pooled statistics of each."""
    pooled, examples = ctx.pooled_bn(model, [c.masks for c in candidates], s.search_clients)
    for cand, loss in zip(candidates, ctx.candidate_losses(pooled, examples), strict=True):
        cand.loss = loss
    return pooled


def halving_order(losses: list[float], keep: float = 0.5) -> list[int]:
    """Successive halving's survivors: the indices of the ceil(keep x n) lowest losses, best first
    (ties: the earlier candidate). A NaN loss ranks last."""
    order = sorted(range(len(losses)), key=lambda i: (math.isnan(losses[i]), losses[i], i))
    return order[: max(1, math.ceil(keep * len(losses)))]


def halving(ctx: MethodContext, method: Method, model: torch.nn.Module, candidates: list[Candidate],
            s: FedTinySettings) -> Candidate:
    """Successive halving over federated rounds (Jamieson & Talwalkar, arXiv 1502.07943): every
    surviving candidate trains more rounds of masked FedAvg (`fedtiny.search_rounds` in the first
    stage, `fedtiny.search_growth` times the previous stage's after), then the half with the lowest
    held-out loss goes on, until one is left. With growth 2 every stage costs the same and the
    finalists are compared over the longest horizon, as in the paper's algorithm.

    At extreme density every candidate sits at chance loss right after coarse pruning, so ABNS
    alone selects by noise; a few rounds of training separate them. Within a stage every candidate
    trains on the same sampled clients (paired comparison) and is scored on the same held-out
    clients. The winner restarts from the starting weights, so the run's own rounds are the same
    as every method's; the search's bytes and seconds count in round 0, but not in the dense
    reference (dense FedAvg runs no search).
    """
    models = {cand.name: GlobalModel(model.state_dict(), cand.masks) for cand in candidates}
    eval_nodes = ctx.sample_clients(s.search_clients, Draw.SEARCH_PANEL)
    alive, start, rounds = list(candidates), 0, s.search_rounds
    while len(alive) > 1:
        for cand in alive:
            models[cand.name].node_version.clear()  # nodes hold whichever candidate's masks came last
            for t in range(start + 1, start + rounds + 1):
                ctx.training_round(method, models[cand.name], t, {}, Draw.HALVING, reference=False)
            models[cand.name].node_version.clear()
            cand.loss = ctx.held_out_loss(models[cand.name], eval_nodes)
            cand.stages.append(cand.loss)
        alive = [alive[i] for i in halving_order([cand.loss for cand in alive])]
        start, rounds = start + rounds, rounds * s.search_growth
    return alive[0]


def search(ctx: MethodContext, model: torch.nn.Module, s: FedTinySettings,
           method: Method | None = None) -> tuple[Candidate, list[Candidate]]:
    """Run the policy search; `model` ends with the winner's masks applied and pooled BN statistics.

    With ABNS (`s.abns`) the lowest pooled loss wins; with `s.search_rounds` > 0 the candidates, in
    ABNS order, then go through successive halving (`halving`, training through `method`'s hooks).
    """
    candidates = build_candidates(ctx, model, s)
    best = candidates[0]
    if s.abns and len(candidates) > 1:
        pooled = dict(zip([cand.name for cand in candidates], select(ctx, model, candidates, s)))
        ranked = [candidates[i] for i in halving_order([cand.loss for cand in candidates], keep=1.0)]
        best = ranked[0]
        if s.search_rounds > 0:
            for cand in candidates:
                cand.abns_loss = cand.loss
            best = halving(ctx, method, model, ranked, s)
        load_stats(model, pooled[best.name])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, mask in best.masks.items():
            params[name].mul_(mask)
    return best, candidates


@register("fedtiny")
class FedTiny(Method):
    Settings = FedTinySettings
    client = TopkGradientClient()

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.adjustments = 0
        self.pending: dict[str, int] = {}
        self.blocks: list[list[str]] = []
        self.t_end = math.floor(self.settings.end_fraction * ctx.config.fl.rounds)

    def prepare(self, ctx: MethodContext) -> GlobalModel:
        model = self.initial_model(ctx)
        best, candidates = search(ctx, model, self.settings, self)
        self.summary["candidates"] = [
            {"name": c.name, "loss": c.loss, **({"abns_loss": c.abns_loss, "stages": c.stages} if c.stages else {})}
            for c in candidates
        ]
        self.summary["selected"] = best.name
        ctx.note(f"policy search selected {best.name} among {len(candidates)} candidates")
        self.blocks = ctx.blocks(model)
        return GlobalModel(model.state_dict(), best.masks)

    def round_config(self, ctx: MethodContext, gm: GlobalModel, t: int) -> dict:
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

    def check_reply(self, ctx: MethodContext, gm: GlobalModel, reply: Reply) -> str | None:
        """In adjustment rounds, the client's top-k gradients of the adjusted block (`accept_topk`)."""
        return accept_topk(reply, gm, self.pending)

    def after_round(self, ctx: MethodContext, gm: GlobalModel, t: int, replies: list[Reply]) -> None:
        if self.pending and replies:
            self.adjust(gm, replies)
        if t == ctx.config.fl.rounds and self.settings.final_bn_clients and gm.masks:
            self.final_bn(ctx, gm)

    def adjust(self, gm: GlobalModel, replies: list[Reply]) -> None:
        """Merge the clients' top-k gradients of the adjusted block; prune and grow k_l weights per layer."""
        parts = {n: [r.extras[p.TOPK][n][:2] for r in replies] for n in self.pending}
        masks, new_weights = grow_from_client_topk(gm.state, gm.masks, parts, self.pending)
        gm.state.update(new_weights)
        gm.set_masks({**gm.masks, **masks})
        self.adjustments += 1

    def final_bn(self, ctx: MethodContext, gm: GlobalModel) -> None:
        """Install the exact pooled BN statistics of the final model (ABNS steps 2-3 on one candidate).

        Each client's running statistics are an average over an epoch in which its weights moved,
        and their FedAvg mean lacks the between-client variance of non-IID data. The central
        accuracy before the recalibration is kept in the summary (`final_bn.accuracy_before`).
        """
        before = ctx.evaluate_central(gm.state)
        model = ctx.new_model()
        model.load_state_dict(gm.state)
        pooled, examples = ctx.pooled_bn(model, [gm.masks], self.settings.final_bn_clients, ctx.config.fl.rounds)
        load_stats(model, pooled[0])
        running = set(running_stat_names(gm.state))
        gm.state.update({n: v for n, v in model.state_dict().items() if n in running})
        self.summary["final_bn"] = {"clients": len(examples), "accuracy_before": before.accuracy, "loss_before": before.loss}

    def phase(self, t: int) -> str:
        return "adjust" if self.pending else "train"

    def state_dict(self) -> dict:
        return {**super().state_dict(), "adjustments": self.adjustments, "blocks": self.blocks}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.adjustments = state["adjustments"]
        self.blocks = state["blocks"]
