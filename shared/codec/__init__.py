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

Decoding is bounded by what the receiver expects. Every decode entry point (`decode`, `decode_entry`,
`decode_sparse`, `decode_variants`, `decode_mask`, `load`, `inflate`) takes that expectation
(`expected`: names, shapes and dtypes, e.g. `expect(global_state)`; or a `max_elements` budget)
and checks each entry's header against it before allocating, and a deflated payload inflates no
further than that layout takes. Every malformed, truncated, oversize or unexpected input raises
`DecodeError` (a `ValueError`), and no other exception.

Modules, one job each: `binary` (format constants, dtype codes, tensor bytes, varints, the
bounds-checked reader, `DecodeError`), `expect` (what a receiver expects, the decode budget), `masks` (mask encodings), `transforms` (delta coding, byte shuffle),
`dense` (`encode` / `decode`), `compression` (`deflate` / `inflate`), `sparse` (top-k),
`variants` (masked variants of one state) and `files` (`save` / `load`). Import from
`shared.codec`: it re-exports the public API.
"""

from __future__ import annotations

from shared.codec.binary import MAGIC, MAX_NDIM, SPARSE_MAGIC, VERSION, DecodeError
from shared.codec.compression import DEFLATE_MAGIC, DEFLATE_MAX_RATIO, MAX_INFLATED, deflate, inflate
from shared.codec.dense import MAX_MASKED_NUMEL, decode, decode_entry, encode
from shared.codec.expect import FLOAT_DTYPES, MAX_ELEMENTS, Expected, expect
from shared.codec.files import load, save
from shared.codec.masks import MaskEncoding, decode_mask, encode_mask
from shared.codec.sparse import decode_sparse, encode_sparse
from shared.codec.variants import decode_variants, encode_variants

# private helpers that tests and simulations/wire_bound.py reach through `codec.`
from shared.codec.binary import _itemsize, _varint_decode, _varint_encode  # noqa: E402,F401  isort: skip
from shared.codec.masks import _gaps  # noqa: E402,F401  isort: skip

__all__ = [
    "DEFLATE_MAGIC",
    "DEFLATE_MAX_RATIO",
    "FLOAT_DTYPES",
    "MAGIC",
    "MAX_ELEMENTS",
    "MAX_INFLATED",
    "MAX_MASKED_NUMEL",
    "MAX_NDIM",
    "SPARSE_MAGIC",
    "VERSION",
    "DecodeError",
    "Expected",
    "MaskEncoding",
    "decode",
    "decode_entry",
    "decode_mask",
    "decode_sparse",
    "decode_variants",
    "deflate",
    "encode",
    "encode_mask",
    "encode_sparse",
    "encode_variants",
    "expect",
    "inflate",
    "load",
    "save",
]
