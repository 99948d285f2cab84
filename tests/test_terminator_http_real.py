"""
``twistd connect-native --protocol http`` as a real process: each request
decided by the intentions' HTTP permissions, then proxied to ``--to``.

Against the development agent as Consul 1.10 (``python -m
connect_native.devagent --consul-version 1.10.0``; real 1.8.7 has no L7
intentions) holding "api may ``GET /public*`` on web, then deny everything
else (``PathPrefix "/"``)".  The backend is a twisted.web site in the test
process that records every request it gets; the callers are Connect
clients (``connect:web:source=NAME``) in the test process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.consul_agent import free_ports
from tests.test_devagent_main import _bounded, _request
from tests.test_endpoints_real import Only, escaped, until
from tests.test_l7_from_outside import dev_agent_holding, web_registered
from tests.test_terminator_real import Process, bounded, log_line

L7_INTENTIONS = {
    "Kind": "service-intentions",
    "Name": "web",
    "Sources": [
        {
            "Name": "api",
            "Permissions": [
                {
                    "Action": "allow",
                    "HTTP": {"PathPrefix": "/public", "Methods": ["GET"]},
                },
                {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
            ],
        }
    ],
}


class Recorder(Resource):
    """The application: records each request, answers with what it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, Headers]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method, request.uri, request.requestHeaders))
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"x-from-backend", b"yes")
        request.setHeader(b"keep-alive", b"timeout=5")
        return b"backend answered " + request.method + b" " + request.uri


@pytest_twisted.async_yield_fixture
async def agent_port() -> AsyncIterator[int]:
    """A development agent as Consul 1.10 holding the L7 intentions."""
    async for port in dev_agent_holding(L7_INTENTIONS):
        yield port


class Caller:
    """HTTP/1.1 requests to ``web`` as ``source``, over keep-alive Connect."""

    def __init__(self, agent_port: int, source: str) -> None:
        self.dial = clientFromString(
            reactor,
            f"connect:web:source={source}:consul={escaped(f'127.0.0.1:{agent_port}')}",
        )
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent.usingEndpointFactory(
            reactor, Only(self.dial), pool=self.pool
        )

    async def request(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes] | None = None
    ) -> tuple[int, Headers, bytes]:
        sent = Headers({k: [v] for k, v in (headers or {}).items()})
        response = await bounded(
            self.agent.request(method, b"https://web" + path, sent), 20
        )
        body = await bounded(readBody(response), 20)
        return response.code, response.headers, body

    async def close(self) -> None:
        await self.pool.closeCachedConnections()
        self.dial.close()


def terminator(agent_port: int, backend_port: int, tmp_path: Path, *extra: str) -> Any:
    [port] = free_ports(1)
    return Process(
        [
            "connect-native",
            "--service",
            "web",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--to",
            f"tcp:127.0.0.1:{backend_port}",
            "--consul",
            f"http://127.0.0.1:{agent_port}",
            "--protocol",
            "http",
            *extra,
        ],
        tmp_path,
    )


@pytest_twisted.ensureDeferred
async def test_each_request_is_decided_by_the_l7_intentions(
    agent_port: int, tmp_path: Path
) -> None:
    app = Recorder()
    backend: Any = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Site(app), interface="127.0.0.1"
    )
    [status] = free_ports(1)
    process = terminator(
        agent_port,
        backend.getHost().port,
        tmp_path,
        "--authorize",
        "intentions",
        "--to-check",
        "none",
        "--status",
        f"tcp:{status}:interface=127.0.0.1",
    )
    api = Caller(agent_port, "api")
    other = Caller(agent_port, "billing")
    try:
        await log_line(process, "accepting Connect", "proxying", seconds=60)
        await web_registered(agent_port)

        # Allowed: answered by the backend, which sees who called (and not
        # the caller's forged identity header).
        code, headers, body = await api.request(
            b"GET",
            b"/public/x",
            {
                b"x-forwarded-client-cert": b"By=spiffe://evil;URI=spiffe://evil/admin",
                b"x-forwarded-for": b"10.9.9.9",
                b"connection": b"x-secret",
                b"x-secret": b"hop by hop",
            },
        )
        assert (code, body) == (200, b"backend answered GET /public/x")
        assert headers.getRawHeaders(b"x-from-backend") == [b"yes"]
        assert headers.getRawHeaders(b"keep-alive") is None
        [(method, uri, seen)] = app.seen
        assert (method, uri) == (b"GET", b"/public/x")
        [xfcc] = seen.getRawHeaders(b"x-forwarded-client-cert")
        by, caller = xfcc.decode().split(";")
        assert by.startswith("By=spiffe://")
        assert by.endswith("/svc/web")
        assert caller.startswith("URI=spiffe://")
        assert caller.endswith("/svc/api")
        assert b"evil" not in xfcc
        assert seen.getRawHeaders(b"x-forwarded-for") == [b"10.9.9.9, 127.0.0.1"]
        assert seen.getRawHeaders(b"x-forwarded-proto") == [b"https"]
        assert seen.getRawHeaders(b"x-secret") is None
        assert seen.getRawHeaders(b"host") == [b"web"]

        # Denied by the allow's method, then by the deny: 403, the backend
        # sees neither; the log says who, what, and which intention.
        code, _, body = await api.request(b"DELETE", b"/admin/users")
        assert code == 403
        assert body.startswith(b"Forbidden")
        line = await log_line(process, "denied DELETE /admin/users", "/svc/api")
        assert "at IPv4Address(type='TCP', host='127.0.0.1'" in line
        assert "permission 1 (deny)" in line
        code, _, _ = await api.request(b"GET", b"/private")
        assert code == 403
        await log_line(process, "denied GET /private", "/svc/api")
        assert [uri for _, uri, _ in app.seen] == [b"/public/x"]
        metrics = await _request("GET", status, "/metrics", "the metrics")
        text = await metrics.text()
        assert (
            'connect_native_requests_total{outcome="denied",service="web"} 2.0' in text
        )

        # No intention for billing: the default (allow, no ACLs) decides.
        code, _, body = await other.request(b"DELETE", b"/admin/users")
        assert (code, body) == (200, b"backend answered DELETE /admin/users")
        [xfcc] = app.seen[-1][2].getRawHeaders(b"x-forwarded-client-cert")
        assert xfcc.decode().endswith("/svc/billing")
    finally:
        await api.close()
        await other.close()
        process.stop()
        await backend.stopListening()


