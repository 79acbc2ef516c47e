"""The federated training loop every method shares: start or resume, train each round
(`server.rounds`: sample, send, check, aggregate), evaluate, record, checkpoint.

A method (`shared.methods`) decides the starting masks and what happens around each
round (FedTiny's progressive prune/grow, PruneFL's re-masking, ...).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from server import checkpoint
from server.recorder import RoundRecord
from server.replies import check_evaluate
from server.services import RunContext
from shared import protocol as p
from shared.aggregate import normalised
from shared.draws import Draw
from shared.global_model import GlobalModel
from shared.methods import Method, Reply
from shared.pruning import layer_densities


def run_training(ctx: RunContext, method: Method) -> GlobalModel:
    """Prepare (or resume from the last checkpoint), then train; a checkpoint after every round."""
    if ctx.config.resume and checkpoint.exists(ctx.output_dir):
        gm, done = checkpoint.restore(ctx, method)
    else:
        start = time.monotonic()
        gm = method.start(ctx)
        record_round(ctx, gm, 0, "search" if ctx.fleet.traffic.down else "init", len(ctx.fleet.traffic.clients), start)
        checkpoint.save(ctx, gm, method, 0)
        done = 0
    for t in range(done + 1, (ctx.config.fl.rounds if method.federated else 0) + 1):
        start = time.monotonic()
        replies = ctx.training_round(method, gm, t, method.round_config(ctx, gm, t))
        method.after_round(ctx, gm, t, replies)
        record_round(ctx, gm, t, method.phase(t), len(replies), start, train_loss(replies))
        checkpoint.save(ctx, gm, method, t)
    return gm


def evaluated(t: int, rounds: int, every: int) -> bool:
    """Rounds with a central test evaluation (`fl.eval_every`): 0, every `every`-th, and the last."""
    return t % every == 0 or t == rounds


def train_loss(replies: list[Reply]) -> float | None:
    """The clients' mean local training loss, weighted by their bounded counts (None: no finite loss reported)."""
    pairs = []
    for r in replies:
        try:
            pairs.append((float(r.content[p.METRICS][p.LOSS]), r.weight))
        except (KeyError, TypeError, ValueError):  # a metric is only a metric: never fail the round over it
            continue
    pairs = [(loss, n) for loss, n in pairs if np.isfinite(loss) and n > 0]
    total = sum(n for _, n in pairs)
    return sum(loss * n for loss, n in pairs) / total if total else None


def record_round(
    ctx: RunContext, gm: GlobalModel, t: int, phase: str, clients: int, start: float, train_loss: float | None = None
) -> None:
    f = ctx.config.fl
    result = ctx.evaluate_central(gm.state) if evaluated(t, f.rounds, f.eval_every) else None
    traffic = ctx.fleet.traffic.take()
    ctx.totals(traffic)
    record = RoundRecord(
        round=t, phase=phase, density=gm.density, accuracy=result and result.accuracy, loss=result and result.loss,
        bytes_up=traffic.up, bytes_down=traffic.down, seconds=time.monotonic() - start,
        clients=clients, failures=len(traffic.failures), rejected=len(traffic.rejected),
        dense_bytes=ctx.dense_bytes_up + ctx.dense_bytes_down - sum(r.dense_bytes for r in ctx.recorder.rounds), train_loss=train_loss,
    )
    ctx.recorder.add(record)
    if ctx.tracker:
        ctx.tracker.round(record, layer_densities(gm.masks) if gm.masks else {})


def federated_evaluation(ctx: RunContext, gm: GlobalModel) -> dict[str, float]:
    """Evaluate the final model on sampled clients' held-out splits (`federated_metrics`)."""
    build = lambda n: RecordDict({p.PAYLOAD: ConfigRecord({p.MODEL: gm.payload_for(n)})})  # noqa: E731
    sampled, got = ctx.fleet.round(
        ctx.config.fl.clients_per_round, p.EVALUATE, build, ctx.draws(Draw.EVALUATE, ctx.config.fl.rounds), check_evaluate
    )
    ctx.dense_traffic(len(sampled), 0, gm.dense_bytes())
    return federated_metrics(got)


def federated_metrics(got: list[Reply]) -> dict[str, float]:
    """Accepted evaluation replies' (loss, accuracy), weighted by their bounded counts (`Reply.weight`:
    a node claiming 10^9 examples weighs no more than the fleet allows it)."""
    w = normalised([r.weight for r in got])
    return {
        "federated_accuracy": sum(r.decoded[1] * x for r, x in zip(got, w)),
        "federated_loss": sum(r.decoded[0] * x for r, x in zip(got, w)),
        "federated_clients": len(got),
    }
