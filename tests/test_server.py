"""
Tests for connect_native.server, in memory: ConnectServerEndpoint listening
on a MemoryReactorClock, each connection built from the listening factory and
joined to a Connect TLS client with iosim (FakeTransports, the same clock),
no sockets and no sleeps.

Certificates carry wall-clock validity that OpenSSL checks against real time,
so they are made around ``time.time()`` and the clock starts there.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import define, field
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IListeningPort,
    IOpenSSLClientConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from connect_native import server as server_module
from connect_native._refusals import BURST
from connect_native.authorize import Decision, IAuthorizer, Peer, colon_hex_serial
from connect_native.certs import Bundle, IBundleSource, RootPEMs
from connect_native.identity import ServiceIdentity
from connect_native.server import (
    CertificateNotReady,
    ConnectServerEndpoint,
    NotAConnectConnection,
    alpn_protocols_for,
    peer_identity,
)
from connect_native.terminator._tls import TLSServerProtocol
from connect_native.terminator.forward import ConnectionTracker, TrackedEndpoint
from connect_native.testing import CertificateFactory, FakeAuthorizer, TestLeaf
from connect_native.tls import ClientConnectionCreator, verified_peer
from tests import transports

# A fixture: every test of this module runs over both TLS transports.
from tests.transports import over_each_tls_transport  # noqa: F401

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


# --- certificates and a bundle source ---------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


def bundle(
    ca: CertificateFactory, leaf: TestLeaf, *other_cas: CertificateFactory
) -> Bundle:
    return Bundle.build(
        leaf_cert_pem=leaf.chain_pem,
        private_key_pem=leaf.key_pem,
        roots=[RootPEMs(c.root_pem) for c in (ca, *other_cas)],
        trust_domain=ca.trust_domain,
        now=time.time(),
    )


def identity(ca: CertificateFactory, service: str) -> ServiceIdentity:
    return ServiceIdentity.parse(ca.service_uri(service))


@implementer(IBundleSource)
class StaticSource:
    """
    A bundle source the test sets by hand: ``current()`` is whatever
    ``bundle`` is now, ``when_ready()`` fires once it is set.
    """

    def __init__(self, bundle: Bundle | None = None) -> None:
        self.bundle = bundle
        self.waiters: list[Deferred[Bundle]] = []
        self.cancelled = 0

    def current(self) -> Bundle | None:
        return self.bundle

    def when_ready(self) -> Deferred[Bundle]:
        if self.bundle is not None:
            return succeed(self.bundle)

        def cancel(d: Deferred[Bundle]) -> None:
            self.cancelled += 1
            self.waiters.remove(d)

        waiter: Deferred[Bundle] = Deferred(cancel)
        self.waiters.append(waiter)
        return waiter

    def set(self, bundle: Bundle) -> None:
        self.bundle = bundle
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(bundle)


# --- protocols --------------------------------------------------------------


@implementer(IHandshakeListener)
class App(Protocol):
    """
    The application's protocol: records what happens to it, in order.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.received = b""

    def makeConnection(self, transport: Any) -> None:
        self.events.append(("makeConnection", transport))
        super().makeConnection(transport)

    def handshakeCompleted(self) -> None:
        self.events.append(("handshakeCompleted",))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.events.append(("connectionLost",))


class AppFactory(Factory):
    def __init__(self, app_class: type[App] | None = None) -> None:
        self.app_class = App if app_class is None else app_class
        self.built: list[App] = []
        self.addresses: list[Any] = []

    def buildProtocol(self, addr: Any) -> App:
        self.addresses.append(addr)
        app = self.app_class()
        app.factory = self
        self.built.append(app)
        return app


@implementer(IHandshakeListener)
class Client(Protocol):
    """
    The Connect client's application: sends ``early`` as soon as its side of
    the handshake completes, before the server has decided anything.
    """

    def __init__(self, early: list[bytes]) -> None:
        self.early = early
        self.handshake_done = False
        self.received = b""
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        for chunk in self.early:
            self.transport.write(chunk)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = reason


class ClientFactory(Factory):
    def __init__(self, early: list[bytes]) -> None:
        self.early = early
        self.built: list[Client] = []

    def buildProtocol(self, addr: Any) -> Client:
        client = Client(self.early)
        self.built.append(client)
        return client


class PausableTransport(FakeTransport):
    """
    An iosim transport that remembers whether it was paused.
    """

    paused = False
    pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False


# --- the harness ------------------------------------------------------------


@define
class Connection:
    server: TLSMemoryBIOProtocol | TLSServerProtocol
    server_transport: PausableTransport
    client: TLSMemoryBIOProtocol
    client_app: Client
    pump: IOPump


