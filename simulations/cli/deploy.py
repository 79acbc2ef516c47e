"""`fedtiny deploy-local`: the same ServerApp and ClientApp on a real Flower deployment on localhost.

One `flower-superlink` with TLS and SuperNode authentication bound to 127.0.0.1, a
`fedtiny fleet-gate` in front of it that forwards only the Fleet API, N `flower-supernode`
processes dialling the gate (node i gets `partition-id=i num-partitions=N` through
`--node-config`), and the job submitted with `flwr run` straight to the SuperLink, exactly as
on separate machines (the open-source SuperLink's Control API has no authentication, so only the
Fleet API may face the nodes; see `fleet_gate`). The run
folder holds everything that must never be committed: a CA and server certificate
made with `cryptography`, one EC key pair per node (only the public keys are
registered with the SuperLink), each process's FLWR_HOME and logs. Every process
gets its own process group and is stopped at the end, also on Ctrl-C, SIGTERM or
failure. Success is judged by the run's metrics.json, as in simulation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import signal
import socket
import subprocess
import sys
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared import rundir
from shared.config import Config, ConfigError, load_config
from simulations.cli.commands import help_for
from simulations.cli.common import fail, preflight, print_summary, with_output_dir
from simulations.cli.launch import (
    PROJECT_ROOT,
    RunFailed,
    follow,
    read_metrics,
    wait_for_port,
    flower_env,
    free_port,
    write_run_config,
)
from simulations.cli.processes import guard, stop_group

CONNECTION = "fedtiny-deploy"  # name of the SuperLink connection in the flwr CLI's config.toml
CERT_DAYS = 30
TASK_POLL_S = 0.2  # SuperExec's wait between ClientApp launches (Flower's default is 1 s; one launch per message)
NODE_CURVE = ec.SECP384R1()  # `flwr supernode register` accepts NIST EC keys in OpenSSH format
GATE_LOG = "fleet-gate.log"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files a TLS SuperLink needs; SuperNodes and the flwr CLI only need `ca_cert`."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def check(self) -> None:
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise ConfigError(f"certificate file {path} does not exist; pass a folder with ca.crt, server.crt and server.key")


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH format)."""

    private: Path
    public: Path


def tls_files(folder: Path) -> TlsFiles:
    """The file names `make_tls` writes (and `--certs` expects)."""
    return TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key")


def make_tls(folder: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """A fresh self-signed CA and a server certificate it signs, valid for `hosts` (IPs or DNS names)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = tls_files(folder)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtiny deployment CA")])
    ca_cert = (
        _cert_builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = (
        _cert_builder(server_name, ca_name, server_key.public_key(), now)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(folder / "ca.key", _pem_private(ca_key))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_private(server_key))
    return files


def _cert_builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=not cert_sign, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def make_node_key(folder: Path, name: str) -> NodeKey:
    """An EC P-384 key pair for SuperNode authentication: `name` (private) and `name.pub`."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(NODE_CURVE)
    pair = NodeKey(folder / name, folder / f"{name}.pub")
    _write_private(pair.private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ))
    pair.public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return pair


def check_port(host: str, port: int) -> None:
    """Fail with one line before starting anything when the SuperLink port cannot be bound."""
    if not 0 < port < 65536:
        raise ConfigError(f"port {port} is out of range; pick one in 1..65535")
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"port {port} on {host} is not free ({exc.strerror}); pick another with --port") from None


