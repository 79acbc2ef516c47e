"""Local masked training, top-k pruned gradients and evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.pruning.masks import apply_masks
from shared.pruning.scores import SCORES
from shared.training import (
    LR_SCHEDULES,
    EvalResult,
    TrainResult,
    MaskedSGD,
    evaluate,
    local_scores,
    set_seed,
    train_masked,
    warmup,
)

PRUNABLE = ("features.0.weight", "features.3.weight", "classifier.weight")


@pytest.fixture
def masks(tiny_model) -> dict[str, torch.Tensor]:
    """About half of each prunable weight kept, drawn with a fixed generator."""
    g = torch.Generator().manual_seed(7)
    params = dict(tiny_model.named_parameters())
    return {n: torch.rand(params[n].shape, generator=g) < 0.5 for n in PRUNABLE}


@pytest.fixture
def learnable() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """32 fixed samples whose label is the brightest quadrant of the image (4 classes), in 4 batches."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 1, 8, 8, generator=g)
    y = torch.stack([q.sum(dim=(1, 2, 3)) for q in (x[..., :4, :4], x[..., :4, 4:], x[..., 4:, :4], x[..., 4:, 4:])], 1)
    y = y.argmax(1)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]


def test_pruned_weights_stay_exactly_zero(tiny_model, masks, tiny_batches):
    train_masked(tiny_model, masks, lambda e: tiny_batches, epochs=2, lr=0.1, weight_decay=1e-2)
    params = dict(tiny_model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name


def test_masked_weights_keep_momentum_for_kept_positions_only(tiny_model, masks, tiny_batches):
    optimizer = MaskedSGD(tiny_model, masks, lr=0.1, momentum=0.9, weight_decay=0.0)
    x, y = tiny_batches[0]
    F.cross_entropy(tiny_model(x), y).backward()
    optimizer.step()
    sizes = [int(buf.numel()) for buf in optimizer.buffers]
    assert sizes == [int(m.sum()) for m in masks.values()]


def test_masked_sgd_matches_torch_sgd_on_masked_gradients(tiny_model, masks, tiny_batches):
    """The reference: torch SGD with gradients and weights masked around every step."""
    reference = copy.deepcopy(tiny_model)
    apply_masks(reference, masks)
    params = dict(reference.named_parameters())
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(2):
        for x, y in tiny_batches:
            sgd.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            for name, mask in masks.items():
                params[name].grad.mul_(mask)
                params[name].grad.add_(1e-2 * params[name].detach() * ~mask)  # cancel decay at pruned zeros
            sgd.step()
    train_masked(tiny_model, masks, lambda e: tiny_batches, epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-2)
    for (name, a), b in zip(tiny_model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_active_weights_change(tiny_model, masks, tiny_batches):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    train_masked(tiny_model, masks, lambda e: tiny_batches, epochs=1, lr=0.1)
    params = dict(tiny_model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][mask] != before[name][mask]), name


def test_dense_training_changes_every_prunable_weight(tiny_model, tiny_batches):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    train_masked(tiny_model, None, lambda e: tiny_batches, epochs=1, lr=0.1)
    params = dict(tiny_model.named_parameters())
    for name in PRUNABLE:
        assert torch.all(params[name] != before[name]), name


def test_loss_decreases_on_a_learnable_problem(tiny_model, masks, learnable):
    first = train_masked(tiny_model, masks, lambda e: learnable, epochs=1, lr=0.05)
    train_masked(tiny_model, masks, lambda e: learnable, epochs=30, lr=0.05)
    last = train_masked(tiny_model, masks, lambda e: learnable, epochs=1, lr=0.05)
    assert last.loss < 0.5 * first.loss


def test_result_counts_examples_of_one_epoch(tiny_model, tiny_batches):
    result = train_masked(tiny_model, None, lambda e: tiny_batches, epochs=3, lr=0.01)
    assert isinstance(result, TrainResult)
    assert result.num_examples == 48
    assert result.topk == {}


def _hand_accumulated_grad(model, masks, batches, name, lr):
    """Plain masked SGD (no momentum) over one epoch, summing `name`'s gradient at pruned positions."""
    params = dict(model.named_parameters())
    apply_masks(model, masks)
    acc = torch.zeros_like(params[name])
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            acc += params[name].grad * ~masks[name]
            for n, p in params.items():
                p -= lr * p.grad * (masks[n] if n in masks else 1)
    return acc


def test_grad_layers_returns_topk_of_last_epoch_gradient_at_pruned_positions(tiny_model, masks, tiny_batches):
    name, k = "features.3.weight", 5
    acc = _hand_accumulated_grad(copy.deepcopy(tiny_model), masks, tiny_batches, name, lr=0.1)
    result = train_masked(
        tiny_model, masks, lambda e: tiny_batches, epochs=1, lr=0.1, momentum=0.0, grad_layers={name: k}
    )
    assert set(result.topk) == {name}
    idx, values = result.topk[name]
    assert idx.numel() == k and idx.unique().numel() == k
    assert not masks[name].flatten()[idx].any()
    expected = torch.topk(acc.flatten().abs().masked_fill(masks[name].flatten(), -1.0), k).indices
    assert sorted(idx.tolist()) == sorted(expected.tolist())
    torch.testing.assert_close(values, acc.flatten()[idx])


def test_grad_layers_sums_only_the_last_epoch(tiny_model, masks, tiny_batches):
    # with lr = 0 every epoch sees the same gradients: summing two epochs would double the values
    name = "classifier.weight"
    acc = _hand_accumulated_grad(copy.deepcopy(tiny_model), masks, tiny_batches, name, lr=0.0)
    result = train_masked(tiny_model, masks, lambda e: tiny_batches, epochs=2, lr=0.0, grad_layers={name: 3})
    idx, values = result.topk[name]
    torch.testing.assert_close(values, acc.flatten()[idx])


def test_grad_layers_rejects_unmasked_parameter(tiny_model, masks, tiny_batches):
    with pytest.raises(ValueError, match="'classifier.bias', which has no mask"):
        train_masked(tiny_model, masks, lambda e: tiny_batches, epochs=1, lr=0.1, grad_layers={"classifier.bias": 1})


def test_same_seed_gives_same_weights(tiny_model, masks, tiny_batches):
    data = torch.cat([b[0] for b in tiny_batches]), torch.cat([b[1] for b in tiny_batches])

    def shuffled(_epoch):
        order = torch.randperm(48)
        return [(data[0][order[i : i + 16]], data[1][order[i : i + 16]]) for i in range(0, 48, 16)]

    runs = []
    for seed in (5, 5, 6):
        model = copy.deepcopy(tiny_model)
        set_seed(seed)
        train_masked(model, masks, shuffled, epochs=2, lr=0.1)
        runs.append(model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    assert not torch.equal(runs[0]["classifier.weight"], runs[2]["classifier.weight"])


def test_warmup_is_dense_training(tiny_model, tiny_batches):
    a, b = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    warmup(a, lambda e: tiny_batches, epochs=2, lr=0.1)
    train_masked(b, None, lambda e: tiny_batches, epochs=2, lr=0.1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_evaluate_sums_loss_and_counts_correct():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [5.0, 1.0]])
    y = torch.tensor([0, 1, 1, 0])  # predictions 0, 1, 0, 0: three correct
    result = evaluate(model, [(x[:2], y[:2]), (x[2:], y[2:])])
    expected_loss = sum(math.log1p(math.exp(-d)) for d in (2.0, 3.0, -1.0, 4.0))  # CE of 2 logits
    assert (result.correct, result.count) == (3, 4)
    assert result.loss_sum == pytest.approx(expected_loss, rel=1e-6)
    assert result.loss == pytest.approx(expected_loss / 4, rel=1e-6)
    assert result.accuracy == 0.75


def test_evaluate_uses_eval_mode_and_restores_train_mode(tiny_model, tiny_batches):
    tiny_model.train()
    with torch.no_grad():
        tiny_model.features[1].running_mean.fill_(5.0)  # only eval mode reads running statistics
    x, y = tiny_batches[0]
    tiny_model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(tiny_model(x), y, reduction="sum").item()
    tiny_model.train()
    result = evaluate(tiny_model, [(x, y)])
    assert result.loss_sum == pytest.approx(expected, rel=1e-6)
    assert tiny_model.training


def test_eval_result_without_samples_raises():
    with pytest.raises(ValueError, match="no samples"):
        _ = EvalResult(loss_sum=0.0, correct=0, count=0).loss


@pytest.mark.parametrize("score", SCORES.names())
def test_local_scores_match_the_registered_score_on_prunable_weights(tiny_model, tiny_batches, score):
    scores = local_scores(tiny_model, score, tiny_batches, seed=2)
    expected = SCORES.get(score)(copy.deepcopy(tiny_model), list(PRUNABLE), batches=tiny_batches, seed=2)
    assert list(scores) == list(PRUNABLE)
    for name in PRUNABLE:
        torch.testing.assert_close(scores[name], expected[name], rtol=0, atol=0)


def test_local_scores_unknown_name_lists_known_scores(tiny_model, tiny_batches):
    with pytest.raises(ValueError, match="Unknown score 'nope'; known: .*magnitude"):
        local_scores(tiny_model, "nope", tiny_batches, seed=0)


def test_cosine_lr_starts_at_lr_decays_every_round_and_stays_positive():
    lrs = [LR_SCHEDULES.get("cosine")(0.05, t, 40) for t in range(1, 41)]
    assert lrs[0] == 0.05 and all(a > b for a, b in zip(lrs, lrs[1:])) and 0 < lrs[-1] < 0.001
    assert LR_SCHEDULES.get("constant")(0.05, 40, 40) == 0.05


def test_the_training_message_carries_the_scheduled_lr(tmp_path):
    from fake_grid import FakeGrid
    from helpers import run_context, tiny_config
    from shared.global_model import GlobalModel
    from server.rounds import train_message

    config = tiny_config(tmp_path, "fl.rounds=10", "fl.lr=0.1")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    gm = GlobalModel(ctx.new_model().state_dict())
    node = next(iter(ctx.fleet.partition_of))
    lrs = [float(train_message(ctx, gm, node, t, {}, set())["config"]["lr"]) for t in (1, 10)]
    assert lrs[0] == 0.1 and lrs[1] == LR_SCHEDULES.get("cosine")(0.1, 10, 10)
