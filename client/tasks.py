"""What a client does for each message type: plain functions over records, `shared/` and torch.

Each task takes the client runtime, the message content and the node's persistent
state, and returns the reply content. The node keeps the last masks it received in
its state, so the server sends a layer's mask only when it changed.

Models, masks and batches live on the runtime's device (`config.device`); what a task
hands to the codec is moved to the host first (`shared.device.to_cpu`), nothing else is.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.runtime import ClientRuntime
from shared import codec, protocol as p
from shared.batchnorm import (
    bn_stats_from_tensors, bn_stats_layout, bn_stats_to_tensors, load_stats, recalibrate, restart_running_stats,
    running_stat_names,
    running_stats_for_upload,
)
from shared.device import to_cpu
from shared.methods import TrainJob
from shared.methods import load as load_method
from shared.training import evaluate as evaluate_model
from shared.training import local_scores, train_masked

MASK_STATE = "fedtiny-masks"
CANDIDATE_STATE = "fedtiny-candidates"


class InjectedFailure(RuntimeError):
    """Raised when the server's fault drill asks this client to crash (simulation.fail_fraction)."""


# A straggler sleeps this many round timeouts, so the server has cut it before it replies; not
# much longer, since in simulation it holds its Ray actor (and the clients queued behind it) meanwhile.
STRAGGLE_TIMEOUTS = 1.5


def _fault_drill(rt: ClientRuntime, mode: str | None) -> None:
    """Act out the failure the server asked for (simulation.fail_mode), if any."""
    if mode == "crash":
        raise InjectedFailure(f"client {rt.partition_id} failed on purpose (simulation.fail_fraction)")
    if mode == "straggle":
        time.sleep(STRAGGLE_TIMEOUTS * rt.config.fl.round_timeout)


