"""The 2024-2025 methods' mechanisms on small fixed tensors (shared.sparse_training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.pruning.prune_grow import topk_pruned
from shared.sparse_training.activations import kept_count, prune_activations, prune_input
from shared.sparse_training.bae import about_to_prune, extrude
from shared.sparse_training.powerprop import powerpropagate
from shared.sparse_training.thompson import active_reward, inactive_reward, observe, sample_mask, top_active


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def _grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


X, Y = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3, 0])


def test_powerprop_gives_a_zero_weight_zero_gradient_and_keeps_it_zero_under_sgd():
    model = _net()
    with torch.no_grad():
        model[3].weight[0, :10] = 0.0
    with powerpropagate(model, ["0.weight", "3.weight"], beta=1.25):
        v = model[3].parametrizations.weight.original
        assert torch.all(v[0, :10] == 0)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            assert torch.all(v.grad[0, :10] == 0) and v.grad[0, 10:].abs().sum() > 0
            opt.step()
    assert isinstance(model[3].weight, nn.Parameter) and torch.all(model[3].weight[0, :10] == 0)
    assert set(dict(model.named_parameters())) == set(dict(_net().named_parameters()))


def test_powerprop_maps_w_to_sign_v_abs_v_to_the_beta():
    model = _net()
    w = model[3].weight.detach().clone()
    with powerpropagate(model, ["3.weight"], beta=2.0):
        v = model[3].parametrizations.weight.original.detach()
        assert torch.allclose(v, torch.sign(w) * w.abs().sqrt())
        assert torch.allclose(model[3].weight, w, atol=1e-7)
    assert torch.allclose(model[3].weight, w, atol=1e-7)


def test_powerprop_with_beta_one_is_plain_training():
    plain, power = _net(), _net()
    g_plain = _grads(plain, X, Y)
    with powerpropagate(power, ["0.weight", "3.weight"], beta=1.0):
        power.zero_grad()
        F.cross_entropy(power(X), Y).backward()
        g_power = {"0.weight": power[0].parametrizations.weight.original.grad, "3.weight": power[3].parametrizations.weight.original.grad}
    for n in g_power:
        assert torch.equal(g_power[n], g_plain[n])


def test_activation_pruning_keeps_the_layers_density_of_its_input():
    x = torch.arange(1.0, 21.0).reshape(4, 5) * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    index, values = prune_input(x, 0.25)
    assert index.dtype == torch.int32 and len(index) == kept_count(20, 0.25) == 5
    assert sorted(values.abs().tolist()) == [16.0, 17.0, 18.0, 19.0, 20.0]
    assert len(prune_input(x, 0.01)[0]) == 1  # ceil, never 0 of a nonempty input


def test_activation_pruning_touches_the_weight_gradient_only():
    dense, pruned = _net(), _net()
    x = X.clone().requires_grad_(True)
    xs = X.clone().requires_grad_(True)
    F.cross_entropy(dense(x), Y).backward()
    with prune_activations(pruned, {"0": 0.3, "3": 0.2}):
        out = pruned(xs)
        assert torch.equal(out, dense(X))  # the forward pass is exact
        F.cross_entropy(out, Y).backward()
    assert torch.allclose(xs.grad, x.grad, atol=1e-6)  # the input gradient is exact
    assert torch.allclose(pruned[0].bias.grad, dense[0].bias.grad, atol=1e-6)
    # the conv weight gradient is the one of the input pruned to its top 30% |x|
    kept = torch.zeros(X.numel())
    index, values = prune_input(X, 0.3)
    kept[index.long()] = values
    expected = torch.nn.grad.conv2d_weight(kept.reshape(X.shape), pruned[0].weight.shape, _conv_out_grad(), padding=1)
    assert torch.allclose(pruned[0].weight.grad, expected, atol=1e-5)
    assert not torch.allclose(pruned[0].weight.grad, dense[0].weight.grad, atol=1e-4)
    assert "forward" not in vars(pruned[0])  # the module's own forward is back


def test_activation_pruning_of_a_linear_layer_uses_the_pruned_input_for_its_weight_gradient():
    layer = nn.Linear(4, 2)
    x = torch.tensor([[1.0, -6.0, 2.0, 0.5], [3.0, 0.1, -5.0, 4.0]])
    pruned_x = torch.tensor([[0.0, -6.0, 0.0, 0.0], [3.0, 0.0, -5.0, 4.0]])  # the top 4 of 8 |x|
    with prune_activations(layer, {"": 0.5}):
        layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, torch.ones(2, 2) @ pruned_x)
    assert torch.equal(layer.bias.grad, torch.full((2,), 2.0))


def _conv_out_grad():
    """dL/d(conv output) of the dense net on (X, Y)."""
    net = _net()
    h = net[0](X)
    h.retain_grad()
    F.cross_entropy(net[3](net[2](net[1](h))), Y).backward()
    return h.grad


def test_bae_moves_only_the_weights_about_to_be_pruned():
    weight = torch.tensor([0.5, -0.1, 0.0, 2.0, 0.05, -0.3])
    mask = torch.tensor([True, True, False, True, True, True])
    penalised = about_to_prune(weight, mask, 2)
    assert penalised.tolist() == [False, True, False, False, True, False]  # smallest ACTIVE, not the masked 0
    layer = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    x = torch.ones(1, 6)
    plain = torch.autograd.grad(layer(x).sum(), layer.weight)[0]
    with extrude(layer, {"weight": penalised.reshape(1, 6)}, lam=0.5):
        layer.zero_grad()
        layer(x).sum().backward()
    diff = (layer.weight.grad - plain).reshape(-1)
    assert torch.allclose(diff, torch.tensor([0.0, -0.1, 0.0, 0.0, 0.05, 0.0]))  # 2 * lam * w on P only
    layer.zero_grad()
    layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, plain)  # the hook is gone after the block


def test_top_k_gradient_positions_are_the_intended_inactive_ones():
    """The reference's FedMef used positions within the inactive list as tensor positions."""
    grad = torch.tensor([9.0, 0.1, -5.0, 0.2, 4.0, -0.3, 3.0, 8.0])
    mask = torch.tensor([True, False, False, True, False, True, False, True])
    index, values = topk_pruned(grad, mask, 3)
    assert index.tolist() == [2, 4, 6] and values.tolist() == [-5.0, 4.0, 3.0]
    inactive = (~mask).nonzero().squeeze(1)
    buggy = torch.topk(grad[inactive].abs(), 3).indices  # what the reference kept
    assert buggy.tolist() != index.tolist()


