"""C export: a model header of compressed sparse rows (BN folded) for the reference C runtime in `c/`.

Why: FedTiny's point is a model small enough for a device without Python (arXiv 2212.01977).
The header holds, per conv / linear layer, the kept weights as float arrays with uint16 column
indices and uint16 per-row counts (CSR without a row-pointer array), and a table of layers that
`c/fedtiny_infer.c` runs. Only models whose forward is `classifier(flatten(features(x)))` (cnn,
cnn-pool, vgg11) built from the layers in `SUPPORTED` are exported; anything else is refused with
one line naming the layer.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from shared.export import metadata as meta
from shared.export.folding import fold_pair

RUNTIME_DIR = Path(__file__).resolve().parent / "c"
RUNTIME_FILES = ("fedtiny_infer.h", "fedtiny_infer.c")
MAIN_FILE = "fedtiny_main.c"
SUPPORTED = "Conv2d, BatchNorm after Conv2d/Linear, ReLU, MaxPool2d, AdaptiveAvgPool2d(1), Flatten, Linear, Dropout"
MAX_INDEX = 2**16 - 1
_OPS = {"conv": "FT_CONV2D", "linear": "FT_LINEAR", "relu": "FT_RELU", "maxpool": "FT_MAXPOOL2D",
        "avgpool": "FT_GLOBAL_AVGPOOL"}
_SKIP = (nn.Dropout, nn.Identity)


@dataclass
class Op:
    """One layer of the C program: its kind, input and output shapes (C, H, W), geometry, CSR arrays."""

    name: str
    kind: str
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    geometry: tuple[int, ...] = (0, 0, 0, 0, 0, 0)  # kernel h, w, stride h, w, padding h, w
    weight: torch.Tensor | None = None  # (out, columns), BN folded, pruned entries zero
    bias: torch.Tensor | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


# ----------------------------------------------------------------------------- model -> program


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The flat (name, module) sequence of features, flatten and classifier; refuses other models."""
    from shared.models import VGG, _FeaturesThenHead

    if not isinstance(model, (_FeaturesThenHead, VGG)):
        bad = _first_unsupported(model)
        detail = f"layer {bad[0]} ({type(bad[1]).__name__})" if bad else type(model).__name__
        raise ValueError(f"C export cannot run {detail}: it supports features -> flatten -> classifier models "
                         f"(cnn, cnn-pool, vgg11) of {SUPPORTED}")
    chain = list(_flat("features", model.features)) + [("flatten", nn.Flatten())]
    return chain + list(_flat("classifier", model.classifier))


def _flat(name: str, module: nn.Module):
    if isinstance(module, nn.Sequential):
        for child, sub in module.named_children():
            yield from _flat(f"{name}.{child}", sub)
    else:
        yield name, module


def _first_unsupported(model: nn.Module) -> tuple[str, nn.Module] | None:
    known = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
             nn.Flatten, *_SKIP)
    for child, sub in model.named_children():
        for name, m in _flat(child, sub):
            if not isinstance(m, known):
                return name, m
    return None


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return (int(shape[0]), 1, 1) if len(shape) == 1 else tuple(int(s) for s in shape)


def _refuse(name: str, m: nn.Module, why: str = "") -> ValueError:
    return ValueError(f"C export cannot run layer {name} ({type(m).__name__}{': ' + why if why else ''}); "
                      f"supported: {SUPPORTED}")


def _op_for(name: str, m: nn.Module, shape: tuple[int, ...], out: tuple[int, ...]) -> Op | None:
    """The C op of one module (None for no-ops), or ValueError naming it."""
    ins, outs = _shape3(shape), _shape3(out)
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or _pair(m.dilation) != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise _refuse(name, m, "only groups=1, dilation=1, numeric zero padding")
        geometry = (*_pair(m.kernel_size), *_pair(m.stride), *_pair(m.padding))
        w = m.weight.detach().reshape(m.out_channels, -1)
        return Op(name, "conv", ins, outs, geometry, w, _bias(m))
    if isinstance(m, nn.Linear):
        return Op(name, "linear", ins, outs, weight=m.weight.detach(), bias=_bias(m))
    if isinstance(m, nn.ReLU):
        return Op(name, "relu", ins, outs)
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.dilation) != (1, 1) or m.return_indices:
            raise _refuse(name, m, "only dilation=1")
        return Op(name, "maxpool", ins, outs, (*_pair(m.kernel_size), *_pair(m.stride or m.kernel_size),
                                               *_pair(m.padding)))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if _pair(m.output_size) != (1, 1):
            raise _refuse(name, m, "only output size 1")
        return Op(name, "avgpool", ins, outs)
    if isinstance(m, (nn.Flatten, *_SKIP)):
        return None
    raise _refuse(name, m)


