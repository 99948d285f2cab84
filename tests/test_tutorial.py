"""
The tutorial (``docs/tutorial.rst``), run the way a reader runs it: every
shell command it shows, in its order, in ``bash``, in an empty directory
holding the files it includes (``docs/tutorial/*.py``), against the
development agent (``python -m connect_native.devagent``) on a free port.
The programs the reader leaves running (the agent, the Klein app, the plain
HTTP server, the terminator) run in the background, each in its own process
group; every one is stopped with Ctrl-C (SIGINT) at the end, as the
tutorial says, and killed in a ``finally`` whatever happens.

The first tests tie the page to this script: the page shows exactly the
commands run here and the output checked here, so neither can change alone.
The how-to guide on testing (``docs/howto/testing.rst``) includes
``docs/howto/testing_example.py``, whose tests are run here too.

Every wait is bounded; polling with short sleeps is the point here (other
processes, real sockets), not a substitute for a ``Clock``.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from attrs import frozen

SOURCE_TREE = Path(__file__).resolve().parent.parent
DOCS = SOURCE_TREE / "docs"
TUTORIAL = DOCS / "tutorial.rst"

#: The bound on each step: a program becoming ready, a command finishing, a
#: command that must eventually answer as shown (decisions are remembered
#: for a second), a program stopping.  On a quiet machine each takes well
#: under a second.
BOUND = 30.0

#: The commands the test does not run: they make a virtual environment and
#: install into it.  ``test_the_installed_extra_brings_klein`` checks what
#: they rely on.
INSTALL = [
    "python -m venv venv && . venv/bin/activate",
    "python -m pip install './connect_native[web]'      # the source tree's directory",
]

#: The ports the page uses, replaced by free ones when the test runs.
AGENT_PORT = "8500"
HTTP_PORT = "8080"


@frozen
class Step:
    """
    One command of the tutorial, as the page shows it.

    :ivar ready: for a program left running: a line of its output that says
        it is ready.
    :ivar output: the exact output the page shows.
    :ivar starts: the start of the output, where the page elides the rest.
    :ivar contains: text the output must contain.
    :ivar status: the exit status.
    :ivar eventually: the answer may take a moment (an intention change
        meets a decision remembered for a second): retry, bounded.
    """

    command: str
    ready: str | None = None
    output: str | None = None
    starts: str | None = None
    contains: tuple[str, ...] = ()
    status: int = 0
    eventually: bool = False

    @property
    def background(self) -> bool:
        return self.ready is not None


CALL_GREETER = "python caller.py https://greeter.service.consul/"
CALL_FILES = "python caller.py https://files.service.consul/"

STEPS = (
    Step(
        "python -m connect_native.devagent --port 8500",
        ready="listening on http://127.0.0.1:",
    ),
    Step("export CONSUL_HTTP_ADDR=127.0.0.1:8500"),
    Step("python greeter.py", ready="registered greeter-"),
    Step(
        'curl -s "http://$CONSUL_HTTP_ADDR/v1/health/connect/greeter?passing=1"',
        contains=('"Service": "greeter"', '"Native": true'),
    ),
    Step(CALL_GREETER, output="200 hello, caller\n"),
    Step(
        'curl -s -X POST "http://$CONSUL_HTTP_ADDR/v1/connect/intentions" -d \''
        '{"SourceName": "caller", "DestinationName": "greeter", "Action": "deny"}'
        "'",
        contains=('"ID": "',),
    ),
    Step(
        CALL_GREETER,
        starts="no answer from https://greeter.service.consul/: ",
        contains=("refused this connection with the TLS alert 'internal error'",),
        status=1,
        eventually=True,
    ),
    Step(
        "python intention.py caller greeter allow",
        starts="caller -> greeter: allow (intention ",
    ),
    Step(CALL_GREETER, output="200 hello, caller\n", eventually=True),
    Step('mkdir site && echo "hello from a plain HTTP server" > site/index.html'),
    Step(
        "python -m http.server 8080 --bind 127.0.0.1 --directory site",
        ready="Serving HTTP on 127.0.0.1 port",
    ),
    Step(
        "twistd -n connect-native --service files "
        "--listen tcp:0:interface=127.0.0.1 --to tcp:127.0.0.1:8080",
        ready="registered files-",
    ),
    Step(CALL_FILES, output="200 hello from a plain HTTP server\n"),
    Step("python intention.py caller files deny", starts="caller -> files: deny"),
    Step(
        CALL_FILES,
        starts="no answer from https://files.service.consul/: ",
        status=1,
        eventually=True,
    ),
)

#: What the greeter logs about the denied caller; the page shows it.
DENIAL_LOGGED = "Matched intention: DENY default/caller => default/greeter"
#: What the greeter logs when stopped with Ctrl-C; the page shows it.
DEREGISTERED = "deregistered greeter-"


def documented_commands() -> list[str]:
    """The ``$ `` lines of the page's ``console`` blocks, in order."""
    commands: list[str] = []
    in_console = False
    for line in TUTORIAL.read_text().splitlines():
        if line.startswith(".. code-block::"):
            in_console = line.split("::", 1)[1].strip() == "console"
        elif line and not line[0].isspace():
            in_console = False
        elif in_console and line.strip().startswith("$ "):
            commands.append(line.strip()[2:])
    return commands


