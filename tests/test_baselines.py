"""Baselines on the in-process FakeGrid: each method's defining behaviour, on the tiny config."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fake_grid import FakeGrid
from helpers import run_context, tiny_config
from server.app import run
from shared.methods import Reply
from shared.global_model import GlobalModel
from server.loop import run_training
from server.rounds import training_round
from shared.methods import METHODS
from shared.methods.feddst import global_masks_from, local_masks, mask_changes
from shared.methods.imp import prune_rounds
from shared.methods.prunefl import REMASK
from shared import codec, protocol as p
from shared.pruning import masks_from_scores

DENSITY = 0.05


def _counts(masks):
    return {n: int(m.sum()) for n, m in masks.items()}


def _exact(masks, d=DENSITY):
    total = sum(m.numel() for m in masks.values())
    return sum(_counts(masks).values()) == round(d * total)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_runs_and_ends_at_the_target_density(tmp_path, name):
    config = tiny_config(tmp_path, f"method={name}", "fl.rounds=2", "fedtiny.scores=[magnitude]", "warmup.epochs=1")
    out = run(FakeGrid(config), config)
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["method"] == name and 0.0 <= summary["accuracy"] <= 1.0
    expected = 1.0 if name == "fedavg" else DENSITY
    assert summary["density"] == pytest.approx(expected, abs=1e-3)


def test_snip_masks_come_from_the_example_weighted_mean_of_client_scores(tmp_path):
    config = tiny_config(tmp_path, "snip.batches=1000", "fl.max_weight_share=0")  # all local data: clients differ in size
    ctx = run_context(config, FakeGrid(config), tmp_path)
    seen = []
    exchange = ctx.fleet.exchange
    ctx.fleet.exchange = lambda req, kind: seen.extend(out := exchange(req, kind)) or out
    method = METHODS.get("snip")(ctx)
    gm = method.prepare(ctx)
    scores = [codec.decode(r.content[p.PAYLOAD][p.SCORE_TENSORS])[0] for r in seen]
    weights = [int(r.content[p.METRICS][p.NUM_EXAMPLES]) for r in seen]
    assert len(scores) == config.snip.clients and len(set(weights)) > 1
    for name, agg in method.scores.items():
        mean = sum(w * s[name].double() for w, s in zip(weights, scores)) / sum(weights)
        assert torch.allclose(agg.double(), mean, rtol=1e-5, atol=0)
    first = ctx.prunable(ctx.new_model())[0]
    dense = [n for n in method.scores if n not in ctx.prunable(ctx.new_model())]
    expected = masks_from_scores(method.scores, DENSITY, "global", config.seed, keep_dense=dense)
    assert all(torch.equal(gm.masks[n], expected[n]) for n in expected) and first in gm.masks
    assert _exact(gm.masks)


def test_synflow_prunes_without_asking_clients_at_exact_density(tmp_path):
    config = tiny_config(tmp_path)
    grid = FakeGrid(config)
    ctx = run_context(config, grid, tmp_path)
    before = len(grid.sent)  # registration only
    gm = METHODS.get("synflow")(ctx).prepare(ctx)
    assert len(grid.sent) == before
    assert _exact(gm.masks)
    for name, mask in gm.masks.items():
        assert torch.all(gm.state[name][~mask] == 0)


def test_prunefl_remask_swaps_only_when_a_pruned_weight_is_more_important():
    mask = torch.tensor([True, True, False, False])
    importance = torch.tensor([0.5, 3.0, 4.0, 0.1])
    assert REMASK.update_layer(torch.zeros(4), mask, importance, 2)[0].tolist() == [False, True, True, False]
    assert REMASK.update_layer(torch.zeros(4), mask, importance, 0)[0].tolist() == mask.tolist()


def test_prunefl_changes_masks_at_its_interval_only(tmp_path):
    config = tiny_config(tmp_path, "method=prunefl", "fl.rounds=3")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("prunefl")(ctx)
    method.settings.interval = 2
    gm = method.prepare(ctx)
    start = {n: m.clone() for n, m in gm.masks.items()}
    for t in (1, 2):
        extra = method.round_config(ctx, gm, t)
        replies = training_round(ctx, method, gm, t, extra)
        assert all((p.SQ_GRADS in r.content[p.PAYLOAD]) == (t == 2) for r in replies)
        before = {n: m.clone() for n, m in gm.masks.items()}
        method.after_round(ctx, gm, t, replies)
        changed = [n for n in gm.masks if not torch.equal(gm.masks[n], before[n])]
        assert bool(changed) == (t == 2), t
    assert _counts(gm.masks) == _counts(start)
    assert method.round_config(ctx, gm, 3) == {}  # never on the last round


def _reply(node, global_masks, state, masks, n):
    """A FedDST reply as the client sends it: values at global kept positions, plus mask changes."""
    content = RecordDict()
    content[p.PAYLOAD] = ConfigRecord({
        p.UPDATE: codec.encode(state, global_masks, send_masks=False),
        p.MASK_CHANGES: codec.encode_sparse(mask_changes(global_masks, masks, state)),
    })
    content[p.METRICS] = MetricRecord({p.NUM_EXAMPLES: n})
    reply = Reply(node, content, 0)
    reply.decoded = codec.decode(content[p.PAYLOAD][p.UPDATE], masks=global_masks)[0]
    return reply


def test_feddst_averages_each_weight_over_the_clients_that_keep_it(tmp_path):
    config = tiny_config(tmp_path, "method=feddst", "fl.max_weight_share=0")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("feddst")(ctx)
    method.readjusting = True
    start = {"w": torch.tensor([True, True, False, False])}
    gm = GlobalModel({"w": torch.tensor([8.0, 1.0, 0.0, 0.0]), "b": torch.zeros(1)}, start)  # grows up to |8| are not clipped
    a = _reply(1, start, {"w": torch.tensor([2.0, 0.0, 6.0, 0.0]), "b": torch.tensor([1.0])}, {"w": torch.tensor([True, False, True, False])}, 1)
    b = _reply(2, start, {"w": torch.tensor([4.0, 0.5, 0.0, 0.0]), "b": torch.tensor([4.0])}, start, 3)
    assert method.check_reply(ctx, gm, a) is None and method.check_reply(ctx, gm, b) is None
    gm.state = method.aggregate(ctx, gm, [a, b])
    method.after_round(ctx, gm, 1, [a, b])
    # position 0: both keep it (2*1 + 4*3)/4; position 1 only b: 0.5; position 2 only a: 6 (not 6/4)
    assert gm.masks["w"].tolist() == [True, False, True, False]  # top-2 by aggregated magnitude
    assert torch.allclose(gm.state["w"], torch.tensor([3.5, 0.0, 6.0, 0.0]))
    assert torch.allclose(gm.state["b"], torch.tensor([3.25]))


def test_feddst_ignores_mask_changes_that_alter_a_layer_count():
    start = {"w": torch.tensor([True, True, False, False])}
    changes = {"w": (torch.tensor([2]), torch.tensor([1.0]), (4,))}  # a grow without a drop
    assert "0 drops but 1 grows" in local_masks(start, {"w": torch.zeros(4)}, changes)


def test_feddst_refuses_more_mask_changes_than_the_round_asked_for():
    start = {"w": torch.tensor([True, True, False, False])}
    drop_all = {"w": (torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, 0.0, 1.0, 1.0]), (4,))}
    assert "2 mask changes, more than the 1 asked for" in local_masks(start, {"w": torch.zeros(4)}, drop_all, {"w": 1})


def test_feddst_clips_a_grown_value_to_the_largest_global_weight():
    start = {"w": torch.tensor([True, True, False, False])}
    grow_huge = {"w": (torch.tensor([1, 2]), torch.tensor([0.0, 1e30]), (4,))}  # drop 1, grow 2 at 1e30
    masks, state = local_masks(start, {"w": torch.tensor([0.5, 0.0, 0.0, 0.0])}, grow_huge, {"w": 1}, {"w": 2.0})
    assert masks["w"].tolist() == [True, False, True, False]
    assert state["w"].tolist() == [0.5, 0.0, 2.0, 0.0]


def test_feddst_global_mask_keeps_layer_counts_within_the_union():
    state = {"w": torch.tensor([0.0, -3.0, 1.0, 9.0])}
    masks = [{"w": torch.tensor([True, True, False, False])}, {"w": torch.tensor([True, False, True, False])}]
    assert global_masks_from(state, masks, {"w": 2})["w"].tolist() == [False, True, True, False]


def test_feddst_clients_readjust_their_masks_locally_at_constant_counts(tmp_path):
    config = tiny_config(tmp_path, "method=feddst")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("feddst")(ctx)
    method.settings.alpha = 0.2
    gm = method.prepare(ctx)
    global_masks = {n: m.clone() for n, m in gm.masks.items()}
    extra = method.round_config(ctx, gm, 1)
    assert extra[p.DST_FRACTION] == pytest.approx(0.2)
    replies = training_round(ctx, method, gm, 1, extra)
    assert len(replies) == config.fl.clients_per_round  # the shared update check accepts them
    for r in replies:
        local, _ = local_masks(global_masks, r.decoded, codec.decode_sparse(r.content[p.PAYLOAD][p.MASK_CHANGES]))
        assert any(not torch.equal(local[n], global_masks[n]) for n in global_masks)
        assert _counts(local) == _counts(global_masks)
    method.after_round(ctx, gm, 1, replies)
    assert _counts(gm.masks) == _counts(global_masks)
    assert method.round_config(ctx, gm, 2) == {}  # next readjustment at round 1 + 15


def test_imp_density_decreases_over_rounds_to_the_target(tmp_path):
    config = tiny_config(tmp_path, "method=imp", "fl.rounds=5", "imp.end_fraction=0.8")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("imp")(ctx)
    assert method.schedule == prune_rounds(5, 0.8, 1) == [1, 2, 3, 4]
    gm = run_training(ctx, method)
    densities = [r.density for r in ctx.recorder.rounds]
    assert densities[0] == 1.0
    assert all(b < a for a, b in zip(densities[:5], densities[1:5]))
    assert densities[4] == densities[5] == pytest.approx(DENSITY, abs=1e-3)
    assert _exact(gm.masks)


def test_imp_schedule_spreads_steps_up_to_the_end_fraction():
    assert prune_rounds(30, 0.6, 5) == [6, 12, 18]
    assert prune_rounds(3, 0.1, 5) == [1]


def test_the_centralized_ceiling_trains_on_every_clients_data_and_prunes_to_the_exact_density(tmp_path):
    config = tiny_config(tmp_path, "method=centralized", "fl.rounds=4")
    out = run(FakeGrid(config), config)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0]  # no federated rounds
    _, masks = codec.load(out / "model.ftc")
    assert _exact(masks)
    assert metrics["summary"]["accuracy"] > 0.5  # digits, 4 rounds' worth of example passes


def test_the_centralized_example_budget_is_the_federated_runs():
    from types import SimpleNamespace

    from shared.methods.centralized import example_passes
    from shared.config import load_config

    config = load_config(overrides=["fl.rounds=10", "fl.num_clients=20", "fl.clients_per_round=5", "fl.local_epochs=2"])
    assert example_passes(SimpleNamespace(config=config), 1000) == 10 * 5 * 2 * 1000 // 20


def test_prunefl_rejects_squared_gradients_that_are_negative_or_misshapen():
    from shared.methods.prunefl import check_sq_grads

    gm = GlobalModel({"w": torch.ones(4)}, {"w": torch.tensor([True, False, True, False])})

    def reply(grads):
        content = RecordDict()
        content[p.PAYLOAD] = ConfigRecord({p.SQ_GRADS: codec.encode(grads)})
        return Reply(1, content, 0)

    assert torch.equal(check_sq_grads(reply({"w": torch.ones(4)}), gm)["w"], torch.ones(4))
    assert "finite, >= 0" in check_sq_grads(reply({"w": -torch.ones(4)}), gm)
    assert "claims shape (3,), expected (4,)" in check_sq_grads(reply({"w": torch.ones(3)}), gm)  # refused by the decode
    assert "unexpected entry 'v'" in check_sq_grads(reply({"v": torch.ones(4)}), gm)
