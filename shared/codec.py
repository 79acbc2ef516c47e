"""Wire codec: explicit, versioned bytes for everything sent between server and clients (no pickle).

Why: FedTiny ("Distributed Pruning Towards Tiny Neural Networks in Federated Learning",
arXiv 2212.01977) claims its savings in memory and communication, so the bytes on the wire must
be countable and must actually shrink with the density: a sparse tensor travels as the float
values of its active weights only, its mask as a packed bitmask or as delta-coded indices
(whichever is smaller for that layer) and only when the receiver does not know it yet, and top-k
gradients as (index, value) pairs.

Dense/masked payload (`encode` / `decode`), all integers little-endian::

    header : b"FTC" | version u8 | entry count u32
    entry  : name length u16 | name utf-8 | dtype u8 | wire dtype u8 | ndim u8 | dims u32 x ndim
             | flags u8 | [mask length u32, when the mask is included] | payload length u64
             | payload = [mask bytes] + values
    flags  : bit 0 masked, bit 1 mask included, bits 2-3 mask encoding (see `MaskEncoding`),
             bit 4 values byte-shuffled, bit 5 values XOR'd with the receiver's copy

Unmasked tensors carry all values in their own dtype; masked tensors carry the values at True
positions in the wire dtype (float32 by default). Values are byte-shuffled (all first bytes, then
all second bytes, ...) when that deflates smaller: the sign and exponent bytes of weights are
nearly constant, and grouped together they deflate to little. An update may be delta-coded
against the tensors the receiver already holds (`base`): each value's bits XOR those of the
receiver's value at the same position, so unchanged values become zero bytes and small changes
leave the high bytes zero; lossless.

Sparse top-k payload (`encode_sparse`)::

    header : b"FTS" | version u8 | entry count u32
    entry  : name length u16 | name utf-8 | ndim u8 | dims u32 x ndim | index width u8 (4 or 8)
             | count u64 | indices (u32 or u64) x count | values f32 x count

A payload may be wrapped as ``b"FTZ" | version u8 | raw length u64 | zlib stream`` (`deflate`)
when that is smaller.

Every malformed input makes `decode` / `decode_sparse` raise `ValueError`.
"""

from __future__ import annotations

import enum
import math
import os
import struct
import tempfile
import zlib
from typing import Collection, Mapping

import numpy as np
import torch

MAGIC = b"FTC"
DEFLATE_MAGIC = b"FTZ"
MAX_INFLATED = 2**31
SPARSE_MAGIC = b"FTS"
VERSION = 1
MAX_NDIM = 16
MAX_MASKED_NUMEL = 2**28
"""Largest masked tensor accepted: a delta-coded mask can claim a huge all-False layer in a few bytes."""

_HEADER = struct.Struct("<3sBI")
_DEFLATE_HEADER = struct.Struct("<3sBQ")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_FLAG_MASKED = 0x01
_FLAG_MASK_INCLUDED = 0x02
_ENCODING_SHIFT = 2
_ENCODING_BITS = 0x0C
_FLAG_SHUFFLED = 0x10
_FLAG_DELTA = 0x20
_SHUFFLE_TRIAL_MAX = 1 << 22  # larger values are shuffled without a trial (weights: shuffling wins)
_KNOWN_FLAGS = 0x3F


class MaskEncoding(enum.IntEnum):
    """How a mask is written; the encoder picks the smallest per layer."""

    BITMASK = 0  # np.packbits, little bit order, ceil(numel / 8) bytes
    VARINT = 1  # gaps between kept positions as unsigned LEB128
    UINT8 = 2  # gaps as fixed-width u8 (only when every gap < 256)
    UINT16 = 3  # gaps as fixed-width little-endian u16 (only when every gap < 65536)


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


