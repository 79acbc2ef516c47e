"""simulations.bn_recalibration: replaying FedTiny's final BN recalibration offline on a finished run."""

from __future__ import annotations

import json

from fake_grid import FakeGrid
from helpers import tiny_config
from server.app import run
from simulations import bn_recalibration


def test_a_run_is_scored_as_it_ended_and_after_each_draw(tmp_path, capsys):
    config = tiny_config(tmp_path / "run", "fl.rounds=1")
    out = run(FakeGrid(config), config)
    ended = json.loads((out / "metrics.json").read_text())["summary"]["accuracy"]
    capsys.readouterr()
    assert bn_recalibration.main([str(out), "--clients", "2", "--draws", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["as_ended"]["test"] == round(100 * ended, 2)  # the very model and test split of the run
    assert len(result["draws"]) == 2
    assert all(0 <= d[k] <= 100 for d in result["draws"] for k in ("test", "heldout", "heldout_unsampled"))


def test_the_pool_of_every_client_does_not_depend_on_the_draw(tmp_path):
    config = tiny_config(tmp_path / "run", "fl.rounds=1")
    out = run(FakeGrid(config), config)
    everyone = config.fl.num_clients
    a = bn_recalibration.replay(out, everyone, 1, seed=0)["draws"][0]
    b = bn_recalibration.replay(out, everyone, 1, seed=1)["draws"][0]
    assert a == b and "heldout_unsampled" not in a


def test_bad_arguments_and_missing_runs_exit_2(tmp_path, capsys):
    assert bn_recalibration.main([str(tmp_path), "--clients", "0"]) == 2
    assert bn_recalibration.main([str(tmp_path / "nothing")]) == 2
    assert "bn_recalibration:" in capsys.readouterr().err
