"""
Consul's built-in proxy (``consul connect proxy``, HashiCorp's Go
``connect`` package, in the Consul 1.8.7 binary) as a peer of ours, both
ways, against a real agent of this module's own (the last test rotates its
CA).

Processes, started once for the module:

- ``twistd web --listen connect:<web>:...:register=yes`` serving a file, a
  Klein app on ``connect:<klein>:...`` that says who called it over what,
  and ``twistd connect-native`` for ``<term>`` (an echo backend behind it,
  ``--upstream <db>=tcp:...``);
- a Go client proxy ``-service <api>`` with an upstream listener for each of
  those three, and one ``-service <gated>`` for the intention tests;
- a Go server proxy ``-service <db> -listen ... -register`` in front of a
  plaintext echo backend.

The Go client proxy is an L4 tunnel: its TLS offers ALPN ``h2`` only,
whatever its client sends.  The HTTP clients here are Python's (urllib for
HTTP/1.1, the ``h2`` package for HTTP/2 with prior knowledge, as Go's
``HTTPClient`` speaks after ALPN ``h2``) on the proxy's plaintext port, so
the test needs no curl and no Go toolchain.  Each refusal is checked to be
the refusing side's: its log says so.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from connect_native.consul.client import ConsulClient
from tests import consul_binary
from tests.conftest import real_consul_required
from tests.consul_agent import RealConsulAgent, free_ports
from tests.processes import OutputProcess, child_environment
from tests.roots import new_root
from tests.waiting import authorize_until

pytestmark = pytest.mark.real_consul

SOURCE_TREE = Path(__file__).resolve().parent.parent
CONTENT = b"hello through consul's own proxy\n"
T = TypeVar("T")

KLEIN_APP = textwrap.dedent(
    """
    import sys

    from klein import Klein

    from connect_native import peer_identity

    app = Klein()


    @app.route("/whoami")
    def whoami(request):
        peer = peer_identity(request).service
        return f"{peer} over {request.clientproto.decode()}".encode()


    app.run(endpoint_description=sys.argv[1])
    """
)


def bounded(d: Deferred[T], seconds: float = 20.0) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


async def pause(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def eventually(
    attempt: Callable[[], Awaitable[T | None]], seconds: float, what: str
) -> T:
    """``attempt()`` until it answers (not ``None``), for at most ``seconds``."""
    deadline = reactor.seconds() + seconds  # type: ignore[attr-defined]
    while True:
        answer = await attempt()
        if answer is not None:
            return answer
        if reactor.seconds() >= deadline:  # type: ignore[attr-defined]
            raise AssertionError(f"{what}: not within {seconds}s")
        await pause(0.2)


# --- processes ------------------------------------------------------------------


class Running(OutputProcess):
    """A child process whose output lines are collected as they come."""

    def __init__(self, name: str, argv: list[str], cwd: Path) -> None:
        super().__init__(
            name,
            argv,
            cwd,
            child_environment(
                ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL")
            ),
        )

    def output(self) -> str:
        return f"--- {self.name}:\n" + super().output()

    async def line(self, *needles: str, seconds: float = 15.0) -> str:
        """The first line holding every needle, polled on the reactor."""

        async def look() -> str | None:
            found = self.lines_with(*needles)
            return found[0] if found else None

        try:
            return await eventually(look, seconds, f"{self.name} logging {needles}")
        except AssertionError:
            raise AssertionError(
                f"{self.name} never logged {needles!r}:\n{self.output()}"
            ) from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.join_reader()


class Echo:
    """A plaintext TCP server (threads) answering each read with prefix + it."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    def _echo(self, connection: socket.socket) -> None:
        connection.settimeout(120)
        with connection:
            while True:
                try:
                    data = connection.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                connection.sendall(self.prefix + data)

    def close(self) -> None:
        self._closing = True
        self.listener.close()


def escaped(address: str) -> str:
    return address.replace(":", "\\:")


