"""
Tests for connect_native.terminator.forward in memory: the forwarder between two
``StringTransport``s (and, for the TLS side, a real TLS connection over
iosim), on a ``Clock``; the connection tracker through a ``MemoryReactor``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect
from zope.interface import implementer

from connect_native._refusals import BURST
from connect_native.identity import ServiceIdentity
from connect_native.terminator import TLS_TRANSPORTS
from connect_native.terminator._tls import TLSServerProtocol
from connect_native.terminator.forward import (
    MAX_PENDING_BYTES,
    PAUSE_PENDING_BYTES,
    ConnectionTracker,
    ForwardingFactory,
    TrackedEndpoint,
)
from connect_native.testing import CertificateFactory, make_bundle
from connect_native.tls import (
    ClientConnectionCreator,
    HalfCloseTLS,
    ServerConnectionCreator,
)

FRONT = IPv4Address("TCP", "127.0.0.1", 40000)
BACK = IPv4Address("TCP", "127.0.0.1", 8080)


class Transport(StringTransport):
    """A StringTransport with TCP's half-close and abort, recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class Dialer:
    """Records each dial; the test decides when and how it answers."""

    def __init__(self) -> None:
        self.dials: list[tuple[IProtocolFactory, Deferred[Any]]] = []
        self.cancelled = 0

    def __call__(self, factory: IProtocolFactory) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.dials.append((factory, d))
        return d

    def answer(self, index: int = -1) -> tuple[Any, Transport]:
        factory, d = self.dials[index]
        protocol = factory.buildProtocol(BACK)
        assert protocol is not None
        transport = Transport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport


class Pair:
    def __init__(
        self, *, connect_timeout: float = 5.0, idle_timeout: float = 60.0
    ) -> None:
        self.clock = Clock()
        self.dialer = Dialer()
        self.factory = ForwardingFactory(
            self.clock,
            self.dialer,
            "the backend",
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            label="test",
        )
        self.front: Any = self.factory.buildProtocol(FRONT)
        self.front_transport = Transport()
        self.front.makeConnection(self.front_transport)
        self.back: Any = None
        self.back_transport: Transport | None = None

    def connect_back(self) -> tuple[Any, Transport]:
        self.back, self.back_transport = self.dialer.answer()
        return self.back, self.back_transport


def connected() -> tuple[Pair, Any, Transport, Transport]:
    pair = Pair()
    back, back_transport = pair.connect_back()
    return pair, back, pair.front_transport, back_transport


def assert_ended_cleanly(pair: Pair, *, front: bool = True, back: bool = True) -> None:
    """
    Report the loss of whichever side has not reported it yet (as a real
    transport would after a close or an abort), then check that the pair
    left no timer behind.
    """
    if front and not pair.front._front_gone:
        pair.front.connectionLost(Failure(ConnectionDone()))
    if back and pair.back is not None and not pair.front._back_gone:
        pair.back.connectionLost(Failure(ConnectionDone()))
    assert pair.clock.getDelayedCalls() == []


# --- bytes -------------------------------------------------------------------


def test_bytes_go_both_ways_unchanged_and_in_order() -> None:
    pair, back, front_t, back_t = connected()
    chunks = [bytes(range(256)), b"\x00" * 1000, b"", b"\r\n\xff end"]
    for chunk in chunks:
        pair.front.dataReceived(chunk)
    for chunk in reversed(chunks):
        back.dataReceived(chunk)
    assert back_t.value() == b"".join(chunks)
    assert front_t.value() == b"".join(reversed(chunks))


def test_early_bytes_go_first_and_a_few_do_not_pause_the_front() -> None:
    pair = Pair()
    pair.front.dataReceived(b"early ")
    pair.front.dataReceived(b"bytes ")
    # A first request's few bytes: held, and the front keeps reading (no
    # pause and resume to pay for).
    assert pair.front_transport.producerState == "producing"
    _back, back_t = pair.connect_back()
    assert pair.front_transport.producerState == "producing"
    pair.front.dataReceived(b"then more")
    assert back_t.value() == b"early bytes then more"


def test_the_front_is_paused_while_the_back_is_dialled_once_it_sent_a_lot() -> None:
    pair = Pair()
    pair.front.dataReceived(b"x" * (PAUSE_PENDING_BYTES - 1))
    assert pair.front_transport.producerState == "producing"
    pair.front.dataReceived(b"y")
    assert pair.front_transport.producerState == "paused"
    _back, back_t = pair.connect_back()
    assert pair.front_transport.producerState == "producing"
    assert back_t.value() == b"x" * (PAUSE_PENDING_BYTES - 1) + b"y"


