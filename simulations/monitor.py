"""Peak memory of a process tree, sampled in a background thread.

Flower starts its SuperLink in a new session and Ray starts its own daemons, so the tree
is "every descendant of this process" plus every process whose command line names the
run's folder (its FLWR_HOME and log files live there). RSS double-counts pages shared
between processes (torch's libraries, Ray's object store), so PSS is sampled too: it
splits each shared page among the processes that map it, and sums to real usage.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import psutil

MB = 1024 * 1024


@dataclass
class TreeMemory:
    """Peak sums over the tree (MB) and how many processes the tree held at most."""

    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0
    max_processes: int = 0
    samples: int = 0
    names: set[str] = field(default_factory=set)


def tree(root: int, marker: str) -> list[psutil.Process]:
    """Descendants of `root` and processes whose command line contains `marker` (and their descendants)."""
    found: dict[int, psutil.Process] = {}
    try:
        for p in psutil.Process(root).children(recursive=True):
            found[p.pid] = p
    except psutil.NoSuchProcess:
        pass
    if marker:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid not in found and marker in " ".join(p.info["cmdline"] or ()):
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        found[c.pid] = c
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return list(found.values())


def _sample(procs: list[psutil.Process]) -> tuple[float, float, list[str]]:
    rss = pss = 0.0
    names = []
    for p in procs:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            names.append(p.name())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return rss / MB, pss / MB, names


class TreeMonitor:
    """`with TreeMonitor(marker) as m: ...` then read `m.result` (this process itself excluded)."""

    def __init__(self, marker: str = "", interval: float = 0.5) -> None:
        self.marker = marker
        self.interval = interval
        self.result = TreeMemory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "TreeMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            procs = [p for p in tree(me, self.marker) if p.pid != me]
            rss, pss, names = _sample(procs)
            r = self.result
            r.samples += 1
            r.peak_rss_mb = max(r.peak_rss_mb, rss)
            r.peak_pss_mb = max(r.peak_pss_mb, pss)
            r.max_processes = max(r.max_processes, len(names))
            r.names.update(names)
            self._stop.wait(self.interval)
