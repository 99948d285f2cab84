"""
Faults of the agent seen end to end, in memory: the development agent on a
``MemoryReactorClock`` behind a front that stops answering or answers 403 or
garbage, a real ``CertManager`` reading it through ``ConsulClient`` and
``StubTreq``, and a ``ConnectServerEndpoint`` whose connections are real TLS
over iosim.

- The certificate expires while the agent is down: new connections are
  refused (never served with an expired certificate), each refusal logged
  with its reason; the established connection is not dropped and loses no
  byte; when the agent is back the service serves a new certificate.
- 403 and garbage bodies: listening fails closed naming the token problem;
  garbage in a watch degrades the manager with the reason, the valid
  certificate keeps serving, and it recovers; an authorizer reading 403 or
  garbage denies, logged with why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import LogEvent, capturedLogs, formatEvent

from connect_native.authorize import AgentAuthorizer
from connect_native.certs import CertManager, LeafPermissionDenied, ManagerState
from connect_native.consul.records import LeafCert
from connect_native.server import ConnectServerEndpoint
from connect_native.testing import FakeAuthorizer
from tests import transports
from tests.faults import ClockedClientCreator, Echo, Link, MemoryWorld, Stream

# A fixture: every test of this module runs over both TLS transports.
from tests.transports import over_each_tls_transport  # noqa: F401

LEAF_TTL = 3600.0


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events  # type: ignore[misc]


def lines(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events]


class Service:
    """``web`` served by a ConnectServerEndpoint from a CertManager."""

    def __init__(self, world: MemoryWorld, authorizer: Any = None) -> None:
        self.world = world
        self.echoes: list[Echo] = []
        self.manager = CertManager(
            world.reactor,
            world.client,
            "web",
            wait=30.0,
            backoff_max=120.0,
        )
        self.endpoint = ConnectServerEndpoint(
            world.reactor,
            TCP4ServerEndpoint(world.reactor, 8443),
            self.manager,
            FakeAuthorizer(["api"]) if authorizer is None else authorizer,
            "web",
            ready_timeout=30,
            tls_protocol=transports.current(),
        )

    def start(self) -> Any:
        self.manager.startService()
        return self.endpoint.listen(Factory.forProtocol(lambda: Echo(self.echoes)))

    def api_leaf(self) -> LeafCert:
        return self.world.result(self.world.client.leaf("api")).value

    def roots(self) -> list[str]:
        roots = self.world.result(self.world.client.agent_ca_roots()).value
        return [r.root_cert_pem for r in roots.roots]

    def call(self, leaf: LeafCert, stream: Stream) -> Link | None:
        """A client ``api`` that verifies ``web`` at the clock's time."""
        creator = ClockedClientCreator(
            leaf.cert_pem,
            leaf.private_key_pem,
            self.roots_now,
            self.world.reactor.seconds(),
        )
        link = self.world.connect(creator, stream)
        if link is not None:
            link.flush()
        return link

    roots_now: list[str] = []


def exchange(link: Link, stream: Stream, chunks: int = 4) -> None:
    for _ in range(chunks):
        stream.send()
    link.flush()
    assert stream.received == stream.sent
    assert stream.intact


def set_leaf_ttl(world: MemoryWorld, ttl: str) -> None:
    world.result(
        world.client.set_ca_configuration(
            "consul", {"LeafCertTTL": ttl, "RotationPeriod": "2160h"}
        )
    )


