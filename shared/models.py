"""Models by name, and which of their weights are prunable, in forward order and in blocks.

Every built-in model has batch norm (adaptive BN selection recalibrates it) and accepts any input
size (adaptive pooling), except `cnn-pool`, which needs at least 8x8. A builder is
`fn(num_classes, input_shape, width) -> nn.Module`, where
`width` multiplies the channel counts.

A user's own model: set `model.name` to `package.module:callable`; the callable is called with
the keyword arguments `num_classes`, `input_shape` (C, H, W) and `width`, and returns an
`nn.Module`. It may define `prunable_blocks() -> list[list[str]]` (groups of prunable parameter
names in forward order, for progressive pruning); without it, blocks are its top-level children.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from shared.pruning.params import prunable_names
from shared.registry import Registry, call_user

ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model", allow_import=True)

def _ch(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _bn_head(features: int, hidden: int, num_classes: int) -> nn.Sequential:
    """linear-BN-ReLU-linear: the classifier of the small CNNs."""
    return nn.Sequential(
        nn.Linear(features, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
    )


class _FeaturesThenHead(nn.Module):
    """`features`, flattened, then `classifier`; each prunable layer is its own block."""

    features: nn.Module
    classifier: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def prunable_blocks(self) -> list[list[str]]:
        return [[name] for name in prunable_names(self)]


class CNN(_FeaturesThenHead):
    """A small CNN for 8x8 to 32x32 inputs: three conv-BN-ReLU layers, then linear-BN-ReLU-linear.

    About 65 thousand weights at width 1; trains on a CPU in seconds on the digits data.
    """

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, hidden = _ch(32, width), _ch(64, width), _ch(128, width)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1),
            *_conv_bn_relu(c1, c2),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(c2, c2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = _bn_head(c2, hidden, num_classes)


class CNNPool(_FeaturesThenHead):
    """A CNN in FedTiny's regime: conv 32-64-128 (3x3, BN, ReLU, 2x2 max pool each), then
    linear(256)-BN-ReLU-linear; the CNN that FEDTINY.md measured on Fashion-MNIST.

    FedTiny (Huang et al., arXiv 2212.01977) is meant for BN networks with enough weights that
    densities of 1% and below still leave a trainable model. This one has that (389,920 prunable
    weights at width 1 on 1x28x28 with 10 classes; five prunable layers, three of them conv, each
    followed by BN) while staying cheap per example: 7,748,608 multiply-accumulates (MACs, as
    counted by `shared.accounting.flops`, i.e. about 15.5 MFLOPs) per 1x28x28 example.

    Pooling floors (28 -> 14 -> 7 -> 3), and the flattened size follows from the input shape, so
    inputs must be at least 8x8. `width` scales the channels and the hidden layer.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> None:
        super().__init__()
        in_channels, height, width_px = input_shape
        c1, c2, c3, hidden = _ch(32, width), _ch(64, width), _ch(128, width), _ch(256, width)
        out_h, out_w = height // 8, width_px // 8  # three 2x2 max pools, floor mode
        if out_h < 1 or out_w < 1:
            raise ValueError(f"cnn-pool needs inputs of at least 8x8 (three 2x2 poolings), got {height}x{width_px}")
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c1, c2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c3),
            nn.MaxPool2d(2),
        )
        self.classifier = _bn_head(c3 * out_h * out_w, hidden, num_classes)


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """CIFAR-style VGG with batch norm (Simonyan & Zisserman, arXiv 1409.1556) and one linear classifier.

    Max pooling uses ceil mode and the end is adaptive average pooling, so any input size works
    (an 8x8 input reaches 1x1 and stays there).
    """

    def __init__(self, cfg: tuple, num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += _conv_bn_relu(channels, _ch(item, width))
                channels = _ch(item, width)
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def prunable_blocks(self) -> list[list[str]]:
        """Pairs of consecutive prunable layers (FedTiny adjusts VGG two layers per step)."""
        names = prunable_names(self)
        return [names[i : i + 2] for i in range(0, len(names), 2)]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 conv-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al., arXiv 1512.03385): 3x3 stem, no max pool, adaptive average pool."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int, width: float = 1.0) -> None:
        super().__init__()
        stem = _ch(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        channels = stem
        stages = []
        for i, count in enumerate(blocks):
            cout, stride = _ch(64 * 2**i, width), 1 if i == 0 else 2
            stage = []
            for j in range(count):
                stage.append(BasicBlock(channels, cout, stride if j == 0 else 1))
                channels = cout
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))

    def prunable_blocks(self) -> list[list[str]]:
        """Stem, layer1..layer4 (each stage with its shortcut convs), fc."""
        return _blocks_by_top_level(prunable_names(self))


@MODELS.register("cnn")
def cnn(num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> nn.Module:
    return CNN(num_classes, input_shape[0], width)


@MODELS.register("cnn-pool")
def cnn_pool(num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> nn.Module:
    return CNNPool(num_classes, tuple(input_shape), width)


@MODELS.register("vgg11")
def vgg11(num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> nn.Module:
    return VGG(VGG11_CFG, num_classes, input_shape[0], width)


@MODELS.register("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, input_shape[0], width)


def build_model(
    name: str, num_classes: int, input_shape: tuple[int, int, int], width: float = 1.0, seed: int = 0,
    trusted: Iterable[str] = (),
) -> nn.Module:
    """Model `name` (a MODELS key or `package.module:callable` from a `trusted` package), initialized from `seed`.

    The global torch RNG is left as it was. Sets `model.input_shape` (used to find forward order).
    """
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
    if width <= 0:
        raise ValueError(f"model width must be > 0, got {width}")
    builder = MODELS.get(name, trusted)
    input_shape = tuple(int(s) for s in input_shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kwargs = {"num_classes": num_classes, "input_shape": input_shape, "width": width}
        model = builder(**kwargs) if name in MODELS else call_user(builder, f"model {name!r}", **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    model.input_shape = input_shape
    return model


def _blocks_by_top_level(names: list[str]) -> list[list[str]]:
    """Group names by their top-level module, groups ordered by first appearance."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.split(".", 1)[0], []).append(name)
    return list(groups.values())


def prunable_blocks(model: nn.Module) -> list[list[str]]:
    """Groups of prunable names for progressive pruning, in forward order.

    Uses the model's own `prunable_blocks()` when defined, else groups by top-level child module.
    Raises ValueError unless every prunable name is in exactly one block.
    """
    names = prunable_names(model)
    own = getattr(model, "prunable_blocks", None)
    blocks = [list(b) for b in own()] if callable(own) else _blocks_by_top_level(names)
    flat = [n for block in blocks for n in block]
    if sorted(flat) != sorted(names) or len(set(flat)) != len(flat) or any(not b for b in blocks):
        raise ValueError(
            f"{type(model).__name__}.prunable_blocks() must put every prunable weight in exactly one non-empty block"
        )
    return blocks


def model_for(config, bundle) -> nn.Module:
    """The seeded model of a validated run config (`shared.config.Config`) for the data `bundle`."""
    m = config.model
    return build_model(m.name, bundle.num_classes, bundle.input_shape, m.width, config.seed, config.trusted)
