"""
``twistd -n connect-native`` as a real process against a real Consul 1.8.7
agent (and the development agent), for issue 17's items 4 and 6: the
registered check follows the backend (``--to``), ``--tag`` and ``--meta``
reach the catalog, and ``--log-format json`` makes every line of the
process a JSON object.
"""

from __future__ import annotations

import json
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from connect_native.consul.client import ConsulClient
from connect_native.consul.records import HealthEntry
from connect_native.tls import ClientConnectionCreator
from tests.consul_agent import RealConsulAgent, free_ports
from tests.test_terminator_real import (
    Backend,
    Caller,
    Process,
    Setup,
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


async def instances(consul: ConsulClient, service: str) -> tuple[HealthEntry, ...]:
    found = await bounded(consul.health_connect(service, passing=False))
    return found.value


async def until_passing(
    consul: ConsulClient, service: str, passing: bool, seconds: float
) -> HealthEntry:
    """
    Poll (bounded by ``seconds``) until the one instance of ``service`` is
    passing, or is not; returns it.
    """
    deadline = time.monotonic() + seconds
    last: tuple[HealthEntry, ...] = ()
    while True:
        last = await instances(consul, service)
        if len(last) == 1 and last[0].passing == passing:
            return last[0]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{service} never became {'passing' if passing else 'not passing'}"
                f" within {seconds:g}s: {last!r}"
            )
        await pause(0.2)


def own_check(entry: HealthEntry) -> Any:
    (check,) = [c for c in entry.checks if c.check_id.endswith(":ttl")]
    return check


@pytest_twisted.ensureDeferred
async def test_the_check_follows_the_backend_and_logs_are_json_lines(
    real_consul: RealConsulAgent, tmp_path: Path
) -> None:
    """
    With the default ``--to-check tcp``: the instance is passing while the
    backend listens, leaves ``?passing`` within 30 s of the backend going
    away (the process still running), and comes back when it listens
    again; its tags and metadata are the ``--tag`` and ``--meta`` given.
    With ``--log-format json`` every output line is a JSON object with
    ``timestamp``, ``level`` and ``message`` (twistd's own lines included),
    an allowed connection's line has the structured fields, and Twisted's
    per-factory lines are not there.
    """
    consul = ConsulClient(reactor, address=real_consul.http_address)
    prefix = f"health-{uuid.uuid4().hex[:8]}"
    started = Setup(
        real_consul,
        prefix,
        tmp_path,
        (
            "--log-format",
            "json",
            "--tag",
            "blue",
            "--tag",
            "v2",
            "--meta",
            "version=1.2",
            "--deregister-critical-after",
            "10m",
        ),
        to_check=None,
    )
    backend_port = started.backend_port.getHost().port
    try:
        await bounded(
            deferToThread(started.process.wait_for_line, "accepting Connect", 60),
            70,
        )
        entry = await until_passing(consul, started.web, True, 30)
        assert entry.service.tags == ("blue", "v2")
        assert dict(entry.service.meta) == {"version": "1.2"}
        assert f"{backend_port} accepts connections" in own_check(entry).output

        bundle = await client_bundle(consul, f"{started.web}-api")
        creator = ClientConnectionCreator(bundle, web_identity(bundle, started.web))
        sent, got = await call(started.public, creator, Caller(b"hello"))
        assert got == sent == b"hello"
        allowed = await log_line(started.process, '"outcome": "allowed"')

        # The backend goes away; the terminator keeps running.
        await started.backend_port.stopListening()
        entry = await until_passing(consul, started.web, False, 30)
        assert started.process.process.poll() is None
        check = own_check(entry)
        assert check.status == "critical"
        assert "backend" in check.output
        assert "refused" in check.output.lower()

        # It comes back on the same port: so does the instance.
        started.backend_port = reactor.listenTCP(  # type: ignore[attr-defined]
            backend_port,
            Factory.forProtocol(lambda: Backend(started.received)),
            interface="127.0.0.1",
        )
        await until_passing(consul, started.web, True, 30)
    finally:
        code = started.process.stop()
        started.backend_port.stopListening()
        await consul.close()
    assert code in (0, -signal.SIGTERM), started.process.output()

    events = [json.loads(line) for line in started.process.lines if line.strip()]
    for event in events:
        assert {"timestamp", "level", "message"} <= event.keys(), event
    messages = [e["message"] for e in events]
    assert any(m.startswith("twistd ") and "starting up" in m for m in messages)
    assert not any("Starting factory" in m or "Stopping factory" in m for m in messages)
    decision = json.loads(allowed)
    assert decision["service"] == started.web
    assert decision["peer_identity"] == bundle.identity.uri
    assert re.fullmatch(r"127\.0\.0\.1:\d+", decision["peer_address"])
    assert decision["outcome"] == "allowed"
    assert decision["reason"]
    assert isinstance(decision["duration"], float)
    down = [e for e in events if e["message"].startswith("connect-native: backend")]
    assert [e["state"] for e in down] == ["up", "down", "up"]