# ----------------------------------------------------------------------------- masks


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
    """Decode a run of unsigned LEB128 values (vectorised); ValueError when malformed."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero((raw & 0x80) == 0)
    if ends.size == 0 or ends[-1] != raw.size - 1:
        raise ValueError("varint indices are truncated: the last byte has its continuation bit set")
    lengths = np.diff(np.concatenate(([-1], ends)))
    if lengths.max() > max_bytes_per_value:
        raise ValueError(f"varint index longer than {max_bytes_per_value} bytes: the mask bytes are corrupt")
    position = np.arange(raw.size) - np.repeat(ends - lengths + 1, lengths)
    parts = (raw & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.add.reduceat(parts, ends - lengths + 1)


def _gaps(flat_mask: np.ndarray) -> np.ndarray:
    """Gaps between consecutive kept positions: idx[i] - idx[i-1] - 1, the first one is idx[0]."""
    idx = np.flatnonzero(flat_mask).astype(np.int64)
    return (np.diff(idx, prepend=-1) - 1).astype(np.uint64)


def encode_mask(mask: torch.Tensor) -> tuple[MaskEncoding, bytes]:
    """The smallest encoding of a boolean mask: packed bitmask or delta-coded kept positions."""
    flat = mask.detach().cpu().reshape(-1).numpy().astype(bool, copy=False)
    candidates = [(MaskEncoding.BITMASK, np.packbits(flat, bitorder="little").tobytes())]
    gaps = _gaps(flat)
    biggest = int(gaps.max()) if gaps.size else 0
    candidates.append((MaskEncoding.VARINT, _varint_encode(gaps)))
    if biggest < 2**8:
        candidates.append((MaskEncoding.UINT8, gaps.astype("u1").tobytes()))
    if biggest < 2**16:
        candidates.append((MaskEncoding.UINT16, gaps.astype("<u2").tobytes()))
    return min(candidates, key=lambda c: len(c[1]))  # ties: the earlier candidate (bitmask first)


def decode_mask(encoding: int, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `encode_mask`; ValueError when the bytes do not describe a mask of `shape`."""
    numel = math.prod(shape)
    if encoding == MaskEncoding.BITMASK:
        if len(data) != (numel + 7) // 8:
            raise ValueError(f"bitmask has {len(data)} bytes, a mask of shape {tuple(shape)} needs {(numel + 7) // 8}")
        raw = np.frombuffer(data, dtype=np.uint8)
        if numel % 8 and raw[-1] >> (numel % 8):
            raise ValueError("bitmask has bits set past the end of the tensor")
        flat = np.unpackbits(raw, count=numel, bitorder="little").astype(bool)
        return torch.from_numpy(flat).reshape(shape)
    if encoding == MaskEncoding.VARINT:
        gaps = _varint_decode(data)
    elif encoding in (MaskEncoding.UINT8, MaskEncoding.UINT16):
        width = 1 if encoding == MaskEncoding.UINT8 else 2
        if len(data) % width:
            raise ValueError(f"fixed-width mask indices: {len(data)} bytes is not a multiple of {width}")
        gaps = np.frombuffer(data, dtype="u1" if width == 1 else "<u2").astype(np.uint64)
    else:
        raise ValueError(f"unknown mask encoding {encoding}")
    flat = torch.zeros(numel, dtype=torch.bool)
    if gaps.size:
        if gaps.size > numel or int(gaps.max()) >= numel:
            raise ValueError(f"mask indices run past the end of a tensor of shape {tuple(shape)}")
        idx = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)
        if int(idx[-1]) >= numel:
            raise ValueError(f"mask index {int(idx[-1])} is out of range for a tensor of shape {tuple(shape)}")
        flat[torch.from_numpy(idx.astype(np.int64))] = True
    return flat.reshape(shape)


# ----------------------------------------------------------------------------- reading


class _Reader:
    """Bounds-checked cursor over bytes: every overrun is a ValueError, never a struct.error."""

    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.view) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise ValueError(f"payload truncated: {what} needs {n} bytes at offset {self.pos}, {self.remaining} left")
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
            raise ValueError(f"entry name at offset {self.pos - len(raw)} is not valid utf-8") from None

    def shape(self, name: str) -> tuple[int, ...]:
        ndim = self.unpack(_U8, f"{name!r} ndim")
        if ndim > MAX_NDIM:
            raise ValueError(f"tensor {name!r} claims {ndim} dimensions, more than {MAX_NDIM}")
        return tuple(self.unpack(_U32, f"{name!r} shape") for _ in range(ndim))


