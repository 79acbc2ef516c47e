"""Edge export of a finished run's tiny model: packed codec file, ONNX, TorchScript; channel compaction.

Why: FedTiny ("Distributed Pruning Towards Tiny Neural Networks in Federated Learning",
arXiv 2212.01977) exists to ship a tiny model to a device, so the run's sparse model has to leave
the framework in a form a device can load, and must still be the same model (same logits).

- `packed`: the wire codec (`shared.codec`) file: masked weights as their kept values plus a
  bitmask or delta-coded indices, BN and biases dense, and a JSON `__meta__` entry (a uint8
  tensor, no pickle) naming the architecture, so `load_packed` rebuilds it with torch, numpy and
  `shared` only. Masked values may be float16 (about half the size; see `FLOAT16_RTOL`).
- `compact`: channels and neurons that are provably dead or unused are removed physically
  (see `compact_state`), giving a smaller dense model with the same logits.
- `onnx`: BN folded into the preceding conv / linear layers, then the TorchScript-based exporter.
- `torchscript`: `torch.jit.trace` of the model in eval mode.

This module never imports Flower; onnx and onnxruntime are imported only when used.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared import codec
from shared.models import CNN, VGG, build_model

Tensors = dict[str, torch.Tensor]
Predictor = Callable[[torch.Tensor], torch.Tensor]

FORMATS = ("packed", "onnx", "torchscript")
META_KEY = "__meta__"
PACKED_FORMAT = "fedtiny-packed"
PACKED_VERSION = 1
ONNX_OPSET = 17
FLOAT16_RTOL = 1e-2
"""Stated tolerance of float16 packed files: max |logit difference| <= FLOAT16_RTOL * max(1, max |logit|).

float16 rounds each kept weight by up to 2**-11 (about 4.9e-4) relative and the errors of five
layers add up (BN and biases stay float32); measured: 1.8e-3 relative on the Fashion-MNIST cnn at
density 0.01, 3e-4 on the test model.
"""


# ----------------------------------------------------------------------------- architecture spec


@dataclass(frozen=True)
class ModelSpec:
    """What `shared.models.build_model` needs to rebuild an architecture (stored in packed files)."""

    model: str
    num_classes: int
    input_shape: tuple[int, int, int]
    width: float

    def build(self) -> nn.Module:
        return build_model(self.model, self.num_classes, self.input_shape, self.width)

    def to_tensor(self, compact: bool) -> torch.Tensor:
        meta = {"format": PACKED_FORMAT, "version": PACKED_VERSION, "compact": compact, **asdict(self)}
        return torch.tensor(list(json.dumps(meta, sort_keys=True).encode("utf-8")), dtype=torch.uint8)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> ModelSpec:
        try:
            meta = json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))
            version = (meta.get("format"), meta.get("version"))
            spec = ModelSpec(str(meta["model"]), int(meta["num_classes"]),
                             tuple(int(s) for s in meta["input_shape"]), float(meta["width"]))
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"packed file has a corrupt {META_KEY} entry ({type(exc).__name__}: {exc})") from None
        if version != (PACKED_FORMAT, PACKED_VERSION):
            raise ValueError(
                f"packed file is {version[0]} v{version[1]}; this build reads {PACKED_FORMAT} v{PACKED_VERSION}"
            )
        return spec


# ----------------------------------------------------------------------------- run directory


def load_run(output_dir: str | os.PathLike) -> tuple[nn.Module, Tensors, ModelSpec]:
    """The in-framework model of a finished run (eval mode, masks applied), its masks and its spec.

    Reads `config.yaml` and `model.ftc`; the dataset is loaded only for its class count and image shape.
    """
    from omegaconf import OmegaConf

    from shared.config import from_mapping
    from shared.data import load_dataset

    out = Path(output_dir)
    for name in ("config.yaml", "model.ftc"):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} not found: pass the output directory of a finished run")
    config = from_mapping(OmegaConf.to_container(OmegaConf.load(out / "config.yaml"), resolve=True))
    d = config.dataset
    bundle = load_dataset(d.name, d.path, config.seed, d.test_fraction)
    spec = ModelSpec(config.model.name, bundle.num_classes, bundle.input_shape, float(config.model.width))
    tensors, masks = codec.load(out / "model.ftc")
    return rebuild(spec, tensors, masks), masks, spec


def rebuild(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """`spec`'s architecture with layers resized to `state`'s shapes (compacted files), `state` loaded, eval mode."""
    model = spec.build()
    fit_modules_to_state(model, state)
    state = dict(state)
    for name, mask in (masks or {}).items():
        state[name] = state[name] * mask
    model.load_state_dict(state, strict=True)
    return model.eval()


def fit_modules_to_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Resize conv, linear and BN layers in place to the shapes in `state`, adding biases it has.

    Values are left uninitialized: `load_state_dict(state)` fills them.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = state.get(prefix + "weight")
        if isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear) and weight is not None:
            module.out_features, module.in_features = weight.shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and prefix + "running_mean" in state:
            module.num_features = state[prefix + "running_mean"].shape[0]
        else:
            continue
        for key, value in state.items():
            if not key.startswith(prefix) or "." in key[len(prefix):]:
                continue
            attr = key[len(prefix):]
            current = getattr(module, attr, None)
            if current is not None and tuple(current.shape) == tuple(value.shape):
                continue
            fresh = torch.empty(value.shape, dtype=value.dtype)
            if attr in module._buffers:
                module._buffers[attr] = fresh
            else:
                setattr(module, attr, nn.Parameter(fresh))


# ----------------------------------------------------------------------------- compaction


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


# ----------------------------------------------------------------------------- formats


def save_packed(path: str | os.PathLike, model: nn.Module, spec: ModelSpec, masks: Mapping[str, torch.Tensor] | None,
                compact: bool = False, float16: bool = False) -> int:
    """Write the model as a codec file with a `__meta__` entry; returns the bytes written."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if META_KEY in state:
        raise ValueError(f"model has a state entry named {META_KEY!r}, which packed files reserve")
    state[META_KEY] = spec.to_tensor(compact)
    return codec.save(path, state, dict(masks or {}), dtype=torch.float16 if float16 else torch.float32)


