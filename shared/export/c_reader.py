"""Reading a C model header without running it: a strict parser of what `c_export.header_text` writes.

Why: a header is code. Compiling one that came from outside runs whatever it holds (a function
marked `__attribute__((constructor))` runs before `main`), and arrays that disagree with their
layer table make the runtime read out of bounds. So before any header is compiled, `check_header`
parses its arrays, layer table and metadata, checks that every index the runtime reads is in
bounds, and regenerates the header from what it parsed with the exporter's own `header_text`: only
a header equal to that, byte for byte, is compiled (`c_export.build` compiles the checked text).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from shared.export import metadata as meta

MAX_HEADER_BYTES = 2**28
MAX_FLOATS = 2**26  # largest activation or layer a header may describe (the codec's decode budget)
_KINDS = {"FT_CONV2D": "conv", "FT_LINEAR": "linear", "FT_RELU": "relu", "FT_MAXPOOL2D": "maxpool",
          "FT_GLOBAL_AVGPOOL": "avgpool"}
_ARRAY = re.compile(r"static const (uint16_t|float) (ft_l(\d+)_(row_nnz|col|val|bias)|ft_mean|ft_std)\[(\d+)\] = "
                    r"\{\n    ([-+0-9.e,f \n]*)\n\};\n")
_ROW = re.compile(r"    \{(FT_[A-Z0-9_]+), ((?:-?\d+, ){12})(?:ft_l(\d+)_row_nnz, ft_l\3_col, ft_l\3_val, ft_l\3_bias|0, 0, 0, 0)"
                  r"\},  /\* ([A-Za-z0-9_.]+) \*/")
_GUARD = re.compile(r"#ifndef (FEDTINY_MODEL_[A-Z0-9_]*_H)\n")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


class HeaderError(ValueError):
    """A header that is not exactly what `fedtiny export --format c` writes (refused before compiling)."""


def check_header(path: str | Path) -> str:
    """The text of the model header at `path`, once it is known to be one `header_text` writes with
    in-bounds arrays; HeaderError (one line) otherwise. Nothing of the header is compiled or run."""
    from shared.export.c_export import header_text

    path = Path(path)
    if path.stat().st_size > MAX_HEADER_BYTES:
        raise HeaderError(f"{path}: {path.stat().st_size} bytes, over {MAX_HEADER_BYTES} for a model header")
    try:
        text = path.read_bytes().decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError(f"{path}: not a header written by `fedtiny export --format c` (non-ASCII bytes)") from None
    where = f"{path}: not a header written by `fedtiny export --format c`"
    metadata = _metadata(text, where)
    guard = _GUARD.search(text)
    ops = _ops(text, where)
    if guard is None or not ops:
        raise HeaderError(f"{where} (no include guard or no layer table)")
    _check_bounds(ops, metadata, where)
    expected = header_text(ops, metadata, guard.group(1))
    if expected != text:
        line = next(i for i, (a, b) in enumerate(zip(expected.splitlines() + [""], text.splitlines() + [""]), 1) if a != b)
        raise HeaderError(f"{where} (line {line} differs from what the exporter writes for its arrays; re-export it)")
    return text


def _metadata(text: str, where: str) -> dict[str, Any]:
    """The `fedtiny-meta:` object of the header's first comment, with the types `header_text` prints."""
    lines = text.split("\n", 3)
    if len(lines) < 3 or meta.C_META_PREFIX not in lines[1]:
        raise HeaderError(f"{where} (no {meta.C_META_PREFIX.strip()} line)")
    m = meta.from_json(lines[1].split(meta.C_META_PREFIX, 1)[1], where)
    norm = m.get("normalization") if isinstance(m.get("normalization"), dict) else {}
    shape = m.get("input_shape")
    ok = (isinstance(m.get("model"), str) and _SAFE_NAME.fullmatch(m["model"]) is not None
          and _is_int(m.get("num_classes")) and isinstance(shape, list) and len(shape) == 3 and all(map(_is_int, shape))
          and _is_number(m.get("density")) and _is_number(norm.get("divide_by"))
          and all(isinstance(norm.get(k), list) and all(map(_is_number, norm[k])) for k in ("mean", "std")))
    if not ok:
        raise HeaderError(f"{where} (its metadata lacks a plain model name, class count, input shape, density or normalization)")
    return m


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _values(ctype: str, body: str) -> np.ndarray:
    items = [s.strip() for s in body.replace("\n", " ").split(",")]
    if ctype == "float":
        return np.array([np.float32(s[:-1]) for s in items], dtype=np.float32)
    return np.array([int(s) for s in items], dtype=np.int64)