def _read_header(reader: _Reader, magic: bytes, max_bytes: int | None, min_entry: int) -> int:
    if max_bytes is not None and len(reader.view) > max_bytes:
        raise ValueError(f"payload of {len(reader.view)} bytes exceeds max_bytes={max_bytes}")
    if reader.remaining < _HEADER.size:
        raise ValueError(f"payload of {reader.remaining} bytes is shorter than the {_HEADER.size}-byte header")
    got_magic, version, count = _HEADER.unpack(reader.take(_HEADER.size, "header"))
    if got_magic != magic:
        other = {MAGIC: "decode", SPARSE_MAGIC: "decode_sparse"}.get(got_magic)
        hint = f" (this is a {other} payload)" if other else ""
        raise ValueError(f"bad magic {got_magic!r}, expected {magic!r}{hint}")
    if version != VERSION:
        raise ValueError(f"unsupported codec version {version}; this build reads version {VERSION}")
    if count * min_entry > reader.remaining:
        raise ValueError(f"header claims {count} entries but only {reader.remaining} bytes follow")
    return count


def _check_name(name: str, seen: set[str]) -> None:
    if name in seen:
        raise ValueError(f"entry {name!r} appears twice in the payload")
    seen.add(name)


# ----------------------------------------------------------------------------- dense / masked


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


def _wants_mask(send_masks: bool | Collection[str], name: str) -> bool:
    if isinstance(send_masks, bool):
        return send_masks
    if isinstance(send_masks, str):
        return name == send_masks
    return name in send_masks


def encode(
    tensors: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    send_masks: bool | Collection[str] = True,
    dtype: torch.dtype | None = torch.float32,
    compress: bool = True,
    shuffle: bool = True,
    base: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    """Serialise tensors; masked ones as the values of their True positions only.

    `masks` maps names to bool tensors of the same shape (masks for names not in `tensors` are
    ignored). A mask travels when `send_masks` is True or names it; otherwise the receiver must
    pass it to `decode`. Masked floating values are written as `dtype` (float32; float16 halves
    export size; None keeps each tensor's own dtype). Unmasked tensors keep their own dtype.
    With `compress`, the payload is deflated when that makes it smaller (see `deflate`); `shuffle`
    byte-shuffles values first. Floating tensors that `base` holds with the same shape are
    delta-coded against it: the receiver must pass the same `base` to `decode`.
    """
    raw = _encode_raw(tensors, masks, send_masks, dtype, shuffle, base or {})
    return deflate(raw) if compress else raw


def deflate(raw: bytes) -> bytes:
    """Wrap a payload as ``b"FTZ" | version u8 | raw length u64 | zlib stream`` when that is smaller.

    Why: names, shapes, batch-norm buffers and masks are redundant (about 10% of a trained sparse
    update at density 0.05); the float values of active weights are not and stay as they are.
    """
    packed = zlib.compress(raw, 6)
    if len(packed) + _DEFLATE_HEADER.size >= len(raw):
        return raw
    return _DEFLATE_HEADER.pack(DEFLATE_MAGIC, VERSION, len(raw)) + packed


def inflate(data: bytes, max_bytes: int | None = None) -> bytes:
    """Undo `deflate` (other payloads pass through); a bomb or a corrupt stream raises ValueError."""
    if data[:3] != DEFLATE_MAGIC:
        return data
    if len(data) < _DEFLATE_HEADER.size:
        raise ValueError("truncated compressed payload header")
    _, version, size = _DEFLATE_HEADER.unpack_from(data)
    if version != VERSION:
        raise ValueError(f"unsupported compressed payload version {version} (expected {VERSION})")
    limit = MAX_INFLATED if max_bytes is None else min(MAX_INFLATED, 64 * max_bytes)
    if size > limit:
        raise ValueError(f"compressed payload claims {size} bytes, over the limit of {limit}")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data[_DEFLATE_HEADER.size:], size)
    except zlib.error as exc:
        raise ValueError(f"corrupt compressed payload ({exc})") from None
    if len(raw) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise ValueError(f"compressed payload does not inflate to its stated {size} bytes")
    return raw


