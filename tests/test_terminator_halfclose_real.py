"""
Half-close through ``twistd connect-native`` as a real process, against a
real Consul 1.8.7 agent (issue 17, item 2): a client writes its request,
shuts its write side, and reads the whole reply.

One terminator per TLS transport (``--tls-transport connect_native`` and
``twisted``) serves ``<web>`` with ``--upstream <web>=...``, an upstream to
itself, so one plaintext connection crosses both kinds of Connect TLS the
terminator has: its upstream's client (``ConnectClientEndpoint``) and its
public listener's server.  The backend reads until the end of the request,
then answers with the request's SHA-256 and several MiB, and closes; the
client checks both.  A ``connect:`` client endpoint in the test process
does the same against the public listener.

A third terminator runs on ``twistd --reactor cn-epoll``
(``connect_native.epollreactor``): the same forwards, several MiB each way
with backpressure and a half-close, through a reactor that registers each
socket fewer times.
"""

from __future__ import annotations

import hashlib
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    clientFromString,
    connectProtocol,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native.terminator import TLS_TRANSPORTS
from tests.consul_agent import RealConsulAgent, free_ports
from tests.test_terminator_real import Process, Sender, bounded, chunk

REQUEST = 3 * 1024 * 1024 + 12345
REPLY = 5 * 1024 * 1024 + 678


def reply_stream() -> Iterator[bytes]:
    """The reply's bytes after the request's digest, in chunks."""
    index, left = 1000, REPLY
    while left > 0:
        data = chunk(index, min(256 * 1024, left))
        index += 1
        left -= len(data)
        yield data


def reply_digest() -> bytes:
    digest = hashlib.sha256()
    for data in reply_stream():
        digest.update(data)
    return digest.digest()


@implementer(IHalfCloseableProtocol)
class ReplyAtEnd(Protocol):
    """
    Reads the whole request (to its end of stream), then writes the
    request's SHA-256 and :data:`REPLY` bytes, and closes.
    """

    def __init__(self, seen: list[ReplyAtEnd]) -> None:
        self.digest = hashlib.sha256()
        self.count = 0
        self.lost: Failure | None = None
        seen.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)

    def readConnectionLost(self) -> None:
        transport: Any = self.transport
        transport.write(self.digest.digest())
        for data in reply_stream():
            transport.write(data)
        transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = reason


class HalfCloser(Protocol):
    """
    Sends :data:`REQUEST` bytes, shuts its write side, and reads to the end;
    ``done`` fires with (digest sent, bytes received: digest and count).
    """

    def __init__(self) -> None:
        self.received = b""
        self.count = 0
        self.digest = hashlib.sha256()
        self.sender: Sender | None = None
        self.done: Deferred[tuple[bytes, bytes, int, bytes]] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.sender = RequestSender(transport, REQUEST)
        transport.registerProducer(self.sender, False)

    def dataReceived(self, data: bytes) -> None:
        if len(self.received) < 32:
            head = (self.received + data)[:32]
            data = data[32 - len(self.received) :]
            self.received = head
        self.count += len(data)
        self.digest.update(data)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        assert self.sender is not None
        self.done.callback(
            (
                self.sender.digest.digest(),
                self.received,
                self.count,
                self.digest.digest(),
            )
        )


class RequestSender(Sender):
    """A Sender that shuts the write side once it has sent everything."""

    ended = False

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self.remaining <= 0 and not self.ended:
            self.ended = True
            self.transport.loseWriteConnection()


class Terminator:
    def __init__(
        self,
        agent: RealConsulAgent,
        work: Path,
        transport: str,
        reactor_name: str | None = None,
    ) -> None:
        self.reactor_name = reactor_name
        self.web = f"half-{uuid.uuid4().hex[:8]}-web"
        self.seen: list[ReplyAtEnd] = []
        self.backend: Any = reactor.listenTCP(  # type: ignore[attr-defined]
            0, Factory.forProtocol(lambda: ReplyAtEnd(self.seen)), interface="127.0.0.1"
        )
        self.public, self.upstream = free_ports(2)
        self.process = Process(
            [
                *([] if reactor_name is None else ["--reactor", reactor_name]),
                "connect-native",
                "--service",
                self.web,
                "--listen",
                f"tcp:{self.public}:interface=127.0.0.1",
                "--to",
                f"tcp:127.0.0.1:{self.backend.getHost().port}",
                "--consul",
                f"http://{agent.http_address}",
                "--upstream",
                f"{self.web}=tcp:{self.upstream}:interface=127.0.0.1",
                "--tls-transport",
                transport,
            ],
            work,
        )


#: (--tls-transport, --reactor or None for Twisted's default)
SETUPS = [(transport, None) for transport in TLS_TRANSPORTS] + [
    ("connect_native", "cn-epoll")
]


@pytest.fixture(
    scope="module",
    params=SETUPS,
    ids=[t if r is None else f"{t}-{r}" for t, r in SETUPS],
)
def terminator(
    request: pytest.FixtureRequest,
    real_consul: RealConsulAgent,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Terminator]:
    transport, reactor_name = request.param
    started = Terminator(
        real_consul, tmp_path_factory.mktemp("half"), transport, reactor_name
    )
    try:
        if reactor_name == "cn-epoll":
            started.process.wait_for_line(
                "reactor class: connect_native.epollreactor.CoalescingEPollReactor",
                60,
            )
        started.process.wait_for_line("accepting Connect", 60)
        started.process.wait_for_line("plaintext listener on", 10)
        yield started
    finally:
        code = started.process.stop()
        started.backend.stopListening()
    assert code in (0, -signal.SIGTERM), started.process.output()


def check(terminator: Terminator, result: tuple[bytes, bytes, int, bytes]) -> None:
    sent, head, count, rest = result
    backend = terminator.seen[-1]
    assert backend.count == REQUEST
    assert backend.digest.digest() == sent
    # The backend saw the whole request end cleanly, not a reset.
    assert backend.lost is not None
    assert head == sent
    assert count == REPLY
    assert rest == reply_digest()


async def registered(terminator: Terminator) -> None:
    # The upstream finds the instance through its passing registration.
    await bounded(deferToThread(terminator.process.wait_for_line, "registered", 30), 40)


@pytest_twisted.ensureDeferred
async def test_through_an_upstream_a_half_closed_client_gets_its_whole_reply(
    terminator: Terminator,
) -> None:
    await registered(terminator)
    caller = HalfCloser()
    await bounded(
        connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", terminator.upstream, timeout=10),
            caller,
        )
    )
    check(terminator, await bounded(caller.done, 60))


@pytest_twisted.ensureDeferred
async def test_a_connect_client_endpoint_half_closes_and_gets_its_whole_reply(
    terminator: Terminator, real_consul: RealConsulAgent
) -> None:
    await registered(terminator)
    agent = real_consul.http_address.replace(":", "\\:")
    dial = clientFromString(
        reactor, f"connect:{terminator.web}:source={terminator.web}-api:consul={agent}"
    )
    try:
        caller = HalfCloser()
        await bounded(connectProtocol(dial, caller), 40)
        check(terminator, await bounded(caller.done, 60))
    finally:
        dial.close()
