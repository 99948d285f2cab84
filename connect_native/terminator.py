"""
``twistd connect-native``: a Connect TLS terminator in front of a plaintext
local application, and plaintext local listeners (upstreams) that dial other
Connect services as our service.

- ``--listen`` accepts mutual-TLS connections for ``--service`` with
  :class:`~connect_native.server.ConnectServerEndpoint` (certificates from
  the agent, the peer authorized before any byte moves) and forwards each to
  ``--to``;
- each ``--upstream NAME=ENDPOINT`` listens in plaintext (on 127.0.0.1 unless
  told otherwise) and forwards each connection to Connect service ``NAME``
  with :class:`~connect_native.client.ConnectClientEndpoint`;
- the instance is registered with the agent (``--no-register`` not to);
- ``--dev`` runs the development agent in the process, and ``--demo``
  also runs a backend and a Connect client that makes one round trip
  through the terminator, then exits (0 when it went through).

Forwarding is :mod:`connect_native.forward`.  :class:`Options` and
:func:`makeService` are what the ``connect-native`` ``ServiceMaker`` names.
"""

from __future__ import annotations

import atexit
import ipaddress
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from attrs import field, frozen
from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    ensureDeferred,
    maybeDeferred,
)
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import InvalidLogLevelError, Logger, LogLevel
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native import _logging
from connect_native.forward import (
    BUFFER_SIZE,
    ConnectionTracker,
    ForwardingFactory,
    TrackedEndpoint,
)
from connect_native.tls_transport import TLSServerProtocol

__all__ = [
    "DEMO_CLIENT_SERVICE",
    "DEMO_SERVICE",
    "TLS_TRANSPORTS",
    "Options",
    "Settings",
    "Terminator",
    "Upstream",
    "makeService",
    "parse_upstream",
]

log = Logger(observer=_logging.observer)

# Twisted's endpoint helpers are untyped.
serverFromString: Any = endpoints.serverFromString  # noqa: N816
clientFromString: Any = endpoints.clientFromString  # noqa: N816
connectProtocol: Any = endpoints.connectProtocol  # noqa: N816

DEMO_SERVICE = "demo-web"
DEMO_CLIENT_SERVICE = "demo-client"
DEMO_MESSAGE = b"hello through Connect\n"

MAX_WORKERS = 64

#: The values of ``--tls-transport``: Twisted's ``TLSMemoryBIOProtocol``, or
#: the terminator's own :class:`~connect_native.tls_transport.TLSServerProtocol`
#: (injected into the public endpoint as its ``tls_protocol=``).
TLS_TRANSPORTS = ("twisted", "connect_native")

_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


# --- the settings ------------------------------------------------------------


@frozen
class Upstream:
    """
    One ``--upstream``: a plaintext listener (``listen``, a server endpoint
    description) whose connections go to Connect service ``name`` (or
    prepared query ``name`` when ``query``), in ``datacenter`` if given.
    ``interface`` is the address it binds, when the description has one.
    """

    name: str
    listen: str
    query: bool = False
    datacenter: str | None = None
    interface: str | None = None

    @property
    def target(self) -> str:
        kind = "prepared query" if self.query else "Connect service"
        where = f" in datacenter {self.datacenter!r}" if self.datacenter else ""
        return f"{kind} {self.name!r}{where}"

    @property
    def loopback_only(self) -> bool:
        if self.interface is None:
            return True  # a UNIX socket or similar: not reachable from afar
        try:
            return ipaddress.ip_address(self.interface.split("%")[0]).is_loopback
        except ValueError:
            return False


@frozen
class Settings:
    """What ``twistd connect-native``'s options say, checked."""

    service: str
    listen: str = "tcp:8443"
    to: str | None = None
    upstreams: tuple[Upstream, ...] = ()
    consul: str | None = None
    token: str | None = field(default=None, repr=False)
    authorize: str = "agent"
    register: bool = True
    dev: bool = False
    demo: bool = False
    max_connections: int = 1000
    max_handshakes: int = 256
    max_handshakes_per_address: int = 64
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 3600.0
    shutdown_timeout: float = 10.0
    authorize_cache: float = 1.0
    workers: int = 1
    worker: bool = False
    release_buffers: bool = False
    log_allowed: bool = True
    keep_open_on_deny: bool = False
    buffer_size: int = BUFFER_SIZE
    log_level: str = "info"
    tls_transport: str = "connect_native"


def _split_description(description: str) -> list[str]:
    return _UNESCAPED_COLON.split(description)


#: The listen backlog of the public listener when its description names
#: none: Twisted's default of 50 overflowed at a burst of 51 connects
#: (clients stalled a second for the SYN retry).  nginx and haproxy use 511+.
DEFAULT_BACKLOG = 1024


