"""Faults: bad updates are rejected with a reason, dropped clients are survived, crashes resume exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fake_grid import FakeGrid
from helpers import ROOT, tiny_config
from server.app import run
from server.fleet import Fleet, Reply
from shared.global_model import GlobalModel
from shared.aggregate import clip_update
from server.rounds import check_update
from shared.methods.topk_gradients import check_topk
from shared import codec, protocol as p


@pytest.fixture
def gm():
    torch.manual_seed(0)
    state = {"w": torch.randn(8, 8), "b": torch.randn(8), "n": torch.tensor(3)}
    return GlobalModel(state, {"w": torch.rand(8, 8) < 0.25})


def reply(blob: bytes, n: int = 10, **payload) -> Reply:
    content = RecordDict({p.PAYLOAD: ConfigRecord({p.UPDATE: blob, **payload}), p.METRICS: MetricRecord({p.NUM_EXAMPLES: n})})
    return Reply(node_id=1, content=content, bytes_up=len(blob))


def honest(gm: GlobalModel, **changes) -> dict:
    return {**{k: v.clone() for k, v in gm.state.items()}, **changes}


def test_an_honest_update_is_accepted(gm):
    r = reply(codec.encode(honest(gm), gm.masks, send_masks=False))
    update, reason = check_update(gm, r)
    assert reason is None and torch.equal(update["w"], gm.state["w"])


def test_running_stats_may_come_as_float16_and_are_restored_to_float32():
    state = {"bn.weight": torch.ones(4), "bn.running_mean": torch.tensor([0.1, 2.0, -3.0, 1e-3]),
             "bn.running_var": torch.tensor([1.0, 0.5, 2.0, 3.0]), "bn.num_batches_tracked": torch.tensor(7)}
    gm = GlobalModel(state)
    r = reply(codec.encode({**state, "bn.running_mean": state["bn.running_mean"].half()}))
    update, reason = check_update(gm, r)
    assert reason is None
    assert update["bn.running_mean"].dtype == torch.float32
    assert torch.allclose(update["bn.running_mean"], state["bn.running_mean"], rtol=1e-3)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda gm: codec.encode({**honest(gm), "extra": torch.ones(1)}, gm.masks, send_masks=False), "claims 4 entries, the receiver expects at most 3"),
        (lambda gm: codec.encode(honest(gm, b=torch.ones(9)), gm.masks, send_masks=False), "claims shape (9,), expected (8,)"),
        (lambda gm: codec.encode(honest(gm, b=torch.full((8,), math.nan)), gm.masks, send_masks=False), "non-finite values in b"),
        (lambda gm: codec.encode(honest(gm, b=torch.full((8,), math.inf)), gm.masks, send_masks=False), "non-finite values in b"),
        (lambda gm: codec.encode(honest(gm), {"w": torch.ones(8, 8, dtype=torch.bool)}), "mask of w differs"),
        (lambda gm: codec.encode(honest(gm), {"w": ~gm.masks["w"]}), "mask of w differs"),
        (lambda gm: codec.encode(honest(gm, b=gm.state["b"].half()), gm.masks, send_masks=False), "'b' is torch.float16, expected float32"),
        (lambda gm: b"garbage" * 10, "undecodable update"),
        (lambda gm: codec.encode(honest(gm), gm.masks)[:-3], "undecodable update"),
        (lambda gm: codec.encode({**honest(gm), "big": torch.randn(200_000)}), "undecodable update"),
    ],
    ids=["extra-layer", "wrong-shape", "nan", "inf", "values-at-pruned-positions", "wrong-mask", "half-weights", "garbage", "truncated", "oversize"],
)
def test_bad_updates_are_rejected_with_a_reason(gm, make, reason):
    assert reason in check_update(gm, reply(make(gm)))[1]


def test_an_update_claiming_zero_examples_is_rejected_before_it_is_decoded(gm):
    fleet = Fleet(grid=None, num_clients=1, min_replies=0.5, timeout=1.0)
    zero = reply(codec.encode(honest(gm), gm.masks, send_masks=False), n=0)
    assert fleet.accepted([zero], p.TRAIN, lambda r: check_update(gm, r)) == [] and zero.decoded is None
    assert "num-examples=0 must be a positive integer" in fleet.traffic.rejected[0]


def test_norm_bounding_clips_the_distance_to_the_global_model():
    ref = {"w": torch.zeros(4)}
    clipped = clip_update(ref, {"w": torch.tensor([3.0, 4.0, 0.0, 0.0])}, max_norm=1.0)
    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.8, 0.0, 0.0]))


def topk_reply(parts: dict) -> Reply:
    return Reply(1, RecordDict({p.PAYLOAD: ConfigRecord({p.TOPK: codec.encode_sparse(parts)})}), 0)


def test_top_k_gradients_are_checked(gm):
    pruned = torch.nonzero(~gm.masks["w"].flatten()).flatten()
    active = torch.nonzero(gm.masks["w"].flatten()).flatten()
    ok = {"w": (pruned[:3], torch.ones(3), (8, 8))}
    assert check_topk(topk_reply(ok), gm, {"w": 3})[1] is None
    assert "more than k=2" in check_topk(topk_reply(ok), gm, {"w": 2})[1]
    assert "active positions" in check_topk(topk_reply({"w": (active[:1], torch.ones(1), (8, 8))}), gm, {"w": 3})[1]
    assert "sparse entry 'b' of shape (8,) is not what the receiver expects" in check_topk(topk_reply({"b": (torch.tensor([0]), torch.ones(1), (8,))}), gm, {"w": 3})[1]
    bad = Reply(1, RecordDict({p.PAYLOAD: ConfigRecord({p.TOPK: b"FTS\x01\xff\xff"})}), 0)
    assert "undecodable" in check_topk(bad, gm, {"w": 3})[1]


def test_a_crashed_run_resumes_to_the_same_result(tmp_path):
    config = tiny_config(tmp_path / "full", "fl.rounds=4")
    full = run(FakeGrid(config), config)

    crashed = tiny_config(tmp_path / "crash", "fl.rounds=4")
    trains = iter(range(100))
    grid = FakeGrid(crashed, drop=lambda n, t: t == p.TRAIN and next(trains) >= 6)  # round 4 never answers
    with pytest.raises(Exception):
        run(grid, crashed)
    assert json.loads((tmp_path / "crash" / "checkpoint.json").read_text())["round"] == 3
    resumed_config = tiny_config(tmp_path / "crash", "fl.rounds=4", "resume=true")
    resumed = run(FakeGrid(resumed_config), resumed_config)

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, resumed))
    assert a["summary"]["accuracy"] == b["summary"]["accuracy"]
    assert [r["accuracy"] for r in a["rounds"]] == [r["accuracy"] for r in b["rounds"]]
    (_, ma), (_, mb) = codec.load(full / "model.ftc"), codec.load(resumed / "model.ftc")
    assert all(torch.equal(ma[n], mb[n]) for n in ma)


@pytest.mark.integration
def test_dropped_clients_are_survived_in_a_real_simulation(tmp_path):
    from simulations.cli import main

    out = tmp_path / "drop"
    args = ["run", "--config", "configs/tiny.yaml", "--no-progress", f"output_dir={out}",
            "simulation.fail_fraction=0.5", "fl.min_replies=0.5", "fl.rounds=3"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["summary"]["client_failures"] > 0
    assert all(r["clients"] >= 1 for r in m["rounds"][1:])


@pytest.mark.integration
def test_stragglers_are_cut_by_the_round_timeout_in_a_real_simulation(tmp_path):
    from simulations.cli import main

    out, timeout = tmp_path / "straggle", 15.0
    args = ["run", "--config", "configs/tiny.yaml", "--no-progress", f"output_dir={out}",
            "simulation.fail_fraction=0.5", "simulation.fail_mode=straggle", "fl.min_replies=0.5",
            "simulation.num_cpus=4",  # 4 Ray actors on 2 cores: a sleeping straggler holds one
            f"fl.round_timeout={timeout}", "fl.rounds=3"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    cut = [r for r in m["rounds"][1:] if r["failures"] > 0]
    assert cut, "no straggler was sampled; pick another seed"
    assert all(r["clients"] >= 1 for r in m["rounds"][1:])
    assert all(r["seconds"] >= timeout for r in cut)  # the round waited for its straggler, then went on
    assert f"no reply within {timeout:g}s" in (out / "run.log").read_text()


@pytest.mark.integration
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    cli = [sys.executable, "-m", "simulations.cli", "run", "--config", "configs/tiny.yaml", "--no-progress", "fl.rounds=5"]
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    subprocess.run([*cli, f"output_dir={ref}"], cwd=ROOT, check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen([*cli, f"output_dir={victim}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        state = victim / "checkpoint.json"
        if state.exists() and json.loads(state.read_text())["round"] >= 2:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (victim / "metrics.json").exists() or "accuracy" not in json.loads((victim / "metrics.json").read_text())["summary"]
    subprocess.run([sys.executable, "-m", "simulations.cli", "run", "--resume", str(victim), "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)

    a, b = (json.loads((d / "metrics.json").read_text())["summary"] for d in (ref, victim))
    assert a["accuracy"] == b["accuracy"] and a["density"] == b["density"]
    (_, ma), (_, mb) = codec.load(ref / "model.ftc"), codec.load(victim / "model.ftc")
    assert all(torch.equal(ma[n], mb[n]) for n in ma)
