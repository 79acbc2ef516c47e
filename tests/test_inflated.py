"""One client cannot outweigh the fleet or choose what a method merges: bounded counts, finite
aggregates, trimming from three replies, robust merges of scores, top-k gradients and grows."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fake_grid import FakeGrid
from helpers import run_context, tiny_config
from server import rounds
from server.fleet import COUNT_CAP_MULTIPLE, Fleet
from server.loop import federated_metrics
from shared import codec, protocol as p
from shared.aggregate import cap_weights, clip_bn_stats, combine, robust_mean_loss, robust_scores
from shared.batchnorm import pool_stats
from shared.global_model import GlobalModel
from shared.methods import Method, Reply
from shared.methods.feddst import check_mask_changes, global_masks_from, selection_scores
from shared.pruning.prune_grow import merge_topk
from shared.pruning.topk import top_indices

COUNT = 1.7976931348623157e308  # the largest finite float: finite and integral


def reply(node: int, count: float, decoded=None) -> Reply:
    r = Reply(node, RecordDict({p.METRICS: MetricRecord({p.NUM_EXAMPLES: count})}), 0)
    r.decoded = decoded
    return r


def fleet_with_liar() -> Fleet:
    """Nine honest nodes of 50 to 58 training (10 to 18 held-out) examples, node 10 claiming 1.8e308 of each."""
    fleet = Fleet(grid=None, num_clients=10, min_replies=0.5, timeout=1.0)
    claims = {i: (i, 49 + i, 9 + i) for i in range(1, 10)}
    fleet.admit({**claims, 10: (0, int(COUNT), int(COUNT))})
    return fleet


def test_cap_weights_really_caps_the_largest_finite_count():
    capped = cap_weights([COUNT] + [57] * 9, 0.5)
    assert all(math.isfinite(w) for w in capped) and sum(capped) == pytest.approx(1.0)
    assert capped[0] == pytest.approx(0.5) and capped[1] == pytest.approx(0.5 / 9)
    assert cap_weights([COUNT, 57, 57], 0.25) == pytest.approx([1 / 3] * 3)  # below 1/n: equal
    assert cap_weights([30, 20, 10], 0.6) == pytest.approx([0.5, 1 / 3, 1 / 6])  # under the cap: unchanged


def test_a_node_claiming_a_huge_count_weighs_at_most_a_few_median_nodes():
    fleet = fleet_with_liar()
    honest = [reply(i, 49 + i) for i in range(1, 10)]
    liar = reply(10, COUNT)
    got = fleet.accepted([*honest, liar], p.TRAIN)
    assert liar in got  # within its own claim: not rejected, but bounded
    assert liar.weight == COUNT_CAP_MULTIPLE * 54 and [r.weight for r in honest] == [49 + i for i in range(1, 10)]
    assert fleet.weight_cap(10, p.EVALUATE) == COUNT_CAP_MULTIPLE * 14


def test_federated_accuracy_weighs_an_inflated_count_as_the_fleet_bounds_it():
    fleet = fleet_with_liar()
    got = fleet.accepted([reply(i, 9 + i) for i in range(1, 10)] + [reply(10, COUNT)], p.EVALUATE,
                         lambda r: ((0.0, 1.0) if r.node_id == 10 else (0.5, 0.72), None))
    accuracy = federated_metrics(got)["federated_accuracy"]
    assert 0.72 < accuracy < 0.72 + 0.28 * 0.5  # honest 0.72; the liar's 1.0 weighs as 4 median nodes at most


def test_a_candidate_loss_of_one_client_in_three_cannot_pick_the_candidate():
    honest = [[2.40, 2.30], [2.42, 2.31]]  # candidate 1 is better
    lie = [0.0, 1e30]
    counts = [50, 50, 10**9]
    losses = [robust_mean_loss([h[c] * n for h, n in zip(honest, counts)] + [lie[c] * counts[2]], counts) for c in (0, 1)]
    assert losses[1] < losses[0]


@pytest.mark.parametrize("n", [3, 10])
def test_a_count_of_1_8e308_cannot_make_the_aggregate_non_finite(n):
    states = [{"w": torch.tensor([1.0 + 0.01 * i, -2.0])} for i in range(n - 1)] + [{"w": torch.tensor([-5.0, 3.0])}]
    for aggregator in ("trimmed-mean", "mean"):
        out = combine(states, [57] * (n - 1) + [COUNT], aggregator=aggregator)["w"]
        assert torch.isfinite(out).all(), aggregator


class NonFinite(Method):
    """A method whose aggregate is non-finite (as a user's aggregator might be)."""

    def aggregate(self, ctx, gm, replies):
        return {n: v * math.nan if v.is_floating_point() else v for n, v in gm.state.items()}


def test_a_non_finite_aggregate_discards_the_round_and_keeps_the_model(tmp_path, capsys):
    config = tiny_config(tmp_path, "pruning.density=1.0")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    gm = GlobalModel(ctx.new_model().state_dict())
    before = {n: v.clone() for n, v in gm.state.items()}
    assert rounds.training_round(ctx, NonFinite(ctx), gm, 1, {}) == []
    assert all(torch.equal(before[n], gm.state[n]) for n in before)
    assert "round 1: aggregate discarded, the previous model kept (non-finite values in" in capsys.readouterr().out


def test_with_three_replies_the_default_aggregator_leaves_out_each_extreme():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.2, 2.2])}, {"w": torch.tensor([-100.0, 300.0])}]
    out = combine(states, [1, 1, 1], aggregator="trimmed-mean")["w"]
    assert out.tolist() == pytest.approx([1.0, 2.2])  # per coordinate the middle value


