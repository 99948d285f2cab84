"""
Signals to ``twistd -n connect-native`` as a real process, against a real
Consul 1.8.7 agent (issue 17, item 3): SIGHUP reloads the token file, the
log level file, the allow-ids file (in the workers too) and the terminator
goes on serving; SIGUSR1 is logged and ignored; SIGTERM deregisters the
instance first, stops accepting, lets an open connection finish, and the
process exits 0.
"""

from __future__ import annotations

import signal
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from connect_native.consul.client import ConsulClient
from connect_native.tls import ClientConnectionCreator
from tests.consul_agent import RealConsulAgent, free_ports
from tests.test_terminator_real import (
    Backend,
    Caller,
    Process,
    bounded,
    call,
    client_bundle,
    log_line,
    web_identity,
)


async def pause(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    await d


async def until(check: Any, what: str, seconds: float = 20.0) -> None:
    """Poll ``check()`` (async) on the reactor until true, with a deadline."""
    for _ in range(int(seconds / 0.1)):
        if await check():
            return
        await pause(0.1)
    raise AssertionError(f"never: {what}")


class Terminator:
    def __init__(
        self, agent: RealConsulAgent, work: Path, web: str, *extra: str
    ) -> None:
        self.web = web
        self.received: list[Backend] = []
        self.backend: Any = reactor.listenTCP(  # type: ignore[attr-defined]
            0,
            Factory.forProtocol(lambda: Backend(self.received)),
            interface="127.0.0.1",
        )
        [self.public] = free_ports(1)
        self.process = Process(
            [
                "connect-native",
                "--service",
                web,
                "--listen",
                f"tcp:{self.public}:interface=127.0.0.1",
                "--to",
                f"tcp:127.0.0.1:{self.backend.getHost().port}",
                "--consul",
                f"http://{agent.http_address}",
                *extra,
            ],
            work,
        )

    def signal(self, number: int) -> None:
        self.process.process.send_signal(number)

    async def exited(self, seconds: float = 30.0) -> int:
        for _ in range(int(seconds / 0.05)):
            code = self.process.process.poll()
            if code is not None:
                return code
            await pause(0.05)
        raise AssertionError(f"twistd still running:\n{self.process.output()}")


async def answer(port: int, creator: ClientConnectionCreator) -> bytes:
    _sent, got = await call(port, creator, Caller(b"hello"))
    return bytes(got)


@pytest_twisted.ensureDeferred
async def test_sighup_and_sigusr1_do_not_kill_the_terminator(
    real_consul: RealConsulAgent, tmp_path: Path
) -> None:
    # Their default action killed it at once: nothing logged, not
    # deregistered, the instance left passing until its TTL ran out.
    consul = ConsulClient(reactor, address=real_consul.http_address)
    web = f"usr-{uuid.uuid4().hex[:8]}-web"
    started = Terminator(real_consul, tmp_path, web)
    try:
        await log_line(started.process, "is passing", seconds=60)
        bundle = await client_bundle(consul, f"{web}-api")
        creator = ClientConnectionCreator(bundle, web_identity(bundle, web))
        started.signal(signal.SIGHUP)
        await log_line(started.process, "SIGHUP: nothing to reload")
        assert await answer(started.public, creator) == b"hello"
        started.signal(signal.SIGUSR1)
        await log_line(started.process, "SIGUSR1: nothing to do")
        assert await answer(started.public, creator) == b"hello"
        assert started.process.process.poll() is None
    finally:
        started.signal(signal.SIGTERM)
        code = await started.exited()
        started.backend.stopListening()
        await consul.close()
    assert code == 0, started.process.output()


@pytest_twisted.ensureDeferred
async def test_after_sighup_the_terminator_reloads_and_still_serves(
    real_consul: RealConsulAgent, tmp_path: Path
) -> None:
    consul = ConsulClient(reactor, address=real_consul.http_address)
    web = f"hup-{uuid.uuid4().hex[:8]}-web"
    first = await client_bundle(consul, f"{web}-first")
    second = await client_bundle(consul, f"{web}-second")
    as_first = ClientConnectionCreator(first, web_identity(first, web))
    as_second = ClientConnectionCreator(second, web_identity(second, web))
    allowed = tmp_path / "allowed"
    allowed.write_text(f"# who may call {web}\n{first.identity.uri}\n")
    token = tmp_path / "token"
    token.write_text("first-token\n")
    level = tmp_path / "level"
    level.write_text("info\n")
    started = Terminator(
        real_consul,
        tmp_path,
        web,
        "--authorize",
        "allow-ids",
        "--allow-ids-file",
        str(allowed),
        "--token-file",
        str(token),
        "--log-level-file",
        str(level),
        "--workers",
        "2",
    )
    try:
        await log_line(started.process, "2 worker processes share port", seconds=60)

        async def both_accepting() -> bool:
            lines = list(started.process.lines)
            return sum("accepting Connect" in line for line in lines) == 2

        await until(both_accepting, "the worker accepting", 60)
        for _ in range(4):
            assert await answer(started.public, as_first) == b"hello"
            assert await answer(started.public, as_second) == b""

        allowed.write_text(f"{second.identity.uri}  # first is gone\n")
        token.write_text("second-token\n")
        level.write_text("debug\n")
        started.signal(signal.SIGHUP)
        await log_line(started.process, "SIGHUP: a new ACL token from", str(token))
        await log_line(started.process, "SIGHUP: 1 IDs allowed now")
        await log_line(started.process, "SIGHUP: log level debug", "info before")
        await log_line(started.process, "SIGHUP passed on to 1 workers")

        async def both_reloaded() -> bool:
            lines = [
                line
                for line in list(started.process.lines)
                if "SIGHUP: 1 IDs allowed now" in line
            ]
            return len(lines) == 2

        # The worker reloaded its own copy of the file.
        await until(both_reloaded, "the worker reloaded the allowed IDs")
        # Spread over both processes by SO_REUSEPORT: each decides anew.
        for _ in range(4):
            assert await answer(started.public, as_second) == b"hello"
            assert await answer(started.public, as_first) == b""

        # A file that cannot be used keeps what is in use.
        allowed.write_text("not a spiffe id\n")
        started.signal(signal.SIGHUP)
        line = await log_line(started.process, "kept the allowed IDs in use")
        assert "line 1" in line
        assert await answer(started.public, as_second) == b"hello"

        started.signal(signal.SIGUSR1)
        await log_line(started.process, "SIGUSR1: nothing to do")
        assert await answer(started.public, as_second) == b"hello"
        assert started.process.process.poll() is None
    finally:
        started.signal(signal.SIGTERM)
        code = await started.exited()
        started.backend.stopListening()
        await consul.close()
    output = started.process.output()
    assert code == 0, output
    assert "Traceback" not in output


class Held(Protocol):
    """A Connect connection kept open: echoes come back one at a time."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost.callback(None)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest_twisted.ensureDeferred
async def test_after_sigterm_the_instance_is_gone_and_open_connections_finish(
    real_consul: RealConsulAgent, tmp_path: Path
) -> None:
    consul = ConsulClient(reactor, address=real_consul.http_address)
    web = f"term-{uuid.uuid4().hex[:8]}-web"
    started = Terminator(real_consul, tmp_path, web, "--shutdown-timeout", "30")
    try:
        await log_line(started.process, "is passing", seconds=60)

        async def instances() -> int:
            entries = (await bounded(consul.health_connect(web))).value
            return len(entries)

        await until(lambda: _is(instances, 1), "the instance passing")
        bundle = await client_bundle(consul, f"{web}-api")
        creator = ClientConnectionCreator(bundle, web_identity(bundle, web))
        held = Held()
        endpoint = wrapClientTLS(
            creator,
            TCP4ClientEndpoint(reactor, "127.0.0.1", started.public, timeout=10),
        )
        await bounded(connectProtocol(endpoint, held))
        held.transport.write(b"before")  # type: ignore[union-attr]
        await until(lambda: _true(held.received == b"before"), "the first echo")

        started.signal(signal.SIGTERM)
        await log_line(started.process, "SIGTERM: deregistering")
        await until(lambda: _is(instances, 0), "the instance gone from health")
        await log_line(started.process, "draining 1 open connections")
        assert refused(started.public)
        # The open connection still works while the terminator drains.
        held.transport.write(b" during")  # type: ignore[union-attr]
        await until(
            lambda: _true(held.received == b"before during"), "the echo while draining"
        )
        assert started.process.process.poll() is None
        held.transport.loseConnection()  # type: ignore[union-attr]
        await bounded(held.lost)
        code = await started.exited()
    finally:
        if started.process.process.poll() is None:
            started.process.stop()
        started.backend.stopListening()
        await consul.close()
    output = started.process.output()
    assert code == 0, output
    assert output.index("deregistered") < output.index("stopped accepting on public")
    assert "aborted" not in output
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_a_second_sigterm_aborts_the_drain_and_the_process_exits_0(
    real_consul: RealConsulAgent, tmp_path: Path
) -> None:
    consul = ConsulClient(reactor, address=real_consul.http_address)
    web = f"again-{uuid.uuid4().hex[:8]}-web"
    started = Terminator(real_consul, tmp_path, web, "--shutdown-timeout", "300")
    try:
        await log_line(started.process, "is passing", seconds=60)
        bundle = await client_bundle(consul, f"{web}-api")
        creator = ClientConnectionCreator(bundle, web_identity(bundle, web))
        held = Held()
        endpoint = wrapClientTLS(
            creator,
            TCP4ClientEndpoint(reactor, "127.0.0.1", started.public, timeout=10),
        )
        await bounded(connectProtocol(endpoint, held))
        held.transport.write(b"hello")  # type: ignore[union-attr]
        await until(lambda: _true(held.received == b"hello"), "the echo")
        started.signal(signal.SIGTERM)
        await log_line(started.process, "draining 1 open connections")
        started.signal(signal.SIGTERM)
        await log_line(started.process, "SIGTERM while stopping: aborting the 1")
        await bounded(held.lost)
        code = await started.exited()
    finally:
        if started.process.process.poll() is None:
            started.process.stop()
        started.backend.stopListening()
        await consul.close()
    output = started.process.output()
    assert code == 0, output
    assert "Traceback" not in output


async def _is(count: Any, wanted: int) -> bool:
    return bool(await count() == wanted)


async def _true(value: bool) -> bool:
    return value