def test_too_many_bytes_before_the_back_is_connected_abort() -> None:
    pair = Pair()
    with capturedLogs() as events:
        pair.front.dataReceived(b"x" * MAX_PENDING_BYTES)
        assert not pair.front_transport.aborted
        pair.front.dataReceived(b"x")
        # What the transport had read already is dropped, quietly.
        pair.front.dataReceived(b"y")
    assert pair.front_transport.aborted
    assert pair.dialer.cancelled == 1
    assert len([e for e in events if "before the backend was reached" in _text(e)]) == 1
    # Cancelling our own dial is not the backend failing.
    assert not [e for e in events if e.get("upstream_failure")]
    assert_ended_cleanly(pair)


# --- backpressure ------------------------------------------------------------


def test_a_full_front_pauses_reading_from_the_back() -> None:
    _, _, front_t, back_t = connected()
    assert front_t.streaming is True
    front_t.producer.pauseProducing()
    assert back_t.producerState == "paused"
    front_t.producer.resumeProducing()
    assert back_t.producerState == "producing"


def test_a_full_back_pauses_reading_from_the_front() -> None:
    _, _, front_t, back_t = connected()
    assert back_t.streaming is True
    back_t.producer.pauseProducing()
    assert front_t.producerState == "paused"
    back_t.producer.resumeProducing()
    assert front_t.producerState == "producing"


def test_a_transport_stopping_its_producer_does_not_close_the_other_side() -> None:
    _, _, front_t, back_t = connected()
    # A transport that is lost calls stopProducing on its producer; the
    # forwarder closes the other side itself, cleanly or not as it should.
    back_t.producer.stopProducing()
    front_t.producer.stopProducing()
    assert not front_t.disconnecting
    assert not back_t.disconnecting


# --- half-close on plaintext -------------------------------------------------


def test_front_end_of_stream_half_closes_the_back_and_the_answer_still_flows() -> None:
    pair, back, front_t, back_t = connected()
    pair.front.dataReceived(b"request")
    pair.front.readConnectionLost()
    assert back_t.write_closed
    assert back_t.producer is None
    assert not back_t.disconnecting
    back.dataReceived(b"answer after EOF")
    assert front_t.value() == b"answer after EOF"
    back.readConnectionLost()
    assert back_t.disconnecting
    assert front_t.disconnecting
    assert not front_t.aborted
    assert not back_t.aborted
    assert_ended_cleanly(pair)


def test_back_end_of_stream_half_closes_the_front_and_requests_still_flow() -> None:
    pair, back, front_t, back_t = connected()
    back.readConnectionLost()
    assert front_t.write_closed
    assert not front_t.disconnecting
    pair.front.dataReceived(b"more from the client")
    assert back_t.value() == b"more from the client"
    pair.front.readConnectionLost()
    assert front_t.disconnecting
    assert back_t.disconnecting
    assert not front_t.aborted
    assert not back_t.aborted
    assert_ended_cleanly(pair)


def test_end_of_stream_before_the_back_is_connected_is_passed_on_after_the_bytes() -> (
    None
):
    pair = Pair()
    pair.front.dataReceived(b"all of it")
    pair.front.readConnectionLost()
    _, back_t = pair.connect_back()
    assert back_t.value() == b"all of it"
    assert back_t.write_closed
    assert pair.front_transport.producer is not None  # answers still flow back
    assert_ended_cleanly(pair)


def test_a_clean_close_of_one_side_closes_the_other_cleanly() -> None:
    pair, back, front_t, _back_t = connected()
    back.connectionLost(Failure(ConnectionDone()))
    assert front_t.disconnecting
    assert not front_t.aborted
    pair.front.connectionLost(Failure(ConnectionDone()))
    assert pair.clock.getDelayedCalls() == []


def test_a_lost_back_aborts_the_front_and_is_logged() -> None:
    pair, back, front_t, _ = connected()
    with capturedLogs() as events:
        back.connectionLost(Failure(ConnectionLost("reset by peer")))
    assert front_t.aborted
    assert any(
        e.get("upstream_failure") and "reset by peer" in _text(e) for e in events
    )
    assert_ended_cleanly(pair)


