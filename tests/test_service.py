"""
Tests for ``connect_native.service``: one CertManager per (client, service)
per process, started on the first lease and stopped by the last release.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock

from connect_native.certs import (
    CertificateAuthorityClient,
    CertManager,
    ManagerState,
)
from connect_native.devagent.ca import DevCA
from connect_native.service import (
    CertManagerRegistry,
    acquire_cert_manager,
    cert_managers,
)
from tests.test_certmanager import ScriptedAgent, wall_clock


def make_registry() -> tuple[
    Clock, ScriptedAgent, CertManagerRegistry, list[CertManager]
]:
    clock = wall_clock()
    agent = ScriptedAgent(clock, DevCA(clock))
    made: list[CertManager] = []

    def factory(
        clock: IReactorTime, client: CertificateAuthorityClient, service: str
    ) -> CertManager:
        manager = CertManager(clock, client, service, jitter=lambda: 0.5)
        made.append(manager)
        return manager

    return clock, agent, CertManagerRegistry(factory), made


def test_first_acquire_starts_a_manager_that_becomes_ready() -> None:
    clock, agent, registry, made = make_registry()
    lease = registry.acquire(clock, agent, "web")
    assert made == [lease.manager]
    assert lease.manager.running
    assert lease.manager.service == "web"
    assert lease.manager.state is ManagerState.READY
    assert lease.manager.current() is not None


def test_two_acquires_share_one_manager_and_one_release_keeps_it_running() -> None:
    clock, agent, registry, made = make_registry()
    first = registry.acquire(clock, agent, "web")
    second = registry.acquire(clock, agent, "web")
    assert second.manager is first.manager
    assert len(made) == 1
    reads = len(agent.requests)
    assert reads == 2  # one manager: one roots read, one leaf read

    first.release()
    assert second.manager.running
    assert registry.leases(second.manager) == 1
    assert second.manager.current() is not None

    second.release()
    assert not second.manager.running
    assert second.manager.state is ManagerState.STOPPED
    assert registry.managers() == []
    # Its watches are stopped: nothing left to run on the clock.
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


def test_release_twice_counts_once() -> None:
    clock, agent, registry, _ = make_registry()
    first = registry.acquire(clock, agent, "web")
    second = registry.acquire(clock, agent, "web")
    first.release()
    first.release()
    assert first.released
    assert second.manager.running
    second.release()
    assert not second.manager.running


def test_acquire_after_the_last_release_makes_a_fresh_manager() -> None:
    clock, agent, registry, _made = make_registry()
    lease = registry.acquire(clock, agent, "web")
    lease.release()
    again = registry.acquire(clock, agent, "web")
    assert again.manager is not lease.manager
    assert again.manager.running
    assert not lease.manager.running
    # Releasing the old lease again must not touch the new manager.
    lease.release()
    assert again.manager.running


def test_services_and_clients_are_kept_apart() -> None:
    clock, agent, registry, _made = make_registry()
    other_agent = ScriptedAgent(clock, DevCA(clock))
    web = registry.acquire(clock, agent, "web")
    api = registry.acquire(clock, agent, "api")
    web_elsewhere = registry.acquire(clock, other_agent, "web")
    assert len({id(web.manager), id(api.manager), id(web_elsewhere.manager)}) == 3
    api.release()
    assert web.manager.running
    assert web_elsewhere.manager.running
    assert not api.manager.running


def test_last_release_fails_pending_waiters() -> None:
    clock, agent, registry, _ = make_registry()
    agent.hold = True
    lease = registry.acquire(clock, agent, "web")
    waiter = lease.manager.when_ready()
    failures: list[object] = []
    waiter.addErrback(failures.append)
    lease.release()
    assert len(failures) == 1


def test_the_process_registry_is_shared_by_acquire_cert_manager() -> None:
    clock = wall_clock()
    agent = ScriptedAgent(clock, DevCA(clock))
    first = acquire_cert_manager(clock, agent, "web")
    second = acquire_cert_manager(clock, agent, "web")
    try:
        assert first.manager is second.manager
        assert first.manager in cert_managers.managers()
    finally:
        first.release()
        second.release()
    assert first.manager not in cert_managers.managers()
    assert not first.manager.running
