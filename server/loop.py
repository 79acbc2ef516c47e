"""The federated training loop every method shares: sample, send, check, aggregate, evaluate, record.

A method (server.methods) decides the starting masks and what happens around each
round (FedTiny's progressive prune/grow, PruneFL's re-masking, ...).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from server import checkpoint
from server.context import Draw, RunContext
from server.aggregate import clip_update, screen_updates
from server.fleet import Reply, config_record
from server.global_model import GlobalModel
from server.recorder import RoundRecord
from server.replies import check_evaluate, error_line
from shared import codec, protocol as p
from shared.batchnorm import RUNNING_VAR
from shared.pruning import layer_densities
from shared.training import LR_SCHEDULES

if TYPE_CHECKING:
    from server.methods.base import Method


def train_message(ctx: RunContext, gm: GlobalModel, node: int, t: int, extra: dict, failing: set[int]) -> RecordDict:
    f = ctx.config.fl
    cfg = config_record({
        p.ROUND: t, p.SEED: ctx.client_seed(t, node), p.EPOCHS: f.local_epochs,
        p.LR: LR_SCHEDULES.get(f.lr_schedule)(f.lr, t, f.rounds),
        p.FAIL: ctx.config.simulation.fail_mode if node in failing else None, **extra,
    })
    return RecordDict({p.CONFIG: cfg, p.PAYLOAD: ConfigRecord({p.MODEL: gm.payload_for(node, running_stats=False)})})


def same_masks(gm: GlobalModel, masks: dict) -> str | None:
    """Why an update's masks are not the global masks (what every client trains on), or None."""
    for name, mask in gm.masks.items():
        if name not in masks:
            return f"{name} arrived dense, without the global mask (density {mask.float().mean():.4f})"
        if not torch.equal(masks[name], mask):
            return f"mask of {name} differs from the global mask (density {masks[name].float().mean():.4f}, expected {mask.float().mean():.4f})"
    return None


def check_update(gm: GlobalModel, reply: Reply, max_norm: float = 0.0,
                 masks_rule: Callable[[GlobalModel, dict], str | None] = same_masks) -> tuple[dict | None, str | None]:
    """A client's update decoded against the global masks and the weights it was delta-coded
    against (the round's download), or the reason to reject it: (update, None) or (None, reason).

    Rejected: undecodable or oversized payloads, other layer names or shapes, NaN/Inf, negative
    BN running variances, masks that break `masks_rule` (by default a mask other than the global one:
    values at pruned positions, wrong density; a method whose clients prune on their own gives its rule,
    `Method.check_update_masks`); the example count is checked before, in `Fleet.accepted`. With
    `max_norm` > 0 the update's distance from the global model is clipped to that norm (bounding the
    influence of outliers). Pure: nothing is written.
    """
    try:
        blob = reply.content[p.PAYLOAD][p.UPDATE]
        expected = codec.expect(gm.state, {n: gm.upload_dtypes(n) for n in gm.state})  # checked before allocating
        tensors, masks = codec.decode(blob, masks=gm.masks, max_bytes=gm.max_update_bytes(), base=gm.state, expected=expected)
    except (KeyError, ValueError, TypeError) as exc:
        return None, f"undecodable update ({error_line(exc)})"
    if set(tensors) != set(gm.state):
        return None, f"layer names differ from the global model: {sorted(set(tensors) ^ set(gm.state))[:3]}"
    for name, value in tensors.items():
        if value.shape != gm.state[name].shape or value.dtype not in gm.upload_dtypes(name):
            return None, f"{name} is {value.dtype} {tuple(value.shape)}, expected {gm.state[name].dtype} {tuple(gm.state[name].shape)}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return None, f"non-finite values in {name}"
        if name.endswith(RUNNING_VAR) and bool((value < 0).any()):
            return None, f"negative BN variance in {name}"
    tensors = {n: v.to(gm.state[n].dtype) for n, v in tensors.items()}
    reason = masks_rule(gm, masks)
    if reason:
        return None, reason
    return (clip_update(gm.state, tensors, max_norm) if max_norm > 0 else tensors), None


