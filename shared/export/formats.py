"""The export formats: packed codec file, ONNX, TorchScript, C header; format choice, detection, metadata, sizes."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from shared import codec
from shared.export import metadata as meta
from shared.export.folding import fold_batchnorm, fold_state  # noqa: F401  fold_batchnorm: public via here
from shared.export.spec import MAX_META_BYTES, META_KEY, ModelSpec, packed_header, rebuild

FORMATS = ("packed", "onnx", "torchscript", "c")
SUFFIXES = {".ftc": "packed", ".onnx": "onnx", ".pt": "torchscript", ".h": "c"}
ONNX_OPSET = 17
FLOAT16_RTOL = 1e-2
"""Stated tolerance of float16 packed files: max |logit difference| <= FLOAT16_RTOL * max(1, max |logit|).

float16 rounds each kept weight by up to 2**-11 (about 4.9e-4) relative and the errors of five
layers add up (BN and biases stay float32); measured: 1.8e-3 relative on the Fashion-MNIST cnn at
density 0.01, 3e-4 on the test model.
"""

def format_for(out: str | os.PathLike, fmt: str | None = None) -> str:
    """The format of an export to `out`: from its suffix, which an explicit `fmt` must agree with."""
    suffix = Path(out).suffix.lower()
    known = ", ".join(f"{s} ({f})" for s, f in SUFFIXES.items())
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if suffix not in SUFFIXES:
        raise ValueError(f"--out {out}: unknown suffix {suffix or '(none)'!r}; use one of {known}")
    if fmt is not None and SUFFIXES[suffix] != fmt:
        raise ValueError(f"--format {fmt} contradicts --out {out} (a {suffix} file is {SUFFIXES[suffix]})")
    return SUFFIXES[suffix]


def save_packed(path: str | os.PathLike, model: nn.Module, spec: ModelSpec, masks: Mapping[str, torch.Tensor] | None,
                compact: bool = False, float16: bool = False, metadata: Mapping[str, Any] | None = None) -> int:
    """Write the model, BN folded (`fold_state`), as a codec file with a `__meta__` entry; returns the bytes written.

    Masks are unchanged by folding (each output row is scaled), so kept weights stay values plus a mask.
    """
    state, folded = fold_state(model.eval())
    if META_KEY in state:
        raise ValueError(f"model has a state entry named {META_KEY!r}, which packed files reserve")
    state[META_KEY] = spec.to_tensor(compact, folded, metadata)
    return codec.save(path, state, dict(masks or {}), dtype=torch.float16 if float16 else torch.float32)


def _read(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read(codec.MAX_INFLATED + 1)


def _packed_header(data: bytes, path: str | os.PathLike) -> dict[str, Any]:
    """The `__meta__` entry of a packed file, read (bounded) before anything else in it."""
    try:
        return packed_header(codec.decode_entry(data, META_KEY, MAX_META_BYTES))
    except codec.DecodeError as exc:
        raise ValueError(f"{path}: not a model written by `fedtiny export` ({exc})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _packed_entries(path: str | os.PathLike) -> tuple[dict, dict, dict[str, Any]]:
    """(tensors, masks, header) of a packed file: its `__meta__` first, then the rest decoded only to the
    layout of the architecture that header names (`ModelSpec.packed_layout`)."""
    data = _read(path)
    header = _packed_header(data, path)
    try:
        layout = ModelSpec.from_header(header).packed_layout()
    except ValueError as exc:
        raise ValueError(f"{path}: {str(exc).splitlines()[0]}") from None
    try:
        tensors, masks = codec.decode(data, expected=layout, at_most=True)
    except codec.DecodeError as exc:
        raise codec.DecodeError(f"{path}: {exc}") from None
    tensors.pop(META_KEY, None)
    return tensors, masks, header


def load_packed(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model of a packed file (eval mode); needs torch, numpy and `shared` only. Reads v1 and v2."""
    tensors, masks, header = _packed_entries(path)
    try:
        return rebuild(ModelSpec.from_header(header), tensors, masks, folded=header.get("folded", ()))
    except (RuntimeError, AttributeError, KeyError, IndexError, TypeError) as exc:  # a state that is not the model's
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: its tensors do not rebuild a {header['model']} ({first[:200]})") from None


def save_onnx(path: str | os.PathLike, model: nn.Module, input_shape: tuple[int, ...],
              metadata: Mapping[str, Any] | None = None) -> int:
    """ONNX graph (batch dimension dynamic, input "input", output "logits") of the BN-folded model.

    Pruned weights are stored as kept values and gaps (`onnx_sparse.sparsify`); `metadata` goes
    into `metadata_props["fedtiny"]` as JSON.
    """
    import onnx

    from shared.export.onnx_sparse import sparsify

    folded = fold_batchnorm(model)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            folded, (torch.zeros(1, *input_shape),), buffer, input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
        )
    proto = sparsify(onnx.load_from_string(buffer.getvalue()))
    if metadata is not None:
        proto.metadata_props.add(key=meta.ONNX_META_KEY, value=meta.to_json(metadata))
    onnx.save(proto, str(path))
    return os.path.getsize(path)


def save_torchscript(path: str | os.PathLike, model: nn.Module, input_shape: tuple[int, ...],
                     metadata: Mapping[str, Any] | None = None) -> int:
    """`torch.jit.trace` of the model in eval mode; `metadata` as the extra file `fedtiny.json`."""
    extra = {meta.TORCHSCRIPT_META_FILE: meta.to_json(metadata)} if metadata is not None else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.zeros(1, *input_shape))
        torch.jit.save(traced, str(path), _extra_files=extra)
    return os.path.getsize(path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata object an exported file records (see `shared.export.metadata`); None when it has none.

    Packed v1 files predate it: their architecture is returned, without data settings.
    """
    fmt = detect_format(path)
    where = str(path)
    if fmt == "packed":
        header = _packed_header(_read(path), path)
        if header.get("metadata"):
            return meta.from_json(meta.to_json(header["metadata"]), where)
        return {k: header[k] for k in ("model", "width", "num_classes", "input_shape", "compact")}
    if fmt == "torchscript":
        extra = {meta.TORCHSCRIPT_META_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        text = extra[meta.TORCHSCRIPT_META_FILE]
        return meta.from_json(text.decode() if isinstance(text, bytes) else text, where) if text else None
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return meta.from_json(props[meta.ONNX_META_KEY], where) if meta.ONNX_META_KEY in props else None
    from shared.export.c_export import read_header_metadata

    return read_header_metadata(path)


def dense_state_bytes(model: nn.Module) -> int:
    """Size of `torch.save(model.state_dict())` in float32: the reference for export sizes."""
    buf = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, buf)
    return buf.tell()


def channel_count(model: nn.Module) -> int:
    """Output channels plus neurons of all conv and linear layers."""
    return sum(m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)))


def detect_format(path: str | os.PathLike) -> str:
    """packed (codec magic, plain or deflated), torchscript (zip archive), onnx (.onnx) or c (.h)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:3] in (codec.MAGIC, getattr(codec, "DEFLATE_MAGIC", codec.MAGIC)):  # plain or deflated codec file
        return "packed"
    if head[:2] == b"PK":
        return "torchscript"
    if Path(path).suffix.lower() in (".onnx", ".h"):
        return SUFFIXES[Path(path).suffix.lower()]
    raise ValueError(f"{path}: not a packed (.ftc), TorchScript (.pt), ONNX (.onnx) or C header (.h) model file")
