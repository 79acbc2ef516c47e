"""Adaptive BN selection statistics: exact recalibration, exact pooling, install and wire form."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from shared.batchnorm import (
    bn_stats_from_tensors,
    bn_stats_to_tensors,
    load_stats,
    pool_stats,
    recalibrate,
    restart_running_stats,
    running_stat_names,
    running_stats_for_upload,
)


@pytest.fixture
def six_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 8, 8, generator=g) * 2 + 1, torch.randint(0, 10, (8,), generator=g)) for _ in range(6)]


def test_recalibrate_returns_exact_stats_of_bn_input(tiny_model, tiny_batches):
    stats = recalibrate(tiny_model, tiny_batches)
    x = torch.cat([b[0] for b in tiny_batches])  # features.1's input is conv(x): check it directly
    with torch.no_grad():
        h = tiny_model.features[0](x).double()
    mean, var, count = stats["features.1"]
    assert count == 48 * 8 * 8
    torch.testing.assert_close(mean, h.mean(dim=(0, 2, 3)), rtol=0, atol=1e-10)
    torch.testing.assert_close(var, h.var(dim=(0, 2, 3), unbiased=False), rtol=0, atol=1e-10)
    assert set(stats) == {"features.1", "features.4"}


def test_recalibrate_installs_unbiased_running_var(tiny_model, tiny_batches):
    stats = recalibrate(tiny_model, tiny_batches)
    bn = tiny_model.features[4]
    mean, var, n = stats["features.4"]
    torch.testing.assert_close(bn.running_mean, mean.float())
    torch.testing.assert_close(bn.running_var, (var * n / (n - 1)).float())


def test_pooled_halves_equal_recalibration_on_all_data(tiny_model, six_batches):
    first = recalibrate(copy.deepcopy(tiny_model), six_batches[:2])
    second = recalibrate(copy.deepcopy(tiny_model), six_batches[2:])
    whole = recalibrate(copy.deepcopy(tiny_model), six_batches)
    pooled = pool_stats([first, second])
    for name, (mean, var, count) in whole.items():
        assert pooled[name][2] == count
        torch.testing.assert_close(pooled[name][0], mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(pooled[name][1], var, rtol=0, atol=1e-10)


def test_pooled_variance_includes_between_client_term():
    # client a: values {0, 2} -> mean 1, var 1; client b: values {4, 6, 8, 10} -> mean 7, var 5
    a = {"bn": (torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), 2)}
    b = {"bn": (torch.tensor([7.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64), 4)}
    mean, var, count = pool_stats([a, b])["bn"]
    all_values = torch.tensor([0.0, 2, 4, 6, 8, 10], dtype=torch.float64)  # mean 5, var 70/6
    assert count == 6
    torch.testing.assert_close(mean, all_values.mean().reshape(1))
    torch.testing.assert_close(var, all_values.var(unbiased=False).reshape(1))
    within_only = (2 * 1.0 + 4 * 5.0) / 6
    assert var.item() > within_only


def test_pool_stats_rejects_mismatched_layers():
    s = (torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="BN layers"):
        pool_stats([{"a": s}, {"b": s}])


def test_recalibrate_leaves_weights_unchanged(tiny_model, tiny_batches):
    before = {k: v.clone() for k, v in tiny_model.named_parameters()}
    recalibrate(tiny_model, tiny_batches)
    for name, p in tiny_model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_recalibrate_restores_previous_mode(tiny_model, tiny_batches):
    tiny_model.eval()
    recalibrate(tiny_model, tiny_batches)
    assert not any(m.training for m in tiny_model.modules())


def test_recalibrate_resets_stale_running_stats(tiny_model, tiny_batches):
    fresh = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for m in tiny_model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(100.0)
                m.running_var.fill_(1e4)
    recalibrate(tiny_model, tiny_batches)
    recalibrate(fresh, tiny_batches)
    for (name, a), b in zip(tiny_model.named_buffers(), fresh.buffers()):
        assert torch.equal(a, b), name


def test_recalibrate_works_for_batchnorm1d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x = torch.randn(10, 4)
    mean, var, count = recalibrate(model, [(x, None)])["1"]
    with torch.no_grad():
        h = model[0](x).double()
    assert count == 10
    torch.testing.assert_close(mean, h.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(var, h.var(0, unbiased=False), rtol=0, atol=1e-6)


def test_load_stats_round_trip(tiny_model, tiny_batches):
    stats = recalibrate(copy.deepcopy(tiny_model), tiny_batches)
    reference = copy.deepcopy(tiny_model)
    recalibrate(reference, tiny_batches)
    load_stats(tiny_model, stats)
    for m, r in zip(tiny_model.modules(), reference.modules()):
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.running_mean, r.running_mean)
            assert torch.equal(m.running_var, r.running_var)


def test_load_stats_rejects_unknown_or_missing_layers(tiny_model, tiny_batches):
    stats = recalibrate(copy.deepcopy(tiny_model), tiny_batches)
    with pytest.raises(ValueError, match="unknown layers \\['features.9'\\]"):
        load_stats(tiny_model, {**stats, "features.9": stats["features.1"]})
    with pytest.raises(ValueError, match="missing \\['features.4'\\]"):
        load_stats(tiny_model, {"features.1": stats["features.1"]})


def test_tensor_form_round_trip(tiny_model, tiny_batches):
    stats = recalibrate(tiny_model, tiny_batches)
    tensors = bn_stats_to_tensors(stats)
    assert set(tensors) == {f"features.{i}.{f}" for i in (1, 4) for f in ("mean", "var", "count")}
    assert tensors["features.1.count"].tolist() == [48 * 64]
    back = bn_stats_from_tensors(tensors)
    for name, (mean, var, count) in stats.items():  # float32 on the wire, float64 again after
        assert torch.equal(back[name][0], mean.float().double()) and torch.equal(back[name][1], var.float().double())
        assert back[name][0].dtype == torch.float64 and back[name][2] == count


def test_tensor_form_rejects_incomplete_layer():
    with pytest.raises(ValueError, match="lack \\['count'\\]"):
        bn_stats_from_tensors({"bn.mean": torch.zeros(2), "bn.var": torch.ones(2)})


def test_a_last_batch_of_one_example_is_counted_with_the_batch_before(tiny_model, tiny_batches):
    """A held-out split of 33 in batches of 32 ends in a batch of one: its BN count must still say 33
    examples (the server checks the count against num-examples)."""
    x, y = tiny_batches[0]
    with_single = recalibrate(copy.deepcopy(tiny_model), [(x, y), (x[:1], y[:1])])
    joined = recalibrate(copy.deepcopy(tiny_model), [(torch.cat([x, x[:1]]), None)])
    for name, (mean, var, count) in joined.items():
        assert with_single[name][2] == count
        torch.testing.assert_close(with_single[name][0], mean, rtol=0, atol=0)
        torch.testing.assert_close(with_single[name][1], var, rtol=0, atol=0)


def test_single_example_batches_join_a_neighbour_in_batchnorm1d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x = torch.randn(9, 4)
    assert recalibrate(model, [(x[:1], None), (x[1:5], None), (x[5:8], None), (x[8:], None)])["1"][2] == 9
    with pytest.raises(ValueError, match="saw no input"):
        recalibrate(model, [(x[:1], None)])


def test_restarted_running_stats_are_the_plain_average_of_the_next_batches(tiny_model, six_batches):
    bn = tiny_model.features[1]
    bn.running_mean.fill_(100.0)  # stale statistics must not leak into the new ones
    restart_running_stats(tiny_model)
    tiny_model.train()
    with torch.no_grad():
        for x, _ in six_batches:
            tiny_model(x)
        h = [tiny_model.features[0](x) for x, _ in six_batches]
    expected = torch.stack([b.mean(dim=(0, 2, 3)) for b in h]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected)
    assert int(bn.num_batches_tracked) == len(six_batches)


def test_running_stat_names_are_the_bn_buffers(tiny_model):
    names = running_stat_names(tiny_model.state_dict())
    assert set(names) == {f"features.{i}.{b}" for i in (1, 4) for b in ("running_mean", "running_var", "num_batches_tracked")}


def test_running_stats_are_uploaded_as_float16_where_they_fit(tiny_model):
    state = tiny_model.state_dict()
    stats = [n for n in running_stat_names(state) if state[n].is_floating_point()]
    state[stats[0]] = torch.full_like(state[stats[0]], 1e6)  # over float16's range: stays float32
    up = running_stats_for_upload(state)
    assert up[stats[0]].dtype == torch.float32
    assert all(up[n].dtype == torch.float16 for n in stats[1:])
    assert all(up[n] is state[n] for n in state if n not in stats)  # weights and counters untouched
