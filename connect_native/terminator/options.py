"""
The options of ``twistd connect-native`` and their checks: :class:`Options`
(what twistd parses) leaves a :class:`Settings` (what the service runs), and
every bad input is refused here with a one-line ``UsageError`` naming the
option, before anything listens.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import field, frozen
from twisted.internet import endpoints
from twisted.logger import LogLevel
from twisted.python import usage

from connect_native import _checks
from connect_native.terminator.demo import DEMO_SERVICE
from connect_native.terminator.forward import BUFFER_SIZE

if TYPE_CHECKING:
    from connect_native.sources import FilesIdentity

__all__ = [
    "DEFAULT_BACKLOG",
    "MAX_WORKERS",
    "TLS_TRANSPORTS",
    "Options",
    "Settings",
    "Upstream",
    "consul_client",
    "parse_upstream",
    "read_allow_ids",
    "read_log_level",
    "read_token",
    "split_description",
    "with_default_backlog",
]

# Twisted's endpoint helpers are untyped.
serverFromString: Any = endpoints.serverFromString  # noqa: N816
clientFromString: Any = endpoints.clientFromString  # noqa: N816

MAX_WORKERS = 64

#: The values of ``--tls-transport``: Twisted's ``TLSMemoryBIOProtocol``, or
#: the terminator's own ``TLSServerProtocol`` (injected into the public
#: endpoint as its ``tls_protocol=``).
TLS_TRANSPORTS = ("twisted", "connect_native")

#: The values of ``--authorize``.
AUTHORIZERS = ("agent", "intentions", "allow-ids")

#: The values of ``--protocol``: a byte stream, or HTTP decided per request.
PROTOCOLS = ("tcp", "http")

#: The values of ``--log-format``.
LOG_FORMATS = ("text", "json")

#: The values of ``--log-level``: the names of Twisted's log levels.
LOG_LEVELS = tuple(level.name for level in LogLevel.iterconstants())

_T = TypeVar("_T")

_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
#: What a refused name is told.
_NAME_RULE = "letters, digits, '_', '-' and '.', not starting or ending with '-' or '.'"
_UNESCAPED_COLON = re.compile(r"(?<!\\):")
# Consul's rule for service metadata keys.
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


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
    #: ``--protocol``: ``tcp`` (bytes forwarded) or ``http`` (each request
    #: decided, then proxied).
    protocol: str = "tcp"
    #: ``--request-timeout``: seconds ``--to`` may stay silent (http).
    request_timeout: float = 60.0
    #: ``--max-request-line``: bytes per request or header line (http).
    max_request_line: int = 8192
    #: ``--max-headers-size``: bytes of the request line and headers (http).
    max_headers_size: int = 32768
    #: ``--max-requests-per-connection`` (http).
    max_requests_per_connection: int = 1000
    #: ``--log-allowed`` given: allowed requests logged at info (http).
    log_allowed_requests: bool = False
    #: Where the certificate comes from: ``None`` for the agent, else files.
    identity: FilesIdentity | None = None
    #: The text of ``--identity``, passed on to workers.
    identity_text: str = "agent"
    #: With ``--authorize allow-ids``: the SPIFFE IDs allowed (``--allow-id``
    #: and ``--allow-ids-file`` both).
    allow_ids: tuple[str, ...] = ()
    #: How the registered check probes ``--to``: ``"tcp"``, ``"http"``
    #: (``to_check_path``) or ``None`` (it does not).
    to_check: str | None = "tcp"
    to_check_path: str = "/"
    #: ``--tag`` and ``--meta``: the registration's tags and metadata.
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    check_interval: float = 5.0
    deregister_critical_after: float | None = None
    log_format: str = "text"
    #: What SIGHUP reads again: ``--token-file``, ``--log-level-file``,
    #: ``--allow-ids-file``.
    token_file: str | None = None
    log_level_file: str | None = None
    allow_ids_file: str | None = None
    #: The ``--allow-id`` values alone (a reload adds the file's to them).
    allow_id_options: tuple[str, ...] = ()
    #: ``--status``: the plaintext status listener (``/ready``, ``/status``,
    #: ``/metrics``), a server endpoint description bound to loopback unless
    #: it names an interface; ``None``: none.
    status: str | None = None


def split_description(description: str) -> list[str]:
    """An endpoint description's parts, split at its unescaped colons."""
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
    parts = split_description(description)
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
    parts = split_description(description)
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
                f"--upstream: {datacenter!r} in {value!r} is not a datacenter name "
                f"({_NAME_RULE})"
            )
    query = name.endswith(".query")
    if query:
        name = name[: -len(".query")]
    if not _NAME.match(name):
        raise usage.UsageError(
            f"--upstream: {name!r} in {value!r} is not a service or prepared "
            f"query name: {_NAME_RULE} ({example})"
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


def _option(check: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """One of the shared checks (connect_native._checks), as a UsageError."""
    try:
        return check(*args, **kwargs)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def _seconds(option: str, value: str) -> float:
    return _option(_checks.seconds_text, f"--{option}", value)


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
            None,
            "who decides each connection: agent (ask the agent per connection), "
            "intentions (cached intentions, decided here) or allow-ids (the "
            "--allow-id list, no agent asked); default agent, and intentions "
            "with --protocol http",
        ],
        [
            "protocol",
            None,
            "tcp",
            "tcp (forward the bytes) or http (proxy each HTTP request to --to, "
            "each decided by the intentions' HTTP permissions)",
        ],
        [
            "request-timeout",
            None,
            "60",
            "with --protocol http, seconds --to may send nothing while a "
            "request waits for its answer (then 504)",
        ],
        [
            "max-request-line",
            None,
            "8192",
            "with --protocol http, bytes of the request line (414 past it) "
            "and of each header line (400)",
        ],
        [
            "max-headers-size",
            None,
            "32768",
            "with --protocol http, bytes of a request's line and headers "
            "together (400 past it)",
        ],
        [
            "max-requests-per-connection",
            None,
            "1000",
            "with --protocol http, requests on one HTTP/1.1 connection before "
            "it is closed (Connection: close)",
        ],
        [
            "identity",
            None,
            "agent",
            "where the certificate comes from: agent, or "
            "files:cert=PATH,key=PATH,roots=PATH (watched; optional "
            ",trustDomain=TD,interval=SECONDS)",
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
            None,
            "connect_native's events below this level are not logged: debug, "
            "info (the default), warn, error or critical (twistd itself shows "
            "every level)",
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
        [
            "to-check",
            None,
            None,
            "how the registered check probes --to: tcp (a TCP connect, the "
            "default), http:/PATH (GET /PATH, passing on 2xx) or none (the "
            "check follows the certificate only)",
        ],
        [
            "check-interval",
            None,
            "5",
            "seconds between probes of --to (each bounded by "
            "--connect-timeout and by this)",
        ],
        [
            "deregister-critical-after",
            None,
            None,
            "have the agent remove this instance after its check has been "
            "critical this long: seconds, or a duration such as 90s, 10m, 1h "
            "(Consul's DeregisterCriticalServiceAfter; at least 1m in effect)",
        ],
        [
            "log-format",
            None,
            "text",
            "text (twistd's lines) or json (one JSON object a line, twistd's "
            "own lines included); ignored with twistd's --logger or --syslog",
        ],
        [
            "log-level-file",
            None,
            None,
            "a file holding the log level (one of those of --log-level), read "
            "at start and again on SIGHUP; not with --log-level",
        ],
        [
            "allow-ids-file",
            None,
            None,
            "with --authorize allow-ids, a file of SPIFFE IDs allowed to "
            "connect, one a line ('#' comments), read at start and again on "
            "SIGHUP",
        ],
        [
            "status",
            None,
            None,
            "a plaintext HTTP listener with /ready, /status and /metrics "
            "(Prometheus), a server endpoint description, e.g. tcp:9102; binds "
            "127.0.0.1 unless it names an interface",
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
        self["allow-id"] = []
        self["tag"] = []
        self["meta"] = []
        self["register"] = True
        self["log-allowed"] = True
        self["log-allowed-requests"] = False
        self.settings: Settings | None = None

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise  # called from code, not as twistd's subcommand
            from connect_native.terminator._usage import refuse

            refuse(e)

    def getUsage(self, width: int | None = None) -> str:
        from connect_native.terminator._usage import grouped_usage

        return grouped_usage(self, width)

    def opt_version(self) -> None:
        """print connect_native's version and exit"""
        from connect_native import __version__

        print(f"connect_native {__version__}")
        raise SystemExit(0)

    def opt_upstream(self, value: str) -> None:
        self["upstream"].append(parse_upstream(value))

    def opt_allow_id(self, value: str) -> None:
        from connect_native.authorize import AllowedId, InvalidAllowedId

        try:
            AllowedId.parse(value)
        except InvalidAllowedId as e:
            raise usage.UsageError(f"--allow-id: {e}") from None
        self["allow-id"].append(value)

    opt_allow_id.__doc__ = (
        "URI: with --authorize allow-ids, a SPIFFE ID allowed to connect; '*' "
        "stands for one whole path segment (repeatable)"
    )

    # usage.Options shows the docstring as it is: keep it on one line.
    opt_upstream.__doc__ = (
        "NAME=ENDPOINT: a local plaintext listener whose connections go to "
        "Connect service NAME (NAME.query= a prepared query, NAME@DC= another "
        "datacenter); binds 127.0.0.1 unless the endpoint names an interface "
        "(repeatable)"
    )

    def opt_tag(self, value: str) -> None:
        if not value or value.strip() != value:
            raise usage.UsageError(
                f"--tag: {value!r} is not a tag (a non-empty string without "
                "surrounding spaces)"
            )
        self["tag"].append(value)

    opt_tag.__doc__ = "TAG: a tag of the registered instance (repeatable)"

    def opt_meta(self, value: str) -> None:
        key, sep, meta_value = value.partition("=")
        if not sep or not _META_KEY.match(key):
            raise usage.UsageError(
                f"--meta: {value!r} is not KEY=VALUE with KEY of letters, "
                "digits, _ and - (at most 128), e.g. --meta version=1.2"
            )
        if key.startswith("consul-"):
            raise usage.UsageError(
                f"--meta: the key {key!r} is reserved by Consul (consul- prefix)"
            )
        if len(meta_value) > 512:
            raise usage.UsageError(
                f"--meta: the value of {key!r} is longer than Consul's 512 characters"
            )
        self["meta"] = [(k, v) for k, v in self["meta"] if k != key]
        self["meta"].append((key, meta_value))

    opt_meta.__doc__ = (
        "KEY=VALUE: metadata of the registered instance (repeatable; a key "
        "given again replaces its value)"
    )

    def opt_log_allowed(self) -> None:
        """log each allowed connection (the default; refusals are always
        logged) and, with --protocol http, each allowed request at info"""
        self["log-allowed"] = True
        self["log-allowed-requests"] = True

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
            raise usage.UsageError(
                f"--service: {service!r} is not a service name: {_NAME_RULE}"
            )
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
        _option(_checks.one_of, "--protocol", self["protocol"], PROTOCOLS)
        if self["authorize"] is None:
            self["authorize"] = "intentions" if self["protocol"] == "http" else "agent"
        _option(_checks.one_of, "--authorize", self["authorize"], AUTHORIZERS)
        allow_ids_file = self["allow-ids-file"]
        from_file: tuple[str, ...] = ()
        if allow_ids_file is not None:
            if self["authorize"] != "allow-ids":
                raise usage.UsageError(
                    "--allow-ids-file goes with --authorize allow-ids"
                )
            from_file = _option(read_allow_ids, allow_ids_file)
        if self["authorize"] == "allow-ids" and not (self["allow-id"] or from_file):
            raise usage.UsageError(
                "--authorize allow-ids needs at least one --allow-id URI (a "
                "SPIFFE ID allowed to connect) or an --allow-ids-file holding one"
            )
        if self["allow-id"] and self["authorize"] != "allow-ids":
            raise usage.UsageError("--allow-id goes with --authorize allow-ids")
        identity = _identity(self["identity"])
        if identity is not None and demo:
            raise usage.UsageError(
                "--identity files cannot be used with --demo, which takes its "
                "certificates from its own development agent"
            )
        if self["authorize"] == "intentions":
            try:
                import connect_native.authorize.intentions  # noqa: F401
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
        log_level_file = self["log-level-file"]
        if log_level_file is not None:
            if self["log-level"] is not None:
                raise usage.UsageError(
                    "--log-level and --log-level-file cannot both be used: the "
                    "file's level is the one SIGHUP reloads"
                )
            log_level = _option(read_log_level, log_level_file)
        else:
            log_level = _log_level(self["log-level"] or "info")
        _option(
            _checks.one_of,
            "--tls-transport",
            self["tls-transport"],
            sorted(TLS_TRANSPORTS),
        )
        worker = bool(self["worker"])
        if workers > 1 or worker:
            _check_workers(listen, demo, self["to"], workers)
        to_check, to_check_path = _to_check(self["to-check"], self["to"], demo)
        check_interval = _seconds("check-interval", self["check-interval"])
        deregister_after = _duration(
            "--deregister-critical-after", self["deregister-critical-after"]
        )
        log_format = _option(
            _checks.one_of, "--log-format", self["log-format"], LOG_FORMATS
        )
        if not self["register"]:
            for option, given in (
                ("--to-check", self["to-check"] is not None),
                ("--tag", bool(self["tag"])),
                ("--meta", bool(self["meta"])),
                ("--deregister-critical-after", deregister_after is not None),
            ):
                if given:
                    raise usage.UsageError(
                        f"{option} goes with the registration, which "
                        "--no-register turns off"
                    )
        token = None
        if self["token-file"] is not None:
            if dev:
                raise usage.UsageError(
                    "--token-file cannot be used with --dev or --demo (the "
                    "development agent has no ACLs)"
                )
            token = _option(read_token, self["token-file"])
        if not dev:
            _check_consul(self["consul"], token)
        status = _status(self["status"])
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
            protocol=self["protocol"],
            request_timeout=_seconds("request-timeout", self["request-timeout"]),
            max_request_line=_whole_option(
                "--max-request-line", self["max-request-line"], 64
            ),
            max_headers_size=_whole_option(
                "--max-headers-size", self["max-headers-size"], 64
            ),
            max_requests_per_connection=_whole_option(
                "--max-requests-per-connection",
                self["max-requests-per-connection"],
                1,
            ),
            log_allowed_requests=bool(self["log-allowed-requests"]),
            identity=identity,
            identity_text=self["identity"],
            allow_ids=_unique((*self["allow-id"], *from_file)),
            token_file=self["token-file"],
            log_level_file=log_level_file,
            allow_ids_file=allow_ids_file,
            allow_id_options=tuple(self["allow-id"]),
            to_check=to_check,
            to_check_path=to_check_path,
            tags=tuple(self["tag"]),
            meta=tuple(self["meta"]),
            check_interval=check_interval,
            deregister_critical_after=deregister_after,
            log_format=log_format,
            status=status,
        )
        import connect_native.terminator.logs as logs

        logs.install(getattr(self, "parent", None), log_format, log_level)


def _to_check(value: str | None, to: str | None, demo: bool) -> tuple[str | None, str]:
    """``--to-check`` as the kind of probe and its HTTP path."""
    example = "tcp, http:/PATH (e.g. http:/healthz) or none"
    if value is None:
        return ("tcp" if to is not None or demo else None), "/"
    if to is None and not demo and value != "none":
        raise usage.UsageError(
            "--to-check needs --to: it is how the registered check probes it"
        )
    if value in ("tcp", "none"):
        return (None if value == "none" else value), "/"
    if value.startswith("http:"):
        path = value[len("http:") :]
        if path.startswith("/") and all(33 <= ord(c) < 127 for c in path):
            return "http", path
    raise usage.UsageError(f"--to-check: {value!r} is not {example}")


def _duration(option: str, value: str | None) -> float | None:
    """Seconds, or a duration such as ``90s``, ``10m``, ``1h``, as seconds."""
    if value is None:
        return None
    match = _DURATION.match(value.strip())
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise usage.UsageError(
            f"{option} must be a duration > 0, seconds or e.g. 90s, 10m, 1h, "
            f"not {value!r}"
        )
    return seconds


def _status(value: str | None) -> str | None:
    """``--status``'s description, bound to loopback unless it names an interface."""
    if value is None:
        return None
    from twisted.internet import reactor

    listen, _ = _description_interface(value)
    try:
        serverFromString(reactor, listen)
    except Exception as e:
        raise usage.UsageError(
            f"--status: {value!r} is not a server endpoint description ({e}); "
            "e.g. tcp:9102 (loopback) or tcp:9102:interface=10.0.0.5"
        ) from None
    return listen


def _identity(value: str) -> FilesIdentity | None:
    from connect_native.sources import InvalidIdentityDescription, parse_identity

    try:
        return parse_identity(value)
    except InvalidIdentityDescription as e:
        raise usage.UsageError(f"--identity: {e}") from None


def _cache_seconds(value: str) -> float:
    return _option(
        _checks.seconds_text,
        "--authorize-cache",
        value,
        " (0 turns the cache off)",
        zero_ok=True,
    )


def _log_level(value: str) -> str:
    return _option(_checks.one_of, "--log-level", value, LOG_LEVELS)


def _whole_option(option: str, value: str, minimum: int, unit: str = "") -> int:
    """An option's whole number of at least ``minimum``, or a UsageError."""
    return _option(_checks.whole_text, option, value, minimum, unit=unit)


def _workers(value: str) -> int:
    return _option(_checks.whole_text, "--workers", value, 1, MAX_WORKERS)


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
    parts = split_description(listen)
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


def _read_text(option: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or type(e).__name__
        raise ValueError(f"{option}: cannot read {path!r}: {why}") from None


def read_token(path: str) -> str:
    """
    The ACL token in ``path`` (``--token-file``).

    :raises ValueError: with a one-line reason naming the option.
    """
    token = _read_text("--token-file", path).strip()
    if not token:
        raise ValueError(f"--token-file: {path!r} is empty")
    return token


def read_log_level(path: str) -> str:
    """
    The log level in ``path`` (``--log-level-file``): one word, a name of
    ``--log-level``.

    :raises ValueError: with a one-line reason naming the option.
    """
    text = _read_text("--log-level-file", path).strip().lower()
    if text not in LOG_LEVELS:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ValueError(
            f"--log-level-file: {path!r} holds {shown!r}, not one of "
            f"{', '.join(LOG_LEVELS)}"
        )
    return text


def read_allow_ids(path: str) -> tuple[str, ...]:
    """
    The SPIFFE IDs in ``path`` (``--allow-ids-file``): one a line; blank
    lines and what follows a ``#`` are ignored.  No ID at all is allowed
    (then only the ``--allow-id`` options allow anyone).

    :raises ValueError: with a one-line reason naming the option, the file
        and the line.
    """
    from connect_native.authorize import AllowedId, InvalidAllowedId

    found: list[str] = []
    text = _read_text("--allow-ids-file", path)
    for number, line in enumerate(text.splitlines(), 1):
        value = line.split("#", 1)[0].strip()
        if not value:
            continue
        try:
            AllowedId.parse(value)
        except InvalidAllowedId as e:
            raise ValueError(f"--allow-ids-file: {path!r} line {number}: {e}") from None
        found.append(value)
    return _unique(found)


def _unique(values: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def consul_client(reactor: Any, address: str | None, token: str | None) -> Any:
    """The agent's client from ``--consul``, the token and ``CONSUL_*``."""
    from connect_native.consul.client import ConsulClient

    return ConsulClient.from_environment(reactor, address=address, token=token)


def _check_consul(address: str | None, token: str | None) -> None:
    from twisted.internet import reactor

    from connect_native.consul.client import ConsulConfigurationError

    try:
        consul_client(reactor, address, token)
    except ConsulConfigurationError as e:
        option = "--consul" if address is not None else "the CONSUL_* variables"
        raise usage.UsageError(f"{option}: {e}") from None
