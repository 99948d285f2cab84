"""
``connect:`` endpoint strings against a real Consul 1.8.7 agent, on the real
reactor with real sockets on 127.0.0.1.

The point is the real thing: a twisted.web ``Site`` and a Klein app, given
only a ``connect:`` description, serve over mutual TLS with the agent's
certificates, register themselves with ``register=yes`` and deregister when
they stop; a client made by ``clientFromString`` finds them through the
agent's health API and fetches over HTTP/1.1.  Two tests run the programs as
a user would: ``twistd -n web --listen connect:...`` and a Klein app's
``app.run(endpoint_description="connect:...")``, each in its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from klein import Klein
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from twisted.web.static import File
from zope.interface import implementer

from connect_native.client import ConnectClientEndpoint, ConnectError
from connect_native.consul.client import ConsulClient
from connect_native.errors import ServiceRefused
from connect_native.http import client as connect_client
from connect_native.server import peer_identity
from tests.consul_agent import RealConsulAgent, free_ports

T = TypeVar("T")

SOURCE_TREE = Path(__file__).resolve().parent.parent
CONTENT = b"hello over connect\n"


def bounded(d: Deferred[T], seconds: float = 30.0) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


def escaped(address: str) -> str:
    """An address as an endpoint-string value: colons escaped."""
    return address.replace(":", "\\:")


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


@implementer(IAgentEndpointFactory)
class Only:
    """Every URI goes to one endpoint."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: Any) -> Any:
        return self.endpoint