@define
class Harness:
    """
    A ConnectServerEndpoint for ``web`` listening on a MemoryReactorClock.
    """

    ca: CertificateFactory
    authorizer: IAuthorizer
    source: StaticSource
    reactor: MemoryReactorClock = field(factory=MemoryReactorClock)
    apps: AppFactory = field(factory=AppFactory)
    endpoint: ConnectServerEndpoint | None = None
    port: Any = None
    #: Count the connections as the terminator does (--max-connections).
    tracker: ConnectionTracker | None = None

    def listen(self, factory: Any = None, **options: Any) -> Deferred[IListeningPort]:
        options.setdefault("tls_protocol", transports.current())
        if self.reactor.seconds() == 0:
            self.reactor.advance(time.time())
        listener: Any = TCP4ServerEndpoint(self.reactor, 8443)
        if self.tracker is not None:
            listener = TrackedEndpoint(listener, self.tracker, "tracked web")
        self.endpoint = ConnectServerEndpoint(
            self.reactor,
            listener,
            self.source,
            self.authorizer,
            "web",
            **options,
        )
        listening = self.endpoint.listen(self.apps if factory is None else factory)
        listening.addCallback(lambda port: setattr(self, "port", port) or port)
        return listening

    @property
    def tls_factory(self) -> Any:
        [(_, factory, _, _)] = self.reactor.tcpServers
        return factory

    def connect(
        self,
        early: list[bytes] | None = None,
        *,
        client_leaf: TestLeaf | None = None,
        client_ca: CertificateFactory | None = None,
        alpn: tuple[bytes, ...] = (),
        address: IPv4Address = ADDRESS,
    ) -> Connection:
        """
        A Connect client for ``web`` holding ``client_leaf`` (a good ``api``
        leaf by default) from ``client_ca`` (the server's CA by default; the
        client trusts both), from ``address``.
        """
        leaf = self.ca.leaf("api") if client_leaf is None else client_leaf
        issuer = self.ca if client_ca is None else client_ca
        creator = ClientConnectionCreator(
            bundle(issuer, leaf, self.ca), identity(self.ca, "web"), alpn_protocols=alpn
        )
        client_apps = ClientFactory(early or [])
        client = TLSMemoryBIOFactory(
            creator, True, client_apps, clock=self.reactor
        ).buildProtocol(address)
        server = self.tls_factory.buildProtocol(address)
        assert server is not None
        server_transport = PausableTransport(server, isServer=True, peerAddress=address)
        pump = connect(
            server,
            server_transport,
            client,
            FakeTransport(client, isServer=False),
            clock=self.reactor,
        )
        return Connection(server, server_transport, client, client_apps.built[0], pump)

    def silent(self, address: IPv4Address = ADDRESS) -> FakeTransport | None:
        """
        A client that connects from ``address`` and never sends a byte of
        TLS; the server side's transport (``None``: refused at the accept).
        """
        server = self.tls_factory.buildProtocol(address)
        if server is None:
            return None
        transport = FakeTransport(server, isServer=True, peerAddress=address)
        server.makeConnection(transport)
        return transport


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events  # type: ignore[misc]


def decisions(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if "decision" in e and e.get("target") == "web"]


def harness(ca: CertificateFactory, authorizer: IAuthorizer, **options: Any) -> Harness:
    h = Harness(ca, authorizer, StaticSource(bundle(ca, ca.leaf("web"))))
    assert isinstance(h.listen(**options).result, server_module._ConnectPort)
    return h


# --- allow ------------------------------------------------------------------


def test_allowed_peer_reaches_the_application_with_the_tls_transport(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}))
    conn = h.connect([b"ping"])

    [app] = h.apps.built
    assert app.events == [
        ("makeConnection", conn.server),
        ("handshakeCompleted",),
        ("data", b"ping"),
    ]
    # The gate stepped aside: the TLS protocol talks to the application.
    assert conn.server.wrappedProtocol is app
    assert app.transport is conn.server
    assert h.apps.addresses == [ADDRESS]
    assert peer_identity(app) == identity(ca, "api")
    assert peer_identity(conn.server) == identity(ca, "api")

    app.transport.write(b"pong")  # type: ignore[union-attr]
    conn.pump.flush()
    assert conn.client_app.received == b"pong"

    [decision] = decisions(logged)
    assert decision["allowed"] is True
    assert decision["decision"] == "allowed"
    assert decision["peer"] == ca.service_uri("api")
    assert decision["source"] == "fake"
    assert "elapsed" in decision


def test_bytes_sent_before_the_decision_arrive_in_order_after_allow(
    ca: CertificateFactory,
) -> None:
    authorizer = FakeAuthorizer({"api"}, hold=True)
    h = harness(ca, authorizer)
    conn = h.connect([b"one ", b"two ", b"three"])

    assert conn.client_app.handshake_done
    assert len(authorizer.pending) == 1
    assert h.apps.built == [], "the application must not see an undecided peer"
    assert conn.server_transport.paused, "the gate holds the client"

    authorizer.release()
    conn.pump.flush()

    [app] = h.apps.built
    assert [e[0] for e in app.events] == [
        "makeConnection",
        "handshakeCompleted",
        *(["data"] * (len(app.events) - 2)),
    ]
    assert app.received == b"one two three"
    assert not conn.server_transport.paused


@pytest.mark.parametrize("hold", [False, True], ids=["at once", "later"])
def test_the_client_is_held_and_the_wait_bounded_only_if_the_answer_is_not_at_once(
    ca: CertificateFactory, hold: bool
) -> None:
    """
    A decision the authorizer has at once (local intentions, a remembered
    answer) is acted on as the handshake completes: the transport is never
    paused and no authorization deadline is scheduled.  A decision still to
    come pauses the transport and is bounded.
    """
    authorizer = FakeAuthorizer({"api"}, hold=hold)
    h = harness(ca, authorizer, authorize_timeout=7.25)
    scheduled: list[float] = []
    real_call_later = h.reactor.callLater

    def call_later(delay: float, f: Any, *a: Any, **kw: Any) -> Any:
        scheduled.append(delay)
        return real_call_later(delay, f, *a, **kw)

    h.reactor.callLater = call_later  # type: ignore[method-assign]
    conn = h.connect([b"hello"])
    if hold:
        authorizer.release()
        conn.pump.flush()

    [app] = h.apps.built
    assert app.received == b"hello"
    assert conn.server_transport.pauses == (1 if hold else 0)
    assert (7.25 in scheduled) is hold
    assert not conn.server_transport.paused


def test_the_authorizer_is_asked_about_the_verified_peer_and_serial(
    ca: CertificateFactory,
) -> None:
    authorizer = FakeAuthorizer({"api"})
    h = harness(ca, authorizer)
    leaf = ca.leaf("api")
    h.connect(client_leaf=leaf)

    [(peer, target)] = authorizer.authorize_calls
    assert peer == Peer(
        identity(ca, "api"), colon_hex_serial(leaf.certificate.serial_number)
    )
    assert target == "web"


