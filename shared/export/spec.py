"""What rebuilds a run's model: the architecture spec, the run directory's model spec file, `load_run`.

A run writes `rundir.MODEL_SPEC` (`write_spec`, called by the ServerApp right after the config)
so that export never loads the dataset: a small JSON file with the architecture (model, width,
num_classes, input_shape), the seed, the dataset name and the input normalization a device must
apply, ``x = (pixels / divide_by - mean[c]) / std[c]`` per channel c, exactly what
`shared.data.to_tensor` does during training and evaluation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from torch import nn

from shared import codec, rundir
from shared.export.folding import drop_modules, fold_state
from shared.models import build_model

if TYPE_CHECKING:
    from shared.config import Config
    from shared.data import DataBundle

Tensors = dict[str, torch.Tensor]

META_KEY = "__meta__"
PACKED_FORMAT = "fedtiny-packed"
PACKED_VERSION = 2
PACKED_VERSIONS_READ = (1, 2)
"""v2 (BN folded, `folded` names the removed BNs, `metadata` as in `shared.export.metadata`); v1 still loads."""
SPEC_FORMAT = "fedtiny-model-spec"
SPEC_VERSION = 1
MAX_META_BYTES = 2**20  # a packed file's `__meta__` JSON (a real one is about 1 kB)
MAX_CLASSES = 100_000
MAX_SIDE = 4096  # input channels, height and width
MAX_WIDTH = 16.0  # as config's model.width

# ----------------------------------------------------------------------------- architecture spec


@dataclass(frozen=True)
class ModelSpec:
    """What `shared.models.build_model` needs to rebuild an architecture (stored in packed files)."""

    model: str
    num_classes: int
    input_shape: tuple[int, int, int]
    width: float

    def __post_init__(self) -> None:
        """Files carry these sizes, so they are bounded before anything is built from them."""
        shape, width = self.input_shape, self.width
        if not 0 < len(self.model) <= 200:
            raise ValueError(f"model name of {len(self.model)} characters")
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes {self.num_classes} is not in [1, {MAX_CLASSES}]")
        if len(shape) != 3 or not all(1 <= d <= MAX_SIDE for d in shape):
            raise ValueError(f"input_shape {shape[:4]} is not (C, H, W) with each in [1, {MAX_SIDE}]")
        if not (math.isfinite(width) and 0 < width <= MAX_WIDTH):
            raise ValueError(f"width {width} is not in (0, {MAX_WIDTH}]")

    def build(self) -> nn.Module:
        """The architecture, once its size (counted on the meta device, nothing allocated) fits the
        decode budget `codec.MAX_ELEMENTS`."""
        with torch.device("meta"):
            size = sum(t.numel() for t in build_model(self.model, self.num_classes, self.input_shape, self.width)
                       .state_dict().values())
        if size > codec.MAX_ELEMENTS:
            raise ValueError(f"model {self.model} of width {self.width:g} for {self.num_classes} classes and inputs "
                             f"{self.input_shape} has {size} elements, over {codec.MAX_ELEMENTS}")
        return build_model(self.model, self.num_classes, self.input_shape, self.width)

    def packed_layout(self) -> codec.Expected:
        """What a packed file of this architecture may hold, for `codec.decode(at_most=True)`: its
        tensors unfolded and BN-folded (biases added), each no larger (compaction only removes channels),
        and the `__meta__` entry."""
        model = self.build().eval()
        layout = {**codec.expect(model.state_dict()), **codec.expect(fold_state(model)[0])}
        return {**layout, META_KEY: ((MAX_META_BYTES,), torch.uint8)}

    def to_tensor(self, compact: bool, folded: tuple[str, ...] | list[str] = (),
                  metadata: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The packed file's `__meta__` entry: JSON bytes as a uint8 tensor (no pickle)."""
        meta = {"format": PACKED_FORMAT, "version": PACKED_VERSION, "compact": compact, **asdict(self),
                "folded": list(folded), "metadata": dict(metadata or {})}
        return torch.tensor(list(json.dumps(meta, sort_keys=True).encode("utf-8")), dtype=torch.uint8)

    @staticmethod
    def from_tensor(t: torch.Tensor) -> ModelSpec:
        return ModelSpec.from_header(packed_header(t))

    @staticmethod
    def from_header(meta: Mapping[str, Any]) -> ModelSpec:
        return ModelSpec(str(meta["model"]), int(meta["num_classes"]),
                         tuple(int(s) for s in meta["input_shape"]), float(meta["width"]))


