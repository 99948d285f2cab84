"""
Registration against a real Consul 1.8.7 agent, on the real reactor.

The point is the real thing: the agent accepts our registration body, lists
the instance as a passing Connect-native one once the certificate manager is
ready, answers a check update for a deregistered instance so that we
register again, and removes the instance when we stop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from connect_native.certs import CertManager
from connect_native.consul.client import ConsulClient
from connect_native.consul.records import HealthEntry
from connect_native.registration import Registration
from tests.consul_agent import RealConsulAgent

T = TypeVar("T")


def bounded(d: Deferred[T], seconds: float) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


async def poll(condition: Callable[[], Awaitable[T | None]], seconds: float) -> T:
    """Ask ``condition`` until it answers, for at most ``seconds``."""
    deadline = reactor.seconds() + seconds
    while True:
        answer = await condition()
        if answer is not None:
            return answer
        if reactor.seconds() >= deadline:
            raise AssertionError(f"no answer within {seconds}s")
        await task.deferLater(reactor, 0.1, lambda: None)


async def passing(client: ConsulClient, service: str) -> tuple[HealthEntry, ...]:
    entries = await bounded(client.health_connect(service, passing=True), 10)
    return entries.value


class Running:
    """A certificate manager and a registration of a unique service, started."""

    def __init__(self, agent: RealConsulAgent, name: str) -> None:
        self.client = ConsulClient(reactor, address=agent.http_address)
        self.other = ConsulClient(reactor, address=agent.http_address)
        self.manager = CertManager(reactor, self.client, name, wait=30.0)
        self.name = name
        self.registration = Registration(
            reactor,
            self.client,
            self.manager,
            name,
            21443,
            address="127.0.0.1",
            tags=["real"],
            check_ttl=10,
            refresh_interval=0.5,
        )
        self.stopped = False
        self.manager.startService()
        self.registration.startService()

    async def listed(self) -> HealthEntry | None:
        entries = await passing(self.other, self.name)
        return entries[0] if entries else None

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        try:
            await bounded(self.registration.stopService(), 10)
            self.manager.stopService()
        finally:
            await self.client.close()
            await self.other.close()


@pytest_twisted.ensureDeferred
async def test_listed_as_a_passing_connect_instance_once_ready(
    real_consul: RealConsulAgent, unique_name: str
) -> None:
    running = Running(real_consul, unique_name)
    try:
        await bounded(running.manager.when_ready(), 30)
        entry = await poll(running.listed, 15)
        assert entry.service.id == running.registration.service_id
        assert entry.service.port == 21443
        assert entry.service.address == "127.0.0.1"
        assert entry.service.tags == ("real",)
        [check] = [
            c for c in entry.checks if c.check_id == running.registration.check_id
        ]
        assert check.status == "passing"
        assert "spiffe://" in check.output
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_registers_again_after_deregistration_behind_its_back(
    real_consul: RealConsulAgent, unique_name: str
) -> None:
    running = Running(real_consul, unique_name)
    try:
        await bounded(running.manager.when_ready(), 30)
        await poll(running.listed, 15)
        service_id = running.registration.service_id
        await bounded(running.other.deregister_service(service_id), 10)
        assert await passing(running.other, unique_name) == ()
        # The next refresh (every 0.5 s) finds the check unknown.
        entry = await poll(running.listed, 15)
        assert entry.service.id == service_id
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_stop_deregisters(real_consul: RealConsulAgent, unique_name: str) -> None:
    running = Running(real_consul, unique_name)
    other = ConsulClient(reactor, address=real_consul.http_address)
    try:
        await bounded(running.manager.when_ready(), 30)
        await poll(running.listed, 15)
        await running.stop()
        everyone = await bounded(other.health_connect(unique_name, passing=False), 10)
        assert everyone.value == ()
    finally:
        await running.stop()
        await other.close()
