"""Deflate / inflate of whole payloads: ``b"FTZ" | version u8 | raw length u64 | zlib stream``."""

from __future__ import annotations

import struct
import zlib

from shared.codec.binary import VERSION

DEFLATE_MAGIC = b"FTZ"
MAX_INFLATED = 2**31

_DEFLATE_HEADER = struct.Struct("<3sBQ")


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
