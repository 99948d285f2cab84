"""
connect_native's own TLS server transport (``TLSServerProtocol``), in memory:
a Connect client on Twisted's TLS talks to it over iosim.  What the gate does
over it (authorization, refusals, timeouts, early bytes, peer identity) is
``tests/test_server.py``, which runs over both transports; this module is
what the transport itself promises.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from attrs import define
from OpenSSL import SSL
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from connect_native.terminator import _tls
from connect_native.terminator._tls import (
    WRITE_NOW_MAX,
    TLSServerProtocol,
    close_now,
    write_now,
)
from connect_native.terminator.forward import (
    ConnectionTracker,
    ForwardingFactory,
    _TrackingFactory,
)
from connect_native.testing import CertificateFactory
from connect_native.tls import ClientConnectionCreator, ServerConnectionCreator
from connect_native.tls import peer_identity as peer_identity_or_none
from tests.test_server import ADDRESS, Client, ClientFactory, bundle, identity


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


@implementer(IHandshakeListener)
class App(Protocol):
    """The server's application: records what happens to it."""

    def __init__(self, hello: bytes = b"") -> None:
        self.hello = hello
        self.received: list[bytes] = []
        self.handshakes = 0
        self.lost: Failure | None = None
        self.abort_on_data = False

    def connectionMade(self) -> None:
        if self.hello:
            self.transport.write(self.hello)  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        if self.abort_on_data:
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = reason


@implementer(IPushProducer)
class NullProducer:
    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


class CountingTransport(FakeTransport):
    """An iosim transport that counts writes and remembers Nagle's setting."""

    writes = 0
    no_delay: bool | None = None

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled
        self.no_delay_calls = getattr(self, "no_delay_calls", 0) + 1


@define
class Pair:
    server: TLSServerProtocol
    server_transport: CountingTransport
    client: TLSMemoryBIOProtocol
    client_app: Client
    pump: IOPump
    reactor: MemoryReactorClock

    def sent_by_server(self) -> bytes:
        return b"".join(self.server_transport.stream)


def pair(
    ca: CertificateFactory,
    app: Protocol,
    early: list[bytes] | None = None,
    client_ca: CertificateFactory | None = None,
) -> Pair:
    """
    Our server over iosim with a Connect client for ``web``, whose ``api``
    leaf ``client_ca`` signed (``ca`` by default); the client trusts ``ca``.
    """
    reactor = MemoryReactorClock()
    creator = ServerConnectionCreator(bundle(ca, ca.leaf("web")))
    server = TLSServerProtocol(creator.serverConnectionForTLS, app)
    issuer = ca if client_ca is None else client_ca
    client_creator = ClientConnectionCreator(
        bundle(issuer, issuer.leaf("api"), ca), identity(ca, "web")
    )
    client_apps = ClientFactory(early or [])
    client_factory = TLSMemoryBIOFactory(
        client_creator, True, client_apps, clock=reactor
    )
    # Each client write its own record (Twisted's default joins small ones).
    client_factory.protocol = TLSMemoryBIOProtocol
    client = client_factory.buildProtocol(ADDRESS)
    server_transport = CountingTransport(server, isServer=True)
    pump = connect(
        server,
        server_transport,
        client,
        FakeTransport(client, isServer=False),
        clock=reactor,
    )
    return Pair(server, server_transport, client, client_apps.built[0], pump, reactor)


def test_the_application_gets_the_handshake_and_the_peers_identity(
    ca: CertificateFactory,
) -> None:
    app = App()
    p = pair(ca, app, [b"hello"])
    assert app.handshakes == 1
    assert b"".join(app.received) == b"hello"
    assert peer_identity_or_none(app.transport) == identity(ca, "api")
    assert app.transport is p.server
    assert p.server.getHandle() is not None
    assert p.server.negotiatedProtocol is None  # no ALPN offered


def test_nagle_is_turned_off_when_the_connection_is_accepted(
    ca: CertificateFactory,
) -> None:
    p = pair(ca, App())
    assert p.server_transport.no_delay is True


