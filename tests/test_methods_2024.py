"""SparsyFed, FedMef and FedRTS: 2-round runs on the in-process grid (the real ClientApp handlers),
exact density after every round, sparse uploads, their reply checks, and the FedRTS posterior in a
checkpoint (test_resume_methods resumes each one bit for bit)."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from fake_grid import FakeGrid
from helpers import run_context, tiny_config
from server.app import run
from server.rounds import training_round
from shared.global_model import GlobalModel
from shared.methods import METHODS, Reply
from shared.methods.fedrts import check_topk_indices
from shared.methods.sparsyfed import check_client_masks
from shared import codec, protocol as p

DENSITY = 0.05
ADJUST_EVERY_ROUND = ("interval=1", "end_fraction=1.0")


def _run(tmp_path, method, *overrides):
    config = tiny_config(tmp_path, f"method={method}", "fl.rounds=2", *overrides)
    out = run(FakeGrid(config), config)
    return json.loads((out / "metrics.json").read_text()), out


def _kept(masks):
    return sum(int(m.sum()) for m in masks.values())


def _exact_every_round(metrics):
    rounds = metrics["rounds"]
    return all(r["density"] == pytest.approx(DENSITY, abs=1e-3) for r in rounds[1:]) and all(r["rejected"] == 0 for r in rounds)


def test_sparsyfed_starts_dense_and_is_at_the_exact_density_after_every_round(tmp_path):
    metrics, out = _run(tmp_path, "sparsyfed")
    rounds, summary = metrics["rounds"], metrics["summary"]
    assert rounds[0]["density"] == 1.0 and _exact_every_round(metrics)
    # round 1: the average of clients' own top sets is denser than the target before the server prunes it
    assert summary["aggregate_density"][0] > DENSITY + 1e-3
    # beta > 1: no client regrows a weight, so the aggregate of round 2 stays on the global support
    assert summary["aggregate_density"][1] <= DENSITY + 1e-3
    # uploads carry kept values and a mask, not dense arrays: far under dense FedAvg's bytes
    assert rounds[1]["bytes_up"] < 0.25 * rounds[1]["dense_bytes"] / 2
    _, masks = codec.load(out / "model.ftc")
    total = sum(m.numel() for m in masks.values())
    assert _kept(masks) == round(DENSITY * total)


def test_sparsyfed_with_beta_one_regrows_weights_the_global_mask_had_pruned(tmp_path):
    metrics, _ = _run(tmp_path, "sparsyfed", "sparsyfed.beta=1.0", "warmup.epochs=1")
    assert _exact_every_round(metrics)
    assert metrics["summary"]["aggregate_density"][1] > DENSITY + 1e-3  # the union of the clients' new masks


def test_sparsyfed_clients_upload_their_own_masks_at_the_target_count(tmp_path):
    config = tiny_config(tmp_path, "method=sparsyfed")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("sparsyfed")(ctx)
    gm = method.prepare(ctx)
    replies = training_round(ctx, method, gm, 1, method.round_config(ctx, gm, 1))
    assert len(replies) == config.fl.clients_per_round
    for r in replies:
        _, masks = codec.decode(r.content[p.PAYLOAD][p.UPDATE], base=gm.state)
        assert set(masks) == set(method.names) and _kept(masks) == method.kept
        assert all(bool(masks[n].all()) for n in method.dense)
        assert all(torch.all(r.decoded[n][~masks[n]] == 0) for n in masks)


def test_sparsyfed_refuses_masks_that_keep_more_than_the_target():
    names, dense = ["a", "b"], ["a"]
    good = {"a": torch.ones(2, dtype=torch.bool), "b": torch.tensor([True, False, False, False])}
    assert check_client_masks(good, names, dense, 3) is None
    assert "keep 4 weights" in check_client_masks({**good, "b": torch.tensor([True, True, False, False])}, names, dense, 3)
    assert "must stay dense" in check_client_masks({**good, "a": torch.tensor([True, False])}, names, dense, 3)
    assert "do not match" in check_client_masks({"b": good["b"]}, names, dense, 3)


@pytest.mark.parametrize("sap", ["false", "true"])
def test_fedmef_adjusts_from_client_topk_and_keeps_the_exact_density(tmp_path, sap):
    metrics, out = _run(tmp_path, "fedmef", *(f"fedmef.{o}" for o in ADJUST_EVERY_ROUND), f"fedmef.sap={sap}")
    assert _exact_every_round(metrics)
    # T_end = 2 rounds: the cosine fraction reaches 0 at round 2, so round 1 alone adjusts
    assert [r["phase"] for r in metrics["rounds"][1:]] == ["adjust", "train"]
    assert len(metrics["summary"]["changed"]) == 1 and metrics["summary"]["changed"][0] > 0


def test_fedmef_penalises_the_count_of_the_next_adjustment(tmp_path):
    config = tiny_config(tmp_path, "method=fedmef", "fl.rounds=10", "fedmef.interval=4", "fedmef.end_fraction=0.8")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("fedmef")(ctx)
    gm = method.prepare(ctx)
    first = method.round_config(ctx, gm, 1)  # next adjustment: round 4
    assert p.ADJUST_NAMES not in first and first[p.BAE_NAMES]
    at_four = method.round_config(ctx, gm, 4)
    assert at_four[p.BAE_K] == at_four[p.ADJUST_K] == first[p.BAE_K]
    assert method.round_config(ctx, gm, 9) == {}  # the next adjustment (12) is past T_end = 8: no BaE


def test_fedrts_samples_new_masks_at_the_exact_density(tmp_path):
    metrics, out = _run(tmp_path, "fedrts", *(f"fedrts.{o}" for o in ADJUST_EVERY_ROUND))
    assert _exact_every_round(metrics)
    assert [r["phase"] for r in metrics["rounds"][1:]] == ["adjust", "train"]  # the fraction is 0 at T_end
    assert len(metrics["summary"]["changed"]) == 1 and metrics["summary"]["changed"][0] > 0


def test_fedrts_posterior_survives_a_checkpoint_exactly(tmp_path):
    config = tiny_config(tmp_path, "method=fedrts")
    ctx = run_context(config, FakeGrid(config), tmp_path)
    method = METHODS.get("fedrts")(ctx)
    name = method.names[0]
    method.alpha[name].add_(torch.rand(method.alpha[name].shape) * 7)
    state = json.loads(json.dumps(method.state_dict()))
    other = METHODS.get("fedrts")(ctx)
    other.load_state_dict(state)
    assert all(torch.equal(other.alpha[n], method.alpha[n]) and torch.equal(other.beta[n], method.beta[n]) for n in method.names)
    bad = codec.encode({f"alpha:{name}": torch.ones(3)})
    with pytest.raises(ValueError):
        other.load_state_dict({**state, "posterior": base64.b64encode(bad).decode()})


def test_fedrts_refuses_indices_at_active_positions_or_beyond_k():
    gm = GlobalModel({"w": torch.zeros(8)}, {"w": torch.tensor([True, False] * 4)})

    def reply(indices):
        blob = codec.encode({n: torch.tensor(i, dtype=torch.int32) for n, i in indices.items()})
        return Reply(1, RecordDict({p.PAYLOAD: ConfigRecord({p.TOPK_INDEX: blob})}), 0)

    assert torch.equal(check_topk_indices(reply({"w": [1, 3]}), gm, {"w": 2})["w"], torch.tensor([1, 3], dtype=torch.int32))
    assert "active positions" in check_topk_indices(reply({"w": [0]}), gm, {"w": 2})
    assert "over 2 decoded elements" in check_topk_indices(reply({"w": [1, 3, 5]}), gm, {"w": 2})  # refused by the decode
    assert "repeated" in check_topk_indices(reply({"w": [1, 1]}), gm, {"w": 2})
    assert "out of range" in check_topk_indices(reply({"w": [9]}), gm, {"w": 2})
    assert "not the adjusted layers" in check_topk_indices(reply({"v": [1]}), gm, {"w": 2})
    assert "no top-k" in check_topk_indices(Reply(1, RecordDict({p.PAYLOAD: ConfigRecord({})}), 0), gm, {"w": 2})


def test_fedtiny_compare_accepts_the_three_methods():
    from simulations.cli.compare import grid, method_overrides

    assert [c.method for c in grid(["sparsyfed", "fedmef", "fedrts"], [0.01], [0])] == ["sparsyfed", "fedmef", "fedrts"]
    assert method_overrides("fedrts") == ["method=fedrts"]


@pytest.mark.parametrize("override, key", [
    ("sparsyfed.beta=0.5", "sparsyfed.beta"), ("fedmef.bae_weight=-1", "fedmef.bae_weight"),
    ("fedmef.sap_gamma=1.0", "fedmef.sap_gamma"), ("fedrts.gamma=1.5", "fedrts.gamma"), ("fedrts.c=0", "fedrts.c"),
    ("fedrts.interval=0", "fedrts.interval"),
])
def test_impossible_settings_are_refused_in_one_line(override, key):
    from shared.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])
