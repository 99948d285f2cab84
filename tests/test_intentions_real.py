"""
IntentionAuthorizer against a real Consul 1.8.7 agent (ACLs off, so its
default allows): for a table of sources and intentions, the local decision
equals the agent's ``/v1/agent/connect/authorize`` answer, and a new
intention takes effect without a restart.

A fresh agent per test: a ``* -> *`` intention would reach every other
test's services on the shared one.
"""

from __future__ import annotations

import json
from typing import TypeVar

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from connect_native.authorize import Peer
from connect_native.authorize_intentions import IntentionAuthorizer
from connect_native.consul.client import ConsulClient
from connect_native.identity import ServiceIdentity
from tests.consul_agent import RealConsulAgent

T = TypeVar("T")

TD = "11111111-2222-3333-4444-555555555555.consul"


def bounded(d: Deferred[T], seconds: float = 20.0) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


def peer(service: str) -> Peer:
    return Peer(
        ServiceIdentity(
            trust_domain=TD, namespace="default", datacenter="dc1", service=service
        ),
        "0a:01",
    )


def create(agent: RealConsulAgent, source: str, destination: str, action: str) -> str:
    """Set-up only (synchronous): before the test's first wait."""
    status, body = agent.request(
        "POST",
        "/v1/connect/intentions",
        {"SourceName": source, "DestinationName": destination, "Action": action},
    )
    assert status == 200, body
    return str(json.loads(body)["ID"])


# destination -> [(source, expected by the agent)]; set up below.
CASES = {
    "web": [("api", True), ("billing", False), ("nobody", True)],
    "db": [("api", True), ("billing", False), ("cron", True)],
}


async def _compare(
    client: ConsulClient, destination: str, sources: list[str]
) -> list[tuple[str, bool, bool]]:
    authorizer = IntentionAuthorizer(client, reactor, destination, default="allow")
    authorizer.startService()
    try:
        rows = []
        for source in sources:
            local = await bounded(authorizer.authorize(peer(source), destination))
            agent = await bounded(
                client.authorize(destination, peer(source).uri, "0a:01")
            )
            rows.append((source, local.allowed, agent.authorized))
        return rows
    finally:
        authorizer.stopService()


@pytest_twisted.ensureDeferred
async def test_local_l4_decisions_equal_the_agents(
    fresh_real_consul: RealConsulAgent,
) -> None:
    agent = fresh_real_consul
    create(agent, "api", "web", "allow")  # exact allow
    create(agent, "billing", "web", "deny")  # exact deny
    create(agent, "*", "db", "allow")  # wildcard source allow
    create(agent, "billing", "db", "deny")  # deny over the wildcard allow
    client = ConsulClient(reactor, address=agent.http_address)
    try:
        # "nobody" -> web matches nothing: the default (ACLs off: allow).
        for destination, expected in CASES.items():
            rows = await _compare(client, destination, [s for s, _ in expected])
            for (source, local, by_agent), (_, wanted) in zip(
                rows, expected, strict=True
            ):
                assert local == by_agent == wanted, (destination, source)

        # Wildcard both deny: reaches a destination with nothing else, and
        # loses to every more precise intention.
        await bounded(client.create_intention("*", "*", "deny"))
        rows = await _compare(client, "cache", ["api", "billing"])
        rows += await _compare(client, "web", ["api", "nobody"])
        assert [(local, by_agent) for _, local, by_agent in rows] == [
            (False, False),
            (False, False),
            (True, True),
            (False, False),
        ]
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_new_intention_takes_effect_without_restart(
    fresh_real_consul: RealConsulAgent,
) -> None:
    agent = fresh_real_consul
    api_web = create(agent, "api", "web", "allow")
    client = ConsulClient(reactor, address=agent.http_address)
    authorizer = IntentionAuthorizer(client, reactor, "web", default="deny")
    authorizer.startService()
    try:
        first = await bounded(authorizer.authorize(peer("api"), "web"))
        assert first.allowed
        intention_id = await bounded(client.create_intention("billing", "web", "deny"))
        await bounded(client.delete_intention(api_web))
        for _ in range(100):  # bounded: 10 s
            now = authorizer.decide_now(peer("api"), "web")
            if now is not None and not now.allowed:
                break
            await deferLater(reactor, 0.1)
        now = authorizer.decide_now(peer("api"), "web")
        assert now is not None
        assert not now.allowed
        assert "the default denies" in now.reason
        billing = authorizer.decide_now(peer("billing"), "web")
        assert billing is not None
        assert not billing.allowed
        assert intention_id in billing.reason
    finally:
        authorizer.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_names_compare_as_the_agent_compares_them(
    fresh_real_consul: RealConsulAgent,
) -> None:
    # Measured: with "* => web allow" and "evil => Web deny" the agent denies
    # evil (its intention index folds the destination's case); a local match
    # that compared names exactly allowed it through "*".
    agent = fresh_real_consul
    create(agent, "*", "web", "allow")
    create(agent, "evil", "Web", "deny")
    create(agent, "Api", "WEB", "deny")
    client = ConsulClient(reactor, address=agent.http_address)
    try:
        rows = await _compare(client, "web", ["evil", "Evil", "api", "Api", "other"])
        for source, local, by_agent in rows:
            assert local == by_agent, (source, local, by_agent)
        assert dict((s, a) for s, _, a in rows)["evil"] is False
    finally:
        await client.close()