def load_packed(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model of a packed file (eval mode); needs torch, numpy and `shared` only."""
    tensors, masks = codec.load(path)
    if META_KEY not in tensors:
        raise ValueError(f"{path} is a codec file without {META_KEY!r}: not a model written by `fedtiny export`")
    spec = ModelSpec.from_tensor(tensors.pop(META_KEY))
    return rebuild(spec, tensors, masks)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every conv->BN and linear->BN pair folded into one layer (eval-mode BN).

    Uses torch.fx's fuse; a model fx cannot trace is returned as a copy unfused.
    """
    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        return fuse(model, inplace=False)
    except Exception:  # fx cannot trace every user model; BN then stays (onnx also folds in eval mode)
        import copy

        return copy.deepcopy(model)


def save_onnx(path: str | os.PathLike, model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """ONNX graph (batch dimension dynamic, input "input", output "logits") of the BN-folded model."""
    folded = fold_batchnorm(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            folded, (torch.zeros(1, *input_shape),), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
        )
    return os.path.getsize(path)


def save_torchscript(path: str | os.PathLike, model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """`torch.jit.trace` of the model in eval mode."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.zeros(1, *input_shape))
        traced.save(str(path))
    return os.path.getsize(path)


def export(output_dir: str | os.PathLike, fmt: str, out: str | os.PathLike,
           compact_model: bool = False, float16: bool = False) -> dict:
    """Export a finished run's model; returns {"bytes", "dense_bytes", "ratio", "channels_removed"}."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if float16 and fmt != "packed":
        raise ValueError("--float16 applies to --format packed only")
    model, masks, spec = load_run(output_dir)
    dense = dense_state_bytes(model)
    before = channel_count(model)
    if compact_model:
        model, masks = compact(model, spec, masks)
    if fmt == "packed":
        size = save_packed(out, model, spec, masks, compact=compact_model, float16=float16)
    elif fmt == "onnx":
        size = save_onnx(out, model, spec.input_shape)
    else:
        size = save_torchscript(out, model, spec.input_shape)
    removed = before - channel_count(model)
    return {"bytes": size, "dense_bytes": dense, "ratio": size / dense, "channels_removed": removed}


def dense_state_bytes(model: nn.Module) -> int:
    """Size of `torch.save(model.state_dict())` in float32: the reference for export sizes."""
    buf = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, buf)
    return buf.tell()


def channel_count(model: nn.Module) -> int:
    """Output channels plus neurons of all conv and linear layers."""
    return sum(m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))


# ----------------------------------------------------------------------------- loading any format


def detect_format(path: str | os.PathLike) -> str:
    """packed (codec magic, plain or deflated), torchscript (zip archive) or onnx (.onnx suffix)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:3] in (codec.MAGIC, getattr(codec, "DEFLATE_MAGIC", codec.MAGIC)):  # plain or deflated codec file
        return "packed"
    if head[:2] == b"PK":
        return "torchscript"
    if str(path).endswith(".onnx"):
        return "onnx"
    raise ValueError(f"{path}: not a packed (.ftc), TorchScript (.pt) or ONNX (.onnx) model file")


def load_predictor(path: str | os.PathLike) -> tuple[str, Predictor]:
    """(format, function from an input batch to logits) for an exported file, CPU, one thread."""
    fmt = detect_format(path)
    if fmt == "packed":
        model = load_packed(path)
        return fmt, _no_grad(model)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.jit.load(str(path), map_location="cpu").eval()
        return fmt, _no_grad(model)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy().astype(np.float32, copy=False)})[0])

    return fmt, predict


def _no_grad(model: Callable[[torch.Tensor], torch.Tensor]) -> Predictor:
    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return predict


def accuracy(predict: Predictor, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """(top-1 accuracy, example count) of `predict` over (x, y) batches."""
    correct = count = 0
    for x, y in batches:
        correct += int((predict(x).argmax(dim=1) == y).sum())
        count += len(y)
    return (correct / count if count else math.nan), count


def latency_ms(predict: Predictor, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in ms of `predict(x)` over `repeats` timed calls, after `warmup` calls."""
    for _ in range(warmup):
        predict(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
