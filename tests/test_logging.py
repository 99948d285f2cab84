"""
connect_native's log events go to Twisted's global publisher through one
level filter that a program (the terminator) can raise for the package.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent

from connect_native import _logging


@pytest.fixture
def level_back() -> Iterator[None]:
    before = _logging.set_log_level(LogLevel.debug)
    yield
    _logging.set_log_level(before)


def test_by_default_every_level_passes(level_back: None) -> None:
    log = Logger(namespace="connect_native.example", observer=_logging.observer)
    with capturedLogs() as events:
        log.debug("a debug {n}", n=1)
    assert [formatEvent(e) for e in events] == ["a debug 1"]


def test_a_raised_level_drops_only_the_packages_events_below_it(
    level_back: None,
) -> None:
    ours = Logger(namespace="connect_native.example", observer=_logging.observer)
    theirs = Logger(namespace="elsewhere", observer=_logging.observer)
    assert _logging.set_log_level(LogLevel.warn) == LogLevel.debug
    with capturedLogs() as events:
        ours.debug("ours debug")
        ours.info("ours info")
        ours.warn("ours warn")
        theirs.debug("theirs debug")
    assert [formatEvent(e) for e in events] == ["ours warn", "theirs debug"]
    assert _logging.set_log_level(LogLevel.debug) == LogLevel.warn


def test_every_module_logs_through_the_filter() -> None:
    import connect_native.authorize
    import connect_native.certs
    import connect_native.consul.blocking
    import connect_native.server
    import connect_native.terminator.forward
    import connect_native.tls

    for logger in (
        connect_native.authorize.log,
        connect_native.terminator.forward.log,
        connect_native.server.log,
        connect_native.tls._log,
        connect_native.certs.CertManager._log,
        connect_native.consul.blocking.Watch._log,
    ):
        assert logger.observer is _logging.observer
