"""Codec files: `save` (atomic) and `load`."""

from __future__ import annotations

import os
import tempfile
from typing import Mapping

import torch

from shared.codec.dense import decode, encode


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
