"""
Tests for connect_native.resolve: the expected-identity and instance
records, StaticResolver, and ConsulResolver and PreparedQueryResolver on a
real ConsulClient talking to an in-memory agent (twisted.web behind
``treq.testing.StubTreq``) answering with the real 1.8.7 captures, on a
``Clock``.  DnsResolver has its own file (it needs a UDP socket).
"""

from __future__ import annotations

import copy
import gc
import json
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from connect_native.consul.client import ConsulClient
from connect_native.identity import InvalidIdentity, ServiceIdentity
from connect_native.resolve import (
    ConsulResolver,
    ExpectedIdentity,
    Instance,
    IResolver,
    PreparedQueryResolver,
    ResolveError,
    StaleAnswer,
    StaticResolver,
)
from tests.captures import body as capture_body
from tests.deferreds import failed as failure_of
from tests.deferreds import fired as result

TD = "35fbb6e4-f678-8abb-17a1-d9437ce1a4b3.consul"
OTHER_TD = "11111111-2222-3333-4444-555555555555.consul"


# --- the in-memory agent ----------------------------------------------------------


class FakeHealth(Resource):
    """
    ``/v1/health/connect/<service>`` with the agent's blocking rules: an
    index at or above the current one holds the request until the entries
    change.  ``/v1/agent/self`` says datacenter ``dc-agent``.
    """

    isLeaf = True

    def __init__(self, entries: list[Any]) -> None:
        super().__init__()
        self.entries = entries
        self.index = 61
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.held: list[Request] = []
        self.fail_with: int | None = None
        self.stub: StubTreq | None = None

    def render_GET(self, request: Request) -> object:
        assert request.uri is not None
        path, _, query = request.uri.decode().partition("?")
        params = dict(parse_qsl(query, keep_blank_values=True))
        self.requests.append((path, params))
        if path == "/v1/agent/self":
            body = capture_body("agent-self.http")
            body["Config"]["Datacenter"] = "dc-agent"
            return json.dumps(body).encode()
        if self.fail_with is not None:
            request.setResponseCode(self.fail_with)
            return b"rpc error: no leader"
        if int(params.get("index", "0")) >= self.index:
            self.held.append(request)
            return NOT_DONE_YET
        return self._answer(request)

    def _answer(self, request: Request) -> bytes:
        request.setHeader("Content-Type", "application/json")
        request.setHeader("X-Consul-Index", str(self.index))
        return json.dumps(self.entries).encode()

    def change(self, entries: list[Any]) -> None:
        self.entries = entries
        self.index += 1
        held, self.held = self.held, []
        for request in held:
            if not request.finished and not request._disconnected:
                request.write(self._answer(request))
                request.finish()
        if self.stub is not None:
            self.stub.flush()

    @property
    def health_requests(self) -> list[dict[str, str]]:
        return [p for path, p in self.requests if path.startswith("/v1/health")]


def passing_db() -> list[Any]:
    entries = capture_body("health-connect-db-passing.http")
    assert [e["Service"]["ID"] for e in entries] == ["db-1", "db-proxy-1"]
    # Put the proxy's node elsewhere, so that the node-address fallback shows.
    entries[1]["Node"]["Address"] = "10.0.0.9"
    return entries  # type: ignore[no-any-return]


def agent(
    entries: list[Any] | None = None, **kwargs: Any
) -> tuple[ConsulClient, FakeHealth, Clock]:
    clock = Clock()
    resource = FakeHealth(passing_db() if entries is None else entries)
    resource.stub = StubTreq(resource)
    client = ConsulClient(clock, http_client=resource.stub, **kwargs)
    return client, resource, clock


def expected(service: str, dc: str = "dc1", **kwargs: Any) -> ExpectedIdentity:
    return ExpectedIdentity(service=service, datacenter=dc, **kwargs)


# --- ExpectedIdentity ---


def test_expected_identity_with_open_trust_domain_matches_any_trusted_one() -> None:
    wanted = expected("db")
    for td in (TD, OTHER_TD):
        peer = ServiceIdentity(td, "default", "dc1", "db")
        assert wanted.matches(peer, frozenset({TD, OTHER_TD}))