def test_fedrts_posterior_update_on_a_crafted_case():
    mask = torch.tensor([True, True, True, True, False, False])
    server = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0])
    clients = [torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0, 0.0]), torch.tensor([4.0, 3.0, 1.0, 2.0, 0.0, 0.0])]
    assert top_active(server, mask, 2).tolist() == [True, True, False, False, False, False]
    r = active_reward(server, clients, [0.25, 0.75], mask, kappa=2, gamma=0.5)
    # G = [1,1,0,0]; C_1 = [0,1,1,0], C_2 = [1,1,0,0] -> votes [.75, 1, .25, 0]
    assert torch.allclose(r[:4], torch.tensor([0.875, 1.0, 0.125, 0.0], dtype=torch.float64))
    alpha, beta = torch.ones(6), torch.ones(6)
    observe(alpha, beta, mask, r, c=10.0)
    assert torch.allclose(alpha, torch.tensor([9.75, 11.0, 2.25, 1.0, 1.0, 1.0]))
    assert torch.allclose(beta, torch.tensor([2.25, 1.0, 9.75, 11.0, 1.0, 1.0]))
    r_in = inactive_reward([torch.tensor([4]), torch.tensor([4, 5])], [0.25, 0.75], mask.shape, gamma=0.5)
    assert torch.allclose(r_in[4:], torch.tensor([0.75, 0.625], dtype=torch.float64))
    observe(alpha, beta, ~mask, r_in, c=10.0)
    assert alpha[4:].tolist() == [8.5, 7.25] and beta[4:].tolist() == [3.5, 4.75]
    assert alpha[:4].tolist() == [9.75, 11.0, 2.25, 1.0]  # active posteriors untouched by the inactive step


def test_fedrts_sampling_keeps_the_count_and_changes_the_mask():
    """The reference's sampling step never ran (a key-prefix mismatch); here it moves the mask."""
    mask = torch.tensor([True, True, True, True, False, False])
    alpha = torch.tensor([9.75, 11.0, 2.25, 1.0, 8.5, 7.25])
    beta = torch.tensor([2.25, 1.0, 9.75, 11.0, 3.5, 4.75])
    rng = np.random.default_rng(0)
    draws = [sample_mask(alpha, beta, 4, rng) for _ in range(50)]
    assert all(int(m.sum()) == 4 for m in draws)
    assert sum(not torch.equal(m, mask) for m in draws) > 40
    kept = torch.stack(draws).float().mean(0)
    assert kept[1] > 0.9 and kept[3] < 0.2 and kept[4] > 0.5  # the posterior means order the links
    again = sample_mask(alpha, beta, 4, np.random.default_rng(0))
    assert torch.equal(again, draws[0])  # seeded: resume repeats the draw
