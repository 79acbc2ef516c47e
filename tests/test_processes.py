"""Whatever a run starts, it stops: on SIGINT, SIGTERM and kill -9 of `fedtiny run`; stale cleanup
touches only the very process a run recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import ROOT
from simulations.cli.processes import record, stop_stale

GUARDED_SLEEP = """
import subprocess, sys, time
from simulations.cli.processes import guard
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
guard(child)
print(child.pid, flush=True)
time.sleep(120)
"""


def _gone(pids, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.2)
    return False


def test_the_watchdog_stops_a_guarded_tree_when_its_launcher_is_killed_9():
    launcher = subprocess.Popen([sys.executable, "-c", GUARDED_SLEEP], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    assert psutil.pid_exists(child)
    launcher.kill()  # SIGKILL: no finally, no atexit
    launcher.wait()
    assert _gone([child], timeout=15)


def test_stop_stale_stops_only_the_process_the_pid_file_names(tmp_path):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pid_file = tmp_path / "superlink.pid"
    try:
        pid_file.write_text(f"{victim.pid} {psutil.Process(victim.pid).create_time() - 100.0!r}\n")  # a reused pid
        stop_stale(pid_file)
        assert victim.poll() is None
        record(victim, pid_file)
        stop_stale(pid_file)
        assert victim.wait(timeout=15) is not None
    finally:
        victim.kill()


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killing_fedtiny_run_leaves_no_process_behind(tmp_path, sig):
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "simulations.cli", "run", "--config", "configs/tiny.yaml", "--no-progress",
           "fl.rounds=40", f"output_dir={out}"]
    proc = subprocess.Popen(cli, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until clients train: SuperLink, simulation and Ray are all up
        state = out / "checkpoint.json"
        if state.exists() and json.loads(state.read_text())["round"] >= 1:
            break
        time.sleep(0.2)
    tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) >= 3, "the run had not started its processes"
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    assert _gone(tree, timeout=60), "processes of the killed run are still running"
