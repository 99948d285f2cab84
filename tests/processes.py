"""
A child process whose output lines the test collects as they come (a
thread reads them), for the tests that run twistd, Consul's proxy and the
like as real processes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from tests.consul_agent import _die_with_parent

SOURCE_TREE = Path(__file__).resolve().parent.parent


def child_environment(drop: Iterable[str]) -> dict[str, str]:
    """This environment with the source tree on PYTHONPATH and ``drop`` gone."""
    env = dict(os.environ, PYTHONPATH=str(SOURCE_TREE))
    for name in drop:
        env.pop(name, None)
    return env


def reactor_after_install(module: str, report: str) -> list[str]:
    """
    The words a fresh Python printed after ``connect_native.<module>``'s
    ``install()`` and one turn of the reactor: ``report``, an expression on
    ``reactor``.  A child of its own, since a reactor installs once a process.
    """
    script = (
        f"from connect_native import {module}\n"
        f"{module}.install()\n"
        "from twisted.internet import reactor\n"
        "reactor.callLater(0, reactor.stop)\n"
        "reactor.run()\n"
        f"print({report})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_environment(()),
        cwd=SOURCE_TREE,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


class OutputProcess:
    """
    ``argv`` running in ``cwd`` with ``env``, standard output and error
    merged into :attr:`lines`.  ``name`` is how failures name it.
    """

    def __init__(
        self, name: str, argv: list[str], cwd: Path, env: dict[str, str]
    ) -> None:
        self.name = name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def lines_with(self, *needles: str) -> list[str]:
        """The lines so far that hold every needle."""
        with self._changed:
            return [line for line in self.lines if all(n in line for n in needles)]

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Block (fixture setup only) until a line matches, or fail."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    found = re.search(pattern, line)
                    if found:
                        return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    raise AssertionError(
                        f"{self.name} never logged {pattern!r}:\n"
                        + "\n".join(self.lines)
                    )
                self._changed.wait(remaining)

    def join_reader(self) -> None:
        self._reader.join(5)
