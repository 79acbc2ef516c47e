"""ClientApp handlers, each driven through the real ClientApp with real records."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fake_grid import FakeGrid
from helpers import run_context, tiny_config
from shared.global_model import GlobalModel
from server.rounds import check_update, train_message
from server.queries import candidate_payload
from shared import codec, protocol as p
from shared.batchnorm import bn_stats_from_tensors, pool_stats, bn_stats_to_tensors
from shared.pruning import compute_masks


@pytest.fixture
def setup(tmp_path):
    config = tiny_config(tmp_path)
    grid = FakeGrid(config)
    ctx = run_context(config, grid, tmp_path)
    model = ctx.new_model()
    masks = compute_masks(model, 0.1, allocation="erk")  # no layer collapses to zero weights
    return ctx, grid, GlobalModel(model.state_dict(), masks)


def _send(ctx, node, message_type, content):
    replies = ctx.fleet.exchange({node: content}, message_type)
    assert len(replies) == 1, ctx.fleet.traffic.failures
    return replies[0]


def test_hello_reports_partition_and_examples(setup):
    ctx, grid, _ = setup
    assert sorted(ctx.fleet.partition_of.values()) == list(range(4))
    assert all(train > 0 and holdout > 0 for train, holdout in ctx.fleet.examples_of.values())


def test_train_keeps_pruned_weights_zero_and_sends_only_active_values(setup):
    ctx, _, gm = setup
    node = next(iter(ctx.fleet.partition_of))
    reply = _send(ctx, node, p.TRAIN, train_message(ctx, gm, node, 1, {}, set()))
    update, reason = check_update(gm, reply)
    assert reason is None
    for name, mask in gm.masks.items():
        assert torch.all(update[name][~mask] == 0)
        assert not torch.equal(update[name][mask], gm.state[name][mask])
    nnz = sum(int(m.sum()) for m in gm.masks.values())
    assert reply.bytes_up < 4 * nnz + 4 * sum(v.numel() for k, v in gm.state.items() if k not in gm.masks) + 2048


def test_train_with_adjustment_returns_top_k_pruned_gradients(setup):
    ctx, _, gm = setup
    node = next(iter(ctx.fleet.partition_of))
    name = list(gm.masks)[-1]
    reply = _send(ctx, node, p.TRAIN, train_message(ctx, gm, node, 1, {p.ADJUST_NAMES: [name], p.ADJUST_K: [5]}, set()))
    sparse = codec.decode_sparse(reply.content[p.PAYLOAD][p.TOPK])
    idx, values, shape = sparse[name]
    assert len(idx) == 5 and tuple(shape) == tuple(gm.masks[name].shape)
    assert not gm.masks[name].flatten()[idx].any()
    assert torch.all(values != 0)


def test_injected_failure_comes_back_as_a_logged_error(setup):
    ctx, _, gm = setup
    node = next(iter(ctx.fleet.partition_of))
    replies = ctx.fleet.exchange({node: train_message(ctx, gm, node, 1, {}, {node})}, p.TRAIN)
    assert replies == [] and "failed on purpose" in ctx.fleet.traffic.failures[-1]


def test_training_download_has_no_running_stats_and_the_update_has_fresh_ones(setup):
    ctx, _, gm = setup
    node = next(iter(ctx.fleet.partition_of))
    message = train_message(ctx, gm, node, 1, {}, set())
    sent, _ = codec.decode(message[p.PAYLOAD][p.MODEL])
    assert not any("running" in n or "num_batches" in n for n in sent)
    assert set(gm.state) - set(sent) == {n for n in gm.state if n.rsplit(".", 1)[-1].startswith(("running", "num_batches"))}
    blob = _send(ctx, node, p.TRAIN, message).content[p.PAYLOAD][p.UPDATE]
    update, _ = codec.decode(blob, masks=gm.masks, base=gm.state)  # delta-coded against the download
    assert set(update) == set(gm.state)
    assert not torch.equal(update["features.1.running_mean"].float(), gm.state["features.1.running_mean"])
    with pytest.raises(ValueError, match="delta-coded"):
        codec.decode(blob, masks=gm.masks)


def test_node_receives_masks_once_then_values_only(setup):
    ctx, _, gm = setup
    node = next(iter(ctx.fleet.partition_of))
    first = len(gm.payload_for(node))
    _send(ctx, node, p.TRAIN, train_message(ctx, gm, node, 1, {}, set()))
    gm.delivered(node)
    second_msg = train_message(ctx, gm, node, 2, {}, set())
    assert len(second_msg[p.PAYLOAD][p.MODEL]) < first
    assert check_update(gm, _send(ctx, node, p.TRAIN, second_msg))[1] is None


def test_bn_recalibration_and_candidate_evaluation(setup):
    ctx, _, gm = setup
    node = next(iter(ctx.fleet.partition_of))
    model = ctx.new_model()
    masks = [compute_masks(model, 0.1, allocation=a) for a in ("global", "uniform")]
    reply = _send(ctx, node, p.BN, RecordDict({p.PAYLOAD: candidate_payload(model.state_dict(), masks)}))
    stats = [bn_stats_from_tensors(codec.decode(b)[0]) for b in reply.content[p.PAYLOAD][p.BN_STATS]]
    assert len(stats) == 2 and set(stats[0]) == {"features.1", "features.4", "features.8", "classifier.1"}
    bn = [codec.encode(bn_stats_to_tensors(pool_stats([s]))) for s in stats]
    ev = _send(ctx, node, p.CANDIDATES, RecordDict({p.PAYLOAD: ConfigRecord({p.BN_STATS: bn})}))
    sums = list(ev.content[p.METRICS][p.LOSS_SUMS])
    assert len(sums) == 2 and all(s > 0 for s in sums)


def test_candidate_evaluation_without_cached_candidates_is_an_error(setup):
    ctx, _, _ = setup
    node = next(iter(ctx.fleet.partition_of))
    replies = ctx.fleet.exchange({node: RecordDict({p.PAYLOAD: ConfigRecord({p.BN_STATS: []})})}, p.CANDIDATES)
    assert replies == [] and "no candidates cached" in ctx.fleet.traffic.failures[-1]


def test_evaluate_reports_accuracy_on_holdout(setup):
    ctx, _, gm = setup
    node = next(iter(ctx.fleet.partition_of))
    reply = _send(ctx, node, p.EVALUATE, RecordDict({p.PAYLOAD: ConfigRecord({p.MODEL: gm.payload_for(node)})}))
    m = reply.content[p.METRICS]
    assert 0.0 <= m[p.ACCURACY] <= 1.0 and m[p.NUM_EXAMPLES] > 0


def test_stored_masks_decode_only_to_the_models_layout(setup):
    from client.tasks import MASK_STATE, stored_masks

    ctx, _, _ = setup
    model = ctx.new_model()
    state = RecordDict()
    state[MASK_STATE] = ConfigRecord({"masks": codec.encode({"huge": torch.zeros(2**25, dtype=torch.uint8)})})
    assert len(state[MASK_STATE]["masks"]) < 100_000
    with pytest.raises(codec.DecodeError):
        stored_masks(state, model)
    mask = {n: torch.ones_like(t, dtype=torch.uint8) for n, t in model.state_dict().items() if n.endswith("weight")}
    state[MASK_STATE] = ConfigRecord({"masks": codec.encode(mask)})
    assert set(stored_masks(state, model)) == set(mask)