def test_a_large_write_arrives_whole_and_in_order_as_one_tcp_write(
    ca: CertificateFactory,
) -> None:
    app = App()
    p = pair(ca, app)
    data = bytes(range(256)) * 4100 + b"end"  # 1 MiB and change: 65 records
    before = p.server_transport.writes
    app.transport.write(data)  # type: ignore[union-attr]
    assert p.server_transport.writes - before == 1
    p.pump.flush()
    assert p.client_app.received == data


def test_many_writes_keep_their_order_and_content(ca: CertificateFactory) -> None:
    app = App()
    p = pair(ca, app)
    chunks = [bytes([i]) * (i * 997 % 70000 + 1) for i in range(40)]
    for chunk in chunks[:20]:
        app.transport.write(chunk)  # type: ignore[union-attr]
    app.transport.writeSequence(chunks[20:])  # type: ignore[union-attr]
    p.pump.flush()
    assert p.client_app.received == b"".join(chunks)


def test_writes_before_the_handshake_go_out_after_it(ca: CertificateFactory) -> None:
    app = App(hello=b"welcome")
    p = pair(ca, app)
    assert p.client_app.handshake_done
    assert p.client_app.received == b"welcome"


def test_a_producer_is_registered_on_the_tcp_transport(ca: CertificateFactory) -> None:
    app = App()
    p = pair(ca, app)

    producer = NullProducer()
    app.transport.registerProducer(producer, True)  # type: ignore[union-attr]
    assert p.server_transport.producer is producer
    app.transport.unregisterProducer()  # type: ignore[union-attr]
    assert p.server_transport.producer is None


def test_pausing_the_transport_pauses_the_tcp_connection(
    ca: CertificateFactory,
) -> None:
    app = App()
    p = pair(ca, app)
    paused: list[str] = []
    p.server_transport.pauseProducing = lambda: paused.append("pause")  # type: ignore[method-assign]
    p.server_transport.resumeProducing = lambda: paused.append("resume")  # type: ignore[method-assign]
    app.transport.pauseProducing()  # type: ignore[union-attr]
    app.transport.resumeProducing()  # type: ignore[union-attr]
    assert paused == ["pause", "resume"]


def test_lose_connection_sends_close_notify_and_delivers_until_the_peers(
    ca: CertificateFactory,
) -> None:
    app = App()
    p = pair(ca, app)
    app.transport.loseConnection()  # type: ignore[union-attr]
    # Still open for reading: the client's bytes in flight arrive.
    p.client.write(b"late")
    assert not p.server_transport.disconnecting
    p.pump.flush()
    assert b"".join(app.received) == b"late"
    assert p.server_transport.disconnecting
    assert app.lost is not None
    assert app.lost.check(ConnectionDone)
    assert p.client_app.lost is not None
    assert p.client_app.lost.check(ConnectionDone)


def test_writes_after_lose_connection_are_dropped(ca: CertificateFactory) -> None:
    app = App()
    p = pair(ca, app)
    app.transport.write(b"first")  # type: ignore[union-attr]
    app.transport.loseConnection()  # type: ignore[union-attr]
    app.transport.write(b"late")  # type: ignore[union-attr]
    p.pump.flush()
    assert p.client_app.received == b"first"


def test_with_a_producer_the_close_waits_for_it_to_unregister(
    ca: CertificateFactory,
) -> None:
    app = App()
    p = pair(ca, app)

    app.transport.registerProducer(NullProducer(), True)  # type: ignore[union-attr]
    app.transport.loseConnection()  # type: ignore[union-attr]
    app.transport.write(b"more")  # type: ignore[union-attr]
    p.pump.flush()
    assert p.client_app.received == b"more"
    assert p.client_app.lost is None  # no close_notify yet
    app.transport.unregisterProducer()  # type: ignore[union-attr]
    p.pump.flush()
    assert p.client_app.lost is not None
    assert p.client_app.lost.check(ConnectionDone)
    assert app.lost is not None
    assert app.lost.check(ConnectionDone)


