"""
Counts that do not depend on a noisy machine: the instructions (valgrind's
callgrind) and the system calls (``strace -c``) a server spends per new
mutual-TLS connection, per request on an open connection and per MiB
downloaded, for the same targets as ``bench.py`` (nginx, the terminator,
``--variant`` trees).

Each figure is a difference: the load is run with ``n`` and with ``2n``
units (connections, requests, MiB), the counters zeroed before each, and
the figure is ``(count(2n) - count(n)) / n``, so what does not grow with the
load (the start of a connection in the request and bulk tests, the
counters' own dump, a warm-up's leftovers) cancels out.

- Instructions are user space only (callgrind sees no kernel code): the
  terminator's Python, OpenSSL and libc against nginx's C and OpenSSL.
  callgrind runs the server about 50 times slower; the counts do not care,
  and another process on the machine does not change them (a repeat of the
  same run agrees within a fraction of a per cent).  valgrind tells
  programs that ask (OpenSSL does) which instruction-set extensions it
  emulates, so the cryptography may take another code path than it does
  natively, the same one for every target.
- System calls are counted on the server running natively, with
  ``strace -f`` attached for the measured load only (every thread and
  child), by name: ``epoll_ctl`` is the reactor's registration churn.

The load is one client, one connection or request at a time (the worst case
for a reactor: nothing to batch; nginx gets the same).

``python benchmarks/counts.py --targets nginx,cn-intentions [--variant
NAME=DIR] --output DIR``: writes ``DIR/counts.json``, each server's
callgrind dumps, and a summary of each server's instructions in each phase
(the dump of the 2n load) by function and by library
(``DIR/<target>-<phase>-annotate.txt``).
"""

# The harness runs fixed programs (valgrind, strace, callgrind_control).
# ruff: noqa: S603, S607

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bench

#: (phase, unit, n for strace, n for callgrind, what a unit is)
PHASES = (
    ("conn", "conn", 100, 20, "a new connection (handshake, request, close)"),
    ("rtt", "req", 1000, 200, "a 64-byte request and its echo"),
    ("bulk", "MiB", 32, 8, "a MiB downloaded over one connection"),
    (
        "conn-notify",
        "notified_conn",
        100,
        20,
        "a new connection whose client ends TLS with close_notify before it"
        " closes (the conn load's clients just close)",
    ),
)
PHASE_NAMES = tuple(p[0] for p in PHASES)
#: What a run counts unless ``--phases`` says otherwise.
DEFAULT_PHASES = ("conn", "rtt", "bulk")


def _one_notified_request(context: ssl.SSLContext, port: int) -> bool:
    """``bench.one_request``, with the client's close_notify before its close."""
    with bench.connect(context, port) as tls:
        tls.sendall(b"C\n")
        ok = bench.read_exactly(tls, 3) == b"ok\n"
        try:
            tls.unwrap()  # sends close_notify, waits for the server's
        except (OSError, ssl.SSLError):
            return False
    return ok


def log(message: str) -> None:
    print(
        f"[counts {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
    )


# --- the load: n units, one at a time --------------------------------------------


def _load(phase: str, certs: dict[str, str], port: int, n: int) -> int:
    """Run ``n`` units of ``phase`` against ``port``; the errors."""
    if phase == "conn":
        context = bench.client_context(certs)
        errors = 0
        for _ in range(n):
            try:
                errors += not bench.one_request(context, port)
            except (OSError, ssl.SSLError):
                errors += 1
        return errors
    if phase == "conn-notify":
        context = bench.client_context(certs)
        errors = 0
        for _ in range(n):
            try:
                errors += not _one_notified_request(context, port)
            except (OSError, ssl.SSLError):
                errors += 1
        return errors
    if phase == "rtt":
        return int(bench._rtt_client(certs, port, n)["errors"])
    if phase == "bulk":
        return int(bench._bulk_client(certs, port, n << 20, bench.STEP_BOUND)["errors"])
    raise ValueError(phase)


# --- callgrind --------------------------------------------------------------------

_SUMMARY = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


def callgrind_wrap(out: Path, name: str) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",
        f"--callgrind-out-file={out / name}.cg.%p",
        "--vgdb=yes",
    ]