async def get(endpoint: ConnectClientEndpoint, path: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 GET over ``endpoint``."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(reactor, Only(endpoint), pool=pool)
    response = await bounded(agent.request(b"GET", b"https://connect" + path), 20)
    body = await bounded(readBody(response), 20)
    return response.code, body


async def get_when_up(
    endpoint: ConnectClientEndpoint,
    path: bytes,
    seconds: float = 60.0,
    alive: Callable[[], None] = lambda: None,
) -> tuple[int, bytes]:
    """
    ``get`` once the server is registered and passing: until then the client
    finds no healthy instance.
    """
    deadline = reactor.seconds() + seconds
    while True:
        alive()
        try:
            return await get(endpoint, path)
        except ConnectError:
            if reactor.seconds() >= deadline:
                raise
        await sleep(0.2)


async def until(
    condition: Callable[[], Awaitable[bool]], seconds: float, what: str
) -> None:
    deadline = reactor.seconds() + seconds
    while not await condition():
        if reactor.seconds() >= deadline:
            raise AssertionError(f"{what}: not within {seconds}s")
        await sleep(0.2)


@pytest_twisted.async_yield_fixture
async def consul(real_consul: RealConsulAgent) -> Any:
    client = ConsulClient(reactor, address=real_consul.http_address)
    yield client
    await client.close()


def registered(consul: ConsulClient, service: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        entries = await bounded(consul.health_connect(service, passing=False), 10)
        return bool(entries.value)

    return check


def gone(consul: ConsulClient, service: str) -> Callable[[], Awaitable[bool]]:
    check = registered(consul, service)

    async def absent() -> bool:
        return not await check()

    return absent


@pytest.fixture
def decisions() -> Iterator[list[LogEvent]]:
    """The server's logged decisions."""
    events: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if "decision" in event and "target" in event and "peer" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def docroot(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_bytes(CONTENT)
    return root


# --- in this process -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_site_serves_a_file_to_a_connect_client(
    real_consul: RealConsulAgent,
    consul: ConsulClient,
    unique_name: str,
    docroot: Path,
) -> None:
    web, api = f"{unique_name}-web", f"{unique_name}-api"
    agent = escaped(real_consul.http_address)
    endpoint = serverFromString(
        reactor,
        f"connect:{web}:port=0:interface=127.0.0.1:register=yes:consul={agent}",
    )
    port = await bounded(endpoint.listen(Site(File(str(docroot)))), 40)
    dial = clientFromString(reactor, f"connect:{web}:source={api}:consul={agent}")
    try:
        assert await get_when_up(dial, b"/hello.txt") == (200, CONTENT)
    finally:
        dial.close()
        await bounded(port.stopListening())
    # Stopping the port deregistered the instance.
    assert await gone(consul, web)()


@pytest_twisted.ensureDeferred
async def test_a_klein_app_sees_the_callers_identity(
    real_consul: RealConsulAgent, consul: ConsulClient, unique_name: str
) -> None:
    """
    What ``Klein().run(endpoint_description=...)`` does, without blocking:
    ``serverFromString(reactor, description).listen(Site(app.resource()))``.
    """
    web, api = f"{unique_name}-web", f"{unique_name}-api"
    app = Klein()

    @app.route("/whoami")
    def whoami(request: Any) -> bytes:
        return peer_identity(request).service.encode()

    agent = escaped(real_consul.http_address)
    endpoint = serverFromString(
        reactor,
        f"connect:{web}:port=0:interface=127.0.0.1:register=yes:consul={agent}",
    )
    port = await bounded(endpoint.listen(Site(app.resource())), 40)
    dial = clientFromString(reactor, f"connect:{web}:source={api}:consul={agent}")
    try:
        assert await get_when_up(dial, b"/whoami") == (200, api.encode())
    finally:
        dial.close()
        await bounded(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_authorize_intentions_refuses_a_denied_caller(
    real_consul: RealConsulAgent,
    consul: ConsulClient,
    unique_name: str,
    docroot: Path,
    decisions: list[LogEvent],
) -> None:
    web = f"{unique_name}-web"
    api, batch = f"{unique_name}-api", f"{unique_name}-batch"
    intention = await bounded(consul.create_intention(batch, web, "deny"))
    agent = escaped(real_consul.http_address)
    endpoint = serverFromString(
        reactor,
        f"connect:{web}:port=0:interface=127.0.0.1:register=yes"
        f":authorize=intentions:consul={agent}",
    )
    port = await bounded(endpoint.listen(Site(File(str(docroot)))), 40)
    allowed = clientFromString(reactor, f"connect:{web}:source={api}:consul={agent}")
    denied = clientFromString(
        reactor, f"connect:{web}:source={batch}:consul={agent}:timeout=5"
    )
    try:
        # No intention for api: the agent's default (allow, ACLs off) decides.
        assert await get_when_up(allowed, b"/hello.txt") == (200, CONTENT)
        # The caller hears it was refused, not that the service is down
        # (issue 17): the server's TLS alert comes after our side of the
        # TLS 1.3 handshake, before any reply.
        with pytest.raises(ResponseNeverReceived) as raised:
            await get(denied, b"/hello.txt")
        [refused] = [
            r.value for r in raised.value.reasons if isinstance(r.value, ServiceRefused)
        ]
        assert refused.alert == "internal error"
        assert f"'{web}' (healthy instances) at 127.0.0.1:" in str(refused), refused
        assert "refused this connection with the TLS alert" in str(refused)
        assert refused.address == f"127.0.0.1:{port.getHost().port}"
        assert "intentions deny" in str(refused)
        # A protocol of our own sees the same reason.
        lost: Deferred[list[Failure]] = Deferred()

        class Speaker(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"GET / HTTP/1.0\r\n\r\n")

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                lost.callback([reason])

        await bounded(denied.connect(Factory.forProtocol(Speaker)), 20)
        [reason] = await bounded(lost, 20)
        assert isinstance(reason.value, ServiceRefused), reason

        # The treq client raises it as such, and does not send it again.
        def refusals() -> list[LogEvent]:
            return [
                e
                for e in decisions
                if e["target"] == web and batch in e["peer"] and not e["allowed"]
            ]

        before = len(refusals())
        http = connect_client(batch, consul=consul, retries=1)
        try:
            with pytest.raises(ServiceRefused, match="intentions deny"):
                await bounded(http.get(f"https://{web}.service.consul/hello.txt"), 30)
        finally:
            await bounded(http.close())
        assert len(refusals()) == before + 1
        assert all("intention" in e["reason"].lower() for e in refusals())
    finally:
        allowed.close()
        denied.close()
        await bounded(port.stopListening())
        await bounded(consul.delete_intention(intention))


# --- as a user runs it -------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[[list[str]], subprocess.Popen[bytes]]]:
    """
    Start a program with the source tree on ``PYTHONPATH`` (so Twisted finds
    its plugin module); it is killed at the end of the test whatever happens.
    """
    started: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SOURCE_TREE), *filter(None, [env.get("PYTHONPATH")])]
    )

    def start(argv: list[str]) -> subprocess.Popen[bytes]:
        log = (tmp_path / f"process-{len(started)}.log").open("wb")
        process = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def output(tmp_path: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in sorted(tmp_path.glob("process-*.log"))
    )


