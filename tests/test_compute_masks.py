"""compute_masks: every score and allocation at exact density on the tiny model."""

from __future__ import annotations

import copy

import textwrap

import pytest
import torch

from shared.pruning import ALLOCATIONS, SCORES, average_scores, compute_masks, masks_from_scores, prunable_names
from shared.pruning.masks import density as mask_density

TOTAL = 72 + 1152 + 640


def kept(masks) -> int:
    return sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("allocation", ALLOCATIONS.names())
@pytest.mark.parametrize("score", SCORES.names())
def test_every_score_and_allocation_gives_exact_density(score, allocation, tiny_model, tiny_batches):
    masks = compute_masks(tiny_model, 0.05, score=score, allocation=allocation, batches=tiny_batches, seed=0)
    assert list(masks) == prunable_names(tiny_model)
    assert all(m.dtype == torch.bool for m in masks.values())
    assert kept(masks) == round(0.05 * TOTAL)
    assert abs(mask_density(masks) - 0.05) <= 1 / TOTAL


@pytest.mark.parametrize("score", SCORES.names())
def test_compute_masks_leaves_model_untouched(score, tiny_model, tiny_batches):
    before = copy.deepcopy(tiny_model.state_dict())
    compute_masks(tiny_model, 0.1, score=score, batches=tiny_batches)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(p.grad is None for p in tiny_model.parameters())


def test_compute_masks_keeps_dense_layers(tiny_model):
    masks = compute_masks(tiny_model, 0.1, allocation="erk", keep_dense=["features.0.weight"])
    assert bool(masks["features.0.weight"].all())
    assert kept(masks) == round(0.1 * TOTAL)


def test_unknown_score_name_lists_known_names(tiny_model):
    with pytest.raises(ValueError, match="Unknown score .fisher.; known: grad, grasp, magnitude"):
        compute_masks(tiny_model, 0.1, score="fisher")


def test_unknown_allocation_name_lists_known_names(tiny_model):
    with pytest.raises(ValueError, match="Unknown allocation 'flat'; known: erk, global"):
        compute_masks(tiny_model, 0.1, allocation="flat")


def test_iterative_synflow_in_one_step_equals_one_shot_scores(tiny_model, tiny_batches):
    names = prunable_names(tiny_model)
    one_shot = masks_from_scores(SCORES.get("synflow")(tiny_model, names, batches=tiny_batches), 0.1, "global")
    masks = compute_masks(tiny_model, 0.1, score="synflow", batches=tiny_batches, synflow_iterations=1)
    assert all(torch.equal(masks[n], one_shot[n]) for n in names)


def test_iterative_synflow_differs_from_one_shot_at_low_density(tiny_model, tiny_batches):
    once = compute_masks(tiny_model, 0.02, score="synflow", batches=tiny_batches, synflow_iterations=1)
    iterated = compute_masks(tiny_model, 0.02, score="synflow", batches=tiny_batches)
    assert any(not torch.equal(once[n], iterated[n]) for n in once)


def test_server_masks_from_averaged_client_scores(tiny_model, tiny_batches):
    names = prunable_names(tiny_model)
    snip = SCORES.get("snip")
    clients = [snip(tiny_model, names, batches=[b]) for b in tiny_batches]
    masks = masks_from_scores(average_scores(clients, weights=[16, 16, 16]), 0.1, "lamp")
    assert kept(masks) == round(0.1 * TOTAL)


def _user_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_users_score_and_allocation_plug_in_by_name_from_a_trusted_package(tiny_model, tmp_path, monkeypatch):
    _user_module(tmp_path, monkeypatch, "user_prune_mod", """
        import torch
        from shared.pruning.allocation import ALLOCATIONS

        def neg_magnitude(model, names, batches=None, seed=0):
            params = dict(model.named_parameters())
            return {n: -params[n].detach().abs() for n in names}

        def global_twice(scores, density, seed=0, keep_dense=()):
            return ALLOCATIONS.get("global")(scores, density, seed=seed, keep_dense=keep_dense)
    """)
    masks = compute_masks(tiny_model, 0.2, "user_prune_mod:neg_magnitude", "user_prune_mod:global_twice",
                          trusted=["user_prune_mod"])
    smallest = compute_masks(tiny_model, 0.2, "magnitude", "global")
    assert all(not (masks[n] & smallest[n]).any() for n in masks)  # the smallest weights, not the largest
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * sum(m.numel() for m in masks.values()))


def test_an_untrusted_score_is_refused_before_anything_is_imported(tiny_model, tmp_path, monkeypatch):
    _user_module(tmp_path, monkeypatch, "user_boom_mod", "raise SystemExit('imported!')\n")
    with pytest.raises(ValueError, match="not trusted"):
        compute_masks(tiny_model, 0.2, "user_boom_mod:score")