@pytest_twisted.ensureDeferred
async def test_twisteds_factory_lines_stay_out_while_the_agent_is_down(
    tmp_path: Path,
) -> None:
    """
    The measured case: with no agent at ``--consul``, the default text log
    says why it cannot start its certificates, without a ``Starting
    factory`` / ``Stopping factory`` pair for every attempt.
    """
    (nobody,) = free_ports(1)
    process = Process(
        [
            "connect-native",
            "--service",
            "lonely",
            "--listen",
            f"tcp:{free_ports(1)[0]}:interface=127.0.0.1",
            "--to",
            "tcp:127.0.0.1:9",
            "--consul",
            f"http://127.0.0.1:{nobody}",
        ],
        tmp_path,
    )
    try:
        # Several attempts at the agent (its back-off starts at a second).
        deadline = time.monotonic() + 30
        while sum("127.0.0.1:" + str(nobody) in line for line in process.lines) < 3:
            assert time.monotonic() < deadline, process.output()
            await pause(0.2)
    finally:
        process.stop()
    output = process.output()
    assert "starting up" in output
    assert "Starting factory" not in output
    assert "Stopping factory" not in output


class Healthz(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(self.code if request.path == b"/healthz" else 404)
        return b"ok\n"


@pytest_twisted.ensureDeferred
async def test_an_http_health_path_on_the_development_agent(tmp_path: Path) -> None:
    """
    ``--to-check http:/healthz --check-interval 1`` with ``--dev``: the
    development agent shows the instance passing while ``/healthz`` answers
    200, not passing while it answers 503 (the reason in the check's
    output), and passing again after; the tags and metadata are stored and
    returned as the real agent does.
    """
    health = Healthz()
    backend: Any = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Site(health), interface="127.0.0.1"
    )
    (public,) = free_ports(1)
    process = Process(
        [
            "connect-native",
            "--dev",
            "--service",
            "web",
            "--listen",
            f"tcp:{public}:interface=127.0.0.1",
            "--to",
            f"tcp:127.0.0.1:{backend.getHost().port}",
            "--to-check",
            "http:/healthz",
            "--check-interval",
            "1",
            "--tag",
            "blue",
            "--meta",
            "version=1.2",
        ],
        tmp_path,
    )
    consul: ConsulClient | None = None
    try:
        found = await bounded(
            deferToThread(
                process.wait_for_line, r"CONSUL_HTTP_ADDR=(127\.0\.0\.1:\d+)", 60
            ),
            70,
        )
        consul = ConsulClient(reactor, address=found.group(1))
        entry = await until_passing(consul, "web", True, 30)
        assert entry.service.tags == ("blue",)
        assert dict(entry.service.meta) == {"version": "1.2"}
        assert "GET /healthz on" in own_check(entry).output

        health.code = 503
        entry = await until_passing(consul, "web", False, 30)
        assert "answered 503, not 2xx" in own_check(entry).output
        assert process.process.poll() is None

        health.code = 200
        await until_passing(consul, "web", True, 30)
    finally:
        process.stop()
        await backend.stopListening()
        if consul is not None:
            await consul.close()
