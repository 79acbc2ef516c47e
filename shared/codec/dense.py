"""Dense / masked tensors (`encode` / `decode`): the state dicts and updates sent each round."""

from __future__ import annotations

from typing import Collection, Mapping

import torch

from shared.codec.binary import (
    _CODES,
    _DTYPES,
    _HEADER,
    _U8,
    _U32,
    _U64,
    MAGIC,
    VERSION,
    DecodeError,
    _bytes_tensor,
    _check_name,
    _dtype_code,
    _itemsize,
    _pack_name,
    _pack_shape,
    _read_header,
    _Reader,
    _tensor_bytes,
    decode_errors,
)
from shared.codec.compression import deflate, inflate
from shared.codec.expect import Budget, Expected
from shared.codec.masks import decode_mask, encode_mask
from shared.codec.transforms import _delta_base_fits, _reference_bytes, _shuffle_if_smaller, _unshuffle, _xor

MAX_MASKED_NUMEL = 2**28
"""Largest masked tensor accepted: a delta-coded mask can claim a huge all-False layer in a few bytes."""

_FLAG_MASKED = 0x01
_FLAG_MASK_INCLUDED = 0x02
_ENCODING_SHIFT = 2
_ENCODING_BITS = 0x0C
_FLAG_SHUFFLED = 0x10
_FLAG_DELTA = 0x20
_KNOWN_FLAGS = 0x3F


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


