"""The fleet gate: Fleet API requests pass byte-exact to a fake TLS SuperLink; everything else is refused."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response

from shared.config import ConfigError
from simulations.cli.deploy import make_tls
from simulations.cli.fleet_gate import check_names_host, is_fleet_path, parse_address, server
from simulations.cli.launch import free_port


class FakeSuperLink:
    """Records every request it gets and answers with a body and headers derived from it."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.reply = os.urandom(3 * 1024 * 1024 + 7)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        body = await request.body()
        self.seen.append({
            "method": request.method, "raw_path": scope["raw_path"], "query": scope["query_string"],
            "headers": request.headers.raw, "body": body,
        })
        digest = hashlib.sha256(body).hexdigest()
        reply = Response(self.reply, 200, media_type="application/protobuf", headers={"x-body-sha256": digest})
        reply.raw_headers.append((b"set-cookie", b"a=1"))
        reply.raw_headers.append((b"set-cookie", b"b=2"))
        await reply(scope, receive, send)


@contextmanager
def serving(srv: uvicorn.Server):
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("server did not start")
        time.sleep(0.02)
    try:
        yield
    finally:
        srv.should_exit = True
        thread.join(10)


@contextmanager
def gate_and_superlink(tmp_path, **options):
    """(gate URL, CA file, fake SuperLink) with the fake on 127.0.0.1 behind the gate, both TLS."""
    tls = make_tls(tmp_path / "certs")
    fake = FakeSuperLink()
    link_port, gate_port = free_port(), free_port()
    upstream = uvicorn.Server(uvicorn.Config(
        fake, host="127.0.0.1", port=link_port, ssl_certfile=str(tls.server_cert), ssl_keyfile=str(tls.server_key),
        log_level="warning", lifespan="off", ws="none",
    ))
    with serving(upstream), serving(server(("127.0.0.1", gate_port), f"127.0.0.1:{link_port}", tls, **options)):
        yield f"https://127.0.0.1:{gate_port}", str(tls.ca_cert), fake


@pytest.fixture
def gate(tmp_path):
    with gate_and_superlink(tmp_path) as g:
        yield g


def test_fleet_request_and_reply_pass_byte_exact(gate):
    url, ca, fake = gate
    body = os.urandom(6 * 1024 * 1024 + 3)  # larger than one ArrayRecord chunk (5 MiB)
    signed = {  # what NodeAuthHttpInterceptor adds; the SuperLink checks them, so they must arrive as sent
        "flwr-public-key": "UHVibGljS2V5", "flwr-timestamp": "2026-12-01T10:00:00+00:00", "flwr-signature": "U2lnbmF0dXJl",
        "content-type": "application/protobuf",
    }
    reply = httpx.post(f"{url}/v1/fleet/push-messages?x=1&y=%20z", content=body, headers=signed, verify=ssl.create_default_context(cafile=ca))
    assert reply.status_code == 200
    assert reply.content == fake.reply
    assert reply.headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert reply.headers.get_list("set-cookie") == ["a=1", "b=2"]
    (seen,) = fake.seen
    assert (seen["method"], seen["raw_path"], seen["query"]) == ("POST", b"/v1/fleet/push-messages", b"x=1&y=%20z")
    assert seen["body"] == body
    got = dict(seen["headers"])
    for name, value in signed.items():
        assert got[name.encode()] == value.encode()
    assert got[b"content-length"] == str(len(body)).encode()


@pytest.mark.parametrize("path", [
    "/v1/control/list-runs", "/v1/control/start-run", "/v1/runtime/pull-app-inputs", "/", "/v1/fleet", "/v1/fleetx/a",
    "/docs", "/openapi.json",
])
def test_anything_but_the_fleet_api_is_refused_and_never_forwarded(gate, path):
    url, ca, fake = gate
    reply = httpx.post(f"{url}{path}", content=b"\x00\x01", verify=ssl.create_default_context(cafile=ca))
    assert reply.status_code == 404
    assert fake.seen == []


@pytest.mark.parametrize("raw", [b"/v1/fleet/../control/list-runs", b"/v1/fleet/%2e%2e/control/list-runs", b"/v1/fleet%2F..%2Fcontrol/list-runs"])
def test_dot_segments_and_escapes_cannot_walk_out_of_the_fleet_api(gate, raw):
    """Sent raw over TLS, not through a client that would normalise them first."""
    url, ca, fake = gate
    port = int(url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port)) as sock, context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST " + raw + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404")
    assert fake.seen == []


