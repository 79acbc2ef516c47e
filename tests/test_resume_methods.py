"""Every registered method resumes exactly: a run killed after round 2 and resumed to round 4
ends bit for bit where an uninterrupted 4-round run ends (global model, masks, recorded metrics).

One figure may differ, upwards: the download bytes after the resume. The resumed run's clients are
fresh processes that hold no masks yet, so each gets the masks once more with its first model."""

from __future__ import annotations

import json

import pytest
import torch

from fake_grid import FakeGrid
from helpers import tiny_config
from server.app import run
from shared import codec, protocol as p, rundir
from shared.methods import METHODS

EXAMPLE = "example_method:RandomRegrowth"
# Settings under which each method's own state changes within 4 rounds (re-maskings, readjustments).
EXERCISE = {"prunefl": ["prunefl.interval=1"], "feddst": ["feddst.interval=2", "feddst.alpha=0.2"],
            "fedtiny": ["fedtiny.scores=[magnitude]", "fedtiny.end_fraction=1.0"], EXAMPLE: ["trusted=[example_method]"],
            "fedmef": ["fedmef.interval=1", "fedmef.end_fraction=1.0"],  # round 3 extrudes and adjusts after the resume
            "fedrts": ["fedrts.interval=1", "fedrts.end_fraction=1.0"]}  # round 3 samples from the resumed posterior
TIMING = ("seconds", "wall_seconds")  # wall-clock
RESENT = ("bytes_down", "bytes_ratio")  # the masks sent again to the resumed run's fresh clients


def config_for(out, method, *more):
    return tiny_config(out, f"method={method}", "fl.rounds=4", "fl.eval_every=1", *EXERCISE.get(method, []), *more)


def killed_after_round_2(out, method) -> int:
    """Run until the clients stop answering after round 2's training (a non-federated method: at the
    final evaluation); returns the round of the checkpoint left behind."""
    config = config_for(out, method)
    trains = iter(range(10**6))
    with pytest.raises(Exception):
        run(FakeGrid(config, drop=lambda n, t: t == p.EVALUATE or (t == p.TRAIN and next(trains) >= 4)), config)
    return json.loads((out / rundir.CHECKPOINT).read_text())["round"]


def recorded(out) -> tuple[dict, list[int], dict, dict]:
    """The metrics without wall-clock times and download bytes, the rounds' download bytes, the model."""
    metrics = json.loads((out / rundir.METRICS).read_text())
    rounds = [{k: v for k, v in r.items() if k not in TIMING + RESENT} for r in metrics["rounds"]]
    summary = {k: v for k, v in metrics["summary"].items() if k not in TIMING + RESENT}
    state, masks = codec.load(out / rundir.MODEL)
    return {"rounds": rounds, "summary": summary}, [r["bytes_down"] for r in metrics["rounds"]], state, masks


@pytest.mark.parametrize("method", [*METHODS.names(), EXAMPLE])
def test_a_killed_run_resumes_bit_for_bit(tmp_path, method):
    config = config_for(tmp_path / "full", method)
    run(FakeGrid(config), config)
    checkpoint = killed_after_round_2(tmp_path / "killed", method)
    federated = METHODS.get(method).federated if method in METHODS else True
    assert checkpoint == (2 if federated else 0)
    resumed = config_for(tmp_path / "killed", method, "resume=true")
    run(FakeGrid(resumed), resumed)

    (full, down_a, state_a, masks_a), (again, down_b, state_b, masks_b) = recorded(tmp_path / "full"), recorded(tmp_path / "killed")
    assert full == again
    assert down_a[: checkpoint + 1] == down_b[: checkpoint + 1]
    assert all(b >= a for a, b in zip(down_a, down_b))
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[n], state_b[n]) for n in state_a)
    assert masks_a.keys() == masks_b.keys() and all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a)
