"""
The terminator memory soak: how much memory ``twistd connect-native`` holds
per idle mutual-TLS connection, and whether its memory stays flat over many
connections opened and closed.

Everything runs on 127.0.0.1 as real processes:

- the development agent, ``python -m connect_native.devagent``, which issues
  the certificates and holds one ``api -> web`` allow intention;
- the terminator, ``twistd -n connect-native --service web --authorize
  intentions``, with the source tree on ``PYTHONPATH``;
- this process: a plaintext echo backend behind ``--to`` and the Connect
  clients (asyncio + the standard ``ssl`` module) presenting the ``api`` leaf
  from the agent and checking the terminator's SPIFFE identity.

Two phases, each against a fresh terminator so one cannot hide the other
(memory freed by closing 5,000 connections would absorb a slow leak):

``idle``
   Open connections up to each checkpoint (1,000, 2,500, 5,000), each making
   one small round trip through the terminator to the backend and back, then
   leave them idle; sample the terminator's resident set (``VmRSS`` in
   ``/proc/<pid>/status``) and open descriptors at each checkpoint and after
   an idle hold; make one more round trip on every connection (none was
   dropped), close them all and check the descriptors are released; then
   open as many again (``--rounds``) and check the resident set grew by at
   most a bounded fraction of what the first round took (the memory of
   closed connections is reused, not leaked).

``cycles``
   Repeatedly open a batch of connections, make a round trip on each, close
   them all, wait for the terminator to release their descriptors, sample.
   After the warm-up cycles the resident set must not grow by more than a
   generous bound: a soak, not a benchmark.

Both processes get ``RLIMIT_NOFILE`` raised to what they need (a terminated
connection holds two descriptors in the terminator, a client connection and
its backend connection two in this process).  Children are stopped (SIGTERM,
then SIGKILL) whatever happens, and die with this process if it is killed.

The result is printed as a table and written as JSON; the exit status is 0
when every check passed, 1 otherwise (with what failed, and the end of the
process's log when a process misbehaved).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import re
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from attrs import field, frozen

SOURCE_TREE = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
MIB = 1024 * 1024

# Descriptors a process needs besides its connections: the listeners, the
# agent's HTTP connections, log files, the interpreter's own.
SPARE_FDS = 512


class SoakError(Exception):
    """The soak could not run (not a measured failure): why, and what to do."""


@frozen
class Settings:
    connections: int = 5000
    checkpoints: tuple[int, ...] = (1000, 2500, 5000)
    cycles: int = 20
    cycle_size: int = 250
    warmup_cycles: int = 5
    concurrency: int = 32
    idle_seconds: float = 5.0
    rounds: int = 2
    authorize: str = "intentions"
    # Pass/fail bounds, deliberately generous (see docs/reliability.rst).
    max_idle_kib: float = 256.0
    max_growth_mib: float = 8.0
    max_reopen_fraction: float = 0.25
    budget_seconds: float = 300.0
    json_path: Path = field(default=Path("soak-memory.json"))


@frozen
class Sample:
    phase: str
    label: str
    open_connections: int
    rss_bytes: int
    fds: int
    elapsed: float

    def as_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "label": self.label,
            "open_connections": self.open_connections,
            "rss_bytes": self.rss_bytes,
            "fds": self.fds,
            "elapsed_seconds": round(self.elapsed, 3),
        }


# --- processes ------------------------------------------------------------------


def raise_open_files(need: int) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to ``need``; the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
        except (ValueError, OSError) as e:
            raise SoakError(
                f"the soak needs {need} open files per process but the hard "
                f"limit (ulimit -Hn) is {hard} and cannot be raised ({e}); "
                "raise it, or run with fewer --connections"
            ) from None
        return need
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    return need


def child_setup(need: int) -> Callable[[], None]:
    """A ``preexec_fn``: the open-files limit, and die when the soak dies."""

    def setup() -> None:
        raise_open_files(need)
        if sys.platform.startswith("linux"):
            pr_set_pdeathsig = 1
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    return setup


class Child:
    """A child process whose output goes to a file we can search."""

    def __init__(self, name: str, args: list[str], work: Path, need_fds: int) -> None:
        self.name = name
        self.log_path = work / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env["PYTHONPATH"] = str(SOURCE_TREE)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 (our own argv)
                args,
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # No threads exist yet in this process, so preexec_fn is safe.
                preexec_fn=child_setup(need_fds),
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    async def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.process.poll() is not None:
                raise SoakError(
                    f"{self.name} exited with {self.process.returncode} before "
                    f"logging {pattern!r}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise SoakError(
                    f"{self.name} did not log {pattern!r} within {timeout:g}s:\n"
                    f"{self.tail()}"
                )
            await asyncio.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    if found is None:
        raise SoakError(f"no VmRSS in /proc/{pid}/status: is the process gone?")
    return int(found.group(1)) * 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def twistd() -> str:
    candidate = Path(sys.executable).parent / "twistd"
    return str(candidate) if candidate.exists() else "twistd"


# --- the agent ------------------------------------------------------------------


@frozen
class Credentials:
    """The ``api`` leaf and the roots, as files for the ``ssl`` module."""

    cert_path: Path
    key_path: Path
    roots_path: Path
    trust_domain: str


def agent_call(address: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{address}{path}", data=data, method=method
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
        return json.loads(answer.read() or b"null")


def prepare_agent(address: str, work: Path) -> Credentials:
    agent_call(
        address,
        "POST",
        "/v1/connect/intentions",
        {"SourceName": "api", "DestinationName": "web", "Action": "allow"},
    )
    leaf = agent_call(address, "GET", "/v1/agent/connect/ca/leaf/api")
    roots = agent_call(address, "GET", "/v1/agent/connect/ca/roots")
    cert_path, key_path = work / "api-cert.pem", work / "api-key.pem"
    roots_path = work / "roots.pem"
    cert_path.write_text(leaf["CertPEM"])
    key_path.write_text(leaf["PrivateKeyPEM"])
    pems = []
    for root in roots["Roots"]:
        pems.append(root["RootCert"])
        pems.extend(root.get("IntermediateCerts") or [])
    roots_path.write_text("\n".join(pems))
    return Credentials(cert_path, key_path, roots_path, roots["TrustDomain"])


def client_context(credentials: Credentials) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Connect identities are SPIFFE URIs, not host names: checked by hand.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(str(credentials.roots_path))
    context.load_cert_chain(str(credentials.cert_path), str(credentials.key_path))
    return context


# --- the backend and the clients ------------------------------------------------


class Backend:
    """A plaintext echo server: what sits behind ``--to``."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._echo, LOOPBACK, 0, backlog=1024)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 10)