def test_expected_identity_never_matches_an_untrusted_trust_domain() -> None:
    peer = ServiceIdentity(OTHER_TD, "default", "dc1", "db")
    assert not expected("db").matches(peer, frozenset({TD}))


def test_expected_identity_with_fixed_trust_domain_refuses_another_trusted_one() -> (
    None
):
    wanted = ExpectedIdentity.of(ServiceIdentity(TD, "default", "dc1", "db"))
    assert wanted.trust_domain == TD
    peer = ServiceIdentity(OTHER_TD, "default", "dc1", "db")
    assert not wanted.matches(peer, frozenset({TD, OTHER_TD}))
    assert wanted.matches(
        ServiceIdentity(TD, "default", "dc1", "db"), frozenset({TD, OTHER_TD})
    )


@pytest.mark.parametrize(
    ("peer", "matches"),
    [
        (ServiceIdentity(TD, "default", "dc1", "DB"), True),  # EqualFold, as Go
        (ServiceIdentity(TD, "default", "DC1", "db"), True),
        (ServiceIdentity(TD, "default", "dc1", "cache"), False),
        (ServiceIdentity(TD, "default", "dc2", "db"), False),
        (ServiceIdentity(TD, "other", "dc1", "db"), False),
        (ServiceIdentity(TD, "default", "dc1", "db", partition="p1"), False),
    ],
)
def test_expected_identity_compares_service_namespace_dc_partition(
    peer: ServiceIdentity, matches: bool
) -> None:
    assert expected("db").matches(peer, frozenset({TD})) is matches


def test_expected_identity_in_a_trust_domain_is_the_service_spiffe_id() -> None:
    identity = expected("db", partition="Default").in_trust_domain(TD)
    assert identity == ServiceIdentity(TD, "default", "dc1", "db")
    assert identity.uri == f"spiffe://{TD}/ns/default/dc/dc1/svc/db"


def test_expected_identity_names_the_bad_field() -> None:
    with pytest.raises(InvalidIdentity, match="datacenter is empty"):
        ExpectedIdentity(service="db", datacenter="")
    with pytest.raises(InvalidIdentity, match="trust domain"):
        ExpectedIdentity(service="db", datacenter="dc1", trust_domain="a b")


def test_expected_identity_shows_an_open_trust_domain() -> None:
    assert str(expected("db")) == (
        "spiffe://<any trusted trust domain>/ns/default/dc/dc1/svc/db"
    )


# --- Instance and StaticResolver ---


def test_instance_takes_a_service_identity_as_a_fixed_expectation() -> None:
    identity = ServiceIdentity(TD, "default", "dc1", "db")
    instance = Instance("127.0.0.1", 5001, identity)
    assert instance.identity == ExpectedIdentity.of(identity)


@pytest.mark.parametrize(
    ("address", "port", "message"),
    [
        ("", 5001, "address"),
        (" 10.0.0.1", 5001, "address"),
        ("10.0.0.1", 0, "port"),
        ("10.0.0.1", 65536, "port"),
        ("10.0.0.1", True, "port"),
        ("10.0.0.1", "80", "port"),
    ],
)
def test_instance_refuses_bad_addresses_and_ports(
    address: Any, port: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=f"Instance {message}"):
        Instance(address, port, expected("db"))


def test_instance_refuses_an_identity_of_another_type() -> None:
    with pytest.raises(TypeError, match="identity must be"):
        Instance("10.0.0.1", 1, "spiffe://x/ns/default/dc/dc1/svc/db")  # type: ignore[arg-type]


def test_static_resolver_answers_its_instances() -> None:
    instances = [
        Instance("10.0.0.1", 5001, expected("db")),
        Instance("10.0.0.2", 5001, expected("db")),
    ]
    resolver = StaticResolver(instances)
    assert IResolver.providedBy(resolver)
    assert list(result(resolver.resolve())) == instances
    assert "'db'" in resolver.description


def test_static_resolver_refuses_what_is_not_an_instance() -> None:
    with pytest.raises(TypeError, match=r"instances\[1\] must be an Instance"):
        StaticResolver([Instance("10.0.0.1", 1, expected("db")), ("10.0.0.2", 1)])  # type: ignore[list-item]


