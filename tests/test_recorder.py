"""server/recorder.py: what a run's figures draw, and the files they go to."""

from __future__ import annotations

import torch

from server.recorder import RoundRecord, plot, round_figures, run_title
from shared import rundir
from shared.config import load_config


def record(t: int, up: int, down: int, dense: int, accuracy: float | None = 0.5, density: float = 0.05) -> RoundRecord:
    return RoundRecord(round=t, phase="train", density=density, accuracy=accuracy, loss=1.0, bytes_up=up,
                       bytes_down=down, seconds=1.0, clients=2, dense_bytes=dense)


ROUNDS = [record(0, 0, 0, 0, accuracy=0.1, density=1.0), record(1, 10, 30, 400, accuracy=None), record(2, 20, 40, 400, accuracy=0.8)]


def test_bytes_are_cumulative_beside_dense_fedavgs_and_round_0_without_bytes_is_left_off_the_log_axis():
    label, log_y, series = round_figures(ROUNDS)["bytes"]
    assert log_y and "cumulative" in label
    assert series["this run"] == ([1, 2], [40, 100])
    assert series["dense FedAvg, same rounds and clients"] == ([1, 2], [400, 800])


def test_accuracy_is_in_percent_on_the_evaluated_rounds_only():
    label, log_y, series = round_figures(ROUNDS)["accuracy"]
    assert "%" in label and not log_y
    assert series[""] == ([0, 2], [10.0, 80.0])


def test_a_search_round_that_sent_bytes_stays_on_the_bytes_axis():
    rounds = [record(0, 5, 7, 0), record(1, 1, 1, 10)]
    assert round_figures(rounds)["bytes"][2]["this run"] == ([0, 1], [12, 14])


def test_every_figure_is_written_titled_with_the_run(tmp_path):
    title = run_title(load_config(overrides=["pruning.density=0.01", "seed=3"]))
    assert title == "fedtiny, density 0.01, digits, seed 3"
    masks = {"a.weight": torch.tensor([True, False, False, False]), "b.weight": torch.zeros(3, dtype=torch.bool)}
    plot(tmp_path, ROUNDS, masks, title)
    for name in [*rundir.ROUND_PLOTS.values(), rundir.LAYER_DENSITY_PLOT]:
        assert (tmp_path / name).stat().st_size > 0