def with_default_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """
    A ``tcp``/``tcp6`` server description (or a bare port) with
    ``backlog=`` added when it names none; any other description unchanged.
    """
    parts = _split_description(description)
    if len(parts) == 1 and parts[0].isdigit():
        parts = ["tcp", parts[0]]
    if parts[0].lower() not in ("tcp", "tcp6"):
        return description
    if any(part.split("=", 1)[0].strip() == "backlog" for part in parts[1:]):
        return description
    return ":".join([*parts, f"backlog={backlog}"])


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _description_interface(description: str) -> tuple[str, str | None]:
    """
    A TCP server endpoint description with an explicit interface (127.0.0.1,
    or ::1 for ``tcp6``, when it has none), and that interface.  Other
    endpoint types are returned as they are, with no interface.
    """
    parts = _split_description(description)
    if len(parts) == 1 and parts[0].isdigit():
        parts = ["tcp", parts[0]]
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6"):
        return description, None
    for part in parts[1:]:
        if part.startswith("interface="):
            return ":".join(parts), _unescape(part[len("interface=") :])
    loopback = "127.0.0.1" if kind == "tcp" else "::1"
    escaped = loopback.replace(":", "\\:")
    return ":".join([*parts, f"interface={escaped}"]), loopback


def _check_server_description(option: str, description: str) -> None:
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except Exception as e:
        raise usage.UsageError(
            f"{option}: {description!r} is not a server endpoint description "
            f"({e}); e.g. tcp:8443 or tcp:8443:interface=127.0.0.1"
        ) from None


def _check_client_description(option: str, description: str) -> None:
    from twisted.internet import reactor

    try:
        clientFromString(reactor, description)
    except Exception as e:
        raise usage.UsageError(
            f"{option}: {description!r} is not a client endpoint description "
            f"({e}); e.g. tcp:127.0.0.1:8080"
        ) from None


def parse_upstream(value: str) -> Upstream:
    """
    ``NAME=ENDPOINT``, ``NAME.query=ENDPOINT`` or ``NAME@DC=ENDPOINT`` (or
    ``NAME.query@DC=...``) as an :class:`Upstream`.

    :raises usage.UsageError: naming ``--upstream`` and what is wrong.
    """
    example = "e.g. --upstream db=tcp:9191"
    name, sep, description = value.partition("=")
    if not sep or not name or not description:
        raise usage.UsageError(
            f"--upstream: {value!r} is not NAME=ENDPOINT ({example}, "
            "db.query=tcp:9192 for a prepared query, db@dc2=tcp:9193 for "
            "another datacenter)"
        )
    datacenter: str | None = None
    if "@" in name:
        name, _, datacenter = name.rpartition("@")
        if not _NAME.match(datacenter):
            raise usage.UsageError(
                f"--upstream: {datacenter!r} in {value!r} is not a datacenter name"
            )
    query = name.endswith(".query")
    if query:
        name = name[: -len(".query")]
    if not _NAME.match(name):
        raise usage.UsageError(
            f"--upstream: {name!r} in {value!r} is not a service or prepared "
            f"query name ({example})"
        )
    listen, interface = _description_interface(description)
    _check_server_description("--upstream", listen)
    return Upstream(
        name=name,
        listen=listen,
        query=query,
        datacenter=datacenter,
        interface=interface,
    )