class Mesh:
    """Everything this module runs, and the names and ports to reach it."""

    def __init__(self, agent: RealConsulAgent, binary: Path, work: Path) -> None:
        prefix = f"gp-{uuid.uuid4().hex[:6]}"
        self.agent = agent
        self.web = f"{prefix}-web"
        self.klein = f"{prefix}-klein"
        self.term = f"{prefix}-term"
        self.db = f"{prefix}-db"
        self.api = f"{prefix}-api"
        self.gated = f"{prefix}-gated"
        self.processes: list[Running] = []
        self.term_backend = Echo(b"term:")
        self.db_backend = Echo(b"db:")
        (
            web_port,
            klein_port,
            term_port,
            self.term_upstream,
            db_port,
            self.to_web,
            self.to_klein,
            self.to_term,
            self.gated_web,
            self.gated_term,
        ) = free_ports(10)
        agent_option = escaped(agent.http_address)
        bin_dir = Path(sys.executable).parent
        docroot = work / "www"
        docroot.mkdir()
        (docroot / "hello.txt").write_bytes(CONTENT)

        def start(name: str, argv: list[str]) -> Running:
            running = Running(name, argv, work)
            self.processes.append(running)
            return running

        self.web_site = start(
            "twistd web",
            [
                str(bin_dir / "twistd"),
                "-n",
                "--pidfile=",
                "web",
                "--listen",
                f"connect:{self.web}:port={web_port}:interface=127.0.0.1"
                f":register=yes:consul={agent_option}",
                "--path",
                str(docroot),
            ],
        )
        self.klein_app = start(
            "klein",
            [
                sys.executable,
                "-c",
                KLEIN_APP,
                f"connect:{self.klein}:port={klein_port}:interface=127.0.0.1"
                f":register=yes:consul={agent_option}",
            ],
        )
        self.terminator = start(
            "twistd connect-native",
            [
                str(bin_dir / "twistd"),
                "-n",
                "--pidfile=",
                "connect-native",
                "--service",
                self.term,
                "--listen",
                f"tcp:{term_port}:interface=127.0.0.1",
                "--to",
                f"tcp:127.0.0.1:{self.term_backend.port}",
                "--consul",
                f"http://{agent.http_address}",
                "--upstream",
                f"{self.db}=tcp:{self.term_upstream}:interface=127.0.0.1",
            ],
        )
        consul = str(binary)
        http = ["-http-addr", agent.http_address]
        self.go_client = start(
            "consul connect proxy (client)",
            [
                consul,
                "connect",
                "proxy",
                "-service",
                self.api,
                "-upstream",
                f"{self.web}:{self.to_web}",
                "-upstream",
                f"{self.klein}:{self.to_klein}",
                "-upstream",
                f"{self.term}:{self.to_term}",
                *http,
            ],
        )
        self.go_gated = start(
            "consul connect proxy (gated client)",
            [
                consul,
                "connect",
                "proxy",
                "-service",
                self.gated,
                "-upstream",
                f"{self.web}:{self.gated_web}",
                "-upstream",
                f"{self.term}:{self.gated_term}",
                *http,
            ],
        )
        self.go_server = start(
            "consul connect proxy (server)",
            [
                consul,
                "connect",
                "proxy",
                "-service",
                self.db,
                "-service-addr",
                f"127.0.0.1:{self.db_backend.port}",
                "-listen",
                f"127.0.0.1:{db_port}",
                "-register",
                *http,
            ],
        )

    def wait_started(self) -> None:
        self.web_site.wait_for_line("registered", 60)
        self.klein_app.wait_for_line("registered", 60)
        self.terminator.wait_for_line("accepting Connect", 60)
        self.terminator.wait_for_line("plaintext listener on", 10)
        self.go_server.wait_for_line("registered Consul service", 30)
        for proxy in (self.go_client, self.go_gated, self.go_server):
            proxy.wait_for_line("ready to serve", 30)

    def output(self) -> str:
        return "\n".join(p.output() for p in self.processes)

    def stop(self) -> None:
        for running in self.processes:
            running.stop()
        self.term_backend.close()
        self.db_backend.close()


