"""Specification of parameter, FLOP and size accounting."""

from __future__ import annotations

import torch
from torch import nn

from shared.accounting import count_parameters, flops, model_size
from shared.codec import decode, encode


def half_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks keeping the first half (by flat position) of every conv/linear weight."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            flat = torch.zeros(module.weight.numel(), dtype=torch.bool)
            flat[: module.weight.numel() // 2] = True
            masks[f"{name}.weight"] = flat.reshape(module.weight.shape)
    return masks


def test_count_parameters_of_the_dense_tiny_model(tiny_model) -> None:
    conv1, conv2, fc = 8 * 1 * 9, 16 * 8 * 9, 64 * 10
    bn_weight, bn_bias = 8 + 16, 8 + 16  # BN biases start at exactly zero
    counts = count_parameters(tiny_model)
    assert counts == {
        "total": conv1 + conv2 + fc + 10 + bn_weight + bn_bias,
        "nonzero": conv1 + conv2 + fc + 10 + bn_weight,
        "prunable": conv1 + conv2 + fc,
        "prunable_nonzero": conv1 + conv2 + fc,
    }


def test_masked_positions_count_as_zero(tiny_model) -> None:
    masks = half_masks(tiny_model)
    counts = count_parameters(tiny_model, masks)
    dense = count_parameters(tiny_model)
    assert counts["total"] == dense["total"] and counts["prunable"] == dense["prunable"]
    assert counts["prunable_nonzero"] == (72 + 1152 + 640) // 2
    assert counts["nonzero"] == dense["nonzero"] - (72 + 1152 + 640) // 2


def test_exact_zeros_count_as_zero(tiny_model) -> None:
    with torch.no_grad():
        tiny_model.classifier.bias.zero_()
    counts = count_parameters(tiny_model)
    assert counts["nonzero"] == counts["total"] - 10 - (8 + 16)  # classifier bias and the BN biases


def test_flops_of_tiny_model_match_hand_count(tiny_model) -> None:
    conv1 = 8 * 8 * 8 * 1 * 3 * 3  # out_h * out_w * C_out * C_in * k_h * k_w (padding 1 keeps 8x8)
    conv2 = 8 * 8 * 16 * 8 * 3 * 3
    fc = 64 * 10
    assert flops(tiny_model, (1, 8, 8)) == {"dense": conv1 + conv2 + fc, "sparse": conv1 + conv2 + fc}


def test_flops_of_strided_grouped_conv_and_linear() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
    conv = 3 * 3 * 6 * (4 // 2) * 3 * 3  # 7x7 input, stride 2, no padding -> 3x3 output
    fc = 54 * 5
    assert flops(model, (4, 7, 7))["dense"] == conv + fc


def test_sparse_flops_scale_with_mask_density(tiny_model) -> None:
    result = flops(tiny_model, (1, 8, 8), half_masks(tiny_model))
    assert result["sparse"] * 2 == result["dense"]


def test_sparse_flops_use_each_layers_own_density() -> None:
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 4))
    first = torch.zeros(20, 10, dtype=torch.bool)
    first[:, :1] = True  # density 0.1
    masks = {"0.weight": first, "1.weight": torch.ones(4, 20, dtype=torch.bool)}
    assert flops(model, (10,), masks) == {"dense": 200 + 80, "sparse": 20 + 80}


def test_flops_leave_training_mode_and_hooks_as_they_were(tiny_model) -> None:
    tiny_model.train()
    flops(tiny_model, (1, 8, 8))
    assert tiny_model.training
    assert all(not m._forward_hooks for m in tiny_model.modules())


def test_model_size_dense_counts_every_state_tensor_as_float32(tiny_model) -> None:
    numel = sum(t.numel() for t in tiny_model.state_dict().values())
    assert model_size(tiny_model)["dense_bytes"] == 4 * numel


def test_model_size_sparse_is_smaller_than_dense_and_decodes(tiny_model) -> None:
    g = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(m.shape, generator=g) < 0.1 for name, m in half_masks(tiny_model).items()}
    size = model_size(tiny_model, masks)
    assert size["sparse_bytes"] < 0.5 * size["dense_bytes"]
    data = encode(tiny_model.state_dict(), masks)
    assert len(data) == size["sparse_bytes"]
    tensors, out_masks = decode(data)
    assert set(out_masks) == set(masks)
