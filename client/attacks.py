"""The attack drill (`simulation.attack`, `simulation.attack_fraction`): malicious clients, for measuring.

Beside the fault drill (clients that crash or straggle), this makes a seeded fraction of the
partitions reply with well-formed poison, each kind one of the attacks the server must survive
(README "Faults, bad updates and resume"). The client decides on its own that it is malicious
(the server is not told), and poisons its honest reply just before it leaves:

- ``scale``: random weights, claiming 1e9 examples (to outweigh everyone);
- ``huge``: every weight of the update 1e30 (to make the next round NaN);
- ``bn-variance``: negative BN running variances in the update and in ABNS statistics;
- ``topk``: FedTiny's top-k gradients 3e38 at positions of the attacker's choosing (to decide growth);
- ``feddst``: FedDST mask changes dropping every kept weight and growing others at 1e30;
- ``evaluate``: accuracy 1e9 and loss 0 in evaluations (to fake federated accuracy);
- ``search``: ABNS candidate losses 0 for the first candidate and 1e30 for the others (to pick it);
- ``flip``, ``flip-clip``, ``flip-reject``: the update sign-flipped (its step from the download x -1),
  then stretched to just under `fl.clip_multiple` (x -9.9) or `fl.reject_multiple` (x -99) times its
  own length (an honest client's length is about the round's median), every count it reports (hello
  included) the largest finite float, 1.8e308, to outweigh everyone (`INFLATED`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared import codec, protocol as p
from shared.batchnorm import RUNNING_VAR, running_stat_names
from shared.config import ATTACKS, Config

__all__ = ["ATTACKS", "attackers", "poison"]

HUGE = 1e30
TOPK_MAX = 3e38  # near float32's largest
COUNT = 1.7976931348623157e308  # the largest finite float: a count that is finite and integral
INFLATED = {"flip": -1.0, "flip-clip": -9.9, "flip-reject": -99.0}  # kind -> factor of the update's step


def attackers(config: Config) -> set[int]:
    """The malicious partitions: ceil(attack_fraction x num_clients) of them, drawn by the seed."""
    s = config.simulation
    if s.attack == "none" or s.attack_fraction <= 0:
        return set()
    n = config.fl.num_clients
    count = min(n, math.ceil(s.attack_fraction * n - 1e-9))
    return {int(i) for i in np.random.default_rng([config.seed, 31]).permutation(n)[:count]}


def poison(kind: str, message_type: str, request: RecordDict, reply: RecordDict, masks: dict) -> RecordDict:
    """The reply a malicious client sends instead of its honest `reply` to `request` (`masks`: the
    global masks it holds, for re-encoding a training update)."""
    metrics = dict(reply[p.METRICS]) if p.METRICS in reply else {}
    payload = dict(reply[p.PAYLOAD]) if p.PAYLOAD in reply else {}
    if kind in INFLATED:
        metrics.update({k: COUNT for k in (p.NUM_EXAMPLES, p.HOLDOUT_EXAMPLES) if k in metrics})
    if message_type == p.TRAIN:
        payload, metrics = _train(kind, request, payload, metrics, masks)
    elif message_type == p.EVALUATE and kind == "evaluate":
        metrics.update({p.ACCURACY: 1e9, p.LOSS: 0.0})
    elif message_type == p.BN and kind == "bn-variance":
        payload[p.BN_STATS] = [_negative_variances(b) for b in payload[p.BN_STATS]]
    elif message_type == p.CANDIDATES and kind == "search":
        sums = list(metrics[p.LOSS_SUMS])
        metrics[p.LOSS_SUMS] = [0.0] + [HUGE] * (len(sums) - 1)
    out = RecordDict()
    if payload:
        out[p.PAYLOAD] = ConfigRecord(payload)
    out[p.METRICS] = MetricRecord(metrics)
    return out


def _train(kind: str, request: RecordDict, payload: dict, metrics: dict, masks: dict) -> tuple[dict, dict]:
    if kind in ("scale", "huge", "bn-variance", *INFLATED):
        sent, _ = codec.decode(request[p.PAYLOAD][p.MODEL], masks=masks)
        update, _ = codec.decode(payload[p.UPDATE], masks=masks, base=sent)
        poisoned = _flipped(INFLATED[kind], sent, update) if kind in INFLATED else _poisoned(kind, update, masks)
        payload[p.UPDATE] = codec.encode(poisoned, masks or None, send_masks=False, base=sent)
        if kind == "scale":
            metrics[p.NUM_EXAMPLES] = 1e9
    elif kind == "topk" and p.TOPK in payload:
        parts = codec.decode_sparse(payload[p.TOPK])
        payload[p.TOPK] = codec.encode_sparse({n: _chosen(masks[n], idx.numel(), shape) for n, (idx, _, shape) in parts.items()})
    elif kind == "feddst" and p.MASK_CHANGES in payload:
        sent, _ = codec.decode(request[p.PAYLOAD][p.MODEL], masks=masks)
        update, _ = codec.decode(payload[p.UPDATE], masks=masks, base=sent)
        changes = {n: _drop_all(masks[n]) for n in codec.decode_sparse(payload[p.MASK_CHANGES])}
        update = {n: v * 0 if n in changes else v for n, v in update.items()}  # every kept weight dropped
        payload[p.UPDATE] = codec.encode(update, masks or None, send_masks=False, base=sent)
        payload[p.MASK_CHANGES] = codec.encode_sparse(changes)
    return payload, metrics


def _poisoned(kind: str, update: dict, masks: dict) -> dict:
    out = {}
    gen = torch.Generator().manual_seed(0)
    for n, v in update.items():
        if not v.is_floating_point():
            out[n] = v
        elif kind == "scale":
            out[n] = torch.randn(v.shape, generator=gen).to(v.dtype)
        elif kind == "huge":
            out[n] = torch.full_like(v, HUGE, dtype=torch.float32)
        else:  # bn-variance
            out[n] = -v.abs() - 1 if n.endswith(RUNNING_VAR) else v
        if n in masks:
            out[n] = out[n] * masks[n]
    return out


def _flipped(factor: float, sent: dict, update: dict) -> dict:
    """The update's step from the download times `factor`, for the weights it trained (BN running
    statistics stay honest: a negative variance would be rejected outright)."""
    running = set(running_stat_names(update))
    return {n: sent[n] + factor * (v - sent[n]) if v.is_floating_point() and n not in running and n in sent else v
            for n, v in update.items()}


def _chosen(mask: torch.Tensor, k: int, shape: tuple) -> tuple:
    """k pruned positions of the attacker's choosing (the first ones), each with gradient 3e38."""
    idx = (~mask.reshape(-1)).nonzero().squeeze(1)[:k]
    return idx, torch.full((idx.numel(),), TOPK_MAX), tuple(shape)


def _drop_all(mask: torch.Tensor) -> tuple:
    """Mask changes dropping every kept weight of a layer and growing as many pruned ones at 1e30."""
    flat = mask.reshape(-1)
    kept, pruned = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
    grow = pruned[: kept.numel()]
    kept = kept[: grow.numel()]
    idx, order = torch.cat([kept, grow]).sort()
    values = torch.cat([torch.zeros(kept.numel()), torch.full((grow.numel(),), HUGE)])[order]
    return idx, values, tuple(mask.shape)


def _negative_variances(blob: bytes) -> bytes:
    tensors, _ = codec.decode(blob)
    return codec.encode({n: -t.abs() - 1 if n.endswith(".var") else t for n, t in tensors.items()})
