"""FedTiny phase 1: pruning policy search with adaptive batch-norm selection (ABNS).

Huang et al., "Distributed Pruning Towards Tiny Neural Networks in Federated Learning",
ICDCS 2023, https://arxiv.org/abs/2212.01977. The server builds a pool of coarse-pruned
candidates (allocation x score), sampled clients recalibrate each candidate's BN
statistics on their held-out data, the server pools them exactly (within- plus
between-client variance), clients evaluate every candidate with the pooled statistics,
and the candidate with the lowest sample-weighted loss wins. Clients keep the candidates
between the two steps, so each candidate travels once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, RecordDict

from server.context import RunContext
from server.fleet import config_record
from shared import codec, protocol as p
from shared.batchnorm import BNStats, bn_stats_from_tensors, bn_stats_to_tensors, load_stats, pool_stats
from shared.pruning import average_scores, compute_masks, masks_from_scores
from shared.pruning.scores import needs_data

Tensors = dict[str, torch.Tensor]


@dataclass
class Candidate:
    name: str  # "<allocation>+<score>"
    masks: Tensors
    loss: float | None = None


def client_scores(ctx: RunContext, model: torch.nn.Module, score: str, clients: int, batches: int) -> Tensors:
    """A data-driven score computed by `clients` sampled clients on `batches` local batches each,
    averaged by sample count."""
    blob = codec.encode(model.state_dict())

    def build(node: int) -> RecordDict:
        cfg = config_record({p.SCORE: score, p.BATCHES: batches, p.SEED: ctx.client_seed(0, node)})
        return RecordDict({p.CONFIG: cfg, p.PAYLOAD: ConfigRecord({p.MODEL: blob})})

    _, replies = ctx.fleet.round(clients, p.SCORES, build, ctx.rng)
    scores = [codec.decode(r.content[p.PAYLOAD][p.SCORE_TENSORS])[0] for r in replies]
    return average_scores(scores, [r.num_examples for r in replies])


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


def candidate_payload(state: Tensors, candidates: list[Candidate]) -> ConfigRecord:
    """Every candidate for a client: the shared values once, then each mask (`codec.encode_variants`)."""
    base, selections = codec.encode_variants(state, [c.masks for c in candidates])
    return ConfigRecord({p.CANDIDATE_BASE: base, p.CANDIDATE_MASKS: selections})


def select(ctx: RunContext, model: torch.nn.Module, candidates: list[Candidate]) -> tuple[Candidate, BNStats]:
    """Recalibrate BN per candidate on clients, pool exactly, evaluate, pick the lowest loss."""
    payload = candidate_payload(model.state_dict(), candidates)
    build = lambda node: RecordDict({p.PAYLOAD: payload})  # noqa: E731
    _, replies = ctx.fleet.round(ctx.config.fedtiny.search_clients, p.BN, build, ctx.rng)
    per_client = [[bn_stats_from_tensors(codec.decode(b)[0]) for b in r.content[p.PAYLOAD][p.BN_STATS]] for r in replies]
    pooled = [pool_stats([stats[i] for stats in per_client]) for i in range(len(candidates))]
    bn_blobs = [codec.encode(bn_stats_to_tensors(s)) for s in pooled]
    evals = ctx.fleet.exchange(
        {r.node_id: RecordDict({p.PAYLOAD: ConfigRecord({p.BN_STATS: bn_blobs})}) for r in replies},
        p.CANDIDATES,
    )
    if not evals:
        raise RuntimeError("no client evaluated the candidates (see client errors above)")
    count = sum(r.num_examples for r in evals)
    for i, cand in enumerate(candidates):
        cand.loss = sum(float(r.content[p.METRICS][p.LOSS_SUMS][i]) for r in evals) / count
    best = min(range(len(candidates)), key=lambda i: (candidates[i].loss, i))
    return candidates[best], pooled[best]


def search(ctx: RunContext, model: torch.nn.Module) -> tuple[Candidate, list[Candidate]]:
    """Run the policy search; `model` ends with the winner's masks applied and pooled BN statistics."""
    candidates = build_candidates(ctx, model)
    if ctx.config.fedtiny.abns and len(candidates) > 1:
        best, stats = select(ctx, model, candidates)
        load_stats(model, stats)
    else:
        best = candidates[0]
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, mask in best.masks.items():
            params[name].mul_(mask)
    return best, candidates
