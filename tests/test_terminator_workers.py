"""
Tests for ``twistd connect-native --workers N`` and ``--authorize-cache``.

The options and the workers' command line are checked in memory.  The
workers themselves run for real: ``twistd -n connect-native --dev --workers
2`` on 127.0.0.1 with a plaintext echo backend in this process, and mutual-TLS
clients (Python's ``ssl``, certificates from the process's development agent)
whose accepted sockets are found in each process's descriptors.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from connect_native.authorize import Peer
from connect_native.consul.records import AuthorizeResult
from connect_native.identity import ServiceIdentity
from connect_native.terminator import (
    Options,
    ReusePortEndpoint,
    Settings,
    Terminator,
    worker_arguments,
)
from tests.processes import OutputProcess, child_environment

SOURCE_TREE = Path(__file__).resolve().parent.parent
BOUND = 30.0  # seconds any one wait in the process tests may take


def parse(*arguments: str) -> Settings:
    options = Options()
    options.parseOptions(list(arguments))
    assert options.settings is not None
    return options.settings


BASE = ("--dev", "--service", "web", "--to", "tcp:127.0.0.1:8080")


# --- options -------------------------------------------------------------------


def test_workers_and_authorize_cache_reach_the_settings() -> None:
    settings = parse(*BASE, "--workers", "3", "--authorize-cache", "0")
    assert settings.workers == 3
    assert settings.authorize_cache == 0.0
    assert settings.worker is False
    default = parse(*BASE)
    assert (default.workers, default.authorize_cache) == (1, 1.0)


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "65"])
def test_a_bad_worker_count_is_refused_naming_the_option(value: str) -> None:
    with pytest.raises(usage.UsageError, match="--workers must be a whole number"):
        parse(*BASE, "--workers", value)


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_a_bad_authorize_cache_is_refused_naming_the_option(value: str) -> None:
    with pytest.raises(usage.UsageError, match="--authorize-cache must be"):
        parse(*BASE, "--authorize-cache", value)


def test_workers_need_a_tcp_listener() -> None:
    with pytest.raises(usage.UsageError, match="tcp or tcp6 --listen"):
        parse(*BASE, "--workers", "2", "--listen", "unix:/tmp/web.sock")


def test_workers_cannot_be_used_with_the_demo() -> None:
    with pytest.raises(usage.UsageError, match="--workers cannot be used with --demo"):
        parse("--demo", "--workers", "2")


def test_workers_need_a_backend() -> None:
    with pytest.raises(usage.UsageError, match="--workers needs --to"):
        parse("--dev", "--service", "web", "--upstream", "db=tcp:9191", "--workers=2")


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:0:interface=127.0.0.1:backlog=77", (socket.AF_INET, 0, "127.0.0.1", 77)),
        ("tcp6:8443:interface=\\:\\:1", (socket.AF_INET6, 8443, "::1", 50)),
        ("8443", (socket.AF_INET, 8443, "0.0.0.0", 50)),
        ("tcp:port=9:backlog=3", (socket.AF_INET, 9, "0.0.0.0", 3)),
        ("tcp6:9", (socket.AF_INET6, 9, "::", 50)),
    ],
)
def test_the_shared_port_is_read_from_the_description(
    description: str, expected: tuple[int, int, str, int]
) -> None:
    endpoint = ReusePortEndpoint.from_description(None, description)
    got = (endpoint.family, endpoint.port, endpoint.interface, endpoint.backlog)
    assert got == expected


@pytest.mark.parametrize("description", ["unix:/run/web.sock", "tcp:interface=::1"])
def test_a_description_without_a_tcp_port_is_refused(description: str) -> None:
    with pytest.raises(ValueError, match="--listen"):
        ReusePortEndpoint.from_description(None, description)


def test_a_worker_gets_the_bound_port_and_no_registration_or_token() -> None:
    settings = Settings(
        service="web",
        listen="tcp6:0:interface=\\:\\:1:backlog=77",
        to="tcp:127.0.0.1:8080",
        token="secret-token",
        authorize="intentions",
        authorize_cache=0.5,
        workers=2,
        max_connections=12,
        max_handshakes=9,
        max_handshakes_per_address=3,
        log_allowed=False,
        keep_open_on_deny=True,
        buffer_size=1 << 20,
        log_level="warn",
        tls_transport="twisted",
    )
    arguments = worker_arguments(settings, 4321, "http://127.0.0.1:8500")
    assert "secret-token" not in " ".join(arguments)
    assert arguments[arguments.index("--listen") + 1] == (
        "tcp6:4321:interface=\\:\\:1:backlog=77"
    )
    assert {"--worker", "--no-register"} <= set(arguments)
    assert "--upstream" not in arguments
    after = arguments[arguments.index("connect-native") + 1 :]
    worker = parse(*after)
    assert worker.worker is True
    assert worker.register is False
    assert worker.workers == 1
    assert worker.consul == "http://127.0.0.1:8500"
    assert (worker.authorize, worker.authorize_cache) == ("intentions", 0.5)
    assert worker.max_connections == 12
    assert (worker.max_handshakes, worker.max_handshakes_per_address) == (9, 3)
    assert worker.log_allowed is False
    assert worker.keep_open_on_deny is True
    assert worker.buffer_size == 1 << 20
    assert worker.log_level == "warn"
    assert worker.tls_transport == "twisted"


def test_a_worker_gets_the_files_sighup_reloads_by_name(tmp_path: Any) -> None:
    allowed = tmp_path / "allowed"
    allowed.write_text("spiffe://td/ns/default/dc/dc1/svc/api\n")
    level = tmp_path / "level"
    level.write_text("warn\n")
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    settings = parse(
        "--service",
        "web",
        "--to",
        "tcp:127.0.0.1:8080",
        "--listen",
        "tcp:0",
        "--workers",
        "2",
        "--authorize",
        "allow-ids",
        "--allow-id",
        "spiffe://td/ns/default/dc/dc1/svc/billing",
        "--allow-ids-file",
        str(allowed),
        "--log-level-file",
        str(level),
        "--token-file",
        str(token),
    )
    arguments = worker_arguments(settings, 4321, "http://127.0.0.1:8500")
    assert "secret-token" not in " ".join(arguments)
    assert "--log-level" not in arguments
    worker = parse(*arguments[arguments.index("connect-native") + 1 :])
    assert worker.allow_ids == settings.allow_ids
    assert worker.allow_id_options == ("spiffe://td/ns/default/dc/dc1/svc/billing",)
    assert worker.allow_ids_file == str(allowed)
    assert (worker.log_level, worker.log_level_file) == ("warn", str(level))
    assert (worker.token, worker.token_file) == ("secret-token", str(token))


# --- --authorize-cache reaches the AgentAuthorizer ------------------------------


class CountingAgent:
    def __init__(self) -> None:
        self.calls = 0

    def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> Deferred[AuthorizeResult]:
        self.calls += 1
        return succeed(AuthorizeResult(authorized=True, reason="allowed"))


def agent_calls_for_two_connections(cache: float) -> int:
    agent = CountingAgent()
    terminator = Terminator(
        Settings(service="web", to="tcp:127.0.0.1:8080", authorize_cache=cache),
        MemoryReactorClock(),
        consul_client=agent,
        on_finished=lambda code: None,
    )
    authorizer = terminator._authorizer()
    peer = Peer(
        identity=ServiceIdentity(
            trust_domain="11111111-2222-3333-4444-555555555555.consul",
            namespace="default",
            datacenter="dc1",
            service="api",
        ),
        serial="0a",
    )
    for _ in range(2):
        decided: list[Any] = []
        authorizer.authorize(peer, "web").addCallback(decided.append)
        assert decided[0].allowed
    return agent.calls


def test_authorize_cache_zero_asks_the_agent_for_every_connection() -> None:
    assert agent_calls_for_two_connections(0.0) == 2


def test_the_default_authorize_cache_remembers_a_decision() -> None:
    assert agent_calls_for_two_connections(1.0) == 1


# --- two real worker processes -------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(BOUND)
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Backend(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Workers(OutputProcess):
    """``twistd -n connect-native --dev --workers 2`` and what it logged."""

    def __init__(self, work: Path, backend_port: int) -> None:
        super().__init__(
            "twistd",
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "connect-native",
                "--dev",
                "--no-register",
                "--workers",
                "2",
                "--service",
                "web",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--to",
                f"tcp:127.0.0.1:{backend_port}",
                "--shutdown-timeout",
                "2",
            ],
            work,
            child_environment(
                ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE")
            ),
        )

    def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        deadline = time.monotonic() + BOUND
        with self._changed:
            while True:
                found = [m for m in map(re.compile(pattern).search, self.lines) if m]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(
                        f"never logged {pattern!r} {count} times:\n" + self.output()
                    )
                self._changed.wait(remaining)

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(BOUND)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.join_reader()


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def wait_until_gone(pids: list[int]) -> list[int]:
    deadline = time.monotonic() + BOUND
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def accepted_sockets(pid: int, port: int) -> int:
    """How many established sockets with local port ``port`` ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def fetch(agent: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{agent}{path}", timeout=BOUND) as answer:
        return json.load(answer)


def client_context(agent: str, work: Path) -> ssl.SSLContext:
    roots = fetch(agent, "/v1/agent/connect/ca/roots")
    leaf = fetch(agent, "/v1/agent/connect/ca/leaf/api")
    (work / "ca.pem").write_text("".join(r["RootCert"] for r in roots["Roots"]))
    (work / "api.pem").write_text(leaf["CertPEM"] + leaf["PrivateKeyPEM"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # Connect checks the SPIFFE URI, not a name
    context.load_verify_locations(str(work / "ca.pem"))
    context.load_cert_chain(str(work / "api.pem"))
    return context


@pytest.fixture
def backend() -> Iterator[int]:
    server = _Backend(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def workers(backend: int, tmp_path: Path) -> Iterator[Workers]:
    started = Workers(tmp_path, backend)
    try:
        yield started
    finally:
        started.stop()


def test_two_workers_share_the_port_and_both_get_connections(
    workers: Workers, tmp_path: Path
) -> None:
    listening = workers.wait_for(r"accepting Connect .*port=(\d+)\)", count=2)
    port = int(listening[0].group(1))
    assert {int(m.group(1)) for m in listening} == {port}
    agent = workers.wait_for(r"CONSUL_HTTP_ADDR=(127\.0\.0\.1:\d+)")[0].group(1)
    pids = workers.worker_pids()
    assert len(pids) == 1
    processes = [workers.process.pid, *pids]
    context = client_context(agent, tmp_path)

    # The kernel picks a listener by a hash of each connection's addresses:
    # all 24 landing on one of two processes has odds of 2 in 2**24.
    opened: list[ssl.SSLSocket] = []
    try:
        for n in range(24):
            raw = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
            tls = context.wrap_socket(raw)
            message = f"hello {n}\n".encode()
            tls.sendall(message)
            assert tls.recv(100) == message  # forwarded and echoed
            opened.append(tls)
        counts = [accepted_sockets(pid, port) for pid in processes]
    finally:
        for tls in opened:
            tls.close()
    assert sum(counts) == 24, counts
    assert all(count >= 1 for count in counts), counts

    # A SIGTERM to the first process stops the workers too.
    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(BOUND) in (0, -signal.SIGTERM)
    assert wait_until_gone(pids) == []
    assert "worker 1 ended on its own" not in workers.output()


def test_a_worker_stops_when_the_first_process_dies(workers: Workers) -> None:
    workers.wait_for(r"accepting Connect .*port=(\d+)\)", count=2)
    pids = workers.worker_pids()
    assert len(pids) == 1
    # SIGKILL gives the first process no chance to stop its workers: the end
    # of their standard input tells them.
    workers.process.kill()
    workers.process.wait(BOUND)
    assert wait_until_gone(pids) == [], workers.output()
