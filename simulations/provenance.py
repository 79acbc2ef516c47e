"""Where a result came from: the commit, the code, the settings, the software and the machine.

A published table is only as good as the claim that its cells ran the code it names. Every cell of a
result suite (`simulations.cli.suite`) records this block in its metrics, so a page can say which
commits its cells come from and mark the cells it cannot vouch for: one run from a tree with
uncommitted changes (`clean` false), or from library code (`code`, the git tree ids of the folders
a method runs from) other than the newest cell's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from shared.config import Config, to_flat

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = ("client", "server", "shared", "pyproject.toml")  # what a run executes (the Flower app `flwr run` ships)
RESULT_PATHS = ("simulations/results", "docs/results")  # a suite writes here between cells: not a change to the code
PACKAGES = ("torch", "flwr", "ray")
NOT_IN_HASH = ("output_dir", "resume")  # where a cell runs and whether it continues: not its settings
UNKNOWN = "unknown"


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def config_hash(config: Config) -> str:
    """sha256 (first 16 hex digits) of the merged config, every key but NOT_IN_HASH."""
    flat = {k: v for k, v in to_flat(config).items() if k not in NOT_IN_HASH}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def git_state(root: Path = PROJECT_ROOT) -> dict:
    """commit, clean (no change outside RESULT_PATHS, untracked files included) and code (a hash of
    CODE_PATHS' git trees at the commit); unknown outside a git checkout."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": UNKNOWN, "clean": False, "code": UNKNOWN}
    status = _git(root, "status", "--porcelain", "--", ".", *(f":(exclude){p}" for p in RESULT_PATHS))
    trees = _git(root, "rev-parse", *(f"HEAD:{p}" for p in CODE_PATHS))
    code = hashlib.sha256(trees.encode()).hexdigest()[:12] if trees else UNKNOWN
    return {"commit": commit, "clean": status == "", "code": code}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = UNKNOWN
    return out


def machine(device: str) -> dict:
    """Cores this process may use and the device `device` (a config's `device`) resolves to here."""
    import torch

    from shared.device import resolve

    dev = resolve(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {"cores": len(os.sched_getaffinity(0)), "device": f"{dev.type}: {name}"}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def start(config: Config, root: Path = PROJECT_ROOT, **extra) -> dict:
    """The record taken before a cell runs; `extra` adds the runner's own fields (e.g. jobs)."""
    return {
        **git_state(root), "config_hash": config_hash(config), **versions(), **machine(config.device),
        **extra, "start": now(),
    }


def same_source(a: dict, b: dict) -> bool:
    """Whether two records ran the same commit, tree state and settings (a run may continue across them;
    one from a dirty tree is marked on its page either way)."""
    return all(a.get(k) == b.get(k) for k in ("commit", "clean", "code", "config_hash"))