# --- ConsulResolver ---


def test_consul_resolver_reads_healthy_connect_instances() -> None:
    client, resource, _ = agent()
    resolver = ConsulResolver(client, "db", reactor=Clock())
    instances = result(resolver.resolve())
    first = resource.health_requests[0]
    assert resource.requests[0][0] == "/v1/health/connect/db"
    assert first["passing"] == "1"
    assert instances == (
        Instance("127.0.0.1", 5001, expected("db"), node="vm", instance_id="db-1"),
        # The proxy: no Service.Address, so the node's; the identity to expect
        # behind it is its destination's.
        Instance(
            "10.0.0.9", 21000, expected("db"), node="vm", instance_id="db-proxy-1"
        ),
    )
    resolver.close()


def test_consul_resolver_sends_its_query_parameters() -> None:
    client, resource, clock = agent()
    resolver = ConsulResolver(
        client,
        "db",
        datacenter="dc2",
        filter='"v2" in Service.Tags',
        near="_agent",
        reactor=clock,
    )
    result(resolver.resolve())
    params = resource.health_requests[0]
    assert params["dc"] == "dc2"
    assert params["filter"] == '"v2" in Service.Tags'
    assert params["near"] == "_agent"
    assert params["passing"] == "1"
    resolver.close()


def test_consul_resolver_expects_the_namespace_and_partition_it_queried() -> None:
    client, _, clock = agent()
    resolver = ConsulResolver(
        client, "db", namespace="team", partition="Part", reactor=clock
    )
    instances = result(resolver.resolve())
    assert {i.identity for i in instances} == {
        expected("db", namespace="team", partition="part")
    }
    resolver.close()


def test_consul_resolver_uses_the_agents_datacenter_when_the_node_has_none() -> None:
    entries = passing_db()
    for entry in entries:
        entry["Node"]["Datacenter"] = ""
    client, _, clock = agent(entries)
    resolver = ConsulResolver(client, "db", reactor=clock)
    instances = result(resolver.resolve())
    assert {i.identity.datacenter for i in instances} == {"dc-agent"}
    resolver.close()


def test_consul_resolver_skips_an_instance_without_a_port() -> None:
    entries = passing_db()
    entries[0]["Service"]["Port"] = 0
    client, _, clock = agent(entries)
    resolver = ConsulResolver(client, "db", reactor=clock)
    assert [i.instance_id for i in result(resolver.resolve())] == ["db-proxy-1"]
    resolver.close()


def test_consul_resolver_is_kept_fresh_by_a_blocking_watch() -> None:
    client, resource, clock = agent()
    resolver = ConsulResolver(client, "db", reactor=clock)
    result(resolver.resolve())
    clock.advance(1)  # min_interval: the next (blocking) request goes out
    assert resource.health_requests[-1]["index"] == "61"
    assert resource.health_requests[-1]["wait"] == "300000ms"
    moved = passing_db()[:1]
    moved[0]["Service"]["Port"] = 6001
    resource.change(moved)
    # Answered from the watch's latest value: no request of its own.
    before = len(resource.health_requests)
    assert [i.port for i in result(resolver.resolve())] == [6001]
    assert len(resource.health_requests) == before
    resolver.close()


def test_consul_resolvers_of_one_client_and_query_share_one_watch() -> None:
    client, resource, clock = agent()
    first = ConsulResolver(client, "db", reactor=clock)
    second = ConsulResolver(client, "db", reactor=clock)
    result(first.resolve())
    result(second.resolve())
    clock.advance(1)
    assert [p.get("index", "0") for p in resource.health_requests] == ["0", "61"]
    other = ConsulResolver(client, "db", datacenter="dc2", reactor=clock)
    result(other.resolve())
    assert len(resource.health_requests) == 3
    for resolver in (first, second, other):
        resolver.close()


