"""simulations.heldout: the score that tunes FedTiny's settings reads the clients' held-out splits only."""

from __future__ import annotations

import json

import numpy as np

from fake_grid import FakeGrid
from helpers import tiny_config
from server.app import run
from shared.data import load_for
from shared.partition import client_data
from simulations import heldout


def test_the_union_is_every_clients_held_out_split_and_no_test_image(tmp_path):
    config = tiny_config(tmp_path)
    bundle, x, y = heldout.heldout_union(config)
    d = config.dataset
    parts = [client_data(bundle, config.fl.num_clients, i, d.partition, d.alpha, d.holdout, config.seed)
             for i in range(config.fl.num_clients)]
    assert len(y) == sum(len(c.y_holdout) for c in parts) > 0
    assert np.array_equal(x, np.concatenate([c.x_holdout for c in parts]))
    train = {a.tobytes() for c in parts for a in c.x_train}
    test = {a.tobytes() for a in load_for(config).x_test}
    assert not any(a.tobytes() in train for a in x) and not any(a.tobytes() in test for a in x)


def test_a_finished_run_is_scored_and_a_missing_one_exits_2(tmp_path, capsys):
    config = tiny_config(tmp_path / "run", "fl.rounds=1")
    out = run(FakeGrid(config), config)
    capsys.readouterr()
    assert heldout.main([str(out)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["examples"] == len(heldout.heldout_union(config)[2]) and 0 <= scored["heldout_accuracy"] <= 1
    assert heldout.main([str(tmp_path / "nothing")]) == 2
    assert "heldout:" in capsys.readouterr().err