def test_application_pausing_the_transport_during_early_bytes_stays_paused(
    ca: CertificateFactory,
) -> None:
    """
    The gate resumes the transport before handing over the early bytes, so an
    application that pauses it while handling them (as twisted.web does while
    it serves a request) is not overridden.
    """

    class Pausing(App):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            self.transport.pauseProducing()  # type: ignore[union-attr]

    authorizer = FakeAuthorizer({"api"}, hold=True)
    h = Harness(ca, authorizer, StaticSource(bundle(ca, ca.leaf("web"))))
    apps = AppFactory(Pausing)
    h.listen(apps)
    conn = h.connect([b"request"])
    authorizer.release()

    assert apps.built[0].received == b"request"
    assert conn.server_transport.paused


def test_a_plain_protocol_gets_the_connection_without_handshake_notice(
    ca: CertificateFactory,
) -> None:
    class Plain(Protocol):
        received = b""

        def dataReceived(self, data: bytes) -> None:
            self.received += data

    built: list[Plain] = []

    def build() -> Plain:
        built.append(Plain())
        return built[-1]

    h = Harness(ca, FakeAuthorizer({"api"}), StaticSource(bundle(ca, ca.leaf("web"))))
    h.listen(Factory.forProtocol(build))
    conn = h.connect([b"data"])
    assert built[0].received == b"data"
    assert built[0].transport is conn.server


# --- deny and fail closed ---------------------------------------------------


