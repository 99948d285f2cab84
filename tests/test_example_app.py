"""
The example app of ``docs/web.rst`` (``docs/examples/klein_app.py``), run for
real: the development agent over TCP on 127.0.0.1, the example's ``web``
served from its ``connect:`` endpoint description with ``register=yes``, an
upstream Connect service ``clock`` it calls with the treq client, and callers
with their own certificates, all on the real reactor and real sockets.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

import connect_native.http
from connect_native.consul.client import ConsulClient
from connect_native.errors import ServiceRefused
from tests.agents import AgentUnderTest, serve_dev_agent

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "klein_app.py"

#: Bound on anything the agent does in the background (registration, the
#: intentions' blocking read); on a quiet machine it takes milliseconds.
BOUND = 15.0


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("klein_app_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def eventually(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + BOUND
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {BOUND:g}s: {what}")
        await deferLater(reactor, 0.05, lambda: None)


class Now(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"12:00\n"


def escaped(address: str) -> str:
    return address.replace(":", "\\:")


@pytest_twisted.async_yield_fixture
async def agent() -> AsyncIterator[AgentUnderTest]:
    served = serve_dev_agent()
    yield served
    await served.close()


@pytest_twisted.ensureDeferred
async def test_the_example_app_serves_calls_upstream_and_authorizes_each_request(
    agent: AgentUnderTest,
) -> None:
    consul = agent.client
    allow_frontend = await consul.create_intention("frontend", "web", "allow")
    await consul.create_intention("web", "clock", "allow")
    await consul.create_intention("*", "web", "deny")
    opened: list[Any] = []
    try:
        # The upstream: another Connect service, served the same way.
        clock = serverFromString(
            reactor,
            f"connect:clock:port=0:interface=127.0.0.1:"
            f"consul={escaped(agent.address)}:register=yes",
        )
        opened.append(await clock.listen(Site(Now())))

        example = load_example()
        port, web_http = await example.serve(
            reactor,
            f"connect:web:port=0:interface=127.0.0.1:"
            f"consul={escaped(agent.address)}:authorize=intentions:register=yes",
        )
        opened += [port, web_http]

        async def healthy(service: str) -> bool:
            answer = await agent.http.get(f"/v1/health/connect/{service}?passing=1")
            return answer.status == 200 and len(answer.json()) == 1

        await eventually("web is registered and passing", lambda: healthy("web"))
        await eventually("clock is registered and passing", lambda: healthy("clock"))

        caller = ConsulClient(reactor, address=agent.address, timeout=BOUND)
        frontend = connect_native.http.client(
            "frontend", reactor=reactor, consul=caller
        )
        stranger = connect_native.http.client(
            "stranger", reactor=reactor, consul=caller
        )
        opened += [frontend, stranger]

        # The caller's identity, as the handshake proved it.
        hello = await frontend.get("https://web.service.consul/hello")
        assert (hello.code, await hello.text()) == (200, "hello, frontend\n")

        # web calls clock over Connect as itself.
        now = await frontend.get("https://web.service.consul/time")
        assert (now.code, await now.text()) == (200, "clock says 12:00\n")

        # No intention for "stranger" but "* -> web deny": no connection.
        # The client says the service refused it, naming the TLS alert.
        with pytest.raises(ServiceRefused) as refused:
            await stranger.get("https://web.service.consul/hello")
        assert refused.value.alert == "internal error"
        assert any(r.check(ServiceRefused) for r in refused.value.reasons)

        # Deny frontend now: its open connection is closed once the
        # authorizer's blocking read brings the change (issue 15, item 5),
        # and a new one is refused in the handshake.
        await consul.delete_intention(allow_frontend)
        await consul.create_intention("frontend", "web", "deny")

        async def refused_now() -> bool:
            try:
                response = await frontend.get("https://web.service.consul/hello")
                await response.content()
            except (ServiceRefused, ResponseNeverReceived):
                # A new connection is refused; the open one is closed.
                return True
            return False

        await eventually("frontend is refused", refused_now)
    finally:
        for thing in reversed(opened):
            if hasattr(thing, "stopListening"):
                await thing.stopListening()
            else:
                await thing.close()
