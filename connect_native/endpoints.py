"""
The ``connect:`` endpoint strings: Twisted endpoint-string parsers that make
:func:`~twisted.internet.endpoints.serverFromString` and
:func:`~twisted.internet.endpoints.clientFromString` build Connect endpoints,
so any program that takes an endpoint description (``twistd web --listen``,
``Klein().run(endpoint_description=...)``) serves or dials over Connect
without code of its own::

    connect:web:port=8443:interface=127.0.0.1:register=yes
    connect:web:endpoint=unix\\:/run/web.sock
    connect:db:source=web:timeout=5

The grammar is documented in ``docs/endpoints.rst``.  The plugin module
(``twisted/plugins/connect_native_plugins.py``) only instantiates
:class:`ConnectServerParser` and :class:`ConnectClientParser`; this module
imports nothing heavy until a description is parsed, since Twisted imports
every plugin module while it looks for plugins.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from attrs import frozen
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from connect_native import _checks, _logging
from connect_native._lease import Leases
from connect_native.errors import (
    EndpointStringError,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from connect_native._deferreds import Waiters
    from connect_native.client import ConnectClientEndpoint
    from connect_native.consul.client import ConsulClient
    from connect_native.registration import Registration
    from connect_native.server import ConnectServerEndpoint
    from connect_native.service import CertManagerLease
    from connect_native.sources import FilesIdentity

__all__ = [
    "CLIENT_OPTIONS",
    "PREFIX",
    "SERVER_OPTIONS",
    "ClientDescription",
    "ConnectClientParser",
    "ConnectServerParser",
    "ConnectStringServerEndpoint",
    "EndpointStringError",
    "ServerDescription",
    "parse_client_description",
    "parse_server_description",
]

log = Logger(observer=_logging.observer)

#: The endpoint type both parsers answer to.
PREFIX = "connect"

#: The options of a server description, in the order the docs give them.
SERVER_OPTIONS = (
    "port",
    "interface",
    "backlog",
    "endpoint",
    "consul",
    "tokenFile",
    "authorize",
    "register",
    "readyTimeout",
    "handshakeTimeout",
    "authorizeTimeout",
    "keepOpenOnDeny",
    "maxHandshakes",
    "maxHandshakesPerAddress",
    "identity",
    "cert",
    "key",
    "roots",
    "trustDomain",
    "allowIds",
)

#: The options of a client description.
CLIENT_OPTIONS = (
    "source",
    "datacenter",
    "namespace",
    "partition",
    "query",
    "timeout",
    "consul",
    "tokenFile",
)

Authorize = Literal["agent", "intentions", "allow-ids"]

_TRUE = frozenset({"yes", "true", "on", "1"})
_FALSE = frozenset({"no", "false", "off", "0"})


def _fail(kind: str, problem: str) -> EndpointStringError:
    return EndpointStringError(f"{PREFIX}: {kind} endpoint: {problem}")


def _one_line_if_uncaught() -> None:
    """
    Make an :class:`EndpointStringError` that no one catches end the process
    with its one line, not a traceback.

    ``twistd web --listen connect:...`` (and ``twist``, and Klein's
    ``app.run``) parse the description outside any ``try``: the user's typo
    then reached the terminal as 30 lines of Twisted's frames.  Installed
    only when a description is refused, chained to the hook it replaces for
    every other exception, and only over Python's own hook (a REPL's or a
    test runner's is left alone).  A program that catches the error sees it
    as before.
    """
    previous = sys.excepthook
    if previous is not sys.__excepthook__:
        return

    def one_line(kind: Any, value: BaseException, tb: Any) -> None:
        if isinstance(value, EndpointStringError):
            program = os.path.basename(sys.argv[0]) if sys.argv else "python"
            sys.stderr.write(f"{program or 'python'}: {value}\n")
            return
        previous(kind, value, tb)

    sys.excepthook = one_line


def _check_names(kind: str, given: Mapping[str, str], known: Sequence[str]) -> None:
    for name in given:
        if name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1) or [
            k for k in known if k.lower() == name.lower()
        ]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(
            kind,
            f"unknown option {name!r}{hint}; the options are {', '.join(known)}",
        )


def _positional(kind: str, args: Sequence[str], usage: str) -> str | None:
    if len(args) > 1:
        raise _fail(
            kind,
            f"unexpected {args[1]!r} after the service name {args[0]!r}: a "
            "description is connect:<service> followed by name=value options "
            f"({usage}); a colon inside a value (an address, a sub-endpoint) "
            "is escaped with a backslash, e.g. consul=127.0.0.1\\:8500",
        )
    if not args:
        return None
    return _service_name(kind, "the service name", args[0])


def _service_name(kind: str, what: str, value: str) -> str:
    if not value or value != value.strip() or any(c.isspace() for c in value):
        raise _fail(
            kind, f"{what} must be a Consul service name without spaces, not {value!r}"
        )
    return value


def _text(kind: str, name: str, value: str) -> str:
    if not value.strip():
        raise _fail(kind, f"{name}= must not be empty")
    return value


def _seconds(kind: str, name: str, value: str) -> float:
    try:
        return _checks.seconds_text(f"{name}=", value, " (e.g. 10 or 2.5)")
    except ValueError as e:
        raise _fail(kind, str(e)) from None


def _integer(kind: str, name: str, value: str, lowest: int, highest: int) -> int:
    try:
        return _checks.whole_text(f"{name}=", value, lowest, highest)
    except ValueError as e:
        raise _fail(kind, str(e)) from None


def _boolean(kind: str, name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _fail(
        kind, f"{name}= must be yes or no (or true/false, on/off, 1/0), not {value!r}"
    )


def _interface(kind: str, value: str) -> str:
    from twisted.internet.abstract import isIPAddress, isIPv6Address

    if value and not (isIPAddress(value) or isIPv6Address(value)):
        raise _fail(
            kind,
            f"interface= must be an IP address to listen on (e.g. 127.0.0.1, "
            f"0.0.0.0 or \\:\\:), not {value!r}",
        )
    return value


# --- descriptions -------------------------------------------------------------------


@frozen
class ServerDescription:
    """
    A parsed ``connect:`` server description.

    :ivar endpoint: the wrapped endpoint's description, when given with
        ``endpoint=``; else ``port`` (with ``interface`` and ``backlog``).
    :ivar token_file: the path of the file holding the ACL token.
    """

    service: str
    port: int | None = None
    interface: str = ""
    backlog: int = 1024
    endpoint: str | None = None
    consul: str | None = None
    token_file: str | None = None
    authorize: Authorize = "agent"
    register: bool = False
    ready_timeout: float = 60.0
    #: ``readyTimeout=`` not given: ``listen()`` keeps waiting for the
    #: certificate (saying so every ``ready_timeout`` seconds) instead of
    #: failing, so a program that does not handle a failed listen
    #: (``twistd web``, Klein's ``app.run``) serves once the agent answers.
    wait_for_certificate: bool = True
    handshake_timeout: float = 10.0
    authorize_timeout: float = 10.0
    keep_open_on_deny: bool = False
    #: ``None``: ConnectServerEndpoint's defaults (256 and 64).
    max_handshakes: int | None = None
    max_handshakes_per_address: int | None = None
    #: Where the certificate comes from: ``None`` for the agent, else the
    #: files (``identity=files:...``, or ``identity=files`` with ``cert=``,
    #: ``key=`` and ``roots=``).
    identity: FilesIdentity | None = None
    #: The SPIFFE IDs ``authorize=allow-ids`` allows.
    allow_ids: tuple[str, ...] = ()


@frozen
class ClientDescription:
    """
    A parsed ``connect:`` client description: dial ``service`` (or what the
    prepared query ``query`` returns) as ``source``.
    """

    service: str | None
    source: str
    datacenter: str | None = None
    namespace: str | None = None
    partition: str | None = None
    query: str | None = None
    timeout: float | None = None
    consul: str | None = None
    token_file: str | None = None


_SERVER_USAGE = (
    "connect:<service>:port=<n>[:interface=<ip>] or "
    "connect:<service>:endpoint=<description>"
)


def parse_server_description(
    args: Sequence[str], kwargs: Mapping[str, str]
) -> ServerDescription:
    """
    Read a server description's parts, as Twisted splits them
    (``connect:web:port=8443`` is ``["web"]``, ``{"port": "8443"}``).

    :raises EndpointStringError: naming the option that is unknown, missing,
        conflicting or out of range.
    """
    kind = "server"
    _check_names(kind, kwargs, SERVER_OPTIONS)
    service = _positional(kind, args, _SERVER_USAGE)
    if service is None:
        raise _fail(kind, f"no service name: write {_SERVER_USAGE}")
    has_port, has_endpoint = "port" in kwargs, "endpoint" in kwargs
    if has_port == has_endpoint:
        raise _fail(
            kind,
            f"service {service!r}: give either port= or endpoint= (exactly one of "
            f"them): {_SERVER_USAGE}",
        )
    if has_endpoint:
        for name in ("interface", "backlog"):
            if name in kwargs:
                raise _fail(
                    kind,
                    f"{name}= goes with port=, not with endpoint= (put it in the "
                    "endpoint= description instead)",
                )
        sub = _text(kind, "endpoint", kwargs["endpoint"])
        if sub.split(":", 1)[0].strip().lower() == PREFIX:
            raise _fail(
                kind,
                f"endpoint= must be a plain server endpoint (tcp:, unix:, ...) "
                f"for the TLS to run over, not another {PREFIX}: description",
            )
        where: dict[str, Any] = {"endpoint": sub}
    else:
        where = {
            "port": _integer(kind, "port", kwargs["port"], 0, 65535),
            "interface": _interface(kind, kwargs.get("interface", "")),
            # A real server's queue, not Twisted's 50 (a burst of 51 connects
            # stalled clients for a second).
            "backlog": _integer(
                kind, "backlog", kwargs.get("backlog", "1024"), 1, 65535
            ),
        }
    authorize = kwargs.get("authorize", "agent")
    try:
        _checks.one_of("authorize=", authorize, ("agent", "intentions", "allow-ids"))
    except ValueError as e:
        raise _fail(kind, str(e)) from None
    identity = _identity(kind, kwargs)
    allow_ids = _allow_ids(kind, authorize, kwargs)
    timeouts = {
        name: _seconds(kind, name, kwargs[name]) if name in kwargs else default
        for name, default in (
            ("readyTimeout", 60.0),
            ("handshakeTimeout", 10.0),
            ("authorizeTimeout", 10.0),
        )
    }
    return ServerDescription(
        service=service,
        consul=_optional_text(kind, "consul", kwargs),
        token_file=_optional_text(kind, "tokenFile", kwargs),
        authorize=cast(Authorize, authorize),
        identity=identity,
        allow_ids=allow_ids,
        register=_boolean(kind, "register", kwargs.get("register", "no")),
        keep_open_on_deny=_boolean(
            kind, "keepOpenOnDeny", kwargs.get("keepOpenOnDeny", "no")
        ),
        ready_timeout=timeouts["readyTimeout"],
        wait_for_certificate="readyTimeout" not in kwargs,
        handshake_timeout=timeouts["handshakeTimeout"],
        authorize_timeout=timeouts["authorizeTimeout"],
        max_handshakes=_optional_count(kind, "maxHandshakes", kwargs),
        max_handshakes_per_address=_optional_count(
            kind, "maxHandshakesPerAddress", kwargs
        ),
        **where,
    )


def _identity(kind: str, kwargs: Mapping[str, str]) -> FilesIdentity | None:
    from connect_native.sources import (
        InvalidIdentityDescription,
        files_identity,
        parse_identity,
    )

    text = kwargs.get("identity", "agent")
    parts = {
        name: kwargs[option]
        for option, name in (
            ("cert", "cert"),
            ("key", "key"),
            ("roots", "roots"),
            ("trustDomain", "trust_domain"),
        )
        if option in kwargs
    }
    try:
        if text.strip() == "files":
            return files_identity(**parts)
        if parts:
            raise _fail(
                kind,
                f"{', '.join(f'{p}=' for p in parts)} go with identity=files "
                "(connect:web:port=8443:identity=files:cert=PATH:key=PATH:roots=PATH)",
            )
        return parse_identity(text)
    except InvalidIdentityDescription as e:
        raise _fail(kind, f"identity=: {e}") from None


def _allow_ids(kind: str, authorize: str, kwargs: Mapping[str, str]) -> tuple[str, ...]:
    from connect_native.authorize import AllowedId, InvalidAllowedId

    text = kwargs.get("allowIds")
    if authorize != "allow-ids":
        if text is not None:
            raise _fail(kind, "allowIds= goes with authorize=allow-ids")
        return ()
    if text is None or not text.strip():
        raise _fail(
            kind,
            "authorize=allow-ids needs allowIds=: the SPIFFE IDs allowed, separated "
            "by commas, each colon escaped (allowIds=spiffe\\://td/ns/default/dc/"
            "dc1/svc/api)",
        )
    allowed = tuple(part.strip() for part in text.split(",") if part.strip())
    for one in allowed:
        try:
            AllowedId.parse(one)
        except InvalidAllowedId as e:
            raise _fail(kind, f"allowIds=: {e}") from None
    return allowed


def _optional_count(kind: str, name: str, kwargs: Mapping[str, str]) -> int | None:
    value = kwargs.get(name)
    return None if value is None else _integer(kind, name, value, 1, 1_000_000)


def _optional_text(kind: str, name: str, kwargs: Mapping[str, str]) -> str | None:
    value = kwargs.get(name)
    return None if value is None else _text(kind, name, value)


def parse_client_description(
    args: Sequence[str],
    kwargs: Mapping[str, str],
    environ: Mapping[str, str] | None = None,
) -> ClientDescription:
    """
    Read a client description's parts (see :func:`parse_server_description`).
    ``source`` defaults to ``$CONNECT_NATIVE_SERVICE`` from ``environ``
    (``os.environ`` by default).

    :raises EndpointStringError: naming the option at fault.
    """
    kind = "client"
    _check_names(kind, kwargs, CLIENT_OPTIONS)
    service = _positional(kind, args, "connect:<service>[:source=<our service>]")
    query = _optional_text(kind, "query", kwargs)
    if service is None and query is None:
        raise _fail(
            kind,
            "no service name: write connect:<service>[:source=<our service>] "
            "(or connect:query=<prepared query>)",
        )
    if service is not None and query is not None:
        raise _fail(
            kind,
            f"give either the service name ({service!r}) or query= ({query!r}), "
            "not both: the prepared query says which service answers",
        )
    if query is not None:
        for name in ("namespace", "partition"):
            if name in kwargs:
                raise _fail(
                    kind,
                    f"{name}= does not go with query=: the prepared query "
                    "decides the namespace and partition",
                )
    from connect_native.client import SERVICE_VARIABLE

    source = kwargs.get("source")
    if source is None:
        source = (
            (os.environ if environ is None else environ)
            .get(SERVICE_VARIABLE, "")
            .strip()
        )
        if not source:
            raise _fail(
                kind,
                "no source: a Connect client presents the certificate of its "
                "own service; add source=<our service> or set "
                f"{SERVICE_VARIABLE}",
            )
    source = _service_name(kind, "source=", source)
    return ClientDescription(
        service=service,
        source=source,
        datacenter=_optional_text(kind, "datacenter", kwargs),
        namespace=_optional_text(kind, "namespace", kwargs),
        partition=_optional_text(kind, "partition", kwargs),
        query=query,
        timeout=(
            _seconds(kind, "timeout", kwargs["timeout"])
            if "timeout" in kwargs
            else None
        ),
        consul=_optional_text(kind, "consul", kwargs),
        token_file=_optional_text(kind, "tokenFile", kwargs),
    )


# --- the Consul agent's client -------------------------------------------------------


def _read_token(kind: str, path: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise _fail(kind, f"tokenFile={path!r} cannot be read: {reason}") from None
    if not token:
        raise _fail(kind, f"tokenFile={path!r} is empty: it must hold the ACL token")
    return token


def consul_client(
    reactor: Any,
    kind: str,
    consul: str | None,
    token_file: str | None,
    environ: Mapping[str, str] | None = None,
) -> ConsulClient:
    """
    The agent's client for a description: ``consul=`` and ``tokenFile=``
    over the ``CONSUL_*`` environment variables; shared by every description
    with the same settings on the same reactor.
    """
    from connect_native.consul.client import ConsulConfigurationError, shared_client

    token = None if token_file is None else _read_token(kind, token_file)
    try:
        return shared_client(reactor, environ, address=consul, token=token)
    except ConsulConfigurationError as e:
        what = f"consul={consul!r}" if consul is not None else "the CONSUL_* variables"
        raise _fail(kind, f"{what}: {e}") from None


# --- the server ---------------------------------------------------------------


def _settle(waiter: Deferred[Any], result: object) -> None:
    from twisted.python.failure import Failure

    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)


@implementer(IListeningPort)
class _Port:
    """
    A port from :class:`ConnectStringServerEndpoint`: stopping it deregisters
    the instance (when registered) before the socket closes, then lets go of
    what the listen took.  The reactor's shutdown stops it too, so a program
    that just stops its reactor (``Klein().run``) still deregisters.
    """

    def __init__(
        self,
        reactor: Any,
        port: IListeningPort,
        registration: Registration | None,
        release: Callable[[], None],
    ) -> None:
        self.port = port
        self._reactor = reactor
        self._registration = registration
        self._release = release
        self._outcome: list[object] = []
        from connect_native._deferreds import Waiters

        self._waiters: Waiters[Any] = Waiters()
        self._stopping = False
        add = getattr(reactor, "addSystemEventTrigger", None)
        self._trigger = (
            add("before", "shutdown", self.stopListening) if callable(add) else None
        )

    def startListening(self) -> None:
        self.port.startListening()

    def stopListening(self) -> Deferred[Any]:
        from twisted.internet.defer import Deferred

        if self._outcome:
            done: Deferred[Any] = Deferred()
            _settle(done, self._outcome[0])
            return done
        waiter = self._waiters.wait()
        if not self._stopping:
            self._stopping = True
            self._stop()
        return waiter

    def _stop(self) -> None:
        from twisted.internet.defer import maybeDeferred, succeed

        trigger, self._trigger = self._trigger, None
        remove = getattr(self._reactor, "removeSystemEventTrigger", None)
        if trigger is not None and callable(remove):
            try:
                remove(trigger)
            except (ValueError, KeyError):  # it is running: we are shutting down
                pass
        registration = self._registration
        stopping: Deferred[Any] = (
            maybeDeferred(registration.stopService)
            if registration is not None
            else succeed(None)
        )
        stopping.addCallback(lambda _: self.port.stopListening())

        def finished(result: object) -> None:
            from twisted.python.failure import Failure

            self._release()
            self._outcome.append(result)
            if isinstance(result, Failure):
                self._waiters.fail(result)
            else:
                self._waiters.fire(result)

        stopping.addBoth(finished)

    def getHost(self) -> Any:
        return self.port.getHost()


@implementer(IStreamServerEndpoint)
class ConnectStringServerEndpoint:
    """
    What ``serverFromString(reactor, "connect:...")`` returns: a
    :class:`~connect_native.server.ConnectServerEndpoint` over the described
    endpoint, plus what the description asks to run while it listens: the
    :class:`~connect_native.authorize.intentions.IntentionAuthorizer`
    (``authorize=intentions``) and the
    :class:`~connect_native.registration.Registration` (``register=yes``).

    :ivar description: the parsed :class:`ServerDescription`.
    :ivar wrapped: the endpoint the TLS runs over.
    :ivar consul: the agent's client.
    :ivar authorizer: the intention authorizer it runs while listening
        (``authorize=intentions``), else ``None``: the agent decides.
    """

    def __init__(
        self,
        reactor: Any,
        description: ServerDescription,
        wrapped: IStreamServerEndpoint,
        consul: ConsulClient,
    ) -> None:
        self.description = description
        self.wrapped = wrapped
        self.consul = consul
        self._reactor = reactor
        # The authorizer runs while any port listens: one share per listen.
        self._listening: Leases[None, Any] = Leases(_start_service, _stop_service)
        self.authorizer: Any = None
        if description.authorize == "allow-ids":
            from connect_native.authorize import AllowIdsAuthorizer

            self.authorizer = AllowIdsAuthorizer(description.allow_ids)
        elif description.authorize == "intentions":
            from connect_native.authorize.intentions import IntentionAuthorizer

            # No matching intention: ask the agent, which applies the ACL
            # default policy exactly as Consul's own proxies see it.
            self.authorizer = IntentionAuthorizer(
                consul, reactor, description.service, default="agent"
            )
        # Only what the description names: the endpoint has the defaults.
        budget: dict[str, Any] = {
            name: count
            for name, count in (
                ("max_handshakes", description.max_handshakes),
                ("max_handshakes_per_address", description.max_handshakes_per_address),
            )
            if count is not None
        }
        from connect_native.service import connect_services

        connect_service = connect_services.get(
            reactor, description.service, consul=consul, identity=description.identity
        )
        self.connect_service = connect_service
        self.connect: ConnectServerEndpoint = connect_service.server_endpoint(
            wrapped,
            authorizer=self.authorizer,
            ready_timeout=description.ready_timeout,
            handshake_timeout=description.handshake_timeout,
            authorize_timeout=description.authorize_timeout,
            keep_open_on_deny=description.keep_open_on_deny,
            **budget,
        )

    def __repr__(self) -> str:
        return f"<ConnectStringServerEndpoint {self.description!r}>"

    def _start(self) -> None:
        self._listening.take(None, lambda: self.authorizer)

    def _stop(self) -> None:
        self._listening.give_back(None, self.authorizer)

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        Listen as :class:`~connect_native.server.ConnectServerEndpoint`
        does (once the service's certificate is ready); then, with
        ``register=yes``, register the instance with the agent.

        Without ``readyTimeout=`` in the description it waits for the
        certificate as long as it takes, logging a warning that says why
        every ``readyTimeout`` (60) seconds; with it, it fails with
        :class:`~connect_native.errors.CertificateNotReady` after that long.
        """
        if not self.description.wait_for_certificate:
            return self._listen_once(protocolFactory)
        from twisted.internet.defer import Deferred

        from connect_native.errors import CertificateNotReady

        attempt: list[Deferred[IListeningPort]] = []

        def cancel(_: Deferred[IListeningPort]) -> None:
            if attempt:
                attempt[0].cancel()

        result: Deferred[IListeningPort] = Deferred(cancel)
        waited = [0.0]

        def again(failure: Any) -> None:
            if result.called:
                return
            if not failure.check(CertificateNotReady):
                result.errback(failure)
                return
            waited[0] += self.description.ready_timeout
            log.warn(
                "connect:{service}: no certificate after {waited:g}s ({reason}); "
                "still waiting (readyTimeout= in the description fails instead)",
                service=self.description.service,
                waited=waited[0],
                reason=failure.getErrorMessage(),
            )
            start()

        def start() -> None:
            attempt[:] = [self._listen_once(protocolFactory)]
            attempt[0].addCallbacks(result.callback, again)

        start()
        return result

    def _listen_once(
        self, protocolFactory: IProtocolFactory
    ) -> Deferred[IListeningPort]:
        self._start()
        listening: Deferred[IListeningPort] = self.connect.listen(protocolFactory)

        def listened(port: IListeningPort) -> IListeningPort:
            try:
                return self._wrap(port)
            except BaseException:
                self._stop()
                port.stopListening()
                raise

        def failed(failure: Any) -> Any:
            self._stop()
            return failure

        return listening.addCallbacks(listened, failed)

    def _wrap(self, port: IListeningPort) -> IListeningPort:
        registration: Registration | None = None
        lease: CertManagerLease | None = None
        if self.description.register:
            from connect_native.registration import Registration
            from connect_native.service import cert_managers

            readiness: Any
            if self.description.identity is not None:
                # The files: their state is what the check reports.
                readiness = self.connect_service.identity_source
            else:
                # The same shared manager the endpoint leases: its readiness
                # is what the check reports.
                lease = cert_managers.acquire(
                    self._reactor, self.consul, self.description.service
                )
                readiness = lease.manager
            try:
                registration = Registration(
                    self._reactor,
                    self.consul,
                    readiness,
                    self.description.service,
                    port,
                )
                registration.startService()
            except BaseException:
                # listened() stops the port and our own lease; this one is
                # only known here, and would keep the manager's watches on.
                if lease is not None:
                    lease.release()
                raise

        def release() -> None:
            if lease is not None:
                lease.release()
            self._stop()

        return _Port(self._reactor, port, registration, release)


