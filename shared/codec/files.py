"""Codec files: `save` (atomic) and `load`."""

from __future__ import annotations

import os
import tempfile
from typing import Mapping

import torch

from shared.codec.binary import DecodeError
from shared.codec.dense import decode, encode
from shared.codec.expect import Expected


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
    path: str | os.PathLike,
    max_bytes: int | None = None,
    *,
    expected: Expected | None = None,
    max_elements: int | None = None,
    at_most: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a file written by `save`: (tensors, masks), bounded like `decode`.

    A file over `max_bytes` is refused before it is read; a corrupt one raises `DecodeError`
    naming the file (a missing one, the usual OSError).
    """
    with open(path, "rb") as f:
        if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
            raise DecodeError(f"{path}: {os.fstat(f.fileno()).st_size} bytes, over max_bytes={max_bytes}")
        data = f.read()
    try:
        return decode(data, max_bytes=max_bytes, expected=expected, max_elements=max_elements, at_most=at_most)
    except DecodeError as exc:
        raise DecodeError(f"{path}: {exc}") from None
