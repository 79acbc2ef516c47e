"""Whatever a run starts, it stops: process trees, a parent-death watchdog, and stale-run cleanup.

`fedtiny run` stops its SuperLink and `flwr run` trees in `finally` blocks (Ctrl-C and SIGTERM
included). A kill -9 runs no `finally`, so every launched tree also gets a watchdog process
(`guard`): when the launching process dies it stops the tree. Processes are named by pid plus
start time, so a pid the system reused is never touched, and a stale run's SuperLink is stopped
only when its pid file names exactly that process (`stop_stale`).

    python -P simulations/cli/processes.py PARENT_PID PARENT_START TARGET_PID TARGET_START   (the watchdog)

The watchdog runs this file as a script, not as `-m simulations.cli.processes`: the package's
`__init__` imports the whole command line (torch, scipy), about 380 MB of RSS per watchdog, where
this file needs only psutil (about 15 MB).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

POLL_S = 0.5


def alive(pid: int, start: float) -> psutil.Process | None:
    """The process `pid` if it is still the one started at `start` (not a reused pid), else None."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - start) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def identity(pid: int) -> tuple[int, float]:
    """(pid, start time): a process's name that a reused pid cannot take."""
    return pid, psutil.Process(pid).create_time()


def stop_tree(root: psutil.Process, grace: float = 10.0) -> None:
    """Terminate a process and all its descendants; kill what is left after `grace` seconds."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, left = psutil.wait_procs(procs, timeout=grace)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=5)


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process we started and everything below it (the simulation runs Ray in its own session)."""
    if proc.poll() is None:
        try:
            stop_tree(psutil.Process(proc.pid))
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def guard(proc: subprocess.Popen) -> subprocess.Popen:
    """Start a watchdog that stops `proc`'s tree if this process dies first (kill -9 included)."""
    cmd = [sys.executable, "-P", __file__, *map(str, identity(os.getpid())), *map(str, identity(proc.pid))]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def record(proc: subprocess.Popen, pid_file: Path) -> None:
    """Write `proc`'s pid and start time, so a later run can stop it if this one dies (`stop_stale`)."""
    pid, start = identity(proc.pid)
    pid_file.write_text(f"{pid} {start!r}\n")


def stop_stale(pid_file: Path) -> None:
    """Stop the tree a killed earlier run recorded in `pid_file`, if that very process still runs."""
    try:
        pid, start = pid_file.read_text().split()
        proc = alive(int(pid), float(start))
    except (OSError, ValueError):
        return
    if proc is not None:
        stop_tree(proc)


def watch(parent: tuple[int, float], target: tuple[int, float]) -> None:
    """Wait while the target lives; stop its tree as soon as the parent is gone."""
    while (proc := alive(*target)) is not None:
        if alive(*parent) is None:
            stop_tree(proc)
            return
        time.sleep(POLL_S)


if __name__ == "__main__":
    parent_pid, parent_start, target_pid, target_start = sys.argv[1:5]
    watch((int(parent_pid), float(parent_start)), (int(target_pid), float(target_start)))
