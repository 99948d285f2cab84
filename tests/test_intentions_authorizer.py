"""
IntentionAuthorizer on a Clock with a scripted Consul client: a warm cache
decides inside the verify callback, a cold one makes authorize wait for the
first read, changes arrive without a restart (blocking and polling), an
unreachable agent is tolerated for max_staleness and then fails closed, and
the deny/allow/agent defaults.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from connect_native.authorize import Decision, IAuthorizer, Peer
from connect_native.authorize.intentions import IntentionAuthorizer
from connect_native.authorize.rules import DEFAULT_SOURCE, L7_SOURCE, MATCH_SOURCE
from connect_native.consul.records import (
    AuthorizeResult,
    Indexed,
    Intention,
    IntentionHTTPPermission,
    IntentionPermission,
)
from connect_native.identity import ServiceIdentity

TD = "11111111-2222-3333-4444-555555555555.consul"


def peer(service: str, serial: str = "0a:01") -> Peer:
    return Peer(
        ServiceIdentity(
            trust_domain=TD, namespace="default", datacenter="dc1", service=service
        ),
        serial,
    )


def ixn(
    source: str,
    action: str | None = "allow",
    precedence: int = 9,
    permissions: tuple[IntentionPermission, ...] = (),
    destination: str = "api",
) -> Intention:
    return Intention(
        source_ns="default",
        source_name=source,
        destination_ns="default",
        destination_name=destination,
        source_type="consul",
        precedence=precedence,
        action=action,
        permissions=permissions,
        id=f"id-{source}",
    )


class AgentDown(Exception):
    pass


class ScriptedConsul:
    """
    Answers like an agent holding ``intentions`` for ``api``: the list
    blocks while the caller's index is current; ``change`` wakes it.
    """

    def __init__(self, intentions: tuple[Intention, ...] = ()) -> None:
        self.intentions = intentions
        self.index = 5
        self.down = False
        self.hold_match = False
        self.held_lists: list[Deferred[Indexed[tuple[Intention, ...]]]] = []
        self.held_matches: list[
            Deferred[Indexed[Mapping[str, tuple[Intention, ...]]]]
        ] = []
        self.calls: list[tuple[object, ...]] = []
        self.authorizations: list[Deferred[AuthorizeResult]] = []

    def intentions_list(
        self, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[tuple[Intention, ...]]]:
        self.calls.append(("list", index, wait))
        if self.down:
            return fail(AgentDown("connection refused"))
        if index is not None and index >= self.index:
            d: Deferred[Indexed[tuple[Intention, ...]]] = Deferred()
            self.held_lists.append(d)
            return d
        return succeed(Indexed(self.intentions, self.index))

    def intentions_match(
        self,
        by: str,
        name: str,
        index: int | None = None,
        wait: float | None = None,
    ) -> Deferred[Indexed[Mapping[str, tuple[Intention, ...]]]]:
        self.calls.append(("match", by, name))
        if self.down:
            return fail(AgentDown("connection refused"))
        if self.hold_match:
            d: Deferred[Indexed[Mapping[str, tuple[Intention, ...]]]] = Deferred()
            self.held_matches.append(d)
            return d
        return succeed(Indexed({name: self.intentions}, None))

    def release_matches(self) -> None:
        self.hold_match = False
        held, self.held_matches = self.held_matches, []
        for d in held:
            d.callback(Indexed({"api": self.intentions}, None))

    def change(self, intentions: tuple[Intention, ...]) -> None:
        self.intentions = intentions
        self.index += 1
        held, self.held_lists = self.held_lists, []
        for d in held:
            d.callback(Indexed(self.intentions, self.index))

    def go_down(self) -> None:
        self.down = True
        held, self.held_lists = self.held_lists, []
        for d in held:
            d.errback(AgentDown("connection reset"))

    def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> Deferred[AuthorizeResult]:
        self.calls.append(("authorize", target, client_cert_uri))
        d: Deferred[AuthorizeResult] = Deferred()
        self.authorizations.append(d)
        return d

    def count(self, kind: str) -> int:
        return sum(1 for c in self.calls if c[0] == kind)


def started(
    consul: ScriptedConsul, clock: Clock, **kwargs: object
) -> IntentionAuthorizer:
    authorizer = IntentionAuthorizer(consul, clock, "api", **kwargs)  # type: ignore[arg-type]
    authorizer.startService()
    return authorizer


def result(d: Deferred[Decision]) -> Decision:
    decisions: list[Decision] = []
    d.addCallback(decisions.append)
    assert decisions, "the decision is still pending"
    return decisions[0]


def test_provides_iauthorizer() -> None:
    assert IAuthorizer.providedBy(IntentionAuthorizer(ScriptedConsul(), Clock(), "api"))


def test_warm_cache_decides_now() -> None:
    consul = ScriptedConsul((ixn("web", "allow"), ixn("cron", "deny")))
    authorizer = started(consul, Clock())
    allowed = authorizer.decide_now(peer("web"), "api")
    denied = authorizer.decide_now(peer("cron"), "api")
    assert allowed is not None
    assert (allowed.allowed, allowed.source) == (True, MATCH_SOURCE)
    assert denied is not None
    assert (denied.allowed, denied.source) == (False, MATCH_SOURCE)
    assert result(authorizer.authorize(peer("web"), "api")) == allowed


def test_reads_the_match_for_our_service_by_destination() -> None:
    consul = ScriptedConsul()
    started(consul, Clock())
    assert ("match", "destination", "api") in consul.calls


def test_cold_cache_does_not_decide_now_and_authorize_waits_for_the_first_read() -> (
    None
):
    consul = ScriptedConsul((ixn("web", "allow"),))
    consul.hold_match = True
    authorizer = started(consul, Clock())
    assert authorizer.decide_now(peer("web"), "api") is None
    pending = authorizer.authorize(peer("web"), "api")
    assert not pending.called
    consul.release_matches()
    decision = result(pending)
    assert (decision.allowed, decision.source) == (True, MATCH_SOURCE)


def test_cold_cache_denies_after_the_timeout() -> None:
    clock = Clock()
    consul = ScriptedConsul((ixn("web", "allow"),))
    consul.hold_match = True
    authorizer = started(consul, clock, timeout=5.0)
    pending = authorizer.authorize(peer("web"), "api")
    clock.advance(4.9)
    assert not pending.called
    clock.advance(0.1)
    decision = result(pending)
    assert not decision.allowed
    assert "no intentions have been read" in decision.reason


def test_change_takes_effect_on_the_next_blocking_read_without_restart() -> None:
    clock = Clock()
    consul = ScriptedConsul((ixn("web", "allow"),))
    authorizer = started(consul, clock)
    clock.advance(1)  # min_interval: the blocking list is now held at index 5
    assert ("list", 5, 60.0) in consul.calls
    consul.change((ixn("web", "deny"),))
    decision = authorizer.decide_now(peer("web"), "api")
    assert decision is not None
    assert not decision.allowed


def test_polling_mode_sees_a_change_after_poll_interval() -> None:
    clock = Clock()
    consul = ScriptedConsul((ixn("web", "allow"),))
    authorizer = started(consul, clock, blocking=False, poll_interval=10.0)
    consul.intentions = (ixn("web", "deny"),)
    clock.advance(9.9)
    before = authorizer.decide_now(peer("web"), "api")
    assert before is not None
    assert before.allowed
    clock.advance(0.1)
    after = authorizer.decide_now(peer("web"), "api")
    assert after is not None
    assert not after.allowed
    assert consul.count("list") == 0


def test_unreachable_agent_keeps_the_last_intentions_until_max_staleness() -> None:
    clock = Clock()
    consul = ScriptedConsul((ixn("web", "allow"),))
    authorizer = started(consul, clock, max_staleness=30.0)
    clock.advance(1)
    consul.go_down()
    clock.advance(28)
    still = authorizer.decide_now(peer("web"), "api")
    assert still is not None
    assert still.allowed
    clock.advance(2)  # 31 s after the last successful read
    assert authorizer.decide_now(peer("web"), "api") is None
    pending = authorizer.authorize(peer("web"), "api")
    clock.advance(5)
    decision = result(pending)
    assert not decision.allowed
    assert "max_staleness" in decision.reason


def test_stale_cache_authorize_decides_when_the_agent_comes_back() -> None:
    clock = Clock()
    consul = ScriptedConsul((ixn("web", "allow"),))
    authorizer = started(consul, clock, max_staleness=0.0, timeout=120.0)
    clock.advance(1)
    consul.go_down()
    clock.advance(0.5)
    pending = authorizer.authorize(peer("web"), "api")
    assert not pending.called
    consul.down = False
    consul.intentions = (ixn("web", "deny"),)
    clock.advance(61)  # the watch's capped backoff
    decision = result(pending)
    assert (decision.allowed, decision.source) == (False, MATCH_SOURCE)


@pytest.mark.parametrize(("default", "allowed"), [("allow", True), ("deny", False)])
def test_no_match_takes_the_configured_default(default: str, allowed: bool) -> None:
    consul = ScriptedConsul((ixn("cron", "deny"),))
    authorizer = started(consul, Clock(), default=default)
    decision = authorizer.decide_now(peer("web"), "api")
    assert decision is not None
    assert (decision.allowed, decision.source) == (allowed, DEFAULT_SOURCE)


def test_agent_default_asks_once_per_source_and_remembers() -> None:
    clock = Clock()
    consul = ScriptedConsul((ixn("cron", "deny"),))
    authorizer = started(consul, clock, default="agent", agent_cache_ttl=30.0)
    assert authorizer.decide_now(peer("web"), "api") is None
    first = authorizer.authorize(peer("web"), "api")
    assert consul.count("authorize") == 1
    consul.authorizations[0].callback(AuthorizeResult(True, "ACLs disabled"))
    assert result(first).allowed
    # Another certificate of the same service: answered from memory.
    again = authorizer.decide_now(peer("web", serial="0b:02"), "api")
    assert again is not None
    assert again.allowed
    assert consul.count("authorize") == 1
    clock.advance(30.1)
    assert authorizer.decide_now(peer("web"), "api") is None
    authorizer.authorize(peer("web"), "api")
    assert consul.count("authorize") == 2


def test_agent_answers_per_source_are_bounded_oldest_first() -> None:
    """
    The per-source memory of the agent's answers keeps at most
    max_remembered sources, dropping the oldest, however many services
    connect between two changes of the intentions.
    """
    clock = Clock()
    consul = ScriptedConsul((ixn("cron", "deny"),))
    authorizer = started(consul, clock, default="agent", agent_cache_ttl=30.0)
    authorizer.max_remembered = 2
    sources = ["web", "db", "cache"]
    for i, source in enumerate(sources):
        authorizer.authorize(peer(source), "api")
        consul.authorizations[i].callback(AuthorizeResult(True, "ACLs disabled"))
    assert [authorizer.decide_now(peer(s), "api") is not None for s in sources] == [
        False,
        True,
        True,
    ]


def test_agent_default_is_not_asked_when_an_intention_matches() -> None:
    consul = ScriptedConsul((ixn("web", "deny"),))
    authorizer = started(consul, Clock(), default="agent")
    decision = result(authorizer.authorize(peer("web"), "api"))
    assert not decision.allowed
    assert consul.count("authorize") == 0


def test_a_change_of_intentions_forgets_the_agents_answers() -> None:
    clock = Clock()
    consul = ScriptedConsul()
    authorizer = started(consul, clock, default="agent")
    authorizer.authorize(peer("web"), "api")
    consul.authorizations[0].callback(AuthorizeResult(True, "ACLs disabled"))
    clock.advance(1)
    consul.change((ixn("cron", "deny"),))
    assert authorizer.decide_now(peer("web"), "api") is None


def test_other_targets_are_denied() -> None:
    authorizer = started(ScriptedConsul((ixn("web"),)), Clock())
    decision = authorizer.decide_now(peer("web"), "db")
    assert decision is not None
    assert not decision.allowed
    assert "'db'" in decision.reason


def test_stopped_authorizer_fails_closed() -> None:
    consul = ScriptedConsul((ixn("web"),))
    authorizer = started(consul, Clock())
    authorizer.stopService()
    assert authorizer.decide_now(peer("web"), "api") is None
    decision = result(authorizer.authorize(peer("web"), "api"))
    assert not decision.allowed
    assert "stopped" in decision.reason


L7 = (
    IntentionPermission("deny", IntentionHTTPPermission(path_prefix="/admin")),
    IntentionPermission("allow", IntentionHTTPPermission(methods=("GET",))),
)


def test_l7_intention_defers_the_connection_to_per_request_decisions() -> None:
    consul = ScriptedConsul((ixn("web", None, permissions=L7),))
    authorizer = started(consul, Clock())
    connection = authorizer.decide_now(peer("web"), "api")
    assert connection is not None
    # Denied at L4 unless the server decides each request (per_request).
    assert (connection.allowed, connection.source, connection.per_request) == (
        False,
        L7_SOURCE,
        True,
    )
    read = authorizer.decide_request(peer("web"), "GET", "/users", {})
    admin = authorizer.decide_request(peer("web").identity, b"GET", b"/admin/x", {})
    write = authorizer.decide_request(peer("web"), "POST", "/users", {})
    assert (read.allowed, admin.allowed, write.allowed) == (True, False, False)
    assert write.source == DEFAULT_SOURCE


def test_decide_request_follows_changes() -> None:
    clock = Clock()
    consul = ScriptedConsul((ixn("web", None, permissions=L7),))
    authorizer = started(consul, clock)
    clock.advance(1)
    consul.change((ixn("web", "allow"),))
    assert authorizer.decide_request(peer("web"), "POST", "/admin", {}).allowed


def test_decide_request_denies_on_a_cold_cache() -> None:
    consul = ScriptedConsul((ixn("web"),))
    consul.hold_match = True
    authorizer = started(consul, Clock())
    decision = authorizer.decide_request(peer("web"), "GET", "/", {})
    assert not decision.allowed
    assert "no current intentions" in decision.reason


def test_decide_request_agent_default_uses_the_agents_last_answer() -> None:
    clock = Clock()
    consul = ScriptedConsul()
    authorizer = started(consul, clock, default="agent", agent_cache_ttl=10.0)
    first = authorizer.decide_request(peer("web"), "GET", "/", {})
    assert not first.allowed
    assert consul.count("authorize") == 1
    consul.authorizations[0].callback(AuthorizeResult(True, "ACLs disabled"))
    assert authorizer.decide_request(peer("web"), "GET", "/", {}).allowed
    clock.advance(11)
    # Past the TTL: still the last answer, and a refresh in the background.
    assert authorizer.decide_request(peer("web"), "GET", "/", {}).allowed
    assert consul.count("authorize") == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("default", "maybe"),
        ("max_staleness", -1.0),
        ("poll_interval", 0.0),
        ("timeout", float("nan")),
        ("timeout", "3"),
        ("agent_cache_ttl", float("inf")),
        ("max_staleness", True),
    ],
)
def test_bad_settings_are_refused_by_name(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        IntentionAuthorizer(ScriptedConsul(), Clock(), "api", **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["max_staleness", "agent_cache_ttl"])
def test_zero_is_allowed_where_it_means_never_reuse(name: str) -> None:
    authorizer = IntentionAuthorizer(ScriptedConsul(), Clock(), "api", **{name: 0})  # type: ignore[arg-type]
    assert getattr(authorizer, name) == 0.0
    with pytest.raises(ValueError, match=f"{name} must be .* >= 0"):
        IntentionAuthorizer(ScriptedConsul(), Clock(), "api", **{name: -0.5})  # type: ignore[arg-type]
