"""What a receiver expects to decode: names, shapes and dtypes, checked against each entry's header
before anything is allocated, and the budget that bounds a payload's decoded size.

Why: the wire is read from clients (and files) we do not control. A header of a few bytes can
claim a tensor of 2**28 elements, and an all-False mask costs no value bytes, so the payload's
length says nothing about what decoding it allocates. The receiver does know what it asked for:
the global model's layers, the prunable weights a score covers, the BN layers of a candidate.
Checking each entry against that before allocating bounds a decode by what was expected, whatever
the bytes claim.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Union

import torch

from shared.codec.binary import _CODES, _DTYPES, _HEADER, MAX_NDIM, DecodeError, _itemsize

DtypeSpec = Union[torch.dtype, Iterable[torch.dtype], None]
Expected = Mapping[str, tuple[tuple[int, ...], DtypeSpec]]
"""name -> (shape, allowed dtype(s)); None allows any dtype the codec carries."""

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

MAX_ELEMENTS = 2**26
"""Decoded elements allowed in one payload when the receiver names no `expected` layout: above
every built-in model at width 2 (VGG-11 on CIFAR-10 is about 9.8 million weights at width 1)."""

_ENTRY_OVERHEAD = 2 + 3 + 1 + 4 + 8  # name length, dtype, wire dtype, ndim, flags, mask length, payload length


def expect(tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, DtypeSpec] | None = None) -> dict:
    """The layout of `tensors` as `decode`'s `expected`: name -> (shape, dtype), or the dtypes in `dtypes`."""
    dtypes = dtypes or {}
    return {n: (tuple(t.shape), dtypes.get(n, t.dtype)) for n, t in tensors.items()}


def _allowed(spec: DtypeSpec) -> frozenset[torch.dtype] | None:
    if spec is None:
        return None
    return frozenset((spec,) if isinstance(spec, torch.dtype) else spec)


class Budget:
    """Checks each entry's claimed name, shape and dtype before it is decoded, and counts elements.

    With `expected`, every entry must be one of its names with exactly its shape and one of its
    dtypes (entries may be fewer: the caller checks completeness, e.g. a download without BN
    statistics); with `at_most`, each dimension may also be smaller (a compacted model). Without
    it, the elements of all entries together stay within `max_elements`.
    """

    def __init__(self, expected: Expected | None = None, max_elements: int | None = None, at_most: bool = False) -> None:
        self.at_most = at_most
        self.expected = None
        if expected is not None:
            self.expected = {n: (tuple(int(d) for d in shape), _allowed(dt)) for n, (shape, dt) in expected.items()}
        self.max_elements = MAX_ELEMENTS if max_elements is None else int(max_elements)
        self.elements = 0

    def entries(self, count: int) -> None:
        if self.expected is not None and count > len(self.expected):
            raise DecodeError(f"payload claims {count} entries, the receiver expects at most {len(self.expected)}")

    def entry(self, name: str, code: int, shape: tuple[int, ...]) -> int:
        """The entry's element count, once its header is known to fit; DecodeError otherwise."""
        numel = math.prod(shape)
        if self.expected is not None:
            if name not in self.expected:
                known = ", ".join(sorted(self.expected)[:3])
                raise DecodeError(f"unexpected entry {name[:60]!r} (expected names such as {known})")
            want, dtypes = self.expected[name]
            fits = len(shape) == len(want) and all(d <= w for d, w in zip(shape, want)) if self.at_most else shape == want
            if not fits:
                raise DecodeError(f"entry {name!r} claims shape {shape}, expected {'at most ' if self.at_most else ''}{want}")
            if dtypes is not None and _DTYPES[code][0] not in dtypes:
                allowed = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
                raise DecodeError(f"entry {name!r} is {_DTYPES[code][0]}, expected {allowed}")
        if self.elements + numel > self.max_elements:
            raise DecodeError(
                f"entry {name!r} of shape {shape} takes the payload over {self.max_elements} decoded elements"
            )
        self.elements += numel
        return numel

    def raw_bytes(self) -> int:
        """The most bytes an honest raw payload of this layout takes: the bound for inflating one.

        Per entry: its header, a mask no larger than a bitmask (`encode_mask` never picks a larger
        encoding), and every value in 8 bytes at most.
        """
        if self.expected is None:
            return _HEADER.size + self.max_elements * 9 + 2**16 * (_ENTRY_OVERHEAD + 4 * MAX_NDIM)
        total = _HEADER.size
        for name, (shape, dtypes) in self.expected.items():
            numel = math.prod(shape)
            item = 8 if dtypes is None else max((_item(d) for d in dtypes), default=0)
            total += _ENTRY_OVERHEAD + len(name.encode("utf-8")) + 4 * len(shape) + (numel + 7) // 8 + numel * item
        return total


def _item(dtype: torch.dtype) -> int:
    """Most bytes one value of `dtype` takes on the wire (masked floats may travel in any float dtype)."""
    return 8 if dtype.is_floating_point or dtype not in _CODES else _itemsize(_CODES[dtype])
