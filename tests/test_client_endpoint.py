"""
Tests for connect_native.client.ConnectClientEndpoint on a
``MemoryReactorClock``: real TLS in memory between the endpoint and fake
service instances (``connect_native.testing.FakeServiceInstance``, iosim),
every deadline and retry decided by the clock.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.error import NoProtocol
from twisted.internet.interfaces import IHandshakeListener, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from connect_native.certs import Bundle, RootPEMs
from connect_native.client import (
    AllInstancesFailed,
    ConnectClientEndpoint,
    ConnectError,
    ConnectTimeout,
    HandshakeTimeout,
    IdentityMismatch,
    NoCertificate,
    NoHealthyInstances,
    ResolutionFailed,
)
from connect_native.resolve import ExpectedIdentity, ResolveError
from connect_native.testing import (
    CertificateFactory,
    FakeBundleSource,
    FakeResolver,
    FakeServiceInstance,
    RecordingProtocol,
    StaticResolver,
    fake_instance,
    make_bundle,
)
from connect_native.tls import peer_identity
from tests.deferreds import failed, fired


class InOrder(random.Random):
    """Picks the instances in the resolver's order."""

    def randrange(self, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        return 0


@implementer(IHandshakeListener)
class App(Protocol):
    """The client application: records when it was connected, and what for."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.events.append("connectionMade")
        # Whatever it writes at once must go to a verified server only.
        self.transport.write(b"hello")  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.events.append("handshakeCompleted")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = reason


class AppFactory(Factory):
    def __init__(self) -> None:
        self.built: list[App] = []
        self.starts = 0
        self.stops = 0

    def buildProtocol(self, addr: Any) -> App:
        app = App()
        app.factory = self
        self.built.append(app)
        return app

    def doStart(self) -> None:
        self.starts += 1

    def doStop(self) -> None:
        self.stops += 1


class World:
    """One CA, our service ``api``, and helpers to run servers."""

    def __init__(self) -> None:
        self.ca = CertificateFactory()
        self.reactor = MemoryReactorClock()
        self.source = FakeBundleSource(make_bundle(self.ca, "api"))
        self.app = AppFactory()

    def server(
        self, service: str = "db", address: str = "10.0.0.1", **kwargs: Any
    ) -> FakeServiceInstance:
        return FakeServiceInstance(
            make_bundle(self.ca, service), address=address, **kwargs
        )

    def endpoint(self, *servers: FakeServiceInstance, **kwargs: Any) -> Any:
        resolver = StaticResolver([s.instance for s in servers])
        kwargs.setdefault("rng", InOrder())
        return ConnectClientEndpoint(self.reactor, resolver, self.source, **kwargs)


@pytest.fixture
def world() -> World:
    return World()


# --- connecting ------------------------------------------------------------------


def test_it_is_a_client_endpoint(world: World) -> None:
    assert verifyObject(IStreamClientEndpoint, world.endpoint(world.server()))


def test_connects_to_the_instance_and_verifies_each_side(world: World) -> None:
    db = world.server("db")
    d = world.endpoint(db).connect(world.app)
    (host, port, *_), *_ = world.reactor.tcpClients
    assert (host, port) == ("10.0.0.1", 8443)
    pump = db.accept(world.reactor, world.reactor)
    app = fired(d)
    assert world.app.built == [app]
    assert peer_identity(app.transport).service == "db"  # type: ignore[union-attr]
    pump.flush()
    (server_app,) = db.protocols
    assert peer_identity(server_app.transport).service == "api"  # type: ignore[union-attr]
    assert server_app.received == b"hello"
    server_app.transport.write(b"hi")  # type: ignore[union-attr]
    pump.flush()
    assert app.received == b"hi"


def test_the_application_exists_only_after_the_handshake(world: World) -> None:
    db = world.server("db")
    d = world.endpoint(db).connect(world.app)
    pump = db.accept_and_stall(world.reactor, world.reactor)
    pump.flush()
    # TCP is up, the handshake is not done: no protocol, nothing written.
    assert world.app.built == []
    assert not d.called
    assert world.app.starts == 0


def test_the_application_hears_of_the_connection_after_the_handshake(
    world: World,
) -> None:
    db = world.server("db")
    d = world.endpoint(db).connect(world.app)
    db.accept(world.reactor, world.reactor)
    app = fired(d)
    assert app.events == ["connectionMade", "handshakeCompleted"]
    assert world.app.starts == 1


def test_the_application_factory_is_stopped_when_the_connection_ends(
    world: World,
) -> None:
    db = world.server("db")
    d = world.endpoint(db).connect(world.app)
    pump = db.accept(world.reactor, world.reactor)
    app = fired(d)
    app.transport.loseConnection()  # type: ignore[union-attr]
    pump.flush()
    assert app.lost is not None
    # What the reactor's connector does around a connection's life.
    connector_factory = world.reactor.tcpClients[0][2]
    connector_factory.doStart()
    connector_factory.doStop()
    assert (world.app.starts, world.app.stops) == (1, 1)


def test_alpn_protocols_are_offered(world: World) -> None:
    db = world.server("db", alpn_protocols=[b"http/1.1"])
    d = world.endpoint(db, alpn_protocols=[b"http/1.1"]).connect(world.app)
    db.accept(world.reactor, world.reactor)
    app = fired(d)
    assert app.transport.negotiatedProtocol == b"http/1.1"  # type: ignore[union-attr]


def test_a_factory_that_builds_no_protocol_fails_the_connect(world: World) -> None:
    db = world.server("db")
    refusing = Factory.forProtocol(Protocol)
    refusing.buildProtocol = lambda addr: None  # type: ignore[method-assign]
    d = world.endpoint(db).connect(refusing)
    pump = db.accept(world.reactor, world.reactor)
    assert isinstance(failed(d), NoProtocol)
    pump.flush()
    assert db.protocols[0].lost is not None  # type: ignore[attr-defined]


def test_tcp_endpoints_by_address_kind(world: World) -> None:
    endpoint = world.endpoint()
    by_ip = endpoint._tcp_endpoint(fake_instance("db", address="10.0.0.1"), 3.0)
    by_name = endpoint._tcp_endpoint(fake_instance("db", address="db.internal"), 3.0)
    assert isinstance(by_ip, TCP4ClientEndpoint)
    assert isinstance(by_name, HostnameEndpoint)


# --- identity -------------------------------------------------------------------------


def test_another_service_is_an_identity_mismatch_naming_both_uris(
    world: World,
) -> None:
    cache = world.server("cache", identity=ExpectedIdentity("db", "dc1"))
    d = world.endpoint(cache).connect(world.app)
    cache.accept(world.reactor, world.reactor)
    error = failed(d)
    assert isinstance(error, IdentityMismatch)
    got = world.ca.service_uri("cache")
    wanted = world.ca.service_uri("db")
    assert (error.got, error.wanted) == (got, wanted)
    assert got in str(error)
    assert wanted in str(error)
    assert world.ca.trust_domain in str(error)
    assert world.app.built == []
    # Our application never existed, so nothing reached the wrong server.
    assert cache.protocols[0].received == b""  # type: ignore[attr-defined]


def test_a_server_of_another_trusted_trust_domain_is_accepted(world: World) -> None:
    other = CertificateFactory()
    world.source.set(make_bundle(world.ca, "api", extra_roots=[other]))
    db = FakeServiceInstance(make_bundle(other, "db", extra_roots=[world.ca]))
    d = world.endpoint(db).connect(world.app)
    db.accept(world.reactor, world.reactor)
    app = fired(d)
    assert peer_identity(app.transport).trust_domain == other.trust_domain  # type: ignore[union-attr]


def test_a_fixed_trust_domain_refuses_another_trusted_one(world: World) -> None:
    other = CertificateFactory()
    world.source.set(make_bundle(world.ca, "api", extra_roots=[other]))
    db = FakeServiceInstance(
        make_bundle(other, "db", extra_roots=[world.ca]),
        identity=ExpectedIdentity("db", "dc1", trust_domain=world.ca.trust_domain),
    )
    d = world.endpoint(db).connect(world.app)
    db.accept(world.reactor, world.reactor)
    error = failed(d)
    assert isinstance(error, IdentityMismatch)
    assert error.got == other.service_uri("db")
    assert error.wanted == world.ca.service_uri("db")


def test_a_server_of_an_untrusted_ca_is_refused(world: World) -> None:
    stranger = world.ca.another_ca()
    db = FakeServiceInstance(make_bundle(stranger, "db", extra_roots=[world.ca]))
    d = world.endpoint(db).connect(world.app)
    db.accept(world.reactor, world.reactor)
    error = failed(d)
    assert isinstance(error, AllInstancesFailed)
    assert "certificate was refused" in str(error)
    assert "does not verify" in str(error)
    assert world.app.built == []


def test_a_dropped_root_refuses_its_servers_though_our_leaf_stays(
    world: World,
) -> None:
    """
    At the end of a CA rotation the agent stops listing the old root while
    our leaf stays the same: the same endpoint, connecting again, refuses a
    server whose leaf chains only to the dropped root, in the handshake.
    """
    dropped = world.ca.another_ca()
    during = make_bundle(world.ca, "api", extra_roots=[dropped])
    world.source.set(during)
    db = FakeServiceInstance(make_bundle(dropped, "db", extra_roots=[world.ca]))
    endpoint = world.endpoint(db)
    first = endpoint.connect(world.app)
    db.accept(world.reactor, world.reactor)
    assert peer_identity(fired(first).transport) == db.bundle.identity

    world.source.set(
        Bundle.build(
            leaf_cert_pem=during.leaf_pem,
            private_key_pem=during.private_key_pem,
            roots=[RootPEMs(world.ca.root_pem)],
            trust_domain=world.ca.trust_domain,
            now=time.time(),
        )
    )
    second = endpoint.connect(world.app)
    db.accept(world.reactor, world.reactor)
    error = failed(second)
    assert isinstance(error, AllInstancesFailed)
    assert "does not verify against the current roots" in str(error)
    assert len(world.app.built) == 1


# --- retries --------------------------------------------------------------------------


def test_a_refused_instance_is_skipped_for_the_next(world: World) -> None:
    down, up = world.server(address="10.0.0.1"), world.server(address="10.0.0.2")
    d = world.endpoint(down, up).connect(world.app)
    down.refuse(world.reactor)
    up.accept(world.reactor, world.reactor)
    assert fired(d) is world.app.built[0]
    assert [c[0] for c in world.reactor.tcpClients] == ["10.0.0.1", "10.0.0.2"]


def test_every_instance_refusing_lists_each(world: World) -> None:
    servers = [world.server(address=f"10.0.0.{i}") for i in (1, 2)]
    d = world.endpoint(*servers).connect(world.app)
    for server in servers:
        server.refuse(world.reactor)
    error = failed(d)
    assert isinstance(error, AllInstancesFailed)
    assert [a.instance for a in error.attempts] == [s.instance for s in servers]
    assert [a.outcome for a in error.attempts] == ["connection refused"] * 2
    assert "10.0.0.1:8443" in str(error)
    assert "10.0.0.2:8443" in str(error)


def test_a_stalled_handshake_moves_on_after_the_attempt_timeout(world: World) -> None:
    stalled, up = world.server(address="10.0.0.1"), world.server(address="10.0.0.2")
    d = world.endpoint(stalled, up, timeout=10, attempt_timeout=2).connect(world.app)
    stalled.accept_and_stall(world.reactor, world.reactor)
    world.reactor.advance(1.9)
    assert len(world.reactor.tcpClients) == 1
    world.reactor.advance(0.1)
    assert len(world.reactor.tcpClients) == 2
    up.accept(world.reactor, world.reactor)
    assert fired(d) is world.app.built[0]


def test_a_tcp_connect_that_hangs_moves_on_after_the_attempt_timeout(
    world: World,
) -> None:
    silent, up = world.server(address="10.0.0.1"), world.server(address="10.0.0.2")
    d = world.endpoint(silent, up, attempt_timeout=2).connect(world.app)
    world.reactor.advance(2)
    assert world.reactor.connectors[0].stoppedConnecting
    up.accept(world.reactor, world.reactor)
    fired(d)


def test_a_server_that_never_handshakes_is_a_handshake_timeout_at_the_deadline(
    world: World,
) -> None:
    stalled = world.server()
    d = world.endpoint(stalled, timeout=5).connect(world.app)
    pump = stalled.accept_and_stall(world.reactor, world.reactor)
    world.reactor.advance(4.9)
    assert not d.called
    world.reactor.advance(0.1)
    error = failed(d)
    assert isinstance(error, HandshakeTimeout)
    assert isinstance(error, ConnectTimeout)
    assert "handshake did not complete" in str(error)
    pump.flush()
    assert pump.client.transport.disconnected  # aborted, nothing left open
    assert world.app.built == []


def test_the_deadline_covers_all_instances(world: World) -> None:
    servers = [world.server(address=f"10.0.0.{i}") for i in (1, 2, 3, 4)]
    d = world.endpoint(*servers, timeout=5, attempt_timeout=2).connect(world.app)
    world.reactor.advance(2)
    world.reactor.advance(2)
    world.reactor.advance(0.9)
    assert not d.called
    world.reactor.advance(0.1)
    error = failed(d)
    assert type(error) is ConnectTimeout
    assert "within 5s" in str(error)
    assert "1 instance(s) left untried" in str(error)
    assert len(error.attempts) == 3
    assert len(world.reactor.tcpClients) == 3
    assert all(c.stoppedConnecting for c in world.reactor.connectors)


def test_instances_are_tried_in_random_order(world: World) -> None:
    servers = [world.server(address=f"10.0.0.{i}") for i in range(1, 9)]
    endpoint = world.endpoint(*servers, rng=random.Random(7))
    d = endpoint.connect(world.app)
    for index in range(8):
        host = world.reactor.tcpClients[index][0]
        next(s for s in servers if s.instance.address == host).refuse(world.reactor)
    order = [c[0] for c in world.reactor.tcpClients]
    assert sorted(order) == sorted(s.instance.address for s in servers)
    assert order != [s.instance.address for s in servers]
    assert isinstance(failed(d), AllInstancesFailed)


# --- before any attempt -------------------------------------------------------------


def test_no_instances_is_no_healthy_instances(world: World) -> None:
    d = world.endpoint().connect(world.app)
    error = failed(d)
    assert isinstance(error, NoHealthyInstances)
    assert "no healthy instance" in str(error)
    assert world.reactor.tcpClients == []


def test_a_resolver_failure_is_a_resolution_failure(world: World) -> None:
    resolver = FakeResolver()
    resolver.fail(ResolveError("the agent said 500"))
    endpoint = ConnectClientEndpoint(world.reactor, resolver, world.source)
    error = failed(endpoint.connect(world.app))
    assert isinstance(error, ResolutionFailed)
    assert "the agent said 500" in str(error)


def test_a_slow_resolver_is_bounded_by_the_deadline(world: World) -> None:
    resolver = FakeResolver(hold=True)
    endpoint = ConnectClientEndpoint(world.reactor, resolver, world.source, timeout=3)
    d = endpoint.connect(world.app)
    world.reactor.advance(3)
    error = failed(d)
    assert isinstance(error, ConnectTimeout)
    assert "finding its instances" in str(error)
    assert resolver.release() == 0  # the lookup was cancelled


def test_it_waits_for_our_certificate(world: World) -> None:
    db = world.server()
    bundle = world.source.current()
    world.source.set(None)
    d = world.endpoint(db).connect(world.app)
    assert world.reactor.tcpClients == []
    world.source.set(bundle)
    db.accept(world.reactor, world.reactor)
    fired(d)


def test_no_certificate_before_the_deadline_is_no_certificate(world: World) -> None:
    world.source.set(None)
    d = world.endpoint(world.server(), timeout=4).connect(world.app)
    world.reactor.advance(4)
    error = failed(d)
    assert isinstance(error, NoCertificate)
    assert "service:write" in str(error)


def test_a_refused_certificate_is_no_certificate(world: World) -> None:
    world.source.set(None)
    d = world.endpoint(world.server()).connect(world.app)
    world.source.fail(RuntimeError("403 Permission denied"))
    error = failed(d)
    assert isinstance(error, NoCertificate)
    assert "403" in str(error)


def test_cancelling_stops_the_attempt(world: World) -> None:
    db = world.server()
    d = world.endpoint(db).connect(world.app)
    pump = db.accept_and_stall(world.reactor, world.reactor)
    d.cancel()
    assert isinstance(failed(d), CancelledError)
    pump.flush()
    assert pump.client.transport.disconnected
    world.reactor.advance(60)
    assert len(world.reactor.tcpClients) == 1


def test_every_error_is_a_connect_error(world: World) -> None:
    for kind in (
        NoCertificate,
        ResolutionFailed,
        NoHealthyInstances,
        IdentityMismatch,
        ConnectTimeout,
        HandshakeTimeout,
        AllInstancesFailed,
    ):
        assert issubclass(kind, ConnectError)


def test_bad_settings_are_refused(world: World) -> None:
    with pytest.raises(ValueError, match="timeout must be"):
        world.endpoint(timeout=0)
    with pytest.raises(ValueError, match="attempt_timeout must be"):
        world.endpoint(attempt_timeout=float("inf"))
    with pytest.raises(TypeError, match="resolver must provide IResolver"):
        ConnectClientEndpoint(world.reactor, object(), world.source)  # type: ignore[arg-type]


def test_recording_protocol_is_the_default_server_application(world: World) -> None:
    db = world.server()
    world.endpoint(db).connect(world.app)
    pump = db.accept(world.reactor, world.reactor)
    pump.flush()
    assert isinstance(db.protocols[0], RecordingProtocol)


# --- remembering failures -----------------------------------------------------------


def test_an_instance_that_failed_lately_is_tried_last(world: World) -> None:
    down, up = world.server(address="10.0.0.1"), world.server(address="10.0.0.2")
    endpoint = world.endpoint(down, up, failure_memory=30)
    first = endpoint.connect(world.app)
    down.refuse(world.reactor)
    up.accept(world.reactor, world.reactor)
    fired(first)
    # The rng would pick 10.0.0.1 first again; its refusal is remembered.
    second = endpoint.connect(world.app)
    assert world.reactor.tcpClients[-1][0] == "10.0.0.2"
    up.accept(world.reactor, world.reactor)
    fired(second)
    world.reactor.advance(30)
    endpoint.connect(world.app)
    assert world.reactor.tcpClients[-1][0] == "10.0.0.1"


# --- our own service ----------------------------------------------------------------


def test_our_service_is_the_argument_else_the_environment() -> None:
    from connect_native.client import our_service_name

    assert our_service_name("web", {"CONNECT_NATIVE_SERVICE": "api"}) == "web"
    assert our_service_name(None, {"CONNECT_NATIVE_SERVICE": "api"}) == "api"
    with pytest.raises(ValueError, match="CONNECT_NATIVE_SERVICE") as info:
        our_service_name(None, {})
    assert "our_service=" in str(info.value)
    with pytest.raises(ValueError, match="our_service must be"):
        our_service_name("  ", {})


class FakeManager:
    """Stands in for a CertManager in a registry."""

    def __init__(self, clock: Any, client: Any, service: str) -> None:
        self.service = service
        self.running = False
        self.source = FakeBundleSource()

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> None:
        self.running = False

    def current(self) -> Any:
        return self.source.current()

    def when_ready(self) -> Deferred[Any]:
        return self.source.when_ready()


def test_for_service_presents_our_services_shared_certificate(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connect_native.service import CertManagerRegistry

    made: list[FakeManager] = []

    def factory(clock: Any, client: Any, service: str) -> Any:
        made.append(FakeManager(clock, client, service))
        return made[-1]

    registry = CertManagerRegistry(factory)
    monkeypatch.setenv("CONNECT_NATIVE_SERVICE", "api")
    consul = object()
    endpoint = ConnectClientEndpoint.for_service(
        world.reactor,
        "db",
        consul=consul,
        registry=registry,  # type: ignore[arg-type]
    )
    assert endpoint.resolver.service == "db"
    assert made == []  # nothing is held before it is used
    endpoint._source.current()
    (manager,) = made
    assert (manager.service, manager.running) == ("api", True)
    endpoint.close()
    assert not manager.running


def test_for_service_without_our_service_says_how_to_name_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONNECT_NATIVE_SERVICE", raising=False)
    with pytest.raises(ValueError, match="CONNECT_NATIVE_SERVICE"):
        ConnectClientEndpoint.for_service(world.reactor, "db", consul=object())  # type: ignore[arg-type]
