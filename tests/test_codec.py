"""Specification of the wire codec: exact round trips, small sizes, ValueError on bad bytes."""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import struct
import zlib

import numpy as np
import pytest
import torch

from shared import codec
from shared.codec import MaskEncoding, decode, decode_mask, decode_sparse, encode, encode_mask, encode_sparse

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
SHAPES = [(), (1,), (5, 3), (4, 3, 3, 3)]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def random_mask(shape: tuple[int, ...], density: float, seed: int = 1) -> torch.Tensor:
    """A mask keeping exactly round(density * numel) random positions."""
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=g)[: round(density * numel)]] = True
    return flat.reshape(shape)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_unmasked_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = random_tensor(shape, dtype)
    tensors, masks = decode(encode({"x": t}))
    assert list(tensors) == ["x"] and masks == {}
    assert_same(tensors["x"], t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("send", [True, False], ids=["mask-sent", "mask-known"])
def test_masked_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...], send: bool) -> None:
    t, m = random_tensor(shape, dtype), random_mask(shape, 0.4)
    data = encode({"x": t}, {"x": m}, send_masks=send, dtype=None)
    tensors, masks = decode(data, masks=None if send else {"x": m})
    expected = torch.where(m, t, torch.zeros((), dtype=dtype))
    assert_same(tensors["x"], expected)
    assert_same(masks["x"], m)


def test_masked_float32_values_are_exact_with_default_dtype() -> None:
    t, m = random_tensor((6, 7), torch.float32), random_mask((6, 7), 0.3)
    tensors, _ = decode(encode({"w": t}, {"w": m}))
    assert_same(tensors["w"], t * m)


def test_masked_float16_export_halves_value_bytes_and_keeps_dtype() -> None:
    t, m = random_tensor((40, 50), torch.float32), random_mask((40, 50), 0.5)
    full = encode({"w": t}, {"w": m}, send_masks=False, compress=False)
    half = encode({"w": t}, {"w": m}, send_masks=False, dtype=torch.float16, compress=False)
    assert len(full) - len(half) == 1000 * 2
    tensors, _ = decode(half, masks={"w": m})
    assert tensors["w"].dtype == torch.float32
    assert torch.equal(tensors["w"], (t * m).half().float())


def test_mixed_state_dict_round_trip_with_partial_mask_sending() -> None:
    tensors = {
        "conv.weight": random_tensor((8, 4, 3, 3), torch.float32, 1),
        "bn.running_mean": random_tensor((8,), torch.float32, 2),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "fc.weight": random_tensor((10, 32), torch.float32, 3),
    }
    masks = {"conv.weight": random_mask((8, 4, 3, 3), 0.1, 4), "fc.weight": random_mask((10, 32), 0.2, 5)}
    data = encode(tensors, masks, send_masks=["fc.weight"])
    out, out_masks = decode(data, masks={"conv.weight": masks["conv.weight"]})
    assert list(out) == list(tensors)
    for name, t in tensors.items():
        assert_same(out[name], t * masks[name] if name in masks else t)
    assert set(out_masks) == set(masks)
    assert all(torch.equal(out_masks[n], masks[n]) for n in masks)


def test_delta_coded_update_round_trips_exactly_against_the_receivers_copy() -> None:
    base = {"w": random_tensor((16, 16), torch.float32, 1), "b": random_tensor((16,), torch.float32, 2)}
    masks = {"w": random_mask((16, 16), 0.3, 3)}
    update = {"w": base["w"] * (1 + 0.01 * random_tensor((16, 16), torch.float32, 4)), "b": base["b"].clone(),
              "running_mean": random_tensor((16,), torch.float16, 5)}  # not in base: sent as it is
    data = encode(update, masks, send_masks=False, base=base)
    out, _ = decode(data, masks=masks, base=base)
    assert_same(out["w"], update["w"] * masks["w"])
    assert_same(out["b"], update["b"])
    assert_same(out["running_mean"], update["running_mean"])


def test_delta_coding_shrinks_an_update_and_needs_the_same_base() -> None:
    base = {"w": random_tensor((64, 64), torch.float32, 1)}
    update = {"w": base["w"] * (1 + 0.01 * random_tensor((64, 64), torch.float32, 2))}
    update["w"][:32] = base["w"][:32]  # half the values unchanged
    assert len(encode(update, base=base)) < 0.7 * len(encode(update))
    with pytest.raises(codec.DecodeError, match="delta-coded"):
        decode(encode(update, base=base))
    other = {"w": base["w"] + 1}
    assert not torch.equal(decode(encode(update, base=base), base=other)[0]["w"], update["w"])