def _start_service(_: None, service: Any) -> None:
    start = getattr(service, "startService", None)
    if callable(start):
        start()


def _stop_service(_: None, service: Any) -> None:
    stop = getattr(service, "stopService", None)
    if callable(stop):
        stop()


def _wrapped_server(
    reactor: Any, description: ServerDescription
) -> IStreamServerEndpoint:
    from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString

    if description.endpoint is None:
        assert description.port is not None
        make_tcp: Any = TCP4ServerEndpoint
        return make_tcp(  # type: ignore[no-any-return]
            reactor,
            description.port,
            backlog=description.backlog,
            interface=description.interface,
        )
    try:
        parse: Any = serverFromString
        endpoint: IStreamServerEndpoint = parse(reactor, description.endpoint)
    except Exception as e:
        raise _fail(
            "server", f"endpoint={description.endpoint!r} is not usable: {e}"
        ) from None
    return endpoint


def build_server(
    reactor: Any,
    description: ServerDescription,
    environ: Mapping[str, str] | None = None,
) -> ConnectStringServerEndpoint:
    """The endpoint a :class:`ServerDescription` describes."""
    wrapped = _wrapped_server(reactor, description)
    consul = consul_client(
        reactor, "server", description.consul, description.token_file, environ
    )
    return ConnectStringServerEndpoint(reactor, description, wrapped, consul)


