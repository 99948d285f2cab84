"""
``twistd connect-native --demo``: a plaintext backend behind the terminator,
and a Connect client (``demo-client``) that makes one round trip through it
and checks the answer.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from connect_native import _logging
from connect_native._deferreds import bounded

__all__ = [
    "DEMO_CLIENT_SERVICE",
    "DEMO_MESSAGE",
    "DEMO_SERVICE",
    "DemoBackend",
    "DemoCaller",
    "listen_backend",
    "registered",
    "round_trip",
]

log = Logger(observer=_logging.observer)

# Twisted's endpoint helper is untyped.
connectProtocol: Any = endpoints.connectProtocol  # noqa: N816

DEMO_SERVICE = "demo-web"
DEMO_CLIENT_SERVICE = "demo-client"
DEMO_MESSAGE = b"hello through Connect\n"


class DemoBackend(Protocol):
    """Answers what it got, then closes its side."""

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(b"demo backend got: " + data)
        transport.loseConnection()


class DemoCaller(Protocol):
    """Sends :data:`DEMO_MESSAGE`; ``done`` fires with what came back."""

    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(DEMO_MESSAGE)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(self.received)


def listen_backend(reactor: Any) -> IListeningPort:
    """The demo backend, listening in plaintext on a free loopback port."""
    port: IListeningPort = reactor.listenTCP(
        0, Factory.forProtocol(DemoBackend), interface="127.0.0.1"
    )
    log.info(
        "demo: backend (plaintext) on 127.0.0.1:{port}",
        port=port.getHost().port,  # type: ignore[attr-defined]
    )
    return port


async def registered(
    reactor: Any, registration: Any, service: str, deadline: float
) -> None:
    """Wait (bounded) until the agent has acknowledged our registration."""
    waited = 0.0
    step = 0.05
    while registration is not None and not registration.registered:
        if waited >= deadline:
            raise RuntimeError(
                f"the development agent did not acknowledge the registration "
                f"of {service!r} within {deadline:g}s"
            )
        pause: Deferred[None] = Deferred()
        reactor.callLater(step, pause.callback, None)
        await pause
        waited += step


async def round_trip(
    reactor: Any, service: str, consul: Any, timeout: float, closables: list[Any]
) -> None:
    """
    Dial Connect service ``service`` as ``demo-client``, send
    :data:`DEMO_MESSAGE` and check what the backend answers.

    :param closables: where the client endpoint goes, to be closed on stop.
    :raises RuntimeError: when the answer is not the expected one.
    """
    from connect_native.client import ConnectClientEndpoint

    dialer = ConnectClientEndpoint.for_service(
        reactor,
        service,
        our_service=DEMO_CLIENT_SERVICE,
        consul=consul,
        timeout=timeout,
    )
    closables.append(dialer)
    caller = DemoCaller()
    log.info(
        "demo: client {client} dials Connect service {service} and sends {sent!r}",
        client=DEMO_CLIENT_SERVICE,
        service=service,
        sent=DEMO_MESSAGE,
    )
    await connectProtocol(dialer, caller)
    received = await bounded(
        caller.done,
        timeout,
        reactor,
        lambda: DeferredTimeoutError(timeout, "Deferred"),
    )
    expected = b"demo backend got: " + DEMO_MESSAGE
    if received != expected:
        raise RuntimeError(
            f"the demo round trip came back as {received!r}, not {expected!r}"
        )
    log.info(
        "demo: OK: {client} reached {service} over mutual TLS, the "
        "terminator forwarded it to the backend, and the answer came back: "
        "{received!r}",
        client=DEMO_CLIENT_SERVICE,
        service=service,
        received=received,
    )
