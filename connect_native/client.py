"""
Dialing a Connect service: :class:`ConnectClientEndpoint`, a client
endpoint that resolves the service, connects to one of its instances over
mutual TLS with our certificate, and hands the application a connection
only once the server has proved the identity it was expected to have.

One ``connect()`` runs under one deadline, ``timeout`` seconds: waiting for
our certificate, resolving, and every attempt (TCP connect plus TLS
handshake).  Instances are tried in random order; a refused connection, a
TCP connect or handshake that takes longer than ``attempt_timeout``, or a
handshake that fails (the server's certificate refused, another service's
identity, a TLS alert, the connection closed) moves on to the next instance
until the deadline passes or every instance has been tried.  Failures are
one :class:`ConnectError` family, each kind saying what every attempt did.

The application's protocol is built and connected only after the handshake
verified the server, so it can never write to an unverified peer.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from attrs import frozen
from OpenSSL import SSL
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    NoProtocol,
)
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native import _logging
from connect_native._checks import positive_seconds
from connect_native._shared import CertManagerRegistry, SharedService, shared_services
from connect_native.certs import Bundle, IBundleSource
from connect_native.errors import (
    AllInstancesFailed,
    ConnectError,
    ConnectTimeout,
    HandshakeTimeout,
    IdentityMismatch,
    NoCertificate,
    NoHealthyInstances,
    ResolutionFailed,
    ServiceRefused,
)
from connect_native.resolve import (
    ConsulResolver,
    ExpectedIdentity,
    Instance,
    IResolver,
)
from connect_native.tls import (
    ClientConnectionCreator,
    HalfCloseBufferingTLS,
    PeerIdentityMismatch,
    PeerRefused,
    received_alert,
    verified_peer,
)

if TYPE_CHECKING:
    from connect_native.consul.client import ConsulClient

__all__ = [
    "SERVICE_VARIABLE",
    "AllInstancesFailed",
    "Attempt",
    "ConnectClientEndpoint",
    "ConnectError",
    "ConnectTimeout",
    "HandshakeTimeout",
    "IdentityMismatch",
    "NoCertificate",
    "NoHealthyInstances",
    "ResolutionFailed",
    "ServiceRefused",
    "our_service_name",
]

log = Logger(observer=_logging.observer)

_failure: Callable[[BaseException], Failure] = Failure


# --- errors ---------------------------------------------------------------------


@frozen
class Attempt:
    """
    What one attempt to reach one instance did.

    :ivar instance: the instance tried.
    :ivar outcome: what happened, as a phrase ("connection refused").
    :ivar error: the exception behind it.
    """

    instance: Instance
    outcome: str
    error: BaseException

    def __str__(self) -> str:
        return f"{self.instance}: {self.outcome}"


def _attempts_text(attempts: Sequence[Attempt]) -> str:
    return "; ".join(str(a) for a in attempts)


def _abort(transport: Any) -> None:
    transport.abortConnection()


# --- the gate ---------------------------------------------------------------------


@implementer(IHandshakeListener)
class _Gate(Protocol):
    """
    The TLS protocol's wrapped protocol until the handshake has verified the
    server: the application's protocol does not exist before that.
    """

    transport: TLSMemoryBIOProtocol

    def __init__(self, attempt: _AttemptState) -> None:
        self.attempt = attempt

    def connectionMade(self) -> None:
        self.attempt.tcp_connected(self)

    def handshakeCompleted(self) -> None:
        self.attempt.handshake_completed(self)

    def dataReceived(self, data: bytes) -> None:
        # TLS delivers no application data before the handshake completes,
        # and the gate is replaced right then.
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.attempt.lost_before_verified(reason)


class _ConnectTLS(HalfCloseBufferingTLS):
    """
    The client's TLS transport.  Once the application has the connection,
    a TLS alert from the server before it sent anything is its refusal: the
    application's ``connectionLost`` gets :class:`ServiceRefused`, not
    OpenSSL's bare ``SSL.Error``.  (Under TLS 1.3 the server checks our
    certificate, and its intentions, after our side of the handshake is
    done, so the refusal comes after ``connect()`` has succeeded.)
    """

    #: What was dialled, set when the application gets the connection.
    target: str | None = None

    def _read_failure(self, failure: Failure) -> Failure:
        if self.target is None or self.heard_data:
            return failure
        alert = received_alert(failure)
        if alert is None:
            return failure
        peer: Any = self.getPeer()  # type: ignore[no-untyped-call]
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        address = f"{host}:{port}" if host is not None else ""
        return _failure(ServiceRefused.of(self.target, alert, address=address))


class _GateFactory(Factory):
    noisy = False

    def __init__(self, attempt: _AttemptState) -> None:
        self.attempt = attempt

    def buildProtocol(self, addr: IAddress | None) -> _Gate:
        self.attempt.address = addr
        return _Gate(self.attempt)

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        self.attempt.factory_stopped()


class _AttemptState:
    """
    One instance being tried: TCP, then the handshake, then the hand-over.
    """

    def __init__(self, dial: _Dial, instance: Instance) -> None:
        self.dial = dial
        self.instance = instance
        self.phase = "connecting"
        self.address: IAddress | None = None
        self.connecting: Deferred[Any] | None = None
        self.gate: _Gate | None = None
        self.timer: IDelayedCall | None = None
        self.started = dial.clock.seconds()
        self.done = False
        self.app_factory_started = False

    # -- events -------------------------------------------------------------

    def tcp_connected(self, gate: _Gate) -> None:
        self.gate = gate
        if self.done:
            _abort(gate.transport)
            return
        self.phase = "handshaking"

    def handshake_completed(self, gate: _Gate) -> None:
        if self.done:
            return
        tls = gate.transport
        peer = verified_peer(tls)
        if peer is None or not self.instance.identity.matches(
            peer.identity, self.dial.bundle_trust_domains()
        ):
            # The verify callback checks this already; never trust a
            # connection it did not record.
            self.failed(
                "the TLS handshake completed without a verified server identity",
                PeerRefused("no verified server identity"),
            )
            _abort(tls)
            return
        self.dial.verified(self, tls)

    def lost_before_verified(self, reason: Failure) -> None:
        if self.done:
            return
        self.failed(*_describe_loss(reason, self.phase))

    def connect_failed(self, failure: Failure) -> None:
        if self.done:
            return
        self.failed(*_describe_connect_failure(failure))

    def timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        seconds = f"{self.dial.clock.seconds() - self.started:.3g}s"
        if self.phase == "handshaking":
            outcome = f"the TLS handshake did not complete within {seconds}"
        else:
            outcome = f"the TCP connection was not established within {seconds}"
        self.failed(outcome, TimeoutError(outcome), timed_out=True)

    def factory_stopped(self) -> None:
        if self.app_factory_started:
            self.app_factory_started = False
            self.dial.app_factory.doStop()

    # -- outcomes -----------------------------------------------------------

    def failed(
        self, outcome: str, error: BaseException, *, timed_out: bool = False
    ) -> None:
        self.finish()
        self.dial.attempt_failed(
            self, Attempt(self.instance, outcome, error), timed_out=timed_out
        )

    def finish(self) -> None:
        """
        Stop this attempt: no timer, no connection left behind.
        """
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.connecting is not None and not self.connecting.called:
            self.connecting.cancel()
        if self.gate is not None and self.gate.transport is not None:
            transport = self.gate.transport
            if transport.wrappedProtocol is self.gate and transport.connected:
                _abort(transport)


def _describe_connect_failure(failure: Failure) -> tuple[str, BaseException]:
    error: Any = failure.value
    if isinstance(error, ConnectionRefusedError):
        return "connection refused", error
    if isinstance(error, ConnectingCancelledError | CancelledError):
        return "connecting was cancelled", error
    return f"TCP connection failed: {failure.getErrorMessage()}", error


def _describe_loss(reason: Failure, phase: str) -> tuple[str, BaseException]:
    error: Any = reason.value
    if isinstance(error, PeerIdentityMismatch):
        return (
            f"the server is another service: got {error.got}, want {error.wanted}",
            error,
        )
    if isinstance(error, PeerRefused):
        return f"the server's certificate was refused: {error.reason}", error
    alert = received_alert(error)
    if alert is not None:
        return f"the server refused us with the TLS alert '{alert}'", error
    if isinstance(error, SSL.Error):
        return f"the TLS handshake failed: {_ssl_error_text(error)}", error
    if isinstance(error, ConnectionDone | ConnectionLost):
        if phase == "handshaking":
            return "the server closed the connection during the TLS handshake", error
        return "the connection closed before the TLS handshake", error
    return f"the connection failed: {reason.getErrorMessage()}", error


def _ssl_error_text(error: SSL.Error) -> str:
    parts = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return ", ".join(parts) or str(error) or "TLS error"


# --- one connect() -------------------------------------------------------------------


class _Dial:
    """
    One ``connect()``: certificate, resolution, attempts, under one deadline.
    """

    def __init__(
        self, endpoint: ConnectClientEndpoint, app_factory: IProtocolFactory
    ) -> None:
        self.endpoint = endpoint
        self.app_factory = app_factory
        self.clock = endpoint._reactor
        self.target = endpoint.target
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self.started = self.clock.seconds()
        self.deadline = self.started + endpoint.timeout
        self.phase = "certificate"
        self.pending: Deferred[Any] | None = None
        self.bundle: Bundle | None = None
        self.candidates: list[Instance] = []
        self.attempts: list[Attempt] = []
        self.current: _AttemptState | None = None
        self.finished = False
        self.last_timed_out_handshake = False
        self.deadline_call: IDelayedCall | None = self.clock.callLater(
            endpoint.timeout, self._deadline
        )

    # -- the steps ------------------------------------------------------------

    def start(self) -> Deferred[IProtocol]:
        try:
            bundle = self.endpoint._source.current()
        except Exception as e:
            self._fail(
                NoCertificate(
                    f"cannot connect to {self.target}: the certificate source "
                    f"failed: {e}",
                    self.target,
                )
            )
            return self.result
        if bundle is not None:
            self._have_bundle(bundle)
            return self.result
        try:
            waiting = self.endpoint._source.when_ready()
        except Exception:
            self._no_bundle(Failure())  # type: ignore[no-untyped-call]
            return self.result
        self.pending = waiting
        waiting.addCallbacks(self._have_bundle, self._no_bundle)
        return self.result

    def _have_bundle(self, bundle: Bundle) -> None:
        self.pending = None
        if self.finished:
            return
        self.bundle = bundle
        self.phase = "resolving"
        try:
            resolving = self.endpoint.resolver.resolve()
        except Exception:
            self._resolve_failed(Failure())  # type: ignore[no-untyped-call]
            return
        self.pending = resolving
        resolving.addCallbacks(self._resolved, self._resolve_failed)

    def _no_bundle(self, failure: Failure) -> None:
        self.pending = None
        if self.finished:
            return
        self._fail(
            NoCertificate(
                f"cannot connect to {self.target}: we have no certificate to "
                f"present: {failure.getErrorMessage()}",
                self.target,
            )
        )

    def _resolve_failed(self, failure: Failure) -> None:
        self.pending = None
        if self.finished:
            return
        self._fail(
            ResolutionFailed(
                f"cannot connect to {self.target}: {failure.getErrorMessage()}",
                self.target,
            )
        )

    def _resolved(self, instances: Sequence[Instance]) -> None:
        self.pending = None
        if self.finished:
            return
        self.candidates = list(instances)
        if not self.candidates:
            self._fail(
                NoHealthyInstances(
                    f"cannot connect to {self.target}: it has no healthy "
                    "instance (none registered, none passing its health "
                    "checks, or none this token may see)",
                    self.target,
                )
            )
            return
        self.phase = "connecting"
        self._next()

    def _next(self) -> None:
        remaining = self.deadline - self.clock.seconds()
        if not self.candidates or remaining <= 0:
            self._give_up()
            return
        # Instances that failed lately are tried after the others.
        fresh = [
            i
            for i, candidate in enumerate(self.candidates)
            if not self.endpoint._failed_lately(candidate)
        ]
        choices = fresh or list(range(len(self.candidates)))
        index = choices[self.endpoint._rng.randrange(len(choices))]
        instance = self.candidates.pop(index)
        attempt = _AttemptState(self, instance)
        self.current = attempt
        # The last candidate may use all the time left; the others are
        # capped so that a silent instance leaves time for the next.
        budget = remaining
        if self.candidates:
            budget = min(self.endpoint.attempt_timeout, remaining)
        if budget < remaining:
            attempt.timer = self.clock.callLater(budget, attempt.timed_out)
        try:
            creator = self.endpoint._creator(self.bundle, instance.identity)
            tls_factory = TLSMemoryBIOFactory(
                creator,
                isClient=True,
                wrappedFactory=_GateFactory(attempt),
                clock=self.clock,
            )
            # Half-close: loseWriteConnection() is close_notify, and the
            # server's close_notify is readConnectionLost() for a protocol
            # that provides IHalfCloseableProtocol.
            tls_factory.protocol = _ConnectTLS
            connecting = self.endpoint._tcp_endpoint(instance, budget).connect(
                tls_factory
            )
        except Exception as e:
            attempt.failed(f"could not start connecting: {e}", e)
            return
        attempt.connecting = connecting
        connecting.addErrback(attempt.connect_failed)

    # -- attempts report here --------------------------------------------------

    def bundle_trust_domains(self) -> frozenset[str]:
        return self.bundle.trust_domains if self.bundle is not None else frozenset()

    def attempt_failed(
        self, attempt: _AttemptState, what: Attempt, *, timed_out: bool
    ) -> None:
        if self.finished or attempt is not self.current:
            return
        self.current = None
        self.attempts.append(what)
        self.endpoint._remember_failure(what.instance)
        self.last_timed_out_handshake = timed_out and attempt.phase == "handshaking"
        log.info(
            "Connect client: {target}: {attempt}; {left} instance(s) left to try",
            target=self.target,
            attempt=str(what),
            left=len(self.candidates),
        )
        self._next()

    def verified(self, attempt: _AttemptState, tls: TLSMemoryBIOProtocol) -> None:
        if self.finished or attempt is not self.current:
            _abort(tls)
            return
        attempt.done = True
        if attempt.timer is not None and attempt.timer.active():
            attempt.timer.cancel()
        attempt.timer = None
        try:
            app = self.app_factory.buildProtocol(attempt.address)  # type: ignore[arg-type]
        except Exception as e:
            _abort(tls)
            self._fail_with(_failure(e))
            return
        if app is None:
            _abort(tls)
            self._fail_with(
                _failure(
                    NoProtocol(
                        f"the application's factory built no protocol for "
                        f"{attempt.instance}"
                    )
                )
            )
            return
        self._finish()
        self.endpoint._forget_failure(attempt.instance)
        attempt.app_factory_started = True
        self.app_factory.doStart()
        tls.wrappedProtocol = app
        if isinstance(tls, _ConnectTLS):
            tls.target = self.target
        app.makeConnection(tls)
        if IHandshakeListener.providedBy(app):
            app.handshakeCompleted()
        peer = verified_peer(tls)
        log.info(
            "Connect client: connected to {target} at {instance}, verified as "
            "{peer} in {elapsed:.3f}s",
            target=self.target,
            instance=str(attempt.instance),
            peer=peer.identity.uri if peer is not None else "?",
            elapsed=self.clock.seconds() - self.started,
        )
        self.result.callback(app)

    # -- the end -------------------------------------------------------------------

    def _give_up(self) -> None:
        attempts = self.attempts
        text = _attempts_text(attempts)
        mismatches = [a for a in attempts if isinstance(a.error, PeerIdentityMismatch)]
        handshake_timeouts = [
            a
            for a in attempts
            if isinstance(a.error, TimeoutError) and "handshake" in a.outcome
        ]
        out_of_time = self.clock.seconds() >= self.deadline and bool(self.candidates)
        error: ConnectError
        if attempts and len(mismatches) == len(attempts):
            first = mismatches[0].error
            assert isinstance(first, PeerIdentityMismatch)
            error = IdentityMismatch(
                f"cannot connect to {self.target}: the server is another "
                f"service: got {first.got}, want {first.wanted} ({text})",
                self.target,
                attempts,
                first.got,
                first.wanted,
            )
        elif attempts and all(received_alert(a.error) for a in attempts):
            first_alert = received_alert(attempts[0].error)
            assert first_alert is not None
            error = ServiceRefused.of(self.target, first_alert, attempts, detail=text)
        elif attempts and len(handshake_timeouts) == len(attempts):
            error = HandshakeTimeout(
                f"cannot connect to {self.target}: the TLS handshake did not "
                f"complete in time ({text})",
                self.target,
                attempts,
            )
        elif out_of_time and self.last_timed_out_handshake:
            error = HandshakeTimeout(
                f"cannot connect to {self.target} within "
                f"{self.endpoint.timeout:g}s: the last server tried did not "
                f"complete the TLS handshake; {len(self.candidates)} "
                f"instance(s) left untried ({text})",
                self.target,
                attempts,
            )
        elif out_of_time:
            error = ConnectTimeout(
                f"cannot connect to {self.target} within "
                f"{self.endpoint.timeout:g}s; {len(self.candidates)} instance(s) "
                f"left untried ({text})",
                self.target,
                attempts,
            )
        else:
            error = AllInstancesFailed(
                f"cannot connect to {self.target}: all {len(attempts)} "
                f"instance(s) failed: {text}",
                self.target,
                attempts,
            )
        self._fail(error)

    def _deadline(self) -> None:
        self.deadline_call = None
        if self.finished:
            return
        seconds = f"{self.endpoint.timeout:g}s"
        if self.phase == "certificate":
            self._fail(
                NoCertificate(
                    f"cannot connect to {self.target}: we had no certificate "
                    f"to present within {seconds}; check that the Consul agent "
                    "is reachable and that the token may write our service "
                    "(service:write is needed for its leaf certificate)",
                    self.target,
                )
            )
            return
        if self.phase == "resolving":
            self._fail(
                ConnectTimeout(
                    f"cannot connect to {self.target}: finding its instances "
                    f"did not finish within {seconds}",
                    self.target,
                )
            )
            return
        attempt = self.current
        if attempt is None:  # pragma: no cover (between attempts is synchronous)
            self._give_up()
            return
        # As the attempt's own timeout: it records what it was doing, and
        # with the time gone _next() gives up.
        attempt.timed_out()

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        if self.finished:
            return
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        if self.deadline_call is not None and self.deadline_call.active():
            self.deadline_call.cancel()
        self.deadline_call = None
        pending, self.pending = self.pending, None
        if pending is not None and not pending.called:
            pending.cancel()
        current, self.current = self.current, None
        if current is not None and not current.done:
            current.finish()

    def _fail(self, error: ConnectError) -> None:
        log.warn("Connect client: {message}", message=str(error), target=self.target)
        self._fail_with(_failure(error))

    def _fail_with(self, failure: Failure) -> None:
        if self.result.called:
            return
        self._finish()
        self.result.errback(failure)


# --- our own service, and its certificates ---------------------------------------

#: The environment variable that names our own service when a client API is
#: not given ``our_service``.
SERVICE_VARIABLE = "CONNECT_NATIVE_SERVICE"


def our_service_name(
    our_service: str | None = None, environ: Mapping[str, str] = os.environ
) -> str:
    """
    The name of the service we are: ``our_service`` if given, else
    ``$CONNECT_NATIVE_SERVICE``.  A Connect client presents its own
    service's certificate, so it must know which service it is.

    :raises ValueError: when neither names a service.
    """
    if our_service is not None:
        if not isinstance(our_service, str) or not our_service.strip():
            raise ValueError(
                f"our_service must be the name of our own service, not {our_service!r}"
            )
        return our_service
    from_environment = environ.get(SERVICE_VARIABLE, "").strip()
    if from_environment:
        return from_environment
    raise ValueError(
        "a Connect client presents the certificate of its own service, and "
        "no service was named: pass our_service='<name>' (the service this "
        f"program is registered as) or set {SERVICE_VARIABLE}"
    )


# --- the endpoint -------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class ConnectClientEndpoint:
    """
    A client endpoint for a Connect service.

    ``connect(factory)`` waits for our certificate, resolves the service,
    and tries its instances in random order (TCP, then mutual TLS with our
    certificate, the server's identity checked in the handshake) until one
    is verified, the instances run out or ``timeout`` passes.  It fires
    with the application's protocol, connected to the TLS transport (so
    :func:`connect_native.tls.peer_identity` works on it), or fails with a
    :class:`ConnectError`: :class:`NoCertificate`, :class:`ResolutionFailed`,
    :class:`NoHealthyInstances`, :class:`IdentityMismatch`,
    :class:`HandshakeTimeout`, :class:`ConnectTimeout` or
    :class:`AllInstancesFailed`.  Cancelling it stops everything.

    :param reactor: connects (``IReactorTCP``) and keeps time.
    :param resolver: finds the instances (:class:`~connect_native.resolve.IResolver`).
    :param bundle_source: our own service's certificates; its identity is
        what the server sees.
    :param timeout: seconds for the whole of ``connect()``.
    :param attempt_timeout: seconds one instance may take (TCP and TLS)
        before the next is tried; the last instance may use all the time
        left.
    :param alpn_protocols: ALPN protocols to offer, most preferred first.
    :param rng: picks the order of the instances (tests pass a seeded
        :class:`random.Random`).
    :param failure_memory: seconds during which an instance that failed an
        attempt is tried only after the others.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: IResolver,
        bundle_source: IBundleSource,
        *,
        timeout: float = 10.0,
        attempt_timeout: float = 3.0,
        alpn_protocols: Sequence[bytes] = (),
        rng: random.Random | None = None,
        failure_memory: float = 30.0,
    ) -> None:
        if not IResolver.providedBy(resolver):
            raise TypeError(
                f"resolver must provide IResolver, not {type(resolver).__name__}"
            )
        if not IBundleSource.providedBy(bundle_source):
            raise TypeError(
                "bundle_source must provide IBundleSource, not "
                f"{type(bundle_source).__name__}"
            )
        self._reactor: IReactorTime = reactor
        self.resolver = resolver
        self._source = bundle_source
        self.timeout = positive_seconds("timeout", timeout)
        self.attempt_timeout = positive_seconds("attempt_timeout", attempt_timeout)
        self.alpn_protocols = tuple(alpn_protocols)
        self._rng = rng if rng is not None else random.SystemRandom()
        self._creators: dict[ExpectedIdentity, ClientConnectionCreator] = {}
        self._creators_bundle: Bundle | None = None
        # What close() lets go of: the resolver and certificates it took.
        self._owned: list[Any] = []
        self.failure_memory = positive_seconds("failure_memory", failure_memory)
        self._failures: dict[Instance, float] = {}

    @property
    def target(self) -> str:
        description = getattr(self.resolver, "description", None)
        return str(description) if description else repr(self.resolver)

    def __repr__(self) -> str:
        return f"<ConnectClientEndpoint to {self.target}>"

    @classmethod
    def for_service(
        cls,
        reactor: Any,
        service: str,
        *,
        our_service: str | None = None,
        consul: ConsulClient | None = None,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        registry: CertManagerRegistry | None = None,
        **options: Any,
    ) -> ConnectClientEndpoint:
        """
        An endpoint to ``service``'s healthy instances
        (:class:`~connect_native.resolve.ConsulResolver`), presenting the
        certificate of ``our_service`` (else ``$CONNECT_NATIVE_SERVICE``) from
        the process's shared certificate manager.  :meth:`close` lets go of
        both when the endpoint is no longer needed.

        :param consul: the agent's client; by default one configured from
            the ``CONSUL_*`` environment variables.
        :param options: the constructor's keyword arguments.
        :raises ValueError: when our own service is not named.
        """
        ours = our_service_name(our_service)
        shared = shared_services.get(
            reactor, ours, consul=consul, cert_managers=registry
        )
        return cls._of_shared(
            shared,
            service,
            datacenter=datacenter,
            namespace=namespace,
            partition=partition,
            **options,
        )

    @classmethod
    def _of_shared(
        cls,
        shared: SharedService,
        target: str,
        *,
        datacenter: str | None = None,
        namespace: str | None = None,
        partition: str | None = None,
        **options: Any,
    ) -> ConnectClientEndpoint:
        # The one way an endpoint is made for a service's shared state: here
        # for for_service, and for ConnectService.client_endpoint above.
        resolver = ConsulResolver(
            shared.consul,
            target,
            datacenter=datacenter,
            namespace=namespace,
            partition=partition,
            reactor=shared.reactor,
        )
        source = shared.held_identity()
        endpoint = cls(shared.reactor, resolver, source, **options)
        endpoint._owned = [resolver, source]
        return endpoint

    def close(self) -> None:
        """
        Let go of what :meth:`for_service` took: the shared resolver watch and
        certificate manager (each stops when nothing else holds it).  A later
        ``connect()`` takes them again.
        """
        for part in self._owned:
            part.close()

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return _Dial(self, protocolFactory).start()

    def _failed_lately(self, instance: Instance) -> bool:
        failed_at = self._failures.get(instance)
        return (
            failed_at is not None
            and self._reactor.seconds() < failed_at + self.failure_memory
        )

    def _remember_failure(self, instance: Instance) -> None:
        now = self._reactor.seconds()
        # Keep the memory small: drop what is past remembering.
        for old in [
            i for i, t in self._failures.items() if now >= t + self.failure_memory
        ]:
            del self._failures[old]
        self._failures[instance] = now

    def _forget_failure(self, instance: Instance) -> None:
        self._failures.pop(instance, None)

    def _creator(
        self, bundle: Bundle | None, expected: ExpectedIdentity
    ) -> ClientConnectionCreator:
        """
        The connection creator for ``expected`` with ``bundle``: one per
        (Bundle, expected identity), since each owns an OpenSSL context.
        """
        if bundle is None:  # pragma: no cover (attempts start with a bundle)
            raise RuntimeError("no certificate")
        if bundle is not self._creators_bundle:
            self._creators = {}
            self._creators_bundle = bundle
        creator = self._creators.get(expected)
        if creator is None:
            creator = ClientConnectionCreator(
                bundle,
                expected.in_trust_domain(bundle.identity.trust_domain),
                alpn_protocols=self.alpn_protocols,
                any_trusted_trust_domain=expected.trust_domain is None,
            )
            self._creators[expected] = creator
        return creator

    def _tcp_endpoint(self, instance: Instance, budget: float) -> IStreamClientEndpoint:
        seconds = max(1, math.ceil(budget))
        reactor: Any = self._reactor
        if isIPAddress(instance.address):
            return TCP4ClientEndpoint(
                reactor, instance.address, instance.port, timeout=seconds
            )
        if isIPv6Address(instance.address):
            make_tcp6: Any = TCP6ClientEndpoint
            return make_tcp6(  # type: ignore[no-any-return]
                reactor, instance.address, instance.port, timeout=seconds
            )
        return HostnameEndpoint(
            reactor, instance.address, instance.port, timeout=seconds
        )