def test_denied_peer_is_aborted_and_never_reaches_the_application(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    authorizer = FakeAuthorizer(set())
    h = harness(ca, authorizer)
    conn = h.connect([b"let me in"])

    assert len(authorizer.authorize_calls) == 1
    assert h.apps.built == []
    assert conn.server_transport.disconnecting
    assert conn.client_app.lost is not None
    [decision] = decisions(logged)
    assert decision["allowed"] is False
    assert decision["decision"] == "denied"
    assert decision["reason"] == "'api' may not reach 'web'"
    assert decision["peer"] == ca.service_uri("api")
    assert decision["log_level"].name == "warn"


@pytest.mark.parametrize("allowed", [True, False], ids=["allowed", "denied"])
def test_without_log_allowed_only_refusals_are_logged(
    ca: CertificateFactory, logged: list[LogEvent], allowed: bool
) -> None:
    authorizer = FakeAuthorizer({"api"} if allowed else set())
    h = harness(ca, authorizer, log_allowed=False)
    h.connect([b"hello"])

    assert len(h.apps.built) == (1 if allowed else 0)
    if allowed:
        assert decisions(logged) == []
    else:
        [decision] = decisions(logged)
        assert decision["decision"] == "denied"
        assert decision["log_level"].name == "warn"


def test_authorizer_timeout_denies_and_cancels_its_deferred(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    authorizer = FakeAuthorizer({"api"}, hold=True)
    h = harness(ca, authorizer, authorize_timeout=3)
    conn = h.connect([b"early"])

    h.reactor.advance(2.9)
    assert not conn.server_transport.disconnecting
    h.reactor.advance(0.1)
    conn.pump.flush()

    assert authorizer.cancelled == 1
    assert authorizer.pending == []
    assert h.apps.built == []
    assert conn.server_transport.disconnecting
    [decision] = decisions(logged)
    assert decision["allowed"] is False
    assert decision["source"] == "timeout"
    assert "did not answer within 3s" in decision["reason"]
    assert decision["elapsed"] == pytest.approx(3.0)


def test_authorizer_ignoring_cancellation_still_times_out(
    ca: CertificateFactory,
) -> None:
    @implementer(IAuthorizer)
    class Deaf:
        def decide_now(self, peer: Peer, target: str) -> Decision | None:
            return None

        def authorize(self, peer: Peer, target: str) -> Deferred[Decision]:
            return Deferred(lambda d: None)  # cancelling does nothing

    h = harness(ca, Deaf(), authorize_timeout=1)
    conn = h.connect()
    h.reactor.advance(1)
    assert conn.server_transport.disconnecting
    assert h.apps.built == []


class _Uncancellable(Deferred[Decision]):
    """A Deferred that really survives ``cancel()``: it stays unfired."""

    def cancel(self) -> None:
        self.cancel_calls = getattr(self, "cancel_calls", 0) + 1


def test_authorizer_whose_deferred_survives_cancel_still_times_out(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    answers: list[_Uncancellable] = []

    @implementer(IAuthorizer)
    class Deaf:
        def decide_now(self, peer: Peer, target: str) -> Decision | None:
            return None

        def authorize(self, peer: Peer, target: str) -> Deferred[Decision]:
            answers.append(_Uncancellable())
            return answers[-1]

    h = harness(ca, Deaf(), authorize_timeout=1)
    conn = h.connect()
    h.reactor.advance(1)
    [answer] = answers
    assert answer.cancel_calls == 1
    assert not answer.called  # the cancel really was ignored
    assert conn.server_transport.disconnecting
    [decision] = decisions(logged)
    assert (decision["allowed"], decision["source"]) == (False, "timeout")
    # A late "allowed" changes nothing.
    answer.callback(Decision(True, "late", "test"))
    assert h.apps.built == []


def test_decide_now_raising_refuses_in_the_handshake(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    # authorize() would allow: only the handshake's refusal keeps api out.
    @implementer(IAuthorizer)
    class Raising:
        authorize_calls = 0

        def decide_now(self, peer: Peer, target: str) -> Decision | None:
            raise RuntimeError("decide_now exploded")

        def authorize(self, peer: Peer, target: str) -> Deferred[Decision]:
            self.authorize_calls += 1
            return succeed(Decision(True, "would allow", "test"))

    authorizer = Raising()
    h = harness(ca, authorizer)
    conn = h.connect([b"hello"], client_leaf=ca.leaf("api"))
    assert authorizer.authorize_calls == 0
    assert h.apps.built == []
    assert conn.client_app.lost is not None
    assert isinstance(conn.client_app.lost.value, SSL.Error)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (lambda: fail(RuntimeError("boom")), "the authorizer failed: boom"),
        (lambda: succeed("yes"), "answered str, not a Decision"),
        (lambda: 1 / 0, "the authorizer failed"),
        (lambda: True, "returned bool, not a Deferred"),
    ],
)
def test_authorizer_errors_deny(
    ca: CertificateFactory, logged: list[LogEvent], answer: Any, reason: str
) -> None:
    @implementer(IAuthorizer)
    class Broken:
        def decide_now(self, peer: Peer, target: str) -> Decision | None:
            return None

        def authorize(self, peer: Peer, target: str) -> Any:
            return answer()

    h = harness(ca, Broken())
    conn = h.connect([b"x"])
    assert h.apps.built == []
    assert conn.server_transport.disconnecting
    [decision] = decisions(logged)
    assert decision["allowed"] is False
    assert reason in decision["reason"]


def test_application_factory_refusing_aborts_the_connection(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    class Refusing(Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    h = Harness(ca, FakeAuthorizer({"api"}), StaticSource(bundle(ca, ca.leaf("web"))))
    h.listen(Refusing())
    conn = h.connect()
    assert conn.server_transport.disconnecting
    [decision] = decisions(logged)
    assert decision["allowed"] is False
    assert "application refused" in decision["reason"]


def test_too_many_early_bytes_deny(ca: CertificateFactory) -> None:
    authorizer = FakeAuthorizer({"api"}, hold=True)
    h = harness(ca, authorizer)
    conn = h.connect([b"x" * 16384] * (server_module.MAX_EARLY_BYTES // 16384 + 1))
    assert conn.server_transport.disconnecting
    assert authorizer.cancelled == 1
    authorizer.release()
    assert h.apps.built == []


def test_client_going_away_while_pending_cancels_the_authorizer(
    ca: CertificateFactory,
) -> None:
    authorizer = FakeAuthorizer({"api"}, hold=True)
    h = harness(ca, authorizer)
    conn = h.connect([b"bye"])
    conn.client.abortConnection()
    conn.pump.flush()
    assert authorizer.cancelled == 1
    assert h.apps.built == []
    assert h.reactor.getDelayedCalls() == []


def test_decide_now_denial_is_a_tls_alert_and_authorize_is_never_called(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    authorizer = FakeAuthorizer(set(), in_handshake=True)
    h = harness(ca, authorizer)
    leaf = ca.leaf("api")
    conn = h.connect([b"hello"], client_leaf=leaf)

    assert authorizer.decide_now_calls == [
        (
            Peer(identity(ca, "api"), colon_hex_serial(leaf.certificate.serial_number)),
            "web",
        )
    ]
    assert authorizer.authorize_calls == []
    assert h.apps.built == []
    assert verified_peer(conn.server) is None
    # The client hears why: a TLS alert from the server, not a bare close.
    assert conn.client_app.lost is not None
    assert isinstance(conn.client_app.lost.value, SSL.Error)
    assert "alert" in str(conn.client_app.lost.value)
    [decision] = decisions(logged)
    assert decision["allowed"] is False
    assert decision["stage"] == "in the TLS handshake"
    # The denial names who was denied, and from where.
    assert decision["peer"] == identity(ca, "api").uri
    assert decision["address"] == str(ADDRESS)


def test_decide_now_allowing_still_goes_through_the_gate(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    authorizer = FakeAuthorizer({"api"}, in_handshake=True)
    h = harness(ca, authorizer)
    h.connect([b"hi"])
    assert len(authorizer.decide_now_calls) == 1
    assert len(authorizer.authorize_calls) == 1
    assert h.apps.built[0].received == b"hi"


def test_handshake_timeout_aborts_and_frees_the_connection(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    authorizer = FakeAuthorizer({"api"})
    h = harness(ca, authorizer, handshake_timeout=5)
    server = h.tls_factory.buildProtocol(ADDRESS)
    silent = Protocol()  # connects, never says a word of TLS
    server_transport = FakeTransport(server, isServer=True)
    pump = connect(
        server, server_transport, silent, FakeTransport(silent, isServer=False)
    )
    assert server.connected

    h.reactor.advance(4.9)
    assert not server_transport.disconnecting
    h.reactor.advance(0.1)
    pump.flush()

    assert server_transport.disconnecting
    assert not server.connected
    assert h.reactor.getDelayedCalls() == []
    assert authorizer.authorize_calls == []
    [event] = [e for e in logged if e.get("reason") == "handshake timeout"]
    assert event["timeout"] == 5


def test_refused_certificate_never_asks_the_authorizer(
    ca: CertificateFactory,
) -> None:
    authorizer = FakeAuthorizer({"api"})
    h = harness(ca, authorizer)
    other = ca.another_ca()
    conn = h.connect(client_leaf=other.leaf("api"), client_ca=other)
    assert authorizer.authorize_calls == []
    assert h.apps.built == []
    assert conn.client_app.lost is not None
    assert h.reactor.getDelayedCalls() == []


@implementer(IOpenSSLClientConnectionCreator)
class NoCertificateClient:
    """
    A TLS client that trusts any server and presents no certificate.
    """

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_verify(SSL.VERIFY_NONE, lambda *args: True)
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        return connection


def connect_raw(h: Harness, client_creator: Any) -> tuple[ClientFactory, IOPump]:
    client_apps = ClientFactory([])
    client = TLSMemoryBIOFactory(
        client_creator, True, client_apps, clock=h.reactor
    ).buildProtocol(ADDRESS)
    server = h.tls_factory.buildProtocol(ADDRESS)
    pump = connect(
        server,
        PausableTransport(server, isServer=True),
        client,
        FakeTransport(client, isServer=False),
        clock=h.reactor,
    )
    return client_apps, pump


def test_a_client_without_a_certificate_is_refused_with_a_logged_reason(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    """
    OpenSSL refuses a client that sends no certificate before our verify
    callback runs; the gate still logs the refusal and why.
    """
    authorizer = FakeAuthorizer({"api"})
    h = harness(ca, authorizer)
    connect_raw(h, NoCertificateClient())
    assert authorizer.authorize_calls == []
    assert h.apps.built == []
    [refusal] = decisions(logged)
    assert refusal["allowed"] is False
    assert "did not return a certificate" in refusal["reason"]


def test_a_client_closing_before_the_handshake_is_not_a_refusal(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}))
    server = h.tls_factory.buildProtocol(ADDRESS)
    transport = PausableTransport(server, isServer=True)
    server.makeConnection(transport)
    server.connectionLost(Failure(ConnectionDone()))
    assert decisions(logged) == []
    assert any(
        "before completing the TLS handshake" in str(e.get("log_format"))
        for e in logged
    )


# --- certificates -----------------------------------------------------------


def test_no_bundle_refuses_the_connection(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}))
    h.source.bundle = None
    assert h.tls_factory.buildProtocol(ADDRESS) is None
    [event] = [e for e in logged if e.get("reason") == "no certificate"]
    assert event["decision"] == "denied"


def test_a_failing_source_refuses_the_connection(ca: CertificateFactory) -> None:
    h = harness(ca, FakeAuthorizer({"api"}))

    def broken() -> Bundle:
        raise RuntimeError("source exploded")

    h.source.current = broken  # type: ignore[method-assign]
    assert h.tls_factory.buildProtocol(ADDRESS) is None


def test_one_creator_per_bundle(ca: CertificateFactory) -> None:
    h = harness(ca, FakeAuthorizer({"api"}))
    first = h.tls_factory.buildProtocol(ADDRESS).wrappedProtocol
    second = h.tls_factory.buildProtocol(ADDRESS).wrappedProtocol
    assert first.creator is second.creator
    h.source.bundle = bundle(ca, ca.leaf("web"))
    third = h.tls_factory.buildProtocol(ADDRESS).wrappedProtocol
    assert third.creator is not first.creator


def test_new_bundle_new_connections_present_the_new_leaf_old_keep_working(
    ca: CertificateFactory,
) -> None:
    old_leaf, new_leaf = ca.leaf("web"), ca.leaf("web")
    h = Harness(ca, FakeAuthorizer({"api"}), StaticSource(bundle(ca, old_leaf)))
    h.listen()
    before = h.connect([b"a"])
    old_serial = colon_hex_serial(old_leaf.certificate.serial_number)
    assert verified_peer(before.client).serial == old_serial  # type: ignore[union-attr]

    h.source.bundle = bundle(ca, new_leaf)
    after = h.connect([b"b"])
    new_serial = colon_hex_serial(new_leaf.certificate.serial_number)
    assert verified_peer(after.client).serial == new_serial  # type: ignore[union-attr]

    # The connection opened before still carries data both ways.
    before.client.write(b"still here")
    before.pump.flush()
    assert h.apps.built[0].received == b"astill here"
    h.apps.built[0].transport.write(b"so am I")  # type: ignore[union-attr]
    before.pump.flush()
    assert before.client_app.received == b"so am I"


def test_a_new_root_new_connections_verify_with_it(ca: CertificateFactory) -> None:
    """
    After a CA rotation the source hands out a Bundle with the new root: a
    client with a leaf from the new CA is accepted on a new connection.
    """
    new_ca = CertificateFactory(ca.trust_domain)
    h = harness(ca, FakeAuthorizer({"api"}))
    refused = h.connect(client_leaf=new_ca.leaf("api"), client_ca=new_ca)
    assert refused.client_app.lost is not None
    assert h.apps.built == []

    h.source.bundle = Bundle.build(
        leaf_cert_pem=(leaf := new_ca.leaf("web")).chain_pem,
        private_key_pem=leaf.key_pem,
        roots=[RootPEMs(new_ca.root_pem), RootPEMs(ca.root_pem)],
        trust_domain=ca.trust_domain,
        now=time.time(),
    )
    accepted = h.connect([b"rotated"], client_leaf=new_ca.leaf("api"), client_ca=new_ca)
    assert h.apps.built[0].received == b"rotated"
    assert peer_identity(accepted.server) == identity(ca, "api")


def test_a_dropped_root_refuses_its_peers_though_our_leaf_stays(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    """
    At the end of a CA rotation the agent stops listing the old root while
    our leaf, from the new one, stays the same: a client whose leaf chains
    only to the dropped root is refused on a new connection (a handshake,
    not only a new creator), and one of the remaining root still gets in.
    """
    dropped = CertificateFactory(ca.trust_domain)
    web = ca.leaf("web")
    authorizer = FakeAuthorizer({"api"})
    h = Harness(ca, authorizer, StaticSource(bundle(ca, web, dropped)))
    h.listen()
    h.connect([b"during"], client_leaf=dropped.leaf("api"), client_ca=dropped)
    assert [app.received for app in h.apps.built] == [b"during"]

    h.source.bundle = bundle(ca, web)
    refused = h.connect([b"after"], client_leaf=dropped.leaf("api"), client_ca=dropped)
    assert refused.client_app.lost is not None
    assert verified_peer(refused.server) is None
    assert len(h.apps.built) == 1
    assert len(authorizer.authorize_calls) == 1
    [refusal] = [e for e in decisions(logged) if e.get("allowed") is False]
    assert refusal["decision"] == "denied"
    assert "does not verify against the current roots" in refusal["reason"]

    h.connect([b"kept"])
    assert [app.received for app in h.apps.built] == [b"during", b"kept"]


# --- listen -----------------------------------------------------------------


def test_listen_waits_for_the_first_certificate(ca: CertificateFactory) -> None:
    h = Harness(ca, FakeAuthorizer({"api"}), StaticSource(None))
    listening = h.listen()
    assert not listening.called
    assert h.reactor.tcpServers == []

    h.reactor.advance(59)
    h.source.set(bundle(ca, ca.leaf("web")))

    port = listening.result
    assert IListeningPort.providedBy(port)
    assert len(h.reactor.tcpServers) == 1
    assert h.reactor.getDelayedCalls() == []


def test_listen_fails_after_ready_timeout_saying_what_is_missing(
    ca: CertificateFactory,
) -> None:
    stops: list[bool] = []
    h = Harness(ca, FakeAuthorizer({"api"}), StaticSource(None))
    listening = h.listen(stop_hook=lambda: stops.append(True))
    h.reactor.advance(59.9)
    assert not listening.called
    h.reactor.advance(0.1)

    failure = listening.result
    assert isinstance(failure, Failure)
    assert failure.check(CertificateNotReady)
    assert failure.check(TimeoutError)
    message = failure.getErrorMessage()
    assert message.startswith("no certificate for service 'web' after 60s: ")
    assert "service:write" in message
    assert h.source.cancelled == 1
    assert h.reactor.tcpServers == []
    assert stops == [True], "a failed listen releases what start_hook took"


def test_ready_timeout_message_includes_the_sources_explanation(
    ca: CertificateFactory,
) -> None:
    source = StaticSource(None)
    source.reason = (  # type: ignore[attr-defined]
        "reading the leaf certificate for 'web' from the agent failed: "
        "Connection refused"
    )
    h = Harness(ca, FakeAuthorizer({"api"}), source)
    listening = h.listen(ready_timeout=5)
    h.reactor.advance(5)
    assert listening.result.getErrorMessage().startswith(
        "no certificate for service 'web' after 5s: reading the leaf "
        "certificate for 'web' from the agent failed: Connection refused. Check"
    )


def test_a_when_ready_failure_fails_listen_with_it(ca: CertificateFactory) -> None:
    source = StaticSource(None)
    h = Harness(ca, FakeAuthorizer({"api"}), source)
    listening = h.listen()
    source.waiters[0].errback(PermissionError("the token may not read the leaf"))
    assert listening.result.check(PermissionError)
    assert h.reactor.getDelayedCalls() == []


def test_cancelling_listen_stops_waiting(ca: CertificateFactory) -> None:
    h = Harness(ca, FakeAuthorizer({"api"}), StaticSource(None))
    listening = h.listen()
    listening.cancel()
    assert listening.result.check(CancelledError)
    assert h.source.cancelled == 1
    assert h.reactor.getDelayedCalls() == []


def test_start_hook_runs_on_listen_and_stop_hook_when_the_port_stops(
    ca: CertificateFactory,
) -> None:
    calls: list[str] = []
    h = Harness(ca, FakeAuthorizer({"api"}), StaticSource(bundle(ca, ca.leaf("web"))))
    port = h.listen(
        start_hook=lambda: calls.append("start"),
        stop_hook=lambda: calls.append("stop"),
    ).result
    assert calls == ["start"]
    stopped = port.stopListening()
    assert stopped.called
    assert calls == ["start", "stop"]
    port.stopListening()
    assert calls == ["start", "stop"], "the stop hook runs once"


def test_bad_arguments_are_refused(ca: CertificateFactory) -> None:
    reactor = MemoryReactorClock()
    wrapped = TCP4ServerEndpoint(reactor, 0)
    with pytest.raises(ValueError, match="service"):
        ConnectServerEndpoint(reactor, wrapped, StaticSource(), FakeAuthorizer(), "")
    with pytest.raises(ValueError, match="handshake_timeout"):
        ConnectServerEndpoint(
            reactor,
            wrapped,
            StaticSource(),
            FakeAuthorizer(),
            "web",
            handshake_timeout=0,
        )


# --- ALPN and twisted.web ---------------------------------------------------


class Whoami(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        negotiated = request.transport.negotiatedProtocol  # type: ignore[union-attr]
        return (
            f"secure={request.isSecure()} peer={peer_identity(request).uri} "
            f"alpn={negotiated!r}"
        ).encode()


def test_a_site_sees_a_secure_request_and_the_peer_identity(
    ca: CertificateFactory,
) -> None:
    site = Site(Whoami())
    h = Harness(ca, FakeAuthorizer({"api"}), StaticSource(bundle(ca, ca.leaf("web"))))
    h.listen(site)
    conn = h.connect(
        [b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"],
        alpn=(b"http/1.1",),
    )
    conn.pump.flush()

    response = conn.client_app.received
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    body = response.split(b"\r\n\r\n", 1)[1]
    assert body == (
        f"secure=True peer={ca.service_uri('api')} alpn=b'http/1.1'".encode()
    )


def test_alpn_offered_from_the_factory() -> None:
    from twisted.web.http import H2_ENABLED

    site = Site(Resource())
    assert alpn_protocols_for(site) == (
        (b"h2", b"http/1.1") if H2_ENABLED else (b"http/1.1",)
    )

    class Speaks(Factory):
        acceptableProtocols = [b"x-custom"]

    class Method(Factory):
        def acceptableProtocols(self) -> list[bytes]:
            return [b"a", b"b"]

    assert alpn_protocols_for(Speaks()) == (b"x-custom",)
    assert alpn_protocols_for(Method()) == (b"a", b"b")
    assert alpn_protocols_for(Factory()) == ()


# --- peer_identity ----------------------------------------------------------


def test_peer_identity_refuses_what_is_not_a_connect_connection(
    ca: CertificateFactory,
) -> None:
    with pytest.raises(NotAConnectConnection, match="not a Connect TLS connection"):
        peer_identity(object())
    plain = Protocol()
    plain.makeConnection(FakeTransport(plain, isServer=True))
    with pytest.raises(NotAConnectConnection):
        peer_identity(plain)


def test_peer_identity_is_gone_with_the_connection(ca: CertificateFactory) -> None:
    h = harness(ca, FakeAuthorizer({"api"}))
    conn = h.connect()
    app = h.apps.built[0]
    assert peer_identity(app.transport) == identity(ca, "api")
    conn.client.loseConnection()
    conn.pump.flush()
    with pytest.raises(NotAConnectConnection):
        peer_identity(app.transport)


# --- sharing the service's certificate manager ------------------------------


class FakeManager:
    """
    Stands in for a CertManager in a registry: a bundle source that records
    being started and stopped.
    """

    def __init__(self, clock: Any, client: Any, service: str) -> None:
        self.service = service
        self.client = client
        self.source = StaticSource(None)
        self.running = False
        self.reason = "waiting for the agent"

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> None:
        self.running = False

    def current(self) -> Bundle | None:
        return self.source.current()

    def when_ready(self) -> Deferred[Bundle]:
        return self.source.when_ready()


def test_for_service_shares_one_manager_per_service_and_releases_it(
    ca: CertificateFactory,
) -> None:
    from connect_native.service import CertManagerRegistry

    made: list[FakeManager] = []

    def factory(clock: Any, client: Any, service: str) -> Any:
        made.append(FakeManager(clock, client, service))
        return made[-1]

    registry = CertManagerRegistry(factory)
    reactor = MemoryReactorClock()
    client: Any = object()
    endpoints = [
        ConnectServerEndpoint.for_service(
            reactor,
            TCP4ServerEndpoint(reactor, port),
            client,
            "web",
            authorizer=FakeAuthorizer({"api"}),
            registry=registry,
        )
        for port in (8443, 8444)
    ]
    first, second = (e.listen(AppFactory()) for e in endpoints)
    [manager] = made
    assert manager.running
    assert not first.called

    manager.source.set(bundle(ca, ca.leaf("web")))
    ports = [first.result, second.result]
    assert len(reactor.tcpServers) == 2
    assert reactor.tcpServers[0][1].buildProtocol(ADDRESS) is not None

    ports[0].stopListening()
    assert manager.running, "the other port still uses it"
    ports[1].stopListening()
    assert not manager.running
    assert registry.managers() == []


def test_for_service_releases_the_manager_when_listen_times_out(
    ca: CertificateFactory,
) -> None:
    from connect_native.service import CertManagerRegistry

    made: list[FakeManager] = []

    def factory(clock: Any, client: Any, service: str) -> Any:
        made.append(FakeManager(clock, client, service))
        return made[-1]

    registry = CertManagerRegistry(factory)
    reactor = MemoryReactorClock()
    endpoint = ConnectServerEndpoint.for_service(
        reactor,
        TCP4ServerEndpoint(reactor, 8443),
        object(),  # type: ignore[arg-type]
        "web",
        authorizer=FakeAuthorizer(),
        registry=registry,
        ready_timeout=10,
    )
    listening = endpoint.listen(AppFactory())
    reactor.advance(10)
    assert "waiting for the agent" in listening.result.getErrorMessage()
    assert not made[0].running
    assert registry.managers() == []


def test_an_application_aborting_on_connect_gets_no_early_bytes(
    ca: CertificateFactory,
) -> None:
    class Aborting(App):
        def connectionMade(self) -> None:
            self.transport.abortConnection()  # type: ignore[union-attr]

    authorizer = FakeAuthorizer({"api"}, hold=True)
    h = Harness(ca, authorizer, StaticSource(bundle(ca, ca.leaf("web"))))
    apps = AppFactory(Aborting)
    h.listen(apps)
    conn = h.connect([b"early"])
    authorizer.release()
    assert apps.built[0].received == b""
    assert conn.server_transport.disconnecting


def test_an_abort_is_told_from_twisteds_flag_else_any_disconnect_counts() -> None:
    """
    The gate stops handing early bytes to an application that aborted.
    Twisted's only record of an abort is the private ``_aborted``; where it
    is missing, any disconnect counts as one (the bytes are dropped, never
    handed to a connection being torn down).
    """

    class LostConnection:  # loseConnection: the bytes still go through
        _aborted = False
        disconnecting = True

    class Aborted:
        _aborted = True
        disconnecting = True

    class NoFlagClosing:
        disconnecting = True

    class NoFlagOpen:
        disconnecting = False

    assert not server_module._aborted(LostConnection())
    assert server_module._aborted(Aborted())
    assert server_module._aborted(NoFlagClosing())
    assert not server_module._aborted(NoFlagOpen())
    assert server_module._aborted(object())


# --- the handshake budget, and refusals under a flood -------------------------


def source(n: int) -> IPv4Address:
    return IPv4Address("TCP", f"10.0.{n // 250}.{n % 250 + 1}", 50000 + n)


def report_lost(transport: FakeTransport) -> None:
    """What the reactor does after an abort: the protocol hears it is lost."""
    assert transport.disconnecting
    transport.protocol.connectionLost(Failure(ConnectionDone()))


def tracked_harness(
    ca: CertificateFactory, max_connections: int, **options: Any
) -> Harness:
    reactor = MemoryReactorClock()
    h = Harness(
        ca,
        FakeAuthorizer({"api"}),
        StaticSource(bundle(ca, ca.leaf("web"))),
        reactor=reactor,
        tracker=ConnectionTracker(reactor, max_connections, max_unauthorized=100),
    )
    assert isinstance(h.listen(**options).result, server_module._ConnectPort)
    return h


def test_silent_sockets_cannot_keep_authorized_clients_out(
    ca: CertificateFactory,
) -> None:
    """
    Connections that never start a handshake do not count against the
    maximum of open connections, and past the handshake budget each new one
    takes the place of an old one: real clients get through while 30 sockets
    are held open.
    """
    h = tracked_harness(ca, 3, max_handshakes=8, max_handshakes_per_address=8)
    held = [h.silent(source(n)) for n in range(30)]
    assert all(t is not None for t in held)
    waiting = [t for t in held if t is not None and not t.disconnecting]
    assert len(waiting) == 8

    for n in range(3):
        conn = h.connect([b"hi %d" % n], address=source(100 + n))
        assert h.apps.built[n].received == b"hi %d" % n
        assert not conn.server_transport.disconnecting
    # Authorized connections do count: the fourth is refused at the accept.
    assert h.tracker is not None
    assert h.tracker.refusal() is not None
    assert h.tls_factory.buildProtocol(source(200)) is None


def test_the_oldest_handshake_that_sent_nothing_goes_first(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}), max_handshakes=2)
    talking = h.silent(source(1))
    assert talking is not None
    talking.protocol.dataReceived(b"\x16\x03\x01\x00")  # a ClientHello begins
    quiet = h.silent(source(2))
    newest = h.silent(source(3))
    assert quiet is not None
    assert newest is not None

    assert quiet.disconnecting
    assert not talking.disconnecting
    assert not newest.disconnecting
    [dropped] = [e for e in logged if e.get("reason") == "too many handshakes"]
    assert dropped["address"] == str(source(2))
    assert "it sent nothing" in dropped["log_format"].format(**dropped)
    report_lost(quiet)
    # Nothing silent is older now: the oldest goes, though it spoke.
    latest = h.silent(source(4))
    assert latest is not None
    assert not latest.disconnecting
    assert newest.disconnecting
    assert not talking.disconnecting


def test_one_address_cannot_take_the_whole_handshake_budget(
    ca: CertificateFactory,
) -> None:
    h = harness(
        ca, FakeAuthorizer({"api"}), max_handshakes=100, max_handshakes_per_address=2
    )
    other = h.silent(source(9))
    one = [h.silent(source(1)) for _ in range(3)]
    assert other is not None
    assert not other.disconnecting
    assert [t is not None and t.disconnecting for t in one] == [True, False, False]


def test_past_half_the_budget_handshakes_get_a_shorter_timeout(
    ca: CertificateFactory,
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}), max_handshakes=4, handshake_timeout=10)
    relaxed = [h.silent(source(n)) for n in range(2)]
    pressed = h.silent(source(2))
    assert pressed is not None
    h.reactor.advance(2)
    assert pressed.disconnecting
    assert not any(t is not None and t.disconnecting for t in relaxed)
    h.reactor.advance(8)
    assert all(t is not None and t.disconnecting for t in relaxed)


def test_a_refused_certificate_is_logged_with_the_peer_address(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}))
    other = ca.another_ca()
    h.connect(client_leaf=other.leaf("api"), client_ca=other, address=source(7))
    [refusal] = [e for e in decisions(logged) if e.get("allowed") is False]
    text = refusal["log_format"].format(**refusal)
    assert "refused the peer's certificate" in text
    assert refusal["address"] == str(source(7))
    assert "does not verify against the current roots" in refusal["reason"]


def test_a_flood_of_refusals_is_summed_up_not_logged_one_by_one(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}), max_handshakes=1000)
    held = [h.silent(source(n % 5)) for n in range(50)]
    h.reactor.advance(10)
    assert all(t is not None and t.disconnecting for t in held)
    one_by_one = [e for e in logged if e.get("reason") == "handshake timeout"]
    assert len(one_by_one) == BURST
    assert not [e for e in logged if e.get("summary")]

    h.reactor.advance(10)
    [summary] = [e for e in logged if e.get("summary")]
    assert summary["count"] == 50 - len(one_by_one)
    assert summary["addresses"] == 5
    assert summary["reason"] == "handshakes timed out"
    text = summary["log_format"].format(**summary)
    assert text.startswith("Connect web: 30 handshakes timed out from 5 addresses")
    # A new interval logs one by one again.
    h.silent(source(1))
    h.reactor.advance(10)
    assert len([e for e in logged if e.get("reason") == "handshake timeout"]) == 21


# --- the TLS transport, injected ---------------------------------------------


def test_an_injected_tls_protocol_carries_each_connection(
    ca: CertificateFactory,
) -> None:
    made: list[TLSServerProtocol] = []

    def make(connection_for: Any, gate: Any) -> TLSServerProtocol:
        protocol = TLSServerProtocol(connection_for, gate)
        made.append(protocol)
        return protocol

    h = harness(ca, FakeAuthorizer({"api"}), tls_protocol=make)
    conn = h.connect([b"through"])
    assert made == [conn.server]
    assert h.apps.built[0].received == b"through"


def test_the_transport_is_no_longer_named_by_a_string() -> None:
    """
    ``tls_transport=`` is gone: the transport is an injected factory only.
    """
    with pytest.raises(TypeError, match="tls_transport"):
        ConnectServerEndpoint(  # type: ignore[call-arg]
            MemoryReactorClock(),
            TCP4ServerEndpoint(MemoryReactorClock(), 1),
            StaticSource(),
            FakeAuthorizer(set()),
            "web",
            tls_transport="connect_native",
        )


def test_the_server_does_not_import_the_terminator() -> None:
    """
    Imports run one way, terminator -> server: the public endpoint knows
    nothing of the terminator's own transport.
    """
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, connect_native.server; "
            "print(sorted(m for m in sys.modules "
            "if m.startswith('connect_native.terminator')))",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip() == "[]", result.stderr


# --- half-close ---------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class HalfClosingApp(App):
    def readConnectionLost(self) -> None:
        self.events.append(("readConnectionLost",))
        self.transport.write(b"reply to " + self.received)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


def test_a_close_notify_before_the_decision_reaches_a_half_closeable_app(
    ca: CertificateFactory,
) -> None:
    authorizer = FakeAuthorizer({"api"}, hold=True)
    h = harness(ca, authorizer)
    h.apps.app_class = HalfClosingApp
    conn = h.connect([b"request"])
    conn.client.loseConnection()  # close_notify right after the request
    conn.pump.flush()
    assert h.apps.built == []
    assert authorizer.release() == 1
    conn.pump.flush()
    [app] = h.apps.built
    assert app.events[-3:] == [
        ("data", b"request"),
        ("readConnectionLost",),
        ("connectionLost",),
    ]
    assert conn.client_app.received == b"reply to request"
    assert conn.client_app.lost is not None
    assert conn.client_app.lost.check(ConnectionDone)


def test_a_close_notify_before_the_decision_closes_an_app_that_cannot_half_close(
    ca: CertificateFactory,
) -> None:
    authorizer = FakeAuthorizer({"api"}, hold=True)
    h = harness(ca, authorizer)
    conn = h.connect([b"request"])
    conn.client.loseConnection()
    conn.pump.flush()
    assert authorizer.release() == 1
    conn.pump.flush()
    [app] = h.apps.built
    assert app.events[-2:] == [("data", b"request"), ("connectionLost",)]
