"""
TCP_NODELAY and the read and write buffer size on every connection the
forwarder touches: in memory with a fake TCP transport that records
``setTcpNoDelay`` and has Twisted's ``bufferSize``, through TLS and the
connection tracker's wrapper, and once over real loopback sockets.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from connect_native.terminator.forward import (
    BUFFER_SIZE,
    ConnectionTracker,
    ForwardingFactory,
    TrackedEndpoint,
    set_no_delay,
)
from connect_native.testing import CertificateFactory, make_bundle
from connect_native.tls import ServerConnectionCreator

FRONT = IPv4Address("TCP", "127.0.0.1", 40000)
BACK = IPv4Address("TCP", "127.0.0.1", 8080)


@implementer(ITCPTransport)
class TCPTransport(StringTransport):
    """A TCP transport in memory that records ``setTcpNoDelay``."""

    bufferSize = 65536  # as Twisted's FileDescriptor

    def __init__(self) -> None:
        super().__init__()
        self.no_delay: list[bool] = []

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay.append(enabled)

    def getTcpNoDelay(self) -> bool:
        return bool(self.no_delay and self.no_delay[-1])


class ClosedTCPTransport(TCPTransport):
    """As a Twisted TCP connection after it is lost: no socket any more."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        raise AttributeError("'Client' object has no attribute 'socket'")


class Dialer:
    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.dialled: list[Any] = []

    def __call__(self, factory: Any) -> Deferred[Any]:
        protocol = factory.buildProtocol(BACK)
        protocol.makeConnection(self.transport)
        self.dialled.append(protocol)
        return Deferred()


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


def forwarding(dial: Any) -> ForwardingFactory:
    return ForwardingFactory(
        Clock(), dial, "the backend", connect_timeout=5, idle_timeout=60, label="t"
    )


def test_front_and_back_tcp_connections_get_no_delay() -> None:
    back = TCPTransport()
    front = TCPTransport()
    protocol = forwarding(Dialer(back)).buildProtocol(FRONT)
    protocol.makeConnection(front)
    assert front.no_delay == [True]
    assert back.no_delay == [True]


def test_front_and_back_tcp_connections_get_the_forwarders_buffer_size() -> None:
    back, front = TCPTransport(), TCPTransport()
    forwarding(Dialer(back)).buildProtocol(FRONT).makeConnection(front)
    assert (front.bufferSize, back.bufferSize) == (BUFFER_SIZE, BUFFER_SIZE)
    assert BUFFER_SIZE > TCPTransport.bufferSize

    back, front = TCPTransport(), TCPTransport()
    ForwardingFactory(
        Clock(),
        Dialer(back),
        "the backend",
        connect_timeout=5,
        idle_timeout=60,
        label="t",
        buffer_size=100_000,
    ).buildProtocol(FRONT).makeConnection(front)
    assert (front.bufferSize, back.bufferSize) == (100_000, 100_000)


@pytest.mark.parametrize("bad", [0, 4095, -1, 65536.0, True, "65536"])
def test_the_buffer_size_must_be_a_whole_number_of_at_least_4096(bad: Any) -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        ForwardingFactory(
            Clock(),
            Dialer(TCPTransport()),
            "b",
            connect_timeout=5,
            idle_timeout=60,
            label="t",
            buffer_size=bad,
        )


def tls_server(ca: CertificateFactory, wrapped: Any, clock: Clock) -> Any:
    """Twisted's TLS, server side, for ``web``, around ``wrapped``."""
    return TLSMemoryBIOFactory(
        ServerConnectionCreator(make_bundle(ca, "web")),
        isClient=False,
        wrappedFactory=wrapped,
        clock=clock,
    )


def test_the_tcp_connection_under_tls_gets_no_delay(ca: CertificateFactory) -> None:
    clock = Clock()
    clock.advance(time.time())
    back = TCPTransport()
    tls = tls_server(ca, forwarding(Dialer(back)), clock).buildProtocol(FRONT)
    tcp = TCPTransport()
    tls.makeConnection(tcp)
    # TLS declares the interfaces of what it wraps, but the socket is the
    # TCP connection's: that is the one set.
    assert tcp.no_delay == [True]
    assert back.no_delay == [True]
    assert tcp.bufferSize == BUFFER_SIZE


