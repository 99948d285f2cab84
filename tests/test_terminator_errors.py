"""
Errors a person can act on, from ``twistd connect-native``: an option error
is one line and a pointer to ``--help``; ``--help`` is grouped and leaves out
the internal ``--worker``; ``--version`` says connect_native's version; a
port in use is one critical line, no traceback, and exit status 1.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from twisted.python import usage

from connect_native import __version__
from connect_native.terminator import Options
from tests.test_terminator_real import twistd

SOURCE_TREE = Path(__file__).resolve().parent.parent


def run_twistd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(SOURCE_TREE), COLUMNS="100")
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        env.pop(name, None)
    return subprocess.run(
        [twistd(), "-n", "--pidfile=", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=SOURCE_TREE,
    )


class Parent(usage.Options):
    """What twistd is to the plugin's options: the command they are under."""

    subCommands = [["connect-native", None, Options, "the terminator"]]


def test_an_option_error_under_twistd_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        Parent().parseOptions(["connect-native", "--service", "web", "--to", "bad"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "twistd connect-native: --to: 'bad' is not a client endpoint description "
        "(Unknown endpoint type: 'bad'); e.g. tcp:127.0.0.1:8080",
        "Run 'twistd connect-native --help' for the options.",
    ]


def test_from_code_an_option_error_is_still_a_usage_error() -> None:
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--service", "web", "--to", "bad"])


def test_help_is_grouped_and_hides_worker() -> None:
    text = Options().getUsage(width=100)
    titles = [line for line in text.splitlines() if line and not line[0].isspace()]
    assert titles[:5] == [
        "The service and its listener:",
        "Certificates and the Consul agent:",
        "Registration and health:",
        "Authorization:",
        "Limits and timeouts:",
    ]
    # Every option has its group: none is left to a catch-all.
    assert "Other:" not in titles
    assert "--worker " not in text
    assert "--workers=" in text
    assert "--version" in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"connect_native {__version__}\n"


def test_twistd_prints_one_line_for_a_bad_option() -> None:
    result = run_twistd("connect-native", "--service", "web", "--to", "bad")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-2:] == [
        "twistd connect-native: --to: 'bad' is not a client endpoint description "
        "(Unknown endpoint type: 'bad'); e.g. tcp:127.0.0.1:8080",
        "Run 'twistd connect-native --help' for the options.",
    ]
    assert "Options:" not in result.stdout + result.stderr


def test_a_port_in_use_is_one_critical_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_twistd(
            "connect-native",
            "--dev",
            "--service",
            "web",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--to",
            "tcp:127.0.0.1:1",
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    critical = [line for line in output.splitlines() if "#critical]" in line]
    assert len(critical) == 1, output
    assert "cannot start: Couldn't listen on 127.0.0.1:" in critical[0]
    assert "Address already in use" in critical[0]
    assert "Traceback" not in output
    assert f"connect_native {__version__} starting" in output


def test_twistd_connect_native_version() -> None:
    result = run_twistd("connect-native", "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"connect_native {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ("--service", "we b", "--to", "tcp:127.0.0.1:1"),
        ("--service", "web", "--upstream", "d b=tcp:1"),
        ("--service", "web", "--upstream", "db@d c=tcp:1"),
    ],
)
def test_a_refused_name_says_which_characters_are_allowed(
    args: tuple[str, ...],
) -> None:
    with pytest.raises(usage.UsageError) as refused:
        Options().parseOptions(list(args))
    assert "letters, digits, '_', '-' and '.'" in str(refused.value)