def _callgrind_control(option: str, pid: int) -> bool:
    try:
        done = subprocess.run(
            ["callgrind_control", option, str(pid)],
            capture_output=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and b"Error" not in done.stdout + done.stderr


def _dumps(out: Path, name: str, pid: int) -> set[Path]:
    return set(out.glob(f"{name}.cg.{pid}*"))


def callgrind_count(
    out: Path, name: str, pids: Sequence[int]
) -> tuple[int, list[Path]]:
    """Dump the counters of every process in ``pids``: the instructions, the files."""
    total, files = 0, []
    for pid in pids:
        before = _dumps(out, name, pid)
        if not _callgrind_control("-d", pid):
            continue  # not under valgrind (taskset's exec, a helper)
        deadline = time.monotonic() + bench.STEP_BOUND
        new: set[Path] = set()
        while not new and time.monotonic() < deadline:
            new = _dumps(out, name, pid) - before
            time.sleep(0.05)
        for path in new:
            found = _SUMMARY.search(path.read_bytes())
            if found:
                total += int(found.group(1))
                files.append(path)
    return total, files


def callgrind_zero(pids: Sequence[int]) -> None:
    for pid in pids:
        _callgrind_control("-z", pid)


# --- strace -----------------------------------------------------------------------

_STRACE_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def strace_count(
    pids: Sequence[int], output: Path, run: Callable[[], int]
) -> tuple[Counter[str], int]:
    """The system calls of ``pids`` (and their new threads) while ``run`` runs."""
    argv = ["strace", "-c", "-f", "-q", "-o", str(output)]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(
        bench.pinned(bench.cores_text("load"), argv),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attached before the load starts
    errors = run()
    tracer.send_signal(signal.SIGINT)
    try:
        tracer.wait(bench.STEP_BOUND)
    except subprocess.TimeoutExpired:
        tracer.kill()
        tracer.wait(5)
    calls: Counter[str] = Counter()
    for line in output.read_text().splitlines():
        row = _STRACE_ROW.match(line)
        if row and row.group(2) != "total":
            calls[row.group(2)] += int(row.group(1))
    return calls, errors


# --- one target ---------------------------------------------------------------------


def _stop(target: bench.Target) -> None:
    process = target.process
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _ready(target: bench.Target, certs: dict[str, str], bound: float) -> None:
    context = bench.client_context(certs)
    deadline = time.monotonic() + bound
    while True:
        try:
            if bench.one_request(context, target.port):
                return
        except (OSError, ssl.SSLError):
            pass
        assert target.process is not None
        if time.monotonic() > deadline or target.process.poll() is not None:
            raise SystemExit(f"{target.name} did not start (counts)")
        time.sleep(0.5)


def _warm_up(
    target: bench.Target, certs: dict[str, str], phases: Sequence[str]
) -> None:
    for phase, n in (("conn", 10), ("rtt", 100), ("bulk", 2), ("conn-notify", 10)):
        if phase in phases:
            _load(phase, certs, target.port, n)


def _single_process(target: bench.Target) -> None:
    """
    nginx without its master process: callgrind_control cannot reach a
    forked worker under valgrind (it hangs), and the worker is what does the
    work either way.
    """
    if not isinstance(target, bench.Nginx):
        return
    argv = target.argv

    def single(work: Path, certs: dict[str, str], backend: int) -> list[str]:
        made = argv(work, certs, backend)
        conf = work / "nginx.conf"
        conf.write_text(
            conf.read_text().replace("master_process on;", "master_process off;")
        )
        return made

    target.argv = single  # type: ignore[method-assign]


def count_target(
    target: bench.Target,
    procs: bench.Processes,
    work: Path,
    out: Path,
    certs: dict[str, str],
    backend: int,
    phases: Sequence[str],
    scale: float,
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    _single_process(target)
    # System calls, natively.
    target.wrap = []
    target.start(procs, work, certs, backend)
    _ready(target, certs, bench.STEP_BOUND)
    _warm_up(target, certs, phases)
    for phase, unit, n_strace, _, _ in PHASES:
        if phase not in phases:
            continue
        n = max(1, round(n_strace * scale))
        counted = []
        for k in (n, 2 * n):
            calls, errors = strace_count(
                target.pids(),
                out / f"{target.name}-{phase}-{k}.strace",
                lambda k=k, phase=phase: _load(phase, certs, target.port, k),  # type: ignore[misc]
            )
            counted.append(calls)
            figures[f"{phase}_errors"] = figures.get(f"{phase}_errors", 0) + errors
        per = {
            name: (counted[1][name] - counted[0][name]) / n
            for name in counted[0].keys() | counted[1].keys()
        }
        figures[f"syscalls_per_{unit}"] = sum(per.values())
        figures[f"epoll_ctl_per_{unit}"] = per.get("epoll_ctl", 0.0)
        figures[f"syscalls_by_name_per_{unit}"] = {
            name: round(v, 2)
            for name, v in sorted(per.items(), key=lambda kv: -kv[1])
            if abs(v) >= 0.05
        }
    _stop(target)
    # Instructions, under callgrind.
    target.wrap = callgrind_wrap(out, target.name)
    target.port = bench.free_port()
    target.start(procs, work, certs, backend)
    _ready(target, certs, 10 * bench.STEP_BOUND)
    _warm_up(target, certs, phases)
    for phase, unit, _, n_callgrind, _ in PHASES:
        if phase not in phases:
            continue
        n = max(1, round(n_callgrind * scale))
        counts = []
        for k in (n, 2 * n):
            pids = target.pids()
            callgrind_zero(pids)
            errors = _load(phase, certs, target.port, k)
            figures[f"{phase}_errors"] = figures.get(f"{phase}_errors", 0) + errors
            total, files = callgrind_count(out, target.name, pids)
            counts.append(total)
            if k == 2 * n:
                figures[f"callgrind_{phase}_files"] = [str(f.name) for f in files]
        figures[f"instructions_per_{unit}"] = (counts[1] - counts[0]) / n
    _stop(target)
    target.wrap = []
    return figures


# --- a summary of where the instructions go ----------------------------------------

_ANNOTATED = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(.*?)(?:\s+\[(.*)\])?\s*$")

LIBRARIES = (
    ("OpenSSL (pyOpenSSL's, in cryptography's _rust module)", "_rust.abi3.so"),
    ("OpenSSL libcrypto (system)", "libcrypto"),
    ("OpenSSL libssl (system)", "libssl"),
    ("the Python interpreter", "python3"),
    ("the Python interpreter", "libpython"),
    ("libc", "libc.so"),
    ("nginx", "nginx"),
    ("cffi (pyOpenSSL's calls)", "_cffi_backend"),
)


def annotate(files: Sequence[Path], output: Path, top: int = 40) -> dict[str, float]:
    """
    ``callgrind_annotate`` of the dumps (self instructions per function),
    and the shares by library; writes the report to ``output``.
    """
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=bench.STEP_BOUND,
    ).stdout
    by_library: Counter[str] = Counter()
    functions = []
    for line in text.splitlines():
        row = _ANNOTATED.match(line)
        if not row or not row.group(3) or "(100.0%)" in line:
            continue  # the callers of everything (main, the interpreter's entry)
        count = int(row.group(1).replace(",", ""))
        obj = row.group(3)
        library = next((label for label, key in LIBRARIES if key in obj), obj)
        by_library[library] += count
        functions.append(line)
    total = sum(by_library.values()) or 1
    shares = {k: round(v / total, 4) for k, v in by_library.most_common(12)}
    output.write_text(
        "instructions by library (self):\n"
        + "\n".join(f"  {v * 100:5.1f} %  {k}" for k, v in shares.items())
        + f"\n\nfunctions (self), top {top}:\n"
        + "\n".join(functions[:top])
        + "\n"
    )
    return shares


# --- the run ------------------------------------------------------------------------

FIGURES = (
    ("instructions_per_conn", "Minstr/conn", 1e-6),
    ("instructions_per_req", "kinstr/req", 1e-3),
    ("instructions_per_MiB", "Minstr/MiB", 1e-6),
    ("syscalls_per_conn", "syscalls/conn", 1),
    ("epoll_ctl_per_conn", "epoll_ctl/conn", 1),
    ("syscalls_per_req", "syscalls/req", 1),
    ("epoll_ctl_per_req", "epoll_ctl/req", 1),
    ("syscalls_per_MiB", "syscalls/MiB", 1),
    ("syscalls_per_notified_conn", "syscalls/conn-notify", 1),
    ("epoll_ctl_per_notified_conn", "epoll_ctl/conn-notify", 1),
)


def table(rows: dict[str, dict[str, Any]], reference: str | None) -> str:
    lines = [["target", *(label for _, label, _ in FIGURES)]]
    for name, row in rows.items():
        cells = [name]
        for key, _, scale in FIGURES:
            value = row.get(key)
            ref = rows.get(reference or "", {}).get(key) if reference else None
            if value is None:
                cells.append("-")
            elif ref:
                cells.append(f"{value * scale:.1f} ({value / ref:.2f})")
            else:
                cells.append(f"{value * scale:.1f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/counts.py",
        description="instructions (callgrind) and system calls (strace) per "
        "connection, request and MiB, for bench.py's targets",
    )
    parser.add_argument("--targets", default="nginx,cn-intentions")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument(
        "--phases",
        default=",".join(DEFAULT_PHASES),
        help=f"from {','.join(PHASE_NAMES)} (default: {','.join(DEFAULT_PHASES)})",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every load's size (1: 20/40 connections, 200/400 "
        "requests, 8/16 MiB under callgrind)",
    )
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(list(argv))
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(bench.ALL_TARGETS)
    if unknown:
        parser.error(f"--targets: unknown {', '.join(sorted(unknown))}")
    args.phases = [p for p in args.phases.split(",") if p]
    if not args.phases or set(args.phases) - set(PHASE_NAMES):
        parser.error(f"--phases: from {','.join(PHASE_NAMES)}")
    variants = []
    for value in args.variant:
        name, _, source = value.partition("=")
        tree = Path(source).resolve()
        if not name or not (tree / "connect_native").is_dir():
            parser.error(f"--variant {value!r}: NAME=DIR with connect_native/ in DIR")
        variants.append((name, str(tree)))
    args.variant = variants
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate", "strace"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is missing (Debian: apt-get install valgrind strace)"
            )
    if any(t in ("nginx", "haproxy", "stunnel4") for t in args.targets):
        bench.ensure_packages(install=not args.no_install)
    os.sched_setaffinity(0, bench.load_cores())
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cn-counts-"))
    procs = bench.Processes()
    backend_process = None
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    try:
        agent, _agent_pid = bench.start_agent(procs, work)
        certs = bench.issue_certificates(agent, work)
        backend = bench.free_port()
        backend_process = multiprocessing.get_context("fork").Process(
            target=bench._serve_backend, args=(backend,), daemon=True
        )
        backend_process.start()
        targets = bench.make_targets(args.targets, agent, args.variant)
        for target in targets:
            log(f"{target.name}: counting")
            figures = count_target(
                target, procs, work, out, certs, backend, args.phases, args.scale
            )
            for phase in args.phases:
                files = figures.get(f"callgrind_{phase}_files")
                if files:
                    figures[f"{phase}_instructions_by_library"] = annotate(
                        [out / f for f in files],
                        out / f"{target.name}-{phase}-annotate.txt",
                    )
            results[target.name] = figures
            log(
                f"{target.name}: "
                + ", ".join(
                    f"{k}={v:.1f}" for k, v in figures.items() if isinstance(v, float)
                )
            )
    finally:
        procs.stop_all()
        if backend_process is not None:
            backend_process.kill()
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    reference = "nginx" if "nginx" in results else None
    ratios = (
        {
            name: {
                key: row[key] / results[reference][key]
                for key, _, _ in FIGURES
                if row.get(key) is not None and results[reference].get(key)
            }
            for name, row in results.items()
        }
        if reference
        else {}
    )
    document = {
        "command": " ".join(
            ["benchmarks/counts.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "phases": {p[0]: p[4] for p in PHASES},
        "scale": args.scale,
        "machine": bench.machine(),
        "versions": bench.versions(),
        "variants": {name: bench.tree_commit(tree) for name, tree in args.variant},
        "counts": results,
        "ratios_to_nginx": ratios,
    }
    (out / "counts.json").write_text(
        json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    )
    print(table(results, reference))
    errors = sum(
        v for row in results.values() for k, v in row.items() if k.endswith("errors")
    )
    print(f"\nerrors: {errors}; JSON: {out / 'counts.json'}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
