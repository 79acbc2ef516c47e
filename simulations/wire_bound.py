"""The information bound of what a run put on the wire: a lower limit for any encoding of it.

For each codec payload (`shared.codec`): the values of active weights at their wire width,
plus, for each mask included, log2 C(n, k) bits (the entropy of a k-of-n mask with nothing
else known) and, for top-k gradients, log2 C(n, k) bits for the index set. Headers, names
and shapes count zero. Comparing the real bytes to this bound shows how much the codec
leaves on the table.
"""

from __future__ import annotations

import math
import struct

from shared import codec

_HEADER = struct.Struct("<3sBI")
_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q"))


def mask_bits(n: int, k: int) -> float:
    """log2 C(n, k): the bits needed to say which k of n positions are kept."""
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


class _Cursor:
    def __init__(self, blob: bytes) -> None:
        self.blob, self.pos = blob, 0

    def take(self, s: struct.Struct) -> int:
        (value,) = s.unpack_from(self.blob, self.pos)
        self.pos += s.size
        return value

    def skip(self, n: int) -> None:
        self.pos += n


def _shape(c: _Cursor) -> int:
    numel = 1
    for _ in range(c.take(_U8)):
        numel *= c.take(_U32)
    return numel


def _dense_bound(blob: bytes) -> float:
    magic, _, count = _HEADER.unpack_from(blob, 0)
    c = _Cursor(blob)
    c.skip(_HEADER.size)
    total = 0.0
    for _ in range(count):
        c.skip(c.take(_U16))  # name
        c.take(_U8)  # dtype
        wire = c.take(_U8)
        numel = _shape(c)
        flags = c.take(_U8)
        mask_len = c.take(_U32) if flags & 0x02 else 0
        payload = c.take(_U64)
        c.skip(payload)
        values = payload - mask_len
        total += values
        if flags & 0x02:
            total += mask_bits(numel, values // codec._itemsize(wire)) / 8
    return total


def _sparse_bound(blob: bytes) -> float:
    _, _, count = _HEADER.unpack_from(blob, 0)
    c = _Cursor(blob)
    c.skip(_HEADER.size)
    total = 0.0
    for _ in range(count):
        c.skip(c.take(_U16))
        numel = _shape(c)
        width = c.take(_U8)
        k = c.take(_U64)
        c.skip(k * (width + 4))
        total += 4 * k + mask_bits(numel, k) / 8
    return total


def blob_bound(blob: bytes) -> float:
    """Lower bound in bytes for one codec payload (dense/masked `FTC`, deflated `FTZ`, or sparse top-k `FTS`)."""
    blob = codec.inflate(bytes(blob))
    magic = blob[:3]
    if magic == codec.MAGIC:
        return _dense_bound(bytes(blob))
    if magic == codec.SPARSE_MAGIC:
        return _sparse_bound(bytes(blob))
    raise ValueError(f"not a codec payload (magic {magic!r}); only shared.codec blobs can be bounded")