def test_weights_are_byte_shuffled_because_it_deflates_them_smaller() -> None:
    w = {"w": 0.05 * random_tensor((4096,), torch.float32, 1)}
    assert len(encode(w)) < 0.98 * len(encode(w, shuffle=False))  # measured 0.97: the sign/exponent bytes
    assert_same(decode(encode(w))[0]["w"], w["w"])


def test_sent_masks_cost_bytes_and_known_masks_do_not() -> None:
    t, m = random_tensor((100, 100), torch.float32), random_mask((100, 100), 0.5)
    with_mask = encode({"w": t}, {"w": m}, send_masks=True, compress=False)
    without = encode({"w": t}, {"w": m}, send_masks=False, compress=False)
    assert len(with_mask) - len(without) == 4 + 10000 // 8  # mask length field + bitmask


def test_missing_receiver_mask_is_a_value_error_naming_the_layer() -> None:
    t, m = random_tensor((4, 4), torch.float32), random_mask((4, 4), 0.5)
    with pytest.raises(codec.DecodeError, match="layer1.weight"):
        decode(encode({"layer1.weight": t}, {"layer1.weight": m}, send_masks=False))


def test_receiver_mask_of_wrong_shape_is_a_value_error() -> None:
    t, m = random_tensor((4, 4), torch.float32), random_mask((4, 4), 0.5)
    with pytest.raises(codec.DecodeError, match="w"):
        decode(encode({"w": t}, {"w": m}, send_masks=False), masks={"w": torch.ones(16, dtype=torch.bool)})


def test_encode_rejects_a_mask_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="mask for 'w'"):
        encode({"w": torch.zeros(3, 3)}, {"w": torch.ones(9, dtype=torch.bool)})


def test_encode_rejects_an_unsupported_dtype() -> None:
    with pytest.raises(ValueError, match="complex64"):
        encode({"z": torch.zeros(2, dtype=torch.complex64)})


# ----------------------------------------------------------------------------- mask encodings


def test_high_density_mask_uses_bitmask() -> None:
    encoding, data = encode_mask(random_mask((64, 32, 3, 3), 0.5))
    assert encoding == MaskEncoding.BITMASK
    assert len(data) == 64 * 32 * 9 // 8


def test_very_low_density_mask_uses_delta_indices() -> None:
    mask = random_mask((64, 32, 3, 3), 0.005)
    encoding, data = encode_mask(mask)
    assert encoding in (MaskEncoding.VARINT, MaskEncoding.UINT8, MaskEncoding.UINT16)
    assert len(data) < 64 * 32 * 9 // 8 // 4


def test_evenly_spaced_mask_uses_fixed_width_uint8_gaps() -> None:
    mask = torch.zeros(10_000, dtype=torch.bool)
    mask[::200] = True  # every gap is 199: 1 byte fixed, 2 bytes as varint
    encoding, data = encode_mask(mask)
    assert encoding == MaskEncoding.UINT8 and len(data) == 50


def test_mask_with_gaps_over_255_uses_uint16_when_smallest() -> None:
    mask = torch.zeros(100_000, dtype=torch.bool)
    mask[::20_000] = True  # gaps of 19999: 2 bytes fixed, 3 bytes as varint
    encoding, data = encode_mask(mask)
    assert encoding == MaskEncoding.UINT16 and len(data) == 10


@pytest.mark.parametrize("encoding", list(MaskEncoding), ids=lambda e: e.name)
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 1.0])
def test_every_mask_encoding_round_trips_exactly(encoding: MaskEncoding, density: float) -> None:
    mask = random_mask((30, 17), density)
    flat = mask.reshape(-1).numpy()
    gaps = codec._gaps(flat)
    if encoding == MaskEncoding.BITMASK:
        data = np.packbits(flat, bitorder="little").tobytes()
    elif encoding == MaskEncoding.VARINT:
        data = codec._varint_encode(gaps)
    elif encoding == MaskEncoding.UINT8:
        assert gaps.size == 0 or gaps.max() <= 255
        data = gaps.astype("u1").tobytes()
    else:
        data = gaps.astype("<u2").tobytes()
    if len(data) > (30 * 17 + 7) // 8:  # never chosen by encode_mask, so refused before decoding
        with pytest.raises(codec.DecodeError, match="more than the 64-byte bitmask"):
            decode_mask(encoding, data, (30, 17))
    else:
        assert torch.equal(decode_mask(encoding, data, (30, 17)), mask)