def test_the_shared_watch_stops_when_the_last_resolver_closes() -> None:
    client, resource, clock = agent()
    first = ConsulResolver(client, "db", reactor=clock)
    second = ConsulResolver(client, "db", reactor=clock)
    result(first.resolve())
    result(second.resolve())
    clock.advance(1)
    (held,) = resource.held
    assert resource.stub is not None
    first.close()
    resource.stub.flush()
    assert not held._disconnected
    second.close()
    resource.stub.flush()
    assert held._disconnected  # the blocking request was cancelled
    clock.advance(600)
    assert len(resource.health_requests) == 2


def test_a_garbage_collected_resolver_lets_go_of_the_watch() -> None:
    client, resource, clock = agent()
    resolver = ConsulResolver(client, "db", reactor=clock)
    result(resolver.resolve())
    clock.advance(1)
    (held,) = resource.held
    del resolver
    gc.collect()
    assert resource.stub is not None
    resource.stub.flush()
    assert held._disconnected


def test_a_closed_resolver_resolves_again_with_a_fresh_answer() -> None:
    client, resource, clock = agent()
    resolver = ConsulResolver(client, "db", reactor=clock)
    result(resolver.resolve())
    resolver.close()
    clock.advance(5)
    resource.entries = passing_db()[1:]
    assert [i.instance_id for i in result(resolver.resolve())] == ["db-proxy-1"]
    resolver.close()


def test_consul_resolver_fails_at_once_when_the_first_request_fails() -> None:
    client, resource, clock = agent()
    resource.fail_with = 500
    resolver = ConsulResolver(client, "db", reactor=clock)
    error = failure_of(resolver.resolve())
    assert isinstance(error, ResolveError)
    assert "'db'" in str(error)
    assert "/v1/health/connect/db?passing=1" in str(error)
    assert "no leader" in str(error)
    # Still failing while the watch backs off and has no answer.
    assert isinstance(failure_of(resolver.resolve()), ResolveError)
    resolver.close()


def test_consul_resolver_keeps_the_last_answer_while_the_agent_fails() -> None:
    client, resource, clock = agent()
    resolver = ConsulResolver(client, "db", reactor=clock)
    instances = result(resolver.resolve())
    resource.fail_with = 500
    clock.advance(1)
    resource.change(passing_db())  # answers the held request with a 500
    clock.advance(1)
    assert result(resolver.resolve()) == instances
    resolver.close()


def fail_held_read(resource: FakeHealth) -> None:
    """The agent fails the blocking read it holds (e.g. it is shutting down)."""
    request = resource.held.pop()
    request.setResponseCode(500)
    request.write(b"rpc error: no leader")
    request.finish()
    assert resource.stub is not None
    resource.stub.flush()


def test_consul_resolver_refuses_an_answer_stale_past_max_staleness() -> None:
    client, resource, clock = agent()
    resolver = ConsulResolver(client, "db", reactor=clock, max_staleness=60)
    instances = result(resolver.resolve())
    resource.fail_with = 500
    clock.advance(1)  # the next read fails: failing since t=1
    clock.advance(60)
    assert result(resolver.resolve()) == instances  # 60s: still within the bound
    with capturedLogs() as events:
        clock.advance(0.5)
        error = failure_of(resolver.resolve())
        assert isinstance(failure_of(resolver.resolve()), StaleAnswer)
    assert isinstance(error, StaleAnswer)
    assert isinstance(error, ResolveError)
    assert (error.failing_since, error.last_answer) == (1, 0)
    message = str(error)
    assert "Consul service 'db'" in message
    assert "the last answer from the agent is stale" in message
    assert "/v1/health/connect/db?passing=1 has failed since 1970-01-01T00:00:01Z" in (
        message
    )
    assert "60.5s, longer than max_staleness 60s" in message
    assert "last answered at 1970-01-01T00:00:00Z" in message
    assert "no leader" in message
    # One warning for the watch, not one per refused resolve.
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1
    assert "longer than max_staleness (60s" in warnings[0]
    # A fresh answer restores service (the watch retries within its backoff).
    resource.fail_with = None
    with capturedLogs() as events:
        clock.advance(60)
    assert [i.instance_id for i in result(resolver.resolve())] == [
        "db-1",
        "db-proxy-1",
    ]
    assert any("answers again" in formatEvent(e) for e in events)
    resolver.close()


