"""
``--status``: the terminator's plaintext status listener, the service's
:meth:`~connect_native.service.ConnectService.status_resource` with the
terminator's own conditions of readiness: the public listener accepting,
and the backend (``--to``) answering a TCP connect (:class:`BackendProbe`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

__all__ = ["PROBE_REMEMBERED", "BackendProbe", "status_site"]

# Twisted's endpoint helpers are untyped.
clientFromString: Any = endpoints.clientFromString  # noqa: N816

#: Seconds a probe's answer is reused: a load balancer asking /ready many
#: times a second makes at most one connection to the backend a second.
PROBE_REMEMBERED = 1.0


class BackendProbe:
    """
    Whether the backend accepts a TCP connection: connects (within
    ``timeout``), closes at once, and remembers the answer for
    :data:`PROBE_REMEMBERED` seconds; one probe at a time, shared by the
    requests that ask meanwhile.

    :param reactor: connects and keeps time.
    :param to: the backend, a client endpoint description (``--to``).
    :param timeout: the longest a connect may take.
    """

    def __init__(self, reactor: Any, to: str, timeout: float) -> None:
        self.reactor = reactor
        self.to = to
        self.timeout = timeout
        self._endpoint = clientFromString(reactor, to)
        self._answer: tuple[float, str | None] | None = None
        self._waiting: list[Deferred[str | None]] = []

    def __call__(self) -> Deferred[str | None]:
        now = self.reactor.seconds()
        if self._answer is not None and now - self._answer[0] < PROBE_REMEMBERED:
            return succeed(self._answer[1])
        waiter: Deferred[str | None] = Deferred(self._waiting.remove)
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            self._probe()
        return waiter

    def _probe(self) -> None:
        try:
            connecting: Deferred[Any] = self._endpoint.connect(
                Factory.forProtocol(Protocol)
            )
        except Exception as e:
            self._settle(f"cannot connect to {self.to}: {e}")
            return
        timed_out: list[bool] = []

        def give_up() -> None:
            timed_out.append(True)
            connecting.cancel()

        timer = self.reactor.callLater(self.timeout, give_up)

        def connected(protocol: Protocol) -> None:
            if timer.active():
                timer.cancel()
            if protocol.transport is not None:
                protocol.transport.loseConnection()
            self._settle(None)

        def failed(failure: Failure) -> None:
            if timer.active():
                timer.cancel()
            if timed_out:
                why = f"no connection within {self.timeout:g}s"
            else:
                why = failure.getErrorMessage() or type(failure.value).__name__
            self._settle(f"the backend {self.to} is unreachable: {why}")

        connecting.addCallbacks(connected, failed)

    def _settle(self, answer: str | None) -> None:
        self._answer = (self.reactor.seconds(), answer)
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(answer)


def status_site(resource: Any) -> Any:
    """A twisted.web Site for the status pages, without an access log."""
    from twisted.web.server import Site

    site = Site(resource)  # type: ignore[no-untyped-call]
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
