"""
The resolvers against a real Consul 1.8.7 agent: what its health API,
prepared queries and DNS interface answer for native instances and sidecar
proxies.  Service names come from ``unique_name``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from connect_native.consul.client import ConsulClient
from connect_native.resolve import (
    ConsulResolver,
    DnsResolver,
    ExpectedIdentity,
    PreparedQueryResolver,
    ResolveError,
    StaleAnswer,
)
from tests.consul_agent import RealConsulAgent


@pytest_twisted.async_yield_fixture
async def client(real_consul: RealConsulAgent) -> AsyncIterator[ConsulClient]:
    c = ConsulClient(reactor, address=real_consul.http_address, timeout=10)
    yield c
    await c.close()


def register(agent: RealConsulAgent, body: dict[str, object]) -> None:
    status, answer = agent.request("PUT", "/v1/agent/service/register", body)
    assert status == 200, answer


@pytest.fixture
def db_instances(real_consul: RealConsulAgent, unique_name: str) -> Iterator[str]:
    """
    ``<name>``: a native instance with an address, a native one without
    (the node's address applies), a critical one, and a sidecar proxy.
    """
    name = unique_name
    register(
        real_consul,
        {
            "ID": f"{name}-1",
            "Name": name,
            "Address": "127.0.0.1",
            "Port": 5001,
            "Connect": {"Native": True},
        },
    )
    register(
        real_consul,
        {"ID": f"{name}-2", "Name": name, "Port": 5002, "Connect": {"Native": True}},
    )
    register(
        real_consul,
        {
            "ID": f"{name}-3",
            "Name": name,
            "Port": 5003,
            "Connect": {"Native": True},
            "Check": {"TTL": "30s", "Status": "critical"},
        },
    )
    register(
        real_consul,
        {
            "ID": f"{name}-proxy",
            "Name": f"{name}-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {"DestinationServiceName": name},
        },
    )
    yield name
    for suffix in ("1", "2", "3", "proxy"):
        real_consul.request("PUT", f"/v1/agent/service/deregister/{name}-{suffix}")


@pytest_twisted.ensureDeferred
async def test_consul_resolver_finds_native_instances_and_proxies(
    client: ConsulClient, db_instances: str
) -> None:
    name = db_instances
    resolver = ConsulResolver(client, name, reactor=reactor)
    try:
        instances = await resolver.resolve()
    finally:
        resolver.close()
    assert sorted((i.instance_id, i.address, i.port) for i in instances) == [
        (f"{name}-1", "127.0.0.1", 5001),
        (f"{name}-2", "127.0.0.1", 5002),  # the node's address
        (f"{name}-proxy", "127.0.0.1", 21000),
    ]
    assert {i.identity for i in instances} == {
        ExpectedIdentity(service=name, datacenter="dc1")
    }


@pytest_twisted.ensureDeferred
async def test_prepared_query_resolver_executes_a_connect_query(
    client: ConsulClient, db_instances: str, real_consul: RealConsulAgent
) -> None:
    name = db_instances
    status, _ = real_consul.request(
        "POST", "/v1/query", {"Name": f"{name}-q", "Service": {"Service": name}}
    )
    assert status == 200
    resolver = PreparedQueryResolver(client, f"{name}-q", reactor=reactor)
    instances = await resolver.resolve()
    assert sorted(i.port for i in instances) == [5001, 5002, 21000]
    assert {i.identity.service for i in instances} == {name}
    with pytest.raises(ResolveError, match="Query not found"):
        await PreparedQueryResolver(client, f"{name}-nosuch", reactor=reactor).resolve()


@pytest_twisted.ensureDeferred
async def test_dns_resolver_reads_the_agents_srv_records(
    db_instances: str, real_consul: RealConsulAgent
) -> None:
    name = db_instances
    resolver = DnsResolver(name, dns_address=("127.0.0.1", real_consul.dns_port))
    instances = await resolver.resolve()
    assert sorted((i.address, i.port) for i in instances) == [
        ("127.0.0.1", 5001),
        ("127.0.0.1", 5002),
        ("127.0.0.1", 21000),
    ]
    assert {i.identity for i in instances} == {
        ExpectedIdentity(service=name, datacenter="dc1")
    }
    with_dc = DnsResolver(
        name, datacenter="dc1", dns_address=("127.0.0.1", real_consul.dns_port)
    )
    assert len(await with_dc.resolve()) == 3
    nosuch = DnsResolver(
        f"{name}-nosuch", dns_address=("127.0.0.1", real_consul.dns_port)
    )
    assert list(await nosuch.resolve()) == []


async def poll_async(
    condition: Callable[[], Awaitable[bool]], seconds: float, what: str
) -> None:
    deadline = reactor.seconds() + seconds
    while not await condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {seconds}s")
        await deferLater(reactor, 0.1, lambda: None)


@pytest_twisted.ensureDeferred
async def test_consul_resolver_fails_once_a_killed_agent_stays_down_past_max_staleness(
    fresh_real_consul: RealConsulAgent, unique_name: str
) -> None:
    agent, name = fresh_real_consul, unique_name
    native: dict[str, object] = {
        "ID": name,
        "Name": name,
        "Address": "127.0.0.1",
        "Port": 5001,
        "Connect": {"Native": True},
    }
    register(agent, native)
    client = ConsulClient(reactor, address=agent.http_address, timeout=5)
    resolver = ConsulResolver(client, name, reactor=reactor, max_staleness=1)
    try:
        assert [i.port for i in await resolver.resolve()] == [5001]
        await deferToThread(agent.kill)

        refused: list[StaleAnswer] = []

        async def stale() -> bool:
            try:
                await resolver.resolve()
            except StaleAnswer as e:
                refused.append(e)
            return bool(refused)

        await poll_async(stale, 30, "resolution refused as stale")
        assert "the last answer from the agent is stale" in str(refused[0])
        assert "max_staleness 1s" in str(refused[0])
        # The agent back (a -dev agent forgets the registration: register
        # again): a fresh answer restores resolution.
        await deferToThread(agent.restart)
        await deferToThread(register, agent, native)

        async def answers() -> bool:
            try:
                return [i.port for i in await resolver.resolve()] == [5001]
            except StaleAnswer:
                return False

        await poll_async(answers, 90, "resolution from a fresh answer")
    finally:
        resolver.close()
        await client.close()