def test_staleness_counts_from_the_first_failed_read_not_the_last_answer() -> None:
    client, resource, clock = agent()
    resolver = ConsulResolver(client, "db", reactor=clock, max_staleness=60)
    instances = result(resolver.resolve())
    clock.advance(1)  # the blocking read goes out, and the agent holds it
    clock.advance(249)
    # Held for 249s, longer than max_staleness: the agent would have answered
    # any change, so the answer is current.
    assert result(resolver.resolve()) == instances
    resource.fail_with = 500
    fail_held_read(resource)  # at t=250
    clock.advance(60)
    assert result(resolver.resolve()) == instances
    clock.advance(1)
    error = failure_of(resolver.resolve())
    assert isinstance(error, StaleAnswer)
    assert error.failing_since == 250
    resolver.close()


def test_max_staleness_zero_refuses_the_answer_once_a_read_fails() -> None:
    client, resource, clock = agent()
    resolver = ConsulResolver(client, "db", reactor=clock, max_staleness=0)
    result(resolver.resolve())
    clock.advance(1)
    assert result(resolver.resolve())  # held by the agent: current
    resource.fail_with = 500
    fail_held_read(resource)
    clock.advance(0.001)
    assert isinstance(failure_of(resolver.resolve()), StaleAnswer)
    resolver.close()


def test_resolvers_sharing_a_watch_each_apply_their_own_max_staleness() -> None:
    client, resource, clock = agent()
    strict = ConsulResolver(client, "db", reactor=clock, max_staleness=10)
    lenient = ConsulResolver(client, "db", reactor=clock)  # the default, 300s
    assert lenient.max_staleness == 300
    instances = result(strict.resolve())
    result(lenient.resolve())
    resource.fail_with = 500
    clock.advance(1)
    clock.advance(100)
    assert isinstance(failure_of(strict.resolve()), StaleAnswer)
    assert result(lenient.resolve()) == instances
    clock.advance(201)  # failing for 301s
    assert isinstance(failure_of(lenient.resolve()), StaleAnswer)
    strict.close()
    lenient.close()


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "5", True, None])
def test_max_staleness_must_be_seconds_at_least_zero(bad: Any) -> None:
    client, _, clock = agent()
    with pytest.raises(
        ValueError,
        match="ConsulResolver max_staleness must be a finite number of seconds >= 0",
    ):
        ConsulResolver(client, "db", reactor=clock, max_staleness=bad)


def test_a_resolve_waiting_for_the_first_answer_can_be_cancelled() -> None:
    hold = FakeHealth(passing_db())
    hold.index = 0  # every request, the first included, is held
    clock = Clock()
    client = ConsulClient(clock, http_client=StubTreq(hold))
    resolver = ConsulResolver(client, "db", reactor=clock)
    d = resolver.resolve()
    assert not d.called
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    resolver.close()


def test_consul_resolver_refuses_an_empty_service_name() -> None:
    client, _, clock = agent()
    with pytest.raises(ValueError, match="service must be a non-empty name"):
        ConsulResolver(client, "", reactor=clock)


# --- PreparedQueryResolver ---


class FakeQuery(Resource):
    isLeaf = True

    def __init__(self, body: Any, status: int = 200) -> None:
        super().__init__()
        self.body = body
        self.status = status
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.held: list[Request] = []
        self.hold = False
        self.stub: StubTreq | None = None

    def render_GET(self, request: Request) -> object:
        assert request.uri is not None
        path, _, query = request.uri.decode().partition("?")
        self.requests.append((path, dict(parse_qsl(query))))
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return self.answer(request)

    def answer(self, request: Request) -> bytes:
        request.setResponseCode(self.status)
        if self.status != 200:
            return b"Query not found"
        request.setHeader("X-Consul-Index", "1")
        return json.dumps(self.body).encode()


def query_agent(
    body: Any = None, status: int = 200
) -> tuple[ConsulClient, FakeQuery, Clock]:
    clock = Clock()
    if body is None:
        body = capture_body("query-execute-connect.http")
    resource = FakeQuery(body, status)
    resource.stub = StubTreq(resource)
    return ConsulClient(clock, http_client=resource.stub), resource, clock


