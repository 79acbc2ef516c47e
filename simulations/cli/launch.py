"""Run the ServerApp and ClientApp in Flower's Ray-backed simulation, through `flwr run`.

Each run gets its own SuperLink on free ports and its own FLWR_HOME in a temporary folder
(removed after the run: the SuperLink unpacks a copy of the app's sources there), so runs
(and tests) never collide, and every process is stopped at the end, also on Ctrl-C or failure. `flwr run` exits 0 even when a run failed, so success
is judged by the run's own metrics.json. `fedtiny run`, `fedtiny compare`, `fedtiny deploy-local`
and the benchmarks (simulations/harness.py) launch through here.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from server.recorder import PROGRESS_PREFIX
from shared import rundir
from shared.config import Config, to_flat
from shared.registry import USER_DIR_ENV
from simulations.cli.processes import guard, record, stop_group, stop_stale

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the Flower app `flwr run` ships (pyproject.toml)
ROUND_LINE = re.compile(re.escape(PROGRESS_PREFIX) + r" round (\d+)/(\d+) (.*)")


class RunFailed(RuntimeError):
    """The federated run did not produce a summary (the reason is in its output and logs)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_run_config(config: Config, path: Path) -> None:
    """Flower's run config as TOML: flat dotted keys, scalar values."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in to_flat(config).items()]
    path.write_text("\n".join(lines) + "\n")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def flower_env(flwr_home: Path, http_port: int, ray_address: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault(USER_DIR_ENV, os.getcwd())  # trusted packages of the user's directory (shared.registry)
    # Ray hides every GPU from an actor that reserves none; with simulation.gpus_per_client=0 the
    # clients then share the visible GPUs unreserved instead (device=cuda still reaches them).
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


@contextmanager
def flower_home() -> Iterator[Path]:
    """A private FLWR_HOME for one run, removed after it.

    The SuperLink unpacks the app it runs (a copy of the project's sources, about 0.6 MB) into
    FLWR_HOME/apps and runs the ServerApp and ClientApps from there; nothing needs it afterwards,
    so it stays out of the output folder.
    """
    with tempfile.TemporaryDirectory(prefix="fedtiny-flwr-") as home:
        yield Path(home)


@contextmanager
def local_superlink(env: dict[str, str], log_file: Path) -> Iterator[subprocess.Popen]:
    """A simulation SuperLink of our own (one HTTP port serves all its APIs), stopped with its process group."""
    cmd = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--host", "127.0.0.1", "--port", env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"],
        "--log-file", str(log_file),
    ]
    pid_file = log_file.with_suffix(".pid")
    stop_stale(pid_file)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    record(proc, pid_file)
    guard(proc)
    try:
        wait_for_port(int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]), proc, log_file)
        yield proc
    finally:
        stop_group(proc)
        pid_file.unlink(missing_ok=True)


def wait_for_port(port: int, proc: subprocess.Popen, log_file: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RunFailed(f"flower-superlink did not start within {timeout:.0f}s; see {log_file}")


def federation_config(config: Config) -> str:
    s = config.simulation
    parts = [f"num-supernodes={config.fl.num_clients}", f"client-resources-num-cpus={s.cpus_per_client:g}"]
    if not s.ray_address:
        parts.append(f"init-args-num-cpus={s.num_cpus}")
    if s.gpus_per_client > 0:  # Ray gives each client this share of a GPU it detected
        parts.append(f"client-resources-num-gpus={s.gpus_per_client:g}")
    return " ".join(parts)


def simulate(config: Config, out: Path, progress: bool = True, echo: bool = True) -> dict:
    """Run `config` in simulation, writing outputs to `out`; returns metrics.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    run_config = out / rundir.RUN_CONFIG
    write_run_config(config, run_config)
    cmd = [
        "flwr", "run", str(PROJECT_ROOT), "--stream",
        "--run-config", str(run_config), "--federation-config", federation_config(config),
    ]
    log_path, superlink_log = out / rundir.RUN_LOG, out / rundir.SUPERLINK_LOG
    with flower_home() as home:
        env = flower_env(home, free_port(), config.simulation.ray_address)
        with local_superlink(env, superlink_log), open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            guard(proc)
            try:
                follow(proc, log, config.fl.rounds, progress, echo)
            finally:
                stop_group(proc)
    return read_metrics(out, f"{log_path} and {superlink_log}")


def read_metrics(out: Path, logs: str) -> dict:
    """A finished run's metrics.json; RunFailed when the run wrote none or recorded an error."""
    path = out / rundir.METRICS
    if not path.exists():
        raise RunFailed(f"the run wrote no {rundir.METRICS}; see {logs}")
    metrics = json.loads(path.read_text())
    summary = metrics.get("summary", {})
    if "error" in summary or "accuracy" not in summary:
        raise RunFailed(f"the run failed: {summary.get('error', 'no summary')}; see {logs}")
    return metrics


def follow(proc: subprocess.Popen, log, rounds: int, progress: bool, echo: bool, live: bool | None = None) -> None:
    """Stream Flower's output to the log; show our progress lines, under a live bar on a terminal.

    Off a terminal (`live` False: a log file or a pipe) there is no bar, so no carriage-return
    fragments, only whole lines. The bar starts with the ServerApp's first line, so its elapsed
    time is the run's own (metrics.json's wall_seconds), not Flower's and Ray's start-up.
    """
    live = progress and (sys.stderr.isatty() if live is None else live)
    bar = None
    try:
        for line in proc.stdout:
            line = _strip_ansi(line)  # Flower colours its log lines; run.log is read in editors and grep
            log.write(line)
            log.flush()
            text = line.rstrip()
            if PROGRESS_PREFIX not in text:
                continue
            text = text[text.index(PROGRESS_PREFIX):]
            if live and bar is None:
                from tqdm import tqdm

                bar = tqdm(total=rounds, unit="round", dynamic_ncols=True, file=sys.stderr)
            if echo:
                (bar.write(text) if bar else print(text, flush=True))
            match = ROUND_LINE.match(text)
            if bar and match:
                bar.n = int(match.group(1))
                bar.refresh()
        proc.wait()
    finally:
        if bar:
            bar.close()


def _strip_ansi(text: str) -> str:
    """`text` without terminal escape sequences (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
