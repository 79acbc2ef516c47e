"""`fedtiny fleet-gate`: a TLS reverse proxy that shows SuperNodes the Fleet API and nothing else.

Flower 1.42's SuperLink serves its Fleet, Control and Runtime (ServerAppIo) HTTP APIs on one
`--host/--port`, and in the open-source build the Control API has no user authentication: whoever
reaches that port with the public `ca.crt` can `flwr supernode register` a key of their own
(defeating SuperNode authentication) or `flwr run` any app (code execution on the SuperLink host).
So the SuperLink binds 127.0.0.1, and this gate listens on the address the nodes dial and forwards
only `/v1/fleet/<name>` requests to it. Method, path, query, headers (the SuperNode's signed
public-key, timestamp and signature headers among them) and body pass unchanged, responses are
streamed back; hop-by-hop headers (RFC 9110, 7.6.1) are the only ones dropped. Anything else gets
404 and one log line. The gate serves TLS with the SuperLink's own server certificate and verifies
the SuperLink's certificate with `ca.crt`.

Nothing unauthenticated may hold the SuperLink or the gate: a request's headers must arrive within
`HEADER_TIMEOUT_S` of its connection, its whole body within `BODY_TIMEOUT_S`, and a body over
`--max-body-bytes` (derived from the model by `deploy-local`, `body_limit`) is refused with 413
before anything reaches the SuperLink. Bodies are read at the gate before a connection to the
SuperLink is taken, and replies are read whole before they are sent on, so slow senders or readers
hold only their own connection, never one of the pool of `UPSTREAM_CONNECTIONS` to the SuperLink;
a request that finds that pool busy for `POOL_TIMEOUT_S` gets 503. At most `MAX_CONNECTIONS` are
served at once (503 beyond).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import re
import ssl
from pathlib import Path

import httpx
import uvicorn
from cryptography import x509
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.config import ConfigError
from simulations.cli.commands import help_for
from simulations.cli.deploy import TlsFiles, check_port, tls_files

LOG = logging.getLogger("fedtiny.fleet_gate")
FLEET_PATH = re.compile(rb"/v1/fleet(/[A-Za-z0-9_-]+)+")  # no dots, no percent-escapes: nothing to normalise
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
CONNECT_TIMEOUT_S = 10.0  # to the SuperLink
UPSTREAM_TIMEOUT_S = 60.0  # the SuperLink's answer to one Fleet request
POOL_TIMEOUT_S = 5.0  # waiting for one of the UPSTREAM_CONNECTIONS
UPSTREAM_CONNECTIONS = 100
HEADER_TIMEOUT_S = 10.0  # from a connection to its request's headers
BODY_TIMEOUT_S = 60.0  # from the headers to the last byte of the body
MAX_CONNECTIONS = 1000
MAX_BODY_BYTES = 64 * 2**20  # default of --max-body-bytes
ARRAY_CHUNK_BYTES = 5 * 2**20  # Flower sends arrays in chunks of at most this (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)


def body_limit(config) -> int:
    """The largest Fleet request body a run of `config` sends, with room to spare: an object holds at
    most one array chunk, or one codec payload (an update, scores) no larger than the dense float32 model."""
    from shared.data import load_for
    from shared.models import model_for

    dense = 4 * sum(t.numel() for t in model_for(config, load_for(config)).state_dict().values())
    return 2 * (max(dense, ARRAY_CHUNK_BYTES) + 2**20)


def is_fleet_path(raw_path: bytes) -> bool:
    """True for `/v1/fleet/<name>[/<name>...]` with plain segments; the only paths the gate forwards."""
    return FLEET_PATH.fullmatch(raw_path) is not None


def parse_address(text: str, flag: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) -> (host, port); one ConfigError line otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} {text!r} is not HOST:PORT with a port in 1..65535")
    return host, int(port)


def cert_names(cert: Path) -> list[str]:
    """The IP addresses and DNS names a certificate's subjectAltName lists."""
    try:
        san = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] + san.value.get_values_for_type(x509.DNSName)


