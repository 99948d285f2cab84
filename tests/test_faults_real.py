"""
Faults of a real Consul 1.8.7 agent under a running Connect service, on the
real reactor: ``web`` is a ``ConnectServerEndpoint`` on 127.0.0.1 in front of
an echo server, fed by a ``CertManager`` and (where it matters) registered by
``Registration``; ``api`` clients stream checksummed bytes through it.

- a ``-dev`` agent killed and restarted on the same port comes back with a
  new CA and trust domain and without our registration: the roots are
  swapped as a whole (the old trust domain refused for new connections, the
  new one accepted) and the service registers again;
- a ``-server -bootstrap-expect=1`` agent with a data directory killed and
  restarted keeps its CA: the watches recover without spinning;
- an agent that stalls (a TCP proxy in front of it stops moving bytes):
  the bounded waits fire, the manager is degraded, new callers are denied
  by the authorizer's timeout, and all recovers when it answers again;
- a CA rotation and leaf renewals under load: streams opened before keep
  every byte in order, new connections get the new certificates.

In every case the connections established before the fault are never
dropped by the library.  Agents are restarted from a thread (the reactor
keeps running).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from connect_native.authorize import AgentAuthorizer
from connect_native.certs import Bundle, CertManager, ManagerState
from connect_native.consul.client import ConsulClient
from connect_native.identity import ServiceIdentity
from connect_native.registration import Registration
from connect_native.server import ConnectServerEndpoint
from connect_native.testing import FakeAuthorizer
from connect_native.tls import ClientConnectionCreator
from tests import transports
from tests.consul_agent import RealConsulAgent
from tests.faults import (
    ClockedClientCreator,
    Echo,
    StallProxy,
    Stream,
    client_bundle,
    poll,
)
from tests.roots import new_root

# A fixture: every test of this module runs over both TLS transports.
from tests.transports import over_each_tls_transport  # noqa: F401

pytestmark = pytest.mark.real_consul

clock: Any = reactor


@pytest.fixture(autouse=True)
def logged() -> Iterator[list[LogEvent]]:
    """What the library logged during the test (printed: pytest shows it on failure)."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
    for event in events[-60:]:
        print(formatEvent(event))


def logged_lines(events: list[LogEvent], *needles: str) -> list[str]:
    texts = [formatEvent(e) for e in list(events)]
    return [t for t in texts if all(n in t for n in needles)]


class Counting:
    """A CA client that counts the reads each watch makes."""

    def __init__(self, client: ConsulClient) -> None:
        self.client = client
        self.roots_reads = 0
        self.leaf_reads = 0

    def agent_ca_roots(
        self, index: int | None = None, wait: float | None = None
    ) -> Any:
        self.roots_reads += 1
        return self.client.agent_ca_roots(index=index, wait=wait)

    def leaf(
        self, service: str, index: int | None = None, wait: float | None = None
    ) -> Any:
        self.leaf_reads += 1
        return self.client.leaf(service, index=index, wait=wait)


