"""
A deny reaches open connections (issue 15, item 5), in memory: the
authorizers say when the intentions change (the agent authorizer dropping
its remembered decisions), and a ConnectServerEndpoint decides its open
connections again and closes those now refused, over both TLS transports.

The agent is tests.test_intentions_authorizer's ScriptedConsul (a blocking
intentions list that ``change`` wakes, authorize calls the test answers);
the server is tests.test_server's harness.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, capturedLogs

from connect_native.authorize import AgentAuthorizer, Decision, INotifiesChanges
from connect_native.authorize.intentions import IntentionAuthorizer
from connect_native.consul.records import AuthorizeResult
from connect_native.recheck import INTENTIONS_CHANGED, ROOTS_CHANGED
from connect_native.testing import CertificateFactory, FakeAuthorizer, FakeBundleSource
from tests.test_intentions_authorizer import ScriptedConsul, ixn, peer, result
from tests.test_server import (
    ADDRESS,
    Connection,
    Harness,
    StaticSource,
    _Uncancellable,
    bundle,
)

# A fixture: every test of this module runs over both TLS transports.
from tests.transports import over_each_tls_transport  # noqa: F401

ALLOWED = AuthorizeResult(authorized=True, reason="ACL default allow")
DENIED = AuthorizeResult(authorized=False, reason="Matched intention: api => web deny")


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events  # type: ignore[misc]


def answer(consul: ScriptedConsul, outcome: AuthorizeResult) -> None:
    """Answer every authorize call the agent holds."""
    held, consul.authorizations = consul.authorizations, []
    for d in held:
        d.callback(outcome)


# --- the agent authorizer ------------------------------------------------------


def test_the_agent_authorizer_drops_its_cache_when_the_intentions_change() -> None:
    clock = Clock()
    consul = ScriptedConsul()
    authorizer = AgentAuthorizer(consul, clock, cache_ttl=30.0)  # type: ignore[arg-type]
    assert INotifiesChanges.providedBy(authorizer)
    told: list[int] = []
    unsubscribe = authorizer.subscribe(lambda: told.append(1))
    assert authorizer.watching
    clock.advance(0)  # the blocking read is held
    authorizer.authorize(peer("api"), "web")
    answer(consul, ALLOWED)
    remembered = authorizer.decide_now(peer("api"), "web")
    assert remembered is not None
    assert remembered.source == "agent-cache"
    assert told == []  # the first read is no change

    consul.change((ixn("api", "deny", destination="web"),))

    assert authorizer.decide_now(peer("api"), "web") is None
    assert told == [1]
    unsubscribe()
    assert not authorizer.watching


def test_the_agent_authorizer_watch_wakes_at_once_on_a_new_index() -> None:
    clock = Clock()
    consul = ScriptedConsul()
    authorizer = AgentAuthorizer(consul, clock)  # type: ignore[arg-type]
    authorizer.subscribe(lambda: None)
    clock.advance(0)
    consul.change((ixn("api", "deny", destination="web"),))
    clock.advance(0)
    # No second of min_interval between a change and the next blocking read.
    assert [c for c in consul.calls if c[0] == "list"] == [
        ("list", None, None),
        ("list", 5, 60.0),
        ("list", 6, 60.0),
    ]


def test_an_agent_answer_asked_before_a_change_is_not_remembered() -> None:
    consul = ScriptedConsul()
    clock = Clock()
    authorizer = AgentAuthorizer(consul, clock, cache_ttl=30.0)  # type: ignore[arg-type]
    authorizer.subscribe(lambda: None)
    clock.advance(0)
    pending = authorizer.authorize(peer("api"), "web")
    consul.change((ixn("api", "deny", destination="web"),))
    answer(consul, ALLOWED)
    assert result(pending).allowed  # what was asked is answered...
    assert authorizer.decide_now(peer("api"), "web") is None  # ...not kept


def test_the_agent_authorizer_watches_only_while_subscribed() -> None:
    consul = ScriptedConsul()
    authorizer = AgentAuthorizer(consul, Clock())  # type: ignore[arg-type]
    authorizer.authorize(peer("api"), "web")
    assert consul.count("list") == 0
    unsubscribe = authorizer.subscribe(lambda: None)
    unsubscribe()
    unsubscribe()  # twice is harmless
    assert not authorizer.watching


# --- the intention authorizer ----------------------------------------------------


def test_the_intention_authorizer_tells_subscribers_of_each_change() -> None:
    clock = Clock()
    consul = ScriptedConsul((ixn("api", "allow", destination="web"),))
    authorizer = IntentionAuthorizer(consul, clock, "web")  # type: ignore[arg-type]
    told: list[Decision | None] = []
    authorizer.subscribe(lambda: told.append(authorizer.decide_now(peer("api"), "web")))
    authorizer.startService()
    clock.advance(0)
    assert told == []
    consul.change((ixn("api", "deny", destination="web"),))
    # Told once the new intentions decide.
    [decision] = told
    assert decision is not None
    assert not decision.allowed
    # And the next blocking read goes out at once, not min_interval later.
    clock.advance(0)
    assert ("list", 6, 60.0) in consul.calls
    authorizer.stopService()


# --- the server --------------------------------------------------------------------


def serving(
    ca: CertificateFactory,
    make: Any,
    source: Any = None,
    **options: Any,
) -> Harness:
    """A listening harness whose authorizer ``make(reactor)`` builds."""
    reactor = MemoryReactorClock()
    reactor.advance(time.time())
    if source is None:
        source = StaticSource(bundle(ca, ca.leaf("web")))
    h = Harness(ca, make(reactor), source, reactor=reactor)
    h.listen(**options)
    return h


def closings(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("decision") == "closed"]


def assert_closed(conn: Connection, logged: list[LogEvent], why: str) -> LogEvent:
    conn.pump.flush()
    assert conn.client_app.lost is not None
    [closed] = closings(logged)
    assert closed["address"] == str(ADDRESS)
    assert closed["why"] == why
    assert closed["log_level"].name == "warn"
    return closed


@pytest.fixture
def consul() -> ScriptedConsul:
    return ScriptedConsul((ixn("api", "allow", destination="web"),))


def test_a_deny_closes_an_open_connection_intention_authorizer(
    ca: CertificateFactory, consul: ScriptedConsul, logged: list[LogEvent]
) -> None:
    def make(reactor: Any) -> IntentionAuthorizer:
        authorizer = IntentionAuthorizer(consul, reactor, "web")
        authorizer.startService()
        return authorizer

    h = serving(ca, make)
    conn = h.connect([b"hello"])
    [app] = h.apps.built
    assert app.received == b"hello"

    consul.change((ixn("api", "deny", destination="web"),))

    closed = assert_closed(conn, logged, INTENTIONS_CHANGED)
    assert closed["peer"] == ca.service_uri("api")
    assert ("connectionLost",) in app.events
    text = closed["log_format"].format(**closed)
    assert text.startswith(
        f"Connect web: closed {ca.service_uri('api')} from {ADDRESS}: "
    )
    assert text.endswith("(intentions changed)")


def agent_serving(
    ca: CertificateFactory, consul: ScriptedConsul, **options: Any
) -> Any:
    h = serving(
        ca, lambda reactor: AgentAuthorizer(consul, reactor, cache_ttl=30.0), **options
    )
    conn = h.connect()
    answer(consul, ALLOWED)
    conn.pump.flush()
    assert len(h.apps.built) == 1
    return h, conn


def test_a_deny_closes_an_open_connection_agent_authorizer(
    ca: CertificateFactory, consul: ScriptedConsul, logged: list[LogEvent]
) -> None:
    _, conn = agent_serving(ca, consul)

    consul.change((ixn("api", "deny", destination="web"),))
    # The remembered allowance is gone: the agent is asked again.
    assert len(consul.authorizations) == 1
    answer(consul, DENIED)

    closed = assert_closed(conn, logged, INTENTIONS_CHANGED)
    assert closed["reason"] == DENIED.reason


def test_a_connection_still_allowed_stays_open(
    ca: CertificateFactory, consul: ScriptedConsul, logged: list[LogEvent]
) -> None:
    _, conn = agent_serving(ca, consul)
    consul.change((ixn("api", "allow", precedence=8, destination="web"),))
    answer(consul, ALLOWED)
    conn.pump.flush()
    assert conn.client_app.lost is None
    assert closings(logged) == []


def test_a_recheck_the_agent_does_not_answer_in_time_closes(
    ca: CertificateFactory, consul: ScriptedConsul, logged: list[LogEvent]
) -> None:
    h, conn = agent_serving(ca, consul, authorize_timeout=2.0)
    consul.change(())
    h.reactor.advance(2.0)
    closed = assert_closed(conn, logged, INTENTIONS_CHANGED)
    assert "did not answer within 2s" in closed["reason"]


def test_keep_open_on_deny_keeps_it_open(
    ca: CertificateFactory, consul: ScriptedConsul, logged: list[LogEvent]
) -> None:
    h, conn = agent_serving(ca, consul, keep_open_on_deny=True)
    authorizer = h.authorizer
    assert isinstance(authorizer, AgentAuthorizer)
    assert authorizer.watching  # new connections still see a deny at once

    consul.change((ixn("api", "deny", destination="web"),))

    assert consul.authorizations == []  # nobody re-asked
    assert len(consul.authorizations) == 0
    conn.pump.flush()
    assert conn.client_app.lost is None
    assert closings(logged) == []


def test_a_connection_authorized_across_a_change_is_decided_again(
    ca: CertificateFactory, consul: ScriptedConsul, logged: list[LogEvent]
) -> None:
    h = serving(ca, lambda reactor: AgentAuthorizer(consul, reactor))
    conn = h.connect()
    consul.change((ixn("api", "deny", destination="web"),))
    answer(consul, ALLOWED)  # asked before the change, answered after it
    assert len(h.apps.built) == 1
    answer(consul, DENIED)
    assert_closed(conn, logged, INTENTIONS_CHANGED)


def test_stopping_the_port_stops_following_changes(
    ca: CertificateFactory, consul: ScriptedConsul
) -> None:
    h, _ = agent_serving(ca, consul)
    assert h.authorizer.watching  # type: ignore[attr-defined]
    h.port.stopListening()
    assert not h.authorizer.watching  # type: ignore[attr-defined]


# --- trusted roots -------------------------------------------------------------------


def test_a_roots_change_closes_a_peer_that_no_longer_chains_to_a_root(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    source = FakeBundleSource(bundle(ca, ca.leaf("web")))
    h = serving(ca, lambda reactor: FakeAuthorizer({"api"}), source)
    conn = h.connect()
    assert len(h.apps.built) == 1
    # The same trust domain, another key: the api leaf no longer verifies.
    successor = ca.another_ca()
    source.set(bundle(successor, successor.leaf("web")))
    closed = assert_closed(conn, logged, ROOTS_CHANGED)
    assert "does not verify against the current roots" in closed["reason"]


def test_a_roots_change_closes_a_peer_of_a_trust_domain_gone(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    source = FakeBundleSource(bundle(ca, ca.leaf("web")))
    h = serving(ca, lambda reactor: FakeAuthorizer({"api"}), source)
    conn = h.connect()
    successor = ca.another_ca("other.consul")
    source.set(bundle(successor, successor.leaf("web")))
    closed = assert_closed(conn, logged, ROOTS_CHANGED)
    assert "no current root carries" in closed["reason"]


def test_a_roots_change_keeping_the_peers_root_asks_the_authorizer_again(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    source = FakeBundleSource(bundle(ca, ca.leaf("web")))
    authorizer = FakeAuthorizer({"api"})
    h = serving(ca, lambda reactor: authorizer, source)
    conn = h.connect()
    asked = len(authorizer.authorize_calls)
    source.set(bundle(ca, ca.leaf("web"), ca.another_ca()))
    assert len(authorizer.authorize_calls) == asked + 1
    conn.pump.flush()
    assert conn.client_app.lost is None
    # A new leaf with the same roots is no roots change.
    source.set(bundle(ca, ca.leaf("web"), ca.another_ca()))
    assert closings(logged) == []


def test_an_uncancellable_recheck_still_times_out(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    source = FakeBundleSource(bundle(ca, ca.leaf("web")))
    authorizer = FakeAuthorizer({"api"})
    h = serving(ca, lambda reactor: authorizer, source, authorize_timeout=3.0)
    conn = h.connect()
    deaf = _Uncancellable()
    authorizer.authorize = lambda peer, target: deaf  # type: ignore[method-assign]
    source.set(bundle(ca, ca.leaf("web"), ca.another_ca()))
    h.reactor.advance(3.0)
    assert deaf.cancel_calls == 1
    assert not deaf.called
    closed = assert_closed(conn, logged, ROOTS_CHANGED)
    assert "did not answer within 3s" in closed["reason"]
    deaf.callback(Decision(True, "late", "test"))  # changes nothing
