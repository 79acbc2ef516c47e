"""One client cannot crash, poison or steer a run: every reply checked, aggregation robust, attacks drilled."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from helpers import tiny_config
from server import replies
from shared.aggregate import (
    cap_weights, clip_bn_stats, clip_to_mad, combine, robust_mean_loss, robust_scores, screen_updates, weighted_average,
)
from server.fleet import Fleet, Reply
from shared import codec, protocol as p
from shared.batchnorm import bn_stats_to_tensors, pool_stats
from shared.pruning.prune_grow import merge_sparse, merge_topk
from shared.pruning.topk import top_indices
from simulations.inprocess import run_in_process


def reply(metrics: dict, payload: dict | None = None, node: int = 1) -> Reply:
    content = RecordDict({p.METRICS: MetricRecord(metrics)})
    if payload:
        content[p.PAYLOAD] = ConfigRecord(payload)
    return Reply(node, content, 0)


@pytest.mark.parametrize("value, why", [
    (0, "positive integer"), (-3, "positive integer"), (1.5, "positive integer"), (math.inf, "positive integer"),
    (math.nan, "positive integer"), (True, "not a number"), ("7", "not a number"), (None, "not a number"),
    (101, "more than the 100 examples"),
])
def test_an_example_count_is_a_positive_integer_within_what_the_node_holds(value, why):
    assert why in replies.check_count(value, 100)[1]
    assert replies.check_count(100, 100) == (100, None) and replies.check_count(7.0, None) == (7, None)


def test_a_reply_claiming_more_examples_than_its_node_holds_is_rejected_and_counted():
    fleet = Fleet(grid=None, num_clients=2, min_replies=0.5, timeout=1.0)
    fleet.examples_of = {1: (40, 10), 2: (30, 8)}
    honest, liar = reply({p.NUM_EXAMPLES: 40}, node=1), reply({p.NUM_EXAMPLES: 1e9}, node=2)
    assert fleet.accepted([honest, liar], p.TRAIN) == [honest]
    assert fleet.accepted([reply({p.NUM_EXAMPLES: 11}, node=1)], p.EVALUATE) == []  # 10 held out
    assert len(fleet.traffic.rejected) == 2 and "1000000000 is more than the 30" in fleet.traffic.rejected[0]


@pytest.mark.parametrize("metrics, why", [
    ({p.NUM_EXAMPLES: 5, p.HOLDOUT_EXAMPLES: 2}, "no 'partition-id'"),
    ({p.PARTITION: 9, p.NUM_EXAMPLES: 5, p.HOLDOUT_EXAMPLES: 2}, "not a partition of fl.num_clients=4"),
    ({p.PARTITION: 1, p.NUM_EXAMPLES: math.inf, p.HOLDOUT_EXAMPLES: 2}, "positive integer"),
    ({p.PARTITION: 1, p.NUM_EXAMPLES: 5}, "no 'holdout-examples'"),
])
def test_a_bad_hello_is_refused_with_its_reason(metrics, why):
    assert why in replies.check_hello(reply(metrics), 4)[1]
    assert replies.check_hello(reply({p.PARTITION: 1, p.NUM_EXAMPLES: 5, p.HOLDOUT_EXAMPLES: 2}), 4) == ((1, 5, 2), None)


@pytest.mark.parametrize("metrics, why", [
    ({p.LOSS: 0.3, p.ACCURACY: 1e9}, "must be in [0, 1]"), ({p.LOSS: -1.0, p.ACCURACY: 0.5}, ">= 0"),
    ({p.LOSS: math.nan, p.ACCURACY: 0.5}, ">= 0"), ({p.LOSS: 0.3}, "no 'accuracy'"),
])
def test_an_evaluation_must_be_a_loss_and_an_accuracy_in_range(metrics, why):
    assert why in replies.check_evaluate(reply({p.NUM_EXAMPLES: 4, **metrics}))[1]


def _bn_blob(mean: float = 0.0, var: float = 1.0, count: int = 8 * 9) -> bytes:
    stats = {"bn": (torch.full((3,), mean, dtype=torch.float64), torch.full((3,), var, dtype=torch.float64), count)}
    return codec.encode(bn_stats_to_tensors(stats))


LAYOUT = {"bn.mean": ((3,), torch.float32), "bn.var": ((3,), torch.float32), "bn.count": ((1,), torch.int64)}


@pytest.mark.parametrize("blobs, why", [
    ([_bn_blob(var=-1.0), _bn_blob()], "negative BN variance"),
    ([_bn_blob(mean=math.nan), _bn_blob()], "non-finite"),
    ([_bn_blob(count=7), _bn_blob()], "not a multiple of num-examples=8"),
    ([_bn_blob()], "1 BN statistics for 2 candidates"),
    ([b"garbage", _bn_blob()], "undecodable"),
])
def test_abns_statistics_are_finite_with_non_negative_variances_and_consistent_counts(blobs, why):
    assert why in replies.check_bn(reply({p.NUM_EXAMPLES: 8}, {p.BN_STATS: blobs}), 2, LAYOUT)[1]
    assert replies.check_bn(reply({p.NUM_EXAMPLES: 8}, {p.BN_STATS: [_bn_blob(), _bn_blob()]}), 2, LAYOUT)[1] is None


@pytest.mark.parametrize("sums, n, why", [
    ([1.0], 8, "1 loss sums for 2 candidates"), ([1.0, -1e30], 8, ">= 0"), ([1.0, math.nan], 8, ">= 0"),
    ([1.0, 2.0], 9, "differs from the 8"),
])
def test_candidate_losses_are_one_finite_non_negative_sum_per_candidate(sums, n, why):
    assert why in replies.check_loss_sums(reply({p.NUM_EXAMPLES: n, p.LOSS_SUMS: sums}), 2, 8)[1]


def test_mean_aggregation_is_fedavg_and_robust_ones_ignore_one_outlier():
    states = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([1e30, 0.0])}]
    assert torch.equal(combine(states[:2], [1, 3])["w"], weighted_average(states[:2], [1, 3])["w"])
    assert combine(states[:2], [1, 3])["w"].tolist() == [1.75, 0.0]
    assert combine(states, [1, 1, 1], aggregator="median")["w"].tolist() == [2.0, 0.0]
    trimmed = combine(states + [{"w": torch.tensor([3.0, 0.0])}], [1] * 4, aggregator="trimmed-mean", trim_fraction=0.25)
    assert trimmed["w"].tolist() == [2.5, 0.0]  # 1 and 1e30 dropped


def test_adaptive_bounds_reject_a_far_outlier_clip_a_near_one_and_leave_honest_updates_alone():
    ref = {"w": torch.zeros(4)}
    honest = [{"w": torch.full((4,), v)} for v in (1.0, 1.2, 0.9)]  # distances 2, 2.4, 1.8
    screened, reasons = screen_updates(ref, [*honest, {"w": torch.full((4,), 5.0)}, {"w": torch.full((4,), 1e30)}],
                                       clip_multiple=3.0, reject_multiple=100.0)
    assert all(torch.equal(a["w"], b["w"]) for a, b in zip(screened, honest)) and reasons[:4] == [None] * 4
    assert torch.linalg.vector_norm(screened[3]["w"]).item() == pytest.approx(3 * 2.4, rel=1e-6)  # 3 x median 2.4
    assert screened[4] is None and "x the round's median (fl.reject_multiple=100)" in reasons[4]


def test_no_client_weighs_more_than_the_max_share():
    capped = cap_weights([10, 10, 10, 1e9], 0.4)
    assert max(capped) / sum(capped) == pytest.approx(0.4)
    assert cap_weights([10, 20], 0.0) == pytest.approx([1 / 3, 2 / 3])


def test_one_clients_huge_top_k_gradients_do_not_decide_growth():
    honest_positions = torch.tensor([10, 11, 12])
    parts = [(honest_positions, torch.tensor([1.0, 0.8, 0.6]) * (1 + 0.1 * c)) for c in range(9)]
    parts.append((torch.tensor([0, 1, 2]), torch.full((3,), 3e38)))  # the attacker's chosen positions
    assert sorted(top_indices(merge_topk(parts, torch.Size([20])).abs(), 3).tolist()) == [10, 11, 12]
    assert sorted(top_indices(merge_sparse(parts, (20,), len(parts)).abs(), 3).tolist()) == [0, 1, 2]  # summed: taken


def test_one_clients_huge_scores_do_not_decide_the_mask():
    honest = [{"w": torch.tensor([3.0, 2.0, 1.0, 0.0]) * (1 + 0.1 * c)} for c in range(4)]
    attacker = {"w": torch.tensor([0.0, 0.0, 0.0, 1e30])}
    averaged = robust_scores([*honest, attacker], [10] * 5)["w"]
    assert top_indices(averaged, 2).tolist() == [0, 1]


def test_below_three_clients_there_is_no_majority_so_nothing_is_clipped():
    honest, other = {"w": torch.tensor([3.0, 2.0, 1.0, 0.0])}, {"w": torch.tensor([0.0, 0.0, 0.0, 9.0])}
    assert robust_scores([honest, other], [10, 10])["w"].tolist() == [1.5, 1.0, 0.5, 4.5]
    parts = [(torch.tensor([0]), torch.tensor([1.0])), (torch.tensor([1]), torch.tensor([9.0]))]
    assert merge_topk(parts, torch.Size([2])).tolist() == [0.5, 4.5]
    stats = [{"bn": (torch.full((2,), m, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 100)} for m in (0.0, 1e3)]
    assert clip_bn_stats(stats) == stats and clip_to_mad([2.3, 0.4]) == [2.3, 0.4]


def test_one_clients_bn_statistics_cannot_move_the_pooled_ones_far():
    def stats(mean):
        return {"bn": (torch.full((2,), mean, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 100)}

    pooled = pool_stats(clip_bn_stats([stats(0.0), stats(0.1), stats(-0.1), stats(1e30)]))
    assert pooled["bn"][0].abs().max() < 2.0 and torch.isfinite(pooled["bn"][1]).all()


def test_one_clients_loss_cannot_pick_or_sink_a_candidate():
    honest = [2.30, 2.31, 2.29, 2.32, 2.28, 2.30, 2.31, 2.29, 2.30]
    assert clip_to_mad(honest) == honest
    counts = [10] * 10
    for lie in (0.0, 1e30):  # at most the spread of the honest clients' losses
        assert 2.29 <= robust_mean_loss([h * 10 for h in honest] + [lie * 10], counts) <= 2.31


@pytest.mark.parametrize("attack", ["scale", "huge", "bn-variance", "topk", "evaluate", "search", "flip", "flip-reject"])
def test_a_run_with_an_attacker_completes_with_a_finite_model(tmp_path, attack):
    config = tiny_config(tmp_path, "fl.rounds=2", "fl.clients_per_round=4", "fedtiny.search_clients=4",  # all sampled
                         f"simulation.attack={attack}", "simulation.attack_fraction=0.25")
    metrics, _ = run_in_process(config, tmp_path)
    state, _ = codec.load(tmp_path / "model.ftc")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert 0.0 <= metrics["summary"]["federated_accuracy"] <= 1.0
    if attack in ("scale", "huge", "bn-variance", "evaluate"):  # rejected outright; topk and search are clipped
        assert metrics["summary"]["rejected_updates"] > 0
