"""Binary primitives of the codec: format constants, dtype codes, tensor bytes, varints, the bounds-checked
reader, and `DecodeError`, the one exception every decode raises."""

from __future__ import annotations

import functools
import struct
from typing import Callable, TypeVar

import numpy as np
import torch

MAGIC = b"FTC"
SPARSE_MAGIC = b"FTS"
VERSION = 1
MAX_NDIM = 16

_HEADER = struct.Struct("<3sBI")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

F = TypeVar("F", bound=Callable)


class DecodeError(ValueError):
    """Bytes that do not decode to what the receiver expects: malformed, truncated, oversize, or
    naming tensors, shapes or dtypes it did not ask for. The only exception a decode raises."""


def decode_errors(fn: F) -> F:
    """Make `fn` raise only `DecodeError`: any other failure while decoding bytes from outside
    (struct, index, allocation, unicode, zlib errors, ...) becomes one, with its first line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001  the point: nothing else reaches the caller
            text = str(exc).splitlines()[0] if str(exc) else ""
            raise DecodeError(f"malformed payload ({type(exc).__name__}{': ' + text if text else ''})") from exc

    return wrapper  # type: ignore[return-value]

# dtype code -> (torch dtype, little-endian numpy dtype of its bytes)
_DTYPES: dict[int, tuple[torch.dtype, str]] = {
    1: (torch.float32, "<f4"),
    2: (torch.float64, "<f8"),
    3: (torch.float16, "<f2"),
    4: (torch.bfloat16, "<i2"),  # numpy has no bfloat16: its bits travel as int16
    5: (torch.int64, "<i8"),
    6: (torch.int32, "<i4"),
    7: (torch.int16, "<i2"),
    8: (torch.int8, "i1"),
    9: (torch.uint8, "u1"),
    10: (torch.bool, "u1"),
}
_CODES: dict[torch.dtype, int] = {dt: code for code, (dt, _) in _DTYPES.items()}


# ----------------------------------------------------------------------------- bytes <-> tensors


def _dtype_code(dtype: torch.dtype, name: str) -> int:
    if dtype not in _CODES:
        known = ", ".join(str(dt).removeprefix("torch.") for dt in _CODES)
        raise ValueError(f"tensor {name!r}: dtype {dtype} is not supported by the codec; use one of {known}")
    return _CODES[dtype]


def _itemsize(code: int) -> int:
    return np.dtype(_DTYPES[code][1]).itemsize


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor, flattened."""
    t = t.detach().cpu().contiguous().reshape(-1)
    np_dtype = _DTYPES[_CODES[t.dtype]][1]
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().astype(np_dtype, copy=False).tobytes()


def _bytes_tensor(buf: bytes | memoryview, code: int) -> torch.Tensor:
    """A flat, writable tensor of dtype `code` from raw little-endian bytes."""
    torch_dtype, np_dtype = _DTYPES[code]
    arr = np.frombuffer(buf, dtype=np_dtype)
    if torch_dtype == torch.bool:
        return torch.from_numpy(arr != 0)
    t = torch.from_numpy(arr.astype(np.dtype(np_dtype).newbyteorder("="), copy=True))
    return t.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else t


# ----------------------------------------------------------------------------- varints


def _varint_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value, vectorised (values >= 0, uint64)."""
    values = values.astype(np.uint64, copy=False)
    if values.size == 0:
        return b""
    lengths = np.ones(values.shape, dtype=np.int64)
    for k in range(1, 10):
        lengths += values >= np.uint64(1 << (7 * k))
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for k in range(int(lengths.max())):
        sel = lengths > k
        chunk = (values[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[sel] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + k] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def _varint_decode(buf: bytes | memoryview, max_bytes_per_value: int = 5) -> np.ndarray:
    """Decode a run of unsigned LEB128 values (vectorised); DecodeError when malformed."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero((raw & 0x80) == 0)
    if ends.size == 0 or ends[-1] != raw.size - 1:
        raise DecodeError("varint indices are truncated: the last byte has its continuation bit set")
    lengths = np.diff(np.concatenate(([-1], ends)))
    if lengths.max() > max_bytes_per_value:
        raise DecodeError(f"varint index longer than {max_bytes_per_value} bytes: the mask bytes are corrupt")
    position = np.arange(raw.size) - np.repeat(ends - lengths + 1, lengths)
    parts = (raw & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.add.reduceat(parts, ends - lengths + 1)


# ----------------------------------------------------------------------------- reading


class _Reader:
    """Bounds-checked cursor over bytes: every overrun is a DecodeError, never a struct.error."""

    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.view) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise DecodeError(f"payload truncated: {what} needs {n} bytes at offset {self.pos}, {self.remaining} left")
        chunk = self.view[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> int:
        return fmt.unpack(self.take(fmt.size, what))[0]

    def name(self) -> str:
        raw = self.take(self.unpack(_U16, "name length"), "name")
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"entry name at offset {self.pos - len(raw)} is not valid utf-8") from None

    def shape(self, name: str) -> tuple[int, ...]:
        ndim = self.unpack(_U8, f"{name!r} ndim")
        if ndim > MAX_NDIM:
            raise DecodeError(f"tensor {name!r} claims {ndim} dimensions, more than {MAX_NDIM}")
        return tuple(self.unpack(_U32, f"{name!r} shape") for _ in range(ndim))


def _read_header(reader: _Reader, magic: bytes, max_bytes: int | None, min_entry: int) -> int:
    if max_bytes is not None and len(reader.view) > max_bytes:
        raise DecodeError(f"payload of {len(reader.view)} bytes exceeds max_bytes={max_bytes}")
    if reader.remaining < _HEADER.size:
        raise DecodeError(f"payload of {reader.remaining} bytes is shorter than the {_HEADER.size}-byte header")
    got_magic, version, count = _HEADER.unpack(reader.take(_HEADER.size, "header"))
    if got_magic != magic:
        other = {MAGIC: "decode", SPARSE_MAGIC: "decode_sparse"}.get(got_magic)
        hint = f" (this is a {other} payload)" if other else ""
        raise DecodeError(f"bad magic {got_magic!r}, expected {magic!r}{hint}")
    if version != VERSION:
        raise DecodeError(f"unsupported codec version {version}; this build reads version {VERSION}")
    if count * min_entry > reader.remaining:
        raise DecodeError(f"header claims {count} entries but only {reader.remaining} bytes follow")
    return count


def _check_name(name: str, seen: set[str]) -> None:
    if name in seen:
        raise DecodeError(f"entry {name!r} appears twice in the payload")
    seen.add(name)


# ----------------------------------------------------------------------------- writing


def _pack_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) >= 2**16:
        raise ValueError(f"tensor name {name[:40]!r}... is longer than 65535 utf-8 bytes")
    return _U16.pack(len(raw)) + raw


def _pack_shape(name: str, shape: tuple[int, ...]) -> bytes:
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensor {name!r} has {len(shape)} dimensions, the codec supports at most {MAX_NDIM}")
    if any(d >= 2**32 for d in shape):
        raise ValueError(f"tensor {name!r} has a dimension of 2**32 or more: {tuple(shape)}")
    return _U8.pack(len(shape)) + b"".join(_U32.pack(d) for d in shape)