def test_a_lost_front_aborts_the_back() -> None:
    pair, _, _, back_t = connected()
    pair.front.connectionLost(Failure(ConnectionLost()))
    assert back_t.aborted
    assert not pair.front_transport.disconnecting  # it was already gone
    assert_ended_cleanly(pair)


# --- the dial ----------------------------------------------------------------


def test_a_failed_dial_aborts_the_front_and_says_why() -> None:
    clock = Clock()
    factory = ForwardingFactory(
        clock,
        lambda f: fail(ConnectionRefusedError("nobody home")),
        "tcp:127.0.0.1:1",
        connect_timeout=5,
        idle_timeout=60,
        label="test",
    )
    front: Any = factory.buildProtocol(FRONT)
    transport = Transport()
    with capturedLogs() as events:
        front.makeConnection(transport)
    assert transport.aborted
    [event] = [e for e in events if e.get("upstream_failure")]
    assert "could not reach tcp:127.0.0.1:1" in _text(event)
    assert "nobody home" in _text(event)
    front.connectionLost(Failure(ConnectionLost()))
    assert clock.getDelayedCalls() == []


def test_a_dial_that_takes_too_long_is_cancelled_and_the_front_aborted() -> None:
    pair = Pair(connect_timeout=3)
    pair.clock.advance(2.9)
    assert not pair.front_transport.aborted
    with capturedLogs() as events:
        pair.clock.advance(0.1)
    assert pair.dialer.cancelled == 1
    assert pair.front_transport.aborted
    assert len([e for e in events if "no connection within 3s" in _text(e)]) == 1
    assert_ended_cleanly(pair)


def test_a_front_that_goes_away_while_dialling_cancels_the_dial_quietly() -> None:
    pair = Pair()
    with capturedLogs() as events:
        pair.front.connectionLost(Failure(ConnectionDone()))
    assert pair.dialer.cancelled == 1
    assert not [e for e in events if e.get("upstream_failure")]
    assert pair.clock.getDelayedCalls() == []


def test_a_back_connected_after_the_front_went_away_is_aborted() -> None:
    # A dial that does not honour its cancellation connects anyway: nobody
    # will read that connection, and no idle timer is left to bound a
    # graceful close.
    pair = Pair()
    pair.front.connectionLost(Failure(ConnectionDone()))
    assert pair.clock.getDelayedCalls() == []
    factory, _cancelled = pair.dialer.dials[0]
    back: Any = factory.buildProtocol(BACK)
    back_t = Transport()
    back.makeConnection(back_t)
    assert back_t.aborted
    assert back_t.value() == b""
    back.connectionLost(Failure(ConnectionLost()))
    assert pair.clock.getDelayedCalls() == []


def test_an_idle_timeout_during_the_dial_does_not_blame_the_backend() -> None:
    pair = Pair(connect_timeout=10, idle_timeout=2)
    with capturedLogs() as events:
        pair.clock.advance(2)
    assert pair.front_transport.aborted
    assert pair.dialer.cancelled == 1
    assert any("no bytes either way for 2s" in _text(e) for e in events)
    assert not [e for e in events if e.get("upstream_failure")]
    assert_ended_cleanly(pair)


# --- idle --------------------------------------------------------------------


def test_an_idle_pair_is_aborted_after_the_idle_timeout() -> None:
    pair = Pair(idle_timeout=30)
    back, back_t = pair.connect_back()
    pair.clock.advance(20)
    pair.front.dataReceived(b"x")  # activity from the client
    pair.clock.advance(20)
    back.dataReceived(b"y")  # and from the backend
    pair.clock.advance(29)
    assert not pair.front_transport.aborted
    assert not back_t.aborted
    pair.clock.advance(1)
    assert pair.front_transport.aborted
    assert back_t.aborted
    assert_ended_cleanly(pair)


def test_a_closed_pair_leaves_no_timer_behind() -> None:
    pair, back, _, _ = connected()
    pair.front.connectionLost(Failure(ConnectionDone()))
    back.connectionLost(Failure(ConnectionDone()))
    assert pair.clock.getDelayedCalls() == []


# --- half-close on TLS ---------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


class Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = reason


@implementer(IHalfCloseableProtocol)
class HalfClosingClient(Client):
    """A client that can go on writing after the server's close_notify."""

    read_closed = False

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass


