"""
The terminator benchmark: ``twistd connect-native`` side by side with nginx
(stream module), haproxy and stunnel4, in one interleaved run.

Every target gets the same Consul-issued certificates (from the development
agent, ``python -m connect_native.devagent``, over TCP), requires client
certificates, and forwards to the same plaintext backend.  The servers run on
core 0 (``taskset``); the load generator, the backend and the agent on core 1.
Only 127.0.0.1 is used, and every wait is bounded.

Figures, each the median over the repetitions (the targets take turns within
each repetition, in a rotating order):

- ``cpu_us_per_conn``: CPU (user + system, from ``/proc/<pid>/stat``, summed
  over the server's process tree) per new mutual-TLS connection: a full
  handshake, the authorization, a backend connection, a 3-byte request and a
  3-byte answer, the close;
- ``conns_per_s``: those connections per second (bounded by the load
  generator on one core: compare ``cpu_us_per_conn`` rather);
- ``bulk1_mib_s`` / ``bulk8_mib_s``: download MiB/s (the server encrypts)
  over 1 and over 8 connections, with ``cpu_s_per_gib`` (over 8);
- ``rtt_p50_us`` / ``rtt_p99_us``: round trip of a 64-byte message on an
  open connection, with ``cpu_us_per_req``.

Run ``python benchmarks/bench.py --help``; ``benchmarks/README.md`` says
more.
"""

# The harness runs fixed programs (apt-get, nginx, haproxy, stunnel4, twistd)
# and reads the development agent's http:// API on 127.0.0.1.
# ruff: noqa: S603, S607, S310

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import socketserver
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
SERVER_CORE = 0
LOAD_CORE = 1
#: The cores the servers and the load run on (``--server-cores``,
#: ``--load-cores``; by default core 0 and core 1).
CORES: dict[str, list[int]] = {"server": [SERVER_CORE], "load": [LOAD_CORE]}
STEP_BOUND = 120.0  # seconds any one wait may take
WEB = "bench-web"
CLIENT = "bench-client"
REQUEST_SIZE = 64
CLK_TCK = os.sysconf("SC_CLK_TCK")

PACKAGES = ("stunnel4", "nginx-light", "libnginx-mod-stream", "haproxy")
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- setup ---------------------------------------------------------------------


def ensure_packages(install: bool) -> None:
    """nginx, haproxy and stunnel4 from Debian, installed when missing."""
    missing = [
        name
        for name, present in (
            ("nginx", shutil.which("nginx", path="/usr/sbin:/usr/bin")),
            ("haproxy", shutil.which("haproxy", path="/usr/sbin:/usr/bin")),
            ("stunnel4", shutil.which("stunnel4", path="/usr/bin:/usr/sbin")),
            ("stream module", os.path.exists(NGINX_STREAM_MODULE) or None),
        )
        if not present
    ]
    if not missing:
        return
    if not install:
        raise SystemExit(
            f"missing: {', '.join(missing)}; install the Debian packages "
            f"{' '.join(PACKAGES)} (or drop --no-install)"
        )
    log(f"missing {', '.join(missing)}: apt-get install {' '.join(PACKAGES)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", *PACKAGES], check=True, env=env, timeout=900
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: str, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", core, *argv]


def cores_text(role: str) -> str:
    """The cores of ``role`` (``server`` or ``load``) as ``taskset -c`` takes them."""
    return ",".join(map(str, CORES[role]))


def load_cores() -> set[int]:
    return set(CORES["load"])


def parse_cores(text: str) -> list[int]:
    """``0``, ``0,2`` or ``0-7,16-23`` as a list of cores."""
    found: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        found.extend(range(int(first), int(last or first) + 1))
    if not found:
        raise ValueError(text)
    return found


def package_path() -> str:
    """
    Where ``connect_native`` is imported from (installed, as under tox, or
    else the source tree this script is in), for the subprocesses.
    """
    try:
        import connect_native
    except ImportError:
        sys.path.insert(0, str(HERE.parent))
        import connect_native

    return str(Path(connect_native.__file__).resolve().parent.parent)