async def serve_and_stop(
    process: subprocess.Popen[bytes],
    tmp_path: Path,
    consul: ConsulClient,
    web: str,
    api: str,
    agent: str,
    path: bytes,
) -> tuple[int, bytes]:
    def alive() -> None:
        if process.poll() is not None:
            raise AssertionError(
                f"the program exited with {process.returncode}:\n{output(tmp_path)}"
            )

    dial = clientFromString(reactor, f"connect:{web}:source={api}:consul={agent}")
    try:
        answer = await get_when_up(dial, path, 60, alive)
    finally:
        dial.close()
    # SIGTERM: the program stops its port, which deregisters the instance.
    process.terminate()
    await until(lambda: _done(process), 20, f"the program to exit\n{output(tmp_path)}")
    await until(gone(consul, web), 10, "deregistration")
    return answer


async def _done(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is not None


@pytest_twisted.ensureDeferred
async def test_twistd_web_listens_on_a_connect_endpoint(
    real_consul: RealConsulAgent,
    consul: ConsulClient,
    unique_name: str,
    docroot: Path,
    tmp_path: Path,
    run: Callable[[list[str]], subprocess.Popen[bytes]],
) -> None:
    web, api = f"{unique_name}-web", f"{unique_name}-api"
    [number] = free_ports(1)
    agent = escaped(real_consul.http_address)
    twistd = str(Path(sys.executable).parent / "twistd")
    process = run(
        [
            twistd,
            "-n",
            "web",
            "--listen",
            f"connect:{web}:port={number}:interface=127.0.0.1:register=yes"
            f":consul={agent}",
            "--path",
            str(docroot),
        ]
    )
    answer = await serve_and_stop(
        process, tmp_path, consul, web, api, agent, b"/hello.txt"
    )
    assert answer == (200, CONTENT)


KLEIN_APP = textwrap.dedent(
    """
    import sys

    from klein import Klein

    from connect_native import peer_identity

    app = Klein()


    @app.route("/hello")
    def hello(request):
        return b"klein says hello to " + peer_identity(request).service.encode()


    app.run(endpoint_description=sys.argv[1])
    """
)


@pytest_twisted.ensureDeferred
async def test_a_klein_app_runs_on_a_connect_endpoint(
    real_consul: RealConsulAgent,
    consul: ConsulClient,
    unique_name: str,
    tmp_path: Path,
    run: Callable[[list[str]], subprocess.Popen[bytes]],
) -> None:
    web, api = f"{unique_name}-web", f"{unique_name}-api"
    [number] = free_ports(1)
    agent = escaped(real_consul.http_address)
    process = run(
        [
            sys.executable,
            "-c",
            KLEIN_APP,
            f"connect:{web}:port={number}:interface=127.0.0.1:register=yes"
            f":consul={agent}",
        ]
    )
    answer = await serve_and_stop(process, tmp_path, consul, web, api, agent, b"/hello")
    assert answer == (200, b"klein says hello to " + api.encode())
