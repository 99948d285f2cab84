"""
Issue 17, items 4 and 6, in process: the options of the backend check and
the registration (``--to-check``, ``--check-interval``, ``--tag``,
``--meta``, ``--deregister-critical-after``) and of the logs
(``--log-format``); :class:`~connect_native.terminator.health.BackendProbe`
on a Clock; the probes against real loopback listeners; and the JSON lines
and the chatter filter of :mod:`connect_native.terminator.logs`.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site

from connect_native.server import _log_decision
from connect_native.terminator import Options, Settings, worker_arguments
from connect_native.terminator import logs as terminator_logs
from connect_native.terminator.health import BackendProbe, http_probe, tcp_probe

BASE = ["--service", "web", "--to", "tcp:127.0.0.1:8080"]


@pytest.fixture(autouse=True)
def no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


def parse(*args: str) -> Settings:
    options = Options()
    options.parseOptions(list(args))
    assert options.settings is not None
    return options.settings


def refused(*args: str) -> str:
    with pytest.raises(usage.UsageError) as raised:
        parse(*args)
    message = str(raised.value)
    assert "\n" not in message
    return message


# -- options --------------------------------------------------------------------


def test_the_backend_is_probed_over_tcp_every_5s_by_default() -> None:
    settings = parse(*BASE)
    assert settings.to_check == "tcp"
    assert settings.check_interval == 5.0
    assert settings.tags == ()
    assert settings.meta == ()
    assert settings.deregister_critical_after is None
    assert settings.log_format == "text"


def test_no_to_no_probe() -> None:
    settings = parse("--service", "web", "--upstream", "db=tcp:9191")
    assert settings.to_check is None


def test_the_health_and_registration_options() -> None:
    settings = parse(
        *BASE,
        "--to-check",
        "http:/healthz?full=1",
        "--check-interval",
        "2.5",
        "--tag",
        "blue",
        "--tag",
        "v2",
        "--meta",
        "version=1.2",
        "--meta",
        "team=a=b",
        "--meta",
        "version=1.3",
        "--deregister-critical-after",
        "90s",
        "--log-format",
        "json",
    )
    assert settings.to_check == "http"
    assert settings.to_check_path == "/healthz?full=1"
    assert settings.check_interval == 2.5
    assert settings.tags == ("blue", "v2")
    assert settings.meta == (("team", "a=b"), ("version", "1.3"))
    assert settings.deregister_critical_after == 90.0
    assert settings.log_format == "json"
    assert parse(*BASE, "--to-check", "none").to_check is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("600", 600.0), ("10m", 600.0), ("1h", 3600.0), ("1.5m", 90.0), ("500ms", 0.5)],
)
def test_deregister_critical_after_durations(text: str, seconds: float) -> None:
    assert parse(
        *BASE, "--deregister-critical-after", text
    ).deregister_critical_after == (seconds)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--to-check", "udp"], "--to-check: 'udp' is not tcp, http:/PATH"),
        (["--to-check", "http:healthz"], "--to-check: 'http:healthz' is not"),
        (["--to-check", "http:/a b"], "is not tcp, http:/PATH"),
        (["--check-interval", "0"], "--check-interval must be a number of seconds"),
        (["--tag", ""], "--tag: '' is not a tag"),
        (["--meta", "version"], "--meta: 'version' is not KEY=VALUE"),
        (["--meta", "a b=c"], "is not KEY=VALUE"),
        (["--meta", "consul-x=1"], "reserved by Consul"),
        (["--meta", "k=" + "v" * 513], "longer than Consul's 512"),
        (["--deregister-critical-after", "soon"], "must be a duration > 0"),
        (["--deregister-critical-after", "0s"], "must be a duration > 0"),
        (["--log-format", "xml"], "--log-format"),
        (["--no-register", "--tag", "a"], "--tag goes with the registration"),
        (["--no-register", "--to-check", "tcp"], "--to-check goes with"),
    ],
)
def test_bad_health_and_log_options_are_refused_in_one_line(
    args: list[str], says: str
) -> None:
    assert says in refused(*BASE, *args)


def test_to_check_needs_to() -> None:
    message = refused(
        "--service", "web", "--upstream", "db=tcp:9191", "--to-check", "tcp"
    )
    assert message == "--to-check needs --to: it is how the registered check probes it"


def test_workers_log_as_the_first_process_does() -> None:
    settings = parse(*BASE, "--log-format", "json", "--workers", "2")
    assert "--log-format" not in worker_arguments(parse(*BASE), 8443, None)
    arguments = worker_arguments(settings, 8443, None)
    assert arguments[arguments.index("--log-format") + 1] == "json"


# -- twistd's log observer --------------------------------------------------------


class Twistd(dict[str, Any]):
    """What the plugin's options see of twistd's: a parent mapping."""


def parsed_under(parent: dict[str, Any], *args: str) -> None:
    options = Options()
    options.parent = parent  # type: ignore[attr-defined]
    options.parseOptions([*BASE, *args])


def test_twistd_is_told_to_log_through_the_terminators_observer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parent = Twistd(logger=None, syslog=False, nodaemon=True, logfile=None)
    parsed_under(parent, "--log-format", "json")
    assert parent["logger"] == "connect_native.terminator.logs.twistd_observer"
    observer: Any = terminator_logs.twistd_observer()
    observer(event(log_format="twistd {v} starting up.", v="26"))
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["message"] == "twistd 26 starting up."


@pytest.mark.parametrize("given", [{"logger": "my.observer"}, {"syslog": True}])
def test_twistds_own_logger_and_syslog_are_left_alone(given: dict[str, Any]) -> None:
    parent = Twistd(logger=None, syslog=False, nodaemon=True, logfile=None)
    parent.update(given)
    parsed_under(parent, "--log-format", "json")
    assert parent["logger"] == given.get("logger")


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "log_time": 1_800_000_000.25,
        "log_level": LogLevel.info,
        "log_namespace": "connect_native.server",
        "log_source": None,
    }
    base.update(fields)
    return base


def test_a_json_line_has_timestamp_level_message_and_the_simple_fields() -> None:
    out = io.StringIO()
    observer = terminator_logs.observer_for(out, "json", "info")
    observer(
        event(
            log_format="hello {who} ({n})",
            who="world",
            n=3,
            obj=object(),
            message=("legacy",),
        )
    )
    (line,) = out.getvalue().splitlines()
    body = json.loads(line)
    assert body["timestamp"] == "2027-01-15T08:00:00.250+00:00"
    assert body["level"] == "info"
    assert body["message"] == "hello world (3)"
    assert body["namespace"] == "connect_native.server"
    assert body["who"] == "world"
    assert body["n"] == 3
    assert "obj" not in body


def test_a_logged_failure_keeps_its_traceback_in_one_line() -> None:
    out = io.StringIO()
    observer = terminator_logs.observer_for(out, "json", "info")
    log = Logger(observer=observer, namespace="t")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it broke")
    (line,) = out.getvalue().splitlines()
    body = json.loads(line)
    assert body["level"] == "critical"
    assert body["message"] == "it broke"
    assert "ZeroDivisionError" in body["traceback"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_twisteds_factory_lines_are_dropped_unless_debug(log_format: str) -> None:
    chatter = event(
        log_format="Starting factory {factory!r}",
        factory="F",
        log_namespace="twisted.web.client._HTTP11ClientFactory",
    )
    legacy = event(log_format=None, message=("Stopping factory F",), log_namespace="x")
    kept = event(log_format="registered web")
    out = io.StringIO()
    observer = terminator_logs.observer_for(out, log_format, "info")
    for e in (chatter, legacy, kept):
        observer(dict(e))
    assert "factory" not in out.getvalue()
    assert "registered web" in out.getvalue()
    debug = io.StringIO()
    observer = terminator_logs.observer_for(debug, log_format, "debug")
    observer(dict(chatter))
    assert "Starting factory" in debug.getvalue()


def test_a_connection_decision_carries_the_structured_fields() -> None:
    from twisted.internet.address import IPv4Address

    from connect_native.authorize import Decision
    from connect_native.identity import ServiceIdentity

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        peer = ServiceIdentity("td.consul", "default", "dc1", "api")
        _log_decision(
            peer,
            "web",
            Decision(True, "intention allows", "agent"),
            0.25,
            IPv4Address("TCP", "10.0.0.9", 40123),
            "after the handshake",
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    (logged,) = [e for e in events if e.get("outcome")]
    line = json.loads(terminator_logs.JSONLinesObserver(io.StringIO()).line(logged))
    assert line["service"] == "web"
    assert line["peer_address"] == "10.0.0.9:40123"
    assert line["peer_identity"] == peer.uri
    assert line["outcome"] == "allowed"
    assert line["reason"] == "intention allows"
    assert line["duration"] == 0.25


# -- the probe on a Clock ---------------------------------------------------------


class Probes:
    """A probe whose answers the test gives."""

    def __init__(self) -> None:
        self.pending: list[Deferred[str]] = []

    def __call__(self) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.pending.append(d)
        return d


def test_the_probe_runs_at_start_and_every_interval_and_tells_of_changes() -> None:
    clock = Clock()
    probes = Probes()
    probe = BackendProbe(clock, probes, "tcp:b:1", interval=5.0, timeout=2.0)
    changes: list[bool] = []
    probe.subscribe(lambda: changes.append(probe.healthy))
    assert not probe.healthy
    assert probe.reason == "tcp:b:1 not probed yet"
    probe.startService()
    assert len(probes.pending) == 1
    probes.pending[0].callback("tcp:b:1 accepts connections")
    assert probe.healthy
    assert changes == [True]
    clock.advance(5.0)
    assert len(probes.pending) == 2
    probes.pending[1].callback("tcp:b:1 accepts connections")
    assert changes == [True]  # no change, no call
    clock.advance(5.0)
    probes.pending[2].errback(OSError("refused"))
    assert not probe.healthy
    assert probe.reason == "tcp:b:1 unreachable: refused"
    assert changes == [True, False]


def test_a_probe_that_hangs_is_cancelled_at_its_timeout() -> None:
    clock = Clock()
    probes = Probes()
    probe = BackendProbe(clock, probes, "tcp:b:1", interval=5.0, timeout=2.0)
    probe.startService()
    clock.advance(2.0)
    assert probes.pending[0].called
    assert probe.reason == "tcp:b:1 unreachable: no answer within 2s"
    clock.advance(5.0)
    assert len(probes.pending) == 2


def test_stop_cancels_the_probe_and_schedules_nothing() -> None:
    clock = Clock()
    probes = Probes()
    probe = BackendProbe(clock, probes, "tcp:b:1", interval=5.0, timeout=2.0)
    probe.startService()
    probe.stopService()
    assert probes.pending[0].called
    assert clock.getDelayedCalls() == []


def test_a_probe_answered_at_once_is_fine() -> None:
    clock = Clock()
    answers = iter([succeed("up"), fail(OSError("down"))])
    probe = BackendProbe(clock, lambda: next(answers), "x", interval=1.0, timeout=1.0)
    probe.startService()
    assert probe.healthy
    clock.advance(1.0)
    assert not probe.healthy
    assert probe.reason == "x unreachable: down"
    probe.stopService()


@pytest.mark.parametrize(
    ("to", "host"),
    [
        ("tcp:127.0.0.1:8080", "127.0.0.1:8080"),
        ("tcp:host=app.local:port=80:timeout=3", "app.local:80"),
        ("tcp6:\\:\\:1:8080", "[::1]:8080"),
        ("unix:/run/app.sock", "localhost"),
    ],
)
def test_the_http_probe_sends_the_backends_host(to: str, host: str) -> None:
    from connect_native.terminator.health import _host_header

    assert _host_header(to) == host


# -- the probes against loopback listeners -------------------------------------------


def bounded(d: Deferred[Any], seconds: float = 10.0) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


@pytest_twisted.ensureDeferred
async def test_the_tcp_probe_connects_and_hangs_up() -> None:
    port: Any = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Factory.forProtocol(Protocol), interface="127.0.0.1"
    )
    number = port.getHost().port
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", number)
    probe = tcp_probe(endpoint, f"tcp:127.0.0.1:{number}")
    try:
        found = await bounded(probe())
        assert found == f"tcp:127.0.0.1:{number} accepts connections"
    finally:
        await port.stopListening()
    with pytest.raises(ConnectionRefusedError):
        await bounded(probe())


class Health(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.paths: list[bytes] = []
        self.hosts: list[bytes | None] = []

    def render_GET(self, request: Any) -> bytes:
        self.paths.append(request.uri)
        self.hosts.append(request.getHeader(b"host"))
        request.setResponseCode(self.code)
        return b"ok"


@pytest_twisted.ensureDeferred
async def test_the_http_probe_passes_on_2xx_only() -> None:
    health = Health()
    port: Any = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Site(health), interface="127.0.0.1"
    )
    number = port.getHost().port
    to = f"tcp:127.0.0.1:{number}"
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", number)
    probe = http_probe(reactor, endpoint, to, "/healthz?x=1")
    try:
        assert await bounded(probe()) == f"GET /healthz?x=1 on {to} answered 200"
        health.code = 503
        with pytest.raises(ValueError, match="answered 503, not 2xx"):
            await bounded(probe())
        assert health.paths == [b"/healthz?x=1", b"/healthz?x=1"]
        assert health.hosts == [f"127.0.0.1:{number}".encode()] * 2
    finally:
        await port.stopListening()
