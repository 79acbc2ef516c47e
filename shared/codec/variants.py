"""Masked variants of one state dict (the policy search's candidates): one base plus a selection each."""

from __future__ import annotations

from typing import Mapping

import torch

from shared.codec.binary import DecodeError, decode_errors
from shared.codec.dense import decode, encode
from shared.codec.expect import Expected


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


@decode_errors
def decode_variants(
    base: bytes, selections: list[bytes], *, expected: Expected | None = None
) -> list[dict[str, torch.Tensor]]:
    """Inverse of `encode_variants`: each variant's state dict (masked-off values 0).

    `expected` bounds the base like `decode`'s; each selection may hold only one uint8 entry per
    masked layer of the base, as long as the union keeps. Any failure raises `DecodeError`.
    """
    tensors, union = decode(base, expected=expected)
    layout = {n: ((int(keep.sum()),), torch.uint8) for n, keep in union.items()}
    out = []
    for blob in selections:
        chosen, _ = decode(blob, expected=layout)
        if set(chosen) != set(union):
            raise DecodeError(f"variant selects layers {sorted(chosen)[:3]}, the base masks {sorted(union)[:3]}")
        state = dict(tensors)
        for name, sel in chosen.items():
            keep = union[name]
            mask = torch.zeros_like(keep)
            mask[keep] = sel.bool()
            state[name] = tensors[name] * mask
        out.append(state)
    return out
