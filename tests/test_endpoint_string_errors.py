"""
A bad ``connect:`` description, given where a user types it, ends the
program with one line that says what is wrong, not Twisted's traceback
(issue 17, item 7): ``twistd web --listen connect:...``, ``twist web``, a
script calling ``clientFromString``.  A program that catches the error still
gets it as an exception.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.testing import MemoryReactor

from connect_native.errors import EndpointStringError
from tests.processes import child_environment

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
TWIST = [sys.executable, "-m", "twisted"]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env=child_environment(["CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"]),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("runner", "options"),
    [(TWISTD, ["-n", "web"]), (TWIST, ["web"])],
    ids=["twistd", "twist"],
)
def test_a_bad_server_description_under_twistd_web_is_one_line(
    tmp_path: Path, runner: list[str], options: list[str]
) -> None:
    result = _run(
        [
            *runner,
            *options,
            "--listen",
            "connect:web:port=0:authorize=bogus",
            "--path",
            str(tmp_path),
        ],
        tmp_path,
    )
    _one_line(
        result,
        "connect: server endpoint",
        "authorize= must be one of agent, intentions or allow-ids, not 'bogus'",
    )


def test_a_misspelt_client_option_in_a_script_is_one_line(tmp_path: Path) -> None:
    script = (
        "from twisted.internet import reactor\n"
        "from twisted.internet.endpoints import clientFromString\n"
        "clientFromString(reactor, 'connect:web:source=api:timout=3')\n"
    )
    (tmp_path / "dial.py").write_text(script)
    line = _one_line(
        _run([sys.executable, "dial.py"], tmp_path),
        "unknown option 'timout'",
        "did you mean 'timeout'?",
    )
    assert line.startswith("dial.py: connect: client endpoint:"), line


def test_other_uncaught_errors_keep_their_traceback(tmp_path: Path) -> None:
    script = (
        "from twisted.internet import reactor\n"
        "from twisted.internet.endpoints import serverFromString\n"
        "try:\n"
        "    serverFromString(reactor, 'connect:web:port=x')\n"
        "except ValueError as e:\n"
        "    print('caught:', e)\n"
        "raise KeyError('something else')\n"
    )
    (tmp_path / "other.py").write_text(script)
    result = _run([sys.executable, "other.py"], tmp_path)
    assert result.returncode == 1
    assert "caught: connect: server endpoint: port=" in result.stdout
    assert "Traceback" in result.stderr
    assert "KeyError: 'something else'" in result.stderr


def test_a_program_that_catches_the_error_still_gets_it() -> None:
    reactor = MemoryReactor()
    with pytest.raises(EndpointStringError, match="authorize= must be one of"):
        serverFromString(reactor, "connect:web:port=0:authorize=bogus")
    with pytest.raises(EndpointStringError, match="unknown option 'timout'"):
        clientFromString(reactor, "connect:web:source=api:timout=3")