def build_client(
    reactor: Any,
    description: ClientDescription,
    environ: Mapping[str, str] | None = None,
) -> ConnectClientEndpoint:
    """The endpoint a :class:`ClientDescription` describes."""
    from connect_native.client import ConnectClientEndpoint
    from connect_native.resolve import PreparedQueryResolver
    from connect_native.service import connect_services

    consul = consul_client(
        reactor, "client", description.consul, description.token_file, environ
    )
    options: dict[str, Any] = {}
    if description.timeout is not None:
        options["timeout"] = description.timeout
    if description.query is not None:
        resolver = PreparedQueryResolver(
            consul, description.query, description.datacenter, reactor=reactor
        )
        source = connect_services.get(
            reactor, description.source, consul=consul
        ).held_identity()
        endpoint = ConnectClientEndpoint(reactor, resolver, source, **options)
        endpoint._owned = [source]
        return endpoint
    assert description.service is not None
    return ConnectClientEndpoint.for_service(
        reactor,
        description.service,
        our_service=description.source,
        consul=consul,
        datacenter=description.datacenter,
        namespace=description.namespace,
        partition=description.partition,
        **options,
    )


def _strings(
    args: Sequence[object], kwargs: Mapping[str, object]
) -> tuple[list[str], dict[str, str]]:
    # Twisted's parser hands over str; anything else was passed by hand.
    return [str(a) for a in args], {k: str(v) for k, v in kwargs.items()}