@pytest.fixture(scope="module")
def agent() -> Iterator[RealConsulAgent]:
    """This module's own agent: its CA is rotated by the last test."""
    try:
        binary = consul_binary.ensure()
    except consul_binary.ConsulUnavailable as e:
        if real_consul_required():
            pytest.fail(f"a real Consul agent is required: {e}")
        pytest.skip(f"no real Consul agent: {e}")
    started = RealConsulAgent(binary)
    started.start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def mesh(
    agent: RealConsulAgent, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    pytest.importorskip("h2")
    started = Mesh(agent, agent.binary, tmp_path_factory.mktemp("consul-proxy"))
    try:
        started.wait_started()
        yield started
    finally:
        started.stop()


@pytest_twisted.async_yield_fixture
async def consul(agent: RealConsulAgent) -> Any:
    client = ConsulClient(reactor, address=agent.http_address)
    yield client
    await client.close()


# --- clients on the Go proxy's plaintext side (threads, every wait bounded) --------


def http11_get(port: int, path: str) -> tuple[int, bytes]:
    """One HTTP/1.1 GET (urllib); (0, reason) when the connection failed."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, urllib.error.URLError) as e:
        return 0, repr(e).encode()


def h2_get(port: int, path: str) -> tuple[int, bytes]:
    """
    One HTTP/2 GET with prior knowledge (the ``h2`` package) through the
    tunnel; (0, reason) when the connection failed or ended first.
    """
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, ResponseReceived, StreamEnded

    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    headers = [
        (":method", "GET"),
        (":path", path),
        (":scheme", "https"),
        (":authority", "connect"),
    ]
    client.send_headers(1, headers, end_stream=True)
    status, body = 0, b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(client.data_to_send())
            while True:
                data = raw.recv(65536)
                if not data:
                    return 0, b"the connection ended: " + body
                for event in client.receive_data(data):
                    if isinstance(event, ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, DataReceived):
                        body += event.data
                        client.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    elif isinstance(event, StreamEnded):
                        return status, body
                raw.sendall(client.data_to_send())
    except OSError as e:
        return 0, repr(e).encode()


class Stream:
    """A plaintext TCP connection kept open, for a line at a time."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)

    def say(self, message: bytes, expected: int) -> bytes:
        """Send ``message``; what came back, up to ``expected`` bytes."""
        self.socket.sendall(message)
        got = b""
        try:
            while len(got) < expected:
                data = self.socket.recv(65536)
                if not data:
                    break
                got += data
        except OSError:
            pass
        return got

    def close(self) -> None:
        self.socket.close()


def say_once(port: int, message: bytes, expected: int) -> bytes:
    """A new connection, one message, what came back (b"" if refused)."""
    try:
        stream = Stream(port)
    except OSError:
        return b""
    try:
        return stream.say(message, expected)
    finally:
        stream.close()


async def threaded(function: Callable[..., T], *args: Any) -> T:
    return await bounded(deferToThread(function, *args), 30)


async def until_answered(
    function: Callable[..., T],
    args: tuple[Any, ...],
    done: Callable[[T], bool],
    seconds: float,
    what: str,
    mesh: Mesh,
) -> T:
    """
    Call ``function(*args)`` in a thread until ``done`` says so, for at most
    ``seconds`` (the Go proxy finds a new instance through a blocking
    health query, the agent learns intentions in its background).
    """
    last: list[T] = []

    async def attempt() -> T | None:
        answer = await threaded(function, *args)
        last[:] = [answer]
        return answer if done(answer) else None

    try:
        return await eventually(attempt, seconds, what)
    except AssertionError:
        raise AssertionError(
            f"{what}: not within {seconds}s; last {last!r}\n{mesh.output()}"
        ) from None


def ok(answer: tuple[int, bytes]) -> bool:
    return answer[0] == 200


# --- Go client -> us ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_1_1_through_the_go_proxy_reaches_twistd_web(mesh: Mesh) -> None:
    """
    The done-when of issue 17: a plain HTTP/1.1 client through
    ``consul connect proxy -upstream`` gets the file (the proxy's TLS offered
    ALPN ``h2`` only; our server used to refuse it with ``internal error``).
    """
    answer = await until_answered(
        http11_get, (mesh.to_web, "/hello.txt"), ok, 60, "HTTP/1.1 to web", mesh
    )
    assert answer == (200, CONTENT)
    line = await mesh.web_site.line("allowed", f"/svc/{mesh.api}")
    assert mesh.web in line
    assert not mesh.web_site.lines_with("refused a client offering")


@pytest_twisted.ensureDeferred
async def test_http_2_through_the_go_proxy_reaches_twistd_web(mesh: Mesh) -> None:
    """
    HTTP/2 with prior knowledge through the same tunnel (what Go's
    ``connect`` ``HTTPClient`` speaks after ALPN ``h2``): the preface decides.
    """
    answer = await until_answered(
        h2_get, (mesh.to_web, "/hello.txt"), ok, 60, "HTTP/2 to web", mesh
    )
    assert answer == (200, CONTENT)


@pytest_twisted.ensureDeferred
async def test_both_http_versions_through_the_go_proxy_reach_a_klein_app(
    mesh: Mesh,
) -> None:
    """The Klein app sees the Go proxy's identity over either version."""
    one = await until_answered(
        http11_get, (mesh.to_klein, "/whoami"), ok, 60, "HTTP/1.1 to klein", mesh
    )
    assert one == (200, f"{mesh.api} over HTTP/1.1".encode())
    two = await threaded(h2_get, mesh.to_klein, "/whoami")
    assert two == (200, f"{mesh.api} over HTTP/2".encode())


@pytest_twisted.ensureDeferred
async def test_a_byte_stream_through_the_go_proxy_reaches_the_terminator(
    mesh: Mesh,
) -> None:
    def answered(got: bytes) -> bool:
        return got == b"term:ping"

    await until_answered(
        say_once, (mesh.to_term, b"ping", 9), answered, 60, "bytes to term", mesh
    )
    await mesh.terminator.line("allowed", f"/svc/{mesh.api}")


# --- us -> Go server --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_terminators_upstream_reaches_a_go_fronted_service(
    mesh: Mesh,
) -> None:
    def answered(got: bytes) -> bool:
        return got == b"db:hello db"

    await until_answered(
        say_once,
        (mesh.term_upstream, b"hello db", 11),
        answered,
        60,
        "bytes to db",
        mesh,
    )


