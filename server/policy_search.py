"""FedTiny phase 1: pruning policy search with adaptive batch-norm selection (ABNS).

Huang et al., "Distributed Pruning Towards Tiny Neural Networks in Federated Learning",
ICDCS 2023, https://arxiv.org/abs/2212.01977. The server builds a pool of coarse-pruned
candidates (allocation x score), sampled clients recalibrate each candidate's BN
statistics on their held-out data, the server pools them exactly (within- plus
between-client variance), clients evaluate every candidate with the pooled statistics,
and the candidate with the lowest sample-weighted loss wins. Replies are checked
(`server.replies`) and outliers clipped before pooling (`server.aggregate.clip_bn_stats`,
`robust_mean_loss`), so one client cannot steer the selection. Clients keep the candidates
between the two steps, so each candidate travels once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, RecordDict

from server import loop, replies
from server.aggregate import clip_bn_stats, robust_mean_loss, robust_scores
from server.context import Draw, RunContext
from server.global_model import GlobalModel
from server.fleet import config_record
from shared import codec, protocol as p
from shared.batchnorm import BNStats, bn_stats_layout, bn_stats_to_tensors, load_stats, pool_stats
from shared.pruning import compute_masks, masks_from_scores
from shared.pruning.params import prunable_names
from shared.pruning.scores import needs_data

Tensors = dict[str, torch.Tensor]


@dataclass
class Candidate:
    name: str  # "<allocation>+<score>"
    masks: Tensors
    loss: float | None = None  # the selection's score: ABNS loss, or the last successive-halving stage's
    abns_loss: float | None = None  # with successive halving: the ABNS loss it started from
    stages: list[float] = field(default_factory=list)  # successive halving: held-out loss after each stage


def client_scores(ctx: RunContext, model: torch.nn.Module, score: str, clients: int, batches: int) -> Tensors:
    """A data-driven score computed by `clients` sampled clients on `batches` local batches each,
    averaged by sample count."""
    blob = codec.encode(model.state_dict())

    def build(node: int) -> RecordDict:
        cfg = config_record({p.SCORE: score, p.BATCHES: batches, p.SEED: ctx.client_seed(0, node)})
        return RecordDict({p.CONFIG: cfg, p.PAYLOAD: ConfigRecord({p.MODEL: blob})})

    shapes = {n: tuple(w.shape) for n, w in model.named_parameters() if n in set(prunable_names(model))}
    _, got = ctx.fleet.round(clients, p.SCORES, build, ctx.draws(Draw.SCORES, 0), lambda r: replies.check_scores(r, shapes))
    return robust_scores([r.decoded for r in got], ctx.weights(got))


def build_candidates(ctx: RunContext, model: torch.nn.Module) -> list[Candidate]:
    """One candidate per (allocation, score) pair; identical masks are kept once."""
    c = ctx.config
    dense = ctx.dense_layers(model)
    out: list[Candidate] = []
    for score in c.fedtiny.scores:
        data = needs_data(score, c.trusted)
        averaged = client_scores(ctx, model, score, c.fedtiny.search_clients, c.fedtiny.score_batches) if data else None
        for i, allocation in enumerate(c.fedtiny.allocations):
            if averaged is not None:
                masks = masks_from_scores(averaged, c.pruning.density, allocation, c.seed + i, dense, c.trusted)
            else:
                masks = compute_masks(model, c.pruning.density, score, allocation, seed=c.seed + i, keep_dense=dense,
                                      trusted=c.trusted)
            if not any(all(torch.equal(m, other.masks[n]) for n, m in masks.items()) for other in out):
                out.append(Candidate(f"{allocation}+{score}", masks))
    return out


def candidate_payload(state: Tensors, masks: list[Tensors]) -> ConfigRecord:
    """Every candidate for a client: the shared values once, then each mask (`codec.encode_variants`)."""
    base, selections = codec.encode_variants(state, masks)
    return ConfigRecord({p.CANDIDATE_BASE: base, p.CANDIDATE_MASKS: selections})


def pooled_bn(
    ctx: RunContext, model: torch.nn.Module, masks: list[Tensors], clients: int, t: int = 0
) -> tuple[list[BNStats], dict[int, int]]:
    """ABNS steps 2-3: `clients` clients drawn for round t recalibrate the BN statistics of `model`
    under each mask on their held-out splits; the server checks, clips and pools them exactly.
    Returns the pooled statistics per mask and the held-out size of every client whose statistics
    were used (too few replies raise `NotEnoughReplies`, as in any round)."""
    payload = candidate_payload(model.state_dict(), masks)
    build = lambda node: RecordDict({p.PAYLOAD: payload})  # noqa: E731
    layout = bn_stats_layout(model)  # a BN blob decodes to this layout only (bounded before allocating)
    _, got = ctx.fleet.round(clients, p.BN, build, ctx.draws(Draw.BN, t), lambda r: replies.check_bn(r, len(masks), layout))
    pooled = [pool_stats(clip_bn_stats([r.decoded[i] for r in got])) for i in range(len(masks))]
    return pooled, {r.node_id: r.num_examples for r in got}


def select(ctx: RunContext, model: torch.nn.Module, candidates: list[Candidate]) -> list[BNStats]:
    """ABNS: recalibrate BN per candidate on clients, pool exactly, evaluate; sets every candidate's
    `loss` (sample-weighted held-out loss) and returns the pooled statistics of each."""
    pooled, examples = pooled_bn(ctx, model, [c.masks for c in candidates], ctx.config.fedtiny.search_clients)
    bn_blobs = [codec.encode(bn_stats_to_tensors(s)) for s in pooled]
    evals = ctx.fleet.accepted(
        ctx.fleet.exchange({n: RecordDict({p.PAYLOAD: ConfigRecord({p.BN_STATS: bn_blobs})}) for n in examples}, p.CANDIDATES),
        p.CANDIDATES, lambda r: replies.check_loss_sums(r, len(candidates), examples[r.node_id]),
    )
    if not evals:
        raise RuntimeError("no client evaluated the candidates (see client errors above)")
    counts = [r.num_examples for r in evals]
    for i, cand in enumerate(candidates):
        cand.loss = robust_mean_loss([r.decoded[i] for r in evals], counts)
    return pooled


def halving_order(losses: list[float], keep: float = 0.5) -> list[int]:
    """Successive halving's survivors: the indices of the ceil(keep x n) lowest losses, best first
    (ties: the earlier candidate). A NaN loss ranks last."""
    order = sorted(range(len(losses)), key=lambda i: (math.isnan(losses[i]), losses[i], i))
    return order[: max(1, math.ceil(keep * len(losses)))]


def held_out_loss(ctx: RunContext, gm: GlobalModel, nodes: list[int]) -> float:
    """Sample-weighted loss of `gm` (its own BN statistics) on the held-out splits of `nodes`."""
    sent = ctx.fleet.exchange({n: RecordDict({p.PAYLOAD: ConfigRecord({p.MODEL: gm.payload_for(n)})}) for n in nodes}, p.EVALUATE)
    got = ctx.fleet.accepted(sent, p.EVALUATE, replies.check_evaluate)
    if not got:
        return math.nan
    return robust_mean_loss([r.decoded[0] * r.num_examples for r in got], [r.num_examples for r in got])


def halving(ctx: RunContext, method, model: torch.nn.Module, candidates: list[Candidate]) -> Candidate:
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
    c, dense = ctx.config, (ctx.dense_bytes_up, ctx.dense_bytes_down)
    models = {cand.name: GlobalModel(model.state_dict(), cand.masks) for cand in candidates}
    eval_nodes = ctx.fleet.sample(c.fedtiny.search_clients, ctx.draws(Draw.SEARCH_PANEL))
    alive, start, rounds = list(candidates), 0, c.fedtiny.search_rounds
    try:
        while len(alive) > 1:
            for cand in alive:
                models[cand.name].node_version.clear()  # nodes hold whichever candidate's masks came last
                for t in range(start + 1, start + rounds + 1):
                    loop.training_round(ctx, method, models[cand.name], t, {}, Draw.HALVING)
                models[cand.name].node_version.clear()
                cand.loss = held_out_loss(ctx, models[cand.name], eval_nodes)
                cand.stages.append(cand.loss)
            alive = [alive[i] for i in halving_order([cand.loss for cand in alive])]
            start, rounds = start + rounds, rounds * c.fedtiny.search_growth
    finally:
        ctx.dense_bytes_up, ctx.dense_bytes_down = dense
    return alive[0]


def search(ctx: RunContext, model: torch.nn.Module, method=None) -> tuple[Candidate, list[Candidate]]:
    """Run the policy search; `model` ends with the winner's masks applied and pooled BN statistics.

    With ABNS the lowest pooled loss wins; with `fedtiny.search_rounds` > 0 the candidates, in ABNS
    order, then go through successive halving (`halving`, training through `method`'s hooks).
    """
    candidates = build_candidates(ctx, model)
    best = candidates[0]
    if ctx.config.fedtiny.abns and len(candidates) > 1:
        pooled = dict(zip([cand.name for cand in candidates], select(ctx, model, candidates)))
        ranked = [candidates[i] for i in halving_order([cand.loss for cand in candidates], keep=1.0)]
        best = ranked[0]
        if ctx.config.fedtiny.search_rounds > 0:
            for cand in candidates:
                cand.abns_loss = cand.loss
            best = halving(ctx, method, model, ranked)
        load_stats(model, pooled[best.name])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, mask in best.masks.items():
            params[name].mul_(mask)
    return best, candidates
