"""The export formats: packed codec file, ONNX (BN folded), TorchScript; format detection and sizes."""

from __future__ import annotations

import io
import os
import warnings
from typing import Mapping

import torch
from torch import nn

from shared import codec
from shared.export.spec import META_KEY, ModelSpec, rebuild

FORMATS = ("packed", "onnx", "torchscript")
ONNX_OPSET = 17
FLOAT16_RTOL = 1e-2
"""Stated tolerance of float16 packed files: max |logit difference| <= FLOAT16_RTOL * max(1, max |logit|).

float16 rounds each kept weight by up to 2**-11 (about 4.9e-4) relative and the errors of five
layers add up (BN and biases stay float32); measured: 1.8e-3 relative on the Fashion-MNIST cnn at
density 0.01, 3e-4 on the test model.
"""


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


def dense_state_bytes(model: nn.Module) -> int:
    """Size of `torch.save(model.state_dict())` in float32: the reference for export sizes."""
    buf = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, buf)
    return buf.tell()


def channel_count(model: nn.Module) -> int:
    """Output channels plus neurons of all conv and linear layers."""
    return sum(m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))


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
