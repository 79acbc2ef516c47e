"""Seeded mutation fuzzing of every codec decode entry point; prints JSON for the closing note.

Each entry point is decoded the way its receiver decodes it (the same `expected` layout, masks,
base and `max_bytes`): training updates, model downloads, BN statistics, dense scores (SNIP,
PruneFL's squared gradients), top-k gradients, FedDST mask changes, policy-search candidates,
codec files, single masks and deflated payloads. Honest payloads are mutated by bit flips, byte
edits, truncations, insertions, deletions, edits of the format's length, count and dims fields,
splices and random bytes, then decoded. Every case must end in `DecodeError` or in a decode
within the receiver's layout; anything else (another exception, an entry outside the layout) is
a failure and listed. Peak RSS growth over the whole run is reported (Linux ru_maxrss).

    python -m simulations.fuzz_codec --cases 40000 --seed 0

`tests/test_codec_fuzz.py` runs it with a few thousand cases in CI.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import resource
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from shared import codec
from shared.batchnorm import bn_stats_to_tensors

Tensors = dict[str, torch.Tensor]

INTERESTING = [0, 1, 2, 7, 8, 255, 256, 2**15, 2**16 - 1, 2**16, 2**24, 2**26, 2**28, 2**31 - 1, 2**31,
               2**32 - 1, 2**40, 2**63, 2**64 - 1]


@dataclass
class EntryPoint:
    """One receiver: honest payloads (seeds), how it decodes bytes, and the layout results must fit."""

    name: str
    seeds: list[bytes]
    decode: Callable[[bytes], dict[str, torch.Tensor | tuple]]
    layout: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...] | None]] | None  # None: any, within MAX_ELEMENTS


def _model_state(g: torch.Generator) -> tuple[Tensors, Tensors]:
    """A small conv + BN + linear state and its masks, like a pruned CNN's."""
    state = {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g),
        "bn.weight": torch.rand(8, generator=g), "bn.bias": torch.randn(8, generator=g),
        "bn.running_mean": torch.randn(8, generator=g), "bn.running_var": torch.rand(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(3), "fc.weight": torch.randn(10, 128, generator=g),
        "fc.bias": torch.randn(10, generator=g),
    }
    masks = {"conv.weight": torch.rand(8, 3, 3, 3, generator=g) < 0.3, "fc.weight": torch.rand(10, 128, generator=g) < 0.02}
    for n, m in masks.items():
        state[n] = state[n] * m
    return state, masks


