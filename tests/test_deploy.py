"""Deployment on localhost: certificates, node keys, flag errors, and real TLS + SuperNode-auth runs."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.config import ConfigError, load_config
from simulations.cli.deploy import (
    check_port,
    deploy_local,
    make_node_key,
    make_tls,
    register_node,
    running_gate,
    running_superlink,
    running_supernode,
)
from simulations.cli.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
TINY_DEPLOY = ["fl.num_clients=2", "fl.clients_per_round=2", "fl.rounds=2", "fedtiny.search_clients=2"]


def test_server_certificate_is_signed_by_the_ca_for_localhost(tmp_path):
    tls = make_tls(tmp_path, ("127.0.0.1", "localhost"))
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert tls.server_key.stat().st_mode & 0o077 == 0


def test_node_key_pair_is_openssh_p384_and_private_key_is_owner_only(tmp_path):
    pair = make_node_key(tmp_path, "node-0")
    public = serialization.load_ssh_public_key(pair.public.read_bytes())
    private = serialization.load_ssh_private_key(pair.private.read_bytes(), password=None)
    assert isinstance(public.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert pair.private.stat().st_mode & 0o077 == 0


def test_busy_port_is_one_config_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match=f"port {s.getsockname()[1]} .* not free"):
            check_port("127.0.0.1", s.getsockname()[1])


def test_missing_certificate_file_is_one_config_error(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.yaml", TINY_DEPLOY)
    with pytest.raises(ConfigError, match="ca.crt does not exist"):
        deploy_local(config, tmp_path / "out", 2, certs=tmp_path / "no-such-folder")


def test_gate_and_superlink_ports_must_differ(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.yaml", TINY_DEPLOY)
    port = free_port()
    with pytest.raises(ConfigError, match=f"both {port}"):
        deploy_local(config, tmp_path, 2, port=port, superlink_port=port)


def test_nodes_must_match_num_clients(tmp_path):
    config = load_config(ROOT / "configs" / "tiny.yaml", TINY_DEPLOY)
    with pytest.raises(ConfigError, match="--nodes 3 but fl.num_clients=2"):
        deploy_local(config, tmp_path, 3)


def _probe_while_running(gate_port: int, link_port: int, ca: Path, found: dict) -> None:
    """During the run: the Control API through the node-facing address, and directly; who listens on the SuperLink port."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", gate_port)) == 0:
                break
        time.sleep(0.5)
    verify = ssl.create_default_context(cafile=str(ca))
    body = {"content": b"", "headers": {"content-type": "application/protobuf"}, "verify": verify, "timeout": 30}
    found["via_gate"] = httpx.post(f"https://127.0.0.1:{gate_port}/v1/control/list-runs", **body).status_code
    found["direct"] = httpx.post(f"https://127.0.0.1:{link_port}/v1/control/list-runs", **body).status_code
    found["link_listens_on"] = sorted({
        c.laddr.ip for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == link_port
    })
    while time.monotonic() < deadline and len(found.setdefault("nodes_dial", [])) < 2:
        found["nodes_dial"] = _superlink_flags_of_supernodes_under(ca.parent.parent)
        time.sleep(0.5)


def _superlink_flags_of_supernodes_under(run_dir: Path) -> list[str]:
    """`--superlink` of the running flower-supernode processes whose CA file is in `run_dir`.

    A SuperNode forking its ClientApp process shows the parent's command line until the child execs;
    such a child (its parent is a matching SuperNode) is the same node, not another one.
    """
    nodes = {}
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        cmd = proc.info["cmdline"] or []
        if any(a.endswith("flower-supernode") for a in cmd[:2]) and any(a.startswith(str(run_dir)) for a in cmd):
            nodes[proc.pid] = (proc.info["ppid"], cmd[cmd.index("--superlink") + 1])
    return [dial for ppid, dial in nodes.values() if ppid not in nodes]


@pytest.mark.integration
@pytest.mark.timeout(600)  # about 1-2 min on 2 idle cores; several times that on a loaded machine
def test_tls_authenticated_deployment_runs_fedtiny_through_the_fleet_gate_only(tmp_path):
    out = tmp_path / "out"
    config = load_config(ROOT / "configs" / "tiny.yaml", [*TINY_DEPLOY, f"output_dir={out}"])
    gate_port, link_port = free_port(), free_port()
    found: dict = {}
    ca = out / "deploy" / "certs" / "ca.crt"
    probe = threading.Thread(target=_probe_while_running, args=(gate_port, link_port, ca, found), daemon=True)
    probe.start()
    metrics = deploy_local(config, out, 2, port=gate_port, progress=False, echo=False, superlink_port=link_port)
    probe.join(60)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert metrics["summary"]["method"] == "fedtiny" and 0.0 <= metrics["summary"]["accuracy"] <= 1.0
    log = (out / "deploy" / "superlink.log").read_text()
    assert log.count("[Fleet.ActivateNode] Activated node_id=") == 2  # signed node requests pass the gate intact
    assert found["via_gate"] == 404  # the node-facing address has no Control API
    assert found["direct"] != 404  # ... which the SuperLink does serve, on 127.0.0.1 only
    assert found["link_listens_on"] == ["127.0.0.1"]
    assert "refused POST /v1/control/list-runs" in (out / "deploy" / "fleet-gate.log").read_text()
    assert found["nodes_dial"] == [f"127.0.0.1:{gate_port}"] * 2


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_supernode_with_unregistered_key_is_refused(tmp_path):
    tls = make_tls(tmp_path / "certs")
    port = free_port()
    gate_port = free_port()
    with running_superlink(tmp_path, tls, "127.0.0.1", port) as cli_env, \
            running_gate(tmp_path, tls, ("127.0.0.1", gate_port), f"127.0.0.1:{port}"):
        register_node(cli_env, make_node_key(tmp_path / "keys", "known"), "known")
        stranger = make_node_key(tmp_path / "keys", "stranger")
        address = f"127.0.0.1:{gate_port}"
        with running_supernode(tmp_path, "stranger", address, tls.ca_cert, stranger, 0, 2, ["--max-retries", "1"]) as node:
            try:
                code = node.wait(90)
            except subprocess.TimeoutExpired:
                pytest.fail("a SuperNode with an unregistered key kept running")
    assert code != 0
    assert "Failed to activate SuperNode" in (tmp_path / "stranger.log").read_text()
    assert "No SuperNode found with the given public key" in (tmp_path / "superlink.log").read_text()
