"""
What one authorization decision costs: :class:`IntentionAuthorizer` deciding
locally from its warm cache (``decide_now`` per connection,
``decide_request`` per HTTP request) against :class:`AgentAuthorizer` asking
the agent's ``/v1/agent/connect/authorize`` over TCP (no cache, and a cache
hit).

The agent is the development agent (``python -m connect_native.devagent`` on
127.0.0.1, its own process); with ``--real-consul`` also a real ``consul
agent -dev`` (the one the test suite uses, found by ``tests/consul_binary``).
The destination has ``--intentions`` intentions (exact and wildcard
sources) besides the one that allows our caller, so the local decision looks
through a realistic table.

Run ``python benchmarks/decision_cost.py`` from the source tree.  The
figures are wall-clock microseconds per decision in this process, medians of
``--reps`` batches.
"""

# It starts fixed programs (the development agent, consul) on 127.0.0.1.
# ruff: noqa: S603

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE_TREE = HERE.parent
sys.path.insert(0, str(SOURCE_TREE))

from twisted.internet import reactor as _reactor  # noqa: E402
from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402

from connect_native.authorize import AgentAuthorizer, Peer  # noqa: E402
from connect_native.authorize.intentions import IntentionAuthorizer  # noqa: E402
from connect_native.consul.client import ConsulClient  # noqa: E402
from connect_native.identity import ServiceIdentity  # noqa: E402

reactor: Any = _reactor
WEB = "bench-web"
CALLER = "bench-client"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(address: str, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(
                f"http://{address}/v1/agent/connect/ca/roots", timeout=5
            ) as answer:
                json.load(answer)
            return
        except (OSError, ValueError):
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"the agent at {address} did not start") from None
            time.sleep(0.1)


def start_devagent() -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connect_native.devagent",
            "--port",
            str(port),
            "--quiet",
        ],
        env=dict(os.environ, PYTHONPATH=str(SOURCE_TREE)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    wait_http(address, process, 60)
    return address, process


def start_real_consul() -> tuple[str, Any]:
    from tests.consul_agent import RealConsulAgent
    from tests.consul_binary import find

    binary = find()
    if binary is None:
        raise SystemExit(
            "--real-consul: no consul binary (python -m tests.consul_binary --ensure)"
        )
    agent = RealConsulAgent(binary)
    agent.start()
    return agent.http_address, agent


def per_call_us(fn: Callable[[], object], count: int, reps: int) -> list[float]:
    batches = []
    for _ in range(reps):
        started = time.perf_counter_ns()
        for _ in range(count):
            fn()
        batches.append((time.perf_counter_ns() - started) / count / 1000)
    return batches


async def per_round_trip_us(
    fn: Callable[[], Deferred[Any]], count: int, reps: int
) -> list[float]:
    batches = []
    for _ in range(reps):
        started = time.perf_counter_ns()
        for _ in range(count):
            decision = await fn()
            assert decision.allowed, decision
        batches.append((time.perf_counter_ns() - started) / count / 1000)
    return batches


async def measure(address: str, args: argparse.Namespace) -> dict[str, Any]:
    client = ConsulClient(reactor, address=address)
    roots = await client.agent_ca_roots()
    trust_domain = roots.value.trust_domain
    await client.create_intention(CALLER, WEB, "allow")
    for n in range(args.intentions):
        source = "*" if n == 0 else f"other-{n}"
        await client.create_intention(source, WEB, "deny" if n % 2 else "allow")
    peer = Peer(
        identity=ServiceIdentity(
            trust_domain=trust_domain,
            namespace="default",
            datacenter="dc1",
            service=CALLER,
        ),
        serial="01:02:03",
    )
    out: dict[str, Any] = {}

    local = IntentionAuthorizer(client, reactor, WEB, default="deny")
    local.startService()
    deadline = time.monotonic() + 30
    while not local.fresh:
        if time.monotonic() > deadline:
            raise SystemExit("the intentions cache did not fill within 30 s")
        pause: Deferred[None] = Deferred()
        reactor.callLater(0.05, pause.callback, None)
        await pause
    assert len(local.intentions or ()) == args.intentions + 1
    first = local.decide_now(peer, WEB)
    if first is None or not first.allowed:
        raise SystemExit(f"the warm cache did not allow {CALLER}: {first}")
    out["intentions_decide_now_us"] = per_call_us(
        lambda: local.decide_now(peer, WEB), args.local_count, args.reps
    )
    headers = {"host": "bench-web", "user-agent": "bench"}
    out["intentions_decide_request_us"] = per_call_us(
        lambda: local.decide_request(peer, "GET", "/api/items?page=2", headers),
        args.local_count,
        args.reps,
    )
    local.stopService()

    uncached = AgentAuthorizer(client, reactor, cache_ttl=0)
    out["agent_round_trip_us"] = await per_round_trip_us(
        lambda: uncached.authorize(peer, WEB), args.remote_count, args.reps
    )
    cached = AgentAuthorizer(client, reactor, cache_ttl=3600)
    await cached.authorize(peer, WEB)
    out["agent_cache_hit_decide_now_us"] = per_call_us(
        lambda: cached.decide_now(peer, WEB), args.local_count, args.reps
    )
    await client.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/decision_cost.py")
    parser.add_argument("--reps", type=int, default=7, help="batches (7)")
    parser.add_argument(
        "--intentions", type=int, default=50, help="other intentions (50)"
    )
    parser.add_argument("--local-count", type=int, default=20000)
    parser.add_argument("--remote-count", type=int, default=300)
    parser.add_argument("--real-consul", action="store_true")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    agents: list[tuple[str, str, Any]] = []
    address, process = start_devagent()
    agents.append(("devagent", address, process))
    if args.real_consul:
        address, real = start_real_consul()
        agents.append(("consul 1.8.7 -dev", address, real))

    results: dict[str, Any] = {}
    failure: list[BaseException] = []

    async def run_all() -> None:
        for name, address, _ in agents:
            results[name] = await measure(address, args)

    def done(result: object) -> None:
        reactor.stop()

    def failed(f: Any) -> None:
        failure.append(f.value)
        reactor.stop()

    reactor.callWhenRunning(
        lambda: ensureDeferred(run_all()).addCallbacks(done, failed)
    )
    reactor.callLater(600, reactor.stop)  # a bound on the whole run
    try:
        reactor.run()
    finally:
        for _, _, handle in agents:
            if isinstance(handle, subprocess.Popen):
                handle.terminate()
                handle.wait(10)
            else:
                handle.stop()
    if failure:
        raise failure[0]

    summary = {
        agent: {key: statistics.median(values) for key, values in figures.items()}
        for agent, figures in results.items()
    }
    report = {
        "command": " ".join(["benchmarks/decision_cost.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "intentions": args.intentions + 1,
        "medians_us": summary,
        "batches_us": results,
    }
    for agent, figures in summary.items():
        print(f"{agent}: {args.intentions + 1} intentions for {WEB}")
        for key, value in figures.items():
            print(f"  {key:34s} {value:10.2f} µs")
    print(f"load average after: {' '.join(report['loadavg'])}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