@pytest.fixture(params=TLS_TRANSPORTS)
def tls_transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def tls_pair(
    ca: CertificateFactory, tls_transport: str, client: Client | None = None
) -> tuple[Any, Client, Dialer, Any, Clock]:
    """
    A Connect client and the forwarder over ``tls_transport``: Twisted's
    TLSMemoryBIOProtocol, or connect_native's TLSServerProtocol.
    """
    clock = Clock()
    clock.advance(time.time())
    dialer = Dialer()
    forwarding = ForwardingFactory(
        clock, dialer, "the backend", connect_timeout=5, idle_timeout=60, label="t"
    )
    creator = ServerConnectionCreator(make_bundle(ca, "web"))
    server_factory: Any
    if tls_transport == "twisted":
        server_factory = TLSMemoryBIOFactory(
            creator, isClient=False, wrappedFactory=forwarding, clock=clock
        )
        # What ConnectServerEndpoint builds over Twisted's transport.
        server_factory.protocol = HalfCloseTLS
    else:

        class Own(Factory):
            def buildProtocol(self, addr: Any) -> TLSServerProtocol:
                front = forwarding.buildProtocol(addr)
                return TLSServerProtocol(creator.serverConnectionForTLS, front)

        server_factory = Own()
    if client is None:
        client = Client()
    client_factory = TLSMemoryBIOFactory(
        ClientConnectionCreator(
            make_bundle(ca, "api"), ServiceIdentity.parse(ca.service_uri("web"))
        ),
        isClient=True,
        wrappedFactory=Factory.forProtocol(lambda: client),
        clock=clock,
    )
    # What ConnectClientEndpoint builds.
    client_factory.protocol = HalfCloseTLS
    server = server_factory.buildProtocol(FRONT)
    client_tls = client_factory.buildProtocol(BACK)
    pump = connect(
        server,
        FakeTransport(server, isServer=True),
        client_tls,
        FakeTransport(client_tls, isServer=False),
        greet=False,
        clock=clock,
    )
    return server, client, dialer, pump, clock


def test_backend_end_of_stream_sends_close_notify_and_the_client_can_still_send(
    ca: CertificateFactory, tls_transport: str
) -> None:
    server, client, dialer, pump, _clock = tls_pair(ca, tls_transport)
    pump.flush()
    back, back_t = dialer.answer()
    pump.flush()
    client.transport.write(b"request")  # type: ignore[union-attr]
    pump.flush()
    assert back_t.value() == b"request"

    back.dataReceived(b"answer")
    # The client writes more before it has seen the backend's end.
    client.transport.write(b" and more")  # type: ignore[union-attr]
    back.readConnectionLost()
    assert server.disconnecting  # close_notify is on its way
    pump.flush()
    assert client.received == b"answer"
    # Bytes the client sent after our close_notify still reach the backend.
    assert back_t.value() == b"request and more"
    # The client answered our close_notify with its own: the pair is done,
    # cleanly.
    assert client.lost is not None
    assert client.lost.check(ConnectionDone)
    assert back_t.disconnecting
    assert not back_t.aborted


def test_a_client_close_notify_half_closes_the_backend_and_the_reply_flows(
    ca: CertificateFactory, tls_transport: str
) -> None:
    _server, client, dialer, pump, _clock = tls_pair(ca, tls_transport)
    pump.flush()
    back, back_t = dialer.answer()
    client.transport.write(b"last words")  # type: ignore[union-attr]
    # close_notify: the end of the request only (TLS 1.3 half-close).
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    pump.flush()
    assert back_t.value() == b"last words"
    # The backend got a FIN, not a close: it can still answer.
    assert back_t.write_closed
    assert not back_t.disconnecting
    back.dataReceived(b"the whole reply")
    pump.flush()
    assert client.received == b"the whole reply"
    assert client.lost is None
    # The backend's end is the end of the pair, cleanly on both sides.
    back.readConnectionLost()
    pump.flush()
    assert client.lost is not None
    assert client.lost.check(ConnectionDone)
    assert back_t.disconnecting
    assert not back_t.aborted


def test_a_tcp_fin_after_the_clients_close_notify_leaves_the_reply_flowing(
    ca: CertificateFactory, tls_transport: str
) -> None:
    server, client, dialer, pump, _clock = tls_pair(ca, tls_transport)
    pump.flush()
    back, back_t = dialer.answer()
    client.transport.write(b"request")  # type: ignore[union-attr]
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    pump.flush()
    # The client shuts its socket's write side too (SHUT_WR after close_notify).
    assert IHalfCloseableProtocol.providedBy(server)
    server.readConnectionLost()
    back.dataReceived(b"reply")
    pump.flush()
    assert client.received == b"reply"
    assert not back_t.aborted


