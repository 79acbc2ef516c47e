"""Allocations: exact kept counts, and each allocation's rule on fixed tensors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn.utils import prune

from shared.pruning import masks_from_scores
from shared.pruning.allocation import ALLOCATIONS, erk_raw_densities, keep_top, lamp_scores
from shared.pruning.masks import layer_densities
from shared.pruning.params import prunable_names
from shared.pruning.scores import SCORES


def magnitude_scores(model) -> dict[str, torch.Tensor]:
    return SCORES.get("magnitude")(model, prunable_names(model))


def kept(masks) -> int:
    return sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("density", [0.0, 0.013, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("name", ALLOCATIONS.names())
def test_allocation_keeps_exactly_round_density_times_total(name, density, tiny_model):
    scores = magnitude_scores(tiny_model)
    masks = ALLOCATIONS.get(name)(scores, density, seed=0)
    total = sum(s.numel() for s in scores.values())
    assert list(masks) == list(scores)
    assert all(masks[n].dtype == torch.bool and masks[n].shape == scores[n].shape for n in scores)
    assert kept(masks) == round(density * total)


@pytest.mark.parametrize("name", ALLOCATIONS.names())
def test_allocation_keeps_dense_layers_and_exact_total(name, tiny_model):
    scores = magnitude_scores(tiny_model)
    masks = ALLOCATIONS.get(name)(scores, 0.1, seed=0, keep_dense=["features.0.weight"])
    assert bool(masks["features.0.weight"].all())
    assert kept(masks) == round(0.1 * 1864)


@pytest.mark.parametrize("name", ALLOCATIONS.names())
def test_allocation_rejects_dense_layers_over_budget(name, tiny_model):
    scores = magnitude_scores(tiny_model)
    with pytest.raises(ValueError, match="keep_dense layers hold 640 weights"):
        ALLOCATIONS.get(name)(scores, 0.1, keep_dense=["classifier.weight"])


@pytest.mark.parametrize("name", ALLOCATIONS.names())
def test_allocation_keeps_highest_scores_within_each_layer(name, tiny_model):
    scores = magnitude_scores(tiny_model)
    masks = ALLOCATIONS.get(name)(scores, 0.2, seed=0)
    for n, s in scores.items():
        m = masks[n]
        if m.any() and (~m).any():
            assert s[m].min() >= s[~m].max()


def test_unknown_allocation_lists_known_names():
    with pytest.raises(ValueError, match="known: erk, global, lamp, uniform, uniform-noise"):
        ALLOCATIONS.get("random-walk")


def test_keep_top_breaks_ties_by_lower_index():
    scores = torch.tensor([1.0, 3.0, 1.0, 3.0, 1.0])
    assert keep_top(scores, 3).tolist() == [True, True, False, True, False]


@pytest.mark.parametrize("density", [0.02, 0.1, 0.5])
def test_global_magnitude_equals_torch_global_unstructured(density, tiny_model):
    ours = masks_from_scores(magnitude_scores(tiny_model), density, "global")
    model = copy.deepcopy(tiny_model)
    modules = dict(model.named_modules())
    targets = [(modules[n.rsplit(".", 1)[0]], "weight") for n in prunable_names(model)]
    total = sum(m.weight.numel() for m, _ in targets)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=total - round(density * total))
    for n, (module, _) in zip(prunable_names(model), targets):
        assert torch.equal(ours[n], module.weight_mask.bool())


def test_uniform_gives_every_layer_the_same_density_up_to_one_weight(tiny_model):
    masks = ALLOCATIONS.get("uniform")(magnitude_scores(tiny_model), 0.25)
    for m in masks.values():
        assert abs(int(m.sum()) - 0.25 * m.numel()) < 1


def test_erk_densities_follow_sum_over_product_of_dims():
    scores = {"a": torch.rand(20, 10, generator=torch.Generator().manual_seed(0)),
              "b": torch.rand(40, 30, generator=torch.Generator().manual_seed(1))}
    masks = ALLOCATIONS.get("erk")(scores, 0.1)
    # eps * (sum(shape_a) + sum(shape_b)) = round(0.1 * 1400) = 140, so eps = 140 / 100
    eps = 140 / (30 + 70)
    assert int(masks["a"].sum()) == pytest.approx(eps * 30, abs=1)
    assert int(masks["b"].sum()) == pytest.approx(eps * 70, abs=1)
    assert kept(masks) == 140


def test_erk_caps_a_layer_at_density_one_and_rebalances_the_rest(tiny_model):
    scores = magnitude_scores(tiny_model)
    raw = erk_raw_densities({n: s.shape for n, s in scores.items()})
    assert raw["features.0.weight"] == 15 / 72
    masks = ALLOCATIONS.get("erk")(scores, 0.5)
    # dim sums: features.0 1+8+3+3 = 15, features.3 8+16+3+3 = 30, classifier 64+10 = 74.
    # Uncapped eps = 932 / 119 would give features.0 density 7.83 * 15 / 72 = 1.63 > 1: it becomes
    # dense and eps is re-solved over the others: 72 + eps * (30 + 74) = 932
    eps = (932 - 72) / (30 + 74)
    densities = layer_densities(masks)
    assert densities["features.0.weight"] == 1.0
    assert densities["features.3.weight"] == pytest.approx(eps * raw["features.3.weight"], abs=1 / 1152)
    assert densities["classifier.weight"] == pytest.approx(eps * raw["classifier.weight"], abs=1 / 640)
    assert kept(masks) == 932


def test_uniform_noise_layer_densities_vary_and_total_is_exact(tiny_model):
    masks = ALLOCATIONS.get("uniform-noise")(magnitude_scores(tiny_model), 0.1, seed=0)
    densities = layer_densities(masks)
    assert max(densities.values()) - min(densities.values()) > 0.02
    for n, m in masks.items():  # 0.1 * (1 +- 0.5), rescaled by at most 2%, rounded to one weight
        assert 0.05 / 1.02 - 1 / m.numel() <= densities[n] <= 0.15 / 0.98 + 1 / m.numel()
    assert kept(masks) == round(0.1 * 1864)


def test_uniform_noise_same_seed_reproduces_and_other_seed_differs(tiny_model):
    scores = magnitude_scores(tiny_model)
    noise = ALLOCATIONS.get("uniform-noise")
    a, b, c = noise(scores, 0.1, seed=3), noise(scores, 0.1, seed=3), noise(scores, 0.1, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert layer_densities(a) != layer_densities(c)


def test_lamp_scores_match_hand_computation():
    # squares 1, 4, 9, 16 -> 1/30, 4/29, 9/25, 16/16
    got = lamp_scores(torch.tensor([3.0, 1.0, 4.0, 2.0]))
    torch.testing.assert_close(got, torch.tensor([9 / 25, 1 / 30, 1.0, 4 / 29], dtype=torch.float64))


def test_lamp_thresholds_lamp_scores_globally():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([0.1, 0.2])}
    # LAMP: a -> 1/30, 4/29, 9/25, 1;  b -> 0.01/0.05 = 0.2, 1.  Keep 4 of 6: a4, b0.2, a3, b0.1
    masks = ALLOCATIONS.get("lamp")(scores, 4 / 6)
    assert masks["a"].tolist() == [False, False, True, True]
    assert masks["b"].tolist() == [True, True]


def test_lamp_ranks_negative_infinity_last():
    assert lamp_scores(torch.tensor([-math.inf, 0.0, 2.0])).tolist() == [-math.inf, 0.0, 1.0]
