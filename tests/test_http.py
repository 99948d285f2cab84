"""
Tests for connect_native.http: host names, the endpoint factory, and whole
treq requests in memory: a ``MemoryReactorClock``, the agent's health API
behind ``StubTreq``, and a twisted.web site behind a fake Connect instance
(real TLS through iosim).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import treq
import zope.interface
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone, ResponseNeverReceived
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from connect_native.client import ConnectClientEndpoint, ConnectTimeout
from connect_native.consul.client import ConsulClient
from connect_native.http import (
    ConnectEndpointFactory,
    ConnectHost,
    ConnectHTTPClient,
    NotAConnectHost,
    RequestTimeout,
    ResponseBodyTimeout,
    client,
    parse_connect_host,
)
from connect_native.resolve import ConsulResolver, IResolver, PreparedQueryResolver
from connect_native.testing import (
    CertificateFactory,
    FakeBundleSource,
    FakeServiceInstance,
    make_bundle,
)
from connect_native.tls import peer_identity
from tests.deferreds import failed, fired

# --- host names ---


@pytest.mark.parametrize(
    ("host", "parsed"),
    [
        ("web.service.consul", ConnectHost("service", "web")),
        ("web.service.dc2.consul", ConnectHost("service", "web", datacenter="dc2")),
        (
            "web.service.team.ns.consul",
            ConnectHost("service", "web", namespace="team"),
        ),
        (
            "web.service.team.ns.p1.ap.dc2.consul",
            ConnectHost(
                "service", "web", datacenter="dc2", namespace="team", partition="p1"
            ),
        ),
        ("web.service.p1.ap.consul", ConnectHost("service", "web", partition="p1")),
        ("Web.SERVICE.Consul.", ConnectHost("service", "Web")),
        ("db-q.query.consul", ConnectHost("query", "db-q")),
        ("db-q.query.dc2.consul", ConnectHost("query", "db-q", datacenter="dc2")),
    ],
)
def test_connect_host_names(host: str, parsed: ConnectHost) -> None:
    assert parse_connect_host(host) == parsed


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("example.com", "does not end in .consul"),
        ("web.consul", "does not end in .consul"),
        ("web.node.consul", "'node'"),
        ("web.service.a.b.consul", "after the service"),
        ("q.query.a.b.consul", "a query name"),
        ("web..service.consul", "empty label"),
    ],
)
def test_other_hosts_are_refused_saying_to_use_a_plain_client(
    host: str, why: str
) -> None:
    with pytest.raises(NotAConnectHost) as info:
        parse_connect_host(host)
    message = str(info.value)
    assert repr(host) in message
    assert why in message
    assert "plain HTTP client" in message


# --- the endpoint factory ---


@pytest.fixture
def endpoints() -> ConnectEndpointFactory:
    ca = CertificateFactory()
    return ConnectEndpointFactory(
        MemoryReactorClock(),
        ConsulClient(MemoryReactorClock()),
        FakeBundleSource(make_bundle(ca, "api")),
        timeout=5,
    )


def test_a_service_host_is_a_consul_resolver_endpoint(
    endpoints: ConnectEndpointFactory,
) -> None:
    endpoint = endpoints.endpointForURI(
        URI.fromBytes(b"https://db.service.team.ns.dc2.consul/x")
    )
    assert isinstance(endpoint, ConnectClientEndpoint)
    resolver = endpoint.resolver
    assert isinstance(resolver, ConsulResolver)
    assert (resolver.query.service, resolver.query.datacenter) == ("db", "dc2")
    assert resolver.query.namespace == "team"
    assert endpoint.alpn_protocols == (b"http/1.1",)
    assert endpoint.timeout == 5
    # One endpoint per host: its resolver and failure memory carry over.
    again = endpoints.endpointForURI(
        URI.fromBytes(b"https://db.service.team.ns.dc2.consul/y")
    )
    assert again is endpoint


def test_a_query_host_is_a_prepared_query_endpoint(
    endpoints: ConnectEndpointFactory,
) -> None:
    endpoint = endpoints.endpointForURI(URI.fromBytes(b"https://db-q.query.consul/"))
    assert isinstance(endpoint, ConnectClientEndpoint)
    assert isinstance(endpoint.resolver, PreparedQueryResolver)
    assert endpoint.resolver.name == "db-q"


def test_plain_http_is_refused(endpoints: ConnectEndpointFactory) -> None:
    with pytest.raises(NotAConnectHost, match="always TLS"):
        endpoints.endpointForURI(URI.fromBytes(b"http://db.service.consul/"))


# --- whole requests, in memory ---


@zope.interface.implementer(IResolver)
class RecordingResolver:
    """A resolver whose resolve() waits for the test, and whose close() counts."""

    def __init__(self, host: ConnectHost) -> None:
        self.host = host
        self.closed = 0
        self.pending: list[Deferred[Any]] = []
        self.description = f"fake {host.name}"

    def resolve(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def close(self) -> None:
        self.closed += 1


class RecordingFactory(ConnectEndpointFactory):
    def resolver_for(self, host: ConnectHost) -> Any:
        return RecordingResolver(host)


def bounded_endpoints(max_hosts: int) -> tuple[RecordingFactory, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    factory = RecordingFactory(
        reactor,
        ConsulClient(reactor),
        FakeBundleSource(make_bundle(CertificateFactory(), "api")),
        max_hosts=max_hosts,
        timeout=5,
    )
    return factory, reactor


def endpoint_for(factory: ConnectEndpointFactory, host: str) -> Any:
    return factory.endpointForURI(URI.fromBytes(f"https://{host}/".encode()))


def test_endpoints_are_kept_for_at_most_max_hosts_least_recently_used_first() -> None:
    factory, _ = bounded_endpoints(2)
    a = endpoint_for(factory, "a.service.consul")
    b = endpoint_for(factory, "b.service.consul")
    assert endpoint_for(factory, "a.service.consul") is a  # a is now the newest
    c = endpoint_for(factory, "c.service.consul")
    # b was the least recently used: forgotten, its watch let go of.
    assert (a.resolver.closed, b.resolver.closed, c.resolver.closed) == (0, 1, 0)
    assert endpoint_for(factory, "a.service.consul") is a
    assert endpoint_for(factory, "c.service.consul") is c
    again = endpoint_for(factory, "b.service.consul")
    assert again is not b
    assert again.resolver.closed == 0
    # ... which forgot a, the least recently used by then.
    assert a.resolver.closed == 1
    assert len(factory._endpoints) == 2


def test_a_forgotten_endpoint_with_a_dial_in_flight_lets_go_when_the_dial_ends() -> (
    None
):
    factory, reactor = bounded_endpoints(1)
    a = endpoint_for(factory, "a.service.consul")
    dialing = a.connect(Factory.forProtocol(Protocol))
    assert len(a.resolver.pending) == 1  # resolving
    endpoint_for(factory, "b.service.consul")
    # Closing now would fail the dial with a cancelled resolution.
    assert a.resolver.closed == 0
    assert not a.resolver.pending[0].called
    dialing.cancel()
    assert a.resolver.closed == 1
    assert reactor.getDelayedCalls() == []
    # A caller that still holds it may dial again; it lets go again after.
    again = a.connect(Factory.forProtocol(Protocol))
    assert a.resolver.closed == 1
    reactor.advance(5)  # the dial's deadline
    assert isinstance(failed(again), ConnectTimeout)
    assert a.resolver.closed == 2
    assert reactor.getDelayedCalls() == []


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3"])
def test_max_hosts_must_be_a_whole_number_of_at_least_one(bad: Any) -> None:
    reactor = MemoryReactorClock()
    with pytest.raises(ValueError, match="max_hosts"):
        client("api", reactor=reactor, consul=ConsulClient(reactor), max_hosts=bad)


def health_entry(service: str, address: str, port: int) -> dict[str, Any]:
    return {
        "Node": {"ID": "n1", "Node": "node1", "Address": address, "Datacenter": "dc1"},
        "Service": {
            "ID": f"{service}-{port}",
            "Service": service,
            "Address": address,
            "Port": port,
            "Connect": {"Native": True},
        },
        "Checks": [],
    }


class Health(Resource):
    isLeaf = True

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        super().__init__()
        self.entries = entries

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("X-Consul-Index", "5")
        return json.dumps(self.entries).encode()


class Hello(Resource):
    """Says who called, and echoes a POST body."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello " + peer_identity(request.channel.transport).service.encode()  # type: ignore[union-attr]

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        return b"got " + request.content.read()