def hello(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    d = rt.data
    return _reply(metrics={p.PARTITION: rt.partition_id, p.NUM_EXAMPLES: len(d.y_train), p.HOLDOUT_EXAMPLES: len(d.y_holdout)})


def scores(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    cfg = content[p.CONFIG]
    model, _ = _load_model(rt, content[p.PAYLOAD][p.MODEL], state)
    seed = int(cfg[p.SEED])
    batch_list = list(rt.train_batches(seed)(0))[: int(cfg[p.BATCHES])]
    local = local_scores(model, str(cfg[p.SCORE]), batch_list, seed, trusted=rt.config.trusted)
    n = sum(len(y) for _, y in batch_list)
    return _reply(payload={p.SCORE_TENSORS: codec.encode(to_cpu(local))}, metrics={p.NUM_EXAMPLES: n})


def bn_stats(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    """Recalibrate BN statistics of every candidate on the held-out split (FedTiny ABNS step 2)."""
    holdout = rt.holdout_batches()
    payload = content[p.PAYLOAD]
    state[CANDIDATE_STATE] = ConfigRecord({k: payload[k] for k in (p.CANDIDATE_BASE, p.CANDIDATE_MASKS)})  # for step 4
    out = []
    for model in _candidate_models(rt, state[CANDIDATE_STATE]):
        out.append(codec.encode(to_cpu(bn_stats_to_tensors(recalibrate(model, holdout)))))
    return _reply(payload={p.BN_STATS: out}, metrics={p.NUM_EXAMPLES: len(rt.data.y_holdout)})


def evaluate_candidates(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    """Held-out loss of every candidate with its pooled BN statistics (FedTiny ABNS step 4).

    The candidates are those this node received for recalibration, so only the pooled
    statistics travel again.
    """
    if CANDIDATE_STATE not in state:
        raise ValueError("no candidates cached on this node: send query.bn before query.candidates")
    models = _candidate_models(rt, state[CANDIDATE_STATE])
    del state[CANDIDATE_STATE]
    holdout = rt.holdout_batches()
    sums = []
    for model, bn_blob in zip(models, content[p.PAYLOAD][p.BN_STATS], strict=True):
        load_stats(model, bn_stats_from_tensors(codec.decode(bn_blob, expected=bn_stats_layout(model))[0]))
        sums.append(evaluate_model(model, holdout).loss_sum)
    return _reply(metrics={p.LOSS_SUMS: sums, p.NUM_EXAMPLES: len(rt.data.y_holdout)})


def train(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    """Masked local training (pruned weights stay zero), plus what the method's client half adds
    (`shared.methods.ClientHalf`: FedTiny's top-k gradients, FedDST's readjustment, ...)."""
    cfg = content[p.CONFIG]
    _fault_drill(rt, cfg.get(p.FAIL))
    model, masks = _load_model(rt, content[p.PAYLOAD][p.MODEL], state)
    half = load_method(rt.config.method, rt.config.trusted).client
    seed = int(cfg[p.SEED])
    job = TrainJob(runtime=rt, config=cfg, model=model, masks=masks, local_masks=masks,
                   batches=rt.train_batches(seed), seed=seed)
    half.before_training(job)
    restart_running_stats(model)  # the download has none; average this client's batches exactly
    f = rt.config.fl
    result = train_masked(
        model, job.local_masks or None, job.batches, int(cfg[p.EPOCHS]), float(cfg[p.LR]),
        f.momentum, f.weight_decay, half.grad_layers(job),
    )
    extra = half.after_training(job, result)  # may prune the model and set the masks it travels on
    # Delta-coded against the download, which the server still holds: unchanged values cost nothing.
    # Decoded again here rather than kept through training, which would hold a dense model copy.
    sent, _ = codec.decode(content[p.PAYLOAD][p.MODEL], masks=to_cpu(masks))
    update = to_cpu(running_stats_for_upload(model.state_dict()))
    own = job.upload_masks is not None
    payload = {p.UPDATE: codec.encode(update, to_cpu(job.upload_masks if own else masks), send_masks=own, base=sent), **extra}
    return _reply(payload=payload, metrics={p.NUM_EXAMPLES: result.num_examples, p.LOSS: result.loss})


def evaluate(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    model, _ = _load_model(rt, content[p.PAYLOAD][p.MODEL], state)
    res = evaluate_model(model, rt.holdout_batches())
    return _reply(metrics={p.NUM_EXAMPLES: res.count, p.LOSS: res.loss, p.ACCURACY: res.accuracy})


def _load_model(rt: ClientRuntime, blob: bytes, state: RecordDict) -> tuple[torch.nn.Module, dict]:
    """Decode the global model with the masks this node already holds, and remember new masks.

    The model and the masks returned are on the runtime's device."""
    model = rt.new_model()
    known = stored_masks(state, model)
    tensors, masks = codec.decode(blob, masks=known, expected=codec.expect(model.state_dict()))
    if masks:
        merged = {**known, **masks}
        state[MASK_STATE] = ConfigRecord({"masks": codec.encode({n: m.to(torch.uint8) for n, m in merged.items()})})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - set(running_stat_names(model.state_dict())):
        raise ValueError(f"the model payload does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model, {n: m.to(rt.device) for n, m in masks.items()}


def stored_masks(state: RecordDict, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The masks this node stored, decoded to `model`'s layout only (uint8 of its tensors' shapes)."""
    if MASK_STATE not in state:
        return {}
    layout = codec.expect(model.state_dict(), dict.fromkeys(model.state_dict(), torch.uint8))
    tensors, _ = codec.decode(state[MASK_STATE]["masks"], expected=layout)
    return {n: t.bool() for n, t in tensors.items()}


def _candidate_models(rt: ClientRuntime, record: ConfigRecord) -> list[torch.nn.Module]:
    first = rt.new_model()
    layout = codec.expect(first.state_dict())  # the candidates decode to this model's layout only
    variants = codec.decode_variants(record[p.CANDIDATE_BASE], list(record[p.CANDIDATE_MASKS]), expected=layout)
    models = [first, *(rt.new_model() for _ in variants[1:])][: len(variants)]
    for model, tensors in zip(models, variants):
        model.load_state_dict(tensors)
    return models


def _reply(payload: dict | None = None, metrics: dict | None = None) -> RecordDict:
    content = RecordDict()
    if payload:
        content[p.PAYLOAD] = ConfigRecord(payload)
    content[p.METRICS] = MetricRecord(metrics or {})
    return content
