"""One round of masked training, and the one place its replies are accepted or rejected.

Every reply passes, in order, the example count (`Fleet.accepted`), the update check (`check_update`),
the method's own payload check (`Method.check_reply`) and the round's outlier screening
(`shared.aggregate.screen_updates`); a reply that fails any of them is counted once as rejected and
is used nowhere, as if its client had not replied. Only then does the method aggregate.
"""

from __future__ import annotations

from typing import Callable

import torch
from flwr.app import ConfigRecord, RecordDict

from server.context import RunState
from server.fleet import config_record
from server.replies import error_line
from shared import codec, protocol as p
from shared.aggregate import clip_update, non_finite, screen_updates
from shared.batchnorm import RUNNING_VAR
from shared.draws import Draw
from shared.global_model import GlobalModel
from shared.methods.api import Method, Reply, same_masks
from shared.training import LR_SCHEDULES


def train_message(ctx: RunState, gm: GlobalModel, node: int, t: int, extra: dict, failing: set[int]) -> RecordDict:
    f = ctx.config.fl
    cfg = config_record({
        p.ROUND: t, p.SEED: ctx.client_seed(t, node), p.EPOCHS: f.local_epochs,
        p.LR: LR_SCHEDULES.get(f.lr_schedule)(f.lr, t, f.rounds),
        p.FAIL: ctx.config.simulation.fail_mode if node in failing else None, **extra,
    })
    return RecordDict({p.CONFIG: cfg, p.PAYLOAD: ConfigRecord({p.MODEL: gm.payload_for(node, running_stats=False)})})


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


def check_training_reply(ctx: RunState, method: Method, gm: GlobalModel, reply: Reply) -> tuple[dict | None, str | None]:
    """The update (`check_update`), then the method's payload (`check_reply`, which sees the update as
    `reply.decoded`): (update, None), or (None, the first reason to reject the reply). A check that
    raises on a payload it did not foresee rejects the reply rather than stopping the server."""
    update, reason = check_update(gm, reply, ctx.config.fl.max_update_norm, method.check_update_masks)
    if reason is not None:
        return None, reason
    reply.decoded = update
    try:
        reason = method.check_reply(ctx, gm, reply)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:  # a payload no check foresaw
        reason = f"{method.name or type(method).__name__}: unusable payload ({error_line(exc)})"
    return (None, reason) if reason is not None else (update, None)


def failing_nodes(ctx: RunState, t: int, candidates: list[int]) -> set[int]:
    """Fault drill: the clients told to fail this round (simulation.fail_fraction).

    Drawn in partition order, so the same seed fails the same partitions whatever ids nodes got.
    """
    frac = ctx.config.simulation.fail_fraction
    if frac <= 0:
        return set()
    rng = ctx.draws(Draw.FAULTS, t)
    return {n for n in candidates if rng.random() < frac}


def training_round(ctx: RunState, method: Method, gm: GlobalModel, t: int, extra: dict,
                   stream: Draw = Draw.TRAIN, reference: bool = True) -> list[Reply]:
    """One round of masked training with the method's `extra` config, on the clients `stream` draws
    for round t; the global state is replaced by the method's aggregate of the accepted replies,
    which are returned. An aggregate with a non-finite value (which no accepted reply can cause
    through the built-in aggregators, but a user's aggregator or method might) is discarded, logged,
    and the previous model kept; no reply is returned then, so the method's `after_round` changes
    nothing. `reference=False` leaves the round out of the dense FedAvg reference's bytes."""
    k = ctx.config.fl.clients_per_round
    failing = failing_nodes(ctx, t, ctx.fleet.nodes)
    sampled, replies = ctx.fleet.round(
        k, p.TRAIN, lambda n: train_message(ctx, gm, n, t, extra, failing), ctx.draws(stream, t),
        lambda r: check_training_reply(ctx, method, gm, r),
    )
    for node in sampled:
        gm.forget(node)
    for r in replies:
        gm.delivered(r.node_id)
    f = ctx.config.fl
    screened, reasons = screen_updates(gm.state, [r.decoded for r in replies], f.clip_multiple, f.reject_multiple)
    for r, update, reason in zip(replies, screened, reasons):
        r.decoded = update
        if reason:
            ctx.fleet.reject(r.node_id, p.TRAIN, reason)
    replies = [r for r in replies if r.decoded is not None]
    if reference:
        ctx.dense_traffic(len(sampled), len(replies), gm.dense_bytes())
    state = method.aggregate(ctx, gm, replies)
    if (bad := non_finite(state)) is not None:
        ctx.note(f"round {t}: aggregate discarded, the previous model kept (non-finite values in {bad})")
        return []
    gm.state = state
    return replies