def test_prepared_query_resolver_executes_the_query_for_connect() -> None:
    client, resource, clock = query_agent()
    resolver = PreparedQueryResolver(client, "db-connect", reactor=clock)
    instances = result(resolver.resolve())
    assert resource.requests == [("/v1/query/db-connect/execute", {"connect": "true"})]
    assert sorted((i.instance_id, i.port) for i in instances) == [
        ("db-1", 5001),
        ("db-proxy-1", 21000),
    ]
    assert {i.identity for i in instances} == {expected("db")}


def test_prepared_query_resolver_expects_the_datacenter_the_answer_names() -> None:
    body = capture_body("query-execute-connect.http")
    body["Datacenter"] = "dc-failover"
    for entry in body["Nodes"]:
        entry["Node"]["Datacenter"] = ""
    client, resource, clock = query_agent(body)
    resolver = PreparedQueryResolver(
        client, "db-connect", datacenter="dc2", reactor=clock
    )
    instances = result(resolver.resolve())
    assert resource.requests[0][1] == {"dc": "dc2", "connect": "true"}
    assert {i.identity.datacenter for i in instances} == {"dc-failover"}


def test_prepared_query_resolver_reuses_an_answer_briefly() -> None:
    client, resource, clock = query_agent()
    resolver = PreparedQueryResolver(
        client, "db-connect", reactor=clock, cache_seconds=2
    )
    first = result(resolver.resolve())
    clock.advance(1.9)
    assert result(resolver.resolve()) == first
    assert len(resource.requests) == 1
    clock.advance(0.1)
    result(resolver.resolve())
    assert len(resource.requests) == 2


def test_concurrent_prepared_query_resolves_share_one_request() -> None:
    client, resource, clock = query_agent()
    resource.hold = True
    resolver = PreparedQueryResolver(client, "db-connect", reactor=clock)
    first, second = resolver.resolve(), resolver.resolve()
    assert len(resource.requests) == 1
    (held,) = resource.held
    held.write(resource.answer(held))
    held.finish()
    assert resource.stub is not None
    resource.stub.flush()
    assert result(first) == result(second)


def test_prepared_query_resolver_failure_names_the_query() -> None:
    client, _, clock = query_agent(status=404)
    resolver = PreparedQueryResolver(client, "nosuch", reactor=clock)
    error = failure_of(resolver.resolve())
    assert isinstance(error, ResolveError)
    assert "'nosuch'" in str(error)
    assert "Query not found" in str(error)


def test_prepared_query_resolver_skips_instances_it_cannot_dial() -> None:
    body = copy.deepcopy(capture_body("query-execute-connect.http"))
    for entry in body["Nodes"]:
        entry["Service"]["Address"] = ""
        entry["Node"]["Address"] = ""
    client, _, clock = query_agent(body)
    resolver = PreparedQueryResolver(client, "db-connect", reactor=clock)
    assert result(resolver.resolve()) == ()


class BrokenQueryClient:
    """Raises at once, then answers with something unreadable, then properly."""

    namespace = None
    partition = None

    def __init__(self, good: Any) -> None:
        self.calls = 0
        self.good = good

    def execute_prepared_query(self, name: str, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the client broke")
        if self.calls == 2:
            return succeed(SimpleNamespace(value=object()))
        return self.good.execute_prepared_query(name, **kwargs)


def test_a_broken_prepared_query_fails_the_resolve_and_the_next_one_asks_again() -> (
    None
):
    good, _, clock = query_agent()
    client = BrokenQueryClient(good)
    resolver = PreparedQueryResolver(client, "db-connect", reactor=clock)  # type: ignore[arg-type]
    first = failure_of(resolver.resolve())
    assert isinstance(first, ResolveError)
    assert "'db-connect'" in str(first)
    assert "the client broke" in str(first)
    second = failure_of(resolver.resolve())
    assert isinstance(second, ResolveError)
    assert client.calls == 2
    assert len(result(resolver.resolve())) > 0
    assert client.calls == 3