def test_certificate_expiring_while_the_agent_is_down_refuses_then_recovers(
    logged: list[LogEvent],
) -> None:
    world = MemoryWorld()
    set_leaf_ttl(world, "1h")
    service = Service(world)
    world.result(service.start())
    first = service.manager.current()
    assert first is not None
    assert first.not_after - first.not_before == pytest.approx(LEAF_TTL)
    service.roots_now = service.roots()
    api = service.api_leaf()

    established = Stream()
    link = service.call(api, established)
    assert link is not None
    assert established.handshake_done
    assert link.server_serial() == first.leaf.serial_number
    exchange(link, established)

    # The agent stops answering; the manager keeps the valid certificate.
    world.front.misbehave(hang=True)
    world.advance(first.not_after - world.reactor.seconds() - 300, step=30)
    assert service.manager.state is ManagerState.DEGRADED
    assert "no answer from the Consul agent" in service.manager.reason
    while_degraded = Stream()
    degraded_link = service.call(api, while_degraded)
    assert degraded_link is not None
    assert while_degraded.handshake_done
    assert degraded_link.server_serial() == first.leaf.serial_number
    exchange(degraded_link, while_degraded)

    # Past its end: refused, with the reason, and never served.
    world.advance(first.not_after - world.reactor.seconds() + 1, step=30)
    assert service.manager.state is ManagerState.EXPIRED
    assert service.manager.current() is None
    before = len(logged)
    assert service.call(api, Stream()) is None
    refusals = [
        e
        for e in logged[before:]
        if e.get("reason") == "no certificate" and e.get("allowed") is False
    ]
    assert len(refusals) == 1
    assert "no usable certificate" in formatEvent(refusals[0])
    assert any("expired at" in line for line in lines(logged))

    # The established connections are the application's: still open, intact.
    exchange(link, established)
    exchange(degraded_link, while_degraded)
    assert not established.closed
    assert not while_degraded.closed

    # The agent is back: a new certificate, new connections served with it.
    # At worst the manager notices after its hung request's bound (the
    # 30 s wait, wait/16 and a 5 s grace: about 37 s) and its
    # longest retry delay (backoff_max, 120 s, times a jitter of 0.5 to 1):
    # 150 s was less than that, and failed about one run in ten.
    world.front.behave()
    world.advance(200, step=5)
    assert service.manager.state is ManagerState.READY
    renewed = service.manager.current()
    assert renewed is not None
    assert renewed.leaf.serial_number != first.leaf.serial_number
    assert renewed.not_after > world.reactor.seconds()
    after = Stream()
    new_link = service.call(api, after)
    assert new_link is not None
    assert after.handshake_done
    assert new_link.server_serial() == renewed.leaf.serial_number
    exchange(new_link, after)

    for stream, each in ((established, link), (while_degraded, degraded_link)):
        done = stream.finish()
        each.flush()
        assert world.result(done) == stream.sent


def test_a_403_for_the_leaf_fails_listening_naming_the_token_problem(
    logged: list[LogEvent],
) -> None:
    world = MemoryWorld()
    world.front.misbehave(
        answer=(403, b"Permission denied"), paths=("/v1/agent/connect/ca/leaf/",)
    )
    service = Service(world)
    listening = service.start()
    world.flush()
    with pytest.raises(LeafPermissionDenied) as caught:
        world.result(listening)
    assert "service:write" in str(caught.value)
    assert world.reactor.tcpServers == []
    assert service.manager.current() is None
    assert any("service:write" in line for line in lines(logged))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/agent/connect/ca/roots", b"<html>502 Bad Gateway</html>"),
        ("/v1/agent/connect/ca/roots", b'{"Roots": "not a list"}'),
        ("/v1/agent/connect/ca/leaf/", b'{"CertPEM": 42}'),
        ("/v1/agent/connect/ca/leaf/", b"\x00\xff garbage"),
    ],
)
def test_garbage_from_the_agent_degrades_keeps_serving_and_recovers(
    logged: list[LogEvent], path: str, body: bytes
) -> None:
    world = MemoryWorld()
    service = Service(world)
    world.result(service.start())
    first = service.manager.current()
    assert first is not None
    service.roots_now = service.roots()
    api = service.api_leaf()

    world.front.misbehave(answer=(200, body), paths=(path,))
    # The blocked reads come back after their wait, then read garbage.
    world.advance(40, step=1)
    assert service.manager.state is ManagerState.DEGRADED
    assert "failed" in service.manager.reason
    assert service.manager.current() is first
    stream = Stream()
    link = service.call(api, stream)
    assert link is not None
    assert stream.handshake_done
    exchange(link, stream)

    world.front.behave()
    world.advance(130, step=1)
    assert service.manager.state is ManagerState.READY
    assert service.manager.current() is not None


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (403, b"Permission denied", "403"),
        (200, b"{not json", "failed"),
        (200, b'{"Authorized": "yes", "Reason": 1}', "failed"),
    ],
)
def test_an_authorizer_reading_403_or_garbage_denies_with_the_reason(
    logged: list[LogEvent], status: int, body: bytes, said: str
) -> None:
    world = MemoryWorld()
    service = Service(world, AgentAuthorizer(world.client, world.reactor, cache_ttl=0))
    world.result(service.start())
    service.roots_now = service.roots()
    api = service.api_leaf()

    world.front.misbehave(answer=(status, body), paths=("/v1/agent/connect/authorize",))
    refused = Stream()
    link = service.call(api, refused)
    assert link is not None
    world.flush()
    link.flush()
    assert refused.handshake_done  # the refusal is not the TLS layer's
    assert refused.closed
    assert service.echoes == []
    [denial] = [e for e in logged if e.get("decision") == "denied"]
    assert said in str(denial["reason"])
    assert "spiffe://" in formatEvent(denial)

    world.front.behave()
    allowed = Stream()
    link = service.call(api, allowed)
    assert link is not None
    world.flush()
    link.flush()
    assert len(service.echoes) == 1
    exchange(link, allowed)