def _bias(m: nn.Module) -> torch.Tensor:
    return m.bias.detach() if m.bias is not None else torch.zeros(m.weight.shape[0])


def program(model: nn.Module) -> list[Op]:
    """The model (eval mode) as C ops, each BN folded into the conv / linear before it, CSR arrays built."""
    model = model.eval()
    x = torch.zeros(1, *model.input_shape)
    ops: list[Op] = []
    previous: nn.Module | None = None
    with torch.no_grad():
        for name, m in _chain(model):
            y = m(x.clone())
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if not (isinstance(previous, (nn.Conv2d, nn.Linear)) and ops and ops[-1].weight is not None):
                    raise _refuse(name, m, "batch norm must follow a Conv2d or Linear")
                stats = {k: v for k, v in m.state_dict().items() if k != "num_batches_tracked"}
                ops[-1].weight, ops[-1].bias = fold_pair(ops[-1].weight, ops[-1].bias, stats, m.eps)
            else:
                op = _op_for(name, m, tuple(x.shape[1:]), tuple(y.shape[1:]))
                if op is not None:
                    ops.append(op)
            previous, x = m, y
    for op in ops:
        if op.weight is not None:
            op.arrays = _csr(op)
    return ops


def _csr(op: Op) -> dict[str, np.ndarray]:
    """row_nnz (uint16 per output channel), col (uint16), val and bias (float32) of a conv / linear op."""
    w = op.weight.float().numpy()
    if w.shape[1] > MAX_INDEX:
        raise ValueError(f"C export cannot run layer {op.name}: {w.shape[1]} inputs per output, "
                         f"more than uint16 column indices hold ({MAX_INDEX})")
    rows, cols = np.nonzero(w)
    if not np.isfinite(w).all() or not torch.isfinite(op.bias).all():
        raise ValueError(f"C export: layer {op.name} has non-finite weights")
    return {
        "row_nnz": np.bincount(rows, minlength=w.shape[0]).astype(np.uint16),
        "col": cols.astype(np.uint16),
        "val": w[rows, cols].astype(np.float32),
        "bias": op.bias.float().numpy().astype(np.float32),
    }


# ----------------------------------------------------------------------------- program -> header


def _c_float(v: float) -> str:
    text = str(np.float32(v))  # shortest decimal that reads back as this float32
    return text + ("f" if ("." in text or "e" in text) else ".0f")


def _array(ctype: str, name: str, values: np.ndarray) -> str:
    """`static const ctype name[n] = {...};` (one zero for an empty array: C has no empty arrays)."""
    items = [_c_float(v) for v in values] if ctype == "float" else [str(int(v)) for v in values]
    items = items or ["0"]
    lines = [", ".join(items[i : i + 12]) for i in range(0, len(items), 12)]
    return f"static const {ctype} {name}[{len(items)}] = {{\n    " + ",\n    ".join(lines) + "\n};\n"


def data_bytes(ops: list[Op]) -> int:
    """Bytes of the weight, index and bias arrays a device stores (the header's text is larger)."""
    return sum(int(a.nbytes) for op in ops for a in op.arrays.values())


def _layer_row(i: int, op: Op) -> str:
    arrays = ", ".join(f"ft_l{i}_{k}" for k in ("row_nnz", "col", "val", "bias")) if op.arrays else "0, 0, 0, 0"
    shapes = ", ".join(str(s) for s in (*op.in_shape, *op.out_shape, *op.geometry))
    return f"    {{{_OPS[op.kind]}, {shapes}, {arrays}}},  /* {op.name} */"