class Web:
    """``web``: a Connect server on 127.0.0.1 in front of echo servers."""

    def __init__(
        self,
        client: ConsulClient,
        *,
        manager_client: Any = None,
        authorizer: Any = None,
        **manager_options: Any,
    ) -> None:
        self.name = f"web-{uuid.uuid4().hex[:8]}"
        self.client = client
        options: dict[str, Any] = {
            "wait": 10.0,
            "backoff_initial": 0.2,
            "backoff_max": 1.0,
        }
        options.update(manager_options)
        self.manager = CertManager(
            clock, manager_client or client, self.name, **options
        )
        self.states: list[ManagerState] = []
        self.manager.subscribe(lambda change: self.states.append(change.state))
        self.echoes: list[Echo] = []
        self.endpoint = ConnectServerEndpoint(
            clock,
            TCP4ServerEndpoint(clock, 0, interface="127.0.0.1"),
            self.manager,
            authorizer
            if authorizer is not None
            else FakeAuthorizer(["api", "api-after"]),
            self.name,
            ready_timeout=30,
            handshake_timeout=10,
            tls_protocol=transports.current(),
        )
        self.port: Any = None
        self.registration: Registration | None = None

    async def start(self, register: bool = False) -> None:
        self.manager.startService()
        self.port = await self.endpoint.listen(
            Factory.forProtocol(lambda: Echo(self.echoes))
        ).addTimeout(40, clock)
        if register:
            self.registration = Registration(
                clock,
                self.client,
                self.manager,
                self.name,
                self.port,
                check_ttl=10,
                refresh_interval=1,
                backoff_initial=0.2,
                backoff_max=1,
                request_timeout=3,
            )
            self.registration.startService()

    async def stop(self) -> None:
        if self.registration is not None:
            await self.registration.stopService()
        if self.port is not None:
            await self.port.stopListening()
        self.manager.stopService()
        await self.client.close()

    def identity(self, bundle: Bundle) -> ServiceIdentity:
        return ServiceIdentity(
            trust_domain=bundle.identity.trust_domain,
            namespace="default",
            datacenter=bundle.identity.datacenter,
            service=self.name,
        )

    async def open(self, creator: Any, stream: Stream) -> Stream:
        endpoint = wrapClientTLS(
            creator,
            TCP4ClientEndpoint(clock, "127.0.0.1", self.port.getHost().port, timeout=5),
        )
        await connectProtocol(endpoint, stream).addTimeout(10, clock)
        return stream

    async def stream(self, bundle: Bundle, **options: Any) -> Stream:
        """A streaming ``api`` client holding ``bundle``, handshake done."""
        stream = Stream(clock=clock, **options)
        await self.open(ClientConnectionCreator(bundle, self.identity(bundle)), stream)
        await poll(clock, lambda: stream.received > 0, 10, "the first echo")
        return stream

    def bundle(self) -> Bundle:
        bundle = self.manager.current()
        assert bundle is not None, self.manager.reason
        return bundle


async def registered(agent: RealConsulAgent, service: str) -> bool:
    """Whether the agent lists an instance of ``service`` now."""
    try:
        response = await treq.get(
            f"http://{agent.http_address}/v1/agent/services"
        ).addTimeout(5, clock)
        services: dict[str, Any] = json.loads(await treq.content(response))
    except Exception:
        return False
    return any(s["Service"] == service for s in services.values())


async def poll_async(
    condition: Callable[[], Awaitable[bool]], seconds: float, what: str
) -> None:
    deadline = clock.seconds() + seconds
    while not await condition():
        if clock.seconds() > deadline:
            raise AssertionError(f"{what}: not within {seconds}s")
        await pause(0.1)


async def finish_all(streams: list[Stream]) -> None:
    await gatherResults([s.finish() for s in streams]).addTimeout(30, clock)
    for stream in streams:
        assert stream.received == stream.sent
        assert stream.intact


# --- the -dev agent restarts with a new CA ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_dev_agent_restarted_swaps_the_roots_and_registers_again(
    fresh_real_consul: RealConsulAgent, logged: list[LogEvent]
) -> None:
    agent = fresh_real_consul
    web = Web(ConsulClient(clock, address=agent.http_address))
    api_client = ConsulClient(clock, address=agent.http_address)
    try:
        await web.start(register=True)
        before = web.bundle()
        [old_domain] = before.trust_domains
        old_api = await client_bundle(api_client, "api", clock)
        old_leaf = (await api_client.leaf("api").addTimeout(10, clock)).value
        assert old_api.leaf.serial_number == int(old_leaf.serial_number, 16)
        established = await web.stream(old_api)
        await poll_async(lambda: registered(agent, web.name), 10, "registered")

        await deferToThread(agent.restart)

        new_roots = (await api_client.agent_ca_roots().addTimeout(10, clock)).value
        new_domain = new_roots.trust_domain
        assert new_domain != old_domain

        def swapped() -> Bundle | None:
            bundle = web.manager.current()
            return bundle if bundle and bundle.trust_domains == {new_domain} else None

        after = await poll(clock, swapped, 20, "the new trust domain only")
        assert not after.carries_trust_domain(old_domain)
        assert set(after.root_certificates).isdisjoint(before.root_certificates)

        # A caller with the old trust domain's certificate is refused by the
        # server (it trusts the new roots, so the refusal is not its own).
        new_root_pems = [r.root_cert_pem for r in new_roots.roots]
        refused = Stream()
        await web.open(
            ClockedClientCreator(
                old_leaf.cert_pem,
                old_leaf.private_key_pem,
                new_root_pems,
                clock.seconds(),
            ),
            refused,
        )
        await poll(clock, lambda: refused.closed, 10, "the old identity refused")
        assert not refused.received
        assert logged_lines(logged, "refused the peer's certificate")

        # The new trust domain's callers are served.
        new_api = await client_bundle(api_client, "api", clock)
        fresh = await web.stream(new_api)

        # Registered again with the new agent, which forgot us.
        await poll_async(lambda: registered(agent, web.name), 20, "registered again")

        # The connection made before the restart, with the old trust
        # domain's certificate, is closed once the roots swapped (issue 15,
        # item 5): no current root vouches for its peer any more.
        await poll(clock, lambda: established.closed, 10, "the old peer closed")
        assert logged_lines(logged, "(trusted roots changed)")
        await finish_all([fresh])
    finally:
        await web.stop()
        await api_client.close()


