"""Server phase logic on the in-process FakeGrid: search, progressive pruning, faults, determinism."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fake_grid import FakeGrid
from helpers import run_context, tiny_config
from server import replies
from shared.aggregate import weighted_average
from server.app import run
from shared.draws import Draw, seed_sequence
from server.fleet import NotEnoughReplies
from shared.global_model import GlobalModel
from server.loop import run_training
from server.rounds import training_round
from shared.methods import METHODS, Method, fedtiny
from shared import codec, protocol as p
from shared.batchnorm import pool_stats, recalibrate
from shared.data import batches
from shared.partition import every_client_data
from shared.pruning import density


def test_weighted_average_weights_by_examples_and_keeps_pruned_zero():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}
    out = weighted_average([a, b], [1, 3], masks={"w": torch.tensor([True, False])})
    assert torch.allclose(out["w"], torch.tensor([2.5, 0.0]))


def test_global_model_sends_masks_only_for_layers_changed_since_node_last_synced():
    state = {"a": torch.ones(64), "b": torch.ones(64)}
    masks = {"a": torch.arange(64) < 8, "b": torch.arange(64) < 8}
    gm = GlobalModel(state, masks)
    full = codec.decode(gm.payload_for(7))[1]
    gm.delivered(7)
    assert set(full) == {"a", "b"}
    _, none = codec.decode(gm.payload_for(7), masks=gm.masks)
    gm.set_masks({"a": masks["a"], "b": torch.arange(64) >= 56})
    data = gm.payload_for(7)
    with pytest.raises(ValueError):
        codec.decode(data)  # mask of "a" is not in the payload: the node already has it
    assert set(codec.decode(data, masks={"a": masks["a"]})[1]) == {"a", "b"}


def test_policy_search_selects_the_lowest_pooled_loss(tmp_path):
    config = tiny_config(tmp_path)
    ctx = run_context(config, FakeGrid(config), tmp_path)
    model = ctx.new_model()
    best, candidates = fedtiny.search(ctx, model, config.fedtiny)
    assert len(candidates) == 4  # 2 allocations x 2 scores (snip computed by clients)
    assert best.loss == min(c.loss for c in candidates)
    assert density(best.masks) == pytest.approx(0.05, abs=1e-4)
    for name, mask in best.masks.items():
        assert torch.all(dict(model.named_parameters())[name][~mask] == 0)


def test_without_abns_the_first_candidate_is_taken_without_client_evaluation(tmp_path):
    config = tiny_config(tmp_path, "fedtiny.abns=false", "fedtiny.scores=[magnitude]")
    grid = FakeGrid(config)
    ctx = run_context(config, grid, tmp_path)
    best, candidates = fedtiny.search(ctx, ctx.new_model(), config.fedtiny)
    assert best is candidates[0] and best.loss is None
    assert not any(m.metadata.message_type in (p.BN, p.CANDIDATES) for m in grid.sent)


def test_progressive_rounds_adjust_one_block_and_keep_density(tmp_path):
    config = tiny_config(tmp_path, "fedtiny.scores=[magnitude]", "fedtiny.allocations=[erk]", "fl.rounds=4")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("fedtiny")(ctx)
    gm = method.prepare(ctx)
    before = {n: m.clone() for n, m in gm.masks.items()}
    extra = method.round_config(ctx, gm, 1)
    assert extra[p.ADJUST_NAMES] == method.blocks[-1]  # output side first
    replies = training_round(ctx, method, gm, 1, extra)
    method.after_round(ctx, gm, 1, replies)
    changed = [n for n in gm.masks if not torch.equal(gm.masks[n], before[n])]
    assert changed and set(changed) <= set(extra[p.ADJUST_NAMES])
    assert density(gm.masks) == density(before)
    for n in changed:
        grown = gm.masks[n] & ~before[n]
        assert torch.all(gm.state[n][grown] == 0)  # new weights start at zero


def test_without_progressive_masks_never_change(tmp_path):
    config = tiny_config(tmp_path, "fedtiny.progressive=false", "fedtiny.scores=[magnitude]")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("fedtiny")(ctx)
    gm = method.prepare(ctx)
    assert method.round_config(ctx, gm, 1) == {}


def test_round_retries_with_fresh_clients_when_replies_are_missing(tmp_path):
    config = tiny_config(tmp_path, "fl.min_replies=1.0")
    dead = {1000}
    ctx = run_context(config, FakeGrid(config, drop=lambda n, t: n in dead and t == p.TRAIN), tmp_path)
    gm = GlobalModel(ctx.new_model().state_dict())
    replies = training_round(ctx, Method(ctx), gm, 1, {})
    assert len(replies) == 2 and 1000 not in {r.node_id for r in replies}


def test_round_gives_up_instead_of_waiting_forever(tmp_path):
    config = tiny_config(tmp_path)
    ctx = run_context(config, FakeGrid(config, drop=lambda n, t: t == p.TRAIN), tmp_path)
    with pytest.raises(NotEnoughReplies, match="fl.min_replies"):
        training_round(ctx, Method(ctx), GlobalModel(ctx.new_model().state_dict()), 1, {})


def test_whole_run_is_deterministic_and_writes_outputs(tmp_path):
    results = []
    for sub in ("a", "b"):
        config = tiny_config(tmp_path / sub)
        out = run(FakeGrid(config), config)
        metrics = json.loads((out / "metrics.json").read_text())
        results.append((metrics["summary"]["accuracy"], codec.load(out / "model.ftc")[1]))
        outputs = ("metrics.csv", "config.yaml", "model-spec.json", "accuracy.png", "bytes.png")
        for f in (*outputs, "layer_density.png"):
            assert (out / f).exists(), f
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


def test_virtual_partitions_skip_registration_and_give_the_same_run(tmp_path):
    results = []
    for sub, virtual in (("hello", "false"), ("virtual", "true")):
        config = tiny_config(tmp_path / sub, f"simulation.virtual_partitions={virtual}")
        grid = FakeGrid(config)
        out = run(grid, config)
        results.append(json.loads((out / "metrics.json").read_text())["summary"]["accuracy"])
        hellos = [m for m in grid.sent if m.metadata.message_type == p.HELLO]
        assert len(hellos) == (0 if virtual == "true" else config.fl.num_clients)
    assert results[0] == results[1]


def test_a_run_with_faults_is_the_same_whatever_ids_the_nodes_got(tmp_path):
    """Sampling and the fault drill go by partition, not by the random ids Flower gives nodes."""
    results = []
    for sub, reverse in (("ids-up", False), ("ids-down", True)):
        config = tiny_config(tmp_path / sub, "simulation.fail_fraction=0.5", "fl.min_replies=0.5")
        grid = FakeGrid(config)
        if reverse:  # node 1000 now holds the last partition, and so on
            grid.nodes = {node: len(grid.nodes) - 1 - part for node, part in grid.nodes.items()}
        metrics = json.loads((run(grid, config) / "metrics.json").read_text())
        trained = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == p.TRAIN]
        results.append((metrics["summary"]["accuracy"], metrics["summary"]["client_failures"],
                        [grid.nodes[n] for n in trained]))
    assert results[0][1] > 0
    assert results[0] == results[1]


def test_eval_every_skips_central_evaluation_but_never_the_last_round(tmp_path):
    config = tiny_config(tmp_path, "fl.rounds=5", "fl.eval_every=2", "method=synflow")
    out = run(FakeGrid(config), config)
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds if r["accuracy"] is not None] == [0, 2, 4, 5]
    assert json.loads((out / "metrics.json").read_text())["summary"]["accuracy"] == rounds[-1]["accuracy"]


def test_successive_halving_keeps_the_lower_half_and_ranks_nan_last():
    assert fedtiny.halving_order([2.3, 0.7, float("nan"), 1.1, 0.7]) == [1, 4, 3]
    assert fedtiny.halving_order([5.0]) == [0]
    assert fedtiny.halving_order([1.0, 1.0, 0.5, 2.0], keep=1.0) == [2, 0, 1, 3]


def test_successive_halving_trains_candidates_and_picks_the_lowest_held_out_loss(tmp_path):
    config = tiny_config(tmp_path, "fedtiny.search_rounds=1", "fedtiny.scores=[magnitude]",
                         "fedtiny.allocations=[uniform-noise,global,erk]")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    dense = (ctx.dense_bytes_up, ctx.dense_bytes_down)
    best, candidates = fedtiny.search(ctx, ctx.new_model(), config.fedtiny, METHODS.get("fedtiny")(ctx))
    stages = {c.name: c.stages for c in candidates}
    assert len(candidates) == 3 and [len(s) for s in stages.values()].count(2) == 2  # 3 -> 2 -> 1
    finalists = [c for c in candidates if len(c.stages) == 2]
    assert best is min(finalists, key=lambda c: c.stages[-1])
    assert (ctx.dense_bytes_up, ctx.dense_bytes_down) == dense  # the search is not billed to dense FedAvg
    assert ctx.fleet.traffic.up > 0 and not ctx.fleet.traffic.failures  # every node decoded every candidate


def test_successive_halving_multiplies_each_stages_rounds_by_the_growth(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "fedtiny.search_rounds=1", "fedtiny.search_growth=2", "fedtiny.scores=[magnitude]",
                         "fedtiny.allocations=[uniform-noise,global,erk,lamp]")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    trained: dict[int, list[int]] = {}
    monkeypatch.setattr(ctx, "training_round",
                        lambda method, gm, t, extra, stream, reference: trained.setdefault(id(gm), []).append(t))
    candidates = fedtiny.build_candidates(ctx, ctx.new_model(), config.fedtiny)
    assert len(candidates) == 4
    fedtiny.halving(ctx, METHODS.get("fedtiny")(ctx), ctx.new_model(), candidates, config.fedtiny)
    rounds = sorted(trained.values(), key=len)
    assert rounds == [[1], [1], [1, 2, 3], [1, 2, 3]]  # 4 -> 2 -> 1: a stage of 1 round, then one of 2


def test_client_scores_reject_a_reply_with_non_finite_or_misshapen_scores():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from shared.methods import Reply

    def reply(scores, n=5):
        content = RecordDict()
        content[p.PAYLOAD] = ConfigRecord({p.SCORE_TENSORS: codec.encode(scores)})
        content[p.METRICS] = MetricRecord({p.NUM_EXAMPLES: n})
        return Reply(1, content, 0)

    shapes = {"w": (2, 2)}
    assert replies.check_scores(reply({"w": torch.ones(2, 2)}), shapes)[1] is None
    assert "finite" in replies.check_scores(reply({"w": torch.full((2, 2), float("inf"))}), shapes)[1]
    assert "expected (2, 2)" in replies.check_scores(reply({"w": torch.ones(4)}), shapes)[1]
    assert replies.check_scores(reply({"v": torch.ones(2, 2)}), shapes)[1] is not None


def test_final_bn_installs_the_exact_pool_of_the_final_models_statistics(tmp_path):
    """After the last round, sampled clients recalibrate the final model's BN statistics on their
    held-out splits and the server installs the pool (within- plus between-client variance)."""
    config = tiny_config(tmp_path, "fedtiny.final_bn_clients=4", "fedtiny.scores=[magnitude]", "fl.rounds=1")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("fedtiny")(ctx)
    gm = method.prepare(ctx)
    method.after_round(ctx, gm, 1, training_round(ctx, method, gm, 1, method.round_config(ctx, gm, 1)))
    model = ctx.new_model()
    model.load_state_dict(gm.state)
    holdouts = every_client_data(ctx.bundle, config)
    expected = pool_stats([recalibrate(copy.deepcopy(model), batches(ctx.bundle, c.x_holdout, c.y_holdout, 32, False, 0))
                           for c in holdouts])
    for name, (mean, var, count) in expected.items():
        assert torch.allclose(gm.state[f"{name}.running_mean"], mean.float(), atol=1e-5)
        assert torch.allclose(gm.state[f"{name}.running_var"], (var * count / (count - 1)).float(), atol=1e-5)
    assert method.summary["final_bn"]["clients"] == 4 and 0 <= method.summary["final_bn"]["accuracy_before"] <= 1


def test_without_final_bn_the_averaged_statistics_stay(tmp_path):
    config = tiny_config(tmp_path, "fedtiny.scores=[magnitude]", "fl.rounds=1")
    grid = FakeGrid(config)
    ctx = run_context(config, grid, tmp_path)
    method = METHODS.get("fedtiny")(ctx)
    gm = method.prepare(ctx)
    sent = len(grid.sent)
    method.after_round(ctx, gm, 1, training_round(ctx, method, gm, 1, method.round_config(ctx, gm, 1)))
    assert all(m.metadata.message_type == p.TRAIN for m in grid.sent[sent:]) and "final_bn" not in method.summary


def trained_partitions(out, name: str, *overrides: str) -> tuple[list[list[int]], dict]:
    """The partitions each round of a tiny `name` run trained on, and its starting state."""
    out.mkdir()
    config = tiny_config(out, f"method={name}", "fl.num_clients=8", "fl.clients_per_round=3", *overrides)
    ctx = run_context(config, FakeGrid(config), out)
    method, rounds = METHODS.get(name)(ctx), []
    after, prepare, start = method.after_round, method.prepare, {}

    def record(ctx, gm, t, replies):
        rounds.append(sorted(ctx.fleet.partition_of[r.node_id] for r in replies))
        return after(ctx, gm, t, replies)

    def keep_start(ctx):
        gm = prepare(ctx)
        start.update(copy.deepcopy(gm.state))
        return gm

    method.after_round, method.prepare = record, keep_start
    run_training(ctx, method)
    return rounds, start


def test_every_method_on_one_seed_trains_each_round_on_the_same_clients(tmp_path):
    """Client draws are keyed by (seed, round): FedTiny's score and BN rounds and SNIP's score round
    before round 1 do not shift which clients later rounds train (a paired comparison of methods)."""
    trained = {name: trained_partitions(tmp_path / name, name)[0] for name in ("fedtiny", "snip", "fedavg")}
    assert len(trained["fedavg"]) == 3 and len({tuple(r) for r in trained["fedavg"]}) > 1
    assert trained["fedtiny"] == trained["snip"] == trained["fedavg"]


def test_a_sampling_seed_replays_one_seed_under_other_client_samples(tmp_path):
    """`fl.sampling_seed` changes which clients train, not the data or the starting model; set to
    the run's seed it is the run itself."""
    rounds, start = trained_partitions(tmp_path / "default", "fedavg")
    same, same_start = trained_partitions(tmp_path / "same", "fedavg", "fl.sampling_seed=0")
    other, other_start = trained_partitions(tmp_path / "other", "fedavg", "fl.sampling_seed=7")
    assert same == rounds and other != rounds
    assert all(torch.equal(start[n], other_start[n]) and torch.equal(start[n], same_start[n]) for n in start)


def test_no_two_random_streams_of_a_run_share_a_seed_sequence():
    """Every client draw and every client's local seed comes from its own (stream, key): training
    round 7's draw is not partition 7's seed in round 1, as it was with plain entropy lists."""
    keys = [(stream, a, b) for stream in Draw for a in range(12) for b in range(12)]
    states = {tuple(seed_sequence(0, stream, a, b).generate_state(4)) for stream, a, b in keys}
    assert len(states) == len(keys)
    assert (seed_sequence(0, Draw.TRAIN, 7).generate_state(4) != seed_sequence(0, Draw.CLIENT_SEEDS, 1, 7).generate_state(4)).all()
    assert (seed_sequence(0, Draw.TRAIN, 7).generate_state(4) != seed_sequence(1, Draw.TRAIN, 7).generate_state(4)).any()
