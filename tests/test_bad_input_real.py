"""
Bad input against ``twistd connect-native`` over real sockets, in front of a
real Consul 1.8.7 agent whose CA is ours: the agent of this module is rotated
(``PUT /v1/connect/ca/configuration``) to the root of a
:class:`~connect_native.testing.CertificateFactory`, so the good client
certificate and the ones that chain but are wrong in one way are signed by a
root the terminator trusts.

- the client-certificate matrix: no certificate, self-signed, another CA,
  expired, not yet valid, no URI SAN, two URIs, an agent's URI, an unknown
  trust domain: each refused in the handshake, nothing reaches the backend,
  and the terminator's log says why, naming the certificate;
- TLS 1.0 and 1.1 offered by a client that offers nothing else; a
  renegotiation; a session replayed by a client without the certificate;
  garbage instead of a ClientHello: refused, and the process keeps serving;
- a handshake that never finishes frees its slot after
  ``--handshake-timeout 1``; past ``--max-connections`` authorized
  connections a new one is refused at once (logged) while the process keeps
  serving within its limit; 400 sockets held open without a handshake
  against ``--max-connections 300`` do not keep real clients out.

The clients are blocking ``ssl``/pyOpenSSL sockets run in threads, every
wait bounded; the backend (an echo server) runs on the test's reactor.
"""

from __future__ import annotations

import json
import select
import selectors
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread

from connect_native.terminator import TLS_TRANSPORTS
from connect_native.testing import CertificateFactory, TestLeaf
from tests.consul_agent import RealConsulAgent, free_ports
from tests.test_terminator_real import Backend, Process, log_line

pytestmark = pytest.mark.real_consul

clock: Any = reactor
MESSAGE = b"let me in"
MAX_CONNECTIONS = 3


class Terminator:
    """A ``twistd connect-native`` process for ``web`` and its echo backend."""

    def __init__(
        self, agent: RealConsulAgent, work: Path, service: str, *options: str
    ) -> None:
        self.service = service
        self.received: list[Backend] = []
        self.backend: Any = clock.listenTCP(
            0,
            Factory.forProtocol(lambda: Backend(self.received)),
            interface="127.0.0.1",
        )
        [self.port] = free_ports(1)
        self.process = Process(
            [
                "connect-native",
                "--service",
                service,
                "--listen",
                f"tcp:{self.port}:interface=127.0.0.1",
                "--to",
                f"tcp:127.0.0.1:{self.backend.getHost().port}",
                "--consul",
                f"http://{agent.http_address}",
                "--no-register",
                "--handshake-timeout",
                "1",
                *options,
            ],
            work,
        )

    def bytes_received(self) -> int:
        return sum(backend.count for backend in self.received)

    def stop(self) -> None:
        self.process.stop()
        self.backend.stopListening()


class World:
    def __init__(
        self,
        factory: CertificateFactory,
        web: Terminator,
        small: Terminator,
        crowded: Terminator,
    ):
        self.ca = factory
        self.web = web
        self.small = small
        self.crowded = crowded


