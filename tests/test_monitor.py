"""The benchmarks' memory monitor: sums over a process tree, a breakdown by kind, and its limits."""

from __future__ import annotations

import subprocess
import sys
import time

from simulations.monitor import TreeMonitor, kind


def test_kinds_name_the_program_not_the_interpreter():
    assert kind("/v/bin/python3 /v/bin/flwr-simulation --runtime-api-address x") == "flwr-simulation"
    assert kind("ray::ClientAppActor ") == "ray::ClientAppActor"
    assert kind("/v/bin/python -P /w/simulations/cli/processes.py 1 2 3 4") == "processes.py"
    assert kind("/v/ray/core/src/ray/raylet/raylet --raylet_socket_name=x") == "raylet"


def test_a_tree_past_its_time_limit_is_stopped_and_says_why():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.monotonic()
    with TreeMonitor(interval=0.2, limit_s=1.0) as mon:
        child.wait(timeout=30)
    assert time.monotonic() - start < 20 and child.returncode != 0
    assert mon.stopped.startswith("stopped after") and mon.result.peak_pss_mb > 0
    assert mon.result.pss_at_peak_mb and sum(mon.result.pss_at_peak_mb.values()) <= mon.result.peak_pss_mb + 0.5


def test_no_limit_stops_nothing():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    with TreeMonitor(interval=0.2) as mon:
        child.wait(timeout=30)
    assert child.returncode == 0 and mon.stopped == ""
