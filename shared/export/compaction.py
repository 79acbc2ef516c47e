"""Channel compaction: physically remove channels and neurons that cannot change the logits."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from shared.export.spec import ModelSpec, Tensors, rebuild
from shared.models import CNN, VGG


_BETWEEN = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as the flat module sequence its forward runs: features, flatten, classifier."""
    if type(model) not in (CNN, VGG):
        raise ValueError(
            f"compaction supports the cnn and vgg11 models (conv-BN-ReLU chains), not {type(model).__name__}; "
            "export without --compact"
        )
    chain = [(f"features.{i}", m) for i, m in enumerate(model.features)] + [("", nn.Flatten())]
    cls = model.classifier
    if isinstance(cls, nn.Sequential):
        chain += [(f"classifier.{i}", m) for i, m in enumerate(cls)]
    else:
        chain.append(("classifier", cls))
    for name, m in chain:
        conv_ok = isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
        if not (conv_ok or isinstance(m, (nn.Linear, *_BETWEEN))):
            raise ValueError(f"compaction cannot handle layer {name} ({type(m).__name__}); export without --compact")
    return chain


def _input_shapes(chain: list[tuple[str, nn.Module]], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    x = torch.zeros(1, *input_shape)
    shapes = []
    with torch.no_grad():
        for _, m in chain:
            shapes.append(tuple(x.shape[1:]))
            was_training = m.training
            x = m.eval()(x)
            m.train(was_training)
    return shapes


class _Layer:
    """A producer (conv / linear), the channel-wise modules after it, and its consumer."""

    def __init__(self, name: str, module: nn.Module, between: list[tuple[str, nn.Module]], in_shape: tuple[int, ...]):
        self.name, self.module, self.between, self.in_shape = name, module, between, in_shape


def _layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[_Layer]:
    chain = _chain(model)
    shapes = _input_shapes(chain, input_shape)
    layers: list[_Layer] = []
    for (name, m), shape in zip(chain, shapes):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            layers.append(_Layer(name, m, [], shape))
        elif layers:
            layers[-1].between.append((name, m))
    return layers


def _constant_after(value: torch.Tensor, c: int, between: list[tuple[str, nn.Module]], state: Tensors) -> torch.Tensor:
    """The constant that channel c carries after the channel-wise modules, given its constant pre-activation."""
    for name, m in between:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            mean, var = state[f"{name}.running_mean"][c], state[f"{name}.running_var"][c]
            value = (value - mean) / torch.sqrt(var + m.eps)
            if m.affine:
                value = value * state[f"{name}.weight"][c] + state[f"{name}.bias"][c]
        elif isinstance(m, nn.ReLU):
            value = torch.clamp(value, min=0)
        # max pool, adaptive average pool, flatten and identity keep a constant map constant
    return value


def _contribution(value: torch.Tensor, columns: torch.Tensor, consumer: _Layer) -> torch.Tensor | None:
    """What a constant input channel adds to each consumer output, or None when it is not a constant.

    `columns` are the consumer's weights on that channel: (out, k) for linear, (out, 1, kh, kw) for conv.
    A conv with zero padding sees the constant only partly at the borders; then the contribution
    varies over positions and the channel must stay.
    """
    m = consumer.module
    if isinstance(m, nn.Linear):
        return value * columns.sum(dim=1)
    _, h, w = consumer.in_shape
    ones = torch.full((1, 1, h, w), float(value), dtype=columns.dtype)
    out = F.conv2d(ones, columns, None, m.stride, m.padding, m.dilation)  # (1, out, h', w')
    flat = out[0].flatten(1)
    spread = (flat.amax(dim=1) - flat.amin(dim=1)).abs().max()
    if float(spread) > 1e-6 * (1.0 + float(flat.abs().max())):
        return None
    return flat.mean(dim=1)


def _add_to_output(layer: _Layer, delta: torch.Tensor, state: Tensors) -> None:
    """Add a constant to every output of `layer`: into its bias, else its BN's running mean, else a new bias."""
    bias = f"{layer.name}.bias"
    if bias in state:
        state[bias] = state[bias] + delta
        return
    if layer.between and isinstance(layer.between[0][1], nn.modules.batchnorm._BatchNorm):
        key = f"{layer.between[0][0]}.running_mean"  # BN(y + d) with mean m == BN(y) with mean m - d
        state[key] = state[key] - delta
        return
    state[bias] = delta.clone()


def _slice_channels(layer: _Layer, consumer: _Layer, keep: torch.Tensor, state: Tensors, masks: Tensors) -> None:
    """Drop output channels of `layer` (with its biases and BN entries) and the matching consumer inputs."""
    for store in (state, masks):
        for key in (f"{layer.name}.weight", f"{layer.name}.bias"):
            if key in store:
                store[key] = store[key][keep]
    for name, m in layer.between:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if f"{name}.{attr}" in state:
                    state[f"{name}.{attr}"] = state[f"{name}.{attr}"][keep]
    per_channel = state[f"{consumer.name}.weight"].shape[1] // keep.numel()
    cols = keep.repeat_interleave(per_channel)
    for store in (state, masks):
        key = f"{consumer.name}.weight"
        if key in store:
            store[key] = store[key][:, cols]


def _columns(consumer: _Layer, c: int, channels: int, state: Tensors) -> torch.Tensor:
    w = state[f"{consumer.name}.weight"]
    per_channel = w.shape[1] // channels
    return w[:, c * per_channel : (c + 1) * per_channel]


def _compact_once(layer: _Layer, consumer: _Layer, state: Tensors, masks: Tensors) -> bool:
    """Remove the removable output channels of `layer`; True when any was removed."""
    weight = state[f"{layer.name}.weight"]
    channels = weight.shape[0]
    bias = state.get(f"{layer.name}.bias")
    keep = torch.ones(channels, dtype=torch.bool)
    for c in range(channels):
        if int(keep.sum()) == 1:
            break  # a layer keeps at least one channel
        columns = _columns(consumer, c, channels, state)
        if not bool(columns.any()):
            keep[c] = False  # unused: nothing downstream reads it
            continue
        if bool(weight[c].any()):
            continue
        pre = bias[c] if bias is not None else torch.zeros((), dtype=weight.dtype)
        value = _constant_after(pre, c, layer.between, state)
        delta = _contribution(value, columns, consumer)
        if delta is not None:  # dead: a constant, folded into the consumer's output
            _add_to_output(consumer, delta, state)
            keep[c] = False
    if bool(keep.all()):
        return False
    _slice_channels(layer, consumer, keep, state, masks)
    return True


def compact_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
) -> tuple[Tensors, Tensors]:
    """Physically remove channels and neurons that do not change the logits (eval mode); new (state, masks).

    A channel goes when the next layer's weights on it are all zero (unused), or when its own
    weights are all zero (dead): its output is then the constant relu(BN(bias)), whose exact
    contribution to the next layer is folded into that layer's bias or its BN running mean. For a
    zero-padded conv that constant is only partly seen at the borders, so such a channel stays
    unless the next layer's border taps on it are zero. Repeats until nothing changes. The input
    channels and the logits are never removed. Supports the `cnn` and `vgg11` models.
    """
    input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise ValueError("compaction needs model.input_shape (C, H, W); build the model with shared.models.build_model")
    layers = _layers(model, tuple(input_shape))
    state = {k: v.detach().clone() for k, v in state.items()}
    masks = {k: v.clone() for k, v in (masks or {}).items()}
    for name, mask in masks.items():
        state[name] = state[name] * mask
    changed = True
    while changed:
        changed = False
        for layer, consumer in zip(layers[:-1], layers[1:]):
            changed |= _compact_once(layer, consumer, state, masks)
    return state, masks


def compact(
    model: nn.Module, spec: ModelSpec, masks: Mapping[str, torch.Tensor] | None = None
) -> tuple[nn.Module, Tensors]:
    """The compacted model (same class, smaller layers, eval mode) and its sliced masks."""
    state, new_masks = compact_state(model, model.state_dict(), masks)
    return rebuild(spec, state, new_masks), new_masks