class Mesh:
    """Our service ``api``, one ``web`` instance at 10.0.0.1:8443."""

    def __init__(self, app: Any = None, alpn_protocols: Any = ()) -> None:
        self.reactor = MemoryReactorClock()
        ca = CertificateFactory()
        if app is None:
            site = Site(Hello(), reactor=self.reactor)
            site.timeOut = None
            app = site
        self.web = FakeServiceInstance(
            make_bundle(ca, "web"), app, alpn_protocols=alpn_protocols
        )
        consul = ConsulClient(
            self.reactor,
            http_client=StubTreq(Health([health_entry("web", "10.0.0.1", 8443)])),
        )
        self.http = client(
            reactor=self.reactor,
            consul=consul,
            bundle_source=FakeBundleSource(make_bundle(ca, "api")),
            timeout=20,
        )
        self.pumps: list[Any] = []

    def accept(self) -> None:
        self.pumps.append(self.web.accept(self.reactor, self.reactor))

    def flush(self) -> None:
        for _ in range(5):
            for pump in self.pumps:
                pump.flush()


def test_get_and_post_reach_the_service_over_connect() -> None:
    mesh = Mesh()
    d = mesh.http.get("https://web.service.consul/hello")
    ((host, port, *_),) = mesh.reactor.tcpClients
    assert (host, port) == ("10.0.0.1", 8443)
    mesh.accept()
    mesh.flush()
    response = fired(d)
    assert response.code == 200
    assert fired(treq.content(response)) == b"hello api"
    posted = mesh.http.post("https://web.service.consul/echo", data=b"payload")
    mesh.flush()
    assert fired(treq.content(fired(posted))) == b"got payload"
    # The second request reused the persistent connection.
    assert len(mesh.reactor.tcpClients) == 1


