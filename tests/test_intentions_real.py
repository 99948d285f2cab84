"""
IntentionAuthorizer against a real Consul 1.8.7 agent (ACLs off, so its
default allows): for a table of sources and intentions, the local decision
equals the agent's ``/v1/agent/connect/authorize`` answer, and a new
intention takes effect without a restart.

A fresh agent per test: a ``* -> *`` intention would reach every other
test's services on the shared one.  The property over random tables shares
its agent among its examples, each deleting what it created.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, TypeVar

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from connect_native.authorize import Peer
from connect_native.authorize.intentions import IntentionAuthorizer
from connect_native.authorize.rules import compile_intentions, decide_connection
from connect_native.consul.client import ConsulClient
from connect_native.consul.records import (
    Intention,
    decode_intentions,
    decode_intentions_match,
)
from connect_native.identity import ServiceIdentity
from tests.consul_agent import RealConsulAgent
from tests.test_devagent_support import Harness

T = TypeVar("T")

INTENTIONS = "/v1/connect/intentions"

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
        "POST", INTENTIONS, _intention(source, destination, action)
    )
    assert status == 200, body
    return str(json.loads(body)["ID"])


def _intention(source: str, destination: str, action: str) -> dict[str, str]:
    return {"SourceName": source, "DestinationName": destination, "Action": action}


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


# -- random tables against the agent ------------------------------------------------

AUTHORIZE = "/v1/agent/connect/authorize"

# Case variants on both sides: the agent folds a destination's case (and
# refuses a second intention for the folded source and destination) but
# compares the caller's name with the source exactly.
SOURCES = ("api", "Api", "evil", "EVIL", "*")
DESTINATIONS = ("web", "Web", "WEB", "db", "*")
CALLERS = ("api", "Api", "API", "evil", "Evil", "EVIL", "other")
TARGETS = ("web", "Web", "WEB", "db")

tables = st.lists(
    st.tuples(
        st.sampled_from(SOURCES),
        st.sampled_from(DESTINATIONS),
        st.sampled_from(("allow", "deny")),
    ),
    max_size=5,
    unique_by=lambda row: (row[0], row[1]),
)

# Each example names its destinations afresh: the agent's authorize cache
# (refreshed in the background) has never seen them, so its first answer
# reads the intentions just written.
_examples = itertools.count()


def _ask_both(
    agent: RealConsulAgent, dev: Harness, method: str, path: str, body: object
) -> tuple[int, Any, Any]:
    """The same request to the real and the development agent."""
    status, raw = agent.request(method, path, body)
    answer = dev.call(method, path, None if body is None else json.dumps(body))
    assert answer.status == status, (method, path, body, raw, answer.text)
    if status != 200:
        return status, raw.decode(), answer.text
    return status, json.loads(raw), answer.json()


def _local(intentions: tuple[Intention, ...], target: str, caller: str) -> bool:
    table = compile_intentions(intentions, target)
    decision = decide_connection(table, peer(caller).identity, default_allows=True)
    assert decision is not None
    return decision.allowed


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(table=tables)
def test_random_tables_decide_as_the_agent_decides(
    fresh_real_consul: RealConsulAgent, table: list[tuple[str, str, str]]
) -> None:
    # One agent for every example; each deletes what it created.
    agent = fresh_real_consul
    prefix = f"t{next(_examples)}-"

    def named(destination: str) -> str:
        return destination if destination == "*" else prefix + destination

    dev = Harness()
    created: list[str] = []
    try:
        for source, destination, action in table:
            body = _intention(source, named(destination), action)
            status, real, _ = _ask_both(agent, dev, "POST", INTENTIONS, body)
            if status == 200:
                created.append(real["ID"])
            else:
                assert real.startswith("duplicate intention found"), real
        _, listed, _ = _ask_both(agent, dev, "GET", INTENTIONS, None)
        everything = decode_intentions(listed)
        for target in TARGETS:
            name = named(target)
            match = f"{INTENTIONS}/match?by=destination&name={name}"
            _, matched, _ = _ask_both(agent, dev, "GET", match, None)
            theirs = decode_intentions_match(matched)[name]
            for caller in CALLERS:
                body = {
                    "Target": name,
                    "ClientCertURI": peer(caller).uri,
                    "ClientCertSerial": "0a:01",
                }
                _, real, by_dev = _ask_both(agent, dev, "POST", AUTHORIZE, body)
                wanted = real["Authorized"]
                got = {
                    "devagent": by_dev["Authorized"],
                    "local, from the match": _local(theirs, name, caller),
                    "local, from the list": _local(everything, name, caller),
                }
                assert got == dict.fromkeys(got, wanted), (target, caller, real)
    finally:
        for intention_id in created:
            status, raw = agent.request("DELETE", f"{INTENTIONS}/{intention_id}")
            assert status == 200, raw
