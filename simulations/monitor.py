"""Peak memory of a process tree, sampled from /proc in a background thread (Linux).

Flower starts its SuperLink in a new session and Ray starts its own daemons, so the tree
is "every descendant of this process" plus every process whose command line names the
run's folder (its FLWR_HOME and log files live there), with their descendants. RSS
double-counts pages shared between processes (torch's libraries, Ray's object store), so
PSS is summed too: it splits each shared page among the processes that map it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


@dataclass
class TreeMemory:
    """Peak sums over the tree in MB, the most processes seen at once, and their names."""

    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0
    max_processes: int = 0
    samples: int = 0
    names: set[str] = field(default_factory=set)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every visible process."""
    out = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat")
        if not stat:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        cmd = _read(entry / "cmdline").replace("\0", " ")
        out[int(entry.name)] = (ppid, cmd)
    return out


def tree(root: int, marker: str = "") -> list[int]:
    """Descendants of `root`, plus processes whose command line contains `marker` and their descendants."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    roots = [root] + [pid for pid, (_, cmd) in procs.items() if marker and marker in cmd]
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, ()))
    seen.discard(root)
    return sorted(seen)


def _kb(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def memory_mb(pids: list[int]) -> tuple[float, float, list[str]]:
    """Summed RSS and PSS (MB) of `pids`, and the names of those still alive."""
    rss = pss = 0
    names = []
    for pid in pids:
        status = _read(PROC / str(pid) / "status")
        if not status:
            continue
        rss += _kb(status, "VmRSS:")
        rollup = _read(PROC / str(pid) / "smaps_rollup")
        pss += _kb(rollup, "Pss:") if rollup else _kb(status, "VmRSS:")
        names.append(status.split("\n", 1)[0].split(":", 1)[1].strip())
    return rss / 1024, pss / 1024, names


class Poller:
    """A context manager that calls `poll()` every `interval` seconds on a background thread."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        raise NotImplementedError


class TreeMonitor(Poller):
    """`with TreeMonitor(marker) as m: ...`, then read `m.result` (this process itself is left out)."""

    def __init__(self, marker: str = "", interval: float = 0.5) -> None:
        super().__init__(interval)
        self.marker = marker
        self.result = TreeMemory()
        self._me = os.getpid()

    def poll(self) -> None:
        rss, pss, names = memory_mb(tree(self._me, self.marker))
        r = self.result
        r.samples += 1
        r.peak_rss_mb = max(r.peak_rss_mb, rss)
        r.peak_pss_mb = max(r.peak_pss_mb, pss)
        r.max_processes = max(r.max_processes, len(names))
        r.names.update(names)
