"""
Helpers for the fault suite: an agent front that misbehaves on demand (in
memory, for ``StubTreq``), a TCP proxy that stalls (for a real agent), a
client that streams checksummed bytes through an echo server, and bounded
polling on the real reactor.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from connect_native.certs import Bundle, RootPEMs
from connect_native.consul.client import ConsulClient
from connect_native.testing import MemoryAgent

T = TypeVar("T")

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


# --- a misbehaving agent, in memory -------------------------------------------


class FaultyAgent(Resource):
    """
    In front of an agent's resource: passes requests on, or, for the paths
    that start with one of ``paths`` (all by default), does not answer
    (``hang``) or answers ``answer`` = (status, body) instead.  Records every
    request as (method, path).
    """

    isLeaf = True

    def __init__(self, target: Resource) -> None:
        super().__init__()
        self.target = target
        self.hang = False
        self.answer: tuple[int, bytes] | None = None
        self.paths: tuple[str, ...] = ()
        self.requests: list[tuple[str, str]] = []

    def misbehave(
        self,
        *,
        hang: bool = False,
        answer: tuple[int, bytes] | None = None,
        paths: Iterable[str] = (),
    ) -> None:
        self.hang, self.answer, self.paths = hang, answer, tuple(paths)

    def behave(self) -> None:
        self.misbehave()

    def render(self, request: Request) -> bytes | int:
        path = unquote(request.path.decode())
        self.requests.append((request.method.decode(), path))
        if not self.paths or path.startswith(self.paths):
            if self.hang:
                return NOT_DONE_YET
            if self.answer is not None:
                request.setResponseCode(self.answer[0])
                request.setHeader(b"content-type", b"application/json")
                return self.answer[1]
        result: bytes | int = self.target.render(request)
        return result


class MemoryWorld(MemoryAgent):
    """
    :class:`connect_native.testing.MemoryAgent` with a :class:`FaultyAgent`
    between the client and the development agent (``self.front``).
    """

    front: FaultyAgent

    def __init__(self) -> None:
        super().__init__(front=FaultyAgent, seed=7)

    def tls_factory(self) -> Any:
        [(_, factory, _, _)] = self.reactor.tcpServers
        return factory

    def connect(self, creator: Any, protocol: Protocol) -> Link | None:
        """
        A TLS client with ``creator`` running ``protocol``, joined with
        iosim to a connection accepted by the listening factory; ``None``
        when the server refused to build the connection at all.
        """
        server = self.tls_factory().buildProtocol(ADDRESS)
        if server is None:
            return None
        factory = Factory.forProtocol(lambda: protocol)
        client = TLSMemoryBIOFactory(
            creator, True, factory, clock=self.reactor
        ).buildProtocol(ADDRESS)
        pump = connect(
            server,
            FakeTransport(server, isServer=True),
            client,
            FakeTransport(client, isServer=False),
            clock=self.reactor,
        )
        return Link(server, client, pump)


class Link:
    """One in-memory connection: both TLS protocols and the pump between."""

    def __init__(
        self, server: TLSMemoryBIOProtocol, client: TLSMemoryBIOProtocol, pump: IOPump
    ) -> None:
        self.server = server
        self.client = client
        self.pump = pump

    def flush(self) -> None:
        self.pump.flush()

    def server_serial(self) -> int:
        """The serial of the certificate the server presented."""
        peer = self.client.getPeerCertificate()
        assert peer is not None, "no server certificate (handshake not done)"
        serial: int = peer.to_cryptography().serial_number
        return serial


@implementer(IOpenSSLClientConnectionCreator)
class ClockedClientCreator:
    """
    A client that presents ``cert_pem``/``key_pem`` and verifies the
    server's chain against ``roots`` at the time ``at`` (POSIX seconds)
    rather than the wall clock, so a test ``Clock`` decides what is valid.
    """

    def __init__(
        self, cert_pem: str, key_pem: str, roots: Iterable[str], at: float
    ) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        certificates = x509.load_pem_x509_certificates(cert_pem.encode())
        context.use_certificate(certificates[0])
        for extra in certificates[1:]:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        context.use_privatekey(
            serialization.load_pem_private_key(key_pem.encode(), None)  # type: ignore[arg-type]
        )
        store = context.get_cert_store()
        assert store is not None
        for pem in roots:
            for root in x509.load_pem_x509_certificates(pem.encode()):
                store.add_cert(crypto.X509.from_cryptography(root))
        store.set_time(datetime.datetime.fromtimestamp(at, datetime.timezone.utc))
        context.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: ok)
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> Any:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


# --- streams with checksums ----------------------------------------------------


def chunk(index: int, size: int) -> bytes:
    """Deterministic bytes for chunk ``index``: a reorder changes the digest."""
    seed = hashlib.sha256(index.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


class Echo(Protocol):
    """Echoes every byte, with backpressure; counts what it got."""

    def __init__(self, seen: list[Echo] | None = None) -> None:
        self.count = 0
        self.lost = False
        if seen is not None:
            seen.append(self)

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.registerProducer(transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = True


@implementer(IHandshakeListener)
class Stream(Protocol):
    """
    Sends numbered chunks (on ``send()``, or every ``interval`` seconds on
    ``clock`` once connected) through an echo server and digests both
    directions.  ``finish()`` stops sending and returns ``done``, which fires
    once everything sent has come back (the connection is then closed), or
    fails if the connection ended first (``lost`` says how).
    ``handshake_done`` is set when the TLS handshake completed.
    """

    def __init__(
        self,
        size: int = 32 * 1024,
        *,
        clock: Any = None,
        interval: float = 0.05,
    ) -> None:
        self.size = size
        self.clock = clock
        self.interval = interval
        self.index = 0
        self.sent = 0
        self.received = 0
        self.sent_digest = hashlib.sha256()
        self.received_digest = hashlib.sha256()
        self.connected = False
        self.handshake_done = False
        self.finishing = False
        self.lost: Failure | None = None
        self.closed = False
        self.done: Deferred[int] = Deferred()
        self._loop: task.LoopingCall | None = None

    def connectionMade(self) -> None:
        self.connected = True
        if self.clock is not None:
            self._loop = task.LoopingCall(self.send)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=True)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def send(self) -> None:
        if self.finishing or self.closed:
            return
        data = chunk(self.index, self.size)
        self.index += 1
        self.sent += len(data)
        self.sent_digest.update(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def finish(self) -> Deferred[int]:
        self.finishing = True
        self._stop_loop()
        if self.closed and not self.done.called:
            self._lost_early()
        self._check_done()
        return self.done

    def _lost_early(self) -> None:
        self.done.errback(
            AssertionError(
                f"the connection ended after {self.sent} bytes sent and "
                f"{self.received} received: {self.lost}"
            )
        )

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _check_done(self) -> None:
        if self.finishing and self.received >= self.sent and not self.done.called:
            intact = self.sent_digest.digest() == self.received_digest.digest()
            self.transport.loseConnection()  # type: ignore[union-attr]
            if intact and self.received == self.sent:
                self.done.callback(self.sent)
            else:
                self.done.errback(
                    AssertionError(
                        f"sent {self.sent} bytes, {self.received} came back, "
                        "and they differ"
                    )
                )

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.received_digest.update(data)
        self._check_done()

    @property
    def intact(self) -> bool:
        """Everything that came back so far is what was sent, in order."""
        digest = hashlib.sha256()
        remaining = self.received
        index = 0
        while remaining > 0:
            data = chunk(index, self.size)[:remaining]
            digest.update(data)
            remaining -= len(data)
            index += 1
        return digest.digest() == self.received_digest.digest()

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.closed = True
        self._stop_loop()
        if not self.done.called:
            self.lost = reason
            if self.finishing:
                self._lost_early()


# --- the real reactor ---------------------------------------------------------------


async def poll(
    reactor: Any,
    condition: Callable[[], T | None],
    seconds: float,
    what: str,
    interval: float = 0.05,
) -> T:
    """Ask ``condition`` until it answers (not None/False), for at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        answer = condition()
        if answer is not None and answer is not False:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds}s")
        await task.deferLater(reactor, interval, lambda: None)