def http(agent: str, method: str, path: str, body: object = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{agent}{path}", data=data, method=method)
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


class Processes:
    """Every process the harness starts, stopped at the end whatever happens."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: list[str], log_path: Path, **kw: Any
    ) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab")
        # In the work directory: ``python -c`` puts the working directory
        # first on sys.path, so started from a source tree, every server
        # would import that tree's connect_native whatever PYTHONPATH (a
        # --variant's tree) says.
        kw.setdefault("cwd", log_path.parent)
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw
        )
        out.close()
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.started):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def start_agent(procs: Processes, work: Path) -> tuple[str, int]:
    port = free_port()
    process = procs.start(
        pinned(
            cores_text("load"),
            [
                sys.executable,
                "-m",
                "connect_native.devagent",
                "--port",
                str(port),
                "--quiet",
            ],
        ),
        work / "devagent.log",
        env=dict(os.environ, PYTHONPATH=package_path()),
    )
    agent = f"127.0.0.1:{port}"
    deadline = time.monotonic() + STEP_BOUND
    while True:
        try:
            http(agent, "GET", "/v1/agent/connect/ca/roots")
            return agent, process.pid
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(
                    f"the development agent did not start; see {work}/devagent.log"
                ) from None
            time.sleep(0.1)


def issue_certificates(agent: str, work: Path) -> dict[str, str]:
    """The root, a leaf for the server and one for the client, as files."""
    roots = http(agent, "GET", "/v1/agent/connect/ca/roots")
    web = http(agent, "GET", f"/v1/agent/connect/ca/leaf/{WEB}")
    client = http(agent, "GET", f"/v1/agent/connect/ca/leaf/{CLIENT}")
    files = {
        "ca": "".join(r["RootCert"] for r in roots["Roots"]),
        "web_cert": web["CertPEM"],
        "web_key": web["PrivateKeyPEM"],
        "web_pem": web["CertPEM"] + web["PrivateKeyPEM"],
        "client_cert": client["CertPEM"],
        "client_key": client["PrivateKeyPEM"],
    }
    paths = {}
    for name, text in files.items():
        path = work / f"{name}.pem"
        path.write_text(text)
        path.chmod(0o600)
        paths[name] = str(path)
    # An explicit allow, so that the intentions authorizer decides by an
    # intention rather than by the default.
    http(
        agent,
        "POST",
        "/v1/connect/intentions",
        {"SourceName": CLIENT, "DestinationName": WEB, "Action": "allow"},
    )
    return paths


# --- the backend ---------------------------------------------------------------


class _BackendHandler(socketserver.BaseRequestHandler):
    """
    ``C\\n``: answers ``ok\\n`` and closes; ``D <n>\\n``: sends n bytes and
    closes; ``E\\n``: echoes until the client closes.
    """

    BLOCK = memoryview(b"x" * (1 << 20))

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(STEP_BOUND)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            head = b""
            while b"\n" not in head:
                data = sock.recv(256)
                if not data:
                    return
                head += data
            line, _, rest = head.partition(b"\n")
            if line == b"C":
                sock.sendall(b"ok\n")
            elif line.startswith(b"D "):
                left = int(line[2:])
                while left > 0:
                    chunk = self.BLOCK[: min(left, len(self.BLOCK))]
                    sock.sendall(chunk)
                    left -= len(chunk)
            elif line == b"E":
                if rest:
                    sock.sendall(rest)
                while data := sock.recv(65536):
                    sock.sendall(data)
        except OSError:
            pass  # a client that went away: nothing to report


class _Backend(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def _serve_backend(port: int) -> None:
    os.sched_setaffinity(0, load_cores())
    _Backend(("127.0.0.1", port), _BackendHandler).serve_forever()


# --- the targets ---------------------------------------------------------------


class Target:
    """One server under test."""

    kind = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.core = cores_text("server")
        #: A tool the server runs under (``--counts``: valgrind), or nothing.
        self.wrap: list[str] = []

    def argv(self, work: Path, certs: dict[str, str], backend: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def start(
        self, procs: Processes, work: Path, certs: dict[str, str], backend: int
    ) -> None:
        self.process = procs.start(
            pinned(self.core, [*self.wrap, *self.argv(work, certs, backend)]),
            work / f"{self.name}.log",
            env=self.env(),
        )

    def pids(self) -> list[int]:
        """The server's process and all its descendants."""
        assert self.process is not None
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                tasks = Path(f"/proc/{pid}/task").iterdir()
                for task in tasks:
                    todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
        return found


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def template(name: str, **values: str | int) -> str:
    text = (CONFIGS / name).read_text()
    for key, value in values.items():
        text = text.replace("@" + key + "@", str(value))
    return text


class Nginx(Target):
    kind = "nginx"

    def argv(self, work: Path, certs: dict[str, str], backend: int) -> list[str]:
        conf = work / "nginx.conf"
        conf.write_text(
            template(
                "nginx.conf.in",
                MODULE=NGINX_STREAM_MODULE,
                PID=work / "nginx.pid",
                ERROR_LOG=work / "nginx-error.log",
                PORT=self.port,
                BACKEND=backend,
                CERT=certs["web_cert"],
                KEY=certs["web_key"],
                CA=certs["ca"],
            )
        )
        return [
            "nginx",
            "-p",
            str(work),
            "-c",
            str(conf),
            "-e",
            str(work / "nginx-error.log"),
        ]


class HAProxy(Target):
    kind = "haproxy"

    def argv(self, work: Path, certs: dict[str, str], backend: int) -> list[str]:
        conf = work / "haproxy.cfg"
        conf.write_text(
            template(
                "haproxy.cfg.in",
                PORT=self.port,
                BACKEND=backend,
                PEM=certs["web_pem"],
                CA=certs["ca"],
            )
        )
        return ["haproxy", "-db", "-f", str(conf)]


class Stunnel(Target):
    kind = "stunnel4"

    def argv(self, work: Path, certs: dict[str, str], backend: int) -> list[str]:
        conf = work / "stunnel.conf"
        conf.write_text(
            template(
                "stunnel.conf.in",
                PORT=self.port,
                BACKEND=backend,
                CERT=certs["web_cert"],
                KEY=certs["web_key"],
                CA=certs["ca"],
                LOG=work / "stunnel-connections.log",
            )
        )
        return ["stunnel4", str(conf)]


class ConnectNative(Target):
    kind = "connect-native"

    def __init__(
        self,
        name: str,
        agent: str,
        authorize: str,
        cache: float | None = None,
        workers: int = 1,
        source: str | None = None,
        log_allowed: bool = True,
        tls_transport: str | None = None,
        reactor: str | None = None,
    ) -> None:
        super().__init__(name)
        self.reactor = reactor
        self.source = source
        self.log_allowed = log_allowed
        self.tls_transport = tls_transport
        self.agent = agent
        self.authorize = authorize
        self.cache = cache
        self.workers = workers
        if workers > 1 and len(CORES["server"]) < workers:
            # Fewer server cores than workers (2 on a 2-core machine): the
            # load's cores too, since a second worker pinned beside the first
            # shows nothing.
            self.core = f"{cores_text('server')},{cores_text('load')}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=self.source or package_path())
        for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
            env.pop(name, None)
        return env

    def argv(self, work: Path, certs: dict[str, str], backend: int) -> list[str]:
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            f"--logfile={work / (self.name + '-twistd.log')}",
            *([] if self.reactor is None else ["--reactor", self.reactor]),
            "connect-native",
            "--service",
            WEB,
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1:backlog=1024",
            "--to",
            f"tcp:127.0.0.1:{backend}",
            "--consul",
            f"http://{self.agent}",
            "--no-register",
            "--authorize",
            self.authorize,
            "--max-connections",
            "4000",
        ]
        if self.cache is not None:
            argv += ["--authorize-cache", repr(self.cache)]
        if self.workers > 1:
            argv += ["--workers", str(self.workers)]
        if not self.log_allowed:
            argv.append("--no-log-allowed")
        if self.tls_transport is not None:
            argv += ["--tls-transport", self.tls_transport]
        return argv


