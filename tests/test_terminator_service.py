"""
Tests for the Terminator service in memory: a MemoryReactorClock for
listening, the development agent behind StubTreq for the agent.
"""

from __future__ import annotations

import time
from typing import Any

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from connect_native.consul.client import ConsulClient
from connect_native.devagent import DevAgent
from connect_native.service import cert_managers
from connect_native.terminator import Settings, Terminator, parse_upstream


def terminator(settings: Settings) -> tuple[Terminator, MemoryReactorClock, list[int]]:
    reactor = MemoryReactorClock()
    reactor.advance(time.time())
    agent = DevAgent(reactor)
    client = ConsulClient(reactor, http_client=StubTreq(agent.resource()))
    finished: list[int] = []
    return (
        Terminator(
            settings, reactor, consul_client=client, on_finished=finished.append
        ),
        reactor,
        finished,
    )


def test_an_upstream_on_a_non_loopback_interface_is_logged_as_a_warning() -> None:
    service, reactor, finished = terminator(
        Settings(
            service="web",
            upstreams=(
                parse_upstream("db=tcp:9191:interface=0.0.0.0"),
                parse_upstream("cache=tcp:9192"),
            ),
            register=False,
        )
    )
    with capturedLogs() as events:
        service.startService()
    texts = [formatEvent(e) for e in events]
    warnings = [t for t in texts if "not a loopback address" in t]
    assert len(warnings) == 1
    assert "upstream db" in warnings[0]
    assert "0.0.0.0" in warnings[0]
    # The upstreams listen where they were told, the second on 127.0.0.1.
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (9191, "0.0.0.0"),
        (9192, "127.0.0.1"),
    ]
    assert finished == []
    manager = service.connect_service.cert_manager
    assert cert_managers.leases(manager) == 1
    with capturedLogs():
        service.stopService()
    assert cert_managers.leases(manager) == 0


def test_a_listener_that_cannot_start_ends_the_process_with_1() -> None:
    service, reactor, finished = terminator(
        Settings(service="web", upstreams=(parse_upstream("db=tcp:9191"),))
    )

    def refuse(*args: Any, **kwargs: Any) -> Any:
        from twisted.internet.error import CannotListenError

        raise CannotListenError("127.0.0.1", 9191, OSError("address in use"))

    reactor.listenTCP = refuse  # type: ignore[method-assign]
    with capturedLogs() as events:
        service.startService()
    assert finished == [1]
    [critical] = [e for e in events if e["log_level"].name == "critical"]
    assert "cannot start" in formatEvent(critical)
    assert "address in use" in formatEvent(critical)
    with capturedLogs():
        service.stopService()


def test_the_log_level_holds_while_the_terminator_runs_and_is_put_back() -> None:
    """
    twistd shows every event whatever its level: the terminator drops
    connect_native's events below --log-level (info by default) while it
    runs, and puts the level back when it stops.
    """
    from connect_native.authorize import log as library_log

    service, _, _ = terminator(
        Settings(service="web", upstreams=(parse_upstream("db=tcp:9191"),))
    )
    with capturedLogs() as events:
        library_log.debug("before: {n}", n=1)
        service.startService()
        library_log.debug("while running: {n}", n=2)
        library_log.info("while running, info: {n}", n=3)
        service.stopService()
        library_log.debug("after: {n}", n=4)
    texts = [formatEvent(e) for e in events]
    assert "before: 1" in texts
    assert "while running: 2" not in texts
    assert "while running, info: 3" in texts
    assert "after: 4" in texts