# --- intentions, seen by both -------------------------------------------------------


async def agent_says(
    consul: ConsulClient, source: str, target: str, expected: bool
) -> None:
    roots = (await bounded(consul.agent_ca_roots())).value
    uri = f"spiffe://{roots.trust_domain}/ns/default/dc/dc1/svc/{source}"
    answer = await authorize_until(consul, target, uri, expected, within=15)
    assert answer.authorized is expected, answer


@pytest_twisted.ensureDeferred
async def test_our_server_denies_then_allows_a_go_client_by_intention(
    mesh: Mesh, consul: ConsulClient
) -> None:
    """
    A deny intention ``<gated> -> <web>`` and ``-> <term>``: our servers
    refuse the Go proxy's connections (and log it); replaced by an allow,
    the same proxy gets through.
    """
    await until_answered(
        http11_get, (mesh.gated_web, "/hello.txt"), ok, 60, "gated to web", mesh
    )
    denials = [
        await bounded(consul.create_intention(mesh.gated, target, "deny"))
        for target in (mesh.web, mesh.term)
    ]
    allows: list[str] = []
    try:
        for target in (mesh.web, mesh.term):
            await agent_says(consul, mesh.gated, target, False)
        # Our servers notice the change and decide new connections afresh.
        refused = await until_answered(
            http11_get,
            (mesh.gated_web, "/hello.txt"),
            lambda answer: answer[0] != 200,
            20,
            "web refusing gated",
            mesh,
        )
        assert refused[0] == 0, refused
        await mesh.web_site.line("denied", f"/svc/{mesh.gated}")
        got = await until_answered(
            say_once,
            (mesh.gated_term, b"ping", 9),
            lambda got: got == b"",
            20,
            "term refusing gated",
            mesh,
        )
        assert got == b""
        await mesh.terminator.line("denied", f"/svc/{mesh.gated}")

        for denial in denials:
            await bounded(consul.delete_intention(denial))
        denials = []
        allows = [
            await bounded(consul.create_intention(mesh.gated, target, "allow"))
            for target in (mesh.web, mesh.term)
        ]
        for target in (mesh.web, mesh.term):
            await agent_says(consul, mesh.gated, target, True)
        answer = await until_answered(
            http11_get, (mesh.gated_web, "/hello.txt"), ok, 20, "web allowing", mesh
        )
        assert answer == (200, CONTENT)
        await until_answered(
            say_once,
            (mesh.gated_term, b"ping", 9),
            lambda got: got == b"term:ping",
            20,
            "term allowing gated",
            mesh,
        )
    finally:
        for intention in denials + allows:
            await bounded(consul.delete_intention(intention))