@pytest.mark.parametrize("density", [0.0, 1.0], ids=["all-false", "all-true"])
@pytest.mark.parametrize("shape", [(), (1,), (3, 5), (1000,)], ids=str)
def test_empty_and_full_masks_round_trip_through_encode(density: float, shape: tuple[int, ...]) -> None:
    t, m = random_tensor(shape, torch.float32), random_mask(shape, density)
    tensors, masks = decode(encode({"w": t}, {"w": m}))
    assert_same(tensors["w"], t * m)
    assert_same(masks["w"], m)


def test_empty_mask_costs_no_mask_bytes_and_full_mask_uses_bitmask() -> None:
    assert encode_mask(torch.zeros(1000, dtype=torch.bool)) == (MaskEncoding.VARINT, b"")
    assert encode_mask(torch.ones(1000, dtype=torch.bool))[0] == MaskEncoding.BITMASK


def test_varint_round_trips_values_across_byte_boundaries() -> None:
    values = np.array([0, 1, 127, 128, 255, 16383, 16384, 2**21, 2**28 - 1, 2**35 - 1], dtype=np.uint64)
    encoded = codec._varint_encode(values)
    assert len(encoded) == 1 + 1 + 1 + 2 + 2 + 2 + 3 + 4 + 4 + 5
    assert codec._varint_decode(encoded).tolist() == values.tolist()


# ----------------------------------------------------------------------------- sizes


def model_like_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "c1.weight": (32, 16, 3, 3),
        "c2.weight": (64, 32, 3, 3),
        "c3.weight": (128, 64, 3, 3),
        "fc.weight": (10, 1200),
    }
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


@pytest.mark.parametrize("density, bound", [(0.05, 0.085), (0.01, 0.025)])
def test_sparse_encoding_is_small_at_low_density(density: float, bound: float) -> None:
    weights = model_like_weights()
    numel = sum(w.numel() for w in weights.values())
    assert 90_000 <= numel <= 110_000
    masks = {name: random_mask(tuple(w.shape), density, seed=i) for i, (name, w) in enumerate(weights.items())}
    data = encode(weights, masks)
    assert len(data) <= bound * 4 * numel
    tensors, out_masks = decode(data)
    assert all(torch.equal(tensors[n], weights[n] * masks[n]) for n in weights)


def test_dense_float32_tensor_costs_its_bytes_plus_a_small_header() -> None:
    data = encode({"w": torch.zeros(1000)}, compress=False)
    assert 4000 < len(data) <= 4000 + 32


# ----------------------------------------------------------------------------- corrupt input


def small_payload() -> bytes:
    tensors = {"a": torch.tensor([1.0, -2.0, 3.5]), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    mask = torch.tensor([True, False, True])
    return encode(tensors, {"a": mask}, compress=False)


def small_payload_known_mask() -> bytes:
    return encode(
        {"a": torch.tensor([1.0, -2.0, 3.5])}, {"a": torch.tensor([True, False, True])}, send_masks=False, compress=False
    )


def test_truncation_at_every_prefix_length_is_a_value_error() -> None:
    data = small_payload()
    for n in range(len(data)):
        with pytest.raises(codec.DecodeError):
            decode(data[:n])


def test_truncation_of_known_mask_payload_is_a_value_error() -> None:
    data, masks = small_payload_known_mask(), {"a": torch.tensor([True, False, True])}
    for n in range(len(data)):
        with pytest.raises(codec.DecodeError):
            decode(data[:n], masks=masks)


def test_trailing_bytes_are_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="unexpected bytes"):
        decode(small_payload() + b"\x00")


def test_flipped_magic_is_a_value_error() -> None:
    data = bytearray(small_payload())
    data[0] ^= 0xFF
    with pytest.raises(codec.DecodeError, match="magic"):
        decode(bytes(data))


def test_sparse_payload_given_to_decode_is_a_value_error() -> None:
    data = encode_sparse({"g": (torch.tensor([1]), torch.tensor([0.5]), (4,))})
    with pytest.raises(codec.DecodeError, match="decode_sparse"):
        decode(data)


def test_wrong_version_is_a_value_error() -> None:
    data = bytearray(small_payload())
    data[3] = codec.VERSION + 1
    with pytest.raises(codec.DecodeError, match="version"):
        decode(bytes(data))


def test_max_bytes_exceeded_is_a_value_error() -> None:
    data = small_payload()
    decode(data, max_bytes=len(data))
    with pytest.raises(codec.DecodeError, match="max_bytes"):
        decode(data, max_bytes=len(data) - 1)


