"""
L7 intentions from outside, as a user runs the programs.  The development
agent runs as Consul 1.10 (``python -m connect_native.devagent
--consul-version 1.10.0``) and holds "api may only ``GET /public`` on web";
``twistd connect-native --authorize intentions`` and ``twistd web --listen
connect:...:authorize=intentions`` (a site without ``protect()``) decide per
connection only, so they must refuse ``api`` whatever it asks, log how to
get L7, and what they serve must see nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory

from connect_native.consul.client import ConsulClient
from tests.consul_agent import free_ports
from tests.test_devagent_main import START_TIMEOUT, _bounded, _request, _spawn, _stop
from tests.test_endpoints_real import escaped, get, registered, until
from tests.test_terminator_real import Backend, Process, log_line

L7_INTENTION = {
    "Kind": "service-intentions",
    "Name": "web",
    "Sources": [
        {
            "Name": "api",
            "Permissions": [
                {
                    "Action": "allow",
                    "HTTP": {"PathPrefix": "/public", "Methods": ["GET"]},
                }
            ],
        }
    ],
}


async def dev_agent_holding(entry: dict[str, Any]) -> AsyncIterator[int]:
    """
    The port of a development agent as Consul 1.10 holding the config
    ``entry`` (service-intentions with L7 permissions), stopped afterwards.
    """
    agent, transport = _spawn("--port", "0", "--consul-version", "1.10.0")
    try:
        port: int = await _bounded(agent.listening(), START_TIMEOUT, "starting")
        response = await _request(
            "PUT", port, "/v1/config", "the config entry", json=entry
        )
        assert response.code == 200, await response.text()
        yield port
    finally:
        if not agent.ended.called:
            await _stop(agent, transport, "TERM")


@pytest_twisted.async_yield_fixture
async def agent_port() -> AsyncIterator[int]:
    """A development agent as Consul 1.10 holding the L7 intention."""
    async for port in dev_agent_holding(L7_INTENTION):
        yield port


async def web_registered(agent_port: int) -> None:
    """Wait (at most 60 s) until ``web`` is registered and passing."""
    consul = ConsulClient(reactor, address=f"127.0.0.1:{agent_port}")
    try:
        await until(registered(consul, "web"), 60, "web registered and passing")
    finally:
        await consul.close()


async def refused_as_api(agent_port: int, path: bytes) -> None:
    """``api`` reaches ``web`` once it is registered, and is refused."""
    await web_registered(agent_port)
    dial = clientFromString(
        reactor, f"connect:web:source=api:consul={escaped(f'127.0.0.1:{agent_port}')}"
    )
    try:
        with pytest.raises(Exception) as raised:  # noqa: PT011 (refused is all we know)
            await get(dial, path)
    finally:
        dial.close()
    assert not isinstance(raised.value, AssertionError)


@pytest_twisted.ensureDeferred
async def test_the_terminator_refuses_a_caller_under_an_l7_intention(
    agent_port: int, tmp_path: Path
) -> None:
    received: list[Any] = []
    backend: Any = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Factory.forProtocol(lambda: Backend(received)), interface="127.0.0.1"
    )
    [port] = free_ports(1)
    process = Process(
        [
            "connect-native",
            "--service",
            "web",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--to",
            f"tcp:127.0.0.1:{backend.getHost().port}",
            "--consul",
            f"http://127.0.0.1:{agent_port}",
            "--authorize",
            "intentions",
            # The backend must see no connection at all: no health probes.
            "--to-check",
            "none",
        ],
        tmp_path,
    )
    try:
        await log_line(process, "accepting Connect", seconds=60)
        await refused_as_api(agent_port, b"/admin/users")
        line = await log_line(process, "denied", "spiffe://", "/svc/api", "protect()")
        assert "from IPv4Address" in line
        assert received == []
    finally:
        process.stop()
        await backend.stopListening()


@pytest_twisted.ensureDeferred
async def test_twistd_web_without_protect_refuses_a_caller_under_an_l7_intention(
    agent_port: int, tmp_path: Path
) -> None:
    docroot = tmp_path / "www"
    (docroot / "admin").mkdir(parents=True)
    (docroot / "admin" / "secret.txt").write_text("the secret\n")
    [port] = free_ports(1)
    agent = escaped(f"127.0.0.1:{agent_port}")
    process = Process(
        [
            "web",
            "--listen",
            f"connect:web:port={port}:interface=127.0.0.1:register=yes"
            f":consul={agent}:authorize=intentions",
            "--path",
            str(docroot),
        ],
        tmp_path,
    )
    try:
        await refused_as_api(agent_port, b"/admin/secret.txt")
        await log_line(process, "denied", "/svc/api", "protect()")
        assert "the secret" not in process.output()
        assert '"GET /admin/secret.txt' not in process.output()
    finally:
        process.stop()