def _encode_raw(
    tensors: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None,
    send_masks: bool | Collection[str],
    dtype: torch.dtype | None,
    shuffle: bool,
    base: Mapping[str, torch.Tensor],
) -> bytes:
    masks = masks or {}
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype for masked values must be a float dtype or None, got {dtype}")
    if len(tensors) >= 2**32:
        raise ValueError(f"too many tensors ({len(tensors)}) for one payload")
    out = [_HEADER.pack(MAGIC, VERSION, len(tensors))]
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"entry {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        code = _dtype_code(tensor.dtype, name)
        shape = tuple(tensor.shape)
        mask = masks.get(name)
        flags, mask_bytes, wire, keep = 0, b"", code, None
        if mask is None:
            values = _tensor_bytes(tensor)
        else:
            if mask.dtype != torch.bool or tuple(mask.shape) != shape:
                raise ValueError(
                    f"mask for {name!r} must be a bool tensor of shape {shape}, got {mask.dtype} {tuple(mask.shape)}"
                )
            if tensor.numel() > MAX_MASKED_NUMEL:
                raise ValueError(f"masked tensor {name!r} has {tensor.numel()} elements, over {MAX_MASKED_NUMEL}")
            if dtype is not None and tensor.is_floating_point():
                wire = _CODES[dtype]
            mask = mask.detach().cpu()
            keep = mask.reshape(-1)
            kept = tensor.detach().cpu().reshape(-1)[keep]
            values = _tensor_bytes(kept.to(_DTYPES[wire][0]))
            flags = _FLAG_MASKED
            if _wants_mask(send_masks, name):
                encoding, mask_bytes = encode_mask(mask)
                flags |= _FLAG_MASK_INCLUDED | (int(encoding) << _ENCODING_SHIFT)
        if tensor.is_floating_point() and _delta_base_fits(base.get(name), shape):
            values = _xor(values, _reference_bytes(base[name], keep, wire))
            flags |= _FLAG_DELTA
        if shuffle and _itemsize(wire) > 1 and (shuffled := _shuffle_if_smaller(values, _itemsize(wire))):
            values = shuffled
            flags |= _FLAG_SHUFFLED
        out += [_pack_name(name), _U8.pack(code), _U8.pack(wire), _pack_shape(name, shape), _U8.pack(flags)]
        if flags & _FLAG_MASK_INCLUDED:
            out.append(_U32.pack(len(mask_bytes)))
        out += [_U64.pack(len(mask_bytes) + len(values)), mask_bytes, values]
    return b"".join(out)


def _delta_base_fits(reference: torch.Tensor | None, shape: tuple[int, ...]) -> bool:
    return isinstance(reference, torch.Tensor) and reference.is_floating_point() and tuple(reference.shape) == shape


def _reference_bytes(reference: torch.Tensor, keep: torch.Tensor | None, wire: int) -> bytes:
    """The receiver's values at the positions a payload carries, as bytes of the wire dtype."""
    flat = reference.detach().cpu().reshape(-1)
    return _tensor_bytes((flat if keep is None else flat[keep]).to(_DTYPES[wire][0]))


def _xor(values: bytes | memoryview, reference: bytes) -> bytes:
    return (np.frombuffer(values, np.uint8) ^ np.frombuffer(reference, np.uint8)).tobytes()


def _shuffle(values: bytes, itemsize: int) -> bytes:
    return np.frombuffer(values, np.uint8).reshape(-1, itemsize).T.tobytes()


def _shuffle_if_smaller(values: bytes, itemsize: int) -> bytes | None:
    """The shuffled values if they deflate smaller (a fast zlib trial), else None.

    Why: shuffling wins on weights and on delta-coded updates, loses on some small tensors
    (measured: BN statistics and the policy search's candidates grow by 3-17%)."""
    shuffled = _shuffle(values, itemsize)
    if len(values) > _SHUFFLE_TRIAL_MAX:
        return shuffled
    return shuffled if len(zlib.compress(shuffled, 1)) < len(zlib.compress(values, 1)) else None


def _unshuffle(values: bytes | memoryview, itemsize: int) -> bytes:
    return np.frombuffer(values, np.uint8).reshape(itemsize, -1).T.tobytes()


def _known_mask(masks: Mapping[str, torch.Tensor] | None, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if masks is None or name not in masks:
        raise ValueError(f"payload has masked tensor {name!r} without its mask; pass the receiver's mask for it")
    mask = masks[name]
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}"
        raise ValueError(f"receiver mask for {name!r} must be bool of shape {shape}, got {got}")
    return mask.detach().cpu()