@pytest_twisted.ensureDeferred
async def test_the_go_server_denies_then_allows_our_client_by_intention(
    mesh: Mesh, consul: ConsulClient
) -> None:
    """
    A deny intention ``<term> -> <db>``: the Go server proxy refuses our
    terminator's upstream connections (the Go side logs the refusal);
    replaced by an allow, they get through again.
    """

    def echoed(got: bytes) -> bool:
        return got == b"db:hello db"

    await until_answered(
        say_once, (mesh.term_upstream, b"hello db", 11), echoed, 60, "to db", mesh
    )
    denial: str | None = await bounded(
        consul.create_intention(mesh.term, mesh.db, "deny")
    )
    allow: str | None = None
    try:
        await agent_says(consul, mesh.term, mesh.db, False)
        got = await until_answered(
            say_once,
            (mesh.term_upstream, b"hello db", 11),
            lambda got: got == b"",
            20,
            "db refusing term",
            mesh,
        )
        assert got == b""
        # The refusal is the Go server's: it logs why, and our side's
        # handshake was refused by the peer.
        await mesh.go_server.line(
            "authz call denied", f"DENY default/{mesh.term} => default/{mesh.db}"
        )
        assert denial is not None
        await bounded(consul.delete_intention(denial))
        denial = None
        allow = await bounded(consul.create_intention(mesh.term, mesh.db, "allow"))
        await agent_says(consul, mesh.term, mesh.db, True)
        await until_answered(
            say_once, (mesh.term_upstream, b"hello db", 11), echoed, 20, "db", mesh
        )
    finally:
        for intention in (denial, allow):
            if intention is not None:
                await bounded(consul.delete_intention(intention))


# --- a CA rotation with connections open both ways ----------------------------------


def issuer_of(cert_pem: str) -> x509.Name:
    return x509.load_pem_x509_certificate(cert_pem.encode()).issuer


@pytest_twisted.ensureDeferred
async def test_a_ca_rotation_keeps_connections_open_both_ways(
    mesh: Mesh, consul: ConsulClient
) -> None:
    """
    Connections open Go -> us (to the terminator) and us -> Go (the
    terminator's upstream to db) keep carrying bytes through a rotation of
    the agent's CA, and new connections both ways work with the new roots
    and again once the agent has issued leaves from the new root (0-30 s
    after the rotation: bounded at 60 s).  Last in the module: it leaves the
    agent on the new root.
    """
    await until_answered(
        say_once,
        (mesh.to_term, b"ping", 9),
        lambda g: g == b"term:ping",
        60,
        "go->us",
        mesh,
    )
    await until_answered(
        say_once,
        (mesh.term_upstream, b"hello db", 11),
        lambda g: g == b"db:hello db",
        60,
        "us->go",
        mesh,
    )
    inbound = await threaded(Stream, mesh.to_term)
    outbound = await threaded(Stream, mesh.term_upstream)
    try:
        assert await threaded(inbound.say, b"before", 11) == b"term:before"
        assert await threaded(outbound.say, b"before", 9) == b"db:before"

        roots = (await bounded(consul.agent_ca_roots())).value
        key_pem, cert_pem, root = new_root(roots.trust_domain)
        config = await bounded(consul.ca_configuration())
        body: dict[str, Any] = config.config_json()
        body.update(PrivateKey=key_pem, RootCert=cert_pem)
        await bounded(consul.set_ca_configuration("consul", body))

        # Our processes trust both roots within moments.
        for process in (mesh.terminator, mesh.web_site):
            await process.line("trusting 2 root(s)", seconds=20)

        async def both_ways() -> None:
            assert await threaded(inbound.say, b"during", 11) == b"term:during"
            assert await threaded(outbound.say, b"during", 9) == b"db:during"
            assert await threaded(say_once, mesh.to_term, b"new", 8) == b"term:new"
            assert await threaded(say_once, mesh.term_upstream, b"new", 6) == b"db:new"
            assert await threaded(http11_get, mesh.to_web, "/hello.txt") == (
                200,
                CONTENT,
            )

        await both_ways()

        # Then every side gets a leaf from the new root (the agent's leaf
        # cache renews 0-30 s after the rotation; the Go proxies and our
        # processes watch the same cache entries).
        async def renewed(service: str) -> bool | None:
            leaf = (await bounded(consul.leaf(service))).value
            return True if issuer_of(leaf.cert_pem) == root.subject else None

        for service in (mesh.term, mesh.web, mesh.api, mesh.db):

            async def check(service: str = service) -> bool | None:
                return await renewed(service)

            await eventually(check, 60, f"a leaf from the new root for {service}")
        for process, service in (
            (mesh.terminator, mesh.term),
            (mesh.web_site, mesh.web),
        ):
            leaf = (await bounded(consul.leaf(service))).value
            serial = f"{int(leaf.serial_number.replace(':', ''), 16):x}"
            await process.line(f"serial {serial},", seconds=20)
        await both_ways()
    finally:
        inbound.close()
        outbound.close()