# --- a server agent restarts with its CA ----------------------------------------


@pytest.fixture
def server_agent(consul_binary_path: Path, tmp_path: Path) -> Iterator[RealConsulAgent]:
    agent = RealConsulAgent(consul_binary_path, data_dir=tmp_path / "consul-data")
    agent.start()
    yield agent
    agent.stop()


@pytest_twisted.ensureDeferred
async def test_a_server_agent_restarted_keeps_the_ca_and_the_watches_recover(
    server_agent: RealConsulAgent,
) -> None:
    agent = server_agent
    client = ConsulClient(clock, address=agent.http_address)
    counting = Counting(client)
    web = Web(client, manager_client=counting, wait=5.0, min_interval=0.1)
    api_client = ConsulClient(clock, address=agent.http_address)
    try:
        await web.start()
        before = web.bundle()
        api = await client_bundle(api_client, "api", clock)
        established = await web.stream(api)

        await deferToThread(agent.restart)
        await poll(
            clock,
            lambda: (
                ManagerState.DEGRADED in web.states
                and web.manager.state is ManagerState.READY
            ),
            # A restarted server agent elects itself and loads its CA again
            # before it answers: usually a few seconds, up to about 20 on a
            # busy 2-core machine (a 20 s bound failed there once).
            60,
            "degraded while down, then ready",
        )
        after = web.bundle()
        assert after.trust_domains == before.trust_domains
        assert set(after.root_certificates) == set(before.root_certificates)

        # Blocking again, not spinning: at most a read or two per watch
        # in three seconds (min_interval would allow thirty).
        roots, leaf = counting.roots_reads, counting.leaf_reads
        await pause(3.0)
        assert counting.roots_reads - roots <= 2
        assert counting.leaf_reads - leaf <= 2

        # The same CA: the caller's certificate from before still works.
        again = await web.stream(api)
        assert not established.closed
        await finish_all([established, again])
    finally:
        await web.stop()
        await api_client.close()


async def pause(seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(clock, seconds, lambda: None)


# --- the agent stalls -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_agent_stalling_past_the_blocking_wait_degrades_then_recovers(
    real_consul: RealConsulAgent, logged: list[LogEvent]
) -> None:
    host, port = real_consul.http_address.split(":")
    proxy = StallProxy(clock, host, int(port))
    client = ConsulClient(clock, address=proxy.address, timeout=2.0)
    authorizer = AgentAuthorizer(client, clock, timeout=1.0, cache_ttl=0)
    web = Web(client, authorizer=authorizer, wait=1.0)
    api_client = ConsulClient(clock, address=real_consul.http_address)
    try:
        await web.start()
        first = web.bundle()
        api = await client_bundle(api_client, "api", clock)
        established = await web.stream(api)

        proxy.stall()
        await poll(
            clock,
            lambda: web.manager.state is ManagerState.DEGRADED,
            15,
            "degraded by the bounded wait",
        )
        assert "within" in web.manager.reason
        assert web.manager.current() is first

        # New callers are denied when the authorizer cannot get an answer.
        denied = Stream()
        await web.open(ClientConnectionCreator(api, web.identity(api)), denied)
        await poll(clock, lambda: denied.closed, 10, "denied on the timeout")
        assert not denied.received
        assert logged_lines(logged, "denied", api.identity.uri)

        proxy.resume()
        await poll(
            clock,
            lambda: web.manager.state is ManagerState.READY,
            15,
            "ready again",
        )
        again = await web.stream(api)
        assert not established.closed
        await finish_all([established, again])
    finally:
        proxy.resume()
        await web.stop()
        await api_client.close()
        await proxy.close()