def _ops(text: str, where: str) -> list:
    """The layers of the header's table, with the arrays it names."""
    from shared.export.c_export import Op

    arrays: dict[tuple[int, str], np.ndarray] = {}
    try:
        for m in _ARRAY.finditer(text):
            if m.group(3) is not None:
                arrays[(int(m.group(3)), m.group(4))] = _values(m.group(1), m.group(6))
    except (ValueError, OverflowError) as exc:
        raise HeaderError(f"{where} (an array holds {exc})") from None
    ops = []
    for i, row in enumerate(_ROW.finditer(text)):
        numbers = [int(v) for v in row.group(2).split(", ") if v]
        index = row.group(3)
        if row.group(1) not in _KINDS or (index is not None and int(index) != i):
            raise HeaderError(f"{where} (layer row {i} is {row.group(1)} of layer {index})")
        op = Op(row.group(4), _KINDS[row.group(1)], tuple(numbers[:3]), tuple(numbers[3:6]), tuple(numbers[6:]))
        if index is not None:
            op.arrays = _csr_arrays(arrays, i, where)
        ops.append(op)
    return ops


def _csr_arrays(arrays: dict, i: int, where: str) -> dict[str, np.ndarray]:
    """row_nnz and col as uint16, val and bias as float32; an empty array is written as one zero."""
    try:
        row_nnz, col, val, bias = (arrays[(i, k)] for k in ("row_nnz", "col", "val", "bias"))
    except KeyError:
        raise HeaderError(f"{where} (layer {i} names arrays the header does not hold)") from None
    if row_nnz.min(initial=0) < 0 or max(row_nnz.max(initial=0), col.max(initial=0)) > 2**16 - 1 or col.min(initial=0) < 0:
        raise HeaderError(f"{where} (layer {i} has indices outside uint16)")
    if int(row_nnz.sum()) == 0:
        col, val = col[:0], val[:0]
    return {"row_nnz": row_nnz.astype(np.uint16), "col": col.astype(np.uint16), "val": val, "bias": bias}


def _check_bounds(ops: list, metadata: dict[str, Any], where: str) -> None:
    """Every read and write of `c/fedtiny_infer.c` stays inside its arrays and its scratch buffers."""
    shape = tuple(metadata["input_shape"])
    for i, op in enumerate(ops):
        bad = _layer_fault(op, shape)
        if bad:
            raise HeaderError(f"{where} (layer {i} {op.name}: {bad})")
        shape = op.out_shape
    if math.prod(shape) != metadata["num_classes"]:
        raise HeaderError(f"{where} (its last layer gives {shape}, not {metadata['num_classes']} logits)")
    c = metadata["input_shape"][0]
    if len(metadata["normalization"]["mean"]) != c or len(metadata["normalization"]["std"]) != c:
        raise HeaderError(f"{where} (its normalization does not have one mean and std per input channel)")


def _layer_fault(op, shape: tuple[int, ...]) -> str | None:
    """Why `op`, fed `shape`, would make the runtime index outside its arrays; None when it cannot."""
    dims = (*op.in_shape, *op.out_shape)
    follows = math.prod(op.in_shape) == math.prod(shape) if op.kind == "linear" else op.in_shape == tuple(shape)
    if not follows or min(dims) < 1 or max(math.prod(op.in_shape), math.prod(op.out_shape)) > MAX_FLOATS:
        return f"shapes {op.in_shape} -> {op.out_shape} do not follow {tuple(shape)}"
    (ci, hi, wi), (co, ho, wo) = op.in_shape, op.out_shape
    kh, kw, sh, sw, ph, pw = op.geometry
    if op.kind in ("conv", "maxpool") and (min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0 or max(kh, kw, ph, pw) > 2**12):
        return f"geometry {op.geometry}"
    if op.kind == "relu" and op.out_shape != op.in_shape or op.kind == "avgpool" and op.out_shape != (ci, 1, 1):
        return f"output {op.out_shape} for input {op.in_shape}"
    if op.kind == "maxpool" and co != ci:
        return f"{co} output channels for {ci} input channels"
    if op.kind == "conv" and (ho, wo) != ((hi + 2 * ph - kh) // sh + 1, (wi + 2 * pw - kw) // sw + 1):
        return f"output {op.out_shape} is not what its geometry gives"
    if op.kind == "linear" and (ho, wo) != (1, 1):
        return f"output {op.out_shape}"
    if op.kind not in ("conv", "linear"):
        return None
    columns = ci * kh * kw if op.kind == "conv" else ci * hi * wi
    a = op.arrays
    if len(a["row_nnz"]) != co or len(a["bias"]) != co:
        return f"{len(a['row_nnz'])} row counts and {len(a['bias'])} biases for {co} outputs"
    if int(a["row_nnz"].sum()) != len(a["col"]) or len(a["col"]) != len(a["val"]):
        return f"row counts sum to {int(a['row_nnz'].sum())} for {len(a['col'])} columns and {len(a['val'])} values"
    if len(a["col"]) and int(a["col"].max()) >= columns:
        return f"column {int(a['col'].max())} of {columns}"
    return None