# --- the parsers ---------------------------------------------------------------------


@implementer(IPlugin, IStreamServerEndpointStringParser)
class ConnectServerParser:
    """
    ``serverFromString(reactor, "connect:<service>:port=<n>...")``: see
    ``docs/endpoints.rst`` for the grammar.

    :param environ: where the ``CONSUL_*`` variables are read (``os.environ``
        by default, at each parse).
    """

    prefix = PREFIX

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ

    def parseStreamServer(
        self, reactor: Any, *args: object, **kwargs: object
    ) -> ConnectStringServerEndpoint:
        try:
            description = parse_server_description(*_strings(args, kwargs))
            return build_server(reactor, description, self._environ)
        except EndpointStringError:
            _one_line_if_uncaught()
            raise


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class ConnectClientParser:
    """
    ``clientFromString(reactor, "connect:<service>[:source=<ours>]...")``:
    see ``docs/endpoints.rst`` for the grammar.

    :param environ: where ``CONNECT_NATIVE_SERVICE`` and the ``CONSUL_*``
        variables are read (``os.environ`` by default, at each parse).
    """

    prefix = PREFIX

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ

    def parseStreamClient(
        self, reactor: Any, *args: object, **kwargs: object
    ) -> ConnectClientEndpoint:
        try:
            description = parse_client_description(
                *_strings(args, kwargs), self._environ
            )
            return build_client(reactor, description, self._environ)
        except EndpointStringError:
            _one_line_if_uncaught()
            raise
