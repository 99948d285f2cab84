"""
``twistd connect-native --status`` as a real process against a real Consul
1.8.7 agent, on 127.0.0.1: ``/ready`` answers 200 once the terminator
serves, ``/metrics`` parses with prometheus_client's parser and counts an
allowed connection and the certificate's expiry, ``/status`` describes the
certificate, and ``/ready`` turns 503 with the reason when the backend goes.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from connect_native.consul.client import ConsulClient
from connect_native.tls import ClientConnectionCreator
from tests.consul_agent import RealConsulAgent, free_ports
from tests.test_terminator_real import (
    Caller,
    Setup,
    bounded,
    call,
    client_bundle,
    web_identity,
)


async def get(port: int, path: str) -> tuple[int, str]:
    response = await bounded(
        treq.get(f"http://127.0.0.1:{port}{path}", timeout=10, persistent=False), 15
    )
    body = await bounded(treq.text_content(response), 15)
    return response.code, body


async def pause(seconds: float) -> None:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    await d


async def until(port: int, path: str, code: int, seconds: float = 30.0) -> str:
    """Polls ``path`` until it answers ``code`` (a deadline, not a timing)."""
    deadline = time.monotonic() + seconds
    while True:
        got, body = await get(port, path)
        if got == code:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} still answers {got}: {body}")
        await pause(0.1)


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for each in family.samples:
            if each.name == name and all(
                each.labels.get(k) == v for k, v in labels.items()
            ):
                total += each.value
                found = True
    assert found, f"no {name}{labels} in:\n{text}"
    return total


@pytest.fixture
def consul(real_consul: RealConsulAgent) -> ConsulClient:
    return ConsulClient(reactor, address=real_consul.http_address)


@pytest_twisted.ensureDeferred
async def test_status_ready_metrics_and_the_backend_going_away(
    real_consul: RealConsulAgent, consul: ConsulClient, tmp_path: Path
) -> None:
    prefix = f"stat-{uuid.uuid4().hex[:8]}"
    [status] = free_ports(1)
    started = Setup(real_consul, prefix, tmp_path, ("--status", f"tcp:{status}"))
    try:
        await bounded(deferToThread(started.process.wait_for_line, "accepting", 60))
        line = await bounded(
            deferToThread(started.process.wait_for_line, "status pages", 10)
        )
        # Loopback, since the endpoint names no interface.
        assert f"http://127.0.0.1:{status}" in line.string
        assert await until(status, "/ready", 200) == "ready\n"

        bundle = await client_bundle(consul, f"{started.web}-api")
        creator = ClientConnectionCreator(bundle, web_identity(bundle, started.web))
        message = b"through the terminator\n" * 100
        sent, got = await call(started.public, creator, Caller(message))
        assert got == sent == message

        code, text = await get(status, "/metrics")
        assert code == 200
        allowed = sample(
            text,
            "connect_native_connections_total",
            service=started.web,
            outcome="allowed",
        )
        assert allowed >= 1
        expiry = sample(text, "connect_native_certificate_expiry_timestamp_seconds")
        assert expiry > time.time()
        assert sample(text, "connect_native_handshake_seconds_count") >= 1
        assert sample(text, "connect_native_authorization_seconds_count") >= 1
        forwarded = sample(text, "connect_native_bytes_total", direction="in")
        assert forwarded >= len(message)
        back = sample(text, "connect_native_bytes_total", direction="out")
        assert back >= len(message)
        sample(text, "connect_native_open_connections")
        sample(text, "connect_native_consul_errors_total")

        code, body = await get(status, "/status")
        assert code == 200
        page: dict[str, Any] = json.loads(body)
        assert page["service"] == started.web
        assert page["state"] == "ready"
        assert page["certificate"]["uri"].endswith(f"/svc/{started.web}")
        assert page["trust_domain"] == bundle.identity.trust_domain
        assert page["roots"]
        assert page["authorizer"]["type"] == "AgentAuthorizer"

        # The backend goes: /ready says so (once the last probe is stale).
        await started.backend_port.stopListening()
        body = await until(status, "/ready", 503)
        assert body.startswith("not ready: the backend tcp:127.0.0.1:")
        assert "unreachable" in body
    finally:
        code = started.process.stop()
        started.backend_port.stopListening()
        await consul.close()
    assert code in (0, -signal.SIGTERM), started.process.output()