def check_names_host(cert: Path, host: str) -> None:
    """The gate verifies the SuperLink's certificate for `host`: fail with one line before starting if it does not name it."""
    names = cert_names(cert)
    try:
        found = ipaddress.ip_address(host) in {ipaddress.ip_address(n) for n in names if _is_ip(n)}
    except ValueError:
        found = host.lower() in {n.lower() for n in names}
    if not found:
        raise ConfigError(
            f"{cert} names {', '.join(names) or 'no host'}, not the --superlink host {host} the gate checks it for; "
            f"make it with make_tls(folder, [..., {host!r}])"
        )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _forwarded(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` without hop-by-hop ones, nor those the Connection header names."""
    named = {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",")}
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


class FleetGate:
    """ASGI app forwarding Fleet API requests to `upstream` (`host:port` of a TLS SuperLink)."""

    def __init__(self, upstream: str, ca_cert: Path, max_body: int = MAX_BODY_BYTES) -> None:
        self.upstream = upstream
        self.max_body = max_body
        verify = ssl.create_default_context(cafile=str(ca_cert))
        self.client = httpx.AsyncClient(
            verify=verify, timeout=httpx.Timeout(UPSTREAM_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, pool=POOL_TIMEOUT_S),
            limits=httpx.Limits(max_connections=UPSTREAM_CONNECTIONS, max_keepalive_connections=UPSTREAM_CONNECTIONS),
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await self.client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":  # websockets
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "?"
        if not is_fleet_path(raw_path):
            LOG.warning("refused %s %s from %s (only /v1/fleet/ is served here)", scope["method"], raw_path.decode("latin-1"), client)
            await PlainTextResponse("not found: this address serves only the Fleet API\n", 404)(scope, receive, send)
            return
        response = await self._forward(Request(scope, receive), raw_path, client)
        await response(scope, receive, send)

    async def _body(self, request: Request, client: str) -> bytes | Response:
        """The whole request body, read here before the SuperLink is involved; 413 over `max_body`,
        408 when it does not arrive within `BODY_TIMEOUT_S`."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            LOG.warning("refused a %s-byte body from %s (over --max-body-bytes=%d)", declared, client, self.max_body)
            return PlainTextResponse("request body too large\n", 413)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_body:
                        LOG.warning("refused a body over %d bytes from %s", self.max_body, client)
                        return PlainTextResponse("request body too large\n", 413)
                    chunks.append(chunk)
        except TimeoutError:
            LOG.warning("dropped %s: its body did not arrive within %gs", client, BODY_TIMEOUT_S)
            return PlainTextResponse("request body timeout\n", 408)
        return b"".join(chunks)

    async def _forward(self, request: Request, raw_path: bytes, client: str):
        body = await self._body(request, client)
        if isinstance(body, Response):
            return body
        query = request.scope.get("query_string", b"")
        url = httpx.URL(f"https://{self.upstream}").copy_with(raw_path=raw_path + (b"?" + query if query else b""))
        headers = [(k, v) for k, v in _forwarded(request.headers.raw) if k.lower() != b"content-length"]
        try:
            reply = await self.client.send(self.client.build_request(request.method, url, headers=headers, content=body),
                                           stream=True)
            try:
                content = b"".join([chunk async for chunk in reply.aiter_raw()])  # as it came: no decoding
            finally:
                await reply.aclose()
        except httpx.PoolTimeout:
            LOG.error("all %d connections to the SuperLink busy for %s from %s", UPSTREAM_CONNECTIONS, raw_path.decode(), client)
            return PlainTextResponse("service unavailable: the SuperLink is busy\n", 503)
        except httpx.HTTPError as exc:
            LOG.error("SuperLink %s unreachable for %s %s from %s: %s", self.upstream, request.method, raw_path.decode(), client, exc)
            return PlainTextResponse("bad gateway: the SuperLink did not answer\n", 502)
        response = Response(content, status_code=reply.status_code)
        response.raw_headers = [(k, v) for k, v in _forwarded(reply.headers.raw) if k.lower() != b"content-length"]
        response.raw_headers.append((b"content-length", str(len(content)).encode()))
        return response


class _GateProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a header timeout: a connection whose first request's headers
    have not arrived `HEADER_TIMEOUT_S` after it opened is closed (uvicorn has none of its own)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._headers_late)

    def _headers_late(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            LOG.warning("closed %s: no request headers within %gs", "%s:%s" % tuple(self.client or ("?", "?")), HEADER_TIMEOUT_S)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)


def server(listen: tuple[str, int], upstream: str, tls: TlsFiles, max_body: int = MAX_BODY_BYTES) -> uvicorn.Server:
    """A uvicorn server for the gate (call `.run()`; set `.should_exit` to stop it)."""
    config = uvicorn.Config(
        FleetGate(upstream, tls.ca_cert, max_body), host=listen[0], port=listen[1],
        ssl_certfile=str(tls.server_cert), ssl_keyfile=str(tls.server_key), http=_GateProtocol,
        limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5,
        server_header=False, date_header=False, access_log=False, log_level="warning", lifespan="on", ws="none",
    )
    return uvicorn.Server(config)


def _fleet_gate(args: argparse.Namespace) -> int:
    if args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    listen = parse_address(args.listen, "--listen")
    upstream_host, upstream_port = parse_address(args.superlink, "--superlink")
    tls = tls_files(Path(args.certs).expanduser().resolve())
    tls.check()
    check_names_host(tls.server_cert, upstream_host)
    check_port(*listen)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded request
    upstream = f"[{upstream_host}]:{upstream_port}" if ":" in upstream_host else f"{upstream_host}:{upstream_port}"
    LOG.info("Fleet API gate on %s:%d -> https://%s (everything else refused)", *listen, upstream)
    try:
        server(listen, upstream, tls, args.max_body_bytes).run()
    except KeyboardInterrupt:
        pass
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `fleet-gate` to the `fedtiny` command line."""
    p = subparsers.add_parser("fleet-gate", help=help_for("fleet-gate"))
    p.add_argument("--listen", required=True, help="HOST:PORT the SuperNodes dial, e.g. 0.0.0.0:9092")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink, e.g. 127.0.0.1:9091")
    p.add_argument("--certs", required=True, help="folder with ca.crt, server.crt, server.key (the SuperLink's)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help=f"largest request body forwarded; larger ones get 413 at the gate (default {MAX_BODY_BYTES})")
    p.set_defaults(func=_fleet_gate)
