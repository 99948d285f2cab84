"""
``twistd -n connect-native`` as a real process against a real Consul 1.8.7
agent, on 127.0.0.1.

One terminator process serves the module: ``--service <web> --listen
tcp:P:interface=127.0.0.1 --to tcp:127.0.0.1:B --consul http://127.0.0.1:C
--upstream <db>=tcp:U:interface=127.0.0.1``, with ``PYTHONPATH`` at the
source tree so twistd finds the plugin.  The backend (an echo server that
records what it got) and the Connect clients run in the test process.
Each refusal is checked to be our terminator's: its log says why.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native.certs import Bundle, RootPEMs
from connect_native.consul.client import ConsulClient
from connect_native.consul.records import ServiceRegistration
from connect_native.identity import ServiceIdentity
from connect_native.server import ConnectServerEndpoint, peer_identity
from connect_native.testing import CertificateFactory
from connect_native.tls import ClientConnectionCreator
from tests.consul_agent import RealConsulAgent, free_ports
from tests.processes import OutputProcess, child_environment
from tests.waiting import authorize_until

SOURCE_TREE = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def bounded(d: Deferred[T], seconds: float = 20.0) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


def twistd() -> str:
    candidate = Path(sys.executable).parent / "twistd"
    return str(candidate) if candidate.exists() else "twistd"


def reactor_args() -> list[str]:
    """``--reactor NAME`` when ``CONNECT_NATIVE_TEST_REACTOR`` names one."""
    name = os.environ.get("CONNECT_NATIVE_TEST_REACTOR")
    return ["--reactor", name] if name else []


class Process(OutputProcess):
    """A twistd process whose output lines are collected as they come."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        super().__init__(
            "twistd",
            [
                twistd(),
                "-n",
                "--pidfile=",
                *([] if "--reactor" in args else reactor_args()),
                *args,
            ],
            cwd,
            child_environment(
                ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE")
            ),
        )

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError("twistd did not stop on SIGTERM") from None
        finally:
            self.join_reader()


async def log_line(process: Process, *needles: str, seconds: float = 10.0) -> str:
    """
    The terminator's log line holding every needle: polled (the log reaches
    us through a pipe) on the reactor, with a deadline.
    """
    deadline = time.monotonic() + seconds
    while True:
        for line in list(process.lines):
            if all(needle in line for needle in needles):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the terminator never logged {needles!r}:\n{process.output()}"
            )
        pause: Deferred[None] = Deferred()
        reactor.callLater(0.02, pause.callback, None)  # type: ignore[attr-defined]
        await pause


# --- the backend ----------------------------------------------------------------


class Backend(Protocol):
    """Echoes every byte, with backpressure; records a digest of what it got."""

    def __init__(self, received: list[Any]) -> None:
        self.digest = hashlib.sha256()
        self.count = 0
        received.append(self)

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)
        self.transport.write(data)  # type: ignore[union-attr]


# --- Connect clients ---------------------------------------------------------------


async def client_bundle(client: ConsulClient, service: str) -> Bundle:
    leaf = (await bounded(client.leaf(service))).value
    roots = (await bounded(client.agent_ca_roots())).value
    return Bundle.build(
        leaf_cert_pem=leaf.cert_pem,
        private_key_pem=leaf.private_key_pem,
        roots=[
            RootPEMs(r.root_cert_pem, r.intermediate_certs_pem) for r in roots.roots
        ],
        trust_domain=roots.trust_domain,
        now=time.time(),
    )


