"""docs/deployment.md "Running with `flwr run` directly": the plain Flower command runs the app to its end.

What a new user types, with the tiny config: `flwr run . --stream --run-config ... --federation-config ...`
with FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 (as docs/deployment.md says). FLWR_HOME and the local
SuperLink's ports are the test's own; the detached SuperLink that `flwr run` leaves behind is
found by its FLWR_HOME and stopped afterwards, as docs/deployment.md tells users to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from simulations.cli.launch import free_port
from simulations.cli.processes import stop_tree

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def local_superlinks(flwr_home: Path) -> list[psutil.Process]:
    """The `flower-superlink` processes `flwr run` started for this FLWR_HOME (its log file lies there)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmd and str(flwr_home) in cmd:
            found.append(proc)
    return found


@pytest.mark.timeout(240)
def test_readme_flwr_run_command_finishes_the_run(tmp_path):
    out, flwr_home = tmp_path / "run", tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    run_config = (
        f'fl.rounds=2 fl.num_clients=4 fl.clients_per_round=2 model.width=0.5 fedtiny.search_clients=2 '
        f'snip.clients=2 grasp.clients=2 fedtiny.allocations="uniform-noise,global" warmup.epochs=1 output_dir="{out}"'
    )
    cmd = [
        "flwr", "run", ".", "--stream", "--run-config", run_config,
        "--federation-config", "num-supernodes=4 client-resources-num-cpus=1 init-args-num-cpus=2",
    ]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
        superlinks = local_superlinks(flwr_home)
    finally:
        for proc in local_superlinks(flwr_home):
            stop_tree(proc)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert superlinks, "flwr run left no local SuperLink behind (docs/deployment.md says it does; update it)"
    assert not local_superlinks(flwr_home)
    assert "[fedtiny] round 2/2" in output and "[fedtiny] done: accuracy=" in output, output[-3000:]
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert "error" not in summary and 0.0 <= summary["accuracy"] <= 1.0
    assert list(out.glob("events.out.tfevents.*"))  # tracking is on by default here too