def test_random_garbage_is_a_value_error() -> None:
    g = torch.Generator().manual_seed(0)
    for n in [0, 1, 7, 8, 64, 1000]:
        garbage = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).numpy().tobytes()
        with pytest.raises(codec.DecodeError):
            decode(garbage)
        with pytest.raises(codec.DecodeError):
            decode(codec.MAGIC + bytes([codec.VERSION]) + garbage)


def test_random_byte_flips_never_leak_other_exceptions() -> None:
    data = small_payload()
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        corrupt = bytearray(data)
        for pos in torch.randint(0, len(data), (2,), generator=g).tolist():
            corrupt[pos] = int(torch.randint(0, 256, (1,), generator=g))
        try:
            decode(bytes(corrupt))
        except codec.DecodeError:
            pass


def entry(
    name: bytes, code: int, shape: tuple[int, ...], flags: int, payload: bytes, declared: int | None = None
) -> bytes:
    """A hand-built entry, so tests can claim things an honest encoder never would."""
    head = struct.pack("<H", len(name)) + name + struct.pack("<BBB", code, code, len(shape))
    head += b"".join(struct.pack("<I", d) for d in shape) + struct.pack("<B", flags)
    return head + struct.pack("<Q", len(payload) if declared is None else declared) + payload


def payload(*entries: bytes, count: int | None = None) -> bytes:
    header = struct.pack("<3sBI", codec.MAGIC, codec.VERSION, len(entries) if count is None else count)
    return header + b"".join(entries)


def test_hand_built_entry_matches_the_encoder() -> None:
    plain = struct.pack("<2f", 1.0, 2.0)
    assert payload(entry(b"x", 1, (2,), 0, plain)) == encode({"x": torch.tensor([1.0, 2.0])}, shuffle=False)
    x = 1.5 + torch.arange(64, dtype=torch.float32) / 1024  # alike exponents: shuffling deflates smaller
    raw = x.numpy().tobytes()
    shuffled = bytes(raw[i + 4 * j] for i in range(4) for j in range(64))  # byte 0 of each value, then byte 1, ...
    assert payload(entry(b"x", 1, (64,), 0x10, shuffled)) == encode({"x": x}, compress=False)


def test_huge_dense_shape_claim_is_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="decoded elements"):
        decode(payload(entry(b"x", 1, (2**31, 2**31, 2**31), 0, b"\x00" * 8)))


def test_huge_masked_shape_claim_is_a_value_error_before_allocating() -> None:
    flags = 0x01 | 0x02 | (int(MaskEncoding.VARINT) << 2)
    e = entry(b"x", 1, (2**32 - 1, 2**32 - 1), flags, b"")
    e = e[:-8] + struct.pack("<I", 0) + e[-8:]  # mask length 0: an all-False mask
    with pytest.raises(codec.DecodeError, match="elements"):
        decode(payload(e))


def test_payload_length_past_the_end_is_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="payload"):
        decode(payload(entry(b"x", 1, (2,), 0, struct.pack("<2f", 1.0, 2.0), declared=2**60)))


def test_entry_count_larger_than_the_payload_allows_is_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="entries"):
        decode(payload(entry(b"x", 1, (2,), 0, struct.pack("<2f", 1.0, 2.0)), count=2**32 - 1))


def test_shape_and_payload_mismatch_is_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="needs 12 bytes"):
        decode(payload(entry(b"x", 1, (3,), 0, struct.pack("<2f", 1.0, 2.0))))


def test_unknown_dtype_code_is_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="dtype code 99"):
        decode(payload(entry(b"x", 99, (2,), 0, b"\x00" * 8)))


def test_unknown_flags_are_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="flags"):
        decode(payload(entry(b"x", 1, (2,), 0x80, b"\x00" * 8)))


def test_invalid_utf8_name_is_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="utf-8"):
        decode(payload(entry(b"\xff\xfe", 1, (2,), 0, b"\x00" * 8)))


def test_duplicate_names_are_a_value_error() -> None:
    e = entry(b"x", 1, (1,), 0, b"\x00" * 4)
    with pytest.raises(codec.DecodeError, match="twice"):
        decode(payload(e, e))


def test_mask_indices_out_of_range_are_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="range|past the end"):
        decode_mask(MaskEncoding.UINT8, bytes([2, 25]), (20,))


def test_bitmask_padding_bits_set_is_a_value_error() -> None:
    with pytest.raises(codec.DecodeError, match="past the end"):
        decode_mask(MaskEncoding.BITMASK, bytes([0b1000_0001]), (5,))