def chunk(index: int, size: int) -> bytes:
    seed = hashlib.sha256(index.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


@implementer(IPullProducer)
class Sender:
    """Writes ``total`` bytes in chunks as the transport asks for them."""

    def __init__(self, transport: Any, total: int, size: int = 256 * 1024) -> None:
        self.transport = transport
        self.remaining = total
        self.size = size
        self.index = 0
        self.digest = hashlib.sha256()

    def resumeProducing(self) -> None:
        if self.remaining <= 0:
            return
        data = chunk(self.index, min(self.size, self.remaining))
        self.index += 1
        self.remaining -= len(data)
        self.digest.update(data)
        self.transport.write(data)
        if self.remaining <= 0:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.remaining = 0


class Caller(Protocol):
    """
    Sends ``message`` (or ``total`` generated bytes), reads until as many
    bytes came back, then closes; ``done`` fires with (digest sent, bytes or
    digest received).
    """

    def __init__(self, message: bytes = b"", total: int = 0) -> None:
        self.message = message
        self.total = total or len(message)
        self.received = b""
        self.count = 0
        self.digest = hashlib.sha256()
        self.sender: Sender | None = None
        self.done: Deferred[tuple[bytes, bytes]] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self.message:
            transport.write(self.message)
        else:
            self.sender = Sender(transport, self.total)
            transport.registerProducer(self.sender, False)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)
        if self.message:
            self.received += data
        if self.count >= self.total:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        sent = self.sender.digest.digest() if self.sender else self.message
        got = self.digest.digest() if self.sender else self.received
        self.done.callback((sent, got))


async def call(port: int, creator: ClientConnectionCreator, caller: Caller) -> Any:
    endpoint = wrapClientTLS(
        creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    )
    await bounded(connectProtocol(endpoint, caller))
    return await bounded(caller.done, 60)