def entry_points(seed: int = 0) -> list[EntryPoint]:
    g = torch.Generator().manual_seed(seed)
    state, masks = _model_state(g)
    running = {"bn.running_mean", "bn.running_var"}
    upload_dtypes = {n: (t.dtype, torch.float16) if n in running else (t.dtype,) for n, t in state.items()}
    update_layout = codec.expect(state, upload_dtypes)
    max_update = 2 * len(codec.encode(state, compress=False)) + 65536
    trained = {n: (t + 0.01 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t) for n, t in state.items()}
    trained = {n: t * masks[n] if n in masks else t for n, t in trained.items()}
    upload = {n: t.half() if n in running else t for n, t in trained.items()}
    updates = [codec.encode(upload, masks, send_masks=False, base=state),
               codec.encode(upload, masks, send_masks=False, base=state, compress=False),
               codec.encode(upload, masks, send_masks=False, compress=False, shuffle=False)]

    def update(blob: bytes):
        return codec.decode(blob, masks=masks, max_bytes=max_update, base=state, expected=update_layout)[0]

    download_layout = codec.expect(state)
    downloads = [codec.encode(state, masks), codec.encode(state, masks, compress=False),
                 codec.encode({n: t for n, t in state.items() if n not in running}, masks, send_masks=["fc.weight"],
                              compress=False)]

    def download(blob: bytes):
        return codec.decode(blob, masks=masks, expected=download_layout)[0]

    bn = {"bn": (torch.randn(8, dtype=torch.float64, generator=g), torch.rand(8, dtype=torch.float64, generator=g), 640),
          "layer2.bn": (torch.randn(16, dtype=torch.float64, generator=g), torch.rand(16, dtype=torch.float64, generator=g), 160)}
    bn_tensors = bn_stats_to_tensors(bn)
    bn_layout = codec.expect(bn_tensors)
    bn_seeds = [codec.encode(bn_tensors), codec.encode(bn_tensors, compress=False)]

    def bn_stats(blob: bytes):
        return codec.decode(blob, expected=bn_layout)[0]

    shapes = {n: tuple(masks[n].shape) for n in masks}
    score_layout = {n: (s, codec.FLOAT_DTYPES) for n, s in shapes.items()}
    scores = {n: torch.rand(s, generator=g) for n, s in shapes.items()}
    score_seeds = [codec.encode(scores), codec.encode(scores, compress=False), codec.encode({n: s.double() for n, s in scores.items()})]
    score_max = 8 * sum(map(math.prod, shapes.values())) + 65536

    def score(blob: bytes):
        return codec.decode(blob, max_bytes=score_max, expected=score_layout)[0]

    pending = {"fc.weight": 13, "conv.weight": 5}
    topk_parts = {}
    for n, k in pending.items():
        free = torch.nonzero(~masks[n].reshape(-1)).reshape(-1)[:k]
        topk_parts[n] = (free, torch.randn(len(free), generator=g), shapes[n])
    topk_seed = codec.encode_sparse(topk_parts)

    def topk(blob: bytes):
        return codec.decode_sparse(blob, max_bytes=16 * sum(pending.values()) + 65536, expected=shapes)

    changes = {n: (torch.tensor([0, 5, 9]), torch.tensor([0.0, 0.5, -0.5]), shapes[n]) for n in shapes}
    change_seed = codec.encode_sparse(changes)

    def mask_changes(blob: bytes):
        return codec.decode_sparse(blob, expected=shapes)

    variants = [masks, {n: m | (torch.rand(m.shape, generator=g) < 0.05) for n, m in masks.items()}]
    base, selections = codec.encode_variants(state, variants)

    def candidate_base(blob: bytes):
        return {f"{i}:{n}": t for i, v in enumerate(codec.decode_variants(blob, selections, expected=download_layout))
                for n, t in v.items()}

    def candidate_mask(blob: bytes):
        return {f"{i}:{n}": t for i, v in enumerate(codec.decode_variants(base, [blob], expected=download_layout))
                for n, t in v.items()}

    candidate_layout = {f"{i}:{n}": v for i in range(len(variants)) for n, v in download_layout.items()}
    file_seeds = [codec.encode(state, masks, send_masks=True, dtype=torch.float16, shuffle=False),
                  codec.encode(state, masks, send_masks=True, shuffle=False, compress=False)]
    tmp = tempfile.NamedTemporaryFile(prefix="fuzz-", suffix=".ftc", delete=False)
    tmp.close()
    atexit.register(os.unlink, tmp.name)

    def codec_file(blob: bytes):
        with open(tmp.name, "wb") as f:
            f.write(blob)
        return codec.load(tmp.name)[0]

    mask_shape = (20, 30)
    mask_seeds = [bytes([e]) + b for e, b in (
        codec.encode_mask(torch.rand(mask_shape, generator=g) < d) for d in (0.01, 0.1, 0.6))]

    def mask(blob: bytes):
        return {"mask": codec.decode_mask(blob[0] if blob else 99, blob[1:], mask_shape)}

    inflate_seeds = [codec.deflate(codec.encode(state, compress=False))]
    inflate_limit = 2 * len(codec.encode(state, compress=False))

    def inflate(blob: bytes):
        return {"raw": torch.frombuffer(bytearray(codec.inflate(blob, limit=inflate_limit)) or bytearray(1), dtype=torch.uint8)}

    return [
        EntryPoint("update", updates, update, update_layout),
        EntryPoint("download", downloads, download, download_layout),
        EntryPoint("bn_stats", bn_seeds, bn_stats, bn_layout),
        EntryPoint("scores", score_seeds, score, score_layout),
        EntryPoint("topk", [topk_seed], topk, {n: (s, None) for n, s in shapes.items()}),
        EntryPoint("mask_changes", [change_seed], mask_changes, {n: (s, None) for n, s in shapes.items()}),
        EntryPoint("candidate_base", [base], candidate_base, candidate_layout),
        EntryPoint("candidate_mask", selections, candidate_mask, candidate_layout),
        EntryPoint("file", file_seeds, codec_file, None),
        EntryPoint("mask", mask_seeds, mask, {"mask": (mask_shape, (torch.bool,))}),
        EntryPoint("inflate", inflate_seeds, inflate, {"raw": ((inflate_limit,), None)}),
    ]


