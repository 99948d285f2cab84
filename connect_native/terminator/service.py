"""
The terminator's service tree: :class:`Terminator`, the one Twisted service
that ``twistd connect-native`` runs (:func:`makeService`).

On start it gets the agent's client (or runs the development agent), the
authorizer and the process's :class:`~connect_native.service.ConnectService`
for ``--service``; listens on ``--listen`` with the public Connect endpoint
(carried by the terminator's own TLS transport unless ``--tls-transport
twisted``) and on each ``--upstream``; starts the ``--workers``; registers
the instance; and, with ``--demo``, makes the demo's round trip.  On stop
(SIGTERM, SIGINT) it deregisters first, then stops accepting and drains open
connections for ``--shutdown-timeout`` (a second signal aborts them at
once), then undoes the rest.

Under twistd (``makeService``) it also handles SIGHUP, which reloads what
can change without a restart (:meth:`Terminator.reload`: the token file, the
log level file, the allow-ids file, the identity files) and passes the
signal on to the workers, and SIGUSR1, which is logged and otherwise ignored
unless twistd rotates its log file with it: their default action would
kill the process without deregistering it.  It takes SIGTERM and SIGINT
over from the reactor, so that a clean stop exits 0 and a second signal
aborts the drain.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    ensureDeferred,
    maybeDeferred,
)
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

import connect_native.terminator.demo as demo
from connect_native import _logging
from connect_native.terminator._tls import TLSServerProtocol
from connect_native.terminator.forward import (
    ConnectionTracker,
    ForwardingFactory,
    TrackedEndpoint,
)
from connect_native.terminator.options import (
    LOG_LEVELS,
    Options,
    Settings,
    Upstream,
    consul_client,
    read_allow_ids,
    read_log_level,
    read_token,
    with_default_backlog,
)
from connect_native.terminator.workers import (
    ParentWatch,
    ReusePortEndpoint,
    WorkerProcess,
    signal_workers,
    start_workers,
    stop_workers,
)

__all__ = ["Terminator", "makeService"]

log = Logger(observer=_logging.observer)

# Twisted's endpoint helpers are untyped.
serverFromString: Any = endpoints.serverFromString  # noqa: N816
clientFromString: Any = endpoints.clientFromString  # noqa: N816


def _startup_errors() -> tuple[type[BaseException], ...]:
    from twisted.internet.error import CannotListenError

    from connect_native.errors import (
        CertificateNotReady,
        ConsulError,
        LeafPermissionDenied,
    )

    return (CannotListenError, CertificateNotReady, ConsulError, LeafPermissionDenied)


#: Failures to start that are the operator's to fix, not bugs.
_STARTUP_ERRORS = _startup_errors()


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
    :param handle_signals: install handlers for SIGHUP (:meth:`reload`),
        SIGUSR1 (logged, ignored), SIGTERM and SIGINT (stop; a second one
        aborts the drain) in this process, and put the ones before back on
        stop.  What twistd's ``makeService`` does; off by default,
        so that a Terminator made in a test leaves its process's signals
        alone.
    """

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        *,
        on_finished: Callable[[int], object] | None = None,
        consul_client: Any = None,
        handle_signals: bool = False,
    ) -> None:
        self.settings = settings
        self.handle_signals = handle_signals
        self._signals_before: dict[int, Any] = {}
        self._allow_ids: Any = None
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
        #: The probe of --to that the registered check follows, if any.
        self.backend_probe: Any = None
        self._own_client = consul_client is None
        self._dev_port: IListeningPort | None = None
        self._demo_backend: IListeningPort | None = None
        self._authorizer_service: Any = None
        #: The service's owner (ConnectService), once starting.
        self.connect_service: Any = None
        self._closables: list[Any] = []
        self._starting: Deferred[None] | None = None
        self._log_level_before: LogLevel | None = None
        self.workers: list[WorkerProcess] = []
        self.started: Deferred[None] = Deferred()

    # -- starting -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._log_level_before = _logging.set_log_level(
            LogLevel.levelWithName(self.settings.log_level)
        )
        from connect_native import __version__

        log.info(
            "connect-native {service}: connect_native {version} starting",
            service=self.settings.service,
            version=__version__,
        )
        if self.handle_signals:
            self._install_signals()
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
        # What an operator can act on (a port in use, a refused token, no
        # certificate in time, the agent away) is one line; anything else
        # is a bug, and its traceback is logged with it.
        details: dict[str, Any] = {}
        if not isinstance(failure.value, _STARTUP_ERRORS):
            details["log_failure"] = failure
        log.critical(
            "connect-native {service}: cannot start: {error}",
            service=self.settings.service,
            error=failure.getErrorMessage() or repr(failure.value),
            **details,
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
                self.client = consul_client(reactor, settings.consul, settings.token)
        from connect_native.service import connect_services

        authorizer = self._authorizer()
        # The one owner of the service in this process (the process's shared
        # one): its certificates for the public listener and every upstream.
        self.connect_service = connect_services.get(
            reactor, settings.service, consul=self.client, identity=settings.identity
        )
        self.connect_service.startService()

        listening: list[Deferred[Any]] = []
        to = settings.to
        if settings.demo:
            to = self._start_demo_backend()
        if settings.status is not None:
            await self._listen_status(settings.status, to, authorizer)
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
            self.reactor.addReader(ParentWatch(lambda: _stop_process(reactor, 0)))
        if settings.register and not settings.worker and public is not None:
            from connect_native.registration import Registration

            # Whose state the check follows: the certificate manager, or
            # the files.
            readiness: Any = self.connect_service.cert_manager
            if readiness is None:
                readiness = self.connect_service.identity_source
            self.backend_probe = self._backend_probe(to)
            self.registration = Registration(
                reactor,
                self.client,
                readiness,
                settings.service,
                public,
                tags=settings.tags,
                meta=dict(settings.meta),
                deregister_critical_after=settings.deregister_critical_after,
                backend=self.backend_probe,
            )
            if self.backend_probe is not None:
                self.backend_probe.startService()
            self.registration.startService()
        if settings.demo:
            await self._demo()

    def _backend_probe(self, to: str | None) -> Any:
        """The probe of ``--to`` the registered check follows, if any."""
        settings = self.settings
        if to is None or settings.to_check is None:
            return None
        from connect_native.terminator.health import (
            BackendProbe,
            http_probe,
            tcp_probe,
        )

        endpoint = clientFromString(self.reactor, to)
        if settings.to_check == "http":
            probe = http_probe(self.reactor, endpoint, to, settings.to_check_path)
        else:
            probe = tcp_probe(endpoint, to)
        return BackendProbe(
            self.reactor,
            probe,
            to,
            interval=settings.check_interval,
            timeout=min(settings.check_interval, settings.connect_timeout),
        )

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
        from connect_native.authorize import AgentAuthorizer, AllowIdsAuthorizer

        if self.settings.authorize == "allow-ids":
            self._allow_ids = AllowIdsAuthorizer(self.settings.allow_ids)
            return self._allow_ids
        if self.settings.authorize == "intentions":
            from connect_native.authorize.intentions import IntentionAuthorizer

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
        http_mode = settings.protocol == "http"
        endpoint = self.connect_service.server_endpoint(
            TrackedEndpoint(
                listener, self.tracker, label, self.connect_service.metrics
            ),
            authorizer=authorizer,
            handshake_timeout=settings.handshake_timeout,
            max_handshakes=settings.max_handshakes,
            max_handshakes_per_address=settings.max_handshakes_per_address,
            release_buffers=settings.release_buffers,
            log_allowed=settings.log_allowed,
            keep_open_on_deny=settings.keep_open_on_deny,
            # The forwarder writes each read whole: nothing to aggregate;
            # twisted.web writes a response's head and body in pieces.
            buffer_small_writes=http_mode,
            # Its own TLS transport, injected: the public endpoint knows only
            # the protocol factory it is given.  HTTP takes Twisted's, which
            # the endpoint makes report what the client's first bytes speak
            # (HTTP/2 or HTTP/1.1).
            tls_protocol=(
                TLSServerProtocol
                if settings.tls_transport == "connect_native" and not http_mode
                else None
            ),
        )
        factory: Any
        if http_mode:
            factory = self._proxy_site(to, authorizer, label)
        else:
            factory = self._forwarding_factory(to, label)
        forwarding = "proxying each HTTP request" if http_mode else "forwarding them"

        def listening(port: IListeningPort) -> None:
            self.ports["public"] = port
            log.info(
                "connect-native {service}: accepting Connect (mutual TLS) "
                "connections on {address}, {forwarding} to {to}",
                service=settings.service,
                address=str(port.getHost()),
                forwarding=forwarding,
                to=to,
            )

        listened: Deferred[Any] = endpoint.listen(factory)
        return listened.addCallback(listening)

    def _forwarding_factory(self, to: str, label: str) -> ForwardingFactory:
        settings, reactor = self.settings, self.reactor
        backend = clientFromString(reactor, to)
        return ForwardingFactory(
            reactor,
            backend.connect,
            to,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
            label=label,
            buffer_size=settings.buffer_size,
            byte_counts=self.connect_service.metrics.bytes,
        )

    def _proxy_site(self, to: str, authorizer: Any, label: str) -> Any:
        """``--protocol http``: each request decided, then proxied to ``to``."""
        from connect_native.terminator.http_proxy import ProxySettings, ProxySite

        settings = self.settings
        identity = self.connect_service.identity

        def own_uri() -> str | None:
            bundle = identity.current()
            return None if bundle is None else str(bundle.identity.uri)

        per_request = authorizer if hasattr(authorizer, "decide_request") else None
        site = ProxySite(
            self.reactor,
            ProxySettings(
                service=settings.service,
                to=to,
                request_timeout=settings.request_timeout,
                max_request_line=settings.max_request_line,
                max_headers_size=settings.max_headers_size,
                max_requests=settings.max_requests_per_connection,
                idle_timeout=min(settings.idle_timeout, 75.0),
                log_allowed=settings.log_allowed_requests,
                max_backend_connections=settings.max_connections,
            ),
            per_request,
            own_uri,
            metrics=self.connect_service.metrics,
        )
        self._closables.append(site)
        return site

    async def _listen_status(
        self, status: str, to: str | None, authorizer: Any
    ) -> None:
        """
        ``--status``: /ready (a certificate, the public listener accepting,
        the backend answering), /status and /metrics.
        """
        from connect_native.terminator.status import BackendProbe, status_site

        checks: list[Any] = []
        if to is not None:

            def accepting() -> str | None:
                if "public" in self.ports:
                    return None
                return "the public listener is not accepting yet"

            checks.append(accepting)
            checks.append(
                BackendProbe(self.reactor, to, min(self.settings.connect_timeout, 5.0))
            )
        resource = self.connect_service.status_resource(
            authorizer=authorizer, checks=checks
        )
        port = await serverFromString(self.reactor, status).listen(
            status_site(resource)
        )
        self.ports["status"] = port
        log.info(
            "connect-native {service}: status pages (/ready, /status, /metrics) "
            "on http://{address}",
            service=self.settings.service,
            address=_http_address(port.getHost()),
        )

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

    # -- workers and the demo -------------------------------------------------

    def _start_workers(self, public: IListeningPort) -> None:
        consul = self.settings.consul
        if self.dev_agent is not None:
            consul = f"http://127.0.0.1:{self.dev_agent.http_port}"
        self.workers.extend(start_workers(self.reactor, self.settings, public, consul))

    def _start_demo_backend(self) -> str:
        port: Any = demo.listen_backend(self.reactor)
        self._demo_backend = port
        return f"tcp:127.0.0.1:{port.getHost().port}"

    async def _demo(self) -> None:
        settings = self.settings
        await demo.registered(
            self.reactor, self.registration, settings.service, deadline=10.0
        )
        await demo.round_trip(
            self.reactor,
            settings.service,
            self.client,
            settings.connect_timeout,
            self._closables,
        )
        self.on_finished(0)

    # -- signals and reloading ------------------------------------------------

    def _install_signals(self) -> None:
        """SIGHUP reloads, SIGUSR1 is logged; on the reactor's thread."""
        self._handle(signal.SIGHUP, self._sighup)
        usr1 = signal.getsignal(signal.SIGUSR1)
        if usr1 in (signal.SIG_DFL, None):
            # twistd sets SIGUSR1 to rotate its log file when it writes one:
            # that one stays.
            self._handle(signal.SIGUSR1, self._sigusr1)
        # The reactor installs its SIGTERM and SIGINT handlers as it starts
        # running; ours replace them then.
        self.reactor.callWhenRunning(self._install_stop_signals)

    def _install_stop_signals(self) -> None:
        if not self.running:
            return
        self._handle(signal.SIGTERM, self._stop_signal)
        self._handle(signal.SIGINT, self._stop_signal)

    def _stop_signal(self, signum: int) -> None:
        """
        SIGTERM or SIGINT: stop the reactor, which stops the service (as
        the reactor's own handlers do, but a clean stop then exits 0, not
        by the signal); a second one while stopping cuts the drain short.
        """
        name = signal.Signals(signum).name
        if not self.running:
            self._second_stop_signal(name)
            return
        log.info(
            "connect-native {service}: {name}: deregistering, then draining "
            "open connections for at most {timeout:g}s (--shutdown-timeout; "
            "{name} again aborts them)",
            service=self.settings.service,
            name=name,
            timeout=self.settings.shutdown_timeout,
        )
        if self.reactor.running:
            self.reactor.stop()

    def _handle(self, number: int, handler: Callable[[int], object]) -> None:
        reactor = self.reactor

        def handle(signum: int, frame: object) -> None:
            reactor.callFromThread(handler, signum)

        before = signal.signal(number, handle)
        self._signals_before.setdefault(number, before)

    def _restore_signals(self) -> None:
        before, self._signals_before = self._signals_before, {}
        for number, handler in before.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def _sighup(self, signum: int) -> None:
        if not self.running:
            log.info(
                "connect-native {service}: SIGHUP while stopping: ignored",
                service=self.settings.service,
            )
            return
        self.reload("SIGHUP")
        passed = signal_workers(self.workers, "HUP")
        if passed:
            log.info(
                "connect-native {service}: SIGHUP passed on to {count} workers",
                service=self.settings.service,
                count=passed,
            )

    def _sigusr1(self, signum: int) -> None:
        log.info(
            "connect-native {service}: SIGUSR1: nothing to do (twistd rotates "
            "its log file on SIGUSR1 when it writes one, with --logfile; "
            "SIGHUP reloads)",
            service=self.settings.service,
        )

    def _second_stop_signal(self, name: str) -> None:
        open_now = self.tracker.hurry()
        signal_workers(self.workers, "TERM")
        log.warn(
            "connect-native {service}: {name} while stopping: aborting the "
            "{count} connections still open now",
            service=self.settings.service,
            name=name,
            count=open_now,
        )

    def reload(self, why: str = "reload") -> list[str]:
        """
        Read again what can change without a restart, and use it: the token
        file (``--token-file``, else ``CONSUL_HTTP_TOKEN_FILE``), the log
        level file (``--log-level-file``), the allowed IDs file
        (``--allow-ids-file``: the open connections are decided again unless
        ``--keep-open-on-deny``) and the identity files (``--identity
        files:...``, read now without waiting for them to hold still).  What
        cannot be read or used is logged and the value before is kept; an
        allow-ids file with no ID left allows only the ``--allow-id``
        options (none: no one).

        :returns: the lines logged, one per thing reloaded.
        """
        settings = self.settings
        prefix = f"connect-native {settings.service}: {why}"
        done: list[str] = []

        def say(text: str, level: LogLevel = LogLevel.info) -> None:
            done.append(text)
            log.emit(level, "{prefix}: {text}", prefix=prefix, text=text)

        token_file = settings.token_file
        if token_file is None and not settings.dev:
            token_file = os.environ.get("CONSUL_HTTP_TOKEN_FILE") or None
        if token_file is not None and self.client is not None:
            try:
                token = read_token(token_file)
            except ValueError as e:
                say(f"kept the ACL token in use: {e}", LogLevel.error)
            else:
                if self.client.set_token(token):
                    say(f"a new ACL token from {token_file} is in use")
                else:
                    say(f"the ACL token in {token_file} is unchanged")
        if settings.allow_ids_file is not None and self._allow_ids is not None:
            self._reload_allow_ids(settings.allow_ids_file, say)
        source = None
        if settings.identity is not None and self.connect_service is not None:
            source = self.connect_service.identity_source
        if source is not None and callable(getattr(source, "reload", None)):
            say(f"identity files read again: {source.reload()}")
        if settings.log_level_file is not None:
            self._reload_log_level(settings.log_level_file, say)
        if not done:
            say(
                "nothing to reload (SIGHUP reloads --token-file, "
                "--log-level-file, --allow-ids-file and --identity files)"
            )
        return done

    def _reload_allow_ids(self, path: str, say: Callable[..., None]) -> None:
        try:
            from_file = read_allow_ids(path)
        except ValueError as e:
            say(f"kept the allowed IDs in use: {e}", LogLevel.error)
            return
        allowed = tuple(dict.fromkeys((*self.settings.allow_id_options, *from_file)))
        before = tuple(str(a) for a in self._allow_ids.allowed)
        if allowed == before:
            say(f"the allowed IDs in {path} are unchanged ({len(allowed)} allowed)")
            return
        self._allow_ids.replace(allowed)
        if not allowed:
            say(
                f"no ID is allowed any more ({path} holds none): every "
                "connection is refused",
                LogLevel.warn,
            )
            return
        say(
            f"{len(allowed)} IDs allowed now ({len(from_file)} from {path}), "
            f"{len(before)} before"
        )

    def _reload_log_level(self, path: str, say: Callable[..., None]) -> None:
        try:
            name = read_log_level(path)
        except ValueError as e:
            say(f"kept the log level in use: {e}", LogLevel.error)
            return
        level = LogLevel.levelWithName(name)
        before = _logging.set_log_level(level)
        # Said at the new level when it is above info, so that it shows.
        shown = max(LOG_LEVELS.index(name), LOG_LEVELS.index("info"))
        say(
            f"log level {name} (from {path}, {before.name} before)",
            LogLevel.levelWithName(LOG_LEVELS[shown]),
        )

    # -- stopping -------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        stopping = ensureDeferred(self._stop())

        def level_back(result: object) -> object:
            if self._log_level_before is not None:
                _logging.set_log_level(self._log_level_before)
                self._log_level_before = None
            self._restore_signals()
            return result

        return stopping.addBoth(level_back)

    async def _stop(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.cancel()
        settings = self.settings
        if self.registration is not None:
            # Deregistered first (bounded by the registration's own timeout):
            # callers stop choosing this instance before it stops accepting.
            await maybeDeferred(self.registration.stopService)
        if self.backend_probe is not None:
            self.backend_probe.stopService()
        stopping: list[Deferred[Any]] = []
        for name, port in self.ports.items():
            log.info("connect-native: stopped accepting on {name}", name=name)
            stopping.append(maybeDeferred(port.stopListening))
        if self._demo_backend is not None:
            stopping.append(maybeDeferred(self._demo_backend.stopListening))
        await DeferredList(stopping, consumeErrors=True)
        stopping_workers = ensureDeferred(
            stop_workers(self.reactor, self.workers, settings.shutdown_timeout)
        )
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


def _http_address(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def makeService(config: Options) -> Terminator:
    """The ``connect-native`` service for twistd."""
    from twisted.internet import reactor

    settings = config.settings
    if settings is None:  # pragma: no cover (twistd runs postOptions first)
        config.postOptions()
        settings = config.settings
    assert settings is not None
    return Terminator(settings, reactor, handle_signals=True)