def test_fleet_paths_are_plain_fleet_segments_only():
    assert is_fleet_path(b"/v1/fleet/pull-messages")
    assert not is_fleet_path(b"/v1/fleet/")
    assert not is_fleet_path(b"/v1/fleet/a/../b")
    assert not is_fleet_path(b"/v1/control/list-runs")


def test_superlink_down_is_a_502_not_a_hang(tmp_path):
    tls = make_tls(tmp_path / "certs")
    gate_port = free_port()
    with serving(server(("127.0.0.1", gate_port), f"127.0.0.1:{free_port()}", tls)):
        reply = httpx.post(f"https://127.0.0.1:{gate_port}/v1/fleet/pull-messages", content=b"", verify=ssl.create_default_context(cafile=str(tls.ca_cert)), timeout=30)
    assert reply.status_code == 502


@pytest.mark.parametrize("text", ["9092", "host:", "host:0", "host:70000", ":9092"])
def test_bad_address_is_one_config_error(text):
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        parse_address(text, "--listen")


def test_ipv6_address_parses():
    assert parse_address("[::1]:9092", "--listen") == ("::1", 9092)


def test_certificate_that_does_not_name_the_superlink_host_is_one_config_error(tmp_path):
    tls = make_tls(tmp_path, ["10.0.0.1", "superlink.example"])
    with pytest.raises(ConfigError, match="names 10.0.0.1, superlink.example, not the --superlink host 127.0.0.1"):
        check_names_host(tls.server_cert, "127.0.0.1")
    check_names_host(make_tls(tmp_path / "ok", ["10.0.0.1", "superlink.example", "127.0.0.1"]).server_cert, "127.0.0.1")
    check_names_host(tls.server_cert, "SuperLink.example")


def _tls_socket(url: str, ca: str) -> ssl.SSLSocket:
    port = int(url.rsplit(":", 1)[1])
    return ssl.create_default_context(cafile=ca).wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                                             server_hostname="127.0.0.1")


def test_an_ordinary_fleet_request_is_answered_within_a_second_while_200_slow_senders_are_open(gate):
    """Each slow sender has sent its headers and one byte of a 100 kB body; none of them may hold one of
    the gate's connections to the SuperLink, so an ordinary request is not queued behind them."""
    url, ca, fake = gate
    slow = []
    try:
        for _ in range(200):
            sock = _tls_socket(url, ca)
            sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\nx")
            slow.append(sock)
        client = httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=1.0)
        started = time.monotonic()
        reply = client.post(f"{url}/v1/fleet/pull-messages", content=b"ordinary")
        elapsed = time.monotonic() - started
    finally:
        for sock in slow:
            sock.close()
    assert reply.status_code == 200 and elapsed < 1.0
    assert [s["body"] for s in fake.seen] == [b"ordinary"]


def test_a_connection_whose_headers_do_not_arrive_is_closed(gate, monkeypatch):
    from simulations.cli import fleet_gate

    monkeypatch.setattr(fleet_gate, "HEADER_TIMEOUT_S", 0.5)
    url, ca, fake = gate
    with _tls_socket(url, ca) as sock:
        sock.sendall(b"POST /v1/fleet/push-object HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed by the gate, well before the 10 s here
    assert fake.seen == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_is_refused_at_the_gate_and_never_reaches_the_superlink(tmp_path, chunked):
    with gate_and_superlink(tmp_path, max_body=1000) as (url, ca, fake):
        client = httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=30)
        body = os.urandom(5000)
        content = iter([body[:2500], body[2500:]]) if chunked else body
        assert client.post(f"{url}/v1/fleet/push-object", content=content).status_code == 413
        assert fake.seen == []
        assert client.post(f"{url}/v1/fleet/push-object", content=body[:1000]).status_code == 200
        assert [s["body"] for s in fake.seen] == [body[:1000]]


def test_the_body_limit_follows_the_model():
    from shared.config import load_config
    from simulations.cli.fleet_gate import ARRAY_CHUNK_BYTES, body_limit

    small, big = load_config(None, []), load_config(None, ["model.width=16"])
    assert body_limit(small) == 2 * (ARRAY_CHUNK_BYTES + 2**20)  # the default cnn on digits is under one chunk
    assert body_limit(big) > body_limit(small)