def test_values_count_disagreeing_with_mask_is_a_value_error() -> None:
    data = encode({"a": torch.tensor([1.0, 2.0, 3.0])}, {"a": torch.tensor([True, True, False])}, send_masks=False)
    with pytest.raises(codec.DecodeError, match="keeps 3 values"):
        decode(data, masks={"a": torch.tensor([True, True, True])})


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(codec.DecodeError, match="bytes"):
        decode("FTC")  # type: ignore[arg-type]


def test_codec_does_not_use_pickle() -> None:
    names = [f"shared.codec.{m.name}" for m in pkgutil.iter_modules(codec.__path__)]
    modules = [codec, *map(importlib.import_module, names)]
    source = "".join(inspect.getsource(m) for m in modules)
    assert len(modules) > 1 and "import pickle" not in source and "from pickle" not in source
    assert "torch.save" not in source and "torch.load" not in source


# ----------------------------------------------------------------------------- sparse top-k


def test_sparse_round_trip_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(8, 4, 3, 3, generator=g)
    indices = grad.reshape(-1).abs().topk(10).indices
    values = grad.reshape(-1)[indices]
    parts = {
        "c.weight": (indices, values, (8, 4, 3, 3)),
        "empty": (torch.zeros(0, dtype=torch.long), torch.zeros(0), (5,)),
    }
    data = encode_sparse(parts)
    assert len(data) == 8 + (2 + 8 + 1 + 4 * 4 + 1 + 8 + 10 * 8) + (2 + 5 + 1 + 4 + 1 + 8)
    out = decode_sparse(data)
    assert list(out) == ["c.weight", "empty"]
    idx, val, shape = out["c.weight"]
    assert idx.dtype == torch.int64 and val.dtype == torch.float32 and shape == (8, 4, 3, 3)
    assert torch.equal(idx, indices) and torch.equal(val, values)
    assert out["empty"][0].numel() == 0 and out["empty"][2] == (5,)


def test_encode_sparse_rejects_out_of_range_indices() -> None:
    with pytest.raises(ValueError, match="out of range"):
        encode_sparse({"g": (torch.tensor([0, 6]), torch.tensor([1.0, 2.0]), (2, 3))})


def test_decode_sparse_rejects_out_of_range_indices() -> None:
    data = bytearray(encode_sparse({"g": (torch.tensor([0, 5]), torch.tensor([1.0, 2.0]), (2, 3))}))
    index_offset = 8 + 2 + 1 + 1 + 2 * 4 + 1 + 8
    data[index_offset + 4 : index_offset + 8] = struct.pack("<I", 6)
    with pytest.raises(codec.DecodeError, match="out of range"):
        decode_sparse(bytes(data))


def test_decode_sparse_rejects_repeated_indices() -> None:
    data = bytearray(encode_sparse({"g": (torch.tensor([0, 5]), torch.tensor([1.0, 2.0]), (2, 3))}))
    index_offset = 8 + 2 + 1 + 1 + 2 * 4 + 1 + 8
    data[index_offset + 4 : index_offset + 8] = struct.pack("<I", 0)
    with pytest.raises(codec.DecodeError, match="repeated"):
        decode_sparse(bytes(data))


def test_sparse_truncation_at_every_prefix_length_is_a_value_error() -> None:
    data = encode_sparse({"g": (torch.tensor([0, 5]), torch.tensor([1.0, 2.0]), (2, 3))})
    for n in range(len(data)):
        with pytest.raises(codec.DecodeError):
            decode_sparse(data[:n])


def test_sparse_max_bytes_and_wrong_magic_are_value_errors() -> None:
    data = encode_sparse({"g": (torch.tensor([1]), torch.tensor([1.0]), (3,))})
    with pytest.raises(codec.DecodeError, match="max_bytes"):
        decode_sparse(data, max_bytes=len(data) - 1)
    with pytest.raises(codec.DecodeError, match="magic"):
        decode_sparse(small_payload())


# ----------------------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path) -> None:
    t, m = random_tensor((6, 5), torch.float32), random_mask((6, 5), 0.3)
    path = tmp_path / "model.ftc"
    written = codec.save(path, {"w": t, "b": torch.arange(3)}, {"w": m})
    assert written == path.stat().st_size
    tensors, masks = codec.load(path)
    assert_same(tensors["w"], t * m)
    assert_same(tensors["b"], torch.arange(3))
    assert_same(masks["w"], m)
    assert [p.name for p in tmp_path.iterdir()] == ["model.ftc"]  # no temporary file left behind


# ----------------------------------------------------------------------------- deflate


