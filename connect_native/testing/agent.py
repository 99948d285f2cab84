"""
The development agent in memory, for a treq ``StubTreq``-driven client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from twisted.web.resource import IResource


_T = TypeVar("_T")


class MemoryAgent:
    """
    The development agent in memory, wired to a
    :class:`~connect_native.consul.client.ConsulClient`: no sockets, no
    Consul binary, and time on a ``MemoryReactorClock`` that starts at the
    wall clock (OpenSSL checks certificate validity against real time).

    Hand ``client`` to anything that talks to the agent
    (:class:`~connect_native.certs.CertManager`,
    :class:`~connect_native.registration.Registration`, the authorizers, the
    resolvers) and ``reactor`` to anything that needs a clock or listens;
    call :meth:`flush` to let the agent answer, :meth:`advance` to let time
    pass.

    :param front: wraps the agent's resource, e.g. to inject faults between
        the client and the agent.
    :param agent_options: passed to
        :class:`~connect_native.devagent.DevAgent` (``datacenter``,
        ``acl_default_policy``, ``master_token``, ``version``, ...).
    """

    def __init__(
        self,
        *,
        front: Callable[[IResource], IResource] | None = None,
        seed: int = 0,
        timeout: float = 5.0,
        token: str | None = None,
        **agent_options: Any,
    ) -> None:
        import random

        from treq.testing import StubTreq
        from twisted.internet.testing import MemoryReactorClock

        from connect_native.consul.client import ConsulClient
        from connect_native.devagent import DevAgent

        self.reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
        self.reactor.advance(time.time())
        # A seeded generator: tests want the agent's choices repeatable.
        rng = random.Random(seed)  # noqa: S311
        self.agent = DevAgent(self.reactor, rng=rng, **agent_options)
        resource = self.agent.resource()
        self.front = resource if front is None else front(resource)
        self.http = StubTreq(self.front)  # type: ignore[no-untyped-call]
        self.client = ConsulClient(
            self.reactor, http_client=self.http, timeout=timeout, token=token
        )

    def flush(self) -> None:
        """
        Let the agent answer every request that it can answer now.
        """
        self.http.flush()  # type: ignore[no-untyped-call]

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """
        Let ``seconds`` pass in steps of ``step``, answering requests as they
        come.
        """
        self.flush()
        while seconds > 0:
            self.reactor.advance(min(step, seconds))
            seconds -= step
            self.flush()

    def result(self, d: Deferred[_T]) -> _T:
        """
        What ``d`` fired with, after the agent answered what it could; raises
        what it failed with, or ``AssertionError`` when it has not fired.
        """
        self.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        if not results:
            raise AssertionError(f"{d!r} has not fired")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        answer: _T = results[0]
        return answer