@pytest.fixture(scope="module", params=TLS_TRANSPORTS)
def world(
    consul_binary_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[World]:
    """
    The agent and two terminators, once over each ``--tls-transport``: every
    test of the suite runs against both.
    """
    transport = ("--tls-transport", str(request.param))
    agent = RealConsulAgent(consul_binary_path)
    agent.start()
    terminators: list[Terminator] = []
    try:
        status, body = agent.request("GET", "/v1/agent/connect/ca/roots")
        assert status == 200
        trust_domain = json.loads(body)["TrustDomain"]
        factory = CertificateFactory(trust_domain)
        status, body = agent.request(
            "PUT",
            "/v1/connect/ca/configuration",
            {
                "Provider": "consul",
                "Config": {
                    "LeafCertTTL": "72h",
                    "PrivateKey": factory.signing_key_pem,
                    "RootCert": factory.root_pem,
                },
            },
        )
        assert status == 200, body
        prefix = f"bad-{uuid.uuid4().hex[:6]}"
        work = tmp_path_factory.mktemp("bad-input")
        web = Terminator(agent, work, f"{prefix}-web", *transport)
        terminators.append(web)
        small = Terminator(
            agent,
            work,
            f"{prefix}-small",
            "--max-connections",
            str(MAX_CONNECTIONS),
            *transport,
        )
        terminators.append(small)
        crowded = Terminator(
            agent,
            work,
            f"{prefix}-crowded",
            "--max-connections",
            "300",
            "--handshake-timeout",
            "10",
            *transport,
        )
        terminators.append(crowded)
        for each in terminators:
            each.process.wait_for_line("accepting Connect", 60)
        yield World(factory, web, small, crowded)
    finally:
        for each in terminators:
            each.stop()
        agent.stop()


# --- clients (in threads) ------------------------------------------------------


def write_leaf(leaf: TestLeaf, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_text(leaf.chain_pem)
    (directory / "key.pem").write_text(leaf.key_pem)
    return directory


def stdlib_call(
    port: int,
    leaf_dir: Path | None,
    *,
    version: ssl.TLSVersion | None = None,
    ports: list[int] | None = None,
    timeout: float = 10,
) -> bytes:
    """
    A stdlib TLS client presenting the certificate in ``leaf_dir`` (or none);
    what came back for MESSAGE, b"" when the connection was refused.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if version is not None:
        context.minimum_version = version
        context.maximum_version = version
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if leaf_dir is not None:
        context.load_cert_chain(leaf_dir / "cert.pem", leaf_dir / "key.pem")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        if ports is not None:
            ports.append(raw.getsockname()[1])
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(MESSAGE)
                return tls.recv(1024)
        except (ssl.SSLError, ConnectionError, TimeoutError):
            return b""


def tls_context(max_version: int) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(max_version)
    return context


def pyopenssl_client(
    port: int, leaf: TestLeaf, context: SSL.Context, session: Any = None
) -> tuple[SSL.Connection, socket.socket]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.setblocking(False)  # waits are bounded by patiently()
    connection = SSL.Connection(context, raw)
    connection.use_certificate(leaf.certificate)
    connection.use_privatekey(leaf.private_key)  # type: ignore[arg-type]
    connection.set_connect_state()
    if session is not None:
        connection.set_session(session)
    return connection, raw


def patiently(call: Callable[[], Any], raw: socket.socket, seconds: float = 10) -> Any:
    """Run a pyOpenSSL call on a non-blocking socket, waiting at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except SSL.WantReadError:
            readable, writable = [raw], []
        except SSL.WantWriteError:
            readable, writable = [], [raw]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the terminator did not answer")
        select.select(readable, writable, [], remaining)


def round_trip(connection: SSL.Connection, raw: socket.socket) -> bytes:
    patiently(lambda: connection.sendall(MESSAGE), raw)
    try:
        answer: bytes = patiently(lambda: connection.recv(1024), raw)
    except SSL.ZeroReturnError:
        return b""
    return answer


def renegotiate(port: int, leaf: TestLeaf) -> tuple[bytes, str]:
    """Echo once over TLS 1.2, then ask to renegotiate: (echo, what happened)."""
    connection, raw = pyopenssl_client(port, leaf, tls_context(SSL.TLS1_2_VERSION))
    with raw:
        patiently(connection.do_handshake, raw)
        echoed = round_trip(connection, raw)
        try:
            connection.renegotiate()
            patiently(connection.do_handshake, raw)
            outcome = repr(round_trip(connection, raw))
        except (SSL.Error, OSError) as e:
            outcome = f"error: {e!r}"
        return echoed, outcome


def replay_session(
    port: int, leaf: TestLeaf, impostor: TestLeaf, max_version: int
) -> tuple[bytes, bytes]:
    """
    A good client's session, offered again by a client holding only a
    certificate that does not verify: (first echo, second answer).  A
    resumed session would skip the certificate check and be answered.
    """
    context = tls_context(max_version)
    first, raw = pyopenssl_client(port, leaf, context)
    with raw:
        patiently(first.do_handshake, raw)
        echoed = round_trip(first, raw)
        session = first.get_session()
    second, raw = pyopenssl_client(port, impostor, context, session=session)
    with raw:
        try:
            patiently(second.do_handshake, raw)
            answer = round_trip(second, raw)
        except (SSL.Error, OSError):
            answer = b""
        return echoed, answer


def send_garbage(port: int, data: bytes, ports: list[int] | None = None) -> bytes:
    """Send ``data`` as the first bytes and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if ports is not None:
            ports.append(raw.getsockname()[1])
        raw.sendall(data)
        answer = b""
        try:
            while chunk := raw.recv(4096):
                answer += chunk
        except (ConnectionError, TimeoutError):
            pass
        return answer


def closed_within(raw: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``raw`` (sending nothing) within ``seconds``."""
    raw.settimeout(seconds)
    try:
        return raw.recv(1) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return deferToThread(function, *args, **kwargs).addTimeout(30, clock)


# --- the certificate matrix --------------------------------------------------------


def name() -> str:
    return f"api{uuid.uuid4().hex[:8]}"


MATRIX: dict[str, Callable[[CertificateFactory, str], TestLeaf]] = {
    "self-signed": lambda ca, n: ca.self_signed(n),
    "another CA": lambda ca, n: ca.another_ca().leaf(n),
    "expired": lambda ca, n: ca.expired_leaf(n),
    "not yet valid": lambda ca, n: ca.not_yet_valid_leaf(n),
    "no URI SAN": lambda ca, n: ca.leaf(n, uris=[]),
    "two URIs": lambda ca, n: ca.leaf(
        n, uris=[ca.service_uri(n), ca.service_uri(n + "x")]
    ),
    "an agent's URI": lambda ca, n: ca.agent_leaf(n),
    "unknown trust domain": lambda ca, n: ca.leaf(
        n, trust_domain="11111111-2222-3333-4444-555555555555.consul"
    ),
}


@pytest_twisted.ensureDeferred
async def test_a_good_certificate_from_the_agents_ca_is_served(
    world: World, tmp_path: Path
) -> None:
    leaf = world.ca.leaf(name())
    before = world.web.bytes_received()
    answer = await in_thread(
        stdlib_call, world.web.port, write_leaf(leaf, tmp_path / "good")
    )
    assert answer == MESSAGE
    assert world.web.bytes_received() == before + len(MESSAGE)
    await log_line(world.web.process, "allowed", leaf.uri or "?")


@pytest.mark.parametrize("case", sorted(MATRIX))
@pytest_twisted.ensureDeferred
async def test_a_bad_client_certificate_is_refused_by_the_terminator(
    world: World, tmp_path: Path, case: str
) -> None:
    leaf = MATRIX[case](world.ca, name())
    before = world.web.bytes_received()
    ports: list[int] = []
    answer = await in_thread(
        stdlib_call, world.web.port, write_leaf(leaf, tmp_path / "bad"), ports=ports
    )
    assert answer == b""
    assert world.web.bytes_received() == before
    # The refusal names the certificate and where it came from.
    line = await log_line(
        world.web.process,
        "refused the peer's certificate",
        f"serial {leaf.certificate.serial_number:#x}",
        f"host='127.0.0.1', port={ports[0]})",
    )
    reason = line.rsplit("):", 1)[-1].strip()
    assert reason, line


@pytest_twisted.ensureDeferred
async def test_a_client_without_a_certificate_is_refused(world: World) -> None:
    before = world.web.bytes_received()
    assert await in_thread(stdlib_call, world.web.port, None) == b""
    assert world.web.bytes_received() == before


def old_tls(port: int, leaf_dir: Path, ports: list[int]) -> bytes:
    return stdlib_call(port, leaf_dir, version=ssl.TLSVersion.TLSv1, ports=ports)


HANDSHAKE_FAILURES: dict[str, Callable[[int, Path, list[int]], bytes]] = {
    "no certificate": lambda port, _, ports: stdlib_call(port, None, ports=ports),
    "TLS 1.0 only": old_tls,
    "garbage": lambda port, _, ports: send_garbage(
        port, b"GET / HTTP/1.0\r\n\r\n", ports
    ),
}


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("case", sorted(HANDSHAKE_FAILURES))
@pytest_twisted.ensureDeferred
async def test_a_failed_handshake_is_logged_with_the_clients_address(
    world: World, tmp_path: Path, case: str
) -> None:
    ports: list[int] = []
    leaf_dir = write_leaf(world.ca.leaf(name()), tmp_path / "leaf")
    answer = await in_thread(HANDSHAKE_FAILURES[case], world.web.port, leaf_dir, ports)
    assert MESSAGE not in answer
    [port] = ports
    await log_line(world.web.process, f"port={port})", "handshake", seconds=2)


# --- protocol abuse --------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["1.0", "1.1"]
)
@pytest_twisted.ensureDeferred
async def test_a_client_offering_only_old_tls_is_refused(
    world: World, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    leaf = world.ca.leaf(name())
    before = world.web.bytes_received()
    answer = await in_thread(
        stdlib_call, world.web.port, write_leaf(leaf, tmp_path / "old"), version=version
    )
    assert answer == b""
    assert world.web.bytes_received() == before
    assert (
        await in_thread(stdlib_call, world.web.port, write_leaf(leaf, tmp_path / "new"))
        == MESSAGE
    )


@pytest_twisted.ensureDeferred
async def test_renegotiation_is_refused_and_the_connection_is_not_renegotiated(
    world: World,
) -> None:
    leaf = world.ca.leaf(name())
    echoed, outcome = await in_thread(renegotiate, world.web.port, leaf)
    assert echoed == MESSAGE
    # The terminator answers the request with a no_renegotiation alert.
    assert "no renegotiation" in outcome


@pytest.mark.parametrize(
    "max_version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["1.2", "1.3"]
)
@pytest_twisted.ensureDeferred
async def test_a_replayed_session_without_the_certificate_is_refused(
    world: World, max_version: int
) -> None:
    leaf = world.ca.leaf(name())
    impostor = world.ca.self_signed(name())
    before = world.web.bytes_received()
    echoed, answer = await in_thread(
        replay_session, world.web.port, leaf, impostor, max_version
    )
    assert echoed == MESSAGE
    assert answer == b""
    assert world.web.bytes_received() == before + len(MESSAGE)
    # A full handshake checked the impostor's certificate.
    await log_line(
        world.web.process,
        "refused the peer's certificate",
        f"serial {impostor.certificate.serial_number:#x}",
    )


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
        b"\x16\x03\x01\xff\xff" + b"\x00" * 64,
        bytes(range(256)) * 8,
    ],
    ids=["http", "bad-record", "noise"],
)
@pytest_twisted.ensureDeferred
async def test_garbage_instead_of_a_client_hello_is_refused(
    world: World, tmp_path: Path, garbage: bytes
) -> None:
    before = world.web.bytes_received()
    answer = await in_thread(send_garbage, world.web.port, garbage)
    assert MESSAGE not in answer
    assert world.web.bytes_received() == before
    leaf = world.ca.leaf(name())
    assert (
        await in_thread(
            stdlib_call, world.web.port, write_leaf(leaf, tmp_path / "after")
        )
        == MESSAGE
    )