class Connection:
    """One Connect client connection through the terminator."""

    def __init__(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.trips = 0

    async def round_trip(self) -> None:
        message = f"soak {self.index} {self.trips}\n".encode()
        self.writer.write(message)
        echoed = await asyncio.wait_for(self.reader.readexactly(len(message)), 30)
        if echoed != message:
            raise SoakError(
                f"connection {self.index}: sent {message!r}, got back {echoed!r}"
            )
        self.trips += 1

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 10)
        except (asyncio.TimeoutError, ConnectionError, ssl.SSLError):
            self.writer.transport.abort()


class Clients:
    def __init__(
        self, port: int, context: ssl.SSLContext, expected_uri: str, concurrency: int
    ) -> None:
        self.port = port
        self.context = context
        self.expected_uri = expected_uri
        self.concurrency = concurrency
        self.opened = 0

    async def open(self) -> Connection:
        index = self.opened
        self.opened += 1
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(LOOPBACK, self.port, ssl=self.context), 30
        )
        peer = writer.get_extra_info("ssl_object").getpeercert()
        uris = [v for k, v in peer.get("subjectAltName", ()) if k == "URI"]
        if uris != [self.expected_uri]:
            writer.close()
            raise SoakError(
                f"connection {index}: the terminator presented {uris}, "
                f"expected [{self.expected_uri!r}]"
            )
        connection = Connection(index, reader, writer)
        await connection.round_trip()
        return connection

    async def open_many(self, count: int) -> list[Connection]:
        return await self._bounded([self.open for _ in range(count)])

    async def round_trips(self, connections: Sequence[Connection]) -> None:
        await self._bounded([c.round_trip for c in connections])

    async def close_all(self, connections: Sequence[Connection]) -> None:
        await self._bounded([c.close for c in connections])

    async def _bounded(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(job: Callable[[], Any]) -> Any:
            async with gate:
                return await job()

        return list(await asyncio.gather(*(one(job) for job in jobs)))


# --- the phases -----------------------------------------------------------------


class Terminator:
    def __init__(
        self,
        settings: Settings,
        work: Path,
        agent_address: str,
        backend_port: int,
        name: str,
    ) -> None:
        self.port = free_port()
        self.child = Child(
            name,
            [
                twistd(),
                "-n",
                "--pidfile=",
                "connect-native",
                "--service",
                "web",
                "--listen",
                f"tcp:{self.port}:interface={LOOPBACK}:backlog=1024",
                "--to",
                f"tcp:{LOOPBACK}:{backend_port}",
                "--consul",
                f"http://{agent_address}",
                "--authorize",
                settings.authorize,
                "--max-connections",
                str(settings.connections + settings.cycle_size + 100),
            ],
            work,
            need_fds=2 * max(settings.connections, settings.cycle_size) + SPARE_FDS,
        )

    async def started(self) -> None:
        await self.child.wait_for("accepting Connect", 60)

    def sample(
        self, phase: str, label: str, open_connections: int, t0: float
    ) -> Sample:
        pid = self.child.pid
        return Sample(
            phase,
            label,
            open_connections,
            rss_bytes(pid),
            open_fds(pid),
            time.monotonic() - t0,
        )

    async def released(self, fds: int, timeout: float = 30.0) -> None:
        """Wait until the terminator holds at most ``fds`` descriptors."""
        deadline = time.monotonic() + timeout
        while (held := open_fds(self.child.pid)) > fds:
            if time.monotonic() > deadline:
                raise SoakError(
                    f"{self.child.name} still holds {held} descriptors "
                    f"{timeout:g}s after its clients closed (expected <= {fds})"
                )
            await asyncio.sleep(0.05)


# Descriptors the terminator may hold above its idle count after all its
# clients closed: an agent HTTP connection opening or closing.
FD_SLACK = 4
WARMUP_CONNECTIONS = 50


async def warm_up(terminator: Terminator, clients: Clients) -> int:
    """
    One batch of connections opened and closed before the baseline, so
    one-time work (imports, the first authorization) is not counted as per
    connection; the descriptors held when idle.
    """
    idle_fds = open_fds(terminator.child.pid)
    await clients.close_all(await clients.open_many(WARMUP_CONNECTIONS))
    await terminator.released(idle_fds + FD_SLACK)
    await asyncio.sleep(1.0)
    return open_fds(terminator.child.pid)


async def idle_phase(
    settings: Settings, terminator: Terminator, clients: Clients, report: Report
) -> None:
    t0 = time.monotonic()
    idle_fds = await warm_up(terminator, clients)
    report.add(terminator.sample("idle", "baseline", 0, t0))
    connections: list[Connection] = []
    for checkpoint in settings.checkpoints:
        connections += await clients.open_many(checkpoint - len(connections))
        await asyncio.sleep(1.0)
        report.add(terminator.sample("idle", f"{checkpoint} idle", checkpoint, t0))
    await asyncio.sleep(settings.idle_seconds)
    report.add(
        terminator.sample(
            "idle", f"after {settings.idle_seconds:g}s idle", len(connections), t0
        )
    )
    await clients.round_trips(connections)
    report.idle_answered = sum(c.trips == 2 for c in connections)
    await clients.close_all(connections)
    await terminator.released(idle_fds + FD_SLACK)
    await asyncio.sleep(1.0)
    report.add(terminator.sample("idle", "all closed", 0, t0))
    # The memory is not given back to the system when they close; opening as
    # many again shows whether it is reused (or was leaked).
    for round_ in range(2, settings.rounds + 1):
        connections = await clients.open_many(settings.connections)
        await asyncio.sleep(1.0)
        report.add(
            terminator.sample("idle", f"round {round_} open", settings.connections, t0)
        )
        await clients.close_all(connections)
        await terminator.released(idle_fds + FD_SLACK)
        report.add(terminator.sample("idle", f"round {round_} closed", 0, t0))


async def cycles_phase(
    settings: Settings, terminator: Terminator, clients: Clients, report: Report
) -> None:
    t0 = time.monotonic()
    idle_fds = await warm_up(terminator, clients)
    report.add(terminator.sample("cycles", "baseline", 0, t0))
    for cycle in range(1, settings.cycles + 1):
        batch = await clients.open_many(settings.cycle_size)
        await clients.close_all(batch)
        await terminator.released(idle_fds + FD_SLACK)
        report.add(terminator.sample("cycles", f"cycle {cycle}", 0, t0))


# --- the report -----------------------------------------------------------------


class Report:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.samples: list[Sample] = []
        self.idle_answered = 0
        self.failures: list[str] = []
        self.conditions: dict[str, Any] = {}

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        print(
            f"  {sample.phase:6} {sample.label:>16}: "
            f"RSS {sample.rss_bytes / MIB:8.1f} MiB, {sample.fds:6} fds "
            f"({sample.elapsed:6.1f}s)",
            flush=True,
        )

    def phase(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.phase == name]

    def idle_figures(self) -> dict[str, Any]:
        samples = {s.label: s for s in self.phase("idle")}
        s = self.settings
        baseline = samples.get("baseline")
        first = samples.get(f"{s.checkpoints[0]} idle")
        full = samples.get(f"{s.connections} idle")
        if baseline is None or first is None or full is None:
            return {}
        closed = samples.get("all closed")
        again = [
            samples[f"round {r} open"].rss_bytes
            for r in range(2, s.rounds + 1)
            if f"round {r} open" in samples
        ]
        growth = max(again) - full.rss_bytes if again else None
        return {
            "bytes_per_connection": (full.rss_bytes - baseline.rss_bytes)
            / s.connections,
            # The slope past the first checkpoint leaves out heap the process
            # had already reserved but not touched.
            "marginal_bytes_per_connection": (full.rss_bytes - first.rss_bytes)
            / (s.connections - s.checkpoints[0]),
            "fds_per_connection": (full.fds - baseline.fds) / s.connections,
            "rss_closed_bytes": closed.rss_bytes if closed else None,
            "rounds_open_rss_bytes": [full.rss_bytes, *again],
            "reopen_growth_bytes": growth,
            "reopen_growth_fraction": None
            if growth is None
            else growth / max(1, full.rss_bytes - baseline.rss_bytes),
        }

    def cycle_figures(self) -> dict[str, Any]:
        samples = self.phase("cycles")
        s = self.settings
        cycles = [x for x in samples if x.label.startswith("cycle ")]
        if len(cycles) < s.cycles:
            return {}
        after_warmup = cycles[s.warmup_cycles - 1].rss_bytes
        later = [x.rss_bytes for x in cycles[s.warmup_cycles :]]
        growth = max(later, default=after_warmup) - after_warmup
        return {
            "connections": s.cycles * s.cycle_size,
            "rss_after_warmup_bytes": after_warmup,
            "rss_max_after_warmup_bytes": max(later, default=after_warmup),
            "rss_final_bytes": cycles[-1].rss_bytes,
            "growth_after_warmup_bytes": growth,
            "growth_per_connection_after_warmup_bytes": growth
            / max(1, (s.cycles - s.warmup_cycles) * s.cycle_size),
        }

    def judge(self) -> None:
        s = self.settings
        idle = self.idle_figures()
        if not idle:
            self.failures.append("the idle phase did not finish")
        else:
            if self.idle_answered != s.connections:
                self.failures.append(
                    f"only {self.idle_answered} of {s.connections} idle "
                    "connections answered after the idle hold"
                )
            fraction = idle["reopen_growth_fraction"]
            if s.rounds > 1 and len(idle["rounds_open_rss_bytes"]) < s.rounds:
                self.failures.append("the idle phase did not finish its rounds")
            elif fraction is not None and fraction > s.max_reopen_fraction:
                self.failures.append(
                    f"opening {s.connections} connections again after closing "
                    f"them grew RSS by {idle['reopen_growth_bytes'] / MIB:.1f} "
                    f"MiB, {fraction:.0%} of what the first {s.connections} "
                    f"took, over the bound of {s.max_reopen_fraction:.0%}"
                )
            per = idle["marginal_bytes_per_connection"]
            if per > s.max_idle_kib * 1024:
                self.failures.append(
                    f"{per / 1024:.1f} KiB per idle connection, over the "
                    f"bound of {s.max_idle_kib:g} KiB"
                )
        cycles = self.cycle_figures()
        if not cycles:
            self.failures.append("the cycles phase did not finish")
        elif cycles["growth_after_warmup_bytes"] > s.max_growth_mib * MIB:
            self.failures.append(
                f"RSS grew {cycles['growth_after_warmup_bytes'] / MIB:.1f} MiB "
                f"after the {s.warmup_cycles} warm-up cycles, over the bound of "
                f"{s.max_growth_mib:g} MiB"
            )

    def as_json(self) -> dict[str, Any]:
        s = self.settings
        return {
            "settings": {
                "connections": s.connections,
                "checkpoints": list(s.checkpoints),
                "cycles": s.cycles,
                "cycle_size": s.cycle_size,
                "warmup_cycles": s.warmup_cycles,
                "concurrency": s.concurrency,
                "idle_seconds": s.idle_seconds,
                "authorize": s.authorize,
                "max_idle_kib": s.max_idle_kib,
                "max_growth_mib": s.max_growth_mib,
                "rounds": s.rounds,
                "max_reopen_fraction": s.max_reopen_fraction,
            },
            "conditions": self.conditions,
            "samples": [x.as_json() for x in self.samples],
            "idle": self.idle_figures(),
            "cycles": self.cycle_figures(),
            "passed": not self.failures,
            "failures": self.failures,
        }

    def print_summary(self) -> None:
        idle, cycles = self.idle_figures(), self.cycle_figures()
        print()
        print("terminator memory soak")
        print(f"  {'phase':6} {'point':>16} {'conns':>6} {'RSS MiB':>9} {'fds':>6}")
        for x in self.samples:
            print(
                f"  {x.phase:6} {x.label:>16} {x.open_connections:6} "
                f"{x.rss_bytes / MIB:9.1f} {x.fds:6}"
            )
        if idle:
            print(
                f"  per idle connection: "
                f"{idle['bytes_per_connection'] / 1024:.1f} KiB from the baseline, "
                f"{idle['marginal_bytes_per_connection'] / 1024:.1f} KiB past "
                f"{self.settings.checkpoints[0]}, "
                f"{idle['fds_per_connection']:.2f} fds"
            )
            if idle["reopen_growth_fraction"] is not None:
                print(
                    f"  {self.settings.connections} again after closing, "
                    f"{self.settings.rounds - 1} time(s): RSS peak "
                    f"{idle['reopen_growth_bytes'] / MIB:+.1f} MiB "
                    f"({idle['reopen_growth_fraction']:.0%} of the first round's; "
                    f"bound {self.settings.max_reopen_fraction:.0%})"
                )
        if cycles:
            print(
                f"  cycles: {cycles['connections']} connections, RSS after "
                f"warm-up {cycles['rss_after_warmup_bytes'] / MIB:.1f} MiB, "
                f"max after {cycles['rss_max_after_warmup_bytes'] / MIB:.1f} MiB "
                f"(+{cycles['growth_after_warmup_bytes'] / MIB:.1f} MiB, "
                f"bound {self.settings.max_growth_mib:g} MiB)"
            )
        print("  PASSED" if not self.failures else "  FAILED:")
        for failure in self.failures:
            print(f"    - {failure}")


def conditions() -> dict[str, Any]:
    import OpenSSL.SSL

    import twisted

    return {
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyopenssl_openssl": OpenSSL.SSL.OpenSSL_version(
            OpenSSL.SSL.OPENSSL_VERSION
        ).decode(),
        "client_openssl": ssl.OPENSSL_VERSION,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg(),
    }


