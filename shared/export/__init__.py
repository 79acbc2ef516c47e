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

This package never imports Flower; onnx and onnxruntime are imported only when used.

Modules, one job each: `spec` (the architecture spec, the run directory, rebuilding a model),
`compaction`, `formats` (save / load / detect each format) and `predict` (running an exported
file). Import from `shared.export`: it re-exports the public API and holds `export`.
"""

from __future__ import annotations

import os

from shared.export.compaction import compact, compact_state
from shared.export.formats import (
    FLOAT16_RTOL,
    FORMATS,
    ONNX_OPSET,
    channel_count,
    dense_state_bytes,
    detect_format,
    fold_batchnorm,
    load_packed,
    save_onnx,
    save_packed,
    save_torchscript,
)
from shared.export.predict import Predictor, accuracy, latency_ms, load_predictor
from shared.export.spec import (
    META_KEY,
    PACKED_FORMAT,
    PACKED_VERSION,
    SPEC_FORMAT,
    SPEC_VERSION,
    ModelSpec,
    Tensors,
    fit_modules_to_state,
    load_run,
    read_spec,
    rebuild,
    write_spec,
)

__all__ = [
    "FLOAT16_RTOL",
    "FORMATS",
    "META_KEY",
    "ONNX_OPSET",
    "PACKED_FORMAT",
    "PACKED_VERSION",
    "SPEC_FORMAT",
    "SPEC_VERSION",
    "ModelSpec",
    "Predictor",
    "Tensors",
    "accuracy",
    "channel_count",
    "compact",
    "compact_state",
    "dense_state_bytes",
    "detect_format",
    "export",
    "fit_modules_to_state",
    "fold_batchnorm",
    "latency_ms",
    "load_packed",
    "load_predictor",
    "load_run",
    "read_spec",
    "rebuild",
    "save_onnx",
    "save_packed",
    "save_torchscript",
    "write_spec",
]


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
