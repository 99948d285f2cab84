"""
AgentAuthorizer: one authorize call per new peer, coalesced, briefly
remembered, bounded in time, and closed on every failure.
"""

from __future__ import annotations

from typing import Any

import pytest
from attrs import frozen
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from connect_native.authorize import (
    AgentAuthorizer,
    Decision,
    IAuthorizer,
    Peer,
    colon_hex_serial,
)
from connect_native.identity import ServiceIdentity

API = ServiceIdentity(
    trust_domain="11111111-2222-3333-4444-555555555555.consul",
    namespace="default",
    datacenter="dc1",
    service="api",
)
PEER = Peer(identity=API, serial="0a:1b")


@frozen
class Result:
    authorized: Any
    reason: str


class ScriptedClient:
    """
    Records each authorize call and hands back a Deferred the test fires.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.pending: list[Deferred[Any]] = []
        self.cancelled = 0

    def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> Deferred[Any]:
        self.calls.append((target, client_cert_uri, client_cert_serial))

        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.pending.append(d)
        return d


def results(d: Deferred[Decision]) -> list[Decision]:
    out: list[Decision] = []
    d.addCallback(out.append)
    return out


def make(**kwargs: Any) -> tuple[AgentAuthorizer, ScriptedClient, Clock]:
    client = ScriptedClient()
    clock = Clock()
    return AgentAuthorizer(client, clock, **kwargs), client, clock


def test_provides_iauthorizer() -> None:
    authorizer, _, _ = make()
    assert IAuthorizer.providedBy(authorizer)


def test_sends_target_uri_and_serial() -> None:
    authorizer, client, _ = make()
    authorizer.authorize(PEER, "web")
    assert client.calls == [("web", API.uri, "0a:1b")]


def test_allowed_and_denied_carry_the_agents_reason() -> None:
    authorizer, client, _ = make(cache_ttl=0)
    allowed = results(authorizer.authorize(PEER, "web"))
    client.pending[0].callback(Result(True, "ACLs disabled"))
    denied = results(authorizer.authorize(PEER, "web"))
    client.pending[1].callback(Result(False, "Matched intention: DENY"))
    assert allowed == [Decision(True, "ACLs disabled", "agent")]
    assert denied == [Decision(False, "Matched intention: DENY", "agent")]


def test_identical_calls_in_flight_are_coalesced() -> None:
    authorizer, client, _ = make()
    first = results(authorizer.authorize(PEER, "web"))
    second = results(authorizer.authorize(PEER, "web"))
    other_target = results(authorizer.authorize(PEER, "db"))
    assert len(client.calls) == 2
    client.pending[0].callback(Result(True, "ok"))
    assert first == second == [Decision(True, "ok", "agent")]
    assert other_target == []


def test_decision_remembered_for_cache_ttl_then_asked_again() -> None:
    authorizer, client, clock = make(cache_ttl=1.0)
    authorizer.authorize(PEER, "web")
    client.pending[0].callback(Result(True, "ok"))
    assert authorizer.decide_now(PEER, "web") == Decision(True, "ok", "agent-cache")
    assert results(authorizer.authorize(PEER, "web")) == [
        Decision(True, "ok", "agent-cache")
    ]
    assert len(client.calls) == 1
    clock.advance(1.0)
    assert authorizer.decide_now(PEER, "web") is None
    authorizer.authorize(PEER, "web")
    assert len(client.calls) == 2


def test_cache_is_per_serial() -> None:
    authorizer, client, _ = make(cache_ttl=1.0)
    authorizer.authorize(PEER, "web")
    client.pending[0].callback(Result(True, "ok"))
    renewed = Peer(identity=API, serial="0a:1c")
    assert authorizer.decide_now(renewed, "web") is None


def test_cache_ttl_zero_never_remembers() -> None:
    authorizer, client, _ = make(cache_ttl=0)
    authorizer.authorize(PEER, "web")
    client.pending[0].callback(Result(True, "ok"))
    assert authorizer.decide_now(PEER, "web") is None


def test_timeout_denies_and_cancels_the_request() -> None:
    authorizer, client, clock = make(timeout=2.0)
    decision = results(authorizer.authorize(PEER, "web"))
    clock.advance(1.9)
    assert decision == []
    clock.advance(0.2)
    assert client.cancelled == 1
    assert decision[0].allowed is False
    assert "did not answer within 2s" in decision[0].reason
    # a timeout is not remembered: the next connection asks again
    assert authorizer.decide_now(PEER, "web") is None


def test_agent_error_denies_with_the_reason() -> None:
    class Failing(ScriptedClient):
        def authorize(self, *args: str) -> Deferred[Any]:
            return fail(RuntimeError("403 Permission denied"))

    authorizer = AgentAuthorizer(Failing(), Clock())
    decision = results(authorizer.authorize(PEER, "web"))
    assert decision[0].allowed is False
    assert "403 Permission denied" in decision[0].reason


def test_malformed_answer_denies() -> None:
    authorizer, client, _ = make()
    decision = results(authorizer.authorize(PEER, "web"))
    client.pending[0].callback(Result("yes", "odd"))
    assert decision[0].allowed is False


def test_answer_without_fields_denies_rather_than_hangs() -> None:
    authorizer, client, _ = make()
    decision = results(authorizer.authorize(PEER, "web"))
    client.pending[0].callback(object())
    assert decision
    assert decision[0].allowed is False


def test_remembered_decisions_are_bounded_oldest_first() -> None:
    """
    Each renewed certificate is a new serial; with a long cache_ttl the
    memory keeps at most max_remembered decisions, dropping the oldest.
    """
    authorizer, client, _ = make(cache_ttl=3600.0)
    authorizer.max_remembered = 3
    peers = [Peer(identity=API, serial=f"0a:{i:02x}") for i in range(5)]
    for i, p in enumerate(peers):
        authorizer.authorize(p, "web")
        client.pending[i].callback(Result(True, "ok"))
    assert [authorizer.decide_now(p, "web") is not None for p in peers] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_cancelled_waiter_leaves_others_waiting() -> None:
    authorizer, client, _ = make()
    first = authorizer.authorize(PEER, "web")
    first.addErrback(lambda f: None)
    second = results(authorizer.authorize(PEER, "web"))
    first.cancel()
    client.pending[0].callback(Result(True, "ok"))
    assert second == [Decision(True, "ok", "agent")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"cache_ttl": -1},
        # A timer at NaN or infinity never fires: an unbounded wait, or a
        # decision remembered forever.
        {"timeout": float("nan")},
        {"timeout": float("inf")},
        {"cache_ttl": float("nan")},
        {"cache_ttl": float("inf")},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        AgentAuthorizer(ScriptedClient(), Clock(), **kwargs)


@pytest.mark.parametrize(
    ("serial", "expected"),
    [(0, "00"), (8, "08"), (0x1F2A, "1f:2a"), (2**64 - 1, "ff:" * 7 + "ff")],
)
def test_colon_hex_serial(serial: int, expected: str) -> None:
    assert colon_hex_serial(serial) == expected
