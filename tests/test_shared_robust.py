"""Merging clients' numbers: bounded counts, capped shares, trimmed means for few replies, rank merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.robust import MAX_COUNT, bounded_counts, rank_merge, trimmed_mean, weight_shares


def test_a_claimed_count_is_bounded_by_the_partition_in_simulation():
    assert bounded_counts([50, 10**9, 1.7976931348623157e308], known=[60, 40, 40]).tolist() == [50, 40, 40]


def test_a_claimed_count_is_bounded_by_the_fleet_median_in_deployment():
    fleet = [30, 40, 50, 60, 10**9]
    assert bounded_counts([45, 10**9, 1.7976931348623157e308], fleet=fleet).tolist() == [45, 200, 200]


@pytest.mark.parametrize("bad", [-1, 2.5, float("nan"), float("inf"), "7", None, True, [3]])
def test_a_count_that_is_not_a_non_negative_integer_weighs_nothing(bad):
    assert bounded_counts([bad, 5]).tolist() == [0, 5]


def test_counts_beyond_float64_integers_are_clamped():
    assert bounded_counts([10**400]).tolist() == [MAX_COUNT]


@pytest.mark.parametrize("counts, cap", [
    ([1.7976931348623157e308, 1, 1, 1], 0.5),
    ([1.7976931348623157e308] * 10, 0.25),
    ([10**9, 30, 40, 50, 60, 70, 80, 90, 100, 110], 0.25),
    ([0, 0, 0], 0.25),
    ([5, 0, 0, 0], 0.25),
])
def test_shares_are_capped_finite_and_sum_to_one(counts, cap):
    shares = weight_shares(counts, cap)
    assert np.isfinite(shares).all() and abs(shares.sum() - 1) < 1e-12
    assert shares.max() <= max(cap, 1 / len(counts)) + 1e-12


def test_shares_below_the_cap_stay_proportional():
    shares = weight_shares([10, 20, 30, 40], 0.5)
    assert np.allclose(shares, [0.1, 0.2, 0.3, 0.4])
    capped = weight_shares([10, 10, 10, 70], 0.4)
    assert np.allclose(capped, [0.2, 0.2, 0.2, 0.4])


@pytest.mark.parametrize("k", range(3, 10))
@pytest.mark.parametrize("attack", [-1.0, 100.0, 1e30])
def test_one_reply_in_three_to_nine_cannot_move_the_trimmed_mean_past_the_honest_range(k, attack):
    g = torch.Generator().manual_seed(k)
    honest = torch.randn(k - 1, 50, generator=g) * 0.1 + 1.0
    replies = torch.cat([honest, honest[:1] * attack])
    merged = trimmed_mean(replies, weights=[1] * (k - 1) + [10**9])
    assert torch.isfinite(merged).all()
    assert (merged >= honest.min(dim=0).values - 1e-6).all() and (merged <= honest.max(dim=0).values + 1e-6).all()


def test_the_trimmed_mean_of_extreme_finite_replies_stays_finite():
    big = torch.finfo(torch.float32).max
    replies = torch.tensor([[big, -big], [big, big], [big, -big], [-big, big]])
    assert torch.isfinite(trimmed_mean(replies, weights=[1.7976931348623157e308, 1, 1, 1])).all()
    with pytest.raises(ValueError, match="non-finite"):
        trimmed_mean(torch.tensor([[1.0], [float("nan")], [2.0]]))


def test_two_replies_are_averaged_with_their_weights():
    assert torch.allclose(trimmed_mean(torch.tensor([[0.0], [4.0]]), weights=[1, 3]), torch.tensor([3.0]))


def test_one_client_in_ten_cannot_choose_the_top_positions_of_a_rank_merge():
    g = torch.Generator().manual_seed(0)
    honest = torch.rand(9, 100, generator=g) * 0.1
    honest[:, :5] += 1.0  # every honest client ranks positions 0-4 highest
    attacker = torch.zeros(1, 100)
    attacker[0, 50:55] = 1e30  # ... the attacker positions 50-54, with huge magnitudes
    merged = rank_merge(torch.cat([honest, attacker]))
    assert set(merged.topk(5).indices.tolist()) == {0, 1, 2, 3, 4}
    nan_scores = torch.cat([honest, torch.full((1, 100), float("nan"))])
    assert torch.isfinite(rank_merge(nan_scores)).all()