# --- rotation and renewal under load ------------------------------------------------


async def streams(web: Web, bundle: Bundle, count: int) -> list[Stream]:
    opened: list[Deferred[Stream]] = [
        Deferred.fromCoroutine(web.stream(bundle, size=16 * 1024)) for _ in range(count)
    ]
    return list(await gatherResults(opened))


def server_certificate(stream: Stream) -> Any:
    peer = stream.transport.getPeerCertificate()  # type: ignore[union-attr]
    return peer.to_cryptography()


@pytest_twisted.ensureDeferred
async def test_ca_rotation_under_load_loses_no_byte_new_connections_get_the_new_root(
    fresh_real_consul: RealConsulAgent,
) -> None:
    client = ConsulClient(clock, address=fresh_real_consul.http_address)
    web = Web(client, wait=60.0)
    api_client = ConsulClient(clock, address=fresh_real_consul.http_address)
    try:
        await web.start()
        before = web.bundle()
        [trust_domain] = before.trust_domains
        old_api = await client_bundle(api_client, "api", clock)
        load = await streams(web, old_api, 4)

        key_pem, cert_pem, root = new_root(trust_domain)
        config = (await client.ca_configuration()).config_json()
        config.update(PrivateKey=key_pem, RootCert=cert_pem)
        await client.set_ca_configuration("consul", config)

        # The agent renews a watched leaf 0-30 s after a rotation.
        def renewed() -> Bundle | None:
            bundle = web.manager.current()
            return bundle if bundle and bundle.leaf.issuer == root.subject else None

        after = await poll(clock, renewed, 45, "a leaf from the new root", 0.2)
        assert root in after.root_certificates
        assert set(before.root_certificates) <= set(after.root_certificates)

        # New connections get the new certificate; callers holding the old
        # root's certificate are still accepted (the old root stays listed).
        new_api = await client_bundle(api_client, "api-after", clock)
        fresh = await web.stream(new_api)
        assert server_certificate(fresh).serial_number == after.leaf.serial_number
        assert server_certificate(fresh).issuer == root.subject
        old_caller = await web.stream(old_api)

        assert all(not s.closed for s in load)
        assert min(s.sent for s in load) >= 64 * 1024
        await finish_all([*load, fresh, old_caller])
    finally:
        await web.stop()
        await api_client.close()


@pytest_twisted.ensureDeferred
async def test_leaf_renewals_under_load_lose_no_byte(
    fresh_real_consul: RealConsulAgent,
) -> None:
    # Below ten minutes of lifetime the agent re-signs the leaf on every
    # blocking read: a renewal about every min_interval.
    fresh_real_consul.request(
        "PUT",
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"LeafCertTTL": "5m", "SkipValidate": True}},
    )
    client = ConsulClient(clock, address=fresh_real_consul.http_address)
    web = Web(client, wait=30.0, min_interval=0.3)
    api_client = ConsulClient(clock, address=fresh_real_consul.http_address)
    try:
        await web.start()
        api = await client_bundle(api_client, "api", clock)
        load = await streams(web, api, 4)
        presented: set[int] = set()
        for _ in range(3):
            # A leaf not presented yet is current (renewals may come faster
            # than this loop: look at the one in use, not at how many came).
            await poll(
                clock,
                lambda: web.bundle().leaf.serial_number not in presented,
                10,
                "a renewal",
            )
            fresh = await web.stream(api)
            presented.add(server_certificate(fresh).serial_number)
            load.append(fresh)
        assert len(presented) == 3
        assert all(not s.closed for s in load)
        await finish_all(load)
    finally:
        await web.stop()
        await api_client.close()
