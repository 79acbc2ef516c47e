"""Peak memory of a process tree, sampled from /proc in a background thread (Linux).

Flower starts its SuperLink in a new session and Ray starts its own daemons, so the tree
is "every descendant of this process" plus every process whose command line names the
run's folder (its FLWR_HOME and log files live there), with their descendants. RSS
double-counts pages shared between processes (torch's libraries, Ray's object store), so
PSS is summed too: it splits each shared page among the processes that map it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


@dataclass
class TreeMemory:
    """Peak sums over the tree in MB, the most processes seen at once, their names, and the PSS of
    each kind of process (`kind`) in the sample where the tree's PSS peaked."""

    peak_rss_mb: float = 0.0
    peak_pss_mb: float = 0.0
    max_processes: int = 0
    samples: int = 0
    names: set[str] = field(default_factory=set)
    pss_at_peak_mb: dict[str, float] = field(default_factory=dict)


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


def kind(cmdline: str) -> str:
    """A process's kind for the breakdown: its program's file name (`flower-superlink`, `raylet`, a
    Python module or script), or Ray's title for its workers (`ray::ClientAppActor`)."""
    words = cmdline.split()
    if not words:
        return "?"
    if words[0].startswith("ray::"):
        return words[0]
    if "python" in Path(words[0]).name and len(words) > 1:
        words = words[2:] if words[1] in ("-m", "-u", "-P") and len(words) > 2 else words[1:]
    return Path(words[0]).name


def memory_mb(pids: list[int]) -> tuple[float, float, list[str], dict[str, float]]:
    """Summed RSS and PSS (MB) of `pids`, the names of those still alive, and PSS summed by `kind`."""
    rss = pss = 0
    names = []
    by_kind: dict[str, float] = {}
    for pid in pids:
        status = _read(PROC / str(pid) / "status")
        if not status:
            continue
        rss += _kb(status, "VmRSS:")
        rollup = _read(PROC / str(pid) / "smaps_rollup")
        own = _kb(rollup, "Pss:") if rollup else _kb(status, "VmRSS:")
        pss += own
        label = kind(_read(PROC / str(pid) / "cmdline").replace("\0", " "))
        by_kind[label] = by_kind.get(label, 0.0) + own / 1024
        names.append(status.split("\n", 1)[0].split(":", 1)[1].strip())
    return rss / 1024, pss / 1024, names, by_kind


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
    """`with TreeMonitor(marker) as m: ...`, then read `m.result` (this process itself is left out).

    With `limit_mb` or `limit_s` (0: none) it stops the tree (SIGTERM to every process in it) once
    the tree's PSS passes `limit_mb` or `limit_s` seconds have gone by, and says why in `stopped`:
    a run that would exhaust a shared machine ends with figures instead of an out-of-memory kill.
    """

    def __init__(self, marker: str = "", interval: float = 0.5, limit_mb: float = 0, limit_s: float = 0) -> None:
        super().__init__(interval)
        self.marker = marker
        self.result = TreeMemory()
        self.limit_mb, self.limit_s = limit_mb, limit_s
        self.stopped = ""
        self._me = os.getpid()
        self._start = time.monotonic()

    def poll(self) -> None:
        pids = tree(self._me, self.marker)
        rss, pss, names, by_kind = memory_mb(pids)
        elapsed = time.monotonic() - self._start
        if not self.stopped and (self.limit_mb and pss > self.limit_mb or self.limit_s and elapsed > self.limit_s):
            self.stopped = f"stopped after {elapsed:.0f} s at PSS {pss:.0f} MB (limits: {self.limit_mb:g} MB, {self.limit_s:g} s)"
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
        r = self.result
        r.samples += 1
        r.peak_rss_mb = max(r.peak_rss_mb, rss)
        if pss > r.peak_pss_mb:
            r.peak_pss_mb = pss
            r.pss_at_peak_mb = {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
        r.max_processes = max(r.max_processes, len(names))
        r.names.update(names)