def test_only_http_1_1_is_offered() -> None:
    mesh = Mesh(alpn_protocols=[b"h2", b"http/1.1"])
    d = mesh.http.get("https://web.service.consul/hello")
    mesh.accept()
    mesh.flush()
    (pump,) = mesh.pumps
    # The server would rather speak h2; the client offered http/1.1 only.
    assert pump.server.negotiatedProtocol == b"http/1.1"
    assert fired(d).code == 200


def test_another_host_fails_the_request_saying_to_use_a_plain_client() -> None:
    mesh = Mesh()
    error = failed(mesh.http.get("https://example.com/"))
    assert isinstance(error, NotAConnectHost)
    assert "plain HTTP client" in str(error)
    assert mesh.reactor.tcpClients == []


def test_a_request_times_out_by_default() -> None:
    mesh = Mesh(Factory.forProtocol(Protocol))  # accepts, never answers
    d = mesh.http.get("https://web.service.consul/slow")
    mesh.accept()
    mesh.flush()
    mesh.reactor.advance(19.9)
    assert not d.called
    mesh.reactor.advance(0.1)
    error = failed(d)
    assert isinstance(error, RequestTimeout)
    assert "GET https://web.service.consul/slow" in str(error)
    assert "20s" in str(error)


def test_a_request_may_give_its_own_timeout() -> None:
    mesh = Mesh(Factory.forProtocol(Protocol))
    d = mesh.http.get("https://web.service.consul/slow", timeout=2)
    mesh.accept()
    mesh.flush()
    mesh.reactor.advance(2)
    assert d.called
    assert not isinstance(failed(d), RequestTimeout)


class HangUpOnce(Protocol):
    """Closes the first connection as soon as a request arrives."""

    hung_up = 0

    def dataReceived(self, data: bytes) -> None:
        HangUpOnce.hung_up += 1
        self.transport.loseConnection()  # type: ignore[union-attr]


class FirstHangsUp(Factory):
    def __init__(self, reactor: Any) -> None:
        self.built = 0
        site = Site(Hello(), reactor=reactor)
        site.timeOut = None
        self.site = site

    def buildProtocol(self, addr: Any) -> Protocol | None:
        self.built += 1
        if self.built == 1:
            return HangUpOnce()
        return self.site.buildProtocol(addr)


def test_an_idempotent_request_is_sent_again_after_a_reset_before_any_response() -> (
    None
):
    reactor_holder = MemoryReactorClock()
    mesh = Mesh(FirstHangsUp(reactor_holder))
    d = mesh.http.get("https://web.service.consul/hello")
    mesh.accept()
    mesh.flush()
    assert not d.called
    assert len(mesh.reactor.tcpClients) == 2  # a new connection for the retry
    mesh.accept()
    mesh.flush()
    assert fired(treq.content(fired(d))) == b"hello api"