def _known_mask(masks: Mapping[str, torch.Tensor] | None, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if masks is None or name not in masks:
        raise DecodeError(f"payload has masked tensor {name!r} without its mask; pass the receiver's mask for it")
    mask = masks[name]
    if mask.dtype != torch.bool or tuple(mask.shape) != shape:
        got = f"{mask.dtype} {tuple(mask.shape)}"
        raise DecodeError(f"receiver mask for {name!r} must be bool of shape {shape}, got {got}")
    return mask.detach().cpu()


def _decode_entry(
    reader: _Reader, masks: Mapping[str, torch.Tensor] | None, name: str, base: Mapping[str, torch.Tensor],
    budget: Budget,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    code, wire = reader.unpack(_U8, f"{name!r} dtype"), reader.unpack(_U8, f"{name!r} wire dtype")
    for c in (code, wire):
        if c not in _DTYPES:
            raise DecodeError(f"tensor {name!r} has unknown dtype code {c}")
    shape = reader.shape(name)
    numel = budget.entry(name, code, shape)  # before anything of this entry is allocated
    flags = reader.unpack(_U8, f"{name!r} flags")
    masked, included = bool(flags & _FLAG_MASKED), bool(flags & _FLAG_MASK_INCLUDED)
    if flags & ~_KNOWN_FLAGS or (included and not masked) or (not included and flags & _ENCODING_BITS):
        raise DecodeError(f"tensor {name!r} has invalid flags {flags:#04x}")
    if flags & _FLAG_DELTA and not (_DTYPES[code][0].is_floating_point and _delta_base_fits(base.get(name), shape)):
        raise DecodeError(f"tensor {name!r} is delta-coded but the receiver holds no floating tensor of shape {shape} for it")
    mask_len = reader.unpack(_U32, f"{name!r} mask length") if included else 0
    payload_len = reader.unpack(_U64, f"{name!r} payload length")
    if payload_len > reader.remaining:
        raise DecodeError(f"tensor {name!r} claims {payload_len} payload bytes but only {reader.remaining} remain")
    if mask_len > payload_len:
        raise DecodeError(f"tensor {name!r} claims a {mask_len}-byte mask inside a {payload_len}-byte payload")
    torch_dtype = _DTYPES[code][0]
    if not masked:
        if wire != code:
            raise DecodeError(f"unmasked tensor {name!r} has a wire dtype that differs from its dtype")
        needed = numel * _itemsize(code)
        if needed != payload_len:
            raise DecodeError(f"tensor {name!r} of shape {shape} needs {needed} bytes, payload has {payload_len}")
        values = _unpack_values(reader.take(payload_len, name), flags, code, base.get(name), None)
        return _bytes_tensor(values, code).reshape(shape), None
    if wire != code and not (torch_dtype.is_floating_point and _DTYPES[wire][0].is_floating_point):
        raise DecodeError(f"masked tensor {name!r} of {torch_dtype} travels as {_DTYPES[wire][0]}")
    if numel > MAX_MASKED_NUMEL:
        raise DecodeError(f"masked tensor {name!r} claims shape {shape}: more than {MAX_MASKED_NUMEL} elements")
    if included:
        mask = decode_mask((flags & _ENCODING_BITS) >> _ENCODING_SHIFT, reader.take(mask_len, f"{name!r} mask"), shape)
    else:
        mask = _known_mask(masks, name, shape)
    nnz = int(mask.sum())
    values_len = payload_len - mask_len
    needed = nnz * _itemsize(wire)
    if needed != values_len:
        raise DecodeError(f"tensor {name!r}: mask keeps {nnz} values ({needed} bytes), payload has {values_len}")
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


@decode_errors
def decode(
    data: bytes,
    masks: Mapping[str, torch.Tensor] | None = None,
    max_bytes: int | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    expected: Expected | None = None,
    max_elements: int | None = None,
    at_most: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of `encode`: (tensors, masks of the masked tensors); masked-off values are 0.

    Masks not in the payload are taken from `masks` (the receiver's copy); delta-coded values
    are restored against `base` (what the sender coded them against).

    What may be decoded is bounded before it is allocated: with `expected` (name -> (shape,
    dtype or dtypes), see `expect`) each entry must be one of those names, shapes and dtypes
    (fewer entries are allowed; the caller checks completeness; `at_most`: shapes no larger in any
    dimension), and a deflated payload may not inflate past what that layout takes; without it,
    all entries together hold at most
    `max_elements` (default `MAX_ELEMENTS`). Any malformed, truncated, unexpected or oversize
    (`len(data) > max_bytes`) input raises `DecodeError`, and nothing else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"decode expects bytes, got {type(data).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise DecodeError(f"payload of {len(data)} bytes is over max_bytes={max_bytes}")
    budget = Budget(expected, max_elements, at_most)
    reader = _Reader(inflate(bytes(data), max_bytes, limit=budget.raw_bytes()))
    count = _read_header(reader, MAGIC, None, min_entry=2 + 3 + 1 + 8)
    budget.entries(count)
    tensors: dict[str, torch.Tensor] = {}
    out_masks: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for _ in range(count):
        name = reader.name()
        _check_name(name, seen)
        tensors[name], mask = _decode_entry(reader, masks, name, base or {}, budget)
        if mask is not None:
            out_masks[name] = mask
    if reader.remaining:
        raise DecodeError(f"{reader.remaining} unexpected bytes after the last entry")
    return tensors, out_masks


def _skip_entry(reader: _Reader, name: str) -> None:
    """Step over one entry by its header; nothing of it is decoded or allocated."""
    reader.take(2, f"{name!r} dtypes")
    reader.shape(name)
    flags = reader.unpack(_U8, f"{name!r} flags")
    if flags & _FLAG_MASK_INCLUDED:
        reader.unpack(_U32, f"{name!r} mask length")
    reader.take(reader.unpack(_U64, f"{name!r} payload length"), f"{name!r} payload")


@decode_errors
def decode_entry(data: bytes, name: str, max_elements: int) -> torch.Tensor:
    """The entry `name` of a payload, of at most `max_elements`, every other entry stepped over by
    its header: for a small entry that says what layout the rest must have (a packed model's
    `__meta__`), read before the rest is decoded with that layout."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"decode_entry expects bytes, got {type(data).__name__}")
    reader = _Reader(inflate(bytes(data), limit=Budget().raw_bytes()))
    seen: set[str] = set()
    for _ in range(_read_header(reader, MAGIC, None, min_entry=2 + 3 + 1 + 8)):
        entry = reader.name()
        _check_name(entry, seen)
        if entry == name:
            return _decode_entry(reader, None, name, {}, Budget(max_elements=max_elements))[0]
        _skip_entry(reader, entry)
    raise DecodeError(f"payload has no entry {name!r}")