# --- running it -----------------------------------------------------------------


@contextlib.contextmanager
def stopping(children: list[Child]) -> Iterator[None]:
    try:
        yield
    finally:
        for child in reversed(children):
            child.stop()


async def run(settings: Settings, work: Path, report: Report) -> None:
    children: list[Child] = []
    with stopping(children):
        agent = Child(
            "devagent",
            [sys.executable, "-m", "connect_native.devagent", "--port", "0"],
            work,
            need_fds=SPARE_FDS,
        )
        children.append(agent)
        found = await agent.wait_for(r"listening on http://([\d.]+:\d+)", 30)
        address = found.group(1)
        credentials = prepare_agent(address, work)
        context = client_context(credentials)
        expected_uri = f"spiffe://{credentials.trust_domain}/ns/default/dc/dc1/svc/web"
        backend = Backend()
        backend_port = await backend.start()
        try:
            for phase, body in (("idle", idle_phase), ("cycles", cycles_phase)):
                print(f"{phase}: starting a fresh terminator", flush=True)
                terminator = Terminator(
                    settings, work, address, backend_port, f"terminator-{phase}"
                )
                children.append(terminator.child)
                await terminator.started()
                clients = Clients(
                    terminator.port, context, expected_uri, settings.concurrency
                )
                await body(settings, terminator, clients, report)
                code = terminator.child.stop()
                if code not in (0, -signal.SIGTERM):
                    report.failures.append(
                        f"terminator ({phase}) exited with {code}:\n"
                        f"{terminator.child.tail()}"
                    )
        finally:
            await backend.stop()


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m soak",
        description="Memory soak of twistd connect-native on 127.0.0.1.",
    )
    defaults = Settings()
    parser.add_argument("--connections", type=int, default=defaults.connections)
    parser.add_argument(
        "--checkpoints",
        default=",".join(map(str, defaults.checkpoints)),
        help="comma-separated open-connection counts to sample at; "
        "the last must equal --connections",
    )
    parser.add_argument("--cycles", type=int, default=defaults.cycles)
    parser.add_argument("--cycle-size", type=int, default=defaults.cycle_size)
    parser.add_argument("--warmup-cycles", type=int, default=defaults.warmup_cycles)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--idle-seconds", type=float, default=defaults.idle_seconds)
    parser.add_argument(
        "--authorize", choices=("agent", "intentions"), default=defaults.authorize
    )
    parser.add_argument("--max-idle-kib", type=float, default=defaults.max_idle_kib)
    parser.add_argument("--max-growth-mib", type=float, default=defaults.max_growth_mib)
    parser.add_argument("--budget-seconds", type=float, default=defaults.budget_seconds)
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="times the idle phase opens --connections (1 = no reopening)",
    )
    parser.add_argument(
        "--max-reopen-fraction", type=float, default=defaults.max_reopen_fraction
    )
    parser.add_argument("--json", type=Path, default=defaults.json_path)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run to check the harness (200 connections, 4 cycles of 50)",
    )
    args = parser.parse_args(list(argv))
    if args.quick:
        args.connections, args.checkpoints = 200, "50,100,200"
        args.cycles, args.cycle_size, args.warmup_cycles = 4, 50, 2
        args.idle_seconds = 2.0
    try:
        checkpoints = tuple(int(x) for x in args.checkpoints.split(","))
    except ValueError:
        parser.error(f"--checkpoints must be whole numbers, not {args.checkpoints!r}")
    if list(checkpoints) != sorted(set(checkpoints)) or checkpoints[0] < 1:
        parser.error("--checkpoints must be increasing and >= 1")
    if checkpoints[-1] != args.connections:
        parser.error("the last of --checkpoints must equal --connections")
    if not 1 <= args.warmup_cycles < args.cycles:
        parser.error("--warmup-cycles must be >= 1 and below --cycles")
    for name in ("cycle_size", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return Settings(
        connections=args.connections,
        checkpoints=checkpoints,
        cycles=args.cycles,
        cycle_size=args.cycle_size,
        warmup_cycles=args.warmup_cycles,
        concurrency=args.concurrency,
        idle_seconds=args.idle_seconds,
        authorize=args.authorize,
        max_idle_kib=args.max_idle_kib,
        max_growth_mib=args.max_growth_mib,
        rounds=args.rounds,
        max_reopen_fraction=args.max_reopen_fraction,
        budget_seconds=args.budget_seconds,
        json_path=args.json,
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    report = Report(settings)
    started = time.monotonic()
    try:
        # Each client connection and its backend connection live here.
        raise_open_files(2 * max(settings.connections, settings.cycle_size) + SPARE_FDS)
        report.conditions = conditions()
        with tempfile.TemporaryDirectory(prefix="soak-") as work:
            asyncio.run(
                asyncio.wait_for(
                    run(settings, Path(work), report), settings.budget_seconds
                )
            )
    except SoakError as e:
        report.failures.append(str(e))
    except asyncio.TimeoutError:
        report.failures.append(
            f"the soak did not finish within {settings.budget_seconds:g}s"
        )
    report.conditions["seconds"] = round(time.monotonic() - started, 1)
    report.conditions["load_average_end"] = os.getloadavg()
    report.judge()
    report.print_summary()
    settings.json_path.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    print(f"  written to {settings.json_path}")
    return 0 if not report.failures else 1
