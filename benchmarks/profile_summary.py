"""
Summarise py-spy's ``--format raw`` output (collapsed stacks, one
``frame;frame;... count`` per line), as ``bench.py --profile DIR`` writes it:
the functions with the most samples *inclusive* (anywhere on the stack: the
time spent in them and below) and *self* (at the top of the stack), as
shares of all samples, and the shares of a few layers.

``python benchmarks/profile_summary.py DIR/cn-intentions-conn.txt [--top 25]``
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# A frame reads "function (file:line)" or "function (library.so)"; the line
# number is dropped so that one function counts once.
_LINE = re.compile(r":\d+\)$")

_FRAME = re.compile(r" \([^()]*\)$")

# pyOpenSSL's OpenSSL is linked into cryptography's _rust module.
LAYERS = (
    (
        "OpenSSL (in cryptography's _rust module)",
        re.compile(r"_rust\.abi3\.so|libssl|libcrypto"),
    ),
    ("libc: system calls and memory", re.compile(r"\(libc\.so")),
)

# With --native py-spy counts a thread blocked in a lock or in epoll_wait as
# running; those samples are idle time, not cost.
IDLE = re.compile(
    r"^(epoll_wait|PyThread_acquire_lock_timed|lock_PyThread_acquire_lock"
    r"|Condition\.wait) "
)


def frame_name(frame: str) -> str:
    return _LINE.sub(")", frame.strip())


def read(path: Path) -> list[tuple[str, list[str], int]]:
    """(process, frames, count) per stack; idle stacks are dropped."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        # With --subprocesses a child's stack starts with its parent's
        # process frame, then its own: the last one names the process.
        processes = [p.split(":")[0] for p in parts if p.startswith("process ")]
        process = processes[-1] if processes else ""
        # The command line (which has a ';' of its own) is not a frame.
        frames = [frame_name(f) for f in parts if _FRAME.search(f)]
        if not frames or any(IDLE.match(f) for f in frames):
            continue
        stacks.append((process, frames, int(count)))
    return stacks


def summarise(stacks: list[tuple[str, list[str], int]], top: int) -> str:
    total = sum(count for _, _, count in stacks) or 1
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    for process, frames, count in stacks:
        processes[process] += count
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
        for label, pattern in LAYERS:
            if pattern.search(frames[-1]):
                layers[label] += count
                break
        else:
            layers["Python and the rest"] += count
    lines = [f"{total} busy samples"]
    if len(processes) > 1:
        lines += [f"  {n / total:6.1%}  {p}" for p, n in processes.most_common()]
    lines.append("\nby layer (top of stack):")
    lines += [f"  {n / total:6.1%}  {label}" for label, n in layers.most_common()]
    lines.append(f"\ninclusive (top {top}):")
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    lines.append(f"\nself (top {top}):")
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/profile_summary.py")
    parser.add_argument("raw", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for path in args.raw:
        print(f"== {path.name}")
        print(summarise(read(path), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
