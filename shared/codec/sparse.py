"""Sparse top-k payloads (`encode_sparse` / `decode_sparse`): (flat index, float32 value) pairs."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from shared.codec.binary import (
    _HEADER,
    _U8,
    _U64,
    SPARSE_MAGIC,
    VERSION,
    DecodeError,
    _bytes_tensor,
    _check_name,
    _pack_name,
    _pack_shape,
    _read_header,
    _Reader,
    decode_errors,
)
from shared.codec.expect import MAX_ELEMENTS


def encode_sparse(parts: Mapping[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]) -> bytes:
    """Serialise top-k sparse tensors as (flat index, float32 value) pairs plus the dense shape.

    Used for FedTiny's top-k gradients of pruned positions, whose budget is O(k), not O(numel).
    Indices travel as u32 when the tensor has fewer than 2**32 elements, else u64.
    """
    out = [_HEADER.pack(SPARSE_MAGIC, VERSION, len(parts))]
    for name, (indices, values, shape) in parts.items():
        shape = tuple(int(d) for d in shape)
        indices = indices.detach().cpu().reshape(-1).to(torch.int64)
        values = values.detach().cpu().reshape(-1)
        numel = math.prod(shape)
        if indices.numel() != values.numel():
            raise ValueError(f"sparse {name!r}: {indices.numel()} indices but {values.numel()} values")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise ValueError(f"sparse {name!r}: indices out of range for shape {shape}")
        width = 4 if numel < 2**32 else 8
        out += [_pack_name(name), _pack_shape(name, shape), _U8.pack(width), _U64.pack(indices.numel())]
        out.append(indices.numpy().astype("<u4" if width == 4 else "<u8").tobytes())
        out.append(values.to(torch.float32).numpy().astype("<f4").tobytes())
    return b"".join(out)


@decode_errors
def decode_sparse(
    data: bytes, max_bytes: int | None = None, *, expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    """Inverse of `encode_sparse`: name -> (int64 flat indices, float32 values, shape).

    With `expected` (name -> dense shape), every entry must be one of those names with that shape
    (fewer entries are allowed), checked before its indices are read, so a receiver that scatters
    the entries into dense tensors allocates no more than it expected; without it, each shape holds
    at most `MAX_ELEMENTS` elements. Each entry holds at most as
    many indices as its shape has elements. Indices out of range or repeated, unexpected names or
    shapes, and any malformed input raise `DecodeError`, and nothing else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"decode_sparse expects bytes, got {type(data).__name__}")
    reader = _Reader(bytes(data))
    count = _read_header(reader, SPARSE_MAGIC, max_bytes, min_entry=2 + 1 + 1 + 8)
    if expected is not None and count > len(expected):
        raise DecodeError(f"sparse payload claims {count} entries, the receiver expects at most {len(expected)}")
    result: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
    seen: set[str] = set()
    for _ in range(count):
        name = reader.name()
        _check_name(name, seen)
        shape = reader.shape(name)
        if expected is not None and (name not in expected or tuple(expected[name]) != shape):
            want = tuple(expected[name]) if name in expected else f"one of {sorted(expected)[:3]}"
            raise DecodeError(f"sparse entry {name[:60]!r} of shape {shape} is not what the receiver expects ({want})")
        width = reader.unpack(_U8, f"{name!r} index width")
        if width not in (4, 8):
            raise DecodeError(f"sparse {name!r} has index width {width}, expected 4 or 8")
        k = reader.unpack(_U64, f"{name!r} count")
        if k * (width + 4) > reader.remaining:
            raise DecodeError(f"sparse {name!r} claims {k} entries but only {reader.remaining} bytes remain")
        numel = math.prod(shape)
        if expected is None and numel > MAX_ELEMENTS:  # also keeps every index below 2**63 (no int64 wrap)
            raise DecodeError(f"sparse {name!r} claims shape {shape}: more than {MAX_ELEMENTS} elements")
        if k > numel:
            raise DecodeError(f"sparse {name!r} claims {k} entries for a tensor of {numel} elements")
        idx = np.frombuffer(reader.take(k * width, f"{name!r} indices"), dtype="<u4" if width == 4 else "<u8")
        if k and int(idx.max()) >= numel:
            raise DecodeError(f"sparse {name!r}: index {int(idx.max())} out of range for shape {shape}")
        if np.unique(idx).size != idx.size:
            raise DecodeError(f"sparse {name!r}: repeated indices")
        values = _bytes_tensor(reader.take(k * 4, f"{name!r} values"), 1)
        result[name] = (torch.from_numpy(idx.astype(np.int64)), values, shape)
    if reader.remaining:
        raise DecodeError(f"{reader.remaining} unexpected bytes after the last sparse entry")
    return result