# --- the load ------------------------------------------------------------------


def client_context(certs: dict[str, str], with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # Connect checks the SPIFFE URI, not a name
    context.load_verify_locations(certs["ca"])
    if with_cert:
        context.load_cert_chain(certs["client_cert"], certs["client_key"])
    return context


def connect(context: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return context.wrap_socket(raw)


def read_exactly(tls: ssl.SSLSocket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        data = tls.recv(size - len(got))
        if not data:
            break
        got += data
    return got


def one_request(
    context: ssl.SSLContext, port: int, times: list[float] | None = None
) -> bool:
    """
    One connection, one request: with ``times``, appends how long the
    connect + handshake took, then the request, in ms.
    """
    started = time.perf_counter()
    with connect(context, port) as tls:
        shaken = time.perf_counter()
        tls.sendall(b"C\n")
        ok = read_exactly(tls, 3) == b"ok\n"
        answered = time.perf_counter()
    if times is not None:
        times.extend(((shaken - started) * 1e3, (answered - shaken) * 1e3))
    return ok


def _conn_client(certs: dict[str, str], port: int, seconds: float) -> dict[str, Any]:
    context = client_context(certs)
    done = errors = 0
    handshakes: list[float] = []
    requests: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        times: list[float] = []
        try:
            if one_request(context, port, times):
                done += 1
                handshakes.append(times[0])
                requests.append(times[1])
            else:
                errors += 1
        except (OSError, ssl.SSLError):
            errors += 1
    return {
        "done": done,
        "errors": errors,
        "handshakes": handshakes,
        "requests": requests,
    }


def _bulk_client(
    certs: dict[str, str], port: int, size: int, seconds: float
) -> dict[str, Any]:
    context = client_context(certs)
    buffer = bytearray(1 << 18)
    got = 0
    with connect(context, port) as tls:
        started = time.perf_counter()
        tls.sendall(f"D {size}\n".encode())
        deadline = time.monotonic() + seconds
        while got < size and time.monotonic() < deadline:
            n = tls.recv_into(buffer)
            if not n:
                break
            got += n
        elapsed = time.perf_counter() - started
    return {"bytes": got, "seconds": elapsed, "errors": int(got < size)}


def _rtt_client(certs: dict[str, str], port: int, count: int) -> dict[str, Any]:
    context = client_context(certs)
    message = b"m" * REQUEST_SIZE
    samples = []
    with connect(context, port) as tls:
        tls.sendall(b"E\n")
        for i in range(count + 50):
            started = time.perf_counter_ns()
            tls.sendall(message)
            if len(read_exactly(tls, REQUEST_SIZE)) != REQUEST_SIZE:
                return {"samples": samples, "errors": 1}
            if i >= 50:  # the first ones warm up
                samples.append((time.perf_counter_ns() - started) / 1000)
    return {"samples": samples, "errors": 0}


def _client_main(
    fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], go: Any, results: Any
) -> None:
    os.sched_setaffinity(0, load_cores())
    go.wait(STEP_BOUND)
    try:
        results.put(fn(*args))
    except Exception as e:  # reported, not raised: the harness goes on
        results.put({"errors": 1, "exception": repr(e)})


def start_profiler(target: Target, output: Path) -> subprocess.Popen[bytes]:
    """
    py-spy sampling the target's processes (native frames too, which needs
    it to pause the process for each sample), on core 1.
    """
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    assert target.process is not None
    process = subprocess.Popen(
        pinned(
            cores_text("load"),
            [
                spy,
                "record",
                "--pid",
                str(target.process.pid),
                "--subprocesses",
                "--native",
                "--rate",
                "250",
                "--format",
                "raw",
                "--output",
                str(output),
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the load starts
    return process


def stop_profiler(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def run_clients(
    target: Target,
    fn: Callable[..., dict[str, Any]],
    args: list[tuple[Any, ...]],
    profile: Path | None = None,
) -> tuple[list[dict[str, Any]], float, float]:
    """
    Run ``fn(*a)`` for each ``a`` in its own process on the load core, all
    released together; the results, the wall time and the server CPU seconds.
    With ``profile``, py-spy samples the server meanwhile into that file.
    """
    mp = multiprocessing.get_context("fork")
    go = mp.Event()
    results = mp.Queue()
    clients = [mp.Process(target=_client_main, args=(fn, a, go, results)) for a in args]
    for client in clients:
        client.start()
    time.sleep(0.2)  # the clients are ready and waiting on go
    profiler = start_profiler(target, profile) if profile is not None else None
    pids = target.pids()
    before = cpu_seconds(pids)
    started = time.perf_counter()
    go.set()
    collected = [results.get(timeout=STEP_BOUND) for _ in clients]
    wall = time.perf_counter() - started
    cpu = cpu_seconds(pids) - before
    if profiler is not None:
        stop_profiler(profiler)
    for client in clients:
        client.join(10)
        if client.is_alive():
            client.kill()
    return collected, wall, cpu


# --- measuring -----------------------------------------------------------------


PHASES = ("conn", "bulk", "rtt")


class Plan:
    def __init__(
        self,
        quick: bool,
        conn_clients: int,
        profile: Path | None = None,
        phases: Sequence[str] = PHASES,
    ) -> None:
        self.profile = profile
        self.phases = tuple(phases)
        self.conn_seconds = 1.0 if quick else 3.0
        self.conn_clients = conn_clients
        self.bulk1_bytes = (48 if quick else 512) << 20
        self.bulk8_bytes = (8 if quick else 64) << 20  # each of 8
        self.bulk_seconds = 10.0 if quick else 20.0
        self.rtt_count = 400 if quick else 3000


def measure(
    target: Target, certs: dict[str, str], plan: Plan, agent_pid: int
) -> dict[str, Any]:
    figures: dict[str, Any] = {}

    def profile(phase: str) -> Path | None:
        if plan.profile is None or not isinstance(target, ConnectNative):
            return None
        return plan.profile / f"{target.name}-{phase}.txt"

    if "conn" in plan.phases:
        _measure_conn(target, certs, plan, agent_pid, figures, profile)
    if "bulk" in plan.phases:
        _measure_bulk(target, certs, plan, figures, profile)
    if "rtt" in plan.phases:
        _measure_rtt(target, certs, plan, figures, profile)
    return figures


def _measure_conn(
    target: Target,
    certs: dict[str, str],
    plan: Plan,
    agent_pid: int,
    figures: dict[str, Any],
    profile: Callable[[str], Path | None],
) -> None:
    port = target.port
    agent_before = cpu_seconds([agent_pid])
    results, wall, cpu = run_clients(
        target,
        _conn_client,
        [(certs, port, plan.conn_seconds)] * plan.conn_clients,
        profile("conn"),
    )
    agent_cpu = cpu_seconds([agent_pid]) - agent_before
    done = sum(r.get("done", 0) for r in results)
    figures["conn_errors"] = sum(r.get("errors", 0) for r in results)
    figures["conns"] = done
    figures["conns_per_s"] = done / wall if done else None
    figures["cpu_us_per_conn"] = cpu / done * 1e6 if done else None
    figures["agent_cpu_us_per_conn"] = agent_cpu / done * 1e6 if done else None
    for key, label in (("handshakes", "conn_handshake"), ("requests", "conn_request")):
        samples = [t for r in results for t in r.get(key, [])]
        figures[f"{label}_p50_ms"] = statistics.median(samples) if samples else None


def _measure_bulk(
    target: Target,
    certs: dict[str, str],
    plan: Plan,
    figures: dict[str, Any],
    profile: Callable[[str], Path | None],
) -> None:
    port = target.port
    for label, clients, size in (
        ("bulk1", 1, plan.bulk1_bytes),
        ("bulk8", 8, plan.bulk8_bytes),
    ):
        results, wall, cpu = run_clients(
            target,
            _bulk_client,
            [(certs, port, size, plan.bulk_seconds)] * clients,
            profile(label),
        )
        moved = sum(r.get("bytes", 0) for r in results)
        figures[f"{label}_errors"] = sum(r.get("errors", 0) for r in results)
        figures[f"{label}_mib_s"] = moved / wall / (1 << 20) if moved else None
        figures[f"{label}_cpu_s_per_gib"] = cpu / (moved / (1 << 30)) if moved else None


def _measure_rtt(
    target: Target,
    certs: dict[str, str],
    plan: Plan,
    figures: dict[str, Any],
    profile: Callable[[str], Path | None],
) -> None:
    results, _wall, cpu = run_clients(
        target, _rtt_client, [(certs, target.port, plan.rtt_count)], profile("rtt")
    )
    samples = sorted(results[0].get("samples", []))
    figures["rtt_errors"] = results[0].get("errors", 0)
    if samples:
        figures["rtt_p50_us"] = samples[len(samples) // 2]
        figures["rtt_p99_us"] = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
        figures["cpu_us_per_req"] = cpu / (len(samples) + 50) * 1e6


def wait_ready(target: Target, certs: dict[str, str]) -> None:
    context = client_context(certs)
    deadline = time.monotonic() + STEP_BOUND
    while True:
        try:
            if one_request(context, target.port):
                return
        except (OSError, ssl.SSLError):
            pass
        assert target.process is not None
        if time.monotonic() > deadline or target.process.poll() is not None:
            raise SystemExit(
                f"{target.name} did not start; see its log in the work directory"
            )
        time.sleep(0.2)


def check_target(target: Target, certs: dict[str, str]) -> dict[str, Any]:
    """What was negotiated, and that a client without a certificate is refused."""
    with connect(client_context(certs), target.port) as tls:
        negotiated = {"version": tls.version(), "cipher": tls.cipher()[0]}
    answered = b""
    try:
        with connect(client_context(certs, with_cert=False), target.port) as tls:
            tls.sendall(b"C\n")
            answered = read_exactly(tls, 3)
    except (OSError, ssl.SSLError):
        pass
    negotiated["refuses_no_client_cert"] = answered != b"ok\n"
    return negotiated


FIGURES = (
    ("cpu_us_per_conn", "CPU µs/conn", "{:.0f}"),
    ("conns_per_s", "conns/s", "{:.0f}"),
    ("conn_handshake_p50_ms", "handshake p50 ms", "{:.2f}"),
    ("conn_request_p50_ms", "1st answer p50 ms", "{:.2f}"),
    ("bulk1_mib_s", "bulk x1 MiB/s", "{:.0f}"),
    ("bulk8_mib_s", "bulk x8 MiB/s", "{:.0f}"),
    ("bulk8_cpu_s_per_gib", "CPU s/GiB x8", "{:.2f}"),
    ("rtt_p50_us", "RTT p50 µs", "{:.0f}"),
    ("rtt_p99_us", "RTT p99 µs", "{:.0f}"),
    ("cpu_us_per_req", "CPU µs/req", "{:.0f}"),
    ("agent_cpu_us_per_conn", "agent CPU µs/conn", "{:.0f}"),
)


def medians(reps: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, _, _ in FIGURES:
        values = [r[key] for r in reps if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def table(
    names: list[str], rows: dict[str, dict[str, float | None]], ratio: bool
) -> str:
    header = ["target", *(label for _, label, _ in FIGURES)]
    lines = [header]
    for name in names:
        row = [name]
        for key, _, form in FIGURES:
            value = rows[name].get(key)
            if ratio and key.startswith("agent_"):
                value = None  # nginx's agent CPU is ~0: no ratio to speak of
            row.append(
                "-"
                if value is None
                else (f"{value:.2f}" if ratio else form.format(value))
            )
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def tree_commit(tree: str) -> str:
    """The git commit a source tree is at (and whether it has changes)."""
    try:
        done = subprocess.run(
            ["git", "-C", tree, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "?"
    return done.stdout.strip() or "?"


def versions() -> dict[str, str]:
    import cryptography
    import OpenSSL

    import twisted

    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "not installed"
        text = (done.stdout + done.stderr).strip().splitlines()
        return text[0] if text else "?"

    return {
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "terminator_openssl": OpenSSL.SSL.OpenSSL_version(
            OpenSSL.SSL.OPENSSL_VERSION
        ).decode(),
        "client_openssl": ssl.OPENSSL_VERSION,
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "stunnel4": next(
            (
                line
                for line in subprocess.run(
                    ["stunnel4", "-version"], capture_output=True, text=True, timeout=10
                ).stderr.splitlines()
                if line.startswith("stunnel")
            ),
            "?",
        )
        if shutil.which("stunnel4")
        else "not installed",
    }


def machine() -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


ALL_TARGETS = (
    "nginx",
    "haproxy",
    "stunnel4",
    "cn-agent",
    "cn-agent-nocache",
    "cn-intentions",
    "cn-intentions-quiet",
    "cn-intentions-twisted-tls",
    "cn-intentions-w2",
    "cn-intentions-uvloop",
    "cn-intentions-cn-epoll",
)


def _workers_target(name: str) -> int | None:
    """
    N for a target named ``cn-intentions-wN`` (``--workers N``, on the
    server cores, or on every core if there are fewer than N), else None.
    """
    prefix = "cn-intentions-w"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        workers = int(name[len(prefix) :])
        return workers if workers >= 1 else None
    return None


def make_targets(
    names: Sequence[str], agent: str, variants: Sequence[tuple[str, str]] = ()
) -> list[Target]:
    made: dict[str, Callable[[], Target]] = {
        "nginx": lambda: Nginx("nginx"),
        "haproxy": lambda: HAProxy("haproxy"),
        "stunnel4": lambda: Stunnel("stunnel4"),
        "cn-agent": lambda: ConnectNative("cn-agent", agent, "agent"),
        "cn-agent-nocache": lambda: ConnectNative(
            "cn-agent-nocache", agent, "agent", cache=0
        ),
        "cn-intentions": lambda: ConnectNative("cn-intentions", agent, "intentions"),
        # As nginx and haproxy here: no line logged per allowed connection.
        "cn-intentions-quiet": lambda: ConnectNative(
            "cn-intentions-quiet", agent, "intentions", log_allowed=False
        ),
        # Twisted's TLSMemoryBIOProtocol instead of connect_native's own.
        "cn-intentions-twisted-tls": lambda: ConnectNative(
            "cn-intentions-twisted-tls", agent, "intentions", tls_transport="twisted"
        ),
        "cn-intentions-w2": lambda: ConnectNative(
            "cn-intentions-w2", agent, "intentions", workers=2
        ),
        # twistd --reactor uvloop: Twisted's asyncio reactor on uvloop.
        "cn-intentions-uvloop": lambda: ConnectNative(
            "cn-intentions-uvloop", agent, "intentions", reactor="uvloop"
        ),
        # twistd --reactor cn-epoll: one epoll_ctl per descriptor per turn.
        "cn-intentions-cn-epoll": lambda: ConnectNative(
            "cn-intentions-cn-epoll", agent, "intentions", reactor="cn-epoll"
        ),
    }
    for name in names:
        workers = _workers_target(name)
        if workers is not None and name not in made:
            made[name] = lambda name=name, workers=workers: ConnectNative(
                name, agent, "intentions", workers=workers
            )
    return [made[name]() for name in names] + [
        ConnectNative(name, agent, "intentions", source=source)
        for name, source in variants
    ]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description=(
            "twistd connect-native against nginx, haproxy and stunnel4 with the "
            "same Consul certificates, on 127.0.0.1 (see benchmarks/README.md)"
        ),
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions (default 5; --quick 2)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run: small loads, 2 reps"
    )
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated, from {','.join(ALL_TARGETS)} (nginx is the reference)",
    )
    parser.add_argument(
        "--conn-clients",
        type=int,
        default=4,
        help="load processes for the connection test (4)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="the JSON file (default benchmarks/results/<time>.json)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run --authorize intentions with connect_native imported from "
        "the source tree DIR (e.g. a git worktree of another commit) as target "
        "NAME, to compare changes in one interleaved run; repeatable",
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated, from conn,bulk,rtt (all by default): e.g. "
        "--phases conn for a quicker run comparing CPU per connection only",
    )
    parser.add_argument(
        "--server-cores",
        default=str(SERVER_CORE),
        metavar="LIST",
        help="the cores the servers run on, as taskset -c takes them (0); "
        "with more cores than 2, e.g. --server-cores 0-7 --load-cores 8-15 "
        "--targets nginx,cn-intentions,cn-intentions-w8",
    )
    parser.add_argument(
        "--load-cores",
        default=str(LOAD_CORE),
        metavar="LIST",
        help="the cores the load, the backend and the agent run on (1)",
    )
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="sample each connect-native target with py-spy (native frames, "
        "250 Hz) in each phase into DIR/<target>-<phase>.txt (the last rep "
        "wins); the sampling perturbs the figures, so profile in a run of its own",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, configs)"
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="the HTTP row instead: twistd connect-native --protocol http "
        "(an L7 intention deciding each request) against nginx's http module "
        "as an mTLS reverse proxy, keep-alive both sides; --reps, --quick, "
        "--output and --keep apply",
    )
    parser.add_argument(
        "--http-clients",
        type=int,
        default=4,
        help="with --http: keep-alive client processes (4)",
    )
    args = parser.parse_args(list(argv))
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(
        t for t in set(args.targets) - set(ALL_TARGETS) if _workers_target(t) is None
    )
    if unknown:
        parser.error(
            f"--targets: unknown {', '.join(unknown)}; "
            f"choose from {', '.join(ALL_TARGETS)}"
        )
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not args.phases or set(args.phases) - set(PHASES):
        parser.error(f"--phases: choose one or more of {','.join(PHASES)}")
    variants = []
    for value in args.variant:
        name, _, source = value.partition("=")
        tree = Path(source).resolve()
        if not name or name in ALL_TARGETS or not (tree / "connect_native").is_dir():
            parser.error(
                f"--variant {value!r}: give NAME=DIR, a new target name and a "
                "source tree with connect_native/ in it"
            )
        variants.append((name, str(tree)))
    args.variant = variants
    try:
        args.server_cores = parse_cores(args.server_cores)
        args.load_cores = parse_cores(args.load_cores)
    except ValueError:
        parser.error("--server-cores, --load-cores: a list such as 0 or 0-7,16")
    available = os.sched_getaffinity(0)
    missing = set(args.server_cores + args.load_cores) - available
    if missing or set(args.server_cores) & set(args.load_cores):
        parser.error(
            "--server-cores and --load-cores: cores this process may use "
            f"({','.join(map(str, sorted(available)))}), none in both"
        )
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    CORES["server"], CORES["load"] = args.server_cores, args.load_cores
    if args.http:
        return http_main(args)
    needs_packages = any(t in ("nginx", "haproxy", "stunnel4") for t in args.targets)
    if needs_packages:
        ensure_packages(install=not args.no_install)
    os.sched_setaffinity(0, load_cores())
    work = Path(tempfile.mkdtemp(prefix="cn-bench-"))
    procs = Processes()
    backend_process = None
    started_at = time.time()
    load_before = machine()["loadavg"]
    try:
        agent, agent_pid = start_agent(procs, work)
        certs = issue_certificates(agent, work)
        backend = free_port()
        backend_process = multiprocessing.get_context("fork").Process(
            target=_serve_backend, args=(backend,), daemon=True
        )
        backend_process.start()
        targets = make_targets(args.targets, agent, args.variant)
        for target in targets:
            target.start(procs, work, certs, backend)
        checks = {}
        time.sleep(2.0)  # let the terminators' first agent reads settle
        for target in targets:
            wait_ready(target, certs)
            checks[target.name] = check_target(target, certs)
            log(f"{target.name} ready: {checks[target.name]}")
            if not checks[target.name]["refuses_no_client_cert"]:
                raise SystemExit(
                    f"{target.name} answered a client without a certificate"
                )
        profile_dir = Path(args.profile).resolve() if args.profile else None
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
        plan = Plan(args.quick, args.conn_clients, profile_dir, args.phases)
        raw: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for rep in range(args.reps):
            # Rotate who goes first, so no target always follows the same one.
            order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
            for target in order:
                figures = measure(target, certs, plan, agent_pid)
                raw[target.name].append(figures)
                log(
                    f"rep {rep + 1}/{args.reps} {target.name}: "
                    + ", ".join(
                        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in figures.items()
                    )
                )
    finally:
        procs.stop_all()
        if backend_process is not None:
            backend_process.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")

    names = [t.name for t in targets]
    summary = {name: medians(raw[name]) for name in names}
    ratios: dict[str, dict[str, float | None]] = {}
    if "nginx" in summary:
        reference = summary["nginx"]
        for name in names:
            ratios[name] = {
                key: (
                    summary[name][key] / reference[key]
                    if summary[name].get(key) is not None and reference.get(key)
                    else None
                )
                for key, _, _ in FIGURES
            }
    errors = {
        name: sum(
            v for rep in raw[name] for k, v in rep.items() if k.endswith("errors")
        )
        for name in names
    }
    result = {
        "command": " ".join(
            [os.path.relpath(sys.argv[0]), *(sys.argv[1:] if argv is None else argv)]
        ),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "seconds": round(time.time() - started_at, 1),
        "reps": args.reps,
        "quick": args.quick,
        "profiled": args.profile is not None,
        "plan": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(plan).items()
        },
        "machine": {**machine(), "loadavg_before": load_before},
        "cores": dict(CORES),
        "versions": versions(),
        "variants": {name: tree_commit(tree) for name, tree in args.variant},
        "checks": checks,
        "errors": errors,
        "medians": summary,
        "ratios_to_nginx": ratios,
        "raw": raw,
    }
    output = (
        Path(args.output)
        if args.output
        else HERE
        / "results"
        / time.strftime("%Y%m%dT%H%M%SZ.json", time.gmtime(started_at))
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    print(
        f"\nmedians of {args.reps} interleaved reps ({result['seconds']} s; load "
        f"average before {' '.join(load_before)}, "
        f"after {' '.join(result['machine']['loadavg'])})"
    )
    print(table(names, summary, ratio=False))
    if ratios:
        print("\nratios to nginx (median / nginx's median)")
        print(table(names, ratios, ratio=True))
    print(f"\nerrors per target: {errors}")
    print(f"JSON: {output}")
    return 0 if not any(errors.values()) else 1


# --- HTTP: --protocol http against nginx's http module (issue 18) ------------------
#
# Self-contained: ``--http`` runs this instead of the L4 phases.  Its own
# development agent runs as Consul 1.10 and holds an L7 intention (the
# client may GET /bench*, everything else denied), so every request pays the
# per-request decision; its own backend speaks keep-alive HTTP/1.1.

HTTP_TARGETS = ("nginx-http", "cn-http")
HTTP_PATH = b"/bench/item"
HTTP_ANSWER = b"ok\n"


class _HTTPBackendHandler(socketserver.BaseRequestHandler):
    """Keep-alive HTTP/1.1: every request answered 200 with 3 bytes."""

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(STEP_BOUND)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answer = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d"
            b"\r\n\r\n%s" % (len(HTTP_ANSWER), HTTP_ANSWER)
        )
        buffered = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffered:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffered += data
                count = buffered.count(b"\r\n\r\n")
                buffered = buffered.rsplit(b"\r\n\r\n", 1)[1]
                sock.sendall(answer * count)
        except OSError:
            pass


def _serve_http_backend(port: int) -> None:
    os.sched_setaffinity(0, load_cores())
    _Backend(("127.0.0.1", port), _HTTPBackendHandler).serve_forever()


class NginxHTTP(Target):
    kind = "nginx-http"

    def argv(self, work: Path, certs: dict[str, str], backend: int) -> list[str]:
        conf = work / "nginx-http.conf"
        conf.write_text(
            template(
                "nginx-http.conf.in",
                PID=work / "nginx-http.pid",
                ERROR_LOG=work / "nginx-http-error.log",
                WORK=work,
                PORT=self.port,
                BACKEND=backend,
                CERT=certs["web_cert"],
                KEY=certs["web_key"],
                CA=certs["ca"],
            )
        )
        return ["nginx", "-p", str(work), "-c", str(conf), "-e", str(conf) + ".log"]


class ConnectNativeHTTP(ConnectNative):
    kind = "cn-http"

    def argv(self, work: Path, certs: dict[str, str], backend: int) -> list[str]:
        return [*super().argv(work, certs, backend), "--protocol", "http"]


def _read_http_answer(tls: ssl.SSLSocket, buffered: bytes) -> tuple[int, bool, bytes]:
    """One answer's status, whether it closes, and what followed it."""
    while b"\r\n\r\n" not in buffered:
        data = tls.recv(65536)
        if not data:
            raise OSError("the server closed the connection")
        buffered += data
    head, _, rest = buffered.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, closes = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            closes = True
    while len(rest) < length:
        data = tls.recv(65536)
        if not data:
            raise OSError("the server closed the connection")
        rest += data
    return status, closes, rest[length:]


def _http_client(certs: dict[str, str], port: int, seconds: float) -> dict[str, Any]:
    """Keep-alive requests one after the other for ``seconds``; latencies."""
    context = client_context(certs)
    request = b"GET %s HTTP/1.1\r\nHost: web\r\n\r\n" % HTTP_PATH
    samples: list[float] = []
    errors = connections = 0
    deadline = time.monotonic() + seconds
    tls: ssl.SSLSocket | None = None
    buffered = b""
    while time.monotonic() < deadline:
        try:
            if tls is None:
                tls = connect(context, port)
                connections += 1
                buffered = b""
            started = time.perf_counter_ns()
            tls.sendall(request)
            status, closes, buffered = _read_http_answer(tls, buffered)
            samples.append((time.perf_counter_ns() - started) / 1000)
            if status != 200:
                errors += 1
            if closes:
                tls.close()
                tls = None
        except (OSError, ssl.SSLError):
            errors += 1
            if tls is not None:
                tls.close()
            tls = None
    if tls is not None:
        tls.close()
    return {"samples": samples, "errors": errors, "connections": connections}


HTTP_FIGURES = (
    ("http_req_per_s", "req/s", "{:.0f}"),
    ("http_cpu_us_per_req", "CPU µs/req", "{:.0f}"),
    ("http_p50_us", "p50 µs", "{:.0f}"),
    ("http_p99_us", "p99 µs", "{:.0f}"),
    ("http_connections", "connections", "{:.0f}"),
)


def measure_http(
    target: Target,
    certs: dict[str, str],
    clients: int,
    seconds: float,
    profile: Path | None = None,
) -> dict[str, Any]:
    results, wall, cpu = run_clients(
        target, _http_client, [(certs, target.port, seconds)] * clients, profile
    )
    samples = sorted(t for r in results for t in r.get("samples", []))
    done = len(samples)
    figures: dict[str, Any] = {
        "http_errors": sum(r.get("errors", 0) for r in results),
        "http_connections": sum(r.get("connections", 0) for r in results),
        "http_requests": done,
    }
    if done:
        figures["http_req_per_s"] = done / wall
        figures["http_cpu_us_per_req"] = cpu / done * 1e6
        figures["http_p50_us"] = samples[done // 2]
        figures["http_p99_us"] = samples[min(done - 1, int(done * 0.99))]
    return figures


def _wait_http_ready(target: Target, certs: dict[str, str]) -> None:
    deadline = time.monotonic() + STEP_BOUND
    while True:
        try:
            with connect(client_context(certs), target.port) as tls:
                tls.sendall(b"GET %s HTTP/1.1\r\nHost: web\r\n\r\n" % HTTP_PATH)
                if _read_http_answer(tls, b"")[0] == 200:
                    return
        except (OSError, ssl.SSLError, ValueError, IndexError):
            pass
        assert target.process is not None
        if time.monotonic() > deadline or target.process.poll() is not None:
            raise SystemExit(f"{target.name} did not start; see the work directory")
        time.sleep(0.2)


def _http_denied(target: Target, certs: dict[str, str]) -> int:
    """The status of a request the L7 intention denies (nginx: no rule)."""
    with connect(client_context(certs), target.port) as tls:
        tls.sendall(b"DELETE /admin HTTP/1.1\r\nHost: web\r\n\r\n")
        return _read_http_answer(tls, b"")[0]


def http_main(args: argparse.Namespace) -> int:
    """``--http``: nginx-http and cn-http, interleaved, ``args.reps`` times."""
    ensure_packages(install=not args.no_install)
    os.sched_setaffinity(0, load_cores())
    work = Path(tempfile.mkdtemp(prefix="cn-bench-http-"))
    procs = Processes()
    backend_process = None
    started_at = time.time()
    load_before = machine()["loadavg"]
    seconds = 2.0 if args.quick else 5.0
    try:
        port = free_port()
        procs.start(
            pinned(
                cores_text("load"),
                [
                    sys.executable,
                    "-m",
                    "connect_native.devagent",
                    "--port",
                    str(port),
                    "--quiet",
                    "--consul-version",
                    "1.10.0",
                ],
            ),
            work / "devagent.log",
            env=dict(os.environ, PYTHONPATH=package_path()),
        )
        agent = f"127.0.0.1:{port}"
        deadline = time.monotonic() + STEP_BOUND
        while True:
            try:
                http(agent, "GET", "/v1/agent/connect/ca/roots")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the development agent did not start") from None
                time.sleep(0.1)
        certs = issue_certificates(agent, work)
        # Its L4 allow makes way for the L7 one (one intention per pair).
        for intention in http(agent, "GET", "/v1/connect/intentions"):
            http(agent, "DELETE", f"/v1/connect/intentions/{intention['ID']}")
        http(
            agent,
            "PUT",
            "/v1/config",
            {
                "Kind": "service-intentions",
                "Name": WEB,
                "Sources": [
                    {
                        "Name": CLIENT,
                        "Permissions": [
                            {
                                "Action": "allow",
                                "HTTP": {"PathPrefix": "/bench", "Methods": ["GET"]},
                            },
                            {"Action": "deny", "HTTP": {"PathPrefix": "/"}},
                        ],
                    }
                ],
            },
        )
        backend = free_port()
        backend_process = multiprocessing.get_context("fork").Process(
            target=_serve_http_backend, args=(backend,), daemon=True
        )
        backend_process.start()
        targets: list[Target] = [
            NginxHTTP("nginx-http"),
            ConnectNativeHTTP("cn-http", agent, "intentions", log_allowed=False),
        ]
        for target in targets:
            target.start(procs, work, certs, backend)
        checks: dict[str, Any] = {}
        for target in targets:
            _wait_http_ready(target, certs)
            checks[target.name] = {
                **check_target(target, certs),
                "denied_status": _http_denied(target, certs),
            }
            log(f"{target.name} ready: {checks[target.name]}")
        if checks["cn-http"]["denied_status"] != 403:
            raise SystemExit("cn-http did not deny DELETE /admin: no L7 decision")
        raw: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for rep in range(args.reps):
            order = targets[rep % 2 :] + targets[: rep % 2]
            for target in order:
                profile = None
                if args.profile and isinstance(target, ConnectNative):
                    profile = Path(args.profile).resolve() / f"{target.name}-http.txt"
                    profile.parent.mkdir(parents=True, exist_ok=True)
                figures = measure_http(
                    target, certs, args.http_clients, seconds, profile
                )
                raw[target.name].append(figures)
                log(
                    f"rep {rep + 1}/{args.reps} {target.name}: "
                    + ", ".join(
                        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in figures.items()
                    )
                )
    finally:
        procs.stop_all()
        if backend_process is not None:
            backend_process.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")

    names = [t.name for t in targets]
    summary = {
        name: {
            key: (
                statistics.median(v)
                if (v := [r[key] for r in raw[name] if r.get(key) is not None])
                else None
            )
            for key, _, _ in HTTP_FIGURES
        }
        for name in names
    }
    errors = {name: sum(r["http_errors"] for r in raw[name]) for name in names}
    result = {
        "command": " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "seconds": round(time.time() - started_at, 1),
        "reps": args.reps,
        "http_clients": args.http_clients,
        "seconds_per_measure": seconds,
        "machine": {**machine(), "loadavg_before": load_before},
        "versions": versions(),
        "checks": checks,
        "errors": errors,
        "medians": summary,
        "raw": raw,
    }
    output = (
        Path(args.output)
        if args.output
        else HERE
        / "results"
        / time.strftime("%Y%m%dT%H%M%SZ-http.json", time.gmtime(started_at))
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    header = ["target", *(label for _, label, _ in HTTP_FIGURES)]
    lines = [header] + [
        [
            name,
            *(
                "-" if summary[name][key] is None else form.format(summary[name][key])
                for key, _, form in HTTP_FIGURES
            ),
        ]
        for name in names
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(
        f"\nmedians of {args.reps} interleaved reps, {args.http_clients} keep-alive "
        f"clients ({result['seconds']} s; load average before {' '.join(load_before)})"
    )
    for line in lines:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
    print(f"\nerrors per target: {errors}")
    print(f"JSON: {output}")
    return 0 if not any(errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
