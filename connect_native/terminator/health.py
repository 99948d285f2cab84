"""
The terminator's health check of its backend (``--to``): :class:`BackendProbe`,
a Twisted service that probes the backend every ``--check-interval`` seconds
and tells the :class:`~connect_native.registration.Registration` (as its
``backend``) when the answer changes, so the registered check goes critical
while the backend is down and discovery stops sending callers to an
instance that can only answer them with a closed connection.

``--to-check tcp`` (the default) probes with a connect to ``--to`` (a TCP
connect for a ``tcp:`` endpoint), closed at once; ``--to-check http:/PATH``
with ``GET /PATH`` over ``--to``, passing on a 2xx answer.  Every probe is
bounded by a timeout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from connect_native import _logging

__all__ = ["BackendProbe", "http_probe", "tcp_probe"]

log = Logger(observer=_logging.observer)

#: A probe: a Deferred that fires with what it found (a sentence) when the
#: backend answers, and fails (with why) when it does not.
Probe = Callable[[], "Deferred[str]"]


class _Hangup(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _HangupFactory(Factory):
    noisy = False
    protocol = _Hangup


def tcp_probe(endpoint: Any, to: str) -> Probe:
    """A probe that connects to ``endpoint`` (``--to``) and hangs up."""

    def probe() -> Deferred[str]:
        d: Deferred[Any] = endpoint.connect(_HangupFactory())
        return d.addCallback(lambda _: f"{to} accepts connections")

    return probe


class _Drain(Protocol):
    """Reads a response body to its end and throws it away."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(lambda _: self.abort())

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(None)


def http_probe(reactor: Any, endpoint: Any, to: str, path: str) -> Probe:
    """A probe that sends ``GET path`` over ``endpoint``; 2xx passes."""
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IAgentEndpointFactory
    from zope.interface import implementer

    @implementer(IAgentEndpointFactory)
    class _To:
        def endpointForURI(self, uri: object) -> Any:
            return endpoint

    make_pool: Any = HTTPConnectionPool
    make_agent: Any = Agent.usingEndpointFactory
    agent = make_agent(reactor, _To(), pool=make_pool(reactor, persistent=False))
    url = f"http://{_host_header(to)}{path}".encode()

    async def get() -> str:
        response: Any = await agent.request(
            b"GET",
            url,
            Headers({b"User-Agent": [b"connect-native health check"]}),
        )
        drain = _Drain()
        response.deliverBody(drain)
        await drain.done
        code = response.code
        if not 200 <= code < 300:
            raise ValueError(f"GET {path} on {to} answered {code}, not 2xx")
        return f"GET {path} on {to} answered {code}"

    def probe() -> Deferred[str]:
        return Deferred.fromCoroutine(get())

    return probe


def _host_header(to: str) -> str:
    """
    The ``Host`` of a health request over ``to``: its host and port for a
    ``tcp:HOST:PORT`` description, else ``localhost``.
    """
    from connect_native.terminator.options import split_description

    parts = [re.sub(r"\\(.)", r"\1", p) for p in split_description(to)]
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    bare = [p for p in parts[1:] if "=" not in p]
    host = fields.get("host", bare[0] if bare else None)
    port = fields.get("port", bare[1] if len(bare) > 1 else None)
    if parts[0].lower() not in ("tcp", "tcp6", "host") or not host or not port:
        return "localhost"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BackendProbe(Service):
    """
    Run ``probe`` now and every ``interval`` seconds while running, each
    bounded by ``timeout``; :attr:`healthy` is whether the last one passed,
    and subscribers are called when it changes.  Until the first probe
    answers, the backend is not healthy.

    :param clock: schedules the probes and their timeouts.
    :param probe: see :data:`Probe`.
    :param to: what is probed, for the log lines (``--to``).
    :param interval: seconds between probes.
    :param timeout: seconds one probe may take.
    """

    def __init__(
        self,
        clock: IReactorTime,
        probe: Probe,
        to: str,
        interval: float,
        timeout: float,
    ) -> None:
        self.clock = clock
        self.probe = probe
        self.to = to
        self.interval = interval
        self.timeout = timeout
        self.healthy = False
        self.reason = f"{to} not probed yet"
        self._subscribers: list[Callable[[], object]] = []
        self._timer: IDelayedCall | None = None
        self._in_flight: Deferred[str] | None = None
        self._probed = False

    def subscribe(self, callback: Callable[[], object]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._run()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.cancel()

    def _run(self) -> None:
        self._timer = None
        if not self.running:
            return
        d = maybeDeferred(self.probe).addTimeout(self.timeout, self.clock)
        self._in_flight = d
        d.addBoth(self._answered, d)

    def _answered(self, result: object, d: Deferred[str]) -> None:
        if self._in_flight is not d:
            return  # stopped meanwhile
        self._in_flight = None
        if isinstance(result, Failure):
            healthy, reason = False, f"{self.to} unreachable: {_why(result, self)}"
        else:
            healthy, reason = True, str(result)
        changed = healthy != self.healthy or not self._probed
        self._probed = True
        self.healthy, self.reason = healthy, reason
        if changed:
            emit = log.info if healthy else log.warn
            emit(
                "connect-native: backend {state}: {reason}",
                state="up" if healthy else "down",
                reason=reason,
                to=self.to,
                healthy=healthy,
            )
            for callback in list(self._subscribers):
                callback()
        self._timer = self.clock.callLater(self.interval, self._run)


def _why(failure: Failure, probe: BackendProbe) -> str:
    error = failure.value
    if isinstance(error, CancelledError | DeferredTimeoutError):
        return f"no answer within {probe.timeout:g}s"
    return failure.getErrorMessage() or type(error).__name__