def compressible() -> dict[str, torch.Tensor]:
    return {"bn.running_mean": torch.zeros(512), "bn.running_var": torch.ones(512), "w": torch.randn(64)}


def test_redundant_payloads_are_deflated_and_round_trip_exactly() -> None:
    tensors = compressible()
    data = encode(tensors)
    assert data[:3] == codec.DEFLATE_MAGIC and len(data) < len(encode(tensors, compress=False)) / 4
    out, _ = decode(data)
    assert all(torch.equal(out[n], tensors[n]) for n in tensors)


def test_incompressible_payloads_stay_raw() -> None:
    data = encode({"w": torch.randint(0, 256, (1024,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))})
    assert data[:3] == codec.MAGIC


def test_truncated_deflated_payload_is_a_value_error() -> None:
    data = encode(compressible())
    for n in range(len(data)):
        with pytest.raises(codec.DecodeError):
            decode(data[:n])


def test_deflated_payload_claiming_a_huge_size_is_rejected_before_inflating() -> None:
    data = bytearray(encode(compressible()))
    data[4:12] = (2**40).to_bytes(8, "little")
    with pytest.raises(codec.DecodeError, match="over the limit"):
        decode(bytes(data))


def test_corrupt_deflate_stream_is_a_value_error() -> None:
    data = bytearray(encode(compressible()))
    data[20] ^= 0xFF
    with pytest.raises(codec.DecodeError):
        decode(bytes(data))


def _overlapping_masks(n: int = 20_000, count: int = 6) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(3)
    state = {"w": torch.randn(n, generator=g), "bias": torch.randn(4, generator=g)}
    core = torch.rand(n, generator=g) < 0.04
    return state, [{"w": core | (torch.rand(n, generator=g) < 0.01)} for _ in range(count)]


def test_variants_round_trip_to_each_masked_state() -> None:
    state, variants = _overlapping_masks()
    base, selections = codec.encode_variants(state, variants)
    for decoded, masks in zip(codec.decode_variants(base, selections), variants, strict=True):
        assert torch.equal(decoded["w"], state["w"] * masks["w"])
        assert torch.equal(decoded["bias"], state["bias"])


def test_overlapping_variants_cost_far_less_than_one_payload_each() -> None:
    state, variants = _overlapping_masks()
    base, selections = codec.encode_variants(state, variants)
    shared = len(base) + sum(map(len, selections))
    separate = sum(len(encode({"w": state["w"] * m["w"], "bias": state["bias"]}, m)) for m in variants)
    assert shared < 0.5 * separate


def test_a_variant_selection_of_the_wrong_length_is_a_value_error() -> None:
    state, variants = _overlapping_masks()
    base, _ = codec.encode_variants(state, variants)
    with pytest.raises(codec.DecodeError, match=r"claims shape \(3,\), expected"):
        codec.decode_variants(base, [encode({"w": torch.ones(3, dtype=torch.uint8)})])


# ----------------------------------------------------------------------------- bounded decoding


