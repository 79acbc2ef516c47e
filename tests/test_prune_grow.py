"""Prune/grow, sparse top-k gradients and the progressive-pruning schedule."""

from __future__ import annotations

import math

import pytest
import torch

from shared.pruning.prune_grow import RIGL, merge_sparse, topk_pruned
from shared.pruning.schedule import adjust_counts, block_for_adjustment, cosine_fraction, is_adjust_round

#                      0     1     2     3     4     5     6     7
WEIGHT = torch.tensor([0.5, -0.1, 0.0, 2.0, -0.3, 0.0, 0.0, 1.0])
MASK = torch.tensor([True, True, False, True, True, False, False, True])
GRAD = torch.tensor([9.0, 8.0, -0.2, 7.0, 6.0, 0.9, -0.5, 5.0])  # large on active positions on purpose


def swap(k: int):
    masks, weights = RIGL.update({"w": WEIGHT}, {"w": MASK}, {"w": GRAD}, {"w": k})
    return masks["w"], weights["w"]


def test_prune_grow_keeps_density():
    mask, _ = swap(2)
    assert int(mask.sum()) == int(MASK.sum())


def test_prune_grow_drops_smallest_active_weights():
    mask, weight = swap(2)
    assert mask[[1, 4]].tolist() == [False, False]  # |w| 0.1 and 0.3 are the smallest active
    assert weight[[1, 4]].tolist() == [0.0, 0.0]
    assert mask[[0, 3, 7]].all()


def test_prune_grow_grows_largest_gradient_pruned_positions():
    mask, _ = swap(2)
    assert mask[[5, 6]].tolist() == [True, True]  # |g| 0.9 and 0.5 among pruned positions 2, 5, 6
    assert not mask[2]


def test_prune_grow_starts_grown_weights_at_zero():
    masked_weight = WEIGHT.clone()
    masked_weight[5] = 0.7  # a stale value at a pruned position must not come back
    masks, weights = RIGL.update({"w": masked_weight}, {"w": MASK}, {"w": GRAD}, {"w": 2})
    assert weights["w"][[5, 6]].tolist() == [0.0, 0.0]
    assert torch.equal(weights["w"][[0, 3, 7]], WEIGHT[[0, 3, 7]])


def test_prune_grow_does_not_regrow_a_just_dropped_weight():
    # k = 4 but only 3 positions were pruned: 3 swaps; the dropped ones (large grads) stay dropped
    mask, _ = swap(4)
    assert mask.tolist() == [False, False, True, True, False, True, True, True]
    assert int(mask.sum()) == int(MASK.sum())


def test_prune_grow_leaves_inputs_and_other_layers_unchanged():
    weights = {"w": WEIGHT.clone(), "other": torch.ones(3)}
    masks = {"w": MASK.clone(), "other": torch.ones(3, dtype=torch.bool)}
    new_masks, new_weights = RIGL.update(weights, masks, {"w": GRAD}, {"w": 2})
    assert torch.equal(weights["w"], WEIGHT) and torch.equal(masks["w"], MASK)
    assert torch.equal(new_masks["other"], masks["other"]) and new_masks["other"] is not masks["other"]
    assert torch.equal(new_weights["other"], weights["other"])


def test_prune_grow_with_zero_count_changes_nothing():
    mask, weight = swap(0)
    assert torch.equal(mask, MASK)
    assert torch.equal(weight, WEIGHT * MASK)


def test_topk_pruned_ignores_active_positions():
    index, values = topk_pruned(GRAD, MASK, 2)
    assert index.tolist() == [5, 6]
    assert torch.equal(values, GRAD[[5, 6]])
    assert index.dtype == torch.long


def test_topk_pruned_returns_fewer_when_few_are_pruned():
    index, _ = topk_pruned(GRAD, MASK, 10)
    assert sorted(index.tolist()) == [2, 5, 6]


def test_merge_sparse_sums_union_and_divides_by_clients():
    parts = [(torch.tensor([0, 3]), torch.tensor([1.0, 2.0])), (torch.tensor([3, 5]), torch.tensor([4.0, -3.0]))]
    merged = merge_sparse(parts, (2, 3), num_clients=4)
    assert merged.tolist() == [[0.25, 0.0, 0.0], [1.5, 0.0, -0.75]]


def test_merge_sparse_rejects_out_of_range_indices():
    with pytest.raises(ValueError, match="out of range"):
        merge_sparse([(torch.tensor([6]), torch.tensor([1.0]))], (2, 3), num_clients=1)


def test_cosine_fraction_at_start_middle_end_and_after():
    assert cosine_fraction(0.2, 0, 60) == pytest.approx(0.2)
    assert cosine_fraction(0.2, 30, 60) == pytest.approx(0.1)
    assert cosine_fraction(0.2, 60, 60) == pytest.approx(0.0, abs=1e-15)
    assert cosine_fraction(0.2, 61, 60) == 0.0


def test_adjust_counts_is_ceil_of_fraction_times_nonzeros():
    masks = {"a": torch.tensor([True] * 30 + [False] * 5), "b": torch.tensor([True, True, True, False])}
    assert adjust_counts(masks, ["a", "b"], 0.1) == {"a": 3, "b": math.ceil(0.3)}


def test_is_adjust_round_every_interval_up_to_t_end():
    assert [t for t in range(0, 25) if is_adjust_round(t, 5, 18)] == [5, 10, 15]


def test_block_order_is_output_first_and_cycles():
    blocks = [["conv1"], ["conv2"], ["fc"]]
    assert [block_for_adjustment(blocks, s) for s in range(5)] == [["fc"], ["conv2"], ["conv1"], ["fc"], ["conv2"]]