def test_a_tcp_fin_without_close_notify_is_a_truncation_that_aborts_the_backend(
    ca: CertificateFactory, tls_transport: str
) -> None:
    server, _client, dialer, pump, _clock = tls_pair(ca, tls_transport)
    pump.flush()
    _, back_t = dialer.answer()
    server.readConnectionLost()
    pump.flush()
    assert back_t.aborted


def test_a_half_closeable_client_writes_on_after_the_servers_close_notify(
    ca: CertificateFactory, tls_transport: str
) -> None:
    client = HalfClosingClient()
    _server, _, dialer, pump, _clock = tls_pair(ca, tls_transport, client)
    pump.flush()
    back, back_t = dialer.answer()
    pump.flush()
    back.dataReceived(b"greeting")
    back.readConnectionLost()
    pump.flush()
    assert client.received == b"greeting"
    assert client.read_closed
    assert client.lost is None
    client.transport.write(b"still talking")  # type: ignore[union-attr]
    pump.flush()
    assert back_t.value() == b"still talking"
    client.transport.loseConnection()  # type: ignore[union-attr]
    pump.flush()
    assert client.lost is not None
    assert client.lost.check(ConnectionDone)
    assert back_t.disconnecting
    assert not back_t.aborted


# --- the tracker -------------------------------------------------------------


def listening(
    tracker: ConnectionTracker,
) -> tuple[MemoryReactorClock, Any, list[Transport]]:
    reactor = MemoryReactorClock()
    endpoint = TrackedEndpoint(TCP4ServerEndpoint(reactor, 0), tracker, "test")
    endpoint.listen(Factory.forProtocol(Protocol))
    factory = reactor.tcpServers[0][1]
    return reactor, factory, []


def accept(factory: Any, port: int) -> tuple[Any, Transport] | None:
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    if protocol is None:
        return None
    transport = Transport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_connections_over_the_maximum_are_refused_and_logged() -> None:
    clock = Clock()
    tracker = ConnectionTracker(clock, 2)
    _, factory, _ = listening(tracker)
    first = accept(factory, 1)
    assert accept(factory, 2) is not None
    with capturedLogs() as events:
        assert accept(factory, 3) is None
    [event] = events
    assert event["refused"] is True
    assert "127.0.0.1" in event["address"]
    assert "2 connections are open, the maximum" in _text(event)
    assert first is not None
    first[0].connectionLost(Failure(ConnectionDone()))
    assert accept(factory, 4) is not None


def test_a_flood_over_the_maximum_is_summed_up_not_logged_one_by_one() -> None:
    clock = Clock()
    tracker = ConnectionTracker(clock, 1)
    _, factory, _ = listening(tracker)
    assert accept(factory, 1) is not None
    with capturedLogs() as events:
        for port in range(2, 102):
            assert accept(factory, port) is None
        assert len(events) == BURST
        clock.advance(10)
    summary = events[-1]
    assert summary["summary"] is True
    assert (summary["count"], summary["addresses"]) == (100 - BURST, 1)
    assert _text(summary).startswith(
        "test: 80 connections refused at the limit from 1 address in the last 10s"
    )


def test_the_maximum_counts_all_listeners_of_a_tracker() -> None:
    tracker = ConnectionTracker(Clock(), 1)
    _, one, _ = listening(tracker)
    _, two, _ = listening(tracker)
    assert accept(one, 1) is not None
    with capturedLogs():
        assert accept(two, 2) is None


def test_drain_waits_for_open_connections_then_aborts_the_rest_at_the_deadline() -> (
    None
):
    clock = Clock()
    tracker = ConnectionTracker(clock, 10)
    _, factory, _ = listening(tracker)
    first = accept(factory, 1)
    second = accept(factory, 2)
    assert first is not None
    assert second is not None
    with capturedLogs():
        drained = tracker.drain(5)
        results: list[int] = []
        drained.addCallback(results.append)
        # New connections are refused while draining.
        assert accept(factory, 3) is None
        first[0].connectionLost(Failure(ConnectionDone()))
        clock.advance(4.9)
        assert results == []
        assert not second[1].aborted
        clock.advance(0.1)
    assert second[1].aborted
    assert not first[1].aborted
    assert results == [1]


