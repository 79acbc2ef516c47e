"""A resume never loses data: the checkpoint is checked against the config and the model before
anything is written, and overrides that would change what the run computes are refused."""

from __future__ import annotations

import json

import pytest

from fake_grid import FakeGrid
from helpers import tiny_config
from server.app import run
from server.checkpoint import BadCheckpoint
from shared.config import ConfigError
from simulations.cli.run import resume_config


@pytest.fixture
def crashed(tmp_path):
    """A tiny run that finished rounds 0..2 of 4 and then lost its clients (its checkpoint is round 2)."""
    config = tiny_config(tmp_path, "fl.rounds=4")
    trains = iter(range(100))
    with pytest.raises(Exception):
        run(FakeGrid(config, drop=lambda n, t: t == "train" and next(trains) >= 4), config)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["round"] == 2
    return tmp_path


def _resume(out, *overrides):
    config = tiny_config(out, "fl.rounds=4", "resume=true", *overrides)
    return run(FakeGrid(config), config)


def _edit_checkpoint(out, **changes):
    state = json.loads((out / "checkpoint.json").read_text())
    state.update(changes)
    (out / "checkpoint.json").write_text(json.dumps(state))


@pytest.mark.parametrize("changes, why", [
    ({"round": 10**9}, "is not a round of this run"),
    ({"round": -1}, "is not a round of this run"),
    ({"weights": "../../etc/passwd"}, "is not 'checkpoint-2.ftc'"),
    ({"rounds": []}, "records 0 rounds for round 2"),
])
def test_a_tampered_checkpoint_is_refused_and_the_runs_metrics_survive(crashed, changes, why):
    before = (crashed / "metrics.json").read_text()
    _edit_checkpoint(crashed, **changes)
    with pytest.raises(BadCheckpoint, match=why):
        _resume(crashed)
    assert (crashed / "metrics.json").read_text() == before


def test_a_checkpoint_whose_masks_were_removed_does_not_resume_dense(crashed):
    from shared import codec

    tensors, _ = codec.load(crashed / "checkpoint-2.ftc")
    codec.save(crashed / "checkpoint-2.ftc", tensors, None)
    with pytest.raises(BadCheckpoint, match="keep density 1.0000 but the run recorded 0.0500"):
        _resume(crashed)


def test_a_checkpoint_weights_bomb_is_refused_before_it_is_inflated(crashed):
    import torch

    from shared import codec

    bomb = codec.encode({"w": torch.zeros(2**24)})  # 64 MB of zeros in a few tens of kB
    (crashed / "checkpoint-2.ftc").write_bytes(bomb)
    with pytest.raises(BadCheckpoint, match="compressed payload claims 67108891 bytes, over the limit"):
        _resume(crashed)


def test_a_checkpoint_of_another_model_is_refused(crashed):
    with pytest.raises(BadCheckpoint, match=r"claims shape \(16, 1, 3, 3\), expected \(32, 1, 3, 3\)"):
        _resume(crashed, "model.width=1.0")  # the checkpoint holds the width-0.5 model, refused from its header


@pytest.mark.parametrize("override", ["method=fedavg", "pruning.density=0.5", "seed=3", "fl.rounds=9", "fl.lr=0.2",
                                      "model.name=cnn-pool", "dataset.alpha=5.0"])
def test_resume_refuses_overrides_that_change_what_the_run_computes(crashed, override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=f"--resume cannot change {key}"):
        resume_config(crashed, [override])


def test_resume_takes_operational_overrides_and_records_them(crashed):
    config = resume_config(crashed, ["fl.round_timeout=99", "simulation.num_cpus=3", "tracking=none"])
    assert (config.fl.round_timeout, config.simulation.num_cpus, config.resume) == (99.0, 3, True)
    _resume(crashed, "fl.round_timeout=99")
    assert "round_timeout: 99.0" in (crashed / "config.yaml").read_text()


def test_a_checkpoint_with_nan_weights_is_refused_before_the_run_goes_on(crashed):
    import torch

    from shared import codec

    tensors, masks = codec.load(crashed / "checkpoint-2.ftc")
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    codec.save(crashed / "checkpoint-2.ftc", tensors, masks)
    before = (crashed / "metrics.json").read_text()
    with pytest.raises(BadCheckpoint, match=f"{name} holds non-finite values"):
        _resume(crashed)
    assert (crashed / "metrics.json").read_text() == before


def _with_round(crashed, **fields):
    state = json.loads((crashed / "checkpoint.json").read_text())
    return [*state["rounds"][:-1], {**state["rounds"][-1], **fields}]


@pytest.mark.parametrize("edit, why", [
    (lambda c: {"rounds": [1, 2, 3]}, "its round record 0 is not a round record"),
    (lambda c: {"rounds": _with_round(c, clients="ten")}, "has clients='ten', not a int"),
    (lambda c: {"rounds": _with_round(c, density=[0.5])}, r"has density=\[0.5\], not a float"),
    (lambda c: {"rounds": _with_round(c, density=float("nan"))}, "records density nan, not in"),
    (lambda c: {"rounds": _with_round(c, surprise=1)}, "is not a round record"),
    (lambda c: {"totals": {"bytes_up": "x"}}, "its totals are not non-negative counts"),
    (lambda c: {"totals": [1, 2]}, "its totals are not non-negative counts"),
    (lambda c: {"layer_version": ["features.0.weight"]}, "its mask versions are not counts"),
    (lambda c: {"layer_version": {"features.0.weight": "abc"}}, "mask version of 'features.0.weight' is 'abc'"),
    (lambda c: {"layer_version": {"nowhere": 1}}, "mask version of 'nowhere'"),
    (lambda c: {"version": None}, "its mask versions are not counts"),
])
def test_a_checkpoint_with_wrong_types_is_one_line_not_a_type_error(crashed, edit, why):
    _edit_checkpoint(crashed, **edit(crashed))
    with pytest.raises(BadCheckpoint, match=why) as err:
        _resume(crashed)
    assert "\n" not in str(err.value)