def test_the_tutorial_shows_exactly_the_commands_the_test_runs() -> None:
    assert documented_commands() == [*INSTALL, *(step.command for step in STEPS)]


def test_the_tutorial_shows_the_output_the_test_checks() -> None:
    # Compared with runs of white space as one space: the page wraps prose.
    text = " ".join(TUTORIAL.read_text().split())
    for step in STEPS:
        for shown in (step.output, step.starts, step.ready, *step.contains):
            if shown is not None:
                assert " ".join(shown.split()) in text, (step.command, shown)
    assert DENIAL_LOGGED in text
    assert DEREGISTERED in text


def test_the_tutorial_includes_every_file_the_test_runs() -> None:
    text = TUTORIAL.read_text()
    for path in sorted((DOCS / "tutorial").glob("*.py")):
        assert f".. literalinclude:: tutorial/{path.name}" in text
        assert f"python {path.name}" in text


def test_the_installed_extra_brings_klein() -> None:
    setup = configparser.ConfigParser()
    setup.read(SOURCE_TREE / "setup.cfg")
    web = setup["options.extras_require"]["web"].split()
    assert "klein" in web
    assert setup["metadata"]["name"] == "connect_native"


# --- running it ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Background:
    """A program the reader leaves running, with its output in a file."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], log: Path):
        self.command = command
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=cwd,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + BOUND
        while text not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.command!r} exited with {self.process.returncode} "
                    f"before saying {text!r}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.command!r} did not say {text!r} within {BOUND:g}s:\n"
                    f"{self.output()}"
                )
            time.sleep(0.05)

    def interrupt(self) -> int:
        """Ctrl-C, as the reader stops it; its exit status."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.command!r} did not stop within {BOUND:g}s of SIGINT:\n"
                f"{self.output()}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=BOUND)
        self._out.close()


