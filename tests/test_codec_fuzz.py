"""Fuzzing every decode entry point: only DecodeError or a decode within the receiver's layout,
in bounded memory; and the server's update check turns any of it into a rejection, never a crash."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from shared.methods import Reply
from shared.global_model import GlobalModel
from server.rounds import check_update
from shared import codec, protocol as p
from simulations import fuzz_codec

ROOT = Path(__file__).resolve().parents[1]
CASES = 3000
RSS_BOUND_MB = 50


@pytest.fixture(scope="module")
def fuzz_summary() -> dict:
    """The fuzzer in a fresh process, so its peak RSS is its own (ru_maxrss never goes down)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.fuzz_codec", "--cases", str(CASES), "--seed", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


def test_fuzzed_payloads_raise_only_decode_error_or_decode_within_the_layout(fuzz_summary: dict) -> None:
    assert fuzz_summary["cases"] == CASES
    assert fuzz_summary["failures"] == 0, fuzz_summary["failure_examples"]


def test_fuzzing_reaches_every_entry_point_and_mutation(fuzz_summary: dict) -> None:
    names = {point.name for point in fuzz_codec.entry_points()}
    assert set(fuzz_summary["outcomes"]) == names
    for name, outcomes in fuzz_summary["outcomes"].items():
        assert sum(outcomes.values()) >= CASES // len(names), name
        assert outcomes.get("DecodeError", 0) > 0, name
    assert len(fuzz_summary["mutations"]) == 9 and min(fuzz_summary["mutations"].values()) > 100


def test_fuzzing_stays_within_the_memory_bound(fuzz_summary: dict) -> None:
    assert fuzz_summary["rss_growth_mb"] < RSS_BOUND_MB, fuzz_summary


# ----------------------------------------------------------------------------- the server's check


def _update_reply(blob: bytes, num_examples: int = 10) -> Reply:
    content = RecordDict()
    content[p.PAYLOAD] = ConfigRecord({p.UPDATE: blob})
    content[p.METRICS] = MetricRecord({p.NUM_EXAMPLES: num_examples})
    return Reply(1, content, len(blob))


def _global_model() -> tuple[GlobalModel, bytes]:
    state, masks = fuzz_codec._model_state(torch.Generator().manual_seed(0))
    gm = GlobalModel(state, masks)
    update = {n: t + 0.01 if t.is_floating_point() else t for n, t in gm.state.items()}
    update = {n: t * masks[n] if n in masks else t for n, t in update.items()}
    return gm, codec.encode(update, masks, send_masks=False, base=gm.state)


def test_check_update_accepts_the_honest_update() -> None:
    gm, blob = _global_model()
    update, reason = check_update(gm, _update_reply(blob))
    assert reason is None and set(update) == set(gm.state)


def test_check_update_turns_every_fuzzed_update_into_an_update_or_a_reason() -> None:
    gm, blob = _global_model()
    seeds = [blob, codec.encode({n: t for n, t in gm.state.items()}, gm.masks, send_masks=False, compress=False)]
    rng = np.random.default_rng(1)
    outcomes = {"rejected": 0, "accepted": 0}
    for _ in range(400):
        data = seeds[int(rng.integers(len(seeds)))]
        for _ in range(int(rng.integers(1, 3))):
            _, data = fuzz_codec.mutate(data, rng, seeds)
        update, reason = check_update(gm, _update_reply(data))  # raising here would stop the server
        if reason is None:
            assert {n: tuple(t.shape) for n, t in update.items()} == {n: tuple(t.shape) for n, t in gm.state.items()}
        outcomes["rejected" if reason else "accepted"] += 1
    assert outcomes["rejected"] > 300


def _masked_bomb(name: bytes, numel: int = 2**28) -> bytes:
    """One masked float64 entry of `numel` elements with an empty varint mask: 23 bytes + the name."""
    flags = 0x01 | 0x02 | (int(codec.MaskEncoding.VARINT) << 2)
    return (struct.pack("<H", len(name)) + name + struct.pack("<BBBI", 2, 2, 1, numel) + struct.pack("<B", flags)
            + struct.pack("<I", 0) + struct.pack("<Q", 0))


def test_an_80_byte_update_claiming_three_2_28_element_tensors_is_a_rejection_reason() -> None:
    gm, _ = _global_model()
    data = struct.pack("<3sBI", codec.MAGIC, codec.VERSION, 3) + b"".join(_masked_bomb(n) for n in (b"w1", b"w2", b"w3"))
    assert len(data) == 80 and len(data) < gm.max_update_bytes()
    update, reason = check_update(gm, _update_reply(data))
    assert update is None and reason.startswith("undecodable update (") and "expect" in reason


def test_check_update_rejects_a_masked_layer_sent_dense() -> None:
    """Well within the layout, so it decodes; the check must reject it rather than miss its mask."""
    gm, _ = _global_model()
    blob = codec.encode(gm.state, {"fc.weight": gm.masks["fc.weight"]}, send_masks=False, base=gm.state)
    update, reason = check_update(gm, _update_reply(blob))
    assert update is None and reason.startswith("conv.weight arrived dense, without the global mask")
