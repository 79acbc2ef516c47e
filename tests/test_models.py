"""Specifications of shared/models.py: every model builds and runs, prunable weights and blocks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from shared.models import MODELS, build_model, prunable_blocks
from shared.pruning.params import prunable_names

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
WIDTH = {"cnn": 1.0, "vgg11": 0.25, "resnet18": 0.25}  # small widths keep the big models fast


def width_of(name: str) -> float:
    return WIDTH.get(name, 0.25)


def conv_linear_weights(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_and_runs_forward(name: str, shape: tuple[int, int, int]) -> None:
    model = build_model(name, 10, shape, width=width_of(name))
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert model.input_shape == shape


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_has_batch_norm(name: str) -> None:
    model = build_model(name, 10, (1, 8, 8), width=width_of(name))
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", MODELS.names())
def test_prunable_parameters_are_all_conv_and_linear_weights_input_to_output(name: str) -> None:
    model = build_model(name, 10, (3, 32, 32), width=width_of(name))
    names = prunable_names(model)
    params = dict(model.named_parameters())
    assert set(names) == conv_linear_weights(model) and len(names) == len(set(names))
    reads = 3 * 32 * 32 if name == "mlp" else 3  # the first layer reads the input channels (the MLP: every value)
    assert params[names[0]].shape[1] == reads
    assert params[names[-1]].shape[0] == 10  # the last layer writes the classes


@pytest.mark.parametrize("name", MODELS.names())
def test_blocks_partition_the_prunable_names_in_forward_order(name: str) -> None:
    model = build_model(name, 10, (1, 8, 8), width=width_of(name))
    blocks = prunable_blocks(model)
    assert [n for block in blocks for n in block] == prunable_names(model)
    assert all(blocks)


def test_cnn_blocks_are_single_layers_and_weights_are_a_few_tens_of_thousands() -> None:
    model = build_model("cnn", 10, (1, 8, 8))
    names = prunable_names(model)
    assert prunable_blocks(model) == [[n] for n in names]
    assert 20_000 <= sum(model.get_parameter(n).numel() for n in names) <= 100_000


def test_cnn_pool_has_the_prunable_weights_of_fedtinys_measured_cnn() -> None:
    model = build_model("cnn-pool", 10, (1, 28, 28))
    names = prunable_names(model)
    convs = 1 * 32 * 9 + 32 * 64 * 9 + 64 * 128 * 9  # 3x3 kernels, no bias
    linears = (128 * 3 * 3) * 256 + 256 * 10  # 28 -> 14 -> 7 -> 3 after three 2x2 max pools
    assert sum(model.get_parameter(n).numel() for n in names) == convs + linears == 389_920


def test_cnn_pool_has_five_prunable_layers_three_of_them_conv_and_batch_norm() -> None:
    model = build_model("cnn-pool", 10, (1, 28, 28))
    kinds = [type(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert kinds == [nn.Conv2d] * 3 + [nn.Linear] * 2
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == 4


def test_cnn_pool_runs_on_3x32x32_and_blocks_are_single_layers() -> None:
    model = build_model("cnn-pool", 10, (3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    names = prunable_names(model)
    assert prunable_blocks(model) == [[n] for n in names]
    assert set(names) == conv_linear_weights(model)


def test_cnn_pool_width_scales_channels_and_hidden_layer() -> None:
    model = build_model("cnn-pool", 10, (1, 28, 28), width=0.5)
    assert [model.get_parameter(n).shape[0] for n in prunable_names(model)] == [16, 32, 64, 128, 10]


def test_cnn_pool_rejects_inputs_below_8x8() -> None:
    with pytest.raises(ValueError, match="at least 8x8"):
        build_model("cnn-pool", 10, (1, 4, 4))


def test_vgg11_blocks_are_pairs_of_consecutive_layers() -> None:
    model = build_model("vgg11", 10, (3, 32, 32), width=0.25)
    assert [len(b) for b in prunable_blocks(model)] == [2, 2, 2, 2, 1]
    assert prunable_blocks(model)[-1] == ["classifier.weight"]


def test_resnet18_blocks_are_stem_stages_with_shortcuts_and_fc() -> None:
    blocks = prunable_blocks(build_model("resnet18", 10, (3, 32, 32), width=0.25))
    assert blocks[0] == ["conv1.weight"] and blocks[-1] == ["fc.weight"]
    for stage, block in zip(("layer1", "layer2", "layer3", "layer4"), blocks[1:5]):
        assert all(n.startswith(stage + ".") for n in block)
    assert "layer2.0.shortcut.0.weight" in blocks[2]
    assert len(blocks) == 6


def test_width_multiplies_channels() -> None:
    narrow = build_model("vgg11", 10, (3, 32, 32), width=0.25)
    wide = build_model("vgg11", 10, (3, 32, 32), width=0.5)
    assert narrow.get_parameter("features.0.weight").shape[0] == 16
    assert wide.get_parameter("features.0.weight").shape[0] == 32


def test_build_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("cnn", 10, (1, 8, 8), seed=1)
    assert torch.rand(1).item() == expected.item()
    b = build_model("cnn", 10, (1, 8, 8), seed=1)
    c = build_model("cnn", 10, (1, 8, 8), seed=2)
    assert torch.equal(a.get_parameter("features.0.weight"), b.get_parameter("features.0.weight"))
    assert not torch.equal(a.get_parameter("features.0.weight"), c.get_parameter("features.0.weight"))


class ReversedRegistration(nn.Module):
    """Registers the classifier before the convolution it follows."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.body(x), 1))


