"""What a client does for each message type: plain functions over records, `shared/` and torch.

Each task takes the client runtime, the message content and the node's persistent
state, and returns the reply content. The node keeps the last masks it received in
its state, so the server sends a layer's mask only when it changed.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.runtime import ClientRuntime
from shared import codec, protocol as p
from shared.batchnorm import (
    bn_stats_from_tensors, bn_stats_to_tensors, load_stats, recalibrate, restart_running_stats, running_stat_names,
    running_stats_for_upload,
)
from shared.pruning.prune_grow import prune_grow
from shared.pruning.schedule import adjust_counts
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
    return _reply(metrics={p.PARTITION: rt.partition_id, p.NUM_EXAMPLES: len(rt.data.y_train)})


def scores(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    cfg = content[p.CONFIG]
    model, _ = _load_model(rt, content[p.PAYLOAD][p.MODEL], state)
    batch_list = list(rt.train_batches(int(cfg["seed"]))(0))[: int(cfg["batches"])]
    local = local_scores(model, str(cfg["score"]), batch_list, int(cfg["seed"]))
    n = sum(len(y) for _, y in batch_list)
    return _reply(payload={p.SCORE_TENSORS: codec.encode(local)}, metrics={p.NUM_EXAMPLES: n})


def bn_stats(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    """Recalibrate BN statistics of every candidate on the held-out split (FedTiny ABNS step 2)."""
    holdout = rt.holdout_batches()
    payload = content[p.PAYLOAD]
    state[CANDIDATE_STATE] = ConfigRecord({k: payload[k] for k in (p.CANDIDATE_BASE, p.CANDIDATE_MASKS)})  # for step 4
    out = []
    for model in _candidate_models(rt, state[CANDIDATE_STATE]):
        out.append(codec.encode(bn_stats_to_tensors(recalibrate(model, holdout))))
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
        load_stats(model, bn_stats_from_tensors(codec.decode(bn_blob)[0]))
        sums.append(evaluate_model(model, holdout).loss_sum)
    return _reply(metrics={p.LOSS_SUMS: sums, p.NUM_EXAMPLES: len(rt.data.y_holdout)})


def train(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    """Masked local training; pruned weights stay zero; top-k gradients of pruned positions when asked.

    Method extras: ``dst-fraction`` (FedDST) readjusts the masks locally first and sends the mask
    changes as sparse (index, value) parts under ``topk``; ``sq-grads`` (PruneFL) also sends
    squared gradients of every prunable weight under ``scores``.
    """
    cfg = content[p.CONFIG]
    _fault_drill(rt, cfg.get("fail"))
    model, masks = _load_model(rt, content[p.PAYLOAD][p.MODEL], state)
    names = list(cfg.get("adjust-names", []))
    grad_layers = dict(zip(names, (int(k) for k in cfg.get("adjust-k", [])), strict=True)) or None
    f = rt.config.fl
    batches = rt.train_batches(int(cfg["seed"]))
    local = masks
    if float(cfg.get("dst-fraction", 0.0)) > 0 and masks:
        grow_batches = list(batches(0))[: int(cfg.get("dst-batches", 1))]
        local = readjust_masks(model, masks, grow_batches, float(cfg["dst-fraction"]), int(cfg["seed"]))
    restart_running_stats(model)  # the download has none; average this client's batches exactly
    result = train_masked(
        model, local or None, batches, int(cfg["epochs"]), float(cfg["lr"]),
        f.momentum, f.weight_decay, grad_layers,
    )
    # Delta-coded against the download, which the server still holds: unchanged values cost nothing.
    # Decoded again here rather than kept through training, which would hold a dense model copy.
    sent, _ = codec.decode(content[p.PAYLOAD][p.MODEL], masks=masks)
    update = running_stats_for_upload(model.state_dict())
    payload = {p.UPDATE: codec.encode(update, masks, send_masks=False, base=sent)}
    if local is not masks:
        payload[p.TOPK] = codec.encode_sparse(mask_changes(masks, local, model.state_dict()))
    if result.topk:
        params = dict(model.named_parameters())
        parts = {n: (idx, val, tuple(params[n].shape)) for n, (idx, val) in result.topk.items()}
        payload[p.TOPK] = codec.encode_sparse(parts)
    if cfg.get("sq-grads", False) and masks:
        payload[p.SCORE_TENSORS] = codec.encode(squared_gradients(model, list(masks), batches(int(cfg["epochs"]) - 1)))
    return _reply(payload=payload, metrics={p.NUM_EXAMPLES: result.num_examples, p.LOSS: result.loss})


def readjust_masks(model: torch.nn.Module, masks: dict, batches: list, fraction: float, seed: int) -> dict:
    """FedDST's local readjustment (RigL-style, arXiv 2112.09824 / 1911.11134): in every sparse layer
    drop the ceil(fraction x nnz) smallest-|w| kept weights and grow as many pruned positions of
    largest |dL/dw| on `batches`; grown weights start at zero, so each layer keeps its count."""
    names = [n for n, m in masks.items() if not bool(m.all())]
    if not names:
        return masks
    grads = local_scores(model, "grad", batches, seed, names)
    params = dict(model.named_parameters())
    counts = adjust_counts(masks, names, fraction)
    new_masks, new_weights = prune_grow(
        {n: params[n].detach() for n in names}, {n: masks[n] for n in names}, grads, counts
    )
    with torch.no_grad():
        for n in names:
            params[n].copy_(new_weights[n])
    return {**masks, **new_masks}


def mask_changes(old: dict, new: dict, state: dict) -> dict:
    """Per changed layer, (flat indices where the mask flipped, values there, shape): a drop has value
    0, a grow its trained value. With the update's values at `old` kept positions this is the whole
    sparse model in O(changes) extra bytes, and `old` XOR indices gives the new mask."""
    out = {}
    for n, m in old.items():
        idx = (m ^ new[n]).reshape(-1).nonzero().squeeze(1)
        if idx.numel():
            out[n] = (idx, state[n].reshape(-1)[idx].float(), tuple(m.shape))
    return out


def squared_gradients(model: torch.nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """PruneFL's importance (arXiv 1909.12326): per-batch mean of (dL/dw)^2 over `batches`, dense,
    pruned positions included. Runs after the update is encoded (BN running statistics move)."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    count = 0
    model.train()
    for x, y in batches:
        if len(y) < 2:
            continue
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += g.detach() ** 2
        count += 1
    return {n: t / max(1, count) for n, t in total.items()}


