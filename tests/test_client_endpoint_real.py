"""
ConnectClientEndpoint against a real Consul 1.8.7 agent, on the real reactor
with real sockets on 127.0.0.1: certificates from the agent's CA, instances
from its health API, servers made with ConnectServerEndpoint, and one
independent server made with the standard library's ``ssl`` module in
another process.  Service names come from ``unique_name``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native.client import (
    ConnectClientEndpoint,
    HandshakeTimeout,
    IdentityMismatch,
)
from connect_native.consul.client import ConsulClient
from connect_native.consul.records import ServiceRegistration
from connect_native.resolve import Instance, IResolver
from connect_native.server import ConnectServerEndpoint, peer_identity
from tests.consul_agent import RealConsulAgent, free_ports

T = TypeVar("T")


def bounded(d: Deferred[T], seconds: float = 30.0) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


class Echo(Protocol):
    """Answers each message with the caller's service name."""

    def dataReceived(self, data: bytes) -> None:
        peer = peer_identity(self.transport).service.encode()
        self.transport.write(peer + b": " + data)  # type: ignore[union-attr]


class Caller(Protocol):
    """Says ``ping`` as soon as it is connected; ``answer`` gets the reply."""

    def __init__(self) -> None:
        self.answer: Deferred[bytes] = Deferred()
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(b"ping\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if not self.answer.called:
            self.answer.callback(self.buffer)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if not self.answer.called:
            self.answer.callback(self.buffer)


class Silent(Protocol):
    """Accepts TCP, never says anything (a stuck or non-TLS server)."""


@pytest_twisted.async_yield_fixture
async def consul(real_consul: RealConsulAgent) -> AsyncIterator[ConsulClient]:
    client = ConsulClient(reactor, address=real_consul.http_address)
    yield client
    await client.close()


@pytest.fixture
def attempts() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if "attempt" in event and "target" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


class Stack:
    """The servers and registrations a test made, undone at its end."""

    def __init__(self, consul: ConsulClient) -> None:
        self.consul = consul
        self.ports: list[Any] = []
        self.registered: list[str] = []
        self.endpoints: list[ConnectClientEndpoint] = []

    async def serve(self, cert_service: str, factory: Factory) -> int:
        endpoint = ConnectServerEndpoint.for_service(
            reactor,
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            self.consul,
            cert_service,
            ready_timeout=30,
        )
        port = await bounded(endpoint.listen(factory))
        self.ports.append(port)
        return int(port.getHost().port)

    async def serve_plain(self, factory: Factory) -> int:
        port = await bounded(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        )
        self.ports.append(port)
        return int(port.getHost().port)

    async def register(self, name: str, instance_id: str, port: int) -> None:
        await bounded(
            self.consul.register_service(
                ServiceRegistration(
                    name=name, id=instance_id, port=port, address="127.0.0.1"
                )
            )
        )
        self.registered.append(instance_id)

    def client(self, service: str, our_service: str, **kwargs: Any) -> Any:
        endpoint = ConnectClientEndpoint.for_service(
            reactor, service, our_service=our_service, consul=self.consul, **kwargs
        )
        self.endpoints.append(endpoint)
        return endpoint

    async def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()
        for instance_id in self.registered:
            await bounded(self.consul.deregister_service(instance_id))
        for port in self.ports:
            await port.stopListening()


@pytest_twisted.async_yield_fixture
async def stack(consul: ConsulClient) -> AsyncIterator[Stack]:
    s = Stack(consul)
    yield s
    await s.close()


async def ping(endpoint: Any) -> bytes:
    caller = Caller()
    await bounded(connectProtocol(endpoint, caller))
    answer = await bounded(caller.answer)
    caller.transport.loseConnection()  # type: ignore[union-attr]
    return answer


@pytest_twisted.ensureDeferred
async def test_a_client_for_db_reaches_the_connect_native_db(
    stack: Stack, unique_name: str
) -> None:
    db, web = f"{unique_name}-db", f"{unique_name}-web"
    port = await stack.serve(db, Factory.forProtocol(Echo))
    await stack.register(db, f"{db}-1", port)
    endpoint = stack.client(db, web)
    # The server saw our identity, verified in its handshake.
    assert await ping(endpoint) == web.encode() + b": ping\n"


@pytest_twisted.ensureDeferred
async def test_a_server_with_another_services_certificate_is_refused(
    stack: Stack, unique_name: str, consul: ConsulClient
) -> None:
    db, cache, web = f"{unique_name}-db", f"{unique_name}-cache", f"{unique_name}-web"
    port = await stack.serve(cache, Factory.forProtocol(Echo))
    await stack.register(db, f"{db}-1", port)
    endpoint = stack.client(db, web)
    with pytest.raises(IdentityMismatch) as info:
        await ping(endpoint)
    trust_domain = (await bounded(consul.agent_ca_roots())).value.trust_domain
    got = f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{cache}"
    wanted = f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{db}"
    assert (info.value.got, info.value.wanted) == (got, wanted)
    assert got in str(info.value)
    assert wanted in str(info.value)


@implementer(IResolver)
class DownFirst:
    """The Consul resolver's instances, the one on ``down_port`` first."""

    def __init__(self, inner: IResolver, down_port: int) -> None:
        self.inner = inner
        self.down_port = down_port
        self.description = inner.description

    def resolve(self) -> Deferred[Sequence[Instance]]:
        return self.inner.resolve().addCallback(
            lambda found: sorted(found, key=lambda i: i.port != self.down_port)
        )


class InOrder:
    def randrange(self, n: int) -> int:
        return 0


@pytest_twisted.ensureDeferred
async def test_with_one_of_two_instances_down_the_other_answers(
    stack: Stack, unique_name: str, attempts: list[LogEvent]
) -> None:
    db, web = f"{unique_name}-db", f"{unique_name}-web"
    port = await stack.serve(db, Factory.forProtocol(Echo))
    (down,) = free_ports(1)
    await stack.register(db, f"{db}-up", port)
    await stack.register(db, f"{db}-down", down)
    endpoint = stack.client(db, web, rng=InOrder())
    endpoint.resolver = DownFirst(endpoint.resolver, down)
    assert await ping(endpoint) == web.encode() + b": ping\n"
    (refused,) = attempts
    assert f"127.0.0.1:{down}" in refused["attempt"]
    assert "connection refused" in refused["attempt"]


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_handshakes_is_bounded_by_the_deadline(
    stack: Stack, unique_name: str
) -> None:
    db, web = f"{unique_name}-db", f"{unique_name}-web"
    port = await stack.serve_plain(Factory.forProtocol(Silent))
    await stack.register(db, f"{db}-1", port)
    endpoint = stack.client(db, web, timeout=1.5)
    # Certificate and resolution first, so that the deadline is the
    # handshake's.
    await bounded(endpoint._source.when_ready())
    await bounded(endpoint.resolver.resolve())
    started = time.monotonic()
    with pytest.raises(HandshakeTimeout) as info:
        await ping(endpoint)
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 5
    assert f"127.0.0.1:{port}" in str(info.value)


# --- an independent server: the standard library's ssl, in another process ---

SSL_SERVER = textwrap.dedent(
    """
    import json, socket, ssl, sys

    cert, key, roots = sys.argv[1:4]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(roots)
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)
    print(listener.getsockname()[1], flush=True)
    connection, _ = listener.accept()
    connection.settimeout(30)
    with context.wrap_socket(connection, server_side=True) as tls:
        request = tls.recv(100)
        sans = tls.getpeercert().get("subjectAltName", ())
        uris = [value for kind, value in sans if kind == "URI"]
        tls.sendall(json.dumps({"request": request.decode(), "uris": uris}).encode())
    """
)


@pytest.fixture
def ssl_server(
    real_consul: RealConsulAgent, unique_name: str, tmp_path: Path
) -> Iterator[tuple[str, int]]:
    """
    A server using Python's ssl module with the agent's leaf for ``<name>-db``,
    requiring a client certificate from the agent's roots; it answers the
    first request with the client's URI SANs.
    """
    db = f"{unique_name}-db"
    status, body = real_consul.request("GET", f"/v1/agent/connect/ca/leaf/{db}")
    assert status == 200, body
    leaf = json.loads(body)
    status, body = real_consul.request("GET", "/v1/agent/connect/ca/roots")
    assert status == 200, body
    roots = json.loads(body)
    (tmp_path / "cert.pem").write_text(leaf["CertPEM"])
    (tmp_path / "key.pem").write_text(leaf["PrivateKeyPEM"])
    (tmp_path / "roots.pem").write_text("".join(r["RootCert"] for r in roots["Roots"]))
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SSL_SERVER,
            str(tmp_path / "cert.pem"),
            str(tmp_path / "key.pem"),
            str(tmp_path / "roots.pem"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield db, port
    finally:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest_twisted.ensureDeferred
async def test_an_independent_stdlib_ssl_server_sees_our_identity(
    stack: Stack, unique_name: str, ssl_server: tuple[str, int], consul: ConsulClient
) -> None:
    db, port = ssl_server
    web = f"{unique_name}-web"
    await stack.register(db, f"{db}-py", port)
    answer = json.loads(await ping(stack.client(db, web)))
    trust_domain = (await bounded(consul.agent_ca_roots())).value.trust_domain
    assert answer == {
        "request": "ping\n",
        "uris": [f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{web}"],
    }
