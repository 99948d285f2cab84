"""
Start and stop real ``consul agent -dev`` processes on loopback for the tests.

Every port (HTTP, DNS, serf LAN/WAN, server RPC, gRPC) is chosen free, the
agent is ready once ``/v1/agent/connect/ca/roots`` answers, and it is stopped
by PID.  This runs in pytest fixtures, before and after a test, never on the
reactor's thread while the reactor is serving a test.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

MASTER_TOKEN_PREFIX = "root"


def free_ports(count: int) -> list[int]:
    """
    Ports that are free on 127.0.0.1 right now (TCP and UDP both, for DNS and
    serf).
    """
    ports: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                tcp.close()
                udp.close()
                continue
            held.extend([tcp, udp])
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


class AgentFailed(Exception):
    pass


# Loaded here, not in the child: importing after fork can deadlock when
# another thread held the import lock.
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _libc = None


def _die_with_parent() -> None:
    """
    In the child, before exec: ask Linux to kill the agent when the test
    process dies, so that a killed test run leaves no agent behind.
    """
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RealConsulAgent:
    """
    One ``consul agent -dev`` process.

    ``http_address`` is ``127.0.0.1:<port>``; with ``acl=True`` the agent has
    ACLs on with default deny and ``master_token`` as its master token.
    """

    def __init__(
        self,
        binary: Path,
        *,
        acl: bool = False,
        extra_hcl: str = "",
        node_name: str = "testnode",
        data_dir: Path | None = None,
    ) -> None:
        self.binary = binary
        self.acl = acl
        self.extra_hcl = extra_hcl
        self.node_name = node_name
        # With a data directory the agent is a one-node server
        # (``-server -bootstrap-expect=1``) that keeps its CA across restarts,
        # instead of ``-dev``, which starts from nothing each time.
        self.data_dir = data_dir
        self.master_token = str(uuid.uuid4()) if acl else None
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.log_path: Path | None = None

    @property
    def http_port(self) -> int:
        return self.ports["http"]

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def dns_port(self) -> int:
        return self.ports["dns"]

    def _hcl(self) -> str:
        parts = [self.extra_hcl]
        if self.acl:
            parts.append(
                'acl { enabled = true\n default_policy = "deny"\n'
                " enable_token_persistence = false\n"
                f' tokens {{ master = "{self.master_token}" }} }}'
            )
        return "\n".join(p for p in parts if p)

    def start(self, timeout: float = 30.0) -> None:
        last_error: Exception | None = None
        for _attempt in range(3):
            try:
                self._start_once(timeout)
                return
            except AgentFailed as e:
                last_error = e
                self.stop()
        raise AgentFailed(f"consul agent did not start: {last_error}")

    def restart(self, timeout: float = 30.0, *, kill: bool = True) -> None:
        """
        Stop the agent (SIGKILL, as a crash, unless ``kill`` is false) and
        start it again on the same ports (a ``-dev`` agent comes back with a
        new CA and trust domain; one with a ``data_dir`` with its old state).
        """
        if kill:
            self.kill()
        else:
            self._terminate()
        last_error: Exception | None = None
        for _attempt in range(3):
            try:
                self._start_once(timeout, same_ports=True)
                return
            except AgentFailed as e:
                last_error = e
                self._terminate()
        raise AgentFailed(f"consul agent did not restart: {last_error}")

    def _start_once(self, timeout: float, *, same_ports: bool = False) -> None:
        if not same_ports:
            http, dns, serf_lan, serf_wan, server, grpc = free_ports(6)
            self.ports = {
                "http": http,
                "dns": dns,
                "serf_lan": serf_lan,
                "serf_wan": serf_wan,
                "server": server,
                "grpc": grpc,
            }
        ports = self.ports
        if self.log_path is None:
            fd, log_name = tempfile.mkstemp(prefix="consul-agent-", suffix=".log")
            os.close(fd)
            self.log_path = Path(log_name)
        mode = (
            ["-dev"]
            if self.data_dir is None
            else [
                "-server",
                "-bootstrap-expect=1",
                f"-data-dir={self.data_dir}",
                "-hcl=connect { enabled = true }\nperformance { raft_multiplier = 1 }",
            ]
        )
        argv = [
            str(self.binary),
            "agent",
            *mode,
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            f"-node={self.node_name}",
            f"-http-port={ports['http']}",
            f"-dns-port={ports['dns']}",
            f"-serf-lan-port={ports['serf_lan']}",
            f"-serf-wan-port={ports['serf_wan']}",
            f"-server-port={ports['server']}",
            f"-grpc-port={ports['grpc']}",
            "-log-level=warn",
        ]
        hcl = self._hcl()
        if hcl:
            argv.append(f"-hcl={hcl}")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_address}/v1/agent/connect/ca/roots"
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AgentFailed(
                    f"exited with {self.process.returncode}: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = json.loads(response.read())
                    if response.status == 200 and body.get("Roots"):
                        return
            except (OSError, ValueError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise AgentFailed(f"not ready after {timeout}s: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.kill(process.pid, signal.SIGTERM)
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self._terminate()
        if self.log_path is not None:
            try:
                self.log_path.unlink()
            except OSError:
                pass
            self.log_path = None

    def kill(self) -> None:
        """
        SIGKILL, as a crash would.
        """
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    # Synchronous admin calls, for fixtures and setup only (never on the
    # reactor while it serves a test).

    def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://{self.http_address}{path}", data=data, method=method
        )
        token = token if token is not None else self.master_token
        if token:
            req.add_header("X-Consul-Token", token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
