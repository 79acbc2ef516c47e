"""Launching runs for the benchmarks: fedtiny and the plain Flower app, each with its own SuperLink.

Reuses `simulations.cli.launch` (free ports, a private FLWR_HOME per run, process groups stopped
at the end) so that both apps run under exactly the same machinery.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from shared import rundir
from shared.config import Config, load_config, to_yaml
from simulations.cli.launch import (
    PROJECT_ROOT, federation_config, flower_env, flower_home, free_port, local_superlink, simulate, stop_group,
)
from simulations.monitor import Poller

PLAIN_APP = Path(__file__).resolve().parent / "plain_flower"
CONFIGS = PROJECT_ROOT / "configs"


def bench_config(smoke: bool, overrides: list[str], file: Path | None = None) -> Config:
    """configs/tiny.yaml (digits) for smoke runs, else `file` or configs/fashion-mnist.yaml, plus `overrides`."""
    file = CONFIGS / "tiny.yaml" if smoke else file or CONFIGS / "fashion-mnist.yaml"
    return load_config(file, overrides)


class LineClock(Poller):
    """Watches a growing log file and notes when a line containing each pattern first appears."""

    def __init__(self, path: Path, patterns: list[str], interval: float = 0.1) -> None:
        super().__init__(interval)
        self.path, self.patterns = path, patterns
        self.seen: dict[str, float] = {}
        self._pos = 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, errors="replace") as f:
            f.seek(self._pos)
            text = f.read()
            cut = text.rfind("\n") + 1
            self._pos += len(text[:cut].encode(errors="replace"))
        now = time.monotonic()
        for line in text[:cut].splitlines():
            for pattern in self.patterns:
                if pattern in line and pattern not in self.seen:
                    self.seen[pattern] = now


def run_fedtiny(config: Config, out: Path) -> dict:
    """One fedtiny simulation (Ray, own SuperLink); returns metrics.json's content."""
    config.output_dir = str(out)
    return simulate(config, out, progress=False, echo=False)


def run_plain(config: Config, out: Path) -> dict:
    """Flower's built-in FedAvg with a minimal ClientApp on the same config; returns plain.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / rundir.CONFIG
    config_file.write_text(to_yaml(config))
    run_config = out / rundir.RUN_CONFIG
    run_config.write_text(f"\"config-file\" = {json.dumps(str(config_file))}\n\"output-dir\" = {json.dumps(str(out))}\n")
    cmd = [
        "flwr", "run", str(PLAIN_APP), "--stream",
        "--run-config", str(run_config), "--federation-config", federation_config(config),
    ]
    with flower_home() as home:
        env = flower_env(home, free_port(), config.simulation.ray_address)
        env["PYTHONPATH"] = os.pathsep.join([str(PLAIN_APP), env["PYTHONPATH"]])
        with local_superlink(env, out / rundir.SUPERLINK_LOG), open(out / rundir.RUN_LOG, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait()
            finally:
                stop_group(proc)
    result = out / "plain.json"
    if not result.exists():
        raise RuntimeError(f"the plain Flower run wrote no plain.json; see {out / rundir.RUN_LOG}")
    return json.loads(result.read_text())