def test_the_peers_close_notify_ends_the_connection_cleanly(
    ca: CertificateFactory,
) -> None:
    app = App()
    p = pair(ca, app)
    p.client.loseConnection()
    p.pump.flush()
    assert app.lost is not None
    assert app.lost.check(ConnectionDone)
    assert p.server_transport.disconnecting
    # Our close_notify answered the client's: a clean end on its side too.
    assert p.client_app.lost is not None
    assert p.client_app.lost.check(ConnectionDone)


@implementer(IHalfCloseableProtocol)
class HalfClosingApp(App):
    read_closed = False

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass


def test_the_peers_close_notify_half_closes_a_half_closeable_application(
    ca: CertificateFactory,
) -> None:
    app = HalfClosingApp()
    p = pair(ca, app)
    p.client.write(b"request")
    p.client.loseConnection()  # close_notify after the request
    p.pump.flush()
    assert b"".join(app.received) == b"request"
    assert app.read_closed
    assert app.lost is None
    # The reply still goes out, whole, after the peer's close_notify.
    reply = bytes(range(256)) * 4096
    app.transport.write(reply)  # type: ignore[union-attr]
    p.pump.flush()
    assert p.client_app.received == reply
    app.transport.loseConnection()  # type: ignore[union-attr]
    p.pump.flush()
    assert app.lost is not None
    assert app.lost.check(ConnectionDone)
    assert p.client_app.lost is not None
    assert p.client_app.lost.check(ConnectionDone)


def test_a_tcp_fin_after_close_notify_leaves_the_write_side_open(
    ca: CertificateFactory,
) -> None:
    app = HalfClosingApp()
    p = pair(ca, app)
    p.client.loseConnection()
    p.pump.flush()
    assert app.read_closed
    # A peer that also shuts its TCP write side (SHUT_WR) after close_notify.
    p.server.readConnectionLost()
    assert not p.server_transport.disconnecting
    app.transport.write(b"reply")  # type: ignore[union-attr]
    p.pump.flush()
    assert p.client_app.received == b"reply"


def test_a_tcp_fin_without_close_notify_ends_a_half_closeable_application(
    ca: CertificateFactory,
) -> None:
    app = HalfClosingApp()
    p = pair(ca, app)
    p.server.readConnectionLost()  # a FIN, no close_notify: truncated
    p.pump.flush()
    assert not app.read_closed
    assert app.lost is not None
    assert app.lost.check(ConnectionLost)


def test_lose_write_connection_is_close_notify(ca: CertificateFactory) -> None:
    app = App()
    p = pair(ca, app)
    app.transport.write(b"all of it")  # type: ignore[union-attr]
    app.transport.loseWriteConnection()  # type: ignore[union-attr]
    p.client.write(b"late")
    p.pump.flush()
    assert p.client_app.received == b"all of it"
    assert b"".join(app.received) == b"late"


def test_a_tcp_end_without_close_notify_is_reported_as_connection_lost(
    ca: CertificateFactory,
) -> None:
    app = App()
    p = pair(ca, app)
    p.client.transport.loseConnection()  # TCP only: no close_notify
    p.pump.flush()
    assert app.lost is not None
    assert app.lost.check(ConnectionLost)
    assert "close_notify" in app.lost.getErrorMessage()


def test_an_abort_drops_what_is_still_unread(ca: CertificateFactory) -> None:
    app = App()
    app.abort_on_data = True
    p = pair(ca, app)
    # Two records in one read: the second arrives after the abort.
    p.client.write(b"one")
    p.client.write(b"two")
    p.pump.flush()
    assert app.received == [b"one"]
    assert p.server_transport.disconnecting


