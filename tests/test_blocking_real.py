"""
The blocking-query Watch against a real Consul 1.8.7 agent: it is woken by a
real change, and it does not spin when ACLs make the agent answer index 1 at
once instead of blocking.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from connect_native.consul.blocking import Watch
from connect_native.consul.client import ConsulClient
from connect_native.consul.records import (
    HealthEntry,
    Indexed,
    ServiceRegistration,
    TTLCheck,
)
from tests.consul_agent import RealConsulAgent

BOUND = 15.0


def bounded(d: Deferred[Any], seconds: float = BOUND) -> Deferred[Any]:
    timer = reactor.callLater(seconds, d.cancel)  # type: ignore[attr-defined]

    def done(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    return d.addBoth(done)


@pytest_twisted.ensureDeferred
async def test_watch_delivers_a_real_check_change(
    real_consul: RealConsulAgent, unique_name: str
) -> None:
    client = ConsulClient(reactor, address=real_consul.http_address)
    check = TTLCheck(check_id=f"{unique_name}:ttl", ttl=60)
    await client.register_service(
        ServiceRegistration(
            name=unique_name, port=5001, connect_native=True, checks=[check]
        )
    )
    seen: list[tuple[HealthEntry, ...]] = []
    changed: Deferred[None] = Deferred()

    def on_change(entries: tuple[HealthEntry, ...]) -> None:
        seen.append(entries)
        if entries and not changed.called:
            changed.callback(None)

    watch: Watch[tuple[HealthEntry, ...]] = Watch(
        reactor,
        lambda index, wait: client.health_connect(
            unique_name, passing=True, index=index, wait=wait
        ),
        on_change,
        name=f"health {unique_name}",
        wait=10,
        min_interval=0.1,
    )
    watch.start()
    try:
        assert await bounded(watch.when_first()) == ()
        await client.check_pass(check.check_id)
        await bounded(changed)
    finally:
        watch.stop()
        await client.deregister_service(unique_name)
        await client.close()
    assert seen[0] == ()
    assert [e.service.service for e in seen[-1]] == [unique_name]


@pytest_twisted.ensureDeferred
async def test_watch_does_not_spin_on_acl_filtered_answers(
    real_consul_acl: RealConsulAgent, unique_name: str
) -> None:
    """
    With default-deny ACLs and no token, health/connect answers ``[]`` with
    ``X-Consul-Index: 1`` at once, even to a blocking call at index 1.  The
    loop must space its requests by ``min_interval`` rather than hammer the
    agent.
    """
    anonymous = ConsulClient(reactor, address=real_consul_acl.http_address)
    sent: list[tuple[float, int]] = []
    answered: list[int | None] = []

    def fetch(index: int, wait: float) -> Deferred[Indexed[tuple[HealthEntry, ...]]]:
        sent.append((reactor.seconds(), index))  # type: ignore[attr-defined]
        d = anonymous.health_connect(unique_name, index=index, wait=wait)

        def record(
            result: Indexed[tuple[HealthEntry, ...]],
        ) -> Indexed[tuple[HealthEntry, ...]]:
            answered.append(result.index)
            return result

        return d.addCallback(record)

    watch: Watch[tuple[HealthEntry, ...]] = Watch(
        reactor,
        fetch,
        lambda entries: None,
        name=f"anonymous health {unique_name}",
        wait=30,
        min_interval=0.5,
    )
    watch.start()
    try:
        await deferLater(reactor, 2.4, lambda: None)
    finally:
        watch.stop()
        await anonymous.close()
    # The agent did answer at once (otherwise there would be one request
    # blocked for 30 s) ...
    assert len(sent) >= 3, sent
    assert set(answered) == {1}
    # ... and the loop sent index 1 back but spaced its requests.
    assert [index for _, index in sent[1:]] == [1] * (len(sent) - 1)
    assert len(sent) <= 6, sent
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(sent)]
    assert min(gaps) >= 0.5 - 0.01, gaps