# --- slots ---------------------------------------------------------------------


def hold_open(port: int, count: int) -> list[socket.socket]:
    return [
        socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)
    ]


@pytest_twisted.ensureDeferred
async def test_a_handshake_that_never_finishes_is_closed_and_frees_its_slot(
    world: World, tmp_path: Path
) -> None:
    small = world.small
    started = time.monotonic()
    idle = await in_thread(hold_open, small.port, MAX_CONNECTIONS)
    try:
        # Every slot is taken by a client that never sends a ClientHello.
        closed = await in_thread(lambda: [closed_within(s, 5.0) for s in idle])
        assert closed == [True] * MAX_CONNECTIONS
        assert time.monotonic() - started < 5.0
        await log_line(small.process, "handshake did not complete within 1s")
        leaf = world.ca.leaf(name())
        assert (
            await in_thread(
                stdlib_call, small.port, write_leaf(leaf, tmp_path / "after")
            )
            == MESSAGE
        )
    finally:
        for s in idle:
            s.close()


def hold_authorized(port: int, leaf_dir: Path, count: int) -> list[ssl.SSLSocket]:
    """``count`` connections through the terminator, each answered, held open."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(leaf_dir / "cert.pem", leaf_dir / "key.pem")
    held: list[ssl.SSLSocket] = []
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        tls = context.wrap_socket(raw)
        held.append(tls)
        tls.sendall(MESSAGE)
        assert tls.recv(1024) == MESSAGE
    return held


@pytest_twisted.ensureDeferred
async def test_authorized_connections_past_max_connections_are_refused(
    world: World, tmp_path: Path
) -> None:
    small = world.small
    leaf_dir = write_leaf(world.ca.leaf(name()), tmp_path / "good")
    held = await in_thread(hold_authorized, small.port, leaf_dir, MAX_CONNECTIONS)
    try:
        flood = await in_thread(hold_open, small.port, 20)
        try:
            refused = await in_thread(lambda: [closed_within(s, 0.9) for s in flood])
        finally:
            for s in flood:
                s.close()
        assert all(refused)
        await log_line(small.process, "refused a connection", "(--max-connections)")
    finally:
        for s in held:
            s.close()

    # The held ones went away: the limit serves again.
    async def served() -> bytes:
        answer: bytes = await in_thread(stdlib_call, small.port, leaf_dir)
        return answer

    deadline = time.monotonic() + 10
    answer = await served()
    while answer != MESSAGE and time.monotonic() < deadline:
        answer = await served()
    assert answer == MESSAGE
    assert small.process.process.poll() is None


class Crowd:
    """
    ``count`` sockets held open on ``port`` without a byte of TLS, from a
    thread; each one the terminator closes is opened again at once.
    """

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.reopened = 0
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def _open(self, selector: selectors.BaseSelector) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        raw.setblocking(False)
        self._sockets.append(raw)
        selector.register(raw, selectors.EVENT_READ)

    def start(self) -> None:
        self._thread.start()

    def _hold(self) -> None:
        with selectors.DefaultSelector() as selector:
            for _ in range(self.count):
                self._open(selector)
            deadline = time.monotonic() + 120
            while not self._stop.is_set() and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.1):
                    raw = key.fileobj
                    assert isinstance(raw, socket.socket)
                    selector.unregister(raw)
                    self._sockets.remove(raw)
                    raw.close()
                    try:
                        self._open(selector)
                        self.reopened += 1
                    except OSError:
                        pass
            for raw in self._sockets:
                raw.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest_twisted.ensureDeferred
async def test_idle_sockets_held_open_cannot_keep_real_clients_out(
    world: World, tmp_path: Path
) -> None:
    """
    400 sockets that never start a handshake, re-opened as they are closed,
    against --max-connections 300: real clients one after another are
    served (each within a 5 s bound), and the process's memory stays
    bounded.
    """
    crowded = world.crowded
    leaf_dir = write_leaf(world.ca.leaf(name()), tmp_path / "good")
    pid = crowded.process.process.pid
    before = rss_kib(pid)
    crowd = Crowd(crowded.port, 400)
    crowd.start()
    try:
        await log_line(crowded.process, "the most held", seconds=10)
        answers = []
        for _ in range(10):
            answers.append(
                await in_thread(stdlib_call, crowded.port, leaf_dir, timeout=5)
            )
    finally:
        crowd.stop()
    assert answers.count(MESSAGE) >= 9, crowded.process.output()[-6000:]
    assert crowd.reopened > 0
    # Bounded: the held sockets cost kilobytes each, not the process's growth
    # without end.
    assert rss_kib(pid) - before < 64 * 1024
    assert crowded.process.process.poll() is None