def rss_growth_mb(fn) -> float:
    """Peak resident memory growth while `fn` runs, in MB (Linux ru_maxrss is in KiB; it never goes down)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def masked_bomb(name: bytes = b"w", numel: int = 2**28, code: int = 2) -> bytes:
    """A masked entry of `numel` elements with an empty varint mask: no mask or value bytes at all."""
    e = entry(name, code, (numel,), 0x01 | 0x02 | (int(MaskEncoding.VARINT) << 2), b"")
    return e[:-8] + struct.pack("<I", 0) + e[-8:]


def test_decode_error_is_the_value_error_every_decode_raises() -> None:
    assert issubclass(codec.DecodeError, ValueError)
    for bad in (b"", b"FTC", b"FTS\x01", b"FTZ\x01" + b"\xff" * 20):
        for fn in (decode, decode_sparse, codec.inflate, lambda b: codec.decode_variants(b, [])):
            if fn is codec.inflate and not bad.startswith(codec.DEFLATE_MAGIC):
                continue
            with pytest.raises(codec.DecodeError):
                fn(bad)


def test_31_byte_update_claiming_2_28_float64_elements_is_refused_before_allocating() -> None:
    data = payload(masked_bomb())
    assert len(data) == 31

    def attempts() -> None:
        with pytest.raises(codec.DecodeError, match="decoded elements"):
            decode(data)  # no layout: the element budget
        with pytest.raises(codec.DecodeError, match=r"claims shape \(268435456,\), expected \(100,\)"):
            decode(data, expected={"w": ((100,), torch.float32)})

    assert rss_growth_mb(attempts) < 50


def test_three_bombs_under_max_bytes_raise_decode_error_not_runtime_error() -> None:
    data = payload(*(masked_bomb(n, 2**25) for n in (b"w1", b"w2", b"w3")))
    assert len(data) == 80
    with pytest.raises(codec.DecodeError, match="'w3' .* over 67108864 decoded elements"):
        decode(data, max_bytes=1000)  # 2 x 2**25 fit the default budget, the third does not


def test_bit_flip_in_a_dims_field_is_refused_by_the_expected_shape() -> None:
    state = {"w": random_tensor((64, 64), torch.float32)}
    masks = {"w": random_mask((64, 64), 0.02)}
    data = bytearray(encode(state, masks, compress=False))
    assert MaskEncoding((data[8 + 2 + 1 + 2 + 1 + 8] >> 2) & 3) != MaskEncoding.BITMASK  # indices: still valid if dims grow
    dims = 8 + 2 + 1 + 2 + 1
    data[dims + 2] ^= 0x20  # 64 -> 2,097,216 rows: 134 million elements, 0.5 GB of float32
    expected = codec.expect(state)

    def attempt() -> None:
        with pytest.raises(codec.DecodeError, match=r"claims shape \(2097216, 64\), expected \(64, 64\)"):
            decode(bytes(data), expected=expected)

    assert rss_growth_mb(attempt) < 50


def test_deflate_bomb_is_refused_by_the_expected_layout_before_inflating() -> None:
    bomb = encode({"bn.mean": torch.zeros(2**24)})  # 64 MB of zeros in a few tens of kB
    assert bomb[:3] == codec.DEFLATE_MAGIC and len(bomb) < 2**17
    layout = {"bn.mean": ((16,), torch.float32), "bn.var": ((16,), torch.float32), "bn.count": ((1,), torch.int64)}

    def attempt() -> None:
        with pytest.raises(codec.DecodeError, match="over the limit"):
            decode(bomb, expected=layout)

    assert rss_growth_mb(attempt) < 20


def test_deflated_payload_claiming_zero_bytes_is_refused() -> None:
    """zlib reads max_length=0 as no limit at all."""
    data = struct.pack("<3sBQ", codec.DEFLATE_MAGIC, codec.VERSION, 0) + zlib.compress(b"\x00" * 1000)
    with pytest.raises(codec.DecodeError, match="claims 0 bytes"):
        codec.inflate(data)


def test_honest_payloads_decode_within_their_expected_layout() -> None:
    state = {"w": random_tensor((16, 8), torch.float32), "h": random_tensor((5,), torch.float16),
             "n": torch.tensor(3), "d": random_tensor((40,), torch.float64)}
    for density in (0.0, 0.02, 0.5, 1.0):
        masks = {"w": random_mask((16, 8), density), "d": random_mask((40,), density)}
        for kwargs in ({}, {"compress": False}, {"dtype": None}, {"dtype": torch.float16}, {"shuffle": False}):
            tensors, out_masks = decode(encode(state, masks, **kwargs), expected=codec.expect(state))
            assert set(tensors) == set(state) and all(torch.equal(out_masks[n], masks[n]) for n in masks)


@pytest.mark.parametrize("layout, match", [
    ({"v": ((3,), torch.float32)}, "unexpected entry 'w'"),
    ({"w": ((4,), torch.float32)}, r"claims shape \(3,\), expected \(4,\)"),
    ({"w": ((3,), torch.float16)}, "is torch.float32, expected float16"),
    ({"w": ((3,), (torch.int64, torch.int32))}, "expected int32, int64"),
], ids=["name", "shape", "dtype", "dtypes"])
def test_decode_refuses_entries_outside_the_expected_layout(layout: dict, match: str) -> None:
    with pytest.raises(codec.DecodeError, match=match):
        decode(encode({"w": torch.ones(3)}), expected=layout)


def test_more_entries_than_expected_are_refused_from_the_header() -> None:
    data = encode({"a": torch.ones(1), "b": torch.ones(1)}, compress=False)
    with pytest.raises(codec.DecodeError, match="claims 2 entries, the receiver expects at most 1"):
        decode(data, expected={"a": ((1,), torch.float32)})


def test_max_elements_budget_counts_every_entry() -> None:
    data = encode({"a": torch.ones(6), "b": torch.ones(6)})
    decode(data, max_elements=12)
    with pytest.raises(codec.DecodeError, match="'b' of shape \\(6,\\) takes the payload over 11 decoded elements"):
        decode(data, max_elements=11)


def test_mask_indices_longer_than_the_bitmask_are_refused_before_decoding() -> None:
    with pytest.raises(codec.DecodeError, match="more than the 1-byte bitmask"):
        decode_mask(MaskEncoding.VARINT, b"\x00" * 2, (8,))


def test_decode_sparse_checks_names_shapes_and_counts_against_the_expected_shapes() -> None:
    data = encode_sparse({"g": (torch.tensor([1, 3]), torch.tensor([0.5, -1.0]), (4,))})
    assert set(decode_sparse(data, expected={"g": (4,), "h": (9,)})) == {"g"}
    with pytest.raises(codec.DecodeError, match=r"'g' of shape \(4,\) is not what the receiver expects \(\(5,\)\)"):
        decode_sparse(data, expected={"g": (5,)})
    with pytest.raises(codec.DecodeError, match="'g' of shape"):
        decode_sparse(data, expected={"h": (4,)})
    raw = bytearray(encode_sparse({"g": (torch.tensor([0]), torch.tensor([1.0]), (1,))}))
    count = 8 + 2 + 1 + 1 + 4 + 1
    raw[count:count + 8] = struct.pack("<Q", 2)  # two entries claimed for a one-element tensor
    raw += b"\x00" * 8
    with pytest.raises(codec.DecodeError, match="claims 2 entries for a tensor of 1 elements"):
        decode_sparse(bytes(raw))


def test_load_refuses_a_file_over_max_bytes_before_reading_and_names_a_corrupt_file(tmp_path) -> None:
    path = tmp_path / "model.ftc"
    codec.save(path, {"w": torch.ones(100)})
    with pytest.raises(codec.DecodeError, match="model.ftc: .* over max_bytes=10"):
        codec.load(path, max_bytes=10)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(codec.DecodeError, match="model.ftc: compressed payload does not inflate") as err:
        codec.load(path)
    assert "\n" not in str(err.value)


def test_packed_model_naming_a_module_is_refused_without_importing_it(tmp_path, monkeypatch) -> None:
    """A packed file names its model; only built-in names rebuild, a module:callable is never imported."""
    from shared import export
    from shared.models import build_model

    (tmp_path / "evil_pkg").mkdir()
    (tmp_path / "evil_pkg" / "__init__.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\nbuild = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("cnn", 10, (1, 28, 28))
    spec = export.ModelSpec("evil_pkg:build", 10, (1, 28, 28), 1.0)
    export.save_packed(tmp_path / "model.packed", model, spec, None)
    with pytest.raises(ValueError, match="'evil_pkg:build' would import and run code from package 'evil_pkg', which is not trusted"):
        export.load_packed(tmp_path / "model.packed")
    assert not (tmp_path / "ran").exists()


def test_decode_sparse_without_a_layout_bounds_the_shape_so_no_index_wraps_negative() -> None:
    """A shape of (2**32 - 1)**3 holds index 2**64 - 1, which int64 would read as -1."""
    data = bytearray(encode_sparse({"g": (torch.tensor([0]), torch.tensor([1.0]), (2**32 - 1,) * 3)}))
    index_offset = 8 + 2 + 1 + 1 + 3 * 4 + 1 + 8
    assert data[index_offset - 9] == 8  # u64 indices
    data[index_offset : index_offset + 8] = struct.pack("<Q", 2**64 - 1)
    with pytest.raises(codec.DecodeError, match=f"more than {codec.MAX_ELEMENTS} elements"):
        decode_sparse(bytes(data))


def test_a_deflated_payload_claiming_more_than_deflate_produces_is_refused_before_inflating() -> None:
    data = bytearray(codec.encode({"w": torch.zeros(4096)}))
    assert data[:3] == codec.DEFLATE_MAGIC
    stream = len(data) - 12
    data[4:12] = struct.pack("<Q", codec.DEFLATE_MAX_RATIO * stream + 65)
    with pytest.raises(codec.DecodeError, match="more than deflate produces"):
        decode(bytes(data))


def test_decode_entry_reads_one_entry_and_steps_over_the_rest() -> None:
    small = torch.arange(5, dtype=torch.uint8)
    data = encode({"big": torch.zeros(2**20), "small": small}, compress=True)
    assert torch.equal(codec.decode_entry(data, "small", 5), small)
    with pytest.raises(codec.DecodeError, match="over 4 decoded elements"):
        codec.decode_entry(data, "small", 4)
    with pytest.raises(codec.DecodeError, match="no entry 'none'"):
        codec.decode_entry(data, "none", 10)
