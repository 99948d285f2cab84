"""
How soon a deny reaches new connections, and how much a flood of refusals
writes to the log: ``twistd connect-native`` against a real Consul agent, as
a user sees it from outside.

Not a test: it prints what it measured (and writes it as JSON with
``--output``), and passes or fails on nothing.

For each authorizer (``--authorize agent``, ``--authorize intentions``):

1. an allow intention ``bench-client -> bench-web``; a client opens one
   connection after another (connect, handshake, one request);
2. the intention is changed to deny (``PUT /v1/connect/intentions/<id>``);
   the time the agent answered the change is the origin;
3. reported: how long after the origin the last connection was served and
   the first was refused, and how many were served that started after it.

Then the log: several clients without a certificate connect as fast as they
can for ``--flood`` seconds against the terminator; reported are the refused
attempts a second and the bytes a second its log grew by.

Run from the source tree: ``python benchmarks/deny_latency.py`` (the real
agent is found as the tests find it: ``tests/consul_binary.py``;
``--devagent`` uses the development agent instead).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402


def intention_id(agent: str) -> str:
    for intention in bench.http(agent, "GET", "/v1/connect/intentions"):
        if (
            intention["SourceName"] == bench.CLIENT
            and intention["DestinationName"] == bench.WEB
        ):
            return str(intention["ID"])
    raise SystemExit("the allow intention bench-client -> bench-web is missing")


def set_action(agent: str, ident: str, action: str) -> float:
    """Sets the intention's action; returns when the agent answered."""
    bench.http(
        agent,
        "PUT",
        f"/v1/connect/intentions/{ident}",
        {"SourceName": bench.CLIENT, "DestinationName": bench.WEB, "Action": action},
    )
    return time.monotonic()


def attempt(context: ssl.SSLContext, port: int) -> bool:
    try:
        return bench.one_request(context, port)
    except (OSError, ssl.SSLError):
        return False


def deny_latency(
    agent: str, certs: dict[str, str], port: int, settle: float
) -> dict[str, Any]:
    """One allow -> deny change under back-to-back connections."""
    context = bench.client_context(certs)
    ident = intention_id(agent)
    set_action(agent, ident, "allow")
    deadline = time.monotonic() + bench.STEP_BOUND
    while not attempt(context, port):
        if time.monotonic() > deadline:
            raise SystemExit("the allowed client is not served")
        time.sleep(0.1)
    results: list[tuple[float, bool]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            started = time.monotonic()
            results.append((started, attempt(context, port)))

    thread = threading.Thread(target=load)
    thread.start()
    time.sleep(settle)
    origin = set_action(agent, ident, "deny")
    time.sleep(settle)
    stop.set()
    thread.join()
    set_action(agent, ident, "allow")
    after = [(t - origin, ok) for t, ok in results if t >= origin]
    served_after = [t for t, ok in after if ok]
    refused_after = [t for t, ok in after if not ok]
    before = [ok for t, ok in results if t < origin]
    return {
        "connections_before_deny": len(before),
        "served_before_deny": sum(before),
        "served_after_deny": len(served_after),
        "last_served_ms": round(max(served_after) * 1e3, 1) if served_after else None,
        "first_refused_ms": (
            round(min(refused_after) * 1e3, 1) if refused_after else None
        ),
        "attempts_after_deny": len(after),
    }


def _flood_client(certs: dict[str, str], port: int, seconds: float) -> int:
    context = bench.client_context(certs, with_cert=False)
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        attempt(context, port)
        count += 1
    return count


def log_flood(
    certs: dict[str, str], port: int, log: Path, seconds: float, clients: int
) -> dict[str, Any]:
    before = log.stat().st_size
    started = time.monotonic()
    with multiprocessing.Pool(clients) as pool:
        counts = pool.starmap(
            _flood_client, [(certs, port, seconds)] * clients, chunksize=1
        )
    elapsed = time.monotonic() - started
    # The summary line for the last interval is written when it ends.
    time.sleep(11)
    grown = log.stat().st_size - before
    return {
        "refused_attempts": sum(counts),
        "refused_per_second": round(sum(counts) / elapsed),
        "log_bytes": grown,
        "log_bytes_per_second": round(grown / (elapsed + 11)),
    }


def start_consul(devagent: bool, procs: bench.Processes, work: Path) -> Any:
    if devagent:
        agent, _ = bench.start_agent(procs, work)
        return agent, None
    from tests.consul_agent import RealConsulAgent
    from tests.consul_binary import ensure

    real = RealConsulAgent(ensure())
    real.start()
    return real.http_address, real


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devagent", action="store_true")
    parser.add_argument("--settle", type=float, default=1.5)
    parser.add_argument("--flood", type=float, default=5.0)
    parser.add_argument("--flood-clients", type=int, default=4)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    procs = bench.Processes()
    real = None
    report: dict[str, Any] = {"agent": "devagent" if args.devagent else "consul"}
    with tempfile.TemporaryDirectory(prefix="deny-latency-") as tmp:
        work = Path(tmp)
        try:
            agent, real = start_consul(args.devagent, procs, work)
            certs = bench.issue_certificates(agent, work)
            backend = bench.free_port()
            server = multiprocessing.Process(
                target=bench._serve_backend, args=(backend,), daemon=True
            )
            server.start()
            for mode in ("agent", "intentions"):
                target = bench.ConnectNative(f"cn-{mode}", agent, mode)
                target.start(procs, work, certs, backend)
                bench.wait_ready(target, certs)
                result = deny_latency(agent, certs, target.port, args.settle)
                log = work / f"{target.name}-twistd.log"
                result["flood"] = log_flood(
                    certs, target.port, log, args.flood, args.flood_clients
                )
                report[mode] = result
                print(mode, json.dumps(result), flush=True)
                assert target.process is not None
                target.process.terminate()
                target.process.wait(15)
            server.terminate()
        finally:
            procs.stop_all()
            if real is not None:
                real.stop()
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