def packed_header(t: torch.Tensor) -> dict[str, Any]:
    """The parsed `__meta__` entry of a packed file of a version this build reads; ValueError otherwise."""
    try:
        meta = json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))
        version = (meta.get("format"), meta.get("version"))
        ModelSpec.from_header(meta)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError,
            OverflowError) as exc:
        raise ValueError(f"packed file has a corrupt {META_KEY} entry ({type(exc).__name__}: {exc})") from None
    folded = meta.get("folded", [])
    if not (isinstance(folded, list) and all(isinstance(n, str) for n in folded)):
        raise ValueError(f"packed file has a corrupt {META_KEY} entry (folded is not a list of layer names)")
    if version[0] != PACKED_FORMAT or version[1] not in PACKED_VERSIONS_READ:
        raise ValueError(
            f"packed file is {version[0]} v{version[1]}; this build reads {PACKED_FORMAT} "
            f"v{', v'.join(map(str, PACKED_VERSIONS_READ))}"
        )
    return meta


# ----------------------------------------------------------------------------- run directory


def write_spec(out_dir: str | os.PathLike, config: Config, bundle: DataBundle) -> Path:
    """Write the run's `rundir.MODEL_SPEC` (architecture, seed, dataset, input normalization); returns its path.

    `normalization` records what `shared.data.to_tensor` applies to a batch: uint8 images are
    divided by 255 (`divide_by`), then each channel c becomes (x - mean[c]) / std[c].
    """
    uint8 = bundle.x_train.dtype == np.uint8
    spec = {
        "format": SPEC_FORMAT,
        "version": SPEC_VERSION,
        "model": config.model.name,
        "width": float(config.model.width),
        "seed": int(config.seed),
        "num_classes": int(bundle.num_classes),
        "input_shape": [int(s) for s in bundle.input_shape],
        "dataset": config.dataset.name,
        "normalization": {
            "input_dtype": "uint8" if uint8 else "float32",
            "divide_by": 255.0 if uint8 else 1.0,
            "mean": [float(m) for m in bundle.mean],
            "std": [float(s) for s in bundle.std],
            "formula": "x = (pixels / divide_by - mean[c]) / std[c] for each channel c",
        },
    }
    path = Path(out_dir) / rundir.MODEL_SPEC
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def read_spec(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's `rundir.MODEL_SPEC` as written by `write_spec`; ValueError when corrupt or of another version."""
    path = Path(out_dir) / rundir.MODEL_SPEC
    try:
        spec = json.loads(path.read_text())
        version = (spec.get("format"), spec.get("version"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from None
    if version != (SPEC_FORMAT, SPEC_VERSION):
        raise ValueError(f"{path} is {version[0]} v{version[1]}; this build reads {SPEC_FORMAT} v{SPEC_VERSION}")
    return spec


def _model_spec(spec: Mapping[str, Any], path: Path) -> ModelSpec:
    try:
        return ModelSpec(str(spec["model"]), int(spec["num_classes"]),
                         tuple(int(s) for s in spec["input_shape"]), float(spec["width"]))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{path} is corrupt ({type(exc).__name__}: {exc})") from None


def _spec_from_dataset(out: Path) -> ModelSpec:
    """Runs written before `rundir.MODEL_SPEC` existed: the class count and image shape from the dataset."""
    from shared.data import load_dataset
    from shared.saved_config import load_saved

    config = load_saved(out)  # the folder's own trusted list is not honoured
    d = config.dataset
    bundle = load_dataset(d.name, d.path, config.seed, d.test_fraction)
    return ModelSpec(config.model.name, bundle.num_classes, bundle.input_shape, float(config.model.width))


def load_run(output_dir: str | os.PathLike) -> tuple[nn.Module, Tensors, ModelSpec]:
    """The in-framework model of a finished run (eval mode, masks applied), its masks and its spec.

    Reads `rundir.MODEL` and `rundir.MODEL_SPEC`; the dataset is not loaded. A run directory
    written before the spec file existed falls back to `rundir.CONFIG` and loads the dataset
    (for its class count and image shape only), so older runs still export.
    """
    out = Path(output_dir)
    has_spec = (out / rundir.MODEL_SPEC).is_file()
    for name in (rundir.MODEL,) if has_spec else (rundir.CONFIG, rundir.MODEL):
        if not (out / name).is_file():
            raise FileNotFoundError(f"{out / name} not found: pass the output directory of a finished run")
    spec = _model_spec(read_spec(out), out / rundir.MODEL_SPEC) if has_spec else _spec_from_dataset(out)
    layout = codec.expect(spec.build().state_dict())  # a run's model is not compacted: sized before it is read
    tensors, masks = codec.load(out / rundir.MODEL, expected=layout)
    return rebuild(spec, tensors, masks), masks, spec


def rebuild(
    spec: ModelSpec, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None,
    folded: tuple[str, ...] | list[str] = (),
) -> nn.Module:
    """`spec`'s architecture with layers resized to `state`'s shapes (compacted files), `state` loaded, eval mode.

    The BNs named in `folded` are replaced by identities (their scale and shift are in `state`).
    """
    model = drop_modules(spec.build(), list(folded))
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
