"""Small factories for tests that drive the server or client on the in-process FakeGrid."""

from __future__ import annotations

from pathlib import Path

from server.services import RunContext
from server.fleet import Fleet
from server.recorder import Recorder
from shared.config import Config, load_config
from shared.data import load_for

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(TINY, [f"output_dir={tmp_path}", *overrides])


def run_context(config: Config, grid, tmp_path: Path) -> RunContext:
    bundle = load_for(config)
    fleet = Fleet(
        grid, config.fl.num_clients, config.fl.min_replies, config.fl.round_timeout, config.simulation.virtual_partitions
    )
    fleet.register()
    return RunContext(config, fleet, bundle, Recorder(config.fl.rounds), tmp_path)
