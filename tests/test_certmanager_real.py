"""
CertManager against a real Consul 1.8.7 agent, on the real reactor.

The point is the real thing: the agent's own roots and leaves make a Bundle,
a CA rotation reaches the manager through its blocking watches, and a token
without ``service:write`` fails ``when_ready()`` at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred

from connect_native.certs import (
    Bundle,
    CertManager,
    LeafPermissionDenied,
    ManagerState,
)
from connect_native.consul.client import ConsulClient
from tests.consul_agent import RealConsulAgent
from tests.roots import new_root

T = TypeVar("T")


def bounded(d: Deferred[T], seconds: float) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


async def poll(
    condition: Callable[[], T | None], seconds: float, interval: float = 0.2
) -> T:
    """Ask ``condition`` until it answers, for at most ``seconds``."""
    deadline = reactor.seconds() + seconds
    while True:
        answer = condition()
        if answer is not None:
            return answer
        if reactor.seconds() >= deadline:
            raise AssertionError(f"no answer within {seconds}s")
        await task.deferLater(reactor, interval, lambda: None)


@pytest_twisted.ensureDeferred
async def test_ready_with_the_agents_certificate(
    real_consul: RealConsulAgent, unique_name: str
) -> None:
    client = ConsulClient(reactor, address=real_consul.http_address)
    manager = CertManager(reactor, client, unique_name, wait=30.0)
    manager.startService()
    try:
        bundle = await bounded(manager.when_ready(), 30)
        trust_domain = (await client.agent_ca_roots()).value.trust_domain
        assert bundle.identity.uri == (
            f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{unique_name}"
        )
        assert manager.state is ManagerState.READY
        assert manager.current() is bundle
        assert bundle.carries_trust_domain(trust_domain)
    finally:
        manager.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_ca_rotation_reaches_the_bundle(
    fresh_real_consul: RealConsulAgent, unique_name: str
) -> None:
    client = ConsulClient(reactor, address=fresh_real_consul.http_address)
    manager = CertManager(reactor, client, unique_name, wait=60.0)
    manager.startService()
    try:
        before = await bounded(manager.when_ready(), 30)
        [trust_domain] = before.trust_domains
        key_pem, cert_pem, root = new_root(trust_domain)
        config = await client.ca_configuration()
        body: dict[str, Any] = config.config_json()
        body.update(PrivateKey=key_pem, RootCert=cert_pem)
        await client.set_ca_configuration("consul", body)

        # The roots change within milliseconds: the new root is trusted, the
        # old one still too (leaves signed by it are still out there).
        def trusts_new_root() -> Bundle | None:
            bundle = manager.current()
            if bundle is not None and root in bundle.root_certificates:
                return bundle
            return None

        rotated = await poll(trusts_new_root, 10)
        assert set(before.root_certificates) <= set(rotated.root_certificates)

        # The agent renews a leaf that is being watched 0-30 s later; the
        # new leaf is signed by the new root and carries the cross-signed
        # intermediate.
        def leaf_from_new_root() -> Bundle | None:
            bundle = manager.current()
            if bundle is not None and bundle.leaf.issuer == root.subject:
                return bundle
            return None

        renewed = await poll(leaf_from_new_root, 40)
        assert renewed.leaf.serial_number != before.leaf.serial_number
        assert any(c.public_key() == root.public_key() for c in renewed.chain)
        assert manager.state is ManagerState.READY
    finally:
        manager.stopService()
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_token_without_service_write_fails_when_ready(
    real_consul_acl: RealConsulAgent, unique_name: str
) -> None:
    client = ConsulClient(reactor, address=real_consul_acl.http_address)
    manager = CertManager(reactor, client, unique_name, wait=30.0)
    manager.startService()
    try:
        with pytest.raises(LeafPermissionDenied) as caught:
            await bounded(manager.when_ready(), 10)
        assert "service:write" in str(caught.value)
        assert unique_name in str(caught.value)
        assert manager.current() is None
    finally:
        manager.stopService()
        await client.close()