def test_a_dialled_tls_connection_gets_no_delay_on_its_tcp_connection(
    ca: CertificateFactory,
) -> None:
    clock = Clock()
    clock.advance(time.time())
    tcp = TCPTransport()
    # The back connection as the upstream dialler gives it: TLS over TCP.
    tls = tls_server(ca, Factory.forProtocol(Protocol), clock).buildProtocol(BACK)
    tls.makeConnection(tcp)

    class TLSDialer:
        def __call__(self, factory: Any) -> Deferred[Any]:
            protocol = factory.buildProtocol(BACK)
            protocol.makeConnection(tls)
            return Deferred()

    front = TCPTransport()
    forwarding(TLSDialer()).buildProtocol(FRONT).makeConnection(front)
    assert tcp.no_delay == [True]
    assert front.no_delay == [True]


def test_an_accepted_connection_gets_no_delay_before_its_protocol_starts() -> None:
    reactor_ = MemoryReactorClock()
    seen: list[list[bool]] = []

    class Watcher(Protocol):
        def connectionMade(self) -> None:
            transport: Any = self.transport
            seen.append(list(transport.transport.no_delay))

    TrackedEndpoint(
        TCP4ServerEndpoint(reactor_, 0), ConnectionTracker(Clock(), 10), "t"
    ).listen(Factory.forProtocol(Watcher))
    factory = reactor_.tcpServers[0][1]
    tcp = TCPTransport()
    factory.buildProtocol(FRONT).makeConnection(tcp)
    assert seen == [[True]]


def test_transports_without_tcp_are_left_alone() -> None:
    plain = StringTransport()
    assert set_no_delay(plain) is False
    assert set_no_delay(None) is False
    # ... and the forwarder still joins them.
    back = StringTransport()
    protocol = forwarding(Dialer(back)).buildProtocol(FRONT)
    protocol.makeConnection(plain)
    protocol.dataReceived(b"x")
    assert back.value() == b"x"


def test_a_connection_already_closed_is_not_an_error() -> None:
    assert set_no_delay(ClosedTCPTransport()) is False


@pytest_twisted.ensureDeferred
async def test_real_sockets_have_tcp_nodelay_set() -> None:
    class Echo(Protocol):
        def dataReceived(self, data: bytes) -> None:
            transport: Any = self.transport
            transport.write(data)

    class Client(Protocol):
        def __init__(self) -> None:
            self.answered: Deferred[bytes] = Deferred()

        def dataReceived(self, data: bytes) -> None:
            if not self.answered.called:
                self.answered.callback(data)

    backend = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Echo)
    )
    tracker = ConnectionTracker(reactor, 10)
    factory = ForwardingFactory(
        reactor,
        TCP4ClientEndpoint(reactor, "127.0.0.1", backend.getHost().port).connect,
        "echo",
        connect_timeout=5,
        idle_timeout=30,
        label="t",
    )
    front = await TrackedEndpoint(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), tracker, "t"
    ).listen(factory)
    client = Client()
    try:
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", front.getHost().port), client
        )
        transport: Any = client.transport
        transport.write(b"ping")
        answered = client.answered
        answered.addTimeout(10, reactor)
        assert await answered == b"ping"
        [tracked] = tracker.open
        accepted = tracked.transport.socket
        dialled = tracked.wrappedProtocol.back.socket
        for sock in (accepted, dialled):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert tracked.transport.bufferSize == BUFFER_SIZE
        assert tracked.wrappedProtocol.back.bufferSize == BUFFER_SIZE
        transport.loseConnection()
        if tracker.open:
            drained = tracker.drain(10)
            await drained
    finally:
        await front.stopListening()
        await backend.stopListening()