def write_connection(flwr_home: Path, address: str, ca_cert: Path) -> None:
    """The flwr CLI's config.toml with one TLS SuperLink connection, made the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\nroot-certificates = {json.dumps(str(ca_cert.resolve()))}\n'
    )


def superlink_command(tls: TlsFiles, host: str, port: int, log_file: Path) -> list[str]:
    return [
        "flower-superlink", "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
        "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth", "--isolation", "subprocess",
        "--disable-runtime-dependency-installation", "--host", host, "--port", str(port), "--log-file", str(log_file),
    ]


def supernode_command(address: str, ca_cert: Path, key: NodeKey, partition_id: int, num_partitions: int, runtime_port: int) -> list[str]:
    return [
        "flower-supernode", "--superlink", address, "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(key.private),
        "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}",
        "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(runtime_port),
    ]


def register_node(env: dict[str, str], key: NodeKey, name: str) -> None:
    """`flwr supernode register`: only nodes whose public key is registered may join."""
    cmd = ["flwr", "supernode", "register", str(key.public), CONNECTION, "--name", name, "--format", "json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise RunFailed(f"registering {key.public} with the SuperLink failed: {lines[-1] if lines else done.returncode}")


@contextmanager
def process(cmd: list[str], env: dict[str, str], log_file: Path) -> Iterator[subprocess.Popen]:
    """A child in its own process group, output to `log_file`, stopped (with its children) on exit."""
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    guard(proc)  # stopped even if this process is killed with -9
    try:
        yield proc
    finally:
        stop_group(proc)


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so the `finally` blocks stop every child (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def deploy_local(
    config: Config,
    out: Path,
    nodes: int,
    port: int | None = None,
    certs: Path | None = None,
    progress: bool = True,
    echo: bool = True,
    superlink_port: int | None = None,
) -> dict:
    """Run `config` on a TLS SuperLink with `nodes` authenticated SuperNodes on localhost; returns metrics.json.

    `port` is the node-facing port (the fleet gate's), `superlink_port` the SuperLink's (Fleet,
    Control and Runtime APIs, 127.0.0.1 only); both default to free ones. `certs` is a folder with
    ca.crt, server.crt and server.key to use instead of fresh ones. Outputs go to `out` (the run
    folder `out/deploy` holds keys, certificates and logs).
    """
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1, got {nodes}")
    if nodes != config.fl.num_clients:
        raise ConfigError(f"--nodes {nodes} but fl.num_clients={config.fl.num_clients}; they must match (one partition per node)")
    if config.simulation.virtual_partitions:
        raise ConfigError("simulation.virtual_partitions is for simulations; SuperNodes hold their own data, set it to false")
    host = "127.0.0.1"
    port = free_port() if port is None else port
    superlink_port = free_port() if superlink_port is None else superlink_port
    if port == superlink_port:
        raise ConfigError(f"--port and --superlink-port are both {port}; the fleet gate and the SuperLink need one each")
    check_port(host, port)
    check_port(host, superlink_port)
    given = tls_files(Path(certs).expanduser().resolve()) if certs is not None else None
    if given:
        given.check()
    run_dir = out / rundir.DEPLOY_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o700)  # keys, certificates, the SuperLink's state and the CLI's connection: this user's only
    tls = given or make_tls(run_dir / "certs", (host, "localhost"))
    address = f"{host}:{port}"  # what the SuperNodes dial: the fleet gate
    run_config = out / rundir.RUN_CONFIG
    write_run_config(config, run_config)
    (out / rundir.METRICS).unlink(missing_ok=True)  # success is judged by this run's metrics.json only

    from simulations.cli.fleet_gate import body_limit

    with _stop_on_sigterm(), ExitStack() as stack:
        cli_env = stack.enter_context(running_superlink(run_dir, tls, host, superlink_port))
        stack.enter_context(running_gate(run_dir, tls, (host, port), f"{host}:{superlink_port}", body_limit(config)))
        for i in range(nodes):
            key = make_node_key(run_dir / "keys", f"node-{i}")
            register_node(cli_env, key, f"node-{i}")
            stack.enter_context(running_supernode(run_dir, f"node-{i}", address, tls.ca_cert, key, i, nodes))
        _submit(cli_env, run_config, out / rundir.RUN_LOG, config.fl.rounds, progress, echo)
    return read_metrics(out, f"{out / rundir.RUN_LOG} and the logs in {run_dir}")


@contextmanager
def running_superlink(run_dir: Path, tls: TlsFiles, host: str, port: int) -> Iterator[dict[str, str]]:
    """A TLS SuperLink with SuperNode authentication; yields the environment of a flwr CLI connected to it."""
    home = run_dir / "superlink"
    home.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / rundir.SUPERLINK_LOG
    cli_home = run_dir / "cli"
    write_connection(cli_home, f"{host}:{port}", tls.ca_cert)
    cmd = superlink_command(tls, host, port, log_file)
    with process(cmd, flower_env(home, port), run_dir / "superlink.out") as link:
        wait_for_port(port, link, log_file)
        yield flower_env(cli_home, port)


@contextmanager
def running_gate(run_dir: Path, tls: TlsFiles, listen: tuple[str, int], superlink: str,
                 max_body: int | None = None) -> Iterator[subprocess.Popen]:
    """`fedtiny fleet-gate` on `listen`, forwarding only the Fleet API (bodies up to `max_body` bytes, else
    the gate's default) to `superlink`; log in `run_dir/fleet-gate.log`."""
    log_file = run_dir / GATE_LOG
    cmd = [
        sys.executable, "-m", "simulations.cli", "fleet-gate", "--listen", f"{listen[0]}:{listen[1]}",
        "--superlink", superlink, "--certs", str(tls.ca_cert.parent),
        *(["--max-body-bytes", str(max_body)] if max_body else []),
    ]
    with process(cmd, flower_env(run_dir / "fleet-gate", listen[1]), log_file) as gate:
        try:
            wait_for_port(listen[1], gate, log_file)
        except RunFailed:
            raise RunFailed(f"the fleet gate did not start on {listen[0]}:{listen[1]}; see {log_file}") from None
        yield gate


@contextmanager
def running_supernode(
    run_dir: Path, name: str, address: str, ca_cert: Path, key: NodeKey, partition_id: int, num_partitions: int,
    extra: Sequence[str] = (),
) -> Iterator[subprocess.Popen]:
    """A SuperNode with its own FLWR_HOME (as on its own machine); its output goes to `run_dir/<name>.log`."""
    home = run_dir / name
    home.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(address, ca_cert, key, partition_id, num_partitions, free_port()) + list(extra)
    port = int(address.rsplit(":", 1)[1])
    env = flower_env(home, port)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(TASK_POLL_S))
    with process(cmd, env, run_dir / f"{name}.log") as node:
        yield node


def _submit(env: dict[str, str], run_config: Path, log_path: Path, rounds: int, progress: bool, echo: bool) -> None:
    cmd = ["flwr", "run", str(PROJECT_ROOT), CONNECTION, "--stream", "--run-config", str(run_config)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        guard(proc)
        try:
            follow(proc, log, rounds, progress, echo)
        finally:
            stop_group(proc)


def _deploy_local(args: argparse.Namespace) -> int:
    config = load_config(args.config, [f"fl.num_clients={args.nodes}", *args.overrides])
    config, out = with_output_dir(config, suffix="-deploy")
    preflight(config)
    certs = Path(args.certs) if args.certs else None
    try:
        metrics = deploy_local(
            config, out, args.nodes, args.port, certs, progress=not args.no_progress, superlink_port=args.superlink_port,
        )
    except RunFailed as exc:
        return fail(exc)
    except KeyboardInterrupt:
        print("fedtiny: interrupted; every SuperLink and SuperNode process was stopped", file=sys.stderr)
        return 130
    print_summary(metrics, out)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `deploy-local` to the `fedtiny` command line."""
    p = subparsers.add_parser("deploy-local", help=help_for("deploy-local"))
    p.add_argument("--nodes", type=int, required=True, help="number of SuperNodes; sets fl.num_clients (one partition each)")
    p.add_argument("--config", help="YAML file merged onto configs/default.yaml")
    p.add_argument("--port", type=int, help="node-facing port on 127.0.0.1, the fleet gate's (default: a free one)")
    p.add_argument(
        "--superlink-port", type=int, help="the SuperLink's port on 127.0.0.1: Fleet, Control, Runtime (default: a free one)",
    )
    p.add_argument("--certs", help="folder with ca.crt, server.crt, server.key to use instead of fresh ones")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. fl.rounds=5")
    p.set_defaults(func=_deploy_local)
