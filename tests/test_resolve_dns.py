"""
Tests for connect_native.resolve.DnsResolver against a fake Consul DNS
server on a real loopback UDP port (twisted.names on both sides), answering
what the real 1.8.7 agent answers (``tests/fixtures/real-1.8.7/dns-*.txt``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.names import dns, error, server

from connect_native.resolve import DnsResolver, ExpectedIdentity, Instance, ResolveError


class FakeConsulDns:
    """
    Answers ``query`` as the agent's DNS does: SRV answers and the targets'
    A and TXT records in the additional section; NXDOMAIN for other names.
    """

    def __init__(self) -> None:
        self.srv: dict[str, list[tuple[int, str]]] = {}
        self.a: dict[str, str] = {}
        self.additional = True
        self.asked: list[tuple[str, int]] = []

    def query(self, query: dns.Query, timeout: Any = None) -> defer.Deferred[Any]:
        name = query.name.name.decode().lower()
        self.asked.append((name, query.type))
        if query.type == dns.SRV and name in self.srv:
            answers = [
                dns.RRHeader(
                    name, dns.SRV, dns.IN, 0, dns.Record_SRV(1, 1, port, target, ttl=0)
                )
                for port, target in self.srv[name]
            ]
            extra = []
            if self.additional:
                for _, target in self.srv[name]:
                    if target in self.a:
                        extra.append(
                            dns.RRHeader(
                                target,
                                dns.A,
                                dns.IN,
                                0,
                                dns.Record_A(self.a[target], 0),
                            )
                        )
                    extra.append(
                        dns.RRHeader(
                            target,
                            dns.TXT,
                            dns.IN,
                            0,
                            dns.Record_TXT(b"consul-network-segment=", ttl=0),
                        )
                    )
            return defer.succeed((answers, [], extra))
        if query.type == dns.A and name in self.a:
            return defer.succeed(
                (
                    [
                        dns.RRHeader(
                            name, dns.A, dns.IN, 0, dns.Record_A(self.a[name], 0)
                        )
                    ],
                    [],
                    [],
                )
            )
        return defer.fail(error.DomainError(name))


@pytest.fixture
def fake_dns() -> Iterator[tuple[FakeConsulDns, int]]:
    fake = FakeConsulDns()
    factory = server.DNSServerFactory(authorities=[fake])
    protocol = dns.DNSDatagramProtocol(controller=factory)
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")  # type: ignore[attr-defined]
    yield fake, port.getHost().port
    port.stopListening()


def db_records(fake: FakeConsulDns) -> None:
    """What the real agent answered for db.connect.consul SRV."""
    fake.srv["db.connect.consul"] = [
        (5001, "7f000001.addr.dc1.consul"),
        (5002, "vm.node.dc1.consul"),
        (21000, "vm.node.dc1.consul"),
    ]
    fake.a["7f000001.addr.dc1.consul"] = "127.0.0.1"
    fake.a["vm.node.dc1.consul"] = "127.0.0.2"


def db(dc: str = "dc1") -> ExpectedIdentity:
    return ExpectedIdentity(service="db", datacenter=dc)


@pytest_twisted.ensureDeferred
async def test_srv_records_become_instances_expecting_the_service(
    fake_dns: tuple[FakeConsulDns, int],
) -> None:
    fake, port = fake_dns
    db_records(fake)
    resolver = DnsResolver("db", dns_address=("127.0.0.1", port))
    instances = await resolver.resolve()
    assert list(instances) == [
        Instance("127.0.0.1", 5001, db()),
        Instance("127.0.0.2", 5002, db(), node="vm"),
        Instance("127.0.0.2", 21000, db(), node="vm"),
    ]
    # The addresses came with the SRV answer: one query only.
    assert fake.asked == [("db.connect.consul", dns.SRV)]


@pytest_twisted.ensureDeferred
async def test_the_seeds_dot_connect_syntax_asks_the_same_name(
    fake_dns: tuple[FakeConsulDns, int],
) -> None:
    fake, port = fake_dns
    db_records(fake)
    resolver = DnsResolver("db.connect", dns_address=("127.0.0.1", port))
    assert resolver.name == "db.connect.consul"
    assert len(await resolver.resolve()) == 3


@pytest_twisted.ensureDeferred
async def test_targets_missing_from_the_additional_section_are_looked_up(
    fake_dns: tuple[FakeConsulDns, int],
) -> None:
    fake, port = fake_dns
    db_records(fake)
    fake.additional = False
    resolver = DnsResolver("db", dns_address=("127.0.0.1", port))
    instances = await resolver.resolve()
    assert [(i.address, i.port) for i in instances] == [
        ("127.0.0.1", 5001),
        ("127.0.0.2", 5002),
        ("127.0.0.2", 21000),
    ]
    assert ("vm.node.dc1.consul", dns.A) in fake.asked


@pytest_twisted.ensureDeferred
async def test_a_datacenter_is_asked_for_and_read_from_the_targets(
    fake_dns: tuple[FakeConsulDns, int],
) -> None:
    fake, port = fake_dns
    fake.srv["db.connect.dc2.consul"] = [(5001, "0a000001.addr.dc2.consul")]
    fake.a["0a000001.addr.dc2.consul"] = "10.0.0.1"
    resolver = DnsResolver("db", datacenter="dc2", dns_address=("127.0.0.1", port))
    assert list(await resolver.resolve()) == [Instance("10.0.0.1", 5001, db("dc2"))]


@pytest_twisted.ensureDeferred
async def test_an_unknown_service_has_no_instances(
    fake_dns: tuple[FakeConsulDns, int],
) -> None:
    _, port = fake_dns
    resolver = DnsResolver("nosuch", dns_address=("127.0.0.1", port))
    assert list(await resolver.resolve()) == []


@pytest_twisted.ensureDeferred
async def test_a_silent_dns_server_fails_within_the_timeout() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = DnsResolver("db", dns_address=silent.getsockname(), timeout=0.2)
        with pytest.raises(ResolveError) as info:
            await resolver.resolve()
    finally:
        silent.close()
    assert "db.connect.consul" in str(info.value)
    assert "0.2s" in str(info.value)


def test_bad_settings_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="service must be a single DNS label"):
        DnsResolver("a.b")
    with pytest.raises(ValueError, match="dns_address"):
        DnsResolver("db", dns_address=("127.0.0.1", 0))
    with pytest.raises(ValueError, match="timeout"):
        DnsResolver("db", timeout=0)
