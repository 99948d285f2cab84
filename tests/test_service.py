"""
Tests for ``connect_native.service``: one CertManager per (client, service)
per process, started on the first lease and stopped by the last release; and
ConnectService, the owner of one Connect service in the process.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IService
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor

from connect_native.authorize import AllowIdsAuthorizer
from connect_native.certs import (
    CertificateAuthorityClient,
    CertManager,
    ManagerState,
)
from connect_native.devagent.ca import DevCA
from connect_native.service import (
    CertManagerRegistry,
    ConnectService,
    ConnectServiceRegistry,
    ServiceNotStarted,
    acquire_cert_manager,
    cert_managers,
)
from connect_native.sources import InvalidIdentityDescription
from connect_native.testing import CertificateFactory, FakeAuthorizer, FakeBundleSource
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


# --- ConnectService -------------------------------------------------------------


def make_service(
    name: str = "web",
) -> tuple[Clock, ScriptedAgent, ConnectService, list[CertManager]]:
    clock, agent, registry, made = make_registry()
    service = ConnectService(
        clock,
        name,
        consul=agent,
        cert_managers=registry,  # type: ignore[arg-type]
    )
    return clock, agent, service, made


def test_a_connect_service_is_an_iservice_exported_from_the_package() -> None:
    import connect_native

    assert connect_native.ConnectService is ConnectService
    assert IService.implementedBy(ConnectService)
    _, _, service, _ = make_service()
    assert IService.providedBy(service)
    assert service.name == "web"


def test_starting_leases_the_shared_manager_and_stopping_releases_it() -> None:
    _, _, service, made = make_service()
    assert service.state is ManagerState.STOPPED
    assert service.identity.current() is None
    service.startService()
    [manager] = made
    assert service.cert_manager is manager
    assert manager.running
    assert service.state is ManagerState.READY
    bundle = service.identity.current()
    assert bundle is not None
    assert bundle.identity.service == "web"
    assert service.when_ready().result is bundle

    service.stopService()
    assert not manager.running
    assert service.cert_manager is None
    assert service.state is ManagerState.STOPPED
    assert service.identity.current() is None


def test_certificates_asked_before_the_start_fail_with_a_reason() -> None:
    _, _, service, made = make_service()
    failure = service.identity.when_ready()
    with pytest.raises(ServiceNotStarted, match="not started"):
        failure.result.raiseException()
    failure.addErrback(lambda _: None)
    assert made == []


def test_stopping_fails_the_waiters_of_a_manager_without_a_certificate() -> None:
    clock, agent, registry, _ = make_registry()
    agent.hold = True  # the agent never answers
    silent = ConnectService(
        clock,
        "web",
        consul=agent,  # type: ignore[arg-type]
        cert_managers=registry,
    )
    waiting = silent.when_ready()
    assert not waiting.called
    silent.stopService()
    failures: list[Any] = []
    waiting.addErrback(failures.append)
    assert len(failures) == 1


def test_endpoints_hold_a_service_they_started_until_the_last_lets_go() -> None:
    _, _, service, made = make_service()
    one, two = service.held_identity(), service.held_identity()
    assert one.current() is not None  # the first use starts it
    assert service.running
    two.when_ready()
    one.close()
    assert service.running
    two.close()
    assert not service.running
    assert not made[0].running
    two.close()  # a second close counts nothing


def test_a_service_started_by_its_owner_outlives_its_endpoints() -> None:
    _, _, service, _ = make_service()
    service.startService()
    held = service.held_identity()
    held.current()
    held.close()
    assert service.running


def test_its_endpoints_use_its_certificates_and_its_authorizer() -> None:
    clock, _, service, _ = make_service()
    # By default: one AgentAuthorizer for every endpoint of the service.
    first = service.server_endpoint(TCP4ServerEndpoint(MemoryReactor(), 1))
    second = service.server_endpoint(TCP4ServerEndpoint(MemoryReactor(), 2))
    assert first._authorizer is second._authorizer is service.authorizer
    assert first._source is service.identity
    authorizer = FakeAuthorizer({"api"})
    with_own = ConnectService(
        clock,
        "web",
        identity=FakeBundleSource(),
        authorizer=authorizer,
    )
    endpoint = with_own.server_endpoint(TCP4ServerEndpoint(MemoryReactor(), 8443))
    assert endpoint.service == "web"
    assert endpoint._authorizer is authorizer
    assert endpoint._source is with_own.identity
    other = FakeAuthorizer(set())
    assert (
        with_own.server_endpoint(
            TCP4ServerEndpoint(MemoryReactor(), 8443), authorizer=other
        )._authorizer
        is other
    )


def test_the_registry_shares_one_service_per_agent_and_name() -> None:
    registry = ConnectServiceRegistry()
    clock = Clock()
    agent, other = (
        ScriptedAgent(clock, DevCA(clock)),
        ScriptedAgent(clock, DevCA(clock)),
    )
    web = registry.get(clock, "web", consul=agent)  # type: ignore[arg-type]
    assert registry.get(clock, "web", consul=agent) is web  # type: ignore[arg-type]
    assert registry.get(clock, "api", consul=agent) is not web  # type: ignore[arg-type]
    assert registry.get(clock, "web", consul=other) is not web  # type: ignore[arg-type]
    assert web in registry.services()


def test_identity_may_be_given_as_files(tmp_path: Path) -> None:
    from connect_native.sources.files import FileIdentitySource

    ca = CertificateFactory()
    leaf = ca.leaf("web")
    (tmp_path / "cert.pem").write_text(leaf.chain_pem)
    (tmp_path / "key.pem").write_text(leaf.key_pem)
    (tmp_path / "ca.pem").write_text(ca.root_pem)
    clock = Clock()
    clock.advance(time.time())
    service = ConnectService(
        clock,
        "web",
        identity=f"files:cert={tmp_path / 'cert.pem'},key={tmp_path / 'key.pem'},"
        f"roots={tmp_path / 'ca.pem'}",
        authorizer=AllowIdsAuthorizer([ca.service_uri("api")]),
    )
    assert isinstance(service.identity_source, FileIdentitySource)
    ready = service.when_ready()
    bundle = service.identity.current()
    assert bundle is not None
    assert ready.result is bundle  # type: ignore[attr-defined]
    assert bundle.identity.service == "web"
    assert service.state is ManagerState.READY
    service.stopService()
    assert service.identity.current() is None


def test_a_bad_identity_description_is_refused() -> None:
    with pytest.raises(InvalidIdentityDescription, match="roots=PATH missing"):
        ConnectService(Clock(), "web", identity="files:cert=/c,key=/k")