def test_a_post_is_not_sent_again_after_a_reset() -> None:
    mesh = Mesh(FirstHangsUp(MemoryReactorClock()))
    d = mesh.http.post("https://web.service.consul/echo", data=b"once")
    mesh.accept()
    mesh.flush()
    assert isinstance(failed(d), ResponseNeverReceived)
    assert len(mesh.reactor.tcpClients) == 1


def test_the_client_needs_our_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONNECT_NATIVE_SERVICE", raising=False)
    with pytest.raises(ValueError, match="CONNECT_NATIVE_SERVICE"):
        client(reactor=MemoryReactorClock(), consul=ConsulClient(MemoryReactorClock()))


def test_bad_settings_are_refused() -> None:
    reactor = MemoryReactorClock()
    consul = ConsulClient(reactor)
    with pytest.raises(ValueError, match="timeout"):
        client("api", reactor=reactor, consul=consul, timeout=0)
    with pytest.raises(ValueError, match="retries"):
        client("api", reactor=reactor, consul=consul, retries=-1)


def test_close_closes_idle_connections() -> None:
    mesh = Mesh()
    d = mesh.http.get("https://web.service.consul/hello")
    mesh.accept()
    mesh.flush()
    fired(treq.content(fired(d)))
    (pump,) = mesh.pumps
    assert not pump.clientIO.disconnected
    closed = mesh.http.close()
    mesh.flush()
    fired(closed)
    assert pump.clientIO.disconnected


# --- the response body is bounded by the request's deadline ---


class BodyTransport:
    """The transport a response gives its body protocol."""

    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@zope.interface.implementer(IResponse)
class SlowResponse:
    """
    A response whose body comes only as the test sends it: ``send(data)``,
    then ``finish()`` (or never, for a server that stalls).
    """

    version = (b"HTTP", 1, 1)
    phrase = b"OK"
    length = UNKNOWN_LENGTH
    request = None
    previousResponse = None

    def __init__(self, code: int = 200, headers: Headers | None = None) -> None:
        self.code = code
        self.headers = headers or Headers()
        self.transport = BodyTransport()
        self.protocol: Any = None

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))