# ----------------------------------------------------------------------------- mutations


def _fields(raw: bytes) -> list[tuple[int, int]]:
    """(offset, width) of the count, name length, dims, flags, mask length and payload length
    fields of an honest raw dense or sparse payload (best effort; [] for anything else)."""
    out: list[tuple[int, int]] = []
    if len(raw) < 8 or raw[:3] not in (codec.MAGIC, codec.SPARSE_MAGIC):
        return out
    sparse = raw[:3] == codec.SPARSE_MAGIC
    out.append((4, 4))
    pos = 8
    try:
        for _ in range(min(struct.unpack_from("<I", raw, 4)[0], 64)):
            out.append((pos, 2))
            pos += 2 + struct.unpack_from("<H", raw, pos)[0]
            if not sparse:
                pos += 2
            ndim = raw[pos]
            out += [(pos, 1)] + [(pos + 1 + 4 * i, 4) for i in range(ndim)]
            pos += 1 + 4 * ndim
            if sparse:
                out += [(pos, 1), (pos + 1, 8)]
                width, k = raw[pos], struct.unpack_from("<Q", raw, pos + 1)[0]
                pos += 9 + k * (width + 4)
                continue
            flags = raw[pos]
            out.append((pos, 1))
            pos += 1
            if flags & 0x02:
                out.append((pos, 4))
                pos += 4
            out.append((pos, 8))
            pos += 8 + struct.unpack_from("<Q", raw, pos)[0]
    except (struct.error, IndexError, OverflowError):  # a mutated payload: the fields found so far
        pass
    return out


