"""Each benchmark's --smoke version runs end to end and prints its figures as one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

KEYS = {
    "scale": {"scale"},
    "overhead": {"ratio", "fedavg_round_s", "fedtiny_round_s"},
    "memory": {"memory"},
}
EXTRA = {"scale": ["--clients", "20"]}


def run_bench(name: str, tmp_path: Path) -> dict:
    cmd = [sys.executable, "-m", "simulations.bench", name, "--smoke", "--work-dir", str(tmp_path), *EXTRA.get(name, [])]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(KEYS))
def test_smoke_prints_figures_as_last_json_line(name: str, tmp_path: Path) -> None:
    result = run_bench(name, tmp_path)
    assert result["benchmark"] == name and KEYS[name] <= set(result)


@pytest.mark.integration
def test_ray_cluster_smoke_runs_clients_on_both_nodes_and_leaves_nothing(tmp_path: Path) -> None:
    result = run_bench("ray-cluster", tmp_path)
    assert len(result["nodes"]) == 2 and sorted(l for n in result["nodes"] for l in n["labels"]) == [
        "fedtiny_node_0", "fedtiny_node_1"]
    assert result["ray_nodes_used"] == 2  # one CPU per node: the two client actors cannot share a node
    assert {a["node_id"] for a in result["client_actors"]} <= {n["node_id"] for n in result["nodes"]}
    assert result["left_behind"] == [] and result["rounds"] == 2 and 0 <= result["accuracy"] <= 1
    for pid in result["node_pids"]:  # every `ray start` process is gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.integration
def test_bytes_smoke_gives_density_ratio_and_bound_per_density(tmp_path: Path) -> None:
    result = run_bench("bytes", tmp_path)
    rows = result["bytes"]
    assert result["benchmark"] == "bytes" and result["fedavg_bytes"] > 0
    assert [r["density"] for r in rows] == [0.05, 0.01]
    # The bound counts dense tensors (BN buffers, biases) at full size, so deflate may go below it;
    # the raw payloads (what deflate compresses) can never beat it.
    assert all(0 < r["bound"] <= r["raw_ratio"] and r["ratio"] <= r["raw_ratio"] and r["ratio"] < 1 for r in rows)
