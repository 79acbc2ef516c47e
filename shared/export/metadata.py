"""What every exported file records about its model: architecture, data, preprocessing, density.

Why: a device (or `fedtiny infer`) given one file must know how to feed it (input shape and the
normalization `shared.data.to_tensor` applied in training) and which data it belongs to (dataset,
seed and test split), without the run directory. The same JSON object goes into every format:
packed (`__meta__`), ONNX (`metadata_props["fedtiny"]`), TorchScript (extra file
`fedtiny.json`) and the C header (a `fedtiny-meta:` comment line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from shared import rundir

META_FORMAT = "fedtiny-export"
META_VERSION = 1
ONNX_META_KEY = "fedtiny"
TORCHSCRIPT_META_FILE = "fedtiny.json"
C_META_PREFIX = "fedtiny-meta: "
DATA_KEYS = ("dataset", "seed", "test_fraction")
"""The settings that pick the test split; `fedtiny infer` takes them from a file's metadata."""


def run_data(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Dataset name, path, seed and test_fraction from a run's `rundir.CONFIG`.

    Read as plain YAML (no validation), so an older run's config still gives its data settings.
    An empty dict when the run has no config file. Its `trusted` list is not read: a folder does
    not choose what code its reader trusts (`shared.saved_config`).
    """
    path = Path(output_dir) / rundir.CONFIG
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    dataset = config.get("dataset") or {}
    return {
        "dataset": dataset.get("name"),
        "dataset_path": dataset.get("path", ""),
        "seed": config.get("seed"),
        "test_fraction": dataset.get("test_fraction"),
    }


def density(masks: Mapping[str, torch.Tensor]) -> tuple[float, int, int]:
    """(kept / prunable, kept, prunable) over the masked tensors; 1.0 without masks."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return (kept / total if total else 1.0), kept, total


def normalization(output_dir: str | os.PathLike, spec_file: Mapping[str, Any] | None) -> dict[str, Any]:
    """The input preprocessing of the run: from its model spec file, else from its dataset (older runs)."""
    if spec_file is not None:
        return dict(spec_file["normalization"])
    data = run_data(output_dir)
    from shared.data import load_dataset

    bundle = load_dataset(data["dataset"], data["dataset_path"], data["seed"], data["test_fraction"])
    uint8 = str(bundle.x_train.dtype) == "uint8"
    return {
        "input_dtype": "uint8" if uint8 else "float32",
        "divide_by": 255.0 if uint8 else 1.0,
        "mean": [float(m) for m in bundle.mean],
        "std": [float(s) for s in bundle.std],
        "formula": "x = (pixels / divide_by - mean[c]) / std[c] for each channel c",
    }


def describe(output_dir: str | os.PathLike, spec: Any, masks: Mapping[str, torch.Tensor],
             spec_file: Mapping[str, Any] | None, **flags: Any) -> dict[str, Any]:
    """The metadata object of an export of the run in `output_dir` (`spec`: its `ModelSpec`; `masks`: uncompacted).

    `flags` (compact, float16, export_format, ...) are recorded as given.
    """
    data = run_data(output_dir)
    recorded = spec_file or {}
    fraction, kept, total = density(masks)
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "model": spec.model,
        "width": spec.width,
        "num_classes": spec.num_classes,
        "input_shape": list(spec.input_shape),
        "dataset": data.get("dataset") or recorded.get("dataset"),
        "seed": data["seed"] if data.get("seed") is not None else recorded.get("seed"),
        "test_fraction": data.get("test_fraction"),
        "normalization": normalization(output_dir, spec_file),
        "density": fraction,
        "kept_weights": kept,
        "prunable_weights": total,
        **flags,
    }


def to_json(meta: Mapping[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True)


def from_json(text: str, where: str) -> dict[str, Any]:
    """Parse a metadata object; ValueError naming `where` when corrupt or of another version."""
    try:
        meta = json.loads(text)
        version = (meta.get("format"), meta.get("version"))
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise ValueError(f"{where}: corrupt fedtiny metadata ({type(exc).__name__}: {exc})") from None
    if version != (META_FORMAT, META_VERSION):
        raise ValueError(
            f"{where}: metadata is {version[0]} v{version[1]}; this build reads {META_FORMAT} v{META_VERSION}"
        )
    return meta