def test_prunable_parameters_follow_forward_order_when_input_shape_is_known() -> None:
    model = ReversedRegistration()
    assert prunable_names(model) == ["head.weight", "body.0.weight"]  # registration order
    model.input_shape = (1, 8, 8)
    assert prunable_names(model) == ["body.0.weight", "head.weight"]
    assert prunable_blocks(model) == [["body.0.weight"], ["head.weight"]]


def test_forward_order_probe_keeps_training_mode_and_batch_norm_statistics() -> None:
    model = build_model("cnn", 10, (1, 8, 8))
    before = model.features[1].running_mean.clone()
    prunable_names(model)
    assert model.training
    assert torch.equal(model.features[1].running_mean, before)
    assert int(model.features[1].num_batches_tracked) == 0


def test_default_blocks_group_by_top_level_child(tiny_model: nn.Module) -> None:
    assert prunable_names(tiny_model) == ["features.0.weight", "features.3.weight", "classifier.weight"]
    assert prunable_blocks(tiny_model) == [["features.0.weight", "features.3.weight"], ["classifier.weight"]]


def test_blocks_that_miss_a_prunable_weight_are_a_value_error() -> None:
    model = ReversedRegistration()
    model.prunable_blocks = lambda: [["head.weight"]]
    with pytest.raises(ValueError, match="exactly one"):
        prunable_blocks(model)


def test_custom_model_from_module_callable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_model_mod.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def build(num_classes, input_shape, width):
                c, h, w = input_shape
                hidden = int(8 * width)
                return nn.Sequential(
                    nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                    nn.Flatten(), nn.Linear(hidden * h * w, num_classes),
                )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("user_model_mod:build", 4, (1, 8, 8), width=2.0, trusted=["user_model_mod"])
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)
    assert prunable_names(model) == ["0.weight", "4.weight"]
    assert prunable_blocks(model) == [["0.weight"], ["4.weight"]]


def test_custom_model_that_returns_no_module_is_a_value_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_model_bad.py").write_text("def build(**kwargs):\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        build_model("user_model_bad:build", 4, (1, 8, 8), trusted=["user_model_bad"])


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match="cnn, cnn-pool, mlp, resnet18, vgg11"):
        build_model("alexnet", 10, (3, 32, 32))


def test_one_definition_of_prunable_masks_and_blocks_agree_on_a_transposed_conv() -> None:
    from shared.pruning import compute_masks

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    model.input_shape = (1, 8, 8)
    names = prunable_names(model)
    assert names == ["0.weight", "1.weight", "3.weight"]
    assert sorted(n for b in prunable_blocks(model) for n in b) == sorted(names)
    assert list(compute_masks(model, 0.5)) == names