def test_one_client_in_ten_cannot_choose_the_positions_scores_keep():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(1000, generator=gen) ** 6
    honest = [{"w": base * (1 + 0.2 * torch.rand(1000, generator=gen))} for _ in range(9)]
    chosen = torch.arange(500, 550)
    attacker = {"w": torch.zeros(1000).index_fill(0, chosen, float(max(h["w"].max() for h in honest)))}
    top = set(top_indices(robust_scores([*honest, attacker], [50] * 10)["w"], 50).tolist())
    honest_top = set(top_indices(robust_scores(honest, [50] * 9)["w"], 50).tolist())
    assert len(top & set(chosen.tolist())) <= len(honest_top & set(chosen.tolist())) + 1


def test_one_client_in_ten_cannot_choose_which_top_k_positions_grow():
    parts = [(torch.tensor([10, 11, 12]), torch.tensor([1.0, 0.9, 0.8]) * (1 + 0.05 * c)) for c in range(9)]
    parts[0] = (torch.tensor([10, 11, 12, 13, 14]), torch.tensor([1.0, 0.9, 0.8, 0.5, 0.5]))
    parts[1] = (torch.tensor([10, 11, 12, 13, 14]), torch.tensor([1.0, 0.9, 0.8, 0.5, 0.5]))
    parts.append((torch.tensor([40, 41, 42, 43, 44]), torch.full((5,), 1.0)))  # at the honest clients' peak
    assert sorted(top_indices(merge_topk(parts, torch.Size([50])).abs(), 5).tolist()) == [10, 11, 12, 13, 14]


def test_feddst_rejects_a_nan_grown_value_at_check_reply():
    start = {"w": torch.tensor([True, True, False, False])}
    gm = GlobalModel({"w": torch.tensor([1.0, 0.5, 0.0, 0.0])}, start)
    changes = {"w": (torch.tensor([1, 2]), torch.tensor([0.0, math.nan]), (4,))}
    r = Reply(1, RecordDict({p.PAYLOAD: ConfigRecord({p.MASK_CHANGES: codec.encode_sparse(changes)})}), 0)
    r.decoded = {"w": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    assert "non-finite" in check_mask_changes(r, gm, {"w": 1})


def test_feddst_one_client_in_ten_cannot_choose_the_grown_positions():
    kept = torch.tensor([True, True, True, False, False, False, False])
    honest_mask = kept.clone()
    honest_mask[1], honest_mask[3] = False, True  # every honest client drops 1 and grows 3
    states = [torch.tensor([1.0, 0.0, 0.9, 0.1, 0.0, 0.0, 0.0]) for _ in range(9)]
    masks = [{"w": honest_mask} for _ in range(9)]
    liar_mask = kept.clone()
    liar_mask[0], liar_mask[6] = False, True  # drops 0, grows 6 at the largest global weight
    states.append(torch.tensor([0.0, 0.2, 0.9, 0.0, 0.0, 0.0, 1.0]))
    masks.append({"w": liar_mask})
    scores = selection_scores([{"w": s} for s in states], masks, [50] * 10)
    assert global_masks_from(scores, masks, {"w": 3})["w"].tolist() == [True, False, True, True, False, False, False]


def test_one_clients_inflated_bn_count_cannot_outweigh_the_pool():
    def stats(mean, count):
        return {"bn": (torch.full((2,), mean, dtype=torch.float64), torch.ones(2, dtype=torch.float64), count)}

    clients = [stats(0.0, 50 * 64), stats(0.1, 60 * 64), stats(-0.1, 40 * 64), stats(3.0, 50 * 64 * 10**6)]
    pooled = pool_stats(clip_bn_stats(clients, weights=[50, 60, 40, 50]))
    assert pooled["bn"][0].abs().max() < 1.0  # its count weighs as its 50 examples, not 10^6 times more


def test_a_node_copying_another_nodes_partition_does_not_exclude_it():
    fleet = Fleet(grid=None, num_clients=3, min_replies=0.5, timeout=1.0)
    fleet.admit({5: (0, 50, 10), 9: (0, 50, 10), 7: (1, 40, 8)})  # node 5 copies the honest node 9's partition 0
    assert fleet.nodes == [5, 9, 7] and fleet.partition_of[9] == 0
    assert fleet.accepted([reply(9, 50)], p.TRAIN) != []
