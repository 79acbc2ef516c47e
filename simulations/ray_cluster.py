"""A private multi-node Ray cluster on this host, and what Ray's state API says ran on it.

Ray runs several nodes on one host for testing: each node is its own `ray start` process with
its own CPUs and ports (node manager, object manager, dashboard agent, runtime-env agent,
metrics), joined to the head's GCS port. Each node here also gets a custom resource naming it
(`fedtiny_node_<i>`), so its resources tell the nodes apart.

Every node runs with `--block` in its own process group and is stopped by its process tree
(`simulations.cli.processes.stop_group`), never by `ray stop`, which kills every Ray process
of the user on the machine. The head's temp dir is private, so `ray_current_cluster` stays out
of /tmp/ray and other runs' `ray.init()` never join this cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from simulations.cli.launch import free_port
from simulations.cli.processes import stop_group

RAY = str(Path(sys.executable).parent / "ray")
NODE_LABEL = "fedtiny_node_{}"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return env


def _node_command(index: int, cpus: int, address: str, temp: Path) -> list[str]:
    """`ray start` for node `index` (0: the head) with ports of its own: two nodes on one host must not share any."""
    cmd = [
        RAY, "start", "--block", f"--num-cpus={cpus}", f"--resources={json.dumps({NODE_LABEL.format(index): 1})}",
        f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}", "--disable-usage-stats",
    ]
    if index == 0:
        cmd += ["--head", f"--port={address.rpartition(':')[2]}", f"--temp-dir={temp}", "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}"]
    else:
        cmd += [f"--address={address}"]
    return cmd


@contextmanager
def local_cluster(cpus: tuple[int, ...] = (1, 1)) -> Iterator[tuple[str, Path, list[subprocess.Popen]]]:
    """A head and len(cpus) - 1 worker nodes, node i with cpus[i] CPUs; yields (address, temp dir, node processes).

    The temp dir holds every node's session and `ray start` log; it is removed after a clean exit."""
    temp = Path(tempfile.mkdtemp(prefix="ftray", dir="/tmp"))
    address = f"127.0.0.1:{free_port()}"
    procs: list[subprocess.Popen] = []
    with ExitStack() as stack:
        for i, n in enumerate(cpus):
            log_path = temp / f"ray_start_{i}.log"
            log = stack.enter_context(open(log_path, "w"))
            proc = subprocess.Popen(_node_command(i, n, address, temp), env=_env(), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            stack.callback(stop_group, proc)  # stopped in reverse order: workers, then the head
            procs.append(proc)
            _wait_for_node(proc, log_path)
        _wait_for_nodes(address, len(cpus))
        yield address, temp, procs
    shutil.rmtree(temp, ignore_errors=True)  # its logs are kept only when something failed


def _wait_for_node(proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with code {proc.returncode}; see {log}")
        if "Ray runtime started" in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"ray start did not come up within {timeout:.0f}s; see {log}")


def _wait_for_nodes(address: str, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (alive := len(probe(address)["nodes"])) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {alive} of {count} Ray nodes joined {address} within {timeout:.0f}s")
        time.sleep(1.0)


PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = [{"node_id": n["NodeID"], "cpus": n["Resources"].get("CPU", 0),
          "labels": sorted(k for k in n["Resources"] if k.startswith("fedtiny_node_"))}
         for n in ray.nodes() if n["Alive"]]
actors = [{"node_id": a["Address"]["NodeID"], "state": a["State"], "pid": a["Pid"]}
          for a in ray._private.state.actors().values() if a["ActorClassName"] == sys.argv[2]]
jobs = len(ray._private.state.jobs()) - 1
print(json.dumps({"nodes": nodes, "actors": actors, "jobs": jobs}))
"""


def probe(address: str, actor_class: str = "ClientAppActor") -> dict:
    """From Ray's own state: the live nodes (id, CPUs, fedtiny_node_<i> label), every actor of
    `actor_class` ever started (id of the node it ran on, state, pid; dead ones stay in the table),
    and the jobs the cluster ran (this probe's own driver not counted).

    Actors come from the GCS actor table (`ray._private.state.actors`), the table behind the
    state API: `ray.util.state` is served by the dashboard, which needs `ray[default]`.
    """
    out = subprocess.run([sys.executable, "-c", PROBE, address, actor_class], env=_env(), capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"probing the Ray cluster at {address} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def left_behind(marker: str) -> list[str]:
    """Command lines of the processes still running that name `marker` (the cluster's temp dir)."""
    from simulations.monitor import PROC, _read

    me = str(os.getpid())
    return [cmd for entry in PROC.iterdir() if entry.name.isdigit() and entry.name != me
            and marker in (cmd := _read(entry / "cmdline").replace("\0", " "))]