class UpgradingBackend(Protocol):
    """Answers an upgrade with 101, then echoes every byte."""

    def __init__(self, heads: list[bytes]) -> None:
        self.heads = heads
        self.buffered = b""
        self.upgraded = False

    def dataReceived(self, data: bytes) -> None:
        if self.upgraded:
            self.transport.write(data)  # type: ignore[union-attr]
            return
        self.buffered += data
        if b"\r\n\r\n" in self.buffered:
            head, _, rest = self.buffered.partition(b"\r\n\r\n")
            self.heads.append(head)
            self.upgraded = True
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: echo\r\n\r\n" + rest
            )


class Upgrader(Protocol):
    """Sends an upgrade request, then ``ping`` once switched; collects all."""

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.received = b""
        self.pinged = False
        self.echoed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(  # type: ignore[union-attr]
            b"GET " + self.path + b" HTTP/1.1\r\nHost: web\r\n"
            b"Connection: Upgrade\r\nUpgrade: echo\r\n\r\n"
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"101 Switching" in self.received and not self.pinged:
            self.pinged = True
            self.transport.write(b"ping over the upgraded stream")  # type: ignore[union-attr]
        if self.received.endswith(b"ping over the upgraded stream") or (
            b" 403 " in self.received and self.received.endswith(b"\n")
        ):
            if not self.echoed.called:
                self.echoed.callback(self.received)
            self.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_an_allowed_upgrade_becomes_a_byte_stream(
    agent_port: int, tmp_path: Path
) -> None:
    heads: list[bytes] = []
    backend: Any = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Factory.forProtocol(lambda: UpgradingBackend(heads)), interface="127.0.0.1"
    )
    [status] = free_ports(1)
    process = terminator(
        agent_port,
        backend.getHost().port,
        tmp_path,
        "--to-check",
        "none",
        "--status",
        f"tcp:{status}:interface=127.0.0.1",
    )
    api = Caller(agent_port, "api")
    try:
        await log_line(process, "accepting Connect", "proxying", seconds=60)
        await web_registered(agent_port)
        allowed = Upgrader(b"/public/socket")
        await bounded(connectProtocol(api.dial, allowed))
        got = await bounded(allowed.echoed)
        assert got.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert got.endswith(b"\r\n\r\nping over the upgraded stream")
        [head] = heads
        assert head.startswith(b"GET /public/socket HTTP/1.1\r\n")
        assert b"\r\nUpgrade: echo" in head
        assert b"/svc/api" in head  # X-Forwarded-Client-Cert

        denied = Upgrader(b"/private/socket")
        await bounded(connectProtocol(api.dial, denied))
        got = await bounded(denied.echoed)
        assert got.startswith(b"HTTP/1.1 403 ")
        assert len(heads) == 1

        # Both callers closed: the upgraded connection is not left open
        # (it was, until the drain aborted it at --shutdown-timeout).
        async def none_open() -> bool:
            answer = await _request("GET", status, "/status", "the status")
            state = await _bounded(answer.json(), 10, "the status body")
            return bool(state["open_connections"] == 0)

        await until(none_open, 20, "the upgraded connection closed")
    finally:
        await api.close()
        process.stop()
        await backend.stopListening()
    assert not [line for line in process.lines if "still open after" in line]