class Reader:
    """Runs the tutorial's steps in one directory, as a reader would."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = {AGENT_PORT: str(free_port()), HTTP_PORT: str(free_port())}
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        env.pop("CONNECT_NATIVE_SERVICE", None)
        # The source tree stands for the installed package (its twisted/plugins
        # included), and `python` and `twistd` are this environment's.
        env["PYTHONPATH"] = str(SOURCE_TREE)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env
        self.running: dict[str, Background] = {}

    def localize(self, command: str) -> str:
        for documented, free in self.ports.items():
            command = re.sub(rf"\b{documented}\b", free, command)
        return command

    def run(self, step: Step) -> None:
        command = self.localize(step.command)
        if command.startswith("export "):
            name, _, value = command[len("export ") :].partition("=")
            self.env[name] = value
            return
        if step.ready is not None:
            program = Background(
                command,
                self.directory,
                dict(self.env),
                self.directory / f"background-{len(self.running)}.log",
            )
            self.running[step.command] = program
            program.wait_for(step.ready)
            return
        deadline = time.monotonic() + BOUND
        while True:
            status, output = self.once(command)
            problem = self.mismatch(step, status, output)
            if problem is None:
                return
            if not step.eventually or time.monotonic() > deadline:
                raise AssertionError(
                    f"{step.command!r}: {problem}; it said (status {status}):\n"
                    f"{output}\n{self.logs()}"
                )
            time.sleep(0.2)

    def once(self, command: str) -> tuple[int, str]:
        try:
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=self.directory,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=BOUND,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{command!r} took over {BOUND:g}s") from e
        return done.returncode, done.stdout + done.stderr

    @staticmethod
    def mismatch(step: Step, status: int, output: str) -> str | None:
        if status != step.status:
            return f"exit status {status}, not {step.status}"
        if step.output is not None and output != step.output:
            return f"output is not {step.output!r}"
        if step.starts is not None and not output.startswith(step.starts):
            return f"output does not start with {step.starts!r}"
        for text in step.contains:
            if text not in output:
                return f"output does not contain {text!r}"
        return None

    def logs(self) -> str:
        return "\n".join(
            f"--- {command}:\n{program.output()}"
            for command, program in self.running.items()
        )


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[Reader]:
    if shutil.which("curl") is None:
        pytest.skip("the tutorial uses curl, which is not installed")
    for source in (DOCS / "tutorial").glob("*.py"):
        shutil.copy(source, tmp_path / source.name)
    reader = Reader(tmp_path)
    try:
        yield reader
    finally:
        for program in reversed(list(reader.running.values())):
            program.kill()


def test_the_tutorial_runs_as_written(reader: Reader) -> None:
    for step in STEPS:
        reader.run(step)

    greeter = reader.running["python greeter.py"]
    assert DENIAL_LOGGED in greeter.output()

    # "Stop everything with Ctrl-C": each stops, and the greeter and the
    # terminator deregister on the way out.
    # (twistd ends by re-raising the signal, which is how a shell sees it.)
    for command, program in reversed(list(reader.running.items())):
        status = program.interrupt()
        assert status in (0, -signal.SIGINT), (command, status, program.output())
    assert DEREGISTERED in greeter.output()
    assert "deregistered files-" in reader.running[STEPS[11].command].output()


# --- the how-to guide's testing example ------------------------------------------


def load_testing_example() -> Any:
    path = DOCS / "howto" / "testing_example.py"
    spec = importlib.util.spec_from_file_location("howto_testing_example", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TESTING_EXAMPLE = load_testing_example()


@pytest.mark.parametrize(
    "name",
    sorted(
        name
        for name, value in vars(TESTING_EXAMPLE).items()
        if name.startswith("test_") and inspect.isfunction(value)
    ),
)
def test_the_testing_guide_example_passes(name: str) -> None:
    getattr(TESTING_EXAMPLE, name)()


def test_the_testing_guide_includes_its_example() -> None:
    guide = (DOCS / "howto" / "testing.rst").read_text()
    assert ".. literalinclude:: testing_example.py" in guide


# --- the reference is complete ----------------------------------------------------

REFERENCE = DOCS / "reference"


def test_every_twistd_option_is_in_the_reference() -> None:
    from connect_native.terminator import Options

    names = {str(p[0]) for p in Options.optParameters}
    names |= {str(f[0]) for f in Options.optFlags}
    names |= {
        name[len("opt_") :].replace("_", "-")
        for name in dir(Options)
        if name.startswith("opt_") and name not in ("opt_help", "opt_version")
    }
    assert "service" in names
    documented = (REFERENCE / "twistd.rst").read_text()
    missing = sorted(n for n in names if f"``--{n}" not in documented)
    assert missing == []


def test_every_environment_variable_is_in_the_reference() -> None:
    variables: set[str] = set()
    for path in (SOURCE_TREE / "connect_native").rglob("*.py"):
        variables |= set(
            re.findall(r"\b(CONSUL_[A-Z_]+|CONNECT_NATIVE_[A-Z_]+)\b", path.read_text())
        )
    # The development agent's own constant, not a variable.
    variables.discard("CONSUL_VERSION")
    assert "CONSUL_HTTP_ADDR" in variables
    assert "CONNECT_NATIVE_SERVICE" in variables
    documented = (REFERENCE / "environment.rst").read_text()
    missing = sorted(v for v in variables if f"``{v}``" not in documented)
    assert missing == []


def test_every_error_class_is_in_the_reference() -> None:
    import pkgutil

    import connect_native

    errors: set[str] = set()
    for module_info in pkgutil.walk_packages(
        connect_native.__path__, "connect_native."
    ):
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == module.__name__
                and not name.startswith("_")
            ):
                errors.add(name)
    assert "ConnectError" in errors
    documented = (REFERENCE / "errors.rst").read_text()
    missing = sorted(e for e in errors if not re.search(rf"\b{e}\b", documented))
    assert missing == []