async def client_bundle(client: ConsulClient, service: str, reactor: Any) -> Bundle:
    """A Bundle for ``service`` from the agent's leaf and roots, now."""
    leaf = (await client.leaf(service).addTimeout(20, reactor)).value
    roots = (await client.agent_ca_roots().addTimeout(20, reactor)).value
    return Bundle.build(
        leaf_cert_pem=leaf.cert_pem,
        private_key_pem=leaf.private_key_pem,
        roots=[
            RootPEMs(r.root_cert_pem, r.intermediate_certs_pem) for r in roots.roots
        ],
        trust_domain=roots.trust_domain,
        now=time.time(),
    )


class _Relay(Protocol):
    """One side of a proxied connection: what it reads goes to ``peer``."""

    def __init__(self, proxy: StallProxy) -> None:
        self.proxy = proxy
        self.peer: _Relay | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        self.proxy.relays.append(self)
        if self.proxy.stalled:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)

    def attach(self, peer: _Relay) -> None:
        self.peer = peer
        pending, self.pending = self.pending, []
        for data in pending:
            peer.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if self in self.proxy.relays:
            self.proxy.relays.remove(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _Outbound(_Relay):
    def __init__(self, proxy: StallProxy, inbound: _Relay) -> None:
        super().__init__(proxy)
        self.inbound = inbound

    def connectionMade(self) -> None:
        super().connectionMade()
        self.attach(self.inbound)
        self.inbound.attach(self)


class _Inbound(_Relay):
    def connectionMade(self) -> None:
        super().connectionMade()
        self.proxy.accepted += 1
        factory = ClientFactory.forProtocol(lambda: _Outbound(self.proxy, self))
        factory.clientConnectionFailed = (  # type: ignore[method-assign]
            lambda connector, reason: self.transport.loseConnection()  # type: ignore[union-attr]
        )
        self.proxy.reactor.connectTCP(
            self.proxy.host, self.proxy.port, factory, timeout=5
        )


class StallProxy:
    """
    A TCP proxy on 127.0.0.1 in front of ``host:port`` that can stall: while
    stalled, it reads nothing in either direction on any connection (old or
    new), as an overloaded agent would; ``resume()`` lets the bytes flow.
    """

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.stalled = False
        self.accepted = 0
        self.relays: list[_Relay] = []
        self.listening: Any = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _Inbound(self)), interface="127.0.0.1"
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listening.getHost().port}"

    def stall(self) -> None:
        self.stalled = True
        for relay in self.relays:
            relay.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.stalled = False
        for relay in list(self.relays):
            relay.transport.resumeProducing()  # type: ignore[union-attr]

    async def close(self) -> None:
        for relay in list(self.relays):
            relay.transport.abortConnection()  # type: ignore[union-attr]
        await self.listening.stopListening()