def evaluate(rt: ClientRuntime, content: RecordDict, state: RecordDict) -> RecordDict:
    model, _ = _load_model(rt, content[p.PAYLOAD][p.MODEL], state)
    res = evaluate_model(model, rt.holdout_batches())
    return _reply(metrics={p.NUM_EXAMPLES: res.count, p.LOSS: res.loss, p.ACCURACY: res.accuracy})


def _load_model(rt: ClientRuntime, blob: bytes, state: RecordDict) -> tuple[torch.nn.Module, dict]:
    """Decode the global model with the masks this node already holds, and remember new masks."""
    known = _stored_masks(state)
    tensors, masks = codec.decode(blob, masks=known)
    if masks:
        merged = {**known, **masks}
        state[MASK_STATE] = ConfigRecord({"masks": codec.encode({n: m.to(torch.uint8) for n, m in merged.items()})})
    model = rt.new_model()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - set(running_stat_names(model.state_dict())):
        raise ValueError(f"the model payload does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model, masks


def _stored_masks(state: RecordDict) -> dict[str, torch.Tensor]:
    if MASK_STATE not in state:
        return {}
    tensors, _ = codec.decode(state[MASK_STATE]["masks"])
    return {n: t.bool() for n, t in tensors.items()}


def _candidate_models(rt: ClientRuntime, record: ConfigRecord) -> list[torch.nn.Module]:
    models = []
    for tensors in codec.decode_variants(record[p.CANDIDATE_BASE], list(record[p.CANDIDATE_MASKS])):
        model = rt.new_model()
        model.load_state_dict(tensors)
        models.append(model)
    return models


def _reply(payload: dict | None = None, metrics: dict | None = None) -> RecordDict:
    content = RecordDict()
    if payload:
        content[p.PAYLOAD] = ConfigRecord(payload)
    content[p.METRICS] = MetricRecord(metrics or {})
    return content
