"""TensorBoard tracking: every run writes event files that TensorBoard's own reader reads back.

One tiny in-process run (the real ServerApp logic and ClientApp handlers) is shared by the tests.
"""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from server.recorder import RoundRecord
from server.tracking import Tracker, open_tracker
from shared import rundir
from simulations.inprocess import run_in_process
from tests.helpers import tiny_config


def _events(path) -> EventAccumulator:
    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    metrics, _ = run_in_process(tiny_config(out), out)
    return out, metrics


def test_every_round_is_in_the_event_files(tracked_run):
    out, metrics = tracked_run
    events = _events(out)
    scalars = set(events.Tags()["scalars"])
    assert {"central/accuracy", "central/loss", "federated/accuracy", "train/loss", "density", "bytes/up", "bytes/down"} <= scalars
    rounds = metrics["rounds"]
    for tag, field in (("central/accuracy", "accuracy"), ("density", "density"), ("bytes/up", "bytes_up"), ("bytes/down", "bytes_down")):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged == pytest.approx({r["round"]: r[field] for r in rounds if r[field] is not None}), tag


def test_training_loss_and_federated_accuracy_per_round(tracked_run):
    out, metrics = tracked_run
    rounds, summary = metrics["rounds"], metrics["summary"]
    assert rounds[0]["train_loss"] is None  # round 0 trains nobody
    assert all(r["train_loss"] > 0 for r in rounds[1:])
    assert rounds[-1]["federated_accuracy"] == summary["federated_accuracy"]
    events = _events(out)
    assert [(e.step, e.value) for e in events.Scalars("federated/accuracy")] == [
        (rounds[-1]["round"], pytest.approx(summary["federated_accuracy"]))
    ]
    assert [e.step for e in events.Scalars("train/loss")] == [r["round"] for r in rounds[1:]]
    header = (out / rundir.METRICS_CSV).read_text().splitlines()[0]
    assert "train_loss" in header and "federated_accuracy" in header


def test_per_layer_density_and_config_text(tracked_run):
    out, metrics = tracked_run
    events = _events(out)
    layers = [t for t in events.Tags()["scalars"] if t.startswith("layer_density/")]
    assert layers, "no per-layer density"
    last = {t: events.Scalars(t)[-1] for t in layers}
    assert all(e.step == metrics["rounds"][-1]["round"] and 0.0 <= e.value <= 1.0 for e in last.values())
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "density: 0.05" in text and "tracking: tensorboard" in text


def test_tracking_none_writes_no_event_files(tmp_path):
    assert open_tracker("none", tmp_path) is None
    run_in_process(tiny_config(tmp_path, "tracking=none", "fl.rounds=1"), tmp_path)
    assert (tmp_path / rundir.METRICS).exists() and not list(tmp_path.glob("events.out.tfevents.*"))


def test_unmeasured_fields_are_left_out(tmp_path):
    tracker = Tracker(tmp_path)
    tracker.round(RoundRecord(round=3, phase="train", density=0.5, accuracy=None, loss=None, bytes_up=10, bytes_down=20, seconds=1.0))
    tracker.close()
    tags = set(_events(tmp_path).Tags()["scalars"])
    assert "density" in tags and "central/accuracy" not in tags and "train/loss" not in tags


def test_metrics_json_is_plain_json(tracked_run):
    out, _ = tracked_run
    assert json.loads((out / rundir.METRICS).read_text())["rounds"][1]["train_loss"] is not None