def test_drain_fires_as_soon_as_the_last_connection_closes() -> None:
    clock = Clock()
    tracker = ConnectionTracker(clock, 10)
    _, factory, _ = listening(tracker)
    only = accept(factory, 1)
    assert only is not None
    results: list[int] = []
    with capturedLogs():
        tracker.drain(5).addCallback(results.append)
    only[0].connectionLost(Failure(ConnectionDone()))
    assert results == [0]
    assert clock.getDelayedCalls() == []


def test_drain_with_nothing_open_fires_at_once() -> None:
    results: list[int] = []
    ConnectionTracker(Clock(), 1).drain(5).addCallback(results.append)
    assert results == [0]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_the_maximum_must_be_a_whole_number_of_at_least_one(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_connections"):
        ConnectionTracker(Clock(), bad)


@pytest.mark.parametrize("name", ["connect_timeout", "idle_timeout"])
@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_forwarding_timeouts_must_be_positive(name: str, bad: float) -> None:
    options: dict[str, Any] = {"connect_timeout": 1, "idle_timeout": 1}
    options[name] = bad
    with pytest.raises(ValueError, match=name):
        ForwardingFactory(Clock(), Dialer(), "x", label="t", **options)


def _text(event: LogEvent) -> str:
    from twisted.logger import formatEvent

    return formatEvent(event)


def test_a_tracked_connection_carries_the_clients_half_close() -> None:
    # The tracker's wrapper sits between TCP and the forwarder: TCP must see
    # a half-closeable protocol, or it ends the whole connection at the FIN.
    reactor = MemoryReactorClock()
    tracker = ConnectionTracker(reactor, 10)
    forwarding = ForwardingFactory(
        reactor, Dialer(), "the backend", connect_timeout=5, idle_timeout=60, label="t"
    )
    TrackedEndpoint(TCP4ServerEndpoint(reactor, 0), tracker, "t").listen(forwarding)
    factory = reactor.tcpServers[0][1]
    protocol = factory.buildProtocol(FRONT)
    protocol.makeConnection(Transport())
    assert IHalfCloseableProtocol.providedBy(protocol)
    protocol.readConnectionLost()
    assert protocol.wrappedProtocol._front_eof


def test_hurry_ends_a_drain_at_once() -> None:
    clock = Clock()
    tracker = ConnectionTracker(clock, 10)
    _, factory, _ = listening(tracker)
    accepted = accept(factory, 40001)
    assert accepted is not None
    _, transport = accepted
    assert tracker.hurry() == 0  # no drain yet
    drained = tracker.drain(30)
    assert tracker.hurry() == 1
    clock.advance(0)
    assert transport.aborted
    assert drained.result == 1


def test_a_close_notify_and_fin_to_a_client_that_cannot_half_close_is_clean(
    ca: CertificateFactory, tls_transport: str
) -> None:
    # Twisted's own TLS ends such a client cleanly; the half-closeable
    # transport must too when the FIN follows the close_notify.
    _server, client, dialer, pump, _clock = tls_pair(ca, tls_transport)
    pump.flush()
    back, _back_t = dialer.answer()
    back.readConnectionLost()  # the backend is done: close_notify to the client
    pump.flush()
    tls = client.transport
    assert tls is not None
    tls.readConnectionLost()  # type: ignore[attr-defined]
    pump.flush()
    assert client.lost is not None
    assert client.lost.check(ConnectionDone)


def test_refusals_at_the_limit_and_while_draining_are_counted() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from connect_native.metrics import ServiceMetrics

    def refused(metrics: ServiceMetrics, reason: str) -> float:
        text = generate_latest(metrics.registry).decode("utf-8")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "connect_native_connections_total"
                    and sample.labels["reason"] == reason
                ):
                    assert sample.labels["outcome"] == "refused"
                    return float(sample.value)
        raise AssertionError(f"no sample for {reason}")

    metrics = ServiceMetrics("web")
    tracker = ConnectionTracker(Clock(), 1)
    reactor = MemoryReactorClock()
    TrackedEndpoint(TCP4ServerEndpoint(reactor, 0), tracker, "t", metrics).listen(
        Factory.forProtocol(Protocol)
    )
    factory = reactor.tcpServers[0][1]
    assert accept(factory, 1) is not None
    assert accept(factory, 2) is None
    assert accept(factory, 3) is None
    assert refused(metrics, "too_many_connections") == 2
    assert refused(metrics, "shutting_down") == 0
    tracker.drain(5)
    assert accept(factory, 4) is None
    assert refused(metrics, "shutting_down") == 1