def header_text(ops: list[Op], metadata: Mapping[str, Any], guard: str) -> str:
    """The C header: a metadata comment, the arrays, the layer table and `fedtiny_model`."""
    norm = metadata["normalization"]
    c, h, w = metadata["input_shape"]
    max_floats = max(math.prod(s) for op in ops for s in (op.in_shape, op.out_shape))
    meta_line = meta.to_json(metadata).replace("*/", "*\\/")
    parts = [
        f"/* Generated by `fedtiny export --format c`: model {metadata['model']}, density "
        f"{metadata['density']:.4g}, BN folded. Run with fedtiny_infer.c (see fedtiny_infer.h).\n"
        f" * {meta.C_META_PREFIX}{meta_line}\n */\n",
        f"#ifndef {guard}\n#define {guard}\n\n#include \"fedtiny_infer.h\"\n\n",
        f"#define FEDTINY_DATA_BYTES {data_bytes(ops)}\n#define FEDTINY_MAX_FLOATS {max_floats}\n\n",
    ]
    for i, op in enumerate(ops):
        for key, ctype in (("row_nnz", "uint16_t"), ("col", "uint16_t"), ("val", "float"), ("bias", "float")):
            if op.arrays:
                parts.append(_array(ctype, f"ft_l{i}_{key}", op.arrays[key]))
    parts.append(_array("float", "ft_mean", np.array(norm["mean"])))
    parts.append(_array("float", "ft_std", np.array(norm["std"])))
    parts.append("static const ft_layer ft_layers[] = {\n" + "\n".join(_layer_row(i, op) for i, op in enumerate(ops))
                 + "\n};\n\n")
    parts.append(f"static const ft_model fedtiny_model = {{{len(ops)}, ft_layers, {c}, {h}, {w}, "
                 f"{metadata['num_classes']}, {max_floats}, ft_mean, ft_std, {_c_float(norm['divide_by'])}}};\n\n"
                 f"#endif\n")
    return "".join(parts)


def save_c(path: str | os.PathLike, model: nn.Module, metadata: Mapping[str, Any]) -> int:
    """Write the model header to `path` and copy the runtime (`RUNTIME_FILES`) beside it; returns the header's bytes."""
    path = Path(path)
    _check_chain(model)
    guard = "FEDTINY_MODEL_" + re.sub(r"[^A-Za-z0-9]", "_", path.stem).upper() + "_H"
    path.write_text(header_text(program(model), metadata, guard))
    for name in RUNTIME_FILES:
        if path.parent.resolve() != RUNTIME_DIR:
            shutil.copyfile(RUNTIME_DIR / name, path.parent / name)
    return path.stat().st_size


def _check_chain(model: nn.Module) -> None:
    """The flat chain must compute what the model's forward computes (a guard for user subclasses)."""
    model = model.eval()
    x = torch.randn(2, *model.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, y = model(x), x
        for _, m in _chain(model):
            y = m(y)
    if y.shape != expected.shape or not torch.allclose(y, expected, atol=1e-5, rtol=1e-5):
        raise ValueError(f"C export: {type(model).__name__}'s forward is not features -> flatten -> classifier")


def read_header_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata object in a C header's `fedtiny-meta:` comment line; None when it has none."""
    with open(path, encoding="utf-8") as f:
        for _, line in zip(range(20), f):
            if meta.C_META_PREFIX in line:
                return meta.from_json(line.split(meta.C_META_PREFIX, 1)[1], str(path))
    return None


# ----------------------------------------------------------------------------- building


def build(header: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """Compile `fedtiny_main.c` + the runtime with `header` into `workdir`/fedtiny_infer; returns the binary.

    A header is code, so only one that `c_reader.check_header` finds to be exactly what this module
    writes, with in-bounds arrays, is compiled, from the checked copy in `workdir`. Uses $CC or cc;
    a refused header, a missing compiler or a failed build is one ValueError line.
    """
    from shared.export.c_reader import check_header

    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise ValueError(f"no C compiler {cc!r} on PATH (set CC)")
    binary = Path(workdir) / "fedtiny_infer"
    text = check_header(header)
    header = Path(workdir).resolve() / "model.h"
    header.write_text(text)
    command = [cc, "-O2", "-std=c99", "-Wall", "-Werror", f"-I{RUNTIME_DIR}", f'-DFEDTINY_MODEL_HEADER="{header}"',
               str(RUNTIME_DIR / MAIN_FILE), str(RUNTIME_DIR / "fedtiny_infer.c"), "-lm", "-o", str(binary)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
        raise ValueError(f"compiling {header.name} failed: {first}")
    return binary


def run_binary(binary: str | os.PathLike, x: torch.Tensor, pixels: bool = False) -> torch.Tensor:
    """Logits of a batch from a `build` binary: inputs as float32 on stdin, one line of logits per input."""
    data = x.detach().float().contiguous().numpy().astype("<f4").tobytes()
    done = subprocess.run([str(binary), *(["--pixels"] if pixels else [])], input=data, capture_output=True,
                          check=True)
    rows = [list(map(float, line.split())) for line in done.stdout.decode().splitlines()]
    return torch.tensor(rows, dtype=torch.float32)
