"""
``python -m connect_native.devagent`` serves the agent on 127.0.0.1, logs
what it does to stdout and stops cleanly on SIGINT and SIGTERM.  These run
the real process on the real reactor; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

REPO = Path(__file__).parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
REQUEST_TIMEOUT = 10.0


class _AgentProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred[int] = defer.Deferred()
        self._listening: list[defer.Deferred[int]] = []
        self.port: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", self.output)
        if match and self.port is None:
            self.port = int(match.group(1))
            for waiter in self._listening:
                waiter.callback(self.port)

    errReceived = outReceived

    def listening(self) -> defer.Deferred[int]:
        d: defer.Deferred[int] = defer.Deferred()
        if self.port is not None:
            d.callback(self.port)
        else:
            self._listening.append(d)
        return d

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            self.ended.callback(0)
        elif isinstance(value, ProcessTerminated):
            self.ended.callback(
                value.exitCode if value.exitCode is not None else -(value.signal or 0)
            )
        else:
            self.ended.errback(reason)


def _bounded(d: defer.Deferred[Any], seconds: float, what: str) -> defer.Deferred[Any]:
    from twisted.internet import reactor

    def too_late(result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            raise AssertionError(f"{what} took more than {timeout} s")
        return result

    return d.addTimeout(seconds, reactor, onTimeoutCancel=too_late)


def _request(method: str, port: int, path: str, what: str, **kwargs: Any) -> Any:
    """One bounded request to the agent on 127.0.0.1:``port``."""
    d = treq.request(method, f"http://127.0.0.1:{port}{path}", **kwargs)
    return _bounded(d, REQUEST_TIMEOUT, what)


def _spawn(*args: str) -> tuple[_AgentProcess, Any]:
    from twisted.internet import reactor

    agent = _AgentProcess()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        agent,
        sys.executable,
        [sys.executable, "-m", "connect_native.devagent", *args],
        env=env,
        path=str(REPO),
    )
    return agent, transport


async def _stop(agent: _AgentProcess, transport: Any, sig: str) -> int:
    transport.signalProcess(sig)
    code: int = await _bounded(agent.ended, STOP_TIMEOUT, f"stopping on SIG{sig}")
    return code


@pytest.mark.parametrize("sig", ["TERM", "INT"])
@pytest_twisted.ensureDeferred
async def test_serves_logs_and_stops_on_signal(sig: str) -> None:
    agent, transport = _spawn("--port", "0")
    try:
        port = await _bounded(agent.listening(), START_TIMEOUT, "starting")
        response = await _request(
            "GET", port, "/v1/agent/connect/ca/leaf/web", "the leaf request"
        )
        assert response.code == 200
        leaf = await response.json()
        assert leaf["Service"] == "web"
        assert response.headers.getRawHeaders(b"X-Cache") == [b"MISS"]
        # a blocking request still in flight does not keep it from stopping
        roots = await _request(
            "GET", port, "/v1/agent/connect/ca/roots", "the roots request"
        )
        index = roots.headers.getRawHeaders(b"X-Consul-Index")[0].decode()
        await roots.content()
        blocked = treq.get(
            f"http://127.0.0.1:{port}/v1/agent/connect/ca/roots?index={index}"
        )
        blocked.addErrback(lambda f: None)
        code = await _stop(agent, transport, sig)
    finally:
        if agent.ended.called is False:
            transport.signalProcess("KILL")
    assert code == 0, agent.output.decode()
    output = agent.output.decode()
    assert "GET /v1/agent/connect/ca/leaf/web -> 200" in output
    assert "issued leaf" in output
    assert "development agent stopped" in output
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_listens_on_127_0_0_1_only() -> None:
    agent, transport = _spawn("--port", "0")
    try:
        port = await _bounded(agent.listening(), START_TIMEOUT, "starting")
        # It holds 127.0.0.1:port ...
        with socket.socket() as probe, pytest.raises(OSError, match="in use"):
            probe.bind(("127.0.0.1", port))
        # ... and nothing else: a wildcard listener would hold 127.0.0.2 too.
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", port))
    finally:
        if not agent.ended.called:
            await _stop(agent, transport, "TERM")


@pytest_twisted.ensureDeferred
async def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        agent, transport = _spawn("--port", str(port))
        try:
            code = await _bounded(agent.ended, START_TIMEOUT, "refusing the port")
        finally:
            if not agent.ended.called:
                transport.signalProcess(signal.SIGKILL)
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in agent.output.decode()
    assert "choose another --port" in agent.output.decode()


@pytest_twisted.ensureDeferred
async def test_consul_version_serves_the_newer_api() -> None:
    agent, transport = _spawn("--port", "0", "--consul-version", "1.10.0")
    try:
        port = await _bounded(agent.listening(), START_TIMEOUT, "starting")
        self_info = await _request("GET", port, "/v1/agent/self", "agent/self")
        assert (await self_info.json())["Config"]["Version"] == "1.10.0"
        # 1.9+ only: a service-intentions config entry with L7 permissions.
        entry = {
            "Kind": "service-intentions",
            "Name": "web",
            "Sources": [
                {
                    "Name": "api",
                    "Permissions": [
                        {"Action": "allow", "HTTP": {"PathPrefix": "/public"}}
                    ],
                }
            ],
        }
        written = await _request(
            "PUT", port, "/v1/config", "the config write", json=entry
        )
        assert written.code == 200, await written.text()
        assert "Consul 1.10.0 API" in agent.output.decode()
    finally:
        if not agent.ended.called:
            await _stop(agent, transport, "TERM")


@pytest_twisted.ensureDeferred
async def test_a_bad_consul_version_is_a_clear_error() -> None:
    agent, transport = _spawn("--port", "0", "--consul-version", "1.2")
    try:
        code = await _bounded(agent.ended, START_TIMEOUT, "refusing the version")
    finally:
        if not agent.ended.called:
            transport.signalProcess(signal.SIGKILL)
    assert code == 2
    output = agent.output.decode()
    assert "version must be a Consul version from 1.8.7 on" in output
    assert "Traceback" not in output