def test_a_corrupt_record_ends_the_connection_with_the_tls_error(
    ca: CertificateFactory,
) -> None:
    app = App()
    p = pair(ca, app)
    before = p.server_transport.writes
    # An application-data record whose authentication cannot succeed.
    p.server.dataReceived(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    assert app.lost is None  # until the TCP connection has gone
    assert p.server_transport.disconnecting
    assert p.server_transport.writes > before  # OpenSSL's alert
    p.server.connectionLost(Failure(ConnectionDone()))
    assert app.lost is not None
    assert app.lost.check(SSL.Error)
    # Nothing more is read or written once TLS has failed.
    p.server.dataReceived(b"\x17\x03\x03\x00\x05hello")
    app.transport.write(b"after")  # type: ignore[union-attr]
    assert app.received == []


def test_a_failed_handshake_is_the_applications_reason(
    ca: CertificateFactory,
) -> None:
    app = App()
    # A client whose certificate the server's roots did not sign.
    p = pair(ca, app, client_ca=CertificateFactory())
    p.pump.flush()
    assert app.handshakes == 0
    assert app.lost is not None
    assert app.lost.check(SSL.Error)
    assert peer_identity_or_none(p.server) is None


def test_the_tracker_counts_it_without_a_wrapper_and_drain_aborts_it(
    ca: CertificateFactory,
) -> None:
    reactor = MemoryReactorClock()
    tracker = ConnectionTracker(reactor, max_connections=10)
    creator = ServerConnectionCreator(bundle(ca, ca.leaf("web")))

    class Builds(Factory):
        def buildProtocol(self, addr: Any) -> TLSServerProtocol:
            return TLSServerProtocol(creator.serverConnectionForTLS, App())

    tracking = _TrackingFactory(Builds(), tracker, "test")
    server = tracking.buildProtocol(ADDRESS)
    assert isinstance(server, TLSServerProtocol)
    transport = CountingTransport(server, isServer=True)
    server.makeConnection(transport)
    assert len(tracker) == 1
    assert transport.no_delay is True

    draining = tracker.drain(5)
    reactor.advance(5)
    assert draining.result == 1
    assert transport.disconnecting  # aborted by the drain's deadline
    server.connectionLost(Failure(ConnectionDone()))
    assert len(tracker) == 0


# --- write_now: a write that goes out within the call -------------------------


class Socketless(FileDescriptor):
    """A FileDescriptor whose socket is a list; ``takes`` bytes per send."""

    def __init__(self, takes: int | None = None, fails: bool = False) -> None:
        super().__init__(MemoryReactorClock())
        self.connected = 1
        self.takes = takes
        self.fails = fails
        self.sent: list[bytes] = []

    def startWriting(self) -> None:
        self.watching = True

    def stopWriting(self) -> None:
        self.watching = False

    def writeSomeData(self, data: bytes) -> int | Exception:  # type: ignore[override]
        if self.fails:
            return ConnectionLost("gone")
        taken = bytes(data[: self.takes])
        self.sent.append(taken)
        return len(taken)

    def queued(self) -> bytes:
        return bytes(self.dataBuffer) + b"".join(self._tempDataBuffer)


def test_write_now_sends_within_the_call_when_nothing_is_queued() -> None:
    fd = Socketless()
    write_now(fd, b"ping")
    assert fd.sent == [b"ping"]
    assert fd.queued() == b""
    assert not getattr(fd, "watching", False)  # the reactor was not asked


def test_write_now_queues_what_the_socket_did_not_take() -> None:
    fd = Socketless(takes=3)
    write_now(fd, b"abcdef")
    assert fd.sent == [b"abc"]
    assert fd.queued() == b"def"
    # Now something is queued: the next write goes behind it, not past it.
    write_now(fd, b"ghi")
    assert fd.sent == [b"abc"]
    assert fd.queued() == b"defghi"


def test_write_now_leaves_a_large_write_to_the_ordinary_path() -> None:
    fd = Socketless()
    large = b"x" * (WRITE_NOW_MAX + 1)
    write_now(fd, large)
    assert fd.sent == []
    assert fd.queued() == large
    assert fd.watching  # the reactor sends it when the socket is writable


def test_write_now_leaves_an_error_to_the_ordinary_path() -> None:
    fd = Socketless(fails=True)
    write_now(fd, b"lost?")
    assert fd.queued() == b"lost?"  # doWrite meets the error and closes


def test_write_now_never_writes_past_a_wrapper() -> None:
    # Twisted's TLS transport is a ProtocolWrapper, which hands unknown
    # attributes (writeSomeData, dataBuffer) to the TCP transport under it:
    # using them would put plaintext on the wire.
    fd = Socketless()
    wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
    wrapper.makeConnection(fd)
    write_now(wrapper, b"secret")
    assert fd.sent == []
    assert fd.queued() == b"secret"  # through the wrapper's own write()


def test_write_now_uses_twisteds_tcp_connection_as_it_is() -> None:
    # Pins what write_now reads of Twisted's TCP transport: with another
    # Twisted, this fails instead of every write quietly taking the slow path.
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        theirs.settimeout(5)  # bounded: a failure here must not hang
        connection = tcp.Connection(ours, Protocol(), MemoryReactorClock())
        connection.connected = 1
        write_now(connection, b"hello")
        assert theirs.recv(100) == b"hello"
        assert not connection.dataBuffer
        assert not connection._tempDataBuffer
    finally:
        ours.close()
        theirs.close()


def forwarding_to(back_fd: Socketless, backs: list[Any]) -> ForwardingFactory:
    """
    The forwarder, dialling at once a back connection over ``back_fd``;
    each back protocol is appended to ``backs``.
    """

    def dial(factory: Any) -> Deferred[Any]:
        back = factory.buildProtocol(ADDRESS)
        back.makeConnection(back_fd)
        backs.append(back)
        return succeed(back)

    return ForwardingFactory(
        MemoryReactorClock(),
        dial,
        "the backend",
        connect_timeout=5,
        idle_timeout=60,
        label="t",
    )


def test_the_forwarder_sends_a_small_message_each_way_within_the_call() -> None:
    back_fd = Socketless()
    backs: list[Any] = []
    front_fd = Socketless()
    front = forwarding_to(back_fd, backs).buildProtocol(ADDRESS)
    front.makeConnection(front_fd)
    front.dataReceived(b"ping")
    assert back_fd.sent == [b"ping"]
    backs[0].dataReceived(b"pong")
    assert front_fd.sent == [b"pong"]
    assert back_fd.queued() == front_fd.queued() == b""


def test_a_forwarded_connection_turns_nagle_off_once(ca: CertificateFactory) -> None:
    # At accept, for the handshake; the forwarder does not ask again.
    forwarding = forwarding_to(Socketless(), [])
    p = pair(ca, forwarding.buildProtocol(ADDRESS))
    p.client.write(b"hello")
    p.pump.flush()
    assert p.server_transport.no_delay is True
    assert p.server_transport.no_delay_calls == 1


def test_a_tcp_fin_after_close_notify_to_an_app_that_cannot_half_close_is_clean(
    ca: CertificateFactory,
) -> None:
    app = App()
    p = pair(ca, app)
    p.client.loseConnection()
    p.client.transport.loseConnection()  # and the TCP connection at once
    p.pump.flush()
    p.server.readConnectionLost()
    p.pump.flush()
    assert app.lost is not None
    assert app.lost.check(ConnectionDone)


# -- reading and flushing without WantReadError (the memory BIOs' lengths) ----


@pytest.fixture(params=["bio-lengths", "fallback"])
def bio_lengths(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> bool:
    """
    Each test below runs with the transport asking the memory BIOs how much
    they hold, and with the fallback (read and flush until OpenSSL says
    ``WantReadError``) that a pyOpenSSL without those BIOs gets.
    """
    if request.param == "fallback":
        monkeypatch.setattr(_tls, "_mem_length", None)
        return False
    return True


def client_bytes(p: Pair, *chunks: bytes) -> bytes:
    """The records the client sends for ``chunks``, one each, not delivered."""
    for chunk in chunks:
        p.client.write(chunk)
    stream = p.pump.clientIO.stream
    data = b"".join(stream)
    stream.clear()
    return data


def records(data: bytes) -> list[bytes]:
    """``data`` cut at its TLS records' boundaries."""
    out = []
    while data:
        end = 5 + int.from_bytes(data[3:5], "big")
        out.append(data[:end])
        data = data[end:]
    return out


class CountingConnection:
    """An ``SSL.Connection`` that counts the WantReadErrors it raises."""

    def __init__(self, tls: SSL.Connection) -> None:
        self._wrapped = tls
        self.want_read = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def _counted(self, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except SSL.WantReadError:
            self.want_read += 1
            raise

    def recv(self, size: int) -> bytes:
        return self._counted(self._wrapped.recv, size)  # type: ignore[no-any-return]

    def bio_read(self, size: int) -> bytes:
        return self._counted(self._wrapped.bio_read, size)  # type: ignore[no-any-return]


def test_this_pyopenssl_gives_the_transport_its_memory_bios(
    ca: CertificateFactory,
) -> None:
    # The private path is in use with the pyOpenSSL this project pins.
    p = pair(ca, App())
    assert p.server._bios is not None


def test_a_request_in_one_record_raises_no_want_read_error(
    ca: CertificateFactory, bio_lengths: bool
) -> None:
    app = App()
    p = pair(ca, app)
    counting = CountingConnection(p.server._tls)  # type: ignore[arg-type]
    p.server._tls = counting  # type: ignore[assignment]
    for n in range(3):
        p.server.dataReceived(client_bytes(p, b"GET /%d" % n))
        app.transport.write(b"answer %d" % n)  # type: ignore[union-attr]
    assert b"".join(app.received) == b"GET /0GET /1GET /2"
    p.pump.flush()
    assert p.client_app.received == b"answer 0answer 1answer 2"
    # Without the BIOs' lengths: the read loop's and the flush's, per request.
    assert counting.want_read == (0 if bio_lengths else 6)


def test_two_records_in_one_tcp_read_are_both_delivered(
    ca: CertificateFactory, bio_lengths: bool
) -> None:
    app = App()
    p = pair(ca, app)
    data = client_bytes(p, b"first", b"second")
    assert len(records(data)) == 2
    p.server.dataReceived(data)
    assert app.received == [b"first", b"second"]


def test_a_record_split_across_reads_is_delivered_once_whole(
    ca: CertificateFactory, bio_lengths: bool
) -> None:
    app = App()
    p = pair(ca, app)
    one, two = records(client_bytes(p, b"A" * 3000, b"B" * 40))
    stream = one + two
    # Inside the first header, inside its body, across the boundary (the end
    # of the first and the start of the second), and the rest.
    cuts = [3, 1500, len(one) + 2, len(stream)]
    start = 0
    for cut in cuts:
        p.server.dataReceived(stream[start:cut])
        start = cut
    assert app.received == [b"A" * 3000, b"B" * 40]


def test_every_split_of_two_records_delivers_both(
    ca: CertificateFactory, bio_lengths: bool
) -> None:
    app = App()
    p = pair(ca, app)
    sent = b""
    cut = 1
    while True:
        data = client_bytes(p, b"x%02d" % cut, b"y%02d" % cut)
        if cut >= len(data):
            break
        p.server.dataReceived(data[:cut])
        p.server.dataReceived(data[cut:])
        sent += b"x%02dy%02d" % (cut, cut)
        assert b"".join(app.received) == sent
        cut += 1
    assert cut > 40  # every cut of two short records, boundary included


def test_data_and_close_notify_in_one_read_deliver_the_data_then_end_cleanly(
    ca: CertificateFactory, bio_lengths: bool
) -> None:
    app = App()
    p = pair(ca, app)
    p.client.write(b"last words")
    p.client.loseConnection()
    stream = p.pump.clientIO.stream
    data = b"".join(stream)
    stream.clear()
    assert len(records(data)) == 2  # the data, then the close_notify alert
    p.server.dataReceived(data)
    assert app.received == [b"last words"]
    # Our close_notify answered the peer's, and the connection ends cleanly.
    assert p.server_transport.disconnecting
    p.pump.flush()
    assert app.lost is not None
    assert app.lost.check(ConnectionDone)
    assert p.client_app.lost is not None
    assert p.client_app.lost.check(ConnectionDone)


def test_data_and_close_notify_in_one_read_half_close_a_half_closeable_app(
    ca: CertificateFactory, bio_lengths: bool
) -> None:
    app = HalfClosingApp()
    p = pair(ca, app)
    p.client.write(b"request")
    p.client.loseConnection()
    stream = p.pump.clientIO.stream
    data = b"".join(stream)
    stream.clear()
    p.server.dataReceived(data)
    assert app.received == [b"request"]
    assert app.read_closed
    # The write side stays open: the answer still reaches the client.
    app.transport.write(b"answer")  # type: ignore[union-attr]
    p.pump.flush()
    assert p.client_app.received == b"answer"


# -- close_now: a close with nothing queued does not wait to be writable -----


class Ends(Protocol):
    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost.append(reason)


@define
class Socketpair:
    connection: tcp.Connection
    protocol: Ends
    peer: socket.socket
    reactor: MemoryReactorClock


@pytest.fixture
def socketpair() -> Iterator[Socketpair]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)  # bounded: a failure here must not hang
    reactor = MemoryReactorClock()
    protocol = Ends()
    connection = tcp.Connection(ours, protocol, reactor)
    connection.connected = 1
    protocol.makeConnection(connection)
    connection.startReading()
    try:
        yield Socketpair(connection, protocol, theirs, reactor)
    finally:
        ours.close()
        theirs.close()


def test_close_now_with_nothing_queued_closes_on_the_next_turn_unwatched(
    socketpair: Socketpair,
) -> None:
    s = socketpair
    close_now(s.connection)
    # Neither read nor watched for writing: no registration for the close.
    assert s.connection not in s.reactor.getReaders()
    assert s.connection not in s.reactor.getWriters()
    assert s.connection.disconnecting
    assert s.protocol.lost == []  # not within the call
    s.reactor.advance(0)
    assert len(s.protocol.lost) == 1
    assert s.protocol.lost[0].check(ConnectionDone)
    assert s.peer.recv(10) == b""  # an orderly end for the peer


def test_close_now_with_bytes_queued_is_twisteds_lose_connection(
    socketpair: Socketpair,
) -> None:
    s = socketpair
    s.connection.write(b"queued")
    close_now(s.connection)
    assert s.connection in s.reactor.getWriters()  # flushed first, then closed
    s.reactor.advance(0)
    assert s.protocol.lost == []


def test_a_write_after_close_now_is_sent_before_the_close(
    socketpair: Socketpair,
) -> None:
    s = socketpair
    close_now(s.connection)
    s.connection.write(b"late but sent")
    s.reactor.advance(0)
    assert s.protocol.lost == []
    assert s.connection in s.reactor.getWriters()
    # What the reactor does when the socket is writable.
    why = s.connection.doWrite()
    assert why is not None
    s.connection.connectionLost(Failure(why))
    assert s.peer.recv(100) == b"late but sent"
    assert s.peer.recv(10) == b""
    assert len(s.protocol.lost) == 1


def test_an_abort_after_close_now_is_an_abort_once(socketpair: Socketpair) -> None:
    s = socketpair
    close_now(s.connection)
    s.connection.abortConnection()
    s.reactor.advance(0)
    assert len(s.protocol.lost) == 1
    assert s.protocol.lost[0].check(ConnectionAborted)


def test_close_now_with_a_producer_is_twisteds_lose_connection(
    socketpair: Socketpair,
) -> None:
    s = socketpair
    s.connection.registerProducer(NullProducer(), True)
    close_now(s.connection)
    assert s.connection in s.reactor.getWriters()
    s.reactor.advance(0)
    assert s.protocol.lost == []


def test_close_now_on_a_wrapper_is_its_lose_connection() -> None:
    fd = Socketless()
    wrapper = ProtocolWrapper(WrappingFactory(Factory()), Protocol())
    wrapper.makeConnection(fd)
    close_now(wrapper)
    assert fd.disconnecting  # through the wrapper's own loseConnection
    assert fd.watching