def raw_tls_call(port: int, cert_dir: Path | None) -> bytes:
    """
    A stdlib TLS client (in a thread, every wait bounded) that presents the
    certificate in ``cert_dir``, or none; what it read before the end.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert_dir is not None:
        context.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"let me in")
                return tls.recv(1024)
        except (ssl.SSLError, ConnectionError):
            return b""


# --- the terminator ------------------------------------------------------------------


class Setup:
    def __init__(
        self,
        agent: RealConsulAgent,
        prefix: str,
        work: Path,
        extra: tuple[str, ...] = (),
        to_check: str | None = "none",
    ) -> None:
        # The backend's connections are counted: unless a test is about the
        # health check, its probes (a connection every few seconds) stay out.
        if to_check is not None:
            extra = ("--to-check", to_check, *extra)
        self.agent = agent
        self.web = f"{prefix}-web"
        self.db = f"{prefix}-db"
        self.received: list[Backend] = []
        self.backend_port: Any = reactor.listenTCP(  # type: ignore[attr-defined]
            0,
            Factory.forProtocol(lambda: Backend(self.received)),
            interface="127.0.0.1",
        )
        self.public, self.upstream = free_ports(2)
        self.process = Process(
            [
                "connect-native",
                "--service",
                self.web,
                "--listen",
                f"tcp:{self.public}:interface=127.0.0.1",
                "--to",
                f"tcp:127.0.0.1:{self.backend_port.getHost().port}",
                "--consul",
                f"http://{agent.http_address}",
                "--upstream",
                f"{self.db}=tcp:{self.upstream}:interface=127.0.0.1",
                *extra,
            ],
            work,
        )


@pytest.fixture(scope="module")
def setup(
    real_consul: RealConsulAgent, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    import uuid

    prefix = f"term-{uuid.uuid4().hex[:8]}"
    started = Setup(real_consul, prefix, tmp_path_factory.mktemp("twistd"))
    try:
        started.process.wait_for_line("accepting Connect", 60)
        started.process.wait_for_line("plaintext listener on", 10)
        yield started
    finally:
        code = started.process.stop()
        started.backend_port.stopListening()
    # twistd ends a SIGTERM'd run by re-raising the signal on itself.
    assert code in (0, -signal.SIGTERM), started.process.output()
    assert "connect-native " + started.web + ": stopped" in started.process.output()


@pytest.fixture
def consul(real_consul: RealConsulAgent) -> Iterator[ConsulClient]:
    client = ConsulClient(reactor, address=real_consul.http_address)
    return client


def web_identity(bundle: Bundle, web: str) -> ServiceIdentity:
    return ServiceIdentity(
        trust_domain=bundle.identity.trust_domain,
        namespace="default",
        datacenter=bundle.identity.datacenter,
        service=web,
    )


@pytest_twisted.ensureDeferred
async def test_an_api_client_reaches_the_backend_byte_for_byte(
    setup: Setup, consul: ConsulClient
) -> None:
    api = f"{setup.web}-api"
    bundle = await client_bundle(consul, api)
    creator = ClientConnectionCreator(bundle, web_identity(bundle, setup.web))
    message = bytes(range(256)) * 4 + b"\r\n\x00end"
    before = len(setup.received)
    sent, got = await call(setup.public, creator, Caller(message))
    assert got == sent == message
    backend = setup.received[before]
    assert backend.digest.digest() == hashlib.sha256(message).digest()
    await log_line(setup.process, "allowed", bundle.identity.uri)
    await consul.close()


@pytest_twisted.ensureDeferred
async def test_fifty_mebibytes_go_through_unchanged_both_ways(
    setup: Setup, consul: ConsulClient
) -> None:
    api = f"{setup.web}-bulk"
    bundle = await client_bundle(consul, api)
    creator = ClientConnectionCreator(bundle, web_identity(bundle, setup.web))
    total = 50 * 1024 * 1024
    before = len(setup.received)
    sent, got = await call(setup.public, creator, Caller(total=total))
    backend = setup.received[before]
    assert backend.count == total
    assert backend.digest.digest() == sent
    assert got == sent
    await consul.close()


@pytest_twisted.ensureDeferred
async def test_a_self_signed_client_is_refused_by_the_terminator(
    setup: Setup, tmp_path: Path
) -> None:
    api = f"{setup.web}-selfsigned"
    leaf = CertificateFactory().self_signed(api)
    (tmp_path / "cert.pem").write_text(leaf.cert_pem)
    (tmp_path / "key.pem").write_text(leaf.key_pem)
    before = len(setup.received)
    assert await bounded(deferToThread(raw_tls_call, setup.public, tmp_path)) == b""
    assert len(setup.received) == before
    line = await log_line(setup.process, "refused the peer's certificate")
    assert "does not verify" in line


@pytest_twisted.ensureDeferred
async def test_a_client_without_a_certificate_is_refused(setup: Setup) -> None:
    before = len(setup.received)
    assert await bounded(deferToThread(raw_tls_call, setup.public, None)) == b""
    assert len(setup.received) == before
    line = await log_line(setup.process, "the TLS handshake failed")
    assert "did not return a certificate" in line


@pytest_twisted.ensureDeferred
async def test_an_api_client_is_refused_after_a_deny_intention(
    setup: Setup, consul: ConsulClient
) -> None:
    api = f"{setup.web}-denied"
    intention = await bounded(consul.create_intention(api, setup.web, "deny"))
    try:
        bundle = await client_bundle(consul, api)
        await authorize_until(consul, setup.web, bundle.identity.uri, False)
        creator = ClientConnectionCreator(bundle, web_identity(bundle, setup.web))
        before = len(setup.received)
        _sent, got = await call(setup.public, creator, Caller(b"hello?"))
        assert got == b""
        assert len(setup.received) == before
        line = await log_line(setup.process, "denied", bundle.identity.uri)
        assert "intention" in line.lower()
    finally:
        await bounded(consul.delete_intention(intention))
        await consul.close()


async def three_mebibytes_through(started: Setup, consul: ConsulClient) -> Bundle:
    """
    An allowed client (``<web>-api``) sends and gets back 3 MiB through the
    terminator ``started``, unchanged: its first backend connection saw them
    all.  Returns the client's bundle.
    """
    bundle = await client_bundle(consul, f"{started.web}-api")
    creator = ClientConnectionCreator(bundle, web_identity(bundle, started.web))
    total = 3 * 1024 * 1024
    sent, got = await call(started.public, creator, Caller(total=total))
    assert got == sent
    assert started.received[0].count == total
    assert started.received[0].digest.digest() == sent
    return bundle


@pytest_twisted.ensureDeferred
async def test_intentions_quiet_logs_and_large_reads_against_the_real_agent(
    real_consul: RealConsulAgent, consul: ConsulClient, tmp_path: Path
) -> None:
    """
    ``--authorize intentions --no-log-allowed --buffer-size 1048576`` (and
    the default ``--log-level info``): an allowed client gets its bytes
    through unchanged with no line logged for it, a denied one is refused
    and logged, and none of the library's debug events (one per blocking
    query round) reach twistd's log.
    """
    import uuid

    web = f"quiet-{uuid.uuid4().hex[:8]}-web"
    denied = f"{web}-denied"
    # Before the terminator starts: its first intentions read has it.
    intention = await bounded(consul.create_intention(denied, web, "deny"))
    started = Setup(
        real_consul,
        web.removesuffix("-web"),
        tmp_path,
        (
            "--authorize",
            "intentions",
            "--no-log-allowed",
            "--buffer-size",
            "1048576",
        ),
    )
    try:
        await bounded(deferToThread(started.process.wait_for_line, "accepting", 60))
        bundle = await three_mebibytes_through(started, consul)

        refused = await client_bundle(consul, denied)
        creator = ClientConnectionCreator(refused, web_identity(refused, started.web))
        _sent, got = await call(started.public, creator, Caller(b"hello?"))
        assert got == b""
        await log_line(started.process, "denied", refused.identity.uri)
        output = started.process.output()
        assert f"allowed {bundle.identity.uri}" not in output
        assert "#debug]" not in output
    finally:
        await bounded(consul.delete_intention(intention))
        code = started.process.stop()
        started.backend_port.stopListening()
        await consul.close()
    assert code in (0, -signal.SIGTERM), started.process.output()


@pytest_twisted.ensureDeferred
async def test_twisteds_tls_transport_against_the_real_agent(
    real_consul: RealConsulAgent, consul: ConsulClient, tmp_path: Path
) -> None:
    """
    ``--tls-transport twisted``: the same terminator over Twisted's
    TLSMemoryBIOProtocol (the module's other tests run over connect_native's
    own, the default): an allowed client's 3 MiB go through unchanged both
    ways and are logged, a client without a certificate is refused with the
    reason logged.
    """
    import uuid

    prefix = f"ttls-{uuid.uuid4().hex[:8]}"
    started = Setup(real_consul, prefix, tmp_path, ("--tls-transport", "twisted"))
    try:
        await bounded(deferToThread(started.process.wait_for_line, "accepting", 60))
        bundle = await three_mebibytes_through(started, consul)
        await log_line(started.process, "allowed", bundle.identity.uri)

        got = await bounded(deferToThread(raw_tls_call, started.public, None))
        assert got == b""
        line = await log_line(started.process, "the TLS handshake failed")
        assert "did not return a certificate" in line
        assert len(started.received) == 1
    finally:
        code = started.process.stop()
        started.backend_port.stopListening()
        await consul.close()
    assert code in (0, -signal.SIGTERM), started.process.output()


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        peer = peer_identity(self.transport).service.encode()
        self.transport.write(peer + b" says: " + data)  # type: ignore[union-attr]


class Plain(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.done.callback(self.received)


@pytest_twisted.ensureDeferred
async def test_an_upstream_carries_a_plaintext_client_to_a_connect_native_server(
    setup: Setup, consul: ConsulClient
) -> None:
    endpoint = ConnectServerEndpoint.for_service(
        reactor,
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        consul,
        setup.db,
        ready_timeout=30,
    )
    port: Any = await bounded(endpoint.listen(Factory.forProtocol(Echo)), 40)
    service_id = f"{setup.db}-1"
    try:
        await bounded(
            consul.register_service(
                ServiceRegistration(
                    name=setup.db,
                    id=service_id,
                    port=port.getHost().port,
                    address="127.0.0.1",
                )
            )
        )
        caller = Plain()
        await bounded(
            connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", setup.upstream, timeout=10),
                caller,
            )
        )
        # The db server saw the terminator's own service as its peer.
        assert await bounded(caller.done) == setup.web.encode() + b" says: ping"
    finally:
        await bounded(consul.deregister_service(service_id))
        await port.stopListening()
        await consul.close()
