"""The server's queries of clients beyond training rounds: data-driven scores, BN recalibration,
candidate losses and held-out losses (FedTiny's policy search, SNIP, GraSP, FedTiny's final BN).

Huang et al., "Distributed Pruning Towards Tiny Neural Networks in Federated Learning",
ICDCS 2023, https://arxiv.org/abs/2212.01977 (adaptive BN selection). Every reply is checked
(`server.replies`) and outliers are clipped before pooling (`shared.aggregate.clip_bn_stats`,
`robust_mean_loss`, `robust_scores`), so one client cannot steer what a method selects.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, RecordDict

from server import replies
from server.context import RunState
from server.fleet import config_record
from shared import codec, protocol as p
from shared.aggregate import clip_bn_stats, robust_mean_loss, robust_scores
from shared.batchnorm import BNStats, bn_stats_layout, bn_stats_to_tensors, pool_stats
from shared.draws import Draw
from shared.global_model import GlobalModel
from shared.pruning.params import prunable_names

Tensors = dict[str, torch.Tensor]


def client_scores(ctx: RunState, model: torch.nn.Module, score: str, clients: int, batches: int) -> Tensors:
    """A data-driven score computed by `clients` sampled clients on `batches` local batches each,
    merged robustly (`shared.aggregate.robust_scores`, weighted by bounded sample counts)."""
    blob = codec.encode(model.state_dict())

    def build(node: int) -> RecordDict:
        cfg = config_record({p.SCORE: score, p.BATCHES: batches, p.SEED: ctx.client_seed(0, node)})
        return RecordDict({p.CONFIG: cfg, p.PAYLOAD: ConfigRecord({p.MODEL: blob})})

    shapes = {n: tuple(w.shape) for n, w in model.named_parameters() if n in set(prunable_names(model))}
    _, got = ctx.fleet.round(clients, p.SCORES, build, ctx.draws(Draw.SCORES, 0), lambda r: replies.check_scores(r, shapes))
    return robust_scores([r.decoded for r in got], ctx.weights(got))


def candidate_payload(state: Tensors, masks: list[Tensors]) -> ConfigRecord:
    """Every candidate for a client: the shared values once, then each mask (`codec.encode_variants`)."""
    base, selections = codec.encode_variants(state, masks)
    return ConfigRecord({p.CANDIDATE_BASE: base, p.CANDIDATE_MASKS: selections})


def pooled_bn(
    ctx: RunState, model: torch.nn.Module, masks: list[Tensors], clients: int, t: int = 0
) -> tuple[list[BNStats], dict[int, int]]:
    """ABNS steps 2-3: `clients` clients drawn for round t recalibrate the BN statistics of `model`
    under each mask on their held-out splits; the server checks, clips and pools them exactly.
    Returns the pooled statistics per mask and the held-out size of every client whose statistics
    were used (too few replies raise `NotEnoughReplies`, as in any round)."""
    payload = candidate_payload(model.state_dict(), masks)
    build = lambda node: RecordDict({p.PAYLOAD: payload})  # noqa: E731
    layout = bn_stats_layout(model)  # a BN blob decodes to this layout only (bounded before allocating)
    _, got = ctx.fleet.round(clients, p.BN, build, ctx.draws(Draw.BN, t), lambda r: replies.check_bn(r, len(masks), layout))
    weights = [r.weight for r in got]
    pooled = [pool_stats(clip_bn_stats([r.decoded[i] for r in got], weights=weights)) for i in range(len(masks))]
    return pooled, {r.node_id: r.num_examples for r in got}


def candidate_losses(ctx: RunState, pooled: list[BNStats], examples: dict[int, int]) -> list[float]:
    """ABNS step 4: the clients that recalibrated (`examples`, from `pooled_bn`) evaluate every
    candidate they hold with its pooled statistics; each candidate's robust per-example loss."""
    bn_blobs = [codec.encode(bn_stats_to_tensors(s)) for s in pooled]
    evals = ctx.fleet.accepted(
        ctx.fleet.exchange({n: RecordDict({p.PAYLOAD: ConfigRecord({p.BN_STATS: bn_blobs})}) for n in examples}, p.CANDIDATES),
        p.CANDIDATES, lambda r: replies.check_loss_sums(r, len(pooled), examples[r.node_id]),
    )
    if not evals:
        raise RuntimeError("no client evaluated the candidates (see client errors above)")
    counts, weights = [r.num_examples for r in evals], [r.weight for r in evals]
    return [robust_mean_loss([r.decoded[i] for r in evals], counts, weights) for i in range(len(pooled))]


def held_out_loss(ctx: RunState, gm: GlobalModel, nodes: list[int]) -> float:
    """Sample-weighted loss of `gm` (its own BN statistics) on the held-out splits of `nodes`."""
    sent = ctx.fleet.exchange({n: RecordDict({p.PAYLOAD: ConfigRecord({p.MODEL: gm.payload_for(n)})}) for n in nodes}, p.EVALUATE)
    got = ctx.fleet.accepted(sent, p.EVALUATE, replies.check_evaluate)
    if not got:
        return math.nan
    return robust_mean_loss([r.decoded[0] for r in got], [1] * len(got), [r.weight for r in got])