def _decode_entry(
    reader: _Reader, masks: Mapping[str, torch.Tensor] | None, name: str, base: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    code, wire = reader.unpack(_U8, f"{name!r} dtype"), reader.unpack(_U8, f"{name!r} wire dtype")
    for c in (code, wire):
        if c not in _DTYPES:
            raise ValueError(f"tensor {name!r} has unknown dtype code {c}")
    shape = reader.shape(name)
    flags = reader.unpack(_U8, f"{name!r} flags")
    masked, included = bool(flags & _FLAG_MASKED), bool(flags & _FLAG_MASK_INCLUDED)
    if flags & ~_KNOWN_FLAGS or (included and not masked) or (not included and flags & _ENCODING_BITS):
        raise ValueError(f"tensor {name!r} has invalid flags {flags:#04x}")
    if flags & _FLAG_DELTA and not (_DTYPES[code][0].is_floating_point and _delta_base_fits(base.get(name), shape)):
        raise ValueError(f"tensor {name!r} is delta-coded but the receiver holds no floating tensor of shape {shape} for it")
    mask_len = reader.unpack(_U32, f"{name!r} mask length") if included else 0
    payload_len = reader.unpack(_U64, f"{name!r} payload length")
    if payload_len > reader.remaining:
        raise ValueError(f"tensor {name!r} claims {payload_len} payload bytes but only {reader.remaining} remain")
    if mask_len > payload_len:
        raise ValueError(f"tensor {name!r} claims a {mask_len}-byte mask inside a {payload_len}-byte payload")
    numel = math.prod(shape)
    torch_dtype = _DTYPES[code][0]
    if not masked:
        if wire != code:
            raise ValueError(f"unmasked tensor {name!r} has a wire dtype that differs from its dtype")
        needed = numel * _itemsize(code)
        if needed != payload_len:
            raise ValueError(f"tensor {name!r} of shape {shape} needs {needed} bytes, payload has {payload_len}")
        values = _unpack_values(reader.take(payload_len, name), flags, code, base.get(name), None)
        return _bytes_tensor(values, code).reshape(shape), None
    if numel > MAX_MASKED_NUMEL:
        raise ValueError(f"masked tensor {name!r} claims shape {shape}: more than {MAX_MASKED_NUMEL} elements")
    if included:
        mask = decode_mask((flags & _ENCODING_BITS) >> _ENCODING_SHIFT, reader.take(mask_len, f"{name!r} mask"), shape)
    else:
        mask = _known_mask(masks, name, shape)
    nnz = int(mask.sum())
    values_len = payload_len - mask_len
    needed = nnz * _itemsize(wire)
    if needed != values_len:
        raise ValueError(f"tensor {name!r}: mask keeps {nnz} values ({needed} bytes), payload has {values_len}")
    raw = _unpack_values(reader.take(values_len, f"{name!r} values"), flags, wire, base.get(name), mask.reshape(-1))
    values = _bytes_tensor(raw, wire)
    flat = torch.zeros(numel, dtype=torch_dtype)
    flat[mask.reshape(-1)] = values.to(torch_dtype)
    return flat.reshape(shape), mask


def _unpack_values(
    data: memoryview, flags: int, wire: int, reference: torch.Tensor | None, keep: torch.Tensor | None
) -> bytes | memoryview:
    """Undo the shuffle and the delta coding of one entry's values (`_encode_raw`)."""
    if flags & _FLAG_SHUFFLED:
        data = _unshuffle(data, _itemsize(wire))
    if flags & _FLAG_DELTA:
        data = _xor(data, _reference_bytes(reference, keep, wire))
    return data


def decode(
    data: bytes,
    masks: Mapping[str, torch.Tensor] | None = None,
    max_bytes: int | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of `encode`: (tensors, masks of the masked tensors); masked-off values are 0.

    Masks not in the payload are taken from `masks` (the receiver's copy); delta-coded values
    are restored against `base` (what the sender coded them against). Any malformed,
    truncated or oversize (`len(data) > max_bytes`) input raises ValueError.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"decode expects bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"payload of {len(data)} bytes is over max_bytes={max_bytes}")
    reader = _Reader(inflate(bytes(data), max_bytes))
    count = _read_header(reader, MAGIC, None, min_entry=2 + 3 + 1 + 8)
    tensors: dict[str, torch.Tensor] = {}
    out_masks: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for _ in range(count):
        name = reader.name()
        _check_name(name, seen)
        tensors[name], mask = _decode_entry(reader, masks, name, base or {})
        if mask is not None:
            out_masks[name] = mask
    if reader.remaining:
        raise ValueError(f"{reader.remaining} unexpected bytes after the last entry")
    return tensors, out_masks


# ----------------------------------------------------------------------------- masked variants of one state


def encode_variants(state: Mapping[str, torch.Tensor], variants: list[Mapping[str, torch.Tensor]]) -> tuple[bytes, list[bytes]]:
    """Several masked variants of one state dict: (base, one selection per variant).

    Why: FedTiny's policy search sends every candidate to the same clients, and the candidates
    are the same warm-up weights under overlapping masks. The base carries the values on the
    union of the masks once (with the union masks); each variant is then only its mask restricted
    to the union, one u1 per union position, deflated (about a bit each).
    """
    if not variants:
        raise ValueError("encode_variants needs at least one variant")
    names = list(variants[0])
    union = {n: torch.stack([v[n].bool() for v in variants]).any(0) for n in names}
    base = encode({n: t * union[n] if n in union else t for n, t in state.items()}, union)
    selections = [encode({n: v[n].bool()[union[n]].to(torch.uint8) for n in names}) for v in variants]
    return base, selections


def decode_variants(base: bytes, selections: list[bytes]) -> list[dict[str, torch.Tensor]]:
    """Inverse of `encode_variants`: each variant's state dict (masked-off values 0)."""
    tensors, union = decode(base)
    out = []
    for blob in selections:
        chosen, _ = decode(blob)
        if set(chosen) != set(union):
            raise ValueError(f"variant selects layers {sorted(chosen)[:3]}, the base masks {sorted(union)[:3]}")
        state = dict(tensors)
        for name, sel in chosen.items():
            keep = union[name]
            if sel.dim() != 1 or sel.numel() != int(keep.sum()):
                raise ValueError(f"variant selection for {name!r} has {sel.numel()} entries, the union keeps {int(keep.sum())}")
            mask = torch.zeros_like(keep)
            mask[keep] = sel.bool()
            state[name] = tensors[name] * mask
        out.append(state)
    return out


# ----------------------------------------------------------------------------- sparse top-k


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


def decode_sparse(
    data: bytes, max_bytes: int | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    """Inverse of `encode_sparse`: name -> (int64 flat indices, float32 values, shape).

    Indices out of range or repeated, and any malformed input, raise ValueError.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"decode_sparse expects bytes, got {type(data).__name__}")
    reader = _Reader(bytes(data))
    count = _read_header(reader, SPARSE_MAGIC, max_bytes, min_entry=2 + 1 + 1 + 8)
    result: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
    seen: set[str] = set()
    for _ in range(count):
        name = reader.name()
        _check_name(name, seen)
        shape = reader.shape(name)
        width = reader.unpack(_U8, f"{name!r} index width")
        if width not in (4, 8):
            raise ValueError(f"sparse {name!r} has index width {width}, expected 4 or 8")
        k = reader.unpack(_U64, f"{name!r} count")
        if k * (width + 4) > reader.remaining:
            raise ValueError(f"sparse {name!r} claims {k} entries but only {reader.remaining} bytes remain")
        numel = math.prod(shape)
        idx = np.frombuffer(reader.take(k * width, f"{name!r} indices"), dtype="<u4" if width == 4 else "<u8")
        if k and int(idx.max()) >= numel:
            raise ValueError(f"sparse {name!r}: index {int(idx.max())} out of range for shape {shape}")
        if np.unique(idx).size != idx.size:
            raise ValueError(f"sparse {name!r}: repeated indices")
        values = _bytes_tensor(reader.take(k * 4, f"{name!r} values"), 1)
        result[name] = (torch.from_numpy(idx.astype(np.int64)), values, shape)
    if reader.remaining:
        raise ValueError(f"{reader.remaining} unexpected bytes after the last sparse entry")
    return result


# ----------------------------------------------------------------------------- files


def save(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> int:
    """Write `encode(tensors, masks)` (masks included) atomically; returns the bytes written.

    Values stay in place (not byte-shuffled), so a device can read them where they lie.
    """
    data = encode(tensors, masks, send_masks=True, dtype=dtype, shuffle=False)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".ftc")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)


def load(
    path: str | os.PathLike, max_bytes: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a file written by `save`: (tensors, masks)."""
    with open(path, "rb") as f:
        return decode(f.read(), max_bytes=max_bytes)
