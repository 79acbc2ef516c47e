"""simulations.node_memory: the per-node bytes of the simulation process, by structure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shared.config import Config, to_flat

ROOT = Path(__file__).resolve().parent.parent


def test_per_node_bytes_are_split_by_structure() -> None:
    out = subprocess.run([sys.executable, "-m", "simulations.node_memory", "200"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    flower, bare = row["flower"], row["flower_without_overrides"]
    # every node's Context carries the whole run config: the keys pyproject.toml mirrors from Config
    assert flower["run_config_keys"] == len(to_flat(Config()))
    # submitted values are shared by all nodes; without them each node parses its own defaults
    assert flower["value_objects_b"] == 0 < bare["value_objects_b"]
    for f in (flower, bare):
        assert 0 < f["key_strings_b"] + f["two_dicts_b"] + f["value_objects_b"] <= f["run_info_stores_b"]
    assert 0 < row["fedtiny_server_b"] < flower["run_info_stores_b"] / 10