def failing_nodes(ctx: RunContext, t: int, candidates: list[int]) -> set[int]:
    """Fault drill: the clients told to fail this round (simulation.fail_fraction).

    Drawn in partition order, so the same seed fails the same partitions whatever ids nodes got.
    """
    frac = ctx.config.simulation.fail_fraction
    if frac <= 0:
        return set()
    rng = ctx.draws(Draw.FAULTS, t)
    return {n for n in candidates if rng.random() < frac}


def training_round(ctx: RunContext, method: Method, gm: GlobalModel, t: int, extra: dict,
                   stream: Draw = Draw.TRAIN) -> list[Reply]:
    """One round of masked training with the method's `extra` config, on the clients `stream` draws
    for round t; the global state is replaced by the method's aggregate."""
    k = ctx.config.fl.clients_per_round
    failing = failing_nodes(ctx, t, ctx.fleet.nodes)
    sampled, replies = ctx.fleet.round(
        k, p.TRAIN, lambda n: train_message(ctx, gm, n, t, extra, failing), ctx.draws(stream, t),
        lambda r: check_update(gm, r, ctx.config.fl.max_update_norm, method.check_update_masks),
    )
    for node in sampled:
        gm.forget(node)
    for r in replies:
        gm.delivered(r.node_id)
    f = ctx.config.fl
    screened, reasons = screen_updates(gm.state, [r.decoded for r in replies], f.clip_multiple, f.reject_multiple)
    for r, update, reason in zip(replies, screened, reasons):
        r.decoded = update
        reason = reason or (update is not None and method.check_reply(ctx, gm, r))
        if reason:
            ctx.fleet.reject(r.node_id, p.TRAIN, reason)
            r.decoded = None
    replies = [r for r in replies if r.decoded is not None]
    gm.state = method.aggregate(ctx, gm, replies)
    ctx.dense_traffic(len(sampled), len(replies), gm.dense_bytes())
    return replies


def run_training(ctx: RunContext, method: Method) -> GlobalModel:
    """Prepare (or resume from the last checkpoint), then train; a checkpoint after every round."""
    if ctx.config.resume and checkpoint.exists(ctx.output_dir):
        gm, done = checkpoint.restore(ctx, method)
    else:
        start = time.monotonic()
        gm = method.prepare(ctx)
        record_round(ctx, gm, 0, "search" if ctx.fleet.traffic.down else "init", len(ctx.fleet.traffic.clients), start)
        checkpoint.save(ctx, gm, method, 0)
        done = 0
    for t in range(done + 1, (ctx.config.fl.rounds if method.federated else 0) + 1):
        start = time.monotonic()
        replies = training_round(ctx, method, gm, t, method.round_config(ctx, gm, t))
        method.after_round(ctx, gm, t, replies)
        record_round(ctx, gm, t, method.phase(t), len(replies), start, train_loss(replies))
        checkpoint.save(ctx, gm, method, t)
    return gm


def evaluated(t: int, rounds: int, every: int) -> bool:
    """Rounds with a central test evaluation (`fl.eval_every`): 0, every `every`-th, and the last."""
    return t % every == 0 or t == rounds


def train_loss(replies: list[Reply]) -> float | None:
    """The clients' mean local training loss, weighted by their examples (None: no finite loss reported)."""
    pairs = []
    for r in replies:
        try:
            pairs.append((float(r.content[p.METRICS][p.LOSS]), r.num_examples))
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
    """Evaluate the final model on sampled clients' held-out splits (sample-weighted)."""
    build = lambda n: RecordDict({p.PAYLOAD: ConfigRecord({p.MODEL: gm.payload_for(n)})})  # noqa: E731
    sampled, got = ctx.fleet.round(
        ctx.config.fl.clients_per_round, p.EVALUATE, build, ctx.draws(Draw.EVALUATE, ctx.config.fl.rounds), check_evaluate
    )
    ctx.dense_traffic(len(sampled), 0, gm.dense_bytes())
    n = sum(r.num_examples for r in got)
    return {
        "federated_accuracy": sum(r.decoded[1] * r.num_examples for r in got) / n,
        "federated_loss": sum(r.decoded[0] * r.num_examples for r in got) / n,
        "federated_clients": len(got),
    }
