"""
Tests for ``--status``: the option (loopback unless an interface is named,
a bad description refused in one line) and the backend probe behind
``/ready`` (bounded, shared, remembered for a second), on a memory reactor.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from connect_native.terminator import Options, Settings
from connect_native.terminator.status import PROBE_REMEMBERED, BackendProbe

BASE = ["--service", "web", "--to", "tcp:127.0.0.1:8080"]


@pytest.fixture(autouse=True)
def no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


def parse(*args: str) -> Settings:
    options = Options()
    options.parseOptions(list(args))
    assert options.settings is not None
    return options.settings


def test_no_status_listener_by_default() -> None:
    assert parse(*BASE).status is None


@pytest.mark.parametrize(
    ("given", "listen"),
    [
        ("tcp:9102", "tcp:9102:interface=127.0.0.1"),
        ("9102", "tcp:9102:interface=127.0.0.1"),
        ("tcp6:9102", "tcp6:9102:interface=\\:\\:1"),
        ("tcp:9102:interface=0.0.0.0", "tcp:9102:interface=0.0.0.0"),
        ("unix:/run/cn-status.sock", "unix:/run/cn-status.sock"),
    ],
)
def test_status_binds_loopback_unless_it_names_an_interface(
    given: str, listen: str
) -> None:
    assert parse(*BASE, "--status", given).status == listen


def test_a_bad_status_endpoint_is_refused_in_one_line() -> None:
    with pytest.raises(UsageError) as raised:
        parse(*BASE, "--status", "bogus:9102")
    message = str(raised.value)
    assert message.startswith("--status: 'bogus:9102' is not a server endpoint")
    assert "\n" not in message


# -- the backend probe ----------------------------------------------------------


def answers(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_a_backend_that_accepts_is_ready_and_the_probe_connection_closed() -> None:
    reactor = MemoryReactorClock()
    probe = BackendProbe(reactor, "tcp:127.0.0.1:8080", timeout=2)
    first, second = answers(probe()), answers(probe())
    # One connection for both requests.
    [(host, port, factory, _, _)] = reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 8080)
    assert first == second == []
    protocol = factory.buildProtocol(None)
    transport = _Transport()
    protocol.makeConnection(transport)
    assert first == second == [None]
    assert transport.closed


def test_the_answer_is_remembered_for_a_second() -> None:
    reactor = MemoryReactorClock()
    probe = BackendProbe(reactor, "tcp:127.0.0.1:8080", timeout=2)
    probe()
    _refuse(reactor, 0)
    reactor.advance(PROBE_REMEMBERED / 2)
    [again] = answers(probe())
    assert again is not None
    assert "unreachable" in again
    assert len(reactor.tcpClients) == 1
    reactor.advance(PROBE_REMEMBERED / 2)
    assert answers(probe()) == []
    assert len(reactor.tcpClients) == 2


def test_a_refused_connect_is_the_reason() -> None:
    reactor = MemoryReactorClock()
    probe = BackendProbe(reactor, "tcp:127.0.0.1:8080", timeout=2)
    got = answers(probe())
    _refuse(reactor, 0)
    [reason] = got
    assert reason.startswith("the backend tcp:127.0.0.1:8080 is unreachable: ")
    assert "refused" in reason.lower()


def test_a_connect_that_hangs_is_bounded() -> None:
    reactor = MemoryReactorClock()
    probe = BackendProbe(reactor, "tcp:127.0.0.1:8080", timeout=2)
    got = answers(probe())
    reactor.advance(1.9)
    assert got == []
    reactor.advance(0.1)
    assert got == [
        "the backend tcp:127.0.0.1:8080 is unreachable: no connection within 2s"
    ]


class _Transport:
    closed = False

    def loseConnection(self) -> None:
        self.closed = True

    def getPeer(self) -> None:
        return None

    def getHost(self) -> None:
        return None


def _refuse(reactor: MemoryReactorClock, index: int) -> None:
    from twisted.internet.error import ConnectionRefusedError

    factory = reactor.tcpClients[index][2]
    connector = reactor.connectors[index]
    factory.clientConnectionFailed(
        connector, Failure(ConnectionRefusedError("connection refused"))
    )
