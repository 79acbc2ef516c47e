"""What a client's reply may say: one check per message type of the shared phases.

A reply is hostile until checked. Each check returns (what the phase uses, None) or (None, why it is
rejected); `Fleet.accepted` logs and counts a rejection with the node, and the phase goes on with the
other replies. Counts are positive integers no larger than what the node holds (its registration, or
in a simulation with virtual partitions what the server knows each partition holds), so no client can
outweigh its data; losses, variances and scores are finite and >= 0 where they must be.

A training reply's update is checked in `server.rounds.check_update`, its method-specific payload by
the method's `check_reply` (`shared.methods`), both before anything of it is used.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import torch

from shared import codec, protocol as p
from shared.batchnorm import BNStats, bn_stats_from_tensors

if TYPE_CHECKING:
    from shared.methods.api import Reply

Checked = tuple[Any, str | None]


def check_count(value: Any, limit: int | None, key: str = p.NUM_EXAMPLES) -> tuple[int | None, str | None]:
    """A reported example count: a positive integer, at most `limit` (what the node holds) when known."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{key}={value!r} is not a number"
    if not (math.isfinite(value) and value == int(value) and value >= 1):
        return None, f"{key}={value!r} must be a positive integer"
    if limit is not None and value > limit:
        return None, f"{key}={int(value)} is more than the {limit} examples this node holds"
    return int(value), None


def error_line(exc: BaseException) -> str:
    """An exception as one line for a rejection reason: its first line, or its type when it has no message."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def metric(reply: Reply, key: str) -> Any:
    """A metric of the reply, or KeyError naming it."""
    metrics = reply.content[p.METRICS] if p.METRICS in reply.content else {}
    if key not in metrics:
        raise KeyError(f"the reply has no {key!r} metric")
    return metrics[key]


def check_hello(reply: Reply, num_clients: int) -> Checked:
    """Registration: ((partition id in [0, num_clients), train examples, held-out examples), None)."""
    try:
        part = metric(reply, p.PARTITION)
        train, why = check_count(metric(reply, p.NUM_EXAMPLES), None)
        holdout, why_h = check_count(metric(reply, p.HOLDOUT_EXAMPLES), None, p.HOLDOUT_EXAMPLES)
    except KeyError as exc:
        return None, error_line(exc)
    if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < num_clients:
        return None, f"{p.PARTITION}={part!r} is not a partition of fl.num_clients={num_clients}"
    if why or why_h:
        return None, why or why_h
    return (part, train, holdout), None


def check_evaluate(reply: Reply) -> Checked:
    """An evaluation of the model on the node's held-out split: ((loss, accuracy), None), loss >= 0, accuracy in [0, 1]."""
    try:
        loss, accuracy = float(metric(reply, p.LOSS)), float(metric(reply, p.ACCURACY))
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"unusable evaluation ({error_line(exc)})"
    if not (math.isfinite(loss) and loss >= 0):
        return None, f"{p.LOSS}={loss!r} must be finite and >= 0"
    if not 0.0 <= accuracy <= 1.0:
        return None, f"{p.ACCURACY}={accuracy!r} must be in [0, 1]"
    return (loss, accuracy), None


def check_bn(reply: Reply, candidates: int, layout: Mapping[str, tuple]) -> Checked:
    """Every candidate's recalibrated BN statistics (ABNS step 2): one blob per candidate in `layout`,
    finite means, finite variances >= 0, and per-channel counts that are a multiple of the examples
    the node reported (each example adds its spatial positions to every channel)."""
    try:
        blobs = list(reply.content[p.PAYLOAD][p.BN_STATS])
        if len(blobs) != candidates:
            return None, f"{len(blobs)} BN statistics for {candidates} candidates"
        stats = [bn_stats_from_tensors(codec.decode(b, expected=layout)[0]) for b in blobs]
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"undecodable BN statistics ({error_line(exc)})"
    for s in stats:
        if (why := _bad_stats(s, reply.num_examples)) is not None:
            return None, why
    return stats, None


def _bad_stats(stats: BNStats, examples: int) -> str | None:
    for name, (mean, var, count) in stats.items():
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            return f"non-finite BN statistics for {name}"
        if bool((var < 0).any()):
            return f"negative BN variance for {name}"
        if count < examples or count % examples:
            return f"BN count {count} of {name} is not a multiple of num-examples={examples}"
    return None


def check_loss_sums(reply: Reply, candidates: int, examples: int) -> Checked:
    """Every candidate's held-out loss sum (ABNS step 4): finite, >= 0, over the same examples as the
    node's BN statistics (`examples`)."""
    if reply.num_examples != examples:
        return None, f"num-examples={reply.num_examples} differs from the {examples} of its BN statistics"
    try:
        sums = [float(v) for v in metric(reply, p.LOSS_SUMS)]
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"unusable loss sums ({error_line(exc)})"
    if len(sums) != candidates:
        return None, f"{len(sums)} loss sums for {candidates} candidates"
    if not all(math.isfinite(v) and v >= 0 for v in sums):
        return None, "loss sums must be finite and >= 0"
    return sums, None


def check_scores(reply: Reply, shapes: Mapping[str, tuple[int, ...]]) -> Checked:
    """A client's data-driven scores: one finite float tensor per prunable weight (decoding bounded by their size)."""
    try:
        scores, _ = codec.decode(reply.content[p.PAYLOAD][p.SCORE_TENSORS],
                                 max_bytes=8 * sum(map(math.prod, shapes.values())) + 65536,
                                 expected={n: (s, codec.FLOAT_DTYPES) for n, s in shapes.items()})
    except (KeyError, ValueError, TypeError) as exc:
        return None, f"undecodable scores ({error_line(exc)})"
    if set(scores) != set(shapes):
        return None, f"scores for {sorted(set(scores) ^ set(shapes))[:3]} do not match the prunable weights"
    for n, s in scores.items():
        if tuple(s.shape) != tuple(shapes[n]) or not s.is_floating_point() or not torch.isfinite(s).all():
            return None, f"scores of {n} must be finite floats shaped {tuple(shapes[n])}"
    return scores, None