def _seconds(option: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise usage.UsageError(
            f"--{option} must be a number of seconds > 0, not {value!r}"
        )
    return seconds


class Options(usage.Options):
    """
    The options of ``twistd connect-native``; ``postOptions`` checks them
    and leaves a :class:`Settings` in ``self.settings``.
    """

    synopsis = (
        "--service NAME --to ENDPOINT [--listen ENDPOINT] "
        "[--upstream NAME=ENDPOINT ...] [options]   |   --demo"
    )
    longdesc = (
        "A Consul Connect TLS terminator: accepts mutual-TLS connections for "
        "--service on --listen, authorizes each peer by Consul intentions, "
        "and forwards the bytes to the plaintext application at --to; each "
        "--upstream is a local plaintext listener whose connections are "
        "dialled to a Connect service as --service. Quick start: "
        "twistd -n connect-native --demo"
    )
    optParameters: list[list[Any]] = [
        ["service", None, None, "the Connect service this process is (required)"],
        [
            "listen",
            None,
            "tcp:8443",
            "the public mutual-TLS listener, a server endpoint description",
        ],
        [
            "to",
            None,
            None,
            "the local plaintext application, a client endpoint description, "
            "e.g. tcp:127.0.0.1:8080",
        ],
        [
            "consul",
            None,
            None,
            "the Consul agent's HTTP API, e.g. http://127.0.0.1:8500 (default: "
            "CONSUL_HTTP_ADDR, else 127.0.0.1:8500)",
        ],
        [
            "token-file",
            None,
            None,
            "a file holding the Consul ACL token (default: CONSUL_HTTP_TOKEN_FILE "
            "or CONSUL_HTTP_TOKEN)",
        ],
        [
            "authorize",
            None,
            "agent",
            "who decides each connection: agent (ask the agent per connection) "
            "or intentions (cached intentions, decided here)",
        ],
        [
            "authorize-cache",
            None,
            "1",
            "with --authorize agent, seconds a decision is remembered per "
            "client certificate (0: ask the agent for every connection)",
        ],
        [
            "max-connections",
            None,
            "1000",
            "accepted connections open at once, over all listeners (per worker); "
            "a Connect connection counts once it is authorized",
        ],
        [
            "max-handshakes",
            None,
            "256",
            "connections in their TLS handshake at once (per worker); past it "
            "the oldest that sent nothing (else the oldest) is dropped for the "
            "new one, and past half of it the handshake timeout shortens",
        ],
        [
            "max-handshakes-per-address",
            None,
            "64",
            "the same, from one source address",
        ],
        [
            "buffer-size",
            None,
            str(BUFFER_SIZE),
            "bytes read at once from each connection, and queued for a slow "
            "reader before the other side is paused (per connection and "
            "direction; Twisted's default is 65536)",
        ],
        [
            "tls-transport",
            None,
            "connect_native",
            "the TLS transport of accepted Connect connections: connect_native "
            "(its own, for a byte stream: less CPU per connection, more "
            "throughput) or twisted (Twisted's TLSMemoryBIOProtocol)",
        ],
        [
            "workers",
            None,
            "1",
            "processes accepting on --listen (a tcp or tcp6 endpoint), sharing "
            "its port with SO_REUSEPORT",
        ],
        [
            "log-level",
            None,
            "info",
            "connect_native's events below this level are not logged: debug, "
            "info, warn, error or critical (twistd itself shows every level)",
        ],
        ["handshake-timeout", None, "10", "seconds a client has for the TLS handshake"],
        [
            "connect-timeout",
            None,
            "10",
            "seconds to reach --to or an upstream service",
        ],
        [
            "idle-timeout",
            None,
            "3600",
            "seconds without a byte either way before a connection is closed",
        ],
        [
            "shutdown-timeout",
            None,
            "10",
            "on stop, seconds open connections may take to finish before "
            "they are aborted",
        ],
    ]
    optFlags: list[list[Any]] = [
        ["dev", None, "run the development agent in this process instead of --consul"],
        [
            "demo",
            None,
            "run the development agent, a demo backend and a Connect client "
            "that makes one round trip through the terminator, then exit",
        ],
        [
            "release-buffers",
            None,
            "have OpenSSL free the buffers of idle TLS connections: about a "
            "third less memory per idle connection (docs/performance.rst)",
        ],
        [
            "keep-open-on-deny",
            None,
            "keep open connections open when the intentions or the trusted "
            "roots change (by default each is decided again and closed if "
            "now refused)",
        ],
        [
            "worker",
            None,
            "internal: this process is a worker started by --workers (listens "
            "with SO_REUSEPORT, does not register, serves no upstream)",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["upstream"] = []
        self["register"] = True
        self["log-allowed"] = True
        self.settings: Settings | None = None

    def opt_upstream(self, value: str) -> None:
        self["upstream"].append(parse_upstream(value))

    # usage.Options shows the docstring as it is: keep it on one line.
    opt_upstream.__doc__ = (
        "NAME=ENDPOINT: a local plaintext listener whose connections go to "
        "Connect service NAME (NAME.query= a prepared query, NAME@DC= another "
        "datacenter); binds 127.0.0.1 unless the endpoint names an interface "
        "(repeatable)"
    )

    def opt_log_allowed(self) -> None:
        """log each allowed connection (the default; refusals are always logged)"""
        self["log-allowed"] = True

    def opt_no_log_allowed(self) -> None:
        """log refusals only, not each allowed connection"""
        self["log-allowed"] = False

    def opt_register(self) -> None:
        """register this instance with the agent (the default)"""
        self["register"] = True

    def opt_no_register(self) -> None:
        """do not register this instance with the agent"""
        self["register"] = False

    def postOptions(self) -> None:
        demo = bool(self["demo"])
        dev = bool(self["dev"]) or demo
        service = self["service"]
        if service is None and demo:
            service = DEMO_SERVICE
        if service is None:
            raise usage.UsageError(
                "--service is required: the Connect service this process is "
                "(e.g. --service web); or try --demo"
            )
        if not _NAME.match(service):
            raise usage.UsageError(f"--service: {service!r} is not a service name")
        if dev and self["consul"] is not None:
            raise usage.UsageError(
                "--consul cannot be used with --dev or --demo, which run their "
                "own development agent"
            )
        if demo and not self["register"]:
            raise usage.UsageError(
                "--no-register cannot be used with --demo: the demo client "
                "finds the terminator through its registration"
            )
        if demo and self["to"] is not None:
            raise usage.UsageError(
                "--to cannot be used with --demo, which runs its own backend"
            )
        listen = self["listen"]
        if demo and listen == "tcp:8443":
            listen = "tcp:0:interface=127.0.0.1"
        if self["to"] is None and not demo and not self["upstream"]:
            raise usage.UsageError(
                "--to is required (the local application, e.g. "
                "--to tcp:127.0.0.1:8080), unless --upstream listeners are all "
                "this process serves"
            )
        if self["to"] is not None:
            _check_client_description("--to", self["to"])
        _check_server_description("--listen", listen)
        if self["authorize"] not in ("agent", "intentions"):
            raise usage.UsageError(
                f"--authorize must be agent or intentions, not {self['authorize']!r}"
            )
        if self["authorize"] == "intentions":
            try:
                import connect_native.authorize_intentions  # noqa: F401
            except ImportError:  # pragma: no cover (it ships with the package)
                raise usage.UsageError(
                    "--authorize intentions is not available yet in this "
                    "version; use --authorize agent"
                ) from None
        max_connections = _whole_option("--max-connections", self["max-connections"], 1)
        max_handshakes = _whole_option("--max-handshakes", self["max-handshakes"], 1)
        per_address = _whole_option(
            "--max-handshakes-per-address", self["max-handshakes-per-address"], 1
        )
        authorize_cache = _cache_seconds(self["authorize-cache"])
        workers = _workers(self["workers"])
        buffer_size = _whole_option("--buffer-size", self["buffer-size"], 4096, "bytes")
        log_level = _log_level(self["log-level"])
        if self["tls-transport"] not in TLS_TRANSPORTS:
            raise usage.UsageError(
                "--tls-transport must be connect_native or twisted, not "
                f"{self['tls-transport']!r}"
            )
        worker = bool(self["worker"])
        if workers > 1 or worker:
            _check_workers(listen, demo, self["to"], workers)
        token = None
        if self["token-file"] is not None:
            if dev:
                raise usage.UsageError(
                    "--token-file cannot be used with --dev or --demo (the "
                    "development agent has no ACLs)"
                )
            token = _read_token(self["token-file"])
        if not dev:
            _check_consul(self["consul"], token)
        self.settings = Settings(
            service=service,
            listen=listen,
            to=self["to"],
            upstreams=tuple(self["upstream"]),
            consul=self["consul"],
            token=token,
            authorize=self["authorize"],
            register=bool(self["register"]),
            dev=dev,
            demo=demo,
            max_connections=max_connections,
            max_handshakes=max_handshakes,
            max_handshakes_per_address=per_address,
            handshake_timeout=_seconds("handshake-timeout", self["handshake-timeout"]),
            connect_timeout=_seconds("connect-timeout", self["connect-timeout"]),
            idle_timeout=_seconds("idle-timeout", self["idle-timeout"]),
            shutdown_timeout=_seconds("shutdown-timeout", self["shutdown-timeout"]),
            authorize_cache=authorize_cache,
            workers=workers,
            worker=worker,
            release_buffers=bool(self["release-buffers"]),
            log_allowed=bool(self["log-allowed"]),
            keep_open_on_deny=bool(self["keep-open-on-deny"]),
            buffer_size=buffer_size,
            log_level=log_level,
            tls_transport=self["tls-transport"],
        )


def _cache_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise usage.UsageError(
            f"--authorize-cache must be a number of seconds >= 0 (0 turns the "
            f"cache off), not {value!r}"
        )
    return seconds


def _log_level(value: str) -> str:
    try:
        LogLevel.levelWithName(value)
    except InvalidLogLevelError:
        raise usage.UsageError(
            "--log-level must be one of debug, info, warn, error or critical, "
            f"not {value!r}"
        ) from None
    return value


def _whole_option(option: str, value: str, minimum: int, unit: str = "") -> int:
    """An option's whole number of at least ``minimum``, or a UsageError."""
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        of = f" of {unit}" if unit else ""
        raise usage.UsageError(
            f"{option} must be a whole number{of} >= {minimum}, not {value!r}"
        )
    return number


def _workers(value: str) -> int:
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if not 1 <= workers <= MAX_WORKERS:
        raise usage.UsageError(
            f"--workers must be a whole number from 1 to {MAX_WORKERS}, not {value!r}"
        )
    return workers


def _check_workers(listen: str, demo: bool, to: str | None, workers: int) -> None:
    """Refuse what several processes cannot share."""
    if demo:
        raise usage.UsageError(
            "--workers cannot be used with --demo, which is one round trip"
        )
    if to is None:
        raise usage.UsageError(
            "--workers needs --to: the workers share the public listener only"
        )
    parts = _split_description(listen)
    if len(parts) == 1 and parts[0].isdigit():
        parts = ["tcp", parts[0]]
    if parts[0].lower() not in ("tcp", "tcp6"):
        raise usage.UsageError(
            f"--workers needs a tcp or tcp6 --listen (they share its port with "
            f"SO_REUSEPORT), not {listen!r}"
        )
    if not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover (not Linux/BSD)
        raise usage.UsageError(
            "--workers needs SO_REUSEPORT, which this system does not have"
        )


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise usage.UsageError(f"--token-file: cannot read {path!r}: {why}") from None
    if not token:
        raise usage.UsageError(f"--token-file: {path!r} is empty")
    return token


def _consul_client(reactor: Any, address: str | None, token: str | None) -> Any:
    from connect_native.consul.client import ConsulClient

    return ConsulClient.from_environment(reactor, address=address, token=token)


def _check_consul(address: str | None, token: str | None) -> None:
    from twisted.internet import reactor

    from connect_native.consul.client import ConsulConfigurationError

    try:
        _consul_client(reactor, address, token)
    except ConsulConfigurationError as e:
        option = "--consul" if address is not None else "the CONSUL_* variables"
        raise usage.UsageError(f"{option}: {e}") from None


# --- workers -----------------------------------------------------------------


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP server endpoint whose socket has ``SO_REUSEPORT`` set before it is
    bound, so that several processes (``--workers``) listen on one port and
    the kernel spreads new connections over them.
    """

    def __init__(
        self, reactor: Any, family: int, port: int, interface: str, backlog: int
    ) -> None:
        self.reactor = reactor
        self.family = family
        self.port = port
        self.interface = interface
        self.backlog = backlog

    @classmethod
    def from_description(cls, reactor: Any, description: str) -> ReusePortEndpoint:
        """
        The same port, interface and backlog as a tcp/tcp6 description (or a
        bare port), read from the description itself: Twisted's parsed
        endpoint keeps them only in private attributes.
        """
        parts = _split_description(description)
        if len(parts) == 1 and parts[0].isdigit():
            parts = ["tcp", parts[0]]
        kind = parts[0].strip().lower()
        if kind not in ("tcp", "tcp6") or len(parts) < 2:
            raise ValueError(
                f"--workers needs a tcp: or tcp6: --listen, not {description!r}"
            )
        options: dict[str, str] = {}
        positional: list[str] = []
        for part in parts[1:]:
            name, equals, value = part.partition("=")
            if equals:
                options[name.strip()] = value.replace("\\:", ":")
            else:
                positional.append(part)
        port_text = options.get("port", positional[0] if positional else "")
        if not port_text.isdigit():
            raise ValueError(f"no port in --listen {description!r}")
        family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
        return cls(
            reactor,
            family,
            int(port_text),
            # No interface= means all of them, as for twistd's own tcp:PORT.
            options.get("interface")
            or ("::" if family == socket.AF_INET6 else "0.0.0.0"),  # noqa: S104
            int(options.get("backlog", "50")),
        )

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return maybeDeferred(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        listening = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listening.bind((self.interface, self.port))
            listening.listen(self.backlog)
            listening.setblocking(False)
            # adoptStreamPort duplicates the descriptor: ours is closed below.
            port: IListeningPort = self.reactor.adoptStreamPort(
                listening.fileno(), self.family, factory
            )
            return port
        finally:
            listening.close()


def worker_arguments(settings: Settings, port: int, consul: str | None) -> list[str]:
    """
    The ``twistd`` command line of one worker: the public listener on the
    port the first process bound (``--listen`` may say 0), no registration,
    no upstreams.
    """
    kind = _split_description(settings.listen)[0].lower()
    if kind.isdigit():
        kind = "tcp"
    parsed = ReusePortEndpoint.from_description(
        None, with_default_backlog(settings.listen)
    )
    interface = parsed.interface.replace(":", "\\:")
    assert settings.to is not None
    arguments = [
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        "connect-native",
        "--worker",
        "--no-register",
        "--service",
        settings.service,
        "--listen",
        f"{kind}:{port}:interface={interface}:backlog={parsed.backlog}",
        "--to",
        settings.to,
        "--authorize",
        settings.authorize,
        "--authorize-cache",
        repr(settings.authorize_cache),
        "--max-connections",
        str(settings.max_connections),
        "--max-handshakes",
        str(settings.max_handshakes),
        "--max-handshakes-per-address",
        str(settings.max_handshakes_per_address),
        "--handshake-timeout",
        repr(settings.handshake_timeout),
        "--connect-timeout",
        repr(settings.connect_timeout),
        "--idle-timeout",
        repr(settings.idle_timeout),
        "--shutdown-timeout",
        repr(settings.shutdown_timeout),
    ]
    if settings.release_buffers:
        arguments.append("--release-buffers")
    if not settings.log_allowed:
        arguments.append("--no-log-allowed")
    if settings.keep_open_on_deny:
        arguments.append("--keep-open-on-deny")
    arguments += ["--buffer-size", str(settings.buffer_size)]
    arguments += ["--log-level", settings.log_level]
    arguments += ["--tls-transport", settings.tls_transport]
    if consul is not None:
        arguments += ["--consul", consul]
    return arguments


class _WorkerProcess(ProcessProtocol):
    """One worker as seen from the first process."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.stopping = False
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        if not self.stopping:
            log.warn(
                "connect-native: worker {number} ended on its own ({why}); the "
                "other processes keep accepting on the port",
                number=self.number,
                why=reason.getErrorMessage(),
            )
        elif not (
            isinstance(reason.value, ProcessDone)
            # twistd ends a SIGTERM'd run by raising the signal on itself.
            or getattr(reason.value, "signal", None) == signal.SIGTERM
        ):
            log.info(
                "connect-native: worker {number} stopped ({why})",
                number=self.number,
                why=reason.getErrorMessage(),
            )
        self.ended.callback(None)


@implementer(IReadDescriptor)
class _ParentWatch:
    """
    In a worker: standard input is a pipe from the first process, so its end
    means that process is gone, and the worker stops too.
    """

    def __init__(self, on_gone: Callable[[], object]) -> None:
        self._on_gone = on_gone
        os.set_blocking(0, False)

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Failure | None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError as e:
            return Failure(e)  # type: ignore[no-untyped-call]
        return None if data else Failure(ConnectionDone())  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:
        log.info("connect-native worker: the first process is gone; stopping")
        self._on_gone()

    def logPrefix(self) -> str:
        return "connect-native-worker"


# --- the service -------------------------------------------------------------


class _DemoBackend(Protocol):
    """Answers what it got, then closes its side."""

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(b"demo backend got: " + data)
        transport.loseConnection()


class _DemoCaller(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(DEMO_MESSAGE)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.callback(self.received)


def _exit_with(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_process(reactor: Any, code: int) -> None:
    """
    Stop the reactor; after twistd has cleaned up, exit with ``code``
    (twistd itself always exits 0 when its reactor stops).
    """
    if code:
        atexit.register(_exit_with, code)
    if reactor.running:
        reactor.stop()


class Terminator(Service):
    """
    The terminator as a Twisted service.

    :param settings: what to run.
    :param reactor: the reactor (TCP, time).
    :param on_finished: called with an exit status when the process should
        end: 1 when starting failed, 0 after ``--demo`` went through.  The
        default stops the reactor and makes the process exit with it.
    :param consul_client: the agent's client (default: made from the
        settings, or the development agent's).
    """

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        *,
        on_finished: Callable[[int], object] | None = None,
        consul_client: Any = None,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.on_finished = (
            on_finished
            if on_finished is not None
            else (lambda code: _stop_process(reactor, code))
        )
        # Connections still in their handshake are bounded by the endpoint's
        # handshake budget; the tracker's bound on them is the hard one
        # behind it (the handshakes, and those being authorized).
        self.tracker = ConnectionTracker(
            reactor,
            settings.max_connections,
            settings.max_handshakes + settings.max_connections,
        )
        self.client: Any = consul_client
        self.dev_agent: Any = None
        self.ports: dict[str, IListeningPort] = {}
        self.registration: Any = None
        self._own_client = consul_client is None
        self._dev_port: IListeningPort | None = None
        self._demo_backend: IListeningPort | None = None
        self._authorizer_service: Any = None
        #: The service's owner (ConnectService), once starting.
        self.connect_service: Any = None
        self._closables: list[Any] = []
        self._starting: Deferred[None] | None = None
        self._log_level_before: LogLevel | None = None
        self.workers: list[_WorkerProcess] = []
        self.started: Deferred[None] = Deferred()

    # -- starting -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._log_level_before = _logging.set_log_level(
            LogLevel.levelWithName(self.settings.log_level)
        )
        self._starting = ensureDeferred(self._start())
        self._starting.addCallbacks(self._start_done, self._start_failed)

    def _start_done(self, _: object) -> None:
        self._starting = None
        if not self.started.called:
            self.started.callback(None)

    def _start_failed(self, failure: Failure) -> None:
        self._starting = None
        if not self.running:
            return  # stopped while starting: nothing to report
        log.critical(
            "connect-native {service}: cannot start: {error}",
            service=self.settings.service,
            error=failure.getErrorMessage() or repr(failure.value),
            log_failure=failure,
        )
        if not self.started.called:
            self.started.errback(failure)
            self.started.addErrback(lambda _: None)
        self.on_finished(1)

    async def _start(self) -> None:
        settings = self.settings
        reactor = self.reactor
        if self.client is None:
            if settings.dev:
                self.client = self._start_dev_agent()
            else:
                self.client = _consul_client(reactor, settings.consul, settings.token)
        from connect_native.service import connect_services

        authorizer = self._authorizer()
        # The one owner of the service in this process (the process's shared
        # one): its certificates for the public listener and every upstream.
        self.connect_service = connect_services.get(
            reactor, settings.service, consul=self.client
        )
        self.connect_service.startService()

        listening: list[Deferred[Any]] = []
        to = settings.to
        if settings.demo:
            to = self._start_demo_backend()
        if to is not None:
            listening.append(self._listen_public(to, authorizer))
        for upstream in settings.upstreams:
            listening.append(self._listen_upstream(upstream))
        results = await DeferredList(listening, consumeErrors=True)
        errors = [r for ok, r in results if not ok]
        if errors:
            errors[0].raiseException()
        public = self.ports.get("public")
        if settings.workers > 1 and public is not None:
            self._start_workers(public)
        if settings.worker:
            self.reactor.addReader(_ParentWatch(lambda: _stop_process(reactor, 0)))
        if settings.register and not settings.worker and public is not None:
            from connect_native.registration import Registration

            self.registration = Registration(
                reactor,
                self.client,
                self.connect_service.cert_manager,
                settings.service,
                public,
            )
            self.registration.startService()
        if settings.demo:
            await self._demo()

    def _start_dev_agent(self) -> Any:
        from twisted.web.server import Site

        from connect_native.consul.client import ConsulClient
        from connect_native.devagent import DevAgent

        agent = DevAgent(self.reactor)
        site = Site(agent.resource())  # type: ignore[no-untyped-call]
        site.log = lambda request: None  # type: ignore[method-assign]
        port: Any = self.reactor.listenTCP(0, site, interface="127.0.0.1")
        self._dev_port = port
        self.dev_agent = agent
        number = port.getHost().port
        agent.http_port = number
        log.info(
            "connect-native: development agent (Consul 1.8.7 API, no ACLs) "
            "listening on http://127.0.0.1:{port}; for other programs: "
            "export CONSUL_HTTP_ADDR=127.0.0.1:{port}",
            port=number,
        )
        return ConsulClient(self.reactor, address=f"127.0.0.1:{number}")

    def _authorizer(self) -> Any:
        from connect_native.authorize import AgentAuthorizer

        if self.settings.authorize == "intentions":
            from connect_native.authorize_intentions import IntentionAuthorizer

            authorizer = IntentionAuthorizer(
                self.client, self.reactor, self.settings.service, default="agent"
            )
            authorizer.startService()
            self._authorizer_service = authorizer
            return authorizer
        return AgentAuthorizer(
            self.client, self.reactor, cache_ttl=self.settings.authorize_cache
        )

    def _listen_public(self, to: str, authorizer: Any) -> Deferred[Any]:

        settings, reactor = self.settings, self.reactor
        label = f"connect-native {settings.service}"
        listener: Any
        if settings.workers > 1 or settings.worker:
            listener = ReusePortEndpoint.from_description(
                reactor, with_default_backlog(settings.listen)
            )
        else:
            listener = serverFromString(reactor, with_default_backlog(settings.listen))
        endpoint = self.connect_service.server_endpoint(
            TrackedEndpoint(listener, self.tracker, label),
            authorizer=authorizer,
            handshake_timeout=settings.handshake_timeout,
            max_handshakes=settings.max_handshakes,
            max_handshakes_per_address=settings.max_handshakes_per_address,
            release_buffers=settings.release_buffers,
            log_allowed=settings.log_allowed,
            keep_open_on_deny=settings.keep_open_on_deny,
            # The forwarder writes each read whole: nothing to aggregate.
            buffer_small_writes=False,
            # Its own TLS transport, injected: the public endpoint knows only
            # the protocol factory it is given.
            tls_protocol=(
                TLSServerProtocol
                if settings.tls_transport == "connect_native"
                else None
            ),
        )
        backend = clientFromString(reactor, to)
        factory = ForwardingFactory(
            reactor,
            backend.connect,
            to,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
            label=label,
            buffer_size=settings.buffer_size,
        )

        def listening(port: IListeningPort) -> None:
            self.ports["public"] = port
            log.info(
                "connect-native {service}: accepting Connect (mutual TLS) "
                "connections on {address}, forwarding them to {to}",
                service=settings.service,
                address=str(port.getHost()),
                to=to,
            )

        listened: Deferred[Any] = endpoint.listen(factory)
        return listened.addCallback(listening)

    def _listen_upstream(self, upstream: Upstream) -> Deferred[Any]:
        from connect_native.client import ConnectClientEndpoint
        from connect_native.resolve import ConsulResolver, PreparedQueryResolver

        settings, reactor = self.settings, self.reactor
        resolver: Any
        if upstream.query:
            resolver = PreparedQueryResolver(
                self.client, upstream.name, upstream.datacenter, reactor=reactor
            )
        else:
            resolver = ConsulResolver(
                self.client,
                upstream.name,
                datacenter=upstream.datacenter,
                reactor=reactor,
            )
            self._closables.append(resolver)
        dialer = ConnectClientEndpoint(
            reactor,
            resolver,
            self.connect_service.identity,
            timeout=settings.connect_timeout,
        )
        label = f"connect-native upstream {upstream.name}"
        factory = ForwardingFactory(
            reactor,
            dialer.connect,
            upstream.target,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
            label=label,
            buffer_size=settings.buffer_size,
        )
        endpoint = TrackedEndpoint(
            serverFromString(reactor, upstream.listen), self.tracker, label
        )

        def listening(port: IListeningPort) -> None:
            self.ports[f"upstream {upstream.name}"] = port
            log.info(
                "connect-native upstream {name}: plaintext listener on {address}, "
                "connecting to {target} as {service}",
                name=upstream.name,
                address=str(port.getHost()),
                target=upstream.target,
                service=settings.service,
            )
            if not upstream.loopback_only:
                log.warn(
                    "connect-native upstream {name}: listening on {interface}, "
                    "which is not a loopback address: anyone who reaches it "
                    "speaks to {target} as {service}",
                    name=upstream.name,
                    interface=upstream.interface,
                    target=upstream.target,
                    service=settings.service,
                )

        return endpoint.listen(factory).addCallback(listening)

    # -- workers --------------------------------------------------------------

    def _start_workers(self, public: IListeningPort) -> None:
        settings = self.settings
        consul = settings.consul
        if self.dev_agent is not None:
            consul = f"http://127.0.0.1:{self.dev_agent.http_port}"
        environment = dict(os.environ)
        if settings.token is not None:
            # The environment, not the command line, which anyone can read.
            environment.pop("CONSUL_HTTP_TOKEN_FILE", None)
            environment["CONSUL_HTTP_TOKEN"] = settings.token
        port = public.getHost().port  # type: ignore[attr-defined]
        arguments = worker_arguments(settings, port, consul)
        for number in range(1, settings.workers):
            worker = _WorkerProcess(number)
            self.reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, *arguments],
                env=environment,
                # Standard input is the worker's lifeline (_ParentWatch); its
                # logs go where ours go.
                childFDs={0: "w", 1: 1, 2: 2},
            )
            self.workers.append(worker)
        log.info(
            "connect-native {service}: {count} worker processes share port "
            "{port} (SO_REUSEPORT)",
            service=settings.service,
            count=settings.workers,
            port=port,
        )

    async def _stop_workers(self) -> None:
        workers = [w for w in self.workers if not w.ended.called]
        for worker in workers:
            worker.stopping = True
            try:
                worker.transport.signalProcess("TERM")  # type: ignore[union-attr]
            except ProcessExitedAlready:
                pass
        if not workers:
            return
        ended = DeferredList([w.ended for w in workers], consumeErrors=True)
        # A worker drains for --shutdown-timeout; then it has 5 s to exit.
        bound = self.settings.shutdown_timeout + 5.0
        timer = self.reactor.callLater(bound, self._kill_workers, workers)
        await ended
        if timer.active():
            timer.cancel()

    def _kill_workers(self, workers: list[_WorkerProcess]) -> None:
        for worker in workers:
            if worker.ended.called:
                continue
            log.warn(
                "connect-native: worker {number} still running after "
                "--shutdown-timeout; killing it",
                number=worker.number,
            )
            try:
                worker.transport.signalProcess(signal.SIGKILL)  # type: ignore[union-attr]
            except ProcessExitedAlready:
                pass

    # -- the demo -------------------------------------------------------------

    def _start_demo_backend(self) -> str:
        port: Any = self.reactor.listenTCP(
            0, Factory.forProtocol(_DemoBackend), interface="127.0.0.1"
        )
        self._demo_backend = port
        number = port.getHost().port
        log.info("demo: backend (plaintext) on 127.0.0.1:{port}", port=number)
        return f"tcp:127.0.0.1:{number}"

    async def _demo(self) -> None:
        from connect_native.client import ConnectClientEndpoint

        settings = self.settings
        await self._registered(deadline=10.0)
        dialer = ConnectClientEndpoint.for_service(
            self.reactor,
            settings.service,
            our_service=DEMO_CLIENT_SERVICE,
            consul=self.client,
            timeout=settings.connect_timeout,
        )
        self._closables.append(dialer)
        caller = _DemoCaller()
        log.info(
            "demo: client {client} dials Connect service {service} and sends {sent!r}",
            client=DEMO_CLIENT_SERVICE,
            service=settings.service,
            sent=DEMO_MESSAGE,
        )
        await connectProtocol(dialer, caller)
        received = await caller.done.addTimeout(settings.connect_timeout, self.reactor)
        expected = b"demo backend got: " + DEMO_MESSAGE
        if received != expected:
            raise RuntimeError(
                f"the demo round trip came back as {received!r}, not {expected!r}"
            )
        log.info(
            "demo: OK: {client} reached {service} over mutual TLS, the "
            "terminator forwarded it to the backend, and the answer came back: "
            "{received!r}",
            client=DEMO_CLIENT_SERVICE,
            service=settings.service,
            received=received,
        )
        self.on_finished(0)

    async def _registered(self, deadline: float) -> None:
        """Wait (bounded) until the agent has acknowledged our registration."""
        registration = self.registration
        waited = 0.0
        step = 0.05
        while registration is not None and not registration.registered:
            if waited >= deadline:
                raise RuntimeError(
                    f"the development agent did not acknowledge the registration "
                    f"of {self.settings.service!r} within {deadline:g}s"
                )
            pause: Deferred[None] = Deferred()
            self.reactor.callLater(step, pause.callback, None)
            await pause
            waited += step

    # -- stopping -------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        stopping = ensureDeferred(self._stop())

        def level_back(result: object) -> object:
            if self._log_level_before is not None:
                _logging.set_log_level(self._log_level_before)
                self._log_level_before = None
            return result

        return stopping.addBoth(level_back)

    async def _stop(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
        settings = self.settings
        stopping: list[Deferred[Any]] = []
        if self.registration is not None:
            stopping.append(maybeDeferred(self.registration.stopService))
        for name, port in self.ports.items():
            log.info("connect-native: stopped accepting on {name}", name=name)
            stopping.append(maybeDeferred(port.stopListening))
        if self._demo_backend is not None:
            stopping.append(maybeDeferred(self._demo_backend.stopListening))
        await DeferredList(stopping, consumeErrors=True)
        stopping_workers = ensureDeferred(self._stop_workers())
        aborted = await self.tracker.drain(settings.shutdown_timeout)
        if aborted:
            log.warn(
                "connect-native {service}: aborted {count} connections still "
                "open after --shutdown-timeout {timeout:g}s",
                service=settings.service,
                count=aborted,
                timeout=settings.shutdown_timeout,
            )
        for closable in self._closables:
            closable.close()
        if self._authorizer_service is not None:
            self._authorizer_service.stopService()
        if self.connect_service is not None:
            self.connect_service.stopService()
        if self.client is not None and self._own_client:
            await self.client.close()
        await stopping_workers
        if self._dev_port is not None:
            await maybeDeferred(self._dev_port.stopListening)
        log.info("connect-native {service}: stopped", service=settings.service)


def makeService(config: Options) -> Terminator:
    """The ``connect-native`` service for twistd."""
    from twisted.internet import reactor

    settings = config.settings
    if settings is None:  # pragma: no cover (twistd runs postOptions first)
        config.postOptions()
        settings = config.settings
    assert settings is not None
    return Terminator(settings, reactor)