def mutate(data: bytes, rng: np.random.Generator, seeds: list[bytes]) -> tuple[str, bytes]:
    """One seeded mutation of `data`: (kind, mutated bytes)."""
    kinds = ["bit_flip", "byte_set", "truncate", "insert", "delete", "field_edit", "field_edit_raw", "splice", "random"]
    kind = kinds[int(rng.integers(len(kinds)))]
    buf = bytearray(data)
    n = len(buf)
    if kind == "bit_flip" and n:
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(n))
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == "byte_set" and n:
        for _ in range(int(rng.integers(1, 4))):
            buf[int(rng.integers(n))] = int(rng.integers(256))
    elif kind == "truncate":
        buf = buf[: int(rng.integers(n + 1))]
    elif kind == "insert":
        i = int(rng.integers(n + 1))
        buf[i:i] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
    elif kind == "delete" and n:
        i = int(rng.integers(n))
        del buf[i : i + int(rng.integers(1, 9))]
    elif kind in ("field_edit", "field_edit_raw"):
        # Edit a length, count, dims or flags field: of the raw payload inside a deflated one
        # (re-deflated, so the edit reaches the parser) or of the bytes as they are.
        try:
            raw = codec.inflate(data, limit=1 << 24) if data[:3] == codec.DEFLATE_MAGIC else data
        except codec.DecodeError:  # an earlier mutation broke the stream: edit the bytes as they are
            raw = data
        fields = _fields(raw)
        if fields:
            buf = bytearray(raw)
            off, width = fields[int(rng.integers(len(fields)))]
            value = INTERESTING[int(rng.integers(len(INTERESTING)))] if rng.random() < 0.7 else \
                int.from_bytes(buf[off : off + width], "little") ^ (1 << int(rng.integers(8 * width)))
            buf[off : off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
            if kind == "field_edit" and data[:3] == codec.DEFLATE_MAGIC:
                buf = bytearray(codec.deflate(bytes(buf)) if len(zlib.compress(bytes(buf))) + 12 < len(buf) else buf)
        elif n:
            off = int(rng.integers(n))
            width = [1, 2, 4, 8][int(rng.integers(4))]
            value = INTERESTING[int(rng.integers(len(INTERESTING)))]
            buf[off : off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    elif kind == "splice":
        other = seeds[int(rng.integers(len(seeds)))]
        i, j = int(rng.integers(n + 1)), int(rng.integers(len(other) + 1))
        buf = buf[:i] + bytearray(other[j:])
    else:  # random bytes, half of them behind a valid header
        body = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
        prefix = [b"", codec.MAGIC + bytes([codec.VERSION]), codec.SPARSE_MAGIC + bytes([codec.VERSION]),
                  codec.DEFLATE_MAGIC + bytes([codec.VERSION])][int(rng.integers(4))]
        buf = bytearray(prefix + body)
    return kind, bytes(buf)


# ----------------------------------------------------------------------------- checking


def _fits(result: dict, layout) -> str | None:
    """Why a successful decode is outside the receiver's layout, or None when it fits."""
    total = 0
    for name, value in result.items():
        tensor = value[0] if isinstance(value, tuple) else value  # sparse: (indices, values, shape)
        if isinstance(value, tuple):
            shape, dtype = tuple(value[2]), None
            if len(value[0]) > math.prod(shape):
                return f"{name}: {len(value[0])} sparse entries for shape {shape}"
        else:
            shape, dtype = tuple(tensor.shape), tensor.dtype
        total += tensor.numel()
        if layout is None:
            continue
        if name not in layout:
            return f"unexpected entry {name!r}"
        want, dtypes = layout[name]
        dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else dtypes
        if (name == "raw" and tensor.numel() > math.prod(want)) or (name != "raw" and shape != tuple(want)):
            return f"{name}: shape {shape}, expected {want}"
        if dtype is not None and dtypes is not None and dtype not in dtypes:
            return f"{name}: dtype {dtype}"
    if layout is None and total > codec.MAX_ELEMENTS:
        return f"{total} elements decoded, over MAX_ELEMENTS"
    return None


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(cases: int, seed: int = 0, max_failures: int = 20) -> dict:
    """Fuzz `cases` mutations spread over every entry point; a JSON-able summary."""
    points = entry_points(seed)
    for point in points:  # the honest seeds decode, and within their layout
        for blob in point.seeds:
            assert _fits(point.decode(blob), point.layout) is None, point.name
    rng = np.random.default_rng(seed)
    baseline = _rss_mb()
    start = time.monotonic()
    outcomes: dict[str, Counter] = {p.name: Counter() for p in points}
    mutations: Counter = Counter()
    failures: list[dict] = []
    for i in range(cases):
        point = points[i % len(points)]
        data = point.seeds[int(rng.integers(len(point.seeds)))]
        for _ in range(int(rng.integers(1, 3))):  # one or two stacked mutations
            kind, data = mutate(data, rng, point.seeds)
            mutations[kind] += 1
        try:
            result = point.decode(data)
        except codec.DecodeError:
            outcomes[point.name]["DecodeError"] += 1
            continue
        except Exception as exc:  # noqa: BLE001  what the fuzzer is looking for
            outcomes[point.name][f"escaped {type(exc).__name__}"] += 1
            failures.append({"entry": point.name, "case": i, "error": f"{type(exc).__name__}: {exc}"[:300],
                             "bytes": data[:64].hex()})
            continue
        reason = _fits(result, point.layout)
        outcomes[point.name]["ok" if reason is None else "outside layout"] += 1
        if reason is not None:
            failures.append({"entry": point.name, "case": i, "error": reason, "bytes": data[:64].hex()})
    return {
        "cases": cases,
        "seed": seed,
        "seconds": round(time.monotonic() - start, 2),
        "outcomes": {name: dict(sorted(c.items())) for name, c in outcomes.items()},
        "mutations": dict(sorted(mutations.items())),
        "failures": len(failures),
        "failure_examples": failures[:max_failures],
        "rss_baseline_mb": round(baseline, 1),
        "rss_peak_mb": round(_rss_mb(), 1),
        "rss_growth_mb": round(_rss_mb() - baseline, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    summary = run(args.cases, args.seed)
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
