"""Mask encodings: a packed bitmask or the delta-coded kept positions, whichever is smaller per layer."""

from __future__ import annotations

import enum
import math

import numpy as np
import torch

from shared.codec.binary import DecodeError, _varint_decode, _varint_encode, decode_errors


class MaskEncoding(enum.IntEnum):
    """How a mask is written; the encoder picks the smallest per layer."""

    BITMASK = 0  # np.packbits, little bit order, ceil(numel / 8) bytes
    VARINT = 1  # gaps between kept positions as unsigned LEB128
    UINT8 = 2  # gaps as fixed-width u8 (only when every gap < 256)
    UINT16 = 3  # gaps as fixed-width little-endian u16 (only when every gap < 65536)


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


@decode_errors
def decode_mask(encoding: int, data: bytes | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `encode_mask`; DecodeError when the bytes do not describe a mask of `shape`.

    Index encodings longer than the bitmask are refused before decoding: `encode_mask` never picks
    them, and this bounds what decoding the indices allocates by the mask's size.
    """
    numel = math.prod(shape)
    if encoding != MaskEncoding.BITMASK and len(data) > (numel + 7) // 8:
        raise DecodeError(f"mask indices take {len(data)} bytes, more than the {(numel + 7) // 8}-byte bitmask of {tuple(shape)}")
    if encoding == MaskEncoding.BITMASK:
        if len(data) != (numel + 7) // 8:
            raise DecodeError(f"bitmask has {len(data)} bytes, a mask of shape {tuple(shape)} needs {(numel + 7) // 8}")
        raw = np.frombuffer(data, dtype=np.uint8)
        if numel % 8 and raw[-1] >> (numel % 8):
            raise DecodeError("bitmask has bits set past the end of the tensor")
        flat = np.unpackbits(raw, count=numel, bitorder="little").astype(bool)
        return torch.from_numpy(flat).reshape(shape)
    if encoding == MaskEncoding.VARINT:
        gaps = _varint_decode(data)
    elif encoding in (MaskEncoding.UINT8, MaskEncoding.UINT16):
        width = 1 if encoding == MaskEncoding.UINT8 else 2
        if len(data) % width:
            raise DecodeError(f"fixed-width mask indices: {len(data)} bytes is not a multiple of {width}")
        gaps = np.frombuffer(data, dtype="u1" if width == 1 else "<u2").astype(np.uint64)
    else:
        raise DecodeError(f"unknown mask encoding {encoding}")
    flat = torch.zeros(numel, dtype=torch.bool)
    if gaps.size:
        if gaps.size > numel or int(gaps.max()) >= numel:
            raise DecodeError(f"mask indices run past the end of a tensor of shape {tuple(shape)}")
        idx = np.cumsum(gaps + np.uint64(1)) - np.uint64(1)
        if int(idx[-1]) >= numel:
            raise DecodeError(f"mask index {int(idx[-1])} is out of range for a tensor of shape {tuple(shape)}")
        flat[torch.from_numpy(idx.astype(np.int64))] = True
    return flat.reshape(shape)