@zope.interface.implementer(IAgent)
class HeldAgent:
    """Answers each request with the Deferred the test fires."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, Deferred[Any]]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.requests.append((uri, d))
        return d

    def answer(self, response: SlowResponse, which: int = -1) -> None:
        self.requests[which][1].callback(response)


def held_client(
    timeout: float | None = 20,
) -> tuple[ConnectHTTPClient, HeldAgent, Clock]:
    agent, clock = HeldAgent(), Clock()
    return ConnectHTTPClient(agent, clock, timeout), agent, clock


URL = "https://web.service.consul/report"


def test_a_body_that_stalls_after_the_headers_fails_at_the_request_deadline() -> None:
    http, agent, clock = held_client(timeout=20)
    d = http.get(URL)
    clock.advance(5)
    response = SlowResponse()
    agent.answer(response)
    body = treq.content(fired(d))
    response.send(b"first part")
    clock.advance(14.9)  # 19.9s after the request started
    assert not body.called
    assert not response.transport.stopped
    clock.advance(0.1)
    error = failed(body)
    assert isinstance(error, ResponseBodyTimeout)
    assert isinstance(error, RequestTimeout)  # one except clause catches both
    message = str(error)
    assert f"GET {URL}" in message
    assert "response body did not complete within 20s" in message
    assert "the client's default timeout; pass timeout= to a request" in message
    assert response.transport.stopped  # the stalled connection is let go of
    assert clock.getDelayedCalls() == []
    response.send(b"late")  # what the transport still delivers is dropped
    response.finish()


def test_a_body_that_completes_in_time_cancels_its_deadline() -> None:
    http, agent, clock = held_client(timeout=20)
    d = http.get(URL)
    response = SlowResponse()
    agent.answer(response)
    body = treq.content(fired(d))
    response.send(b"all ")
    (deadline,) = clock.getDelayedCalls()
    assert deadline.getTime() == 20
    clock.advance(19)
    response.send(b"of it")
    response.finish()
    assert fired(body) == b"all of it"
    assert clock.getDelayedCalls() == []
    assert not response.transport.stopped


def test_collect_and_deliver_body_are_bounded_too() -> None:
    http, agent, clock = held_client(timeout=20)
    d = http.get(URL, unbuffered=True)
    response = SlowResponse()
    agent.answer(response)
    parts: list[bytes] = []
    collected = treq.collect(fired(d), parts.append)
    response.send(b"one")
    clock.advance(20)
    assert parts == [b"one"]
    assert isinstance(failed(collected), ResponseBodyTimeout)
    assert response.transport.stopped


def test_a_requests_own_timeout_bounds_its_body() -> None:
    http, agent, clock = held_client(timeout=20)
    d = http.get(URL, timeout=5)
    clock.advance(1)
    response = SlowResponse()
    agent.answer(response)
    body = treq.content(fired(d))
    clock.advance(3.9)
    assert not body.called
    clock.advance(0.1)
    error = failed(body)
    assert isinstance(error, ResponseBodyTimeout)
    assert "within 5s" in str(error)
    assert "the request's own timeout=" in str(error)
    assert clock.getDelayedCalls() == []


def test_a_requests_own_timeout_still_bounds_its_headers() -> None:
    http, agent, clock = held_client(timeout=20)
    d = http.get(URL, timeout=5)
    clock.advance(5)
    # treq's own timeout: it cancels the request.
    assert isinstance(failed(d), CancelledError)
    ((_, sent),) = agent.requests
    assert sent.called


def test_without_a_timeout_the_body_is_not_bounded() -> None:
    http, agent, clock = held_client(timeout=None)
    d = http.get(URL)
    response = SlowResponse()
    agent.answer(response)
    body = treq.content(fired(d))
    assert clock.getDelayedCalls() == []
    clock.advance(10_000)
    assert not body.called
    response.send(b"eventually")
    response.finish()
    assert fired(body) == b"eventually"


def test_a_body_read_after_the_deadline_passed_is_cut_off() -> None:
    http, agent, clock = held_client(timeout=20)
    d = http.get(URL)
    response = SlowResponse()
    agent.answer(response)
    answered = fired(d)
    clock.advance(30)
    body = treq.content(answered)
    assert not body.called  # the next turn of the reactor, not within deliverBody
    clock.advance(0)
    assert isinstance(failed(body), ResponseBodyTimeout)


def test_a_redirected_request_keeps_the_deadline_of_the_first() -> None:
    http, agent, clock = held_client(timeout=20)
    d = http.get(URL)
    clock.advance(3)
    agent.answer(
        SlowResponse(302, Headers({b"Location": [b"https://web.service.consul/moved"]}))
    )
    assert [uri for uri, _ in agent.requests] == [
        URL.encode(),
        b"https://web.service.consul/moved",
    ]
    clock.advance(5)
    final = SlowResponse()
    agent.answer(final)
    response = fired(d)
    assert response.code == 200
    # Everything but the body is the original response's.
    assert (response.version, response.phrase, response.length) == (
        final.version,
        final.phrase,
        final.length,
    )
    assert response.headers is final.headers
    assert response.previousResponse.code == 302
    body = treq.content(response)
    clock.advance(11.9)  # 19.9s after the first request started
    assert not body.called
    clock.advance(0.1)
    assert isinstance(failed(body), ResponseBodyTimeout)
    assert final.transport.stopped


class StallingBody(Resource):
    """Sends the headers and part of the body, then nothing more."""

    isLeaf = True

    def render_GET(self, request: Request) -> object:
        request.setHeader(b"Content-Length", b"1000")
        request.write(b"the first bytes")
        return NOT_DONE_YET


def test_a_stalled_body_from_a_connect_server_closes_the_connection() -> None:
    site = Site(StallingBody(), reactor=MemoryReactorClock())
    site.timeOut = None
    mesh = Mesh(site)
    d = mesh.http.get("https://web.service.consul/stall")
    mesh.accept()
    mesh.flush()
    response = fired(d)
    assert response.code == 200
    body = treq.content(response)
    mesh.flush()
    (pump,) = mesh.pumps
    assert not pump.clientIO.disconnected
    mesh.reactor.advance(20)
    mesh.flush()
    error = failed(body)
    assert isinstance(error, ResponseBodyTimeout)
    assert "GET https://web.service.consul/stall" in str(error)
    assert pump.clientIO.disconnected
