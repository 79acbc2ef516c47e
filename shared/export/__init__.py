"""Edge export of a finished run's tiny model: packed codec file, ONNX, TorchScript, C header; compaction.

Why: FedTiny ("Distributed Pruning Towards Tiny Neural Networks in Federated Learning",
arXiv 2212.01977) exists to ship a tiny model to a device, so the run's sparse model has to leave
the framework in a form a device can load, and must still be the same model (same logits).

- `packed`: the wire codec (`shared.codec`) file: BN folded into the layer before it (`folding`),
  masked weights as their kept values plus a bitmask or delta-coded indices, biases dense, and a
  JSON `__meta__` entry (a uint8 tensor, no pickle) naming the architecture, so `load_packed`
  rebuilds it with torch, numpy and `shared` only. Masked values may be float16 (about half the
  size; see `FLOAT16_RTOL`).
- `compact`: channels and neurons that are provably dead or unused are removed physically
  (see `compact_state`), giving a smaller dense model with the same logits.
- `onnx`: BN folded into the preceding conv / linear layers, then the TorchScript-based exporter;
  pruned weights stored as kept values and uint16 gaps, rebuilt in the graph (`onnx_sparse`).
- `torchscript`: `torch.jit.trace` of the model in eval mode.
- `c`: a C header of compressed sparse rows (BN folded) for the reference runtime in `c/`
  (`c_export`), which needs no Python on the device.

Every format records the same metadata (`metadata.describe`): architecture, dataset, seed, test
split, input normalization and density; `read_metadata` reads it back from any exported file.

This package never imports Flower; onnx and onnxruntime are imported only when used.

Modules, one job each: `spec` (the architecture spec, the run directory, rebuilding a model),
`folding` (BN into conv / linear), `compaction`, `metadata`, `formats` (choose, save, load, detect
each format), `onnx_sparse`, `c_export` and `predict` (running an exported file). Import from
`shared.export`: it re-exports the public API and holds `export`.
"""

from __future__ import annotations

import os
from pathlib import Path

from shared import rundir
from shared.export.c_export import build as build_c
from shared.export.c_export import run_binary as run_c
from shared.export.c_export import save_c

from shared.export.compaction import compact, compact_state
from shared.export.formats import (
    FLOAT16_RTOL,
    FORMATS,
    ONNX_OPSET,
    SUFFIXES,
    channel_count,
    dense_state_bytes,
    detect_format,
    fold_batchnorm,
    format_for,
    load_packed,
    read_metadata,
    save_onnx,
    save_packed,
    save_torchscript,
)
from shared.export.metadata import DATA_KEYS, describe, run_data
from shared.export.predict import Predictor, accuracy, latency_ms, load_predictor
from shared.export.spec import (
    META_KEY,
    PACKED_FORMAT,
    PACKED_VERSION,
    PACKED_VERSIONS_READ,
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
    "DATA_KEYS",
    "FLOAT16_RTOL",
    "FORMATS",
    "META_KEY",
    "ONNX_OPSET",
    "PACKED_FORMAT",
    "PACKED_VERSION",
    "PACKED_VERSIONS_READ",
    "SPEC_FORMAT",
    "SPEC_VERSION",
    "SUFFIXES",
    "ModelSpec",
    "Predictor",
    "Tensors",
    "accuracy",
    "build_c",
    "channel_count",
    "compact",
    "compact_state",
    "dense_state_bytes",
    "describe",
    "detect_format",
    "export",
    "fit_modules_to_state",
    "fold_batchnorm",
    "format_for",
    "latency_ms",
    "load_packed",
    "load_predictor",
    "load_run",
    "read_metadata",
    "read_spec",
    "rebuild",
    "run_c",
    "run_data",
    "save_c",
    "save_onnx",
    "save_packed",
    "save_torchscript",
    "write_spec",
]


def export(output_dir: str | os.PathLike, fmt: str | None, out: str | os.PathLike,
           compact_model: bool = False, float16: bool = False) -> dict:
    """Export a finished run's model; returns {"format", "bytes", "dense_bytes", "ratio", "channels_removed"}.

    `fmt` None: from the suffix of `out` (`SUFFIXES`); given, it must agree with the suffix.
    Every format records `describe`'s metadata (data settings, preprocessing, density).
    """
    fmt = format_for(out, fmt)
    if float16 and fmt != "packed":
        raise ValueError("--float16 applies to --format packed only")
    model, masks, spec = load_run(output_dir)
    spec_file = read_spec(output_dir) if (Path(output_dir) / rundir.MODEL_SPEC).is_file() else None
    info = describe(output_dir, spec, masks, spec_file, compact=compact_model, float16=float16, export_format=fmt,
                    bn_folded=fmt != "torchscript")
    dense = dense_state_bytes(model)
    before = channel_count(model)
    if compact_model:
        model, masks = compact(model, spec, masks)
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # `--out m/model.h` makes m/, as a user expects
    if fmt == "packed":
        size = save_packed(out, model, spec, masks, compact=compact_model, float16=float16, metadata=info)
    elif fmt == "onnx":
        size = save_onnx(out, model, spec.input_shape, metadata=info)
    elif fmt == "torchscript":
        size = save_torchscript(out, model, spec.input_shape, metadata=info)
    else:
        size = save_c(out, model, info)
    removed = before - channel_count(model)
    return {"format": fmt, "bytes": size, "dense_bytes": dense, "ratio": size / dense, "channels_removed": removed}
