"""Deflate / inflate of whole payloads: ``b"FTZ" | version u8 | raw length u64 | zlib stream``."""

from __future__ import annotations

import struct
import zlib

from shared.codec.binary import VERSION, DecodeError, decode_errors

DEFLATE_MAGIC = b"FTZ"
MAX_INFLATED = 2**31
DEFLATE_MAX_RATIO = 1032
"""Deflate cannot expand a stream further than about 1032:1 (258-byte matches coded in 2 bits), so a
payload that claims more than this many raw bytes per stream byte is refused before it is inflated."""

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


@decode_errors
def inflate(data: bytes, max_bytes: int | None = None, limit: int | None = None) -> bytes:
    """Undo `deflate` (other payloads pass through); a bomb or a corrupt stream raises DecodeError.

    At most `limit` bytes are inflated (and at most 64 x `max_bytes`, and `MAX_INFLATED`): the
    stated size is checked against it before inflating, and zlib is asked for no more than the
    stated size (`max_length`), so a stream that would inflate further is refused, not inflated.
    """
    if data[:3] != DEFLATE_MAGIC:
        return data
    if len(data) < _DEFLATE_HEADER.size:
        raise DecodeError("truncated compressed payload header")
    _, version, size = _DEFLATE_HEADER.unpack_from(data)
    if version != VERSION:
        raise DecodeError(f"unsupported compressed payload version {version} (expected {VERSION})")
    bound = min(MAX_INFLATED, 64 * max_bytes if max_bytes is not None else MAX_INFLATED,
                limit if limit is not None else MAX_INFLATED)
    if size > bound:
        raise DecodeError(f"compressed payload claims {size} bytes, over the limit of {bound}")
    stream = len(data) - _DEFLATE_HEADER.size
    if size > DEFLATE_MAX_RATIO * stream + 64:
        raise DecodeError(f"compressed payload claims {size} bytes from a {stream}-byte stream, more than deflate produces")
    if size == 0:  # zlib reads max_length=0 as "no limit"; `deflate` never wraps an empty payload
        raise DecodeError("compressed payload claims 0 bytes")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(memoryview(data)[_DEFLATE_HEADER.size:], size)
    except zlib.error as exc:
        raise DecodeError(f"corrupt compressed payload ({exc})") from None
    if len(raw) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise DecodeError(f"compressed payload does not inflate to its stated {size} bytes")
    return raw
