"""
``twistd -n connect-native`` on a files identity with no agent at all:
``--identity files:cert=,key=,roots=`` and ``--authorize allow-ids
--allow-id URI``, as a real process over real sockets.

The "agent" it is pointed at is a listener that counts who connects: it
must never be dialled.  An allowed caller reaches the backend; a caller of
the same CA but another SPIFFE ID is refused by the terminator (its log
names the caller's address); a certificate written over the files is
presented to new connections within seconds, while a connection opened
before carries on.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import crypto
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from connect_native.certs import Bundle, RootPEMs
from connect_native.identity import ServiceIdentity
from connect_native.testing import CertificateFactory
from connect_native.testing.certificates import TestLeaf
from connect_native.tls import ClientConnectionCreator
from tests.consul_agent import free_ports
from tests.test_terminator_real import (
    Backend,
    Caller,
    Process,
    bounded,
    call,
    log_line,
)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def bundle_of(ca: CertificateFactory, leaf: TestLeaf) -> Bundle:
    return Bundle.build(
        leaf_cert_pem=leaf.chain_pem,
        private_key_pem=leaf.key_pem,
        roots=[RootPEMs(ca.root_pem)],
        trust_domain=ca.trust_domain,
        now=time.time(),
    )


class Counted(Protocol):
    """Where the agent would be: counts connections, answers nothing."""

    def __init__(self, seen: list[object]) -> None:
        seen.append(self)


class Files:
    def __init__(self, work: Path) -> None:
        self.ca = CertificateFactory()
        self.work = work
        self.web = "web"
        self.api = "api"
        self.agent_seen: list[object] = []
        self.agent_port: Any = reactor.listenTCP(  # type: ignore[attr-defined]
            0,
            Factory.forProtocol(lambda: Counted(self.agent_seen)),
            interface="127.0.0.1",
        )
        self.write_identity()
        self.received: list[Backend] = []
        self.backend_port: Any = reactor.listenTCP(  # type: ignore[attr-defined]
            0,
            Factory.forProtocol(lambda: Backend(self.received)),
            interface="127.0.0.1",
        )
        (self.public,) = free_ports(1)
        allowed = self.ca.service_uri(self.api)
        self.process = Process(
            [
                "connect-native",
                "--service",
                self.web,
                "--listen",
                f"tcp:{self.public}:interface=127.0.0.1",
                "--to",
                f"tcp:127.0.0.1:{self.backend_port.getHost().port}",
                "--consul",
                f"http://127.0.0.1:{self.agent_port.getHost().port}",
                "--no-register",
                "--identity",
                f"files:cert={work / 'cert.pem'},key={work / 'key.pem'},"
                f"roots={work / 'ca.pem'},interval=0.2",
                "--authorize",
                "allow-ids",
                "--allow-id",
                allowed,
            ],
            work,
        )

    def write_identity(self) -> TestLeaf:
        leaf = self.ca.leaf(self.web)
        _write(self.work / "cert.pem", leaf.chain_pem)
        _write(self.work / "key.pem", leaf.key_pem)
        _write(self.work / "ca.pem", self.ca.root_pem)
        return leaf

    def creator(self, service: str) -> ClientConnectionCreator:
        bundle = bundle_of(self.ca, self.ca.leaf(service))
        expected = ServiceIdentity(self.ca.trust_domain, "default", "dc1", self.web)
        return ClientConnectionCreator(bundle, expected)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Files]:
    started = Files(tmp_path_factory.mktemp(f"files-{uuid.uuid4().hex[:6]}"))
    try:
        started.process.wait_for_line("accepting Connect", 60)
        yield started
    finally:
        started.process.stop()
        started.backend_port.stopListening()
        started.agent_port.stopListening()
    assert started.agent_seen == [], "the terminator dialled the agent"


class PortCaller(Caller):
    """A :class:`Caller` that remembers the port it dialled from."""

    port = 0

    def connectionMade(self) -> None:
        self.port = self.transport.getHost().port  # type: ignore[union-attr]
        super().connectionMade()


class Holder(Protocol):
    """An open connection that says something when asked, echoed back."""

    def __init__(self) -> None:
        self.got = b""
        self.ready: Deferred[None] = Deferred()
        self._want = 0
        self._echoed: Deferred[bytes] | None = None

    def connectionMade(self) -> None:
        self.ready.callback(None)

    def say(self, data: bytes) -> Deferred[bytes]:
        self.got = b""
        self._want = len(data)
        self._echoed = Deferred()
        self.transport.write(data)  # type: ignore[union-attr]
        return self._echoed

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if self._echoed is not None and len(self.got) >= self._want:
            echoed, self._echoed = self._echoed, None
            echoed.callback(self.got)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if self._echoed is not None:
            echoed, self._echoed = self._echoed, None
            echoed.errback(reason or Failure(ConnectionError("lost")))

    def serial(self) -> int:
        cert = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        assert isinstance(cert, crypto.X509)
        return int(cert.get_serial_number())


async def hold(port: int, creator: ClientConnectionCreator) -> Holder:
    holder = Holder()
    endpoint = wrapClientTLS(
        creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    )
    await bounded(connectProtocol(endpoint, holder))
    # The TLS handshake is done once a first echo comes back.
    assert await bounded(holder.say(b"hello")) == b"hello"
    return holder


@pytest_twisted.ensureDeferred
async def test_an_allowed_caller_is_served_on_files_alone(files: Files) -> None:
    before = len(files.received)
    sent, got = await call(files.public, files.creator(files.api), Caller(b"ping"))
    assert got == sent == b"ping"
    assert len(files.received) == before + 1


@pytest_twisted.ensureDeferred
async def test_a_caller_not_in_the_allowed_ids_is_refused(files: Files) -> None:
    before = len(files.received)
    caller = PortCaller(b"hello?")
    _sent, got = await call(files.public, files.creator("evil"), caller)
    assert got == b""
    assert len(files.received) == before
    port = caller.port
    line = await log_line(files.process, "denied", files.ca.service_uri("evil"))
    assert "matches no allowed ID" in line
    # The refusal names the caller's address: the port it dialled from.
    assert f"host='127.0.0.1', port={port})" in line


@pytest_twisted.ensureDeferred
async def test_a_replaced_certificate_is_presented_while_open_ones_carry_on(
    files: Files,
) -> None:
    creator = files.creator(files.api)
    before = await hold(files.public, creator)
    old_serial = before.serial()
    new_leaf = files.write_identity()
    new_serial = new_leaf.certificate.serial_number
    assert new_serial != old_serial
    deadline = time.monotonic() + 10
    while True:
        fresh = await hold(files.public, creator)
        serial = fresh.serial()
        fresh.transport.loseConnection()  # type: ignore[union-attr]
        if serial == new_serial:
            break
        assert serial == old_serial
        assert time.monotonic() < deadline, "the new certificate was not presented"
        pause: Deferred[None] = Deferred()
        reactor.callLater(0.1, pause.callback, None)  # type: ignore[attr-defined]
        await pause
    # The connection opened before the swap still carries bytes both ways.
    assert await bounded(before.say(b"still here")) == b"still here"
    assert before.serial() == old_serial
    before.transport.loseConnection()  # type: ignore[union-attr]
