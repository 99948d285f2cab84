"""
ConsulClient against a real Consul 1.8.7 agent, on the real reactor.

The point of these tests is the real thing: what the agent accepts, what it
answers, and that a blocking health read is woken by a TTL check change.
Service names come from ``unique_name`` so that tests share one agent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import reactor

from connect_native.consul.client import (
    ConsulClient,
    ConsulEnterpriseRequired,
    ConsulHTTPError,
    ConsulPermissionDenied,
    ConsulUnavailable,
)
from connect_native.consul.records import ServiceRegistration, TTLCheck
from tests.consul_agent import RealConsulAgent, free_ports
from tests.waiting import authorize_until


def uri_sans(pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


@pytest_twisted.async_yield_fixture
async def client(real_consul: RealConsulAgent) -> AsyncIterator[ConsulClient]:
    c = ConsulClient(reactor, address=real_consul.http_address, timeout=10)
    yield c
    await c.close()


@pytest_twisted.ensureDeferred
async def test_agent_and_server_roots(client: ConsulClient) -> None:
    agent = await client.agent_ca_roots()
    server = await client.ca_roots()
    roots = agent.value
    assert roots.trust_domain.endswith(".consul")
    assert roots.active_root is not None
    assert roots.active_root.id == roots.active_root_id
    assert roots.active_root.root_cert_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert agent.index is not None
    assert agent.index > 0
    assert agent.cache_hit is not None  # the agent cache answered
    assert server.value == roots
    assert server.cache_hit is None


@pytest_twisted.ensureDeferred
async def test_blocking_roots_at_the_current_index_returns_after_wait(
    client: ConsulClient,
) -> None:
    first = await client.agent_ca_roots()
    # Without a change the agent holds the request for the whole wait and
    # answers with the same index: the explicit wait is what bounds it.
    again = await client.agent_ca_roots(index=first.index, wait=0.2)
    assert again.index == first.index
    assert again.value == first.value


@pytest_twisted.ensureDeferred
async def test_leaf_for_a_service(client: ConsulClient, unique_name: str) -> None:
    roots = (await client.agent_ca_roots()).value
    answer = await client.leaf(unique_name)
    leaf = answer.value
    assert leaf.service == unique_name
    assert leaf.service_uri == (
        f"spiffe://{roots.trust_domain}/ns/default/dc/dc1/svc/{unique_name}"
    )
    assert uri_sans(leaf.cert_pem) == [leaf.service_uri]
    assert leaf.private_key_pem.startswith("-----BEGIN EC PRIVATE KEY-----")
    assert leaf.valid_before > leaf.valid_after
    assert answer.index == leaf.modify_index
    # A second read is the same certificate, from the agent's cache.
    again = await client.leaf(unique_name)
    assert again.value == leaf
    assert again.cache_hit is True


@pytest_twisted.ensureDeferred
async def test_authorize_allowed_then_denied_by_an_intention(
    client: ConsulClient, unique_name: str
) -> None:
    roots = (await client.agent_ca_roots()).value
    target, source = f"{unique_name}-db", f"{unique_name}-web"
    uri = f"spiffe://{roots.trust_domain}/ns/default/dc/dc1/svc/{source}"
    allowed = await client.authorize(target, uri, "0a")
    assert allowed.authorized is True
    assert allowed.reason == "ACLs disabled, access is allowed by default"

    ixn_id = await client.create_intention(source, target, "deny", description="t")
    try:
        # The agent's authorize cache learns of intention writes from a
        # background blocking query: usually at once, but not synchronously.
        denied = await authorize_until(client, target, uri, False)
        assert denied.authorized is False
        assert ixn_id in denied.reason  # carried verbatim
        assert f"default/{source} => default/{target}" in denied.reason
        assert await client.intentions_check(source, target) is False
        match = await client.intentions_match("destination", target)
        assert match.index is None
        assert [i.id for i in match.value[target]] == [ixn_id]
        fetched = await client.get_intention(ixn_id)
        assert (fetched.source_name, fetched.action) == (source, "deny")
    finally:
        await client.delete_intention(ixn_id)
    assert (await authorize_until(client, target, uri, True)).authorized is True


@pytest_twisted.ensureDeferred
async def test_authorize_bad_uri_is_the_agents_400(client: ConsulClient) -> None:
    with pytest.raises(ConsulHTTPError) as caught:
        await client.authorize("web", "spiffe://bad", "")
    assert caught.value.status == 400
    assert "not a valid Connect identifier" in caught.value.body


@pytest_twisted.ensureDeferred
async def test_intentions_list_index_moves_on_a_write(
    client: ConsulClient, unique_name: str
) -> None:
    before = await client.intentions_list()
    ixn_id = await client.create_intention("*", unique_name, "allow")
    try:
        after = await client.intentions_list()
        assert before.index is not None
        assert after.index is not None
        assert after.index > before.index
        assert ixn_id in {i.id for i in after.value}
    finally:
        await client.delete_intention(ixn_id)


@pytest_twisted.ensureDeferred
async def test_register_health_and_deregister_a_native_service(
    client: ConsulClient, unique_name: str
) -> None:
    check_id = f"{unique_name}-ttl"
    await client.register_service(
        ServiceRegistration(
            name=unique_name,
            id=f"{unique_name}-1",
            port=8443,
            address="127.0.0.1",
            tags=["a"],
            meta={"version": "1"},
            checks=[TTLCheck(ttl=30, check_id=check_id)],
        )
    )
    try:
        everyone = (await client.health_connect(unique_name, passing=False)).value
        (entry,) = everyone
        assert entry.service.id == f"{unique_name}-1"
        assert entry.service.connect_native is True
        assert entry.service.kind == ""
        assert (entry.address, entry.port) == ("127.0.0.1", 8443)
        assert entry.service.tags == ("a",)
        assert entry.service.meta == {"version": "1"}
        assert entry.connect_service == unique_name
        ttl = next(c for c in entry.checks if c.check_id == check_id)
        assert ttl.status == "critical"  # TTL checks start critical
        # passing=True drops it until the check passes.
        assert (await client.health_connect(unique_name)).value == ()
        catalog = (await client.catalog_connect(unique_name)).value
        assert [e.service.id for e in catalog] == [f"{unique_name}-1"]

        await client.check_warn(check_id, note="warming up")
        warned = (await client.health_connect(unique_name, passing=False)).value
        ttl = next(c for c in warned[0].checks if c.check_id == check_id)
        assert (ttl.status, ttl.output) == ("warning", "warming up")
        await client.check_update(check_id, "passing", "ready")
        (passing,) = (await client.health_connect(unique_name)).value
        ttl = next(c for c in passing.checks if c.check_id == check_id)
        assert (ttl.status, ttl.output) == ("passing", "ready")
        await client.check_fail(check_id)
        assert (await client.health_connect(unique_name)).value == ()
    finally:
        await client.deregister_service(f"{unique_name}-1")
    assert (await client.health_connect(unique_name, passing=False)).value == ()


@pytest_twisted.ensureDeferred
async def test_blocking_health_connect_is_woken_by_a_ttl_check_pass(
    client: ConsulClient, unique_name: str
) -> None:
    check_id = f"{unique_name}-ttl"
    await client.register_service(
        ServiceRegistration(
            name=unique_name,
            port=9443,
            checks=[TTLCheck(ttl=60, check_id=check_id)],
        )
    )
    try:
        first = await client.health_connect(unique_name)
        assert first.value == ()  # critical until it passes
        assert first.index is not None
        # A long wait: only the check change can answer this in time; the
        # client's own bound (wait + wait/16 + timeout) fails the test
        # rather than hanging it if the agent is never woken.
        blocked = client.health_connect(unique_name, index=first.index, wait=30)
        await client.check_pass(check_id)
        woken = await blocked
        assert woken.index is not None
        assert woken.index > first.index
        (entry,) = woken.value
        assert entry.service.service == unique_name
        assert entry.passing
    finally:
        await client.deregister_service(unique_name)


@pytest_twisted.ensureDeferred
async def test_prepared_query_execute(client: ConsulClient, unique_name: str) -> None:
    await client.register_service(ServiceRegistration(name=unique_name, port=7000))
    try:
        status, body = await _admin(
            client,
            "POST",
            "/v1/query",
            {"Name": unique_name, "Service": {"Service": unique_name}},
        )
        assert status == 200, body
        answer = await client.execute_prepared_query(unique_name)
        assert answer.value.service == unique_name
        assert [n.service.port for n in answer.value.nodes] == [7000]
    finally:
        await client.deregister_service(unique_name)


async def _admin(
    client: ConsulClient, method: str, path: str, body: object
) -> tuple[int, Any]:
    """An endpoint the client has no call for (prepared query creation)."""
    import json

    import treq

    response = await treq.request(
        method, client.address + path, data=json.dumps(body).encode()
    )
    return response.code, await response.text()


@pytest_twisted.ensureDeferred
async def test_agent_self_and_ca_configuration(client: ConsulClient) -> None:
    me = await client.agent_self()
    assert (me.datacenter, me.node_name, me.version, me.server) == (
        "dc1",
        "testnode",
        "1.8.7",
        True,
    )
    config = await client.ca_configuration()
    assert config.provider == "consul"
    assert config.config["LeafCertTTL"] == "72h"


@pytest_twisted.ensureDeferred
async def test_set_ca_configuration_round_trips(
    fresh_real_consul: RealConsulAgent,
) -> None:
    client = ConsulClient(reactor, address=fresh_real_consul.http_address)
    try:
        config = await client.ca_configuration()
        body = config.config_json()
        body["LeafCertTTL"] = "24h"
        await client.set_ca_configuration(config.provider, body)
        assert (await client.ca_configuration()).config["LeafCertTTL"] == "24h"
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_a_namespace_on_consul_oss_is_the_enterprise_error(
    real_consul: RealConsulAgent, unique_name: str
) -> None:
    client = ConsulClient(reactor, address=real_consul.http_address, namespace="team")
    try:
        with pytest.raises(ConsulEnterpriseRequired) as caught:
            await client.health_connect(unique_name)
        assert caught.value.status == 400
        assert "Namespaces are a Consul Enterprise feature" in caught.value.body
        assert "need Consul Enterprise" in str(caught.value)
        # The default namespace is not sent, so it works.
        plain = ConsulClient(
            reactor, address=real_consul.http_address, namespace="default"
        )
        assert (await plain.health_connect(unique_name)).value == ()
        await plain.close()
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_acl_leaf_needs_a_token(real_consul_acl: RealConsulAgent) -> None:
    master = real_consul_acl.master_token
    assert master is not None
    anonymous = ConsulClient(reactor, address=real_consul_acl.http_address)
    bogus = ConsulClient(
        reactor, address=real_consul_acl.http_address, token="not-a-real-token"
    )
    trusted = ConsulClient(reactor, address=real_consul_acl.http_address, token=master)
    try:
        with pytest.raises(ConsulPermissionDenied) as caught:
            await anonymous.leaf("web")
        assert caught.value.status == 403
        assert caught.value.body == "Permission denied"
        with pytest.raises(ConsulPermissionDenied) as caught:
            await bogus.leaf("web")
        assert caught.value.body == "ACL not found"
        assert "not-a-real-token" not in str(caught.value)
        leaf = (await trusted.leaf("web")).value
        assert leaf.service == "web"
        # Roots need no token; register without one is refused.
        assert (await anonymous.agent_ca_roots()).value.roots
        with pytest.raises(ConsulPermissionDenied):
            await anonymous.register_service(ServiceRegistration(name="x", port=1))
        with pytest.raises(ConsulPermissionDenied) as caught:
            await anonymous.agent_self()
        assert master not in str(caught.value)
    finally:
        for c in (anonymous, bogus, trusted):
            await c.close()


@pytest_twisted.ensureDeferred
async def test_acl_authorize_with_the_master_token_follows_default_deny(
    real_consul_acl: RealConsulAgent,
) -> None:
    trusted = ConsulClient(
        reactor,
        address=real_consul_acl.http_address,
        token=real_consul_acl.master_token,
    )
    anonymous = ConsulClient(reactor, address=real_consul_acl.http_address)
    try:
        td = (await trusted.agent_ca_roots()).value.trust_domain
        uri = f"spiffe://{td}/ns/default/dc/dc1/svc/api"
        decision = await trusted.authorize("web", uri, "01")
        assert decision.authorized is False
        assert decision.reason == "Default behavior configured by ACLs"
        with pytest.raises(ConsulPermissionDenied):
            await anonymous.authorize("web", uri, "01")
    finally:
        await trusted.close()
        await anonymous.close()


@pytest_twisted.ensureDeferred
async def test_nothing_listening_is_unavailable() -> None:
    (port,) = free_ports(1)
    client = ConsulClient(reactor, address=f"127.0.0.1:{port}", timeout=5)
    with pytest.raises(ConsulUnavailable) as caught:
        await client.agent_self()
    assert f"127.0.0.1:{port}" in str(caught.value)
    await client.close()
