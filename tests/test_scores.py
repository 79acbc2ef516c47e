"""Scores: shapes, no side effects, and each score's definition on fixed tensors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.pruning.params import prunable_names
from shared.pruning import masks_from_scores
from shared.pruning.scores import DATA_SCORES, GRASP_TEMPERATURE, SCORES, average_scores

NAMES = ["features.0.weight", "features.3.weight", "classifier.weight"]


def test_prunable_names_are_conv_and_linear_weights_in_order(tiny_model):
    assert prunable_names(tiny_model) == NAMES


@pytest.mark.parametrize("name", SCORES.names())
def test_score_is_float_tensor_shaped_like_each_weight(name, tiny_model, tiny_batches):
    scores = SCORES.get(name)(tiny_model, NAMES, batches=tiny_batches, seed=0)
    params = dict(tiny_model.named_parameters())
    assert list(scores) == NAMES
    for n in NAMES:
        assert scores[n].shape == params[n].shape
        assert scores[n].is_floating_point()
        assert torch.isfinite(scores[n]).all()


@pytest.mark.parametrize("name", SCORES.names())
def test_score_leaves_model_untouched(name, tiny_model, tiny_batches):
    tiny_model.train()
    before = copy.deepcopy(tiny_model.state_dict())
    SCORES.get(name)(tiny_model, NAMES, batches=tiny_batches, seed=0)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(p.requires_grad for p in tiny_model.parameters())
    assert tiny_model.training


def test_unknown_score_lists_known_names():
    with pytest.raises(ValueError, match="known: grad, grasp, magnitude, random, snip, synflow"):
        SCORES.get("fisher")


def test_unknown_parameter_name_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="unknown parameter names"):
        SCORES.get("magnitude")(tiny_model, ["features.9.weight"])


def test_magnitude_is_abs_weight(tiny_model):
    scores = SCORES.get("magnitude")(tiny_model, NAMES)
    params = dict(tiny_model.named_parameters())
    assert all(torch.equal(scores[n], params[n].detach().abs()) for n in NAMES)


def test_random_is_reproducible_by_seed(tiny_model):
    random = SCORES.get("random")
    a, b, c = random(tiny_model, NAMES, seed=1), random(tiny_model, NAMES, seed=1), random(tiny_model, NAMES, seed=2)
    assert all(torch.equal(a[n], b[n]) for n in NAMES)
    assert not torch.equal(a[NAMES[1]], c[NAMES[1]])


def _summed_grads(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).train()
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_snip_is_abs_weight_times_summed_gradient(tiny_model, tiny_batches):
    grads = _summed_grads(tiny_model, tiny_batches)
    scores = SCORES.get("snip")(tiny_model, NAMES, batches=tiny_batches)
    params = dict(tiny_model.named_parameters())
    for n in NAMES:
        torch.testing.assert_close(scores[n], (params[n].detach() * grads[n]).abs())


def test_grad_is_abs_summed_gradient(tiny_model, tiny_batches):
    grads = _summed_grads(tiny_model, tiny_batches)
    scores = SCORES.get("grad")(tiny_model, NAMES, batches=tiny_batches)
    for n in NAMES:
        torch.testing.assert_close(scores[n], grads[n].abs())


@pytest.mark.parametrize("name", sorted(DATA_SCORES))
def test_data_driven_score_needs_batches(name, tiny_model):
    with pytest.raises(ValueError, match="pass batches"):
        SCORES.get(name)(tiny_model, NAMES)


def test_grasp_is_a_registered_data_score():
    assert "grasp" in SCORES and "grasp" in DATA_SCORES
    assert GRASP_TEMPERATURE == 200.0  # the authors' default


def test_grasp_of_a_softmax_classifier_is_weight_times_hand_derived_hessian_gradient():
    # L = mean_n CE(W x_n / T, y_n):  g = (1/T) mean_n (p_n - e_n) x_n^T
    #                                 H[V] = (1/T^2) mean_n (diag(p_n) - p_n p_n^T) V x_n x_n^T
    torch.manual_seed(0)
    model, t = nn.Linear(4, 3, bias=False), 2.0
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 1, 0])
    w = model.weight.detach()
    p = torch.softmax(x @ w.T / t, dim=1)
    g = ((p - F.one_hot(y, 3)).T @ x) / (t * len(x))
    jac = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # softmax Jacobian per example
    hg = torch.einsum("nij,nj,nk->ik", jac, x @ g.T, x) / (t**2 * len(x))
    scores = SCORES.get("grasp")(model, ["weight"], batches=[(x, y)], temperature=t)
    torch.testing.assert_close(scores["weight"], w * hg)


def _grasp_by_hvp(model: nn.Module, batches, names) -> dict[str, torch.Tensor]:
    """θ ⊙ (d²L/dθ²)(dL/dθ) with L = sum_b CE(f(x_b) / T, y_b), by torch.autograd.functional.hvp."""
    model = copy.deepcopy(model).train()
    theta = tuple(model.get_parameter(n).detach() for n in names)

    def total_loss(*weights):
        params = dict(zip(names, weights))
        return sum(
            F.cross_entropy(torch.func.functional_call(model, params, (x,)) / GRASP_TEMPERATURE, y) for x, y in batches
        )

    g = torch.autograd.functional.vjp(total_loss, theta)[1]
    hg = torch.autograd.functional.hvp(total_loss, theta, g)[1]
    return {n: w * h for n, w, h in zip(names, theta, hg)}


def test_grasp_is_weight_times_hessian_gradient_product_in_train_mode(tiny_model, tiny_batches):
    model = tiny_model.double()  # float64, so the two computations agree to round-off
    batches = [(x.double(), y) for x, y in tiny_batches]
    expected = _grasp_by_hvp(model, batches, NAMES)
    scores = SCORES.get("grasp")(model, NAMES, batches=batches)
    for n in NAMES:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-7, atol=1e-9 * float(expected[n].abs().max()))


def test_grasp_masks_keep_what_the_authors_keep(tiny_model, tiny_batches):
    # The authors score S = -θ ⊙ Hg, remove the highest S and keep the rest.
    model = tiny_model.double()  # float64: no near-ties at the threshold from round-off
    batches = [(x.double(), y) for x, y in tiny_batches]
    authors = {n: -s for n, s in _grasp_by_hvp(model, batches, NAMES).items()}
    flat = torch.cat([authors[n].reshape(-1) for n in NAMES])
    kept = round(0.1 * flat.numel())
    threshold = flat.sort().values[kept - 1]
    masks = masks_from_scores(SCORES.get("grasp")(model, NAMES, batches=batches), 0.1, "global")
    for n in NAMES:
        assert torch.equal(masks[n], authors[n] <= threshold)


def test_grasp_skips_single_example_batches_as_snip_does(tiny_model, tiny_batches):
    x, y = tiny_batches[0]
    with_single = SCORES.get("grasp")(tiny_model, NAMES, batches=[*tiny_batches, (x[:1], y[:1])])
    without = SCORES.get("grasp")(tiny_model, NAMES, batches=tiny_batches)
    assert all(torch.equal(with_single[n], without[n]) for n in NAMES)


def test_grasp_is_deterministic_given_batches(tiny_model, tiny_batches):
    a = SCORES.get("grasp")(tiny_model, NAMES, batches=tiny_batches, seed=0)
    b = SCORES.get("grasp")(tiny_model, NAMES, batches=tiny_batches, seed=0)
    assert all(torch.equal(a[n], b[n]) for n in NAMES)
    assert any(bool((a[n] != 0).any()) for n in NAMES)


class TwoLinear(nn.Module):
    """f(x) = W2 W1 x: SynFlow's R = 1^T |W2| |W1| 1 can be differentiated by hand."""

    input_shape = (3,)

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 0.0]]))
            self.b.weight.copy_(torch.tensor([[2.0, -1.0], [0.5, 4.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_synflow_is_abs_weight_times_flow_gradient_of_linearized_net():
    model = TwoLinear()
    scores = SCORES.get("synflow")(model, ["a.weight", "b.weight"])
    w1, w2 = model.a.weight.detach().abs().double(), model.b.weight.detach().abs().double()
    # R = sum_k sum_i |W2|[k,i] sum_j |W1|[i,j];  dR/dW1[i,j] = sum_k |W2|[k,i];  dR/dW2[k,i] = sum_j |W1|[i,j]
    torch.testing.assert_close(scores["a.weight"], w1 * w2.sum(0)[:, None])
    torch.testing.assert_close(scores["b.weight"], w2 * w1.sum(1)[None, :])
    assert scores["a.weight"].dtype == torch.float64


def test_synflow_takes_input_shape_from_batches(tiny_model, tiny_batches):
    from_batches = SCORES.get("synflow")(tiny_model, NAMES, batches=tiny_batches)
    tiny_model.input_shape = (1, 8, 8)
    from_attribute = SCORES.get("synflow")(tiny_model, NAMES)
    assert all(torch.equal(from_batches[n], from_attribute[n]) for n in NAMES)


def test_synflow_without_input_shape_is_an_error(tiny_model):
    with pytest.raises(ValueError, match="input_shape"):
        SCORES.get("synflow")(tiny_model, NAMES)


def test_average_scores_of_two_clients_is_the_mean():
    a = {"w": torch.tensor([1.0, 2.0, 3.0])}
    b = {"w": torch.tensor([3.0, 0.0, 5.0])}
    torch.testing.assert_close(average_scores([a, b])["w"], torch.tensor([2.0, 1.0, 4.0]))


def test_average_scores_weights_by_sample_count():
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([5.0, 6.0])}
    torch.testing.assert_close(average_scores([a, b], weights=[3, 1])["w"], torch.tensor([2.0, 3.0]))


def test_average_of_two_clients_snip_scores_is_their_mean(tiny_model, tiny_batches):
    snip = SCORES.get("snip")
    clients = [snip(tiny_model, NAMES, batches=tiny_batches[:1]), snip(tiny_model, NAMES, batches=tiny_batches[1:2])]
    mean = average_scores(clients)
    for n in NAMES:
        torch.testing.assert_close(mean[n], (clients[0][n] + clients[1][n]) / 2)


def test_average_scores_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="different keys"):
        average_scores([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
