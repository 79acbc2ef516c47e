"""A real Flower simulation (Ray engine, own SuperLink) through the public entry point."""

from __future__ import annotations

import json

import pytest

from shared import codec
from shared.pruning import density
from simulations.cli import main

pytestmark = pytest.mark.integration

SUMMARY_KEYS = {
    "accuracy", "density", "bytes_up", "bytes_down", "dense_bytes_up", "dense_bytes_down",
    "wall_seconds", "candidates", "selected",
}
ROUND_KEYS = {"round", "phase", "density", "accuracy", "loss", "bytes_up", "bytes_down", "seconds"}


def test_fedtiny_run_in_flower_simulation(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--config", "configs/tiny.yaml", "--no-progress", f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["summary"]
    assert SUMMARY_KEYS <= set(s)
    assert all(ROUND_KEYS <= set(r) for r in metrics["rounds"])
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2, 3]
    _, masks = codec.load(out / "model.ftc")
    assert abs(density(masks) - 0.05) <= 1 / sum(m.numel() for m in masks.values())
    assert s["density"] == pytest.approx(density(masks))
    assert s["bytes_up"] == sum(r["bytes_up"] for r in metrics["rounds"])  # evaluation replies carry no payload
    assert 0 < s["bytes_up"] + s["bytes_down"] < s["dense_bytes_up"] + s["dense_bytes_down"]
    assert len(s["candidates"]) == 4 and s["selected"] in {c["name"] for c in s["candidates"]}
