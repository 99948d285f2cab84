"""
Serving over Connect: :class:`ConnectServerEndpoint`, a server endpoint that
wraps any other (TCP, UNIX, ...) in Connect's mutual TLS and lets a connection
reach the application only once an authorizer has allowed its peer; and
:func:`peer_identity`, which tells the application who that peer is.

A connection goes through three steps:

1. TLS, with the server connection creator of the Bundle current when the
   connection was accepted (:mod:`connect_native.tls`): the client's chain and
   SPIFFE identity are verified in the handshake, and the authorizer's
   ``decide_now`` may refuse it there with a TLS alert.
2. The authorization gate: after the handshake it pauses the transport, keeps
   whatever bytes already arrived, and waits for ``authorizer.authorize``.
   The handshake and the authorization are each bounded in time.
3. Allowed: the gate steps aside.  The application's protocol becomes the TLS
   protocol's wrapped protocol and gets the TLS transport itself, so
   twisted.web sees ``isSecure()``, the peer certificate and the negotiated
   ALPN protocol.  Denied, failed or too slow: the connection is aborted and
   the application's factory never builds a protocol for it.

Every decision is logged with :mod:`twisted.logger` fields ``peer``,
``target``, ``allowed``, ``decision``, ``reason``, ``source`` and ``elapsed``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    maybeDeferred,
)
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native import _logging
from connect_native._checks import positive_seconds, whole_number
from connect_native._deferreds import bounded
from connect_native._preface import (
    H2,
    HTTP11,
    BufferingSniffedTLS,
    PrefaceSniffer,
    SniffedTLS,
)
from connect_native._refusals import RefusalLog, address_text, host_of, peer_address
from connect_native._shared import CertManagerRegistry, SharedService, shared_services
from connect_native.authorize import (
    L7_AT_L4,
    Decision,
    IAuthorizer,
    Peer,
    decides_each_request,
)
from connect_native.certs import (
    Bundle,
    IBundleSource,
)
from connect_native.errors import (
    CertificateNotReady,
    NotAConnectConnection,
)
from connect_native.identity import ServiceIdentity
from connect_native.recheck import OpenConnections
from connect_native.tls import (
    HalfCloseBufferingTLS,
    HalfCloseTLS,
    PeerRefused,
    ServerConnectionCreator,
    refusal_of,
    verified_peer,
)
from connect_native.tls import peer_identity as _peer_identity_or_none

if TYPE_CHECKING:
    from connect_native.consul.client import ConsulClient
    from connect_native.metrics import ServiceMetrics

__all__ = [
    "CertificateNotReady",
    "ConnectServerEndpoint",
    "NotAConnectConnection",
    "alpn_protocols_for",
    "peer_identity",
]

log = Logger(observer=_logging.observer)

#: How many application bytes a client may send before it is authorized.
#: An authorization still to come pauses the transport as the handshake
#: completes (one answered at once needs no holding), so only what arrived
#: with the last handshake flight is held; more is a misbehaving client, and
#: is refused rather than buffered without bound.
MAX_EARLY_BYTES = 256 * 1024

#: Connections in their TLS handshake at once, per listening port, and from
#: one source address: past either, the oldest handshake that has sent
#: nothing yet (else the oldest) is dropped for the new one.
MAX_HANDSHAKES = 256
MAX_HANDSHAKES_PER_ADDRESS = 64

StopHook = Callable[[], "Deferred[Any] | None"]

#: Builds the TLS transport of one accepted connection:
#: ``make(connection_for, gate)``, where ``connection_for(protocol)`` gives the
#: connection's ``OpenSSL.SSL.Connection`` (the creator's
#: ``serverConnectionForTLS``) and ``gate`` is the protocol the transport
#: carries until the peer is authorized (it may replace it by assigning
#: ``wrappedProtocol``).  The terminator injects its own (a smaller
#: transport for a byte stream); this module knows only this signature.
TLSProtocolFactory = Callable[[Callable[[Any], SSL.Connection], IProtocol], IProtocol]


def peer_identity(connection: object) -> ServiceIdentity:
    """
    The service identity of the peer of a Connect connection, as verified in
    its TLS handshake.  (:func:`connect_native.tls.peer_identity` is the same
    lookup answering ``None`` where this raises.)

    :param connection: the TLS transport a :class:`ConnectServerEndpoint` (or
        a Connect client) gave the application, a protocol whose
        ``transport`` it is, or a twisted.web ``Request`` (its
        ``channel.transport``).

    :raises NotAConnectConnection: if no verified Connect peer is found: the
        object is not (or is no longer) a Connect TLS connection.  Treat the
        peer as unauthenticated.
    """
    identity = _peer_identity_or_none(connection)
    if identity is not None:
        return identity
    raise NotAConnectConnection(
        f"{type(connection).__name__} is not a Connect TLS connection with a "
        "verified peer: give peer_identity() the transport of a connection "
        "accepted by ConnectServerEndpoint (or made by a Connect client), a "
        "protocol connected to one, or a twisted.web Request served over one; "
        "a closed connection has no peer either"
    )


def alpn_protocols_for(factory: IProtocolFactory) -> tuple[bytes, ...]:
    """
    The ALPN protocols to offer for an application factory: a twisted.web
    ``Site`` speaks ``h2`` (when twisted.web's HTTP/2 support is installed)
    and ``http/1.1``; a factory with an ``acceptableProtocols`` attribute or
    method speaks those; any other factory gets no ALPN.
    """
    acceptable = getattr(factory, "acceptableProtocols", None)
    if acceptable is not None:
        protocols = acceptable() if callable(acceptable) else acceptable
        return tuple(protocols)
    try:
        from twisted.web.http import H2_ENABLED, HTTPFactory
    except ImportError:  # pragma: no cover (twisted.web ships with Twisted)
        return ()
    if isinstance(factory, HTTPFactory):
        return (b"h2", b"http/1.1") if H2_ENABLED else (b"http/1.1",)
    return ()


def _http_versions(factory: IProtocolFactory) -> tuple[bytes, ...] | None:
    """
    For a twisted.web ``HTTPFactory`` (a ``Site``), the HTTP versions it
    speaks: ``h2`` only with twisted.web's HTTP/2 support (the ``h2``
    package).  ``None`` for any other factory.
    """
    try:
        from twisted.web.http import H2_ENABLED, HTTPFactory
    except ImportError:  # pragma: no cover (twisted.web ships with Twisted)
        return None
    if not isinstance(factory, HTTPFactory):
        return None
    return (H2, HTTP11) if H2_ENABLED else (HTTP11,)


def _decision_text(decision: Decision) -> str:
    return "allowed" if decision.allowed else "denied"


def _log_decision(
    peer: Peer | ServiceIdentity | None,
    target: str,
    decision: Decision,
    elapsed: float,
    address: IAddress | None,
    stage: str,
    refusals: RefusalLog | None = None,
) -> None:
    if (
        not decision.allowed
        and refusals is not None
        and not refusals.allow("connections denied", address)
    ):
        return
    if isinstance(peer, Peer):
        uri, serial = peer.uri, peer.serial
    elif peer is None:
        uri, serial = "(unverified peer)", ""
    else:
        uri, serial = peer.uri, ""
    emit = log.info if decision.allowed else log.warn
    emit(
        "Connect {target}: {decision} {peer} from {address} {stage} "
        "({reason}; decided by {source} in {elapsed:.3f}s)",
        peer=uri,
        serial=serial,
        target=target,
        allowed=decision.allowed,
        decision=_decision_text(decision),
        reason=decision.reason,
        source=decision.source,
        elapsed=elapsed,
        address=address_text(address),
        stage=stage,
        # The structured fields of a connection event (--log-format json).
        service=target,
        peer_address=peer_address(address),
        peer_identity=None if peer is None else uri,
        outcome="allowed" if decision.allowed else "refused",
        duration=elapsed,
    )


class _HandshakeDenied(PeerRefused):
    """
    The authorizer's ``decide_now`` denied the peer inside the handshake;
    the gate logs the decision with the peer's address.
    """

    def __init__(self, peer: Peer, decision: Decision) -> None:
        super().__init__(f"{peer.uri} is not allowed to connect: {decision.reason}")
        self.peer = peer
        self.decision = decision


def _per_request(decision: Decision, decides_each_request: bool) -> Decision:
    """
    A connection-level denial by an L7 intention: lifted when the
    application decides each request itself, otherwise kept (fail closed).
    """
    if decides_each_request:
        return Decision(
            True,
            f"{decision.reason.removesuffix(L7_AT_L4)}; every request is "
            "decided by its permissions (protect())",
            decision.source,
        )
    return decision


def _refusal_reason(decision: Decision, peer: Peer | None) -> str:
    """The ``reason`` label of an authorizer's refusal (connect_native.metrics)."""
    if peer is None:
        return "no_identity"
    return _SOURCE_REASONS.get(decision.source, "denied")


#: Refusals that are not the authorizer's "no", by the decision's source.
_SOURCE_REASONS = {
    "error": "authorizer_error",
    "timeout": "authorizer_timeout",
    "gate": "early_bytes",
}


def _abort(tls: Any) -> None:
    tls.abortConnection()


def _aborted(tls: object) -> bool:
    """
    Whether the application aborted the connection.  Twisted records that
    only in ``TLSMemoryBIOProtocol._aborted`` (public ``disconnecting`` is
    also set by ``loseConnection``, after which the application still gets
    what was read).  Without that attribute any disconnect counts, so the
    early bytes are dropped rather than handed to an aborted connection.
    """
    aborted = getattr(tls, "_aborted", None)
    if isinstance(aborted, bool):
        return aborted
    return bool(getattr(tls, "disconnecting", True))


def _underlying(tls: Any) -> IPushProducer:
    """
    The transport under a TLS protocol: pausing it stops reading from the
    socket.
    """
    transport: IPushProducer = tls.transport
    return transport


class _Creators:
    """
    The server connection creator for each new connection: one per Bundle
    (each owns one OpenSSL context), made when the source first hands out
    that Bundle and kept while it stays current.
    """

    def __init__(
        self,
        source: IBundleSource,
        service: str,
        alpn_protocols: Sequence[bytes],
        authorizer: IAuthorizer,
        clock: IReactorTime,
        release_buffers: bool = False,
        decides_each_request: bool = False,
    ) -> None:
        self._release_buffers = release_buffers
        #: The application decides each HTTP request (it provides
        #: IDecidesEachRequest): an L7 intention's denial is lifted.
        self.decides_each_request = decides_each_request
        self._source = source
        self._service = service
        self._alpn = tuple(alpn_protocols)
        self._authorizer = authorizer
        self._clock = clock
        self._bundle: Bundle | None = None
        self._creator: ServerConnectionCreator | None = None

    def current(self, address: IAddress | None) -> ServerConnectionCreator | None:
        try:
            bundle = self._source.current()
        except Exception:
            self._refused_by_error(address, "the certificate source failed")
            return None
        if not isinstance(bundle, Bundle):
            log.warn(
                "Connect {target}: refused a connection from {address}: no usable "
                "certificate for the service right now (not issued yet, or "
                "expired and the agent cannot renew it)",
                target=self._service,
                address=str(address),
                allowed=False,
                decision="denied",
                reason="no certificate",
            )
            return None
        if bundle is self._bundle and self._creator is not None:
            return self._creator
        try:
            creator = ServerConnectionCreator(
                bundle,
                alpn_protocols=self._alpn,
                decide_peer_now=self._decide_now,
                release_buffers=self._release_buffers,
                # The gate logs each refusal with the peer's address.
                log_refusals=False,
            )
        except Exception:
            self._refused_by_error(
                address, "could not set up TLS with the current certificate"
            )
            return None
        self._bundle, self._creator = bundle, creator
        return creator

    def _refused_by_error(self, address: IAddress | None, why: str) -> None:
        # Called from an except block: log.failure logs the exception too.
        log.failure(
            "Connect {target}: refused a connection from {address}: {why}",
            target=self._service,
            address=str(address),
            why=why,
            allowed=False,
            decision="denied",
        )

    def _decide_now(self, identity: ServiceIdentity, serial: str) -> bool | None:
        """
        The authorizer's early answer, inside the verify callback: a denial
        here ends the handshake with a TLS alert (raised as a refusal that
        the gate logs, with the peer's address, when the connection ends).
        """
        peer = Peer(identity, serial)
        try:
            decision = self._authorizer.decide_now(peer, self._service)
        except Exception:
            log.failure(
                "Connect {target}: the authorizer's decide_now failed for {peer}",
                peer=peer.uri,
                target=self._service,
            )
            raise _HandshakeDenied(
                peer, Decision.deny("the authorizer's decide_now failed", "error")
            ) from None
        if decision is None:
            return None
        if not isinstance(decision, Decision):
            decision = Decision.deny(
                f"the authorizer's decide_now returned {type(decision).__name__}, "
                "not a Decision"
            )
        if not decision.allowed:
            if decision.per_request and self.decides_each_request:
                # An L7 intention, and the application decides each request:
                # the gate lifts the connection-level denial.
                return True
            raise _HandshakeDenied(peer, decision)
        # An early "allowed" still goes through the gate, which asks
        # authorize() (answered at once by an authorizer that knows) and logs.
        return True


@implementer(IOpenSSLServerConnectionCreator)
class _GateCreator:
    """
    Hands each TLS connection to the creator its gate was given when the
    connection was accepted.
    """

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> Any:
        gate = tlsProtocol.wrappedProtocol
        if not isinstance(gate, _Gate):  # pragma: no cover (only we build these)
            raise RuntimeError("a Connect TLS connection without its gate")
        return gate.creator.serverConnectionForTLS(tlsProtocol)


class _HalfCloseSniffedTLS(HalfCloseTLS, SniffedTLS):
    """Twisted's TLS transport with half-close, for a Site: HTTP by preface."""


class _HalfCloseBufferingSniffedTLS(HalfCloseBufferingTLS, BufferingSniffedTLS):
    """The same over Twisted's write-batching transport."""


class _ConnectTLSFactory(TLSMemoryBIOFactory):
    """
    A ``TLSMemoryBIOFactory`` that refuses a connection (closing the socket)
    when its gate cannot be built, e.g. for want of a certificate.  Its
    connections carry half-close (:class:`~connect_native.tls.HalfCloseTLS`).
    """

    protocol = HalfCloseBufferingTLS

    def buildProtocol(  # type: ignore[override]
        self, addr: IAddress | None
    ) -> TLSMemoryBIOProtocol | None:
        gate = self.wrappedFactory.buildProtocol(addr)
        if gate is None:
            return None
        tls = self.protocol(self, gate)
        _note_first_bytes(tls)
        return tls


def _note_first_bytes(tls: Any) -> None:
    """
    Set ``tls.heard`` when the first bytes arrive from the peer: the
    handshake budget drops a client that has sent nothing first.  The
    instance's own ``dataReceived`` does it once, then steps aside for the
    class's (no cost per read after the first).
    """
    receive = tls.dataReceived

    def first(data: bytes) -> None:
        del tls.dataReceived
        tls.heard = True
        receive(data)

    tls.heard = False
    tls.dataReceived = first


class _OwnTLSFactory(Factory):
    """
    Builds an injected TLS transport (a :data:`TLSProtocolFactory`) over
    each accepted connection, with its gate inside; refuses (closes the
    socket) when the gate cannot be built.
    """

    noisy = False

    def __init__(self, gates: _GateFactory, make: TLSProtocolFactory) -> None:
        self.wrappedFactory = gates
        self._make = make

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:  # type: ignore[override]
        gate = self.wrappedFactory.buildProtocol(addr)
        if gate is None:
            return None
        return self._make(gate.creator.serverConnectionForTLS, gate)


class _HandshakeBudget:
    """
    The connections of one listening port still in their TLS handshake:
    at most ``limit`` at once and ``per_address`` from one source address.
    A new connection over either takes the place of the oldest that has sent
    nothing yet (else of the oldest), so that clients that hold sockets open
    without a handshake cannot keep real ones out.  Past half the budget,
    new handshakes get a shorter timeout.
    """

    def __init__(
        self, limit: int, per_address: int, timeout: float, pressed_timeout: float
    ) -> None:
        self.limit = limit
        self.per_address = per_address
        self.timeout = timeout
        self.pressed_timeout = min(timeout, pressed_timeout)
        # Oldest first (dicts keep insertion order).
        self._waiting: dict[_Gate, str] = {}
        self._by_host: dict[str, dict[_Gate, None]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def admit(self, gate: _Gate) -> float:
        """Count ``gate``, making room for it; its handshake timeout."""
        host = host_of(gate.address)
        same = self._by_host.get(host)
        if same is not None and len(same) >= self.per_address:
            self._evict(same, f"{len(same)} handshakes from {host} are waiting")
        if len(self._waiting) >= self.limit:
            self._evict(self._waiting, f"{len(self._waiting)} handshakes are waiting")
        self._waiting[gate] = host
        self._by_host.setdefault(host, {})[gate] = None
        if len(self._waiting) > self.limit // 2:
            return self.pressed_timeout
        return self.timeout

    def leave(self, gate: _Gate) -> None:
        host = self._waiting.pop(gate, None)
        if host is None:
            return
        same = self._by_host.get(host)
        if same is not None:
            same.pop(gate, None)
            if not same:
                del self._by_host[host]

    def _evict(self, among: dict[_Gate, Any], why: str) -> None:
        victim = next((gate for gate in among if not gate.heard()), None)
        if victim is None:
            victim = next(iter(among))
        self.leave(victim)
        victim.evict(why)


class _GateFactory(Factory):
    """
    Builds the gate for each accepted connection.
    """

    noisy = False
    #: Where the gates put the connections they let through, to be decided
    #: again when the intentions or the roots change (``None``: kept open).
    open_connections: OpenConnections | None = None
    #: The HTTP versions a twisted.web application speaks, chosen for each
    #: connection from its first bytes (``None``: not an HTTP server, or an
    #: injected TLS transport; ALPN's answer stands).
    http_versions: tuple[bytes, ...] | None = None

    def __init__(
        self,
        app_factory: IProtocolFactory,
        creators: _Creators,
        authorizer: IAuthorizer,
        service: str,
        clock: IReactorTime,
        handshake_timeout: float,
        authorize_timeout: float,
        log_allowed: bool = True,
        max_handshakes: int = MAX_HANDSHAKES,
        max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.app_factory = app_factory
        self.metrics = metrics
        self.creators = creators
        self.authorizer = authorizer
        self.service = service
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.authorize_timeout = authorize_timeout
        self.log_allowed = log_allowed
        self.handshakes = _HandshakeBudget(
            max_handshakes,
            max_handshakes_per_address,
            handshake_timeout,
            max(1.0, handshake_timeout / 5),
        )
        self.refusals = RefusalLog(clock, f"Connect {service}")

    def doStart(self) -> None:
        self.app_factory.doStart()

    def doStop(self) -> None:
        self.refusals.flush()
        self.app_factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> _Gate | None:
        creator = self.creators.current(addr)
        if creator is None:
            return None
        return _Gate(self, creator, addr)


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class _Gate(Protocol):
    """
    The TLS protocol's wrapped protocol until the peer is authorized.

    A ``close_notify`` that arrives with the early bytes (a client that
    writes its request and closes its side at once) is held as well: the
    application gets ``readConnectionLost()`` after those bytes if it
    provides ``IHalfCloseableProtocol``, else the connection is closed after
    them, as the TLS transport would have done.

    It bounds the handshake, then asks the authorizer.  An answer the
    authorizer has at once is acted on there and then; otherwise the gate
    pauses the transport, holds the bytes that arrived meanwhile, and bounds
    the wait.  Allowed: it puts the application's protocol in its place.
    Otherwise: it aborts the connection.
    """

    transport: TLSMemoryBIOProtocol

    def __init__(
        self, factory: _GateFactory, creator: ServerConnectionCreator, addr: Any
    ) -> None:
        self.gate_factory = factory
        self.creator = creator
        self.address = addr
        self.early_bytes: list[bytes] = []
        self._early_length = 0
        self._timer: IDelayedCall | None = None
        self._pending: Deferred[Decision] | None = None
        self._timed_out = False
        self._finished = False
        self._peer: Peer | None = None
        self._handshaken = False
        self._paused = False
        self._handshake_timeout = factory.handshake_timeout
        self._started = factory.clock.seconds()
        #: The peer's close_notify came before the hand-over.
        self._early_eof = False
        # A change from here on and this connection is decided again once
        # let through: its authorization may predate it.
        opened = factory.open_connections
        self._since = None if opened is None else opened.generation

    def connectionMade(self) -> None:
        factory = self.gate_factory
        tracked = _tracked(self.transport)
        if tracked is not None:
            # Not counted against the maximum of open connections until it
            # is authorized.
            tracked.connection_authorizing()
        self._handshake_timeout = factory.handshakes.admit(self)
        self._timer = factory.clock.callLater(
            self._handshake_timeout, self._handshake_timed_out
        )

    def heard(self) -> bool:
        """
        Whether any bytes came from the peer (its ClientHello, or part): read
        already, or waiting in the socket's receive buffer (a client accepted
        in the same turn of the reactor as a crowd of others has sent its
        ClientHello, but it has not been read yet).
        """
        if getattr(self.transport, "heard", True):
            return True
        return _bytes_waiting(self.transport)

    def _refused_now(self, reason: str) -> bool:
        """Whether to log this refusal one by one (else it is counted)."""
        return self.gate_factory.refusals.allow(reason, self.address)

    def evict(self, why: str) -> None:
        """
        Too many handshakes are waiting: drop this one (the oldest that sent
        nothing, or the oldest) for a newer connection.
        """
        self._finished = True
        self._cancel_timer()
        factory = self.gate_factory
        if factory.metrics is not None:
            factory.metrics.refused("too_many_handshakes")
        if self._refused_now("handshakes dropped for newer connections"):
            log.warn(
                "Connect {target}: aborted a connection from {address} after "
                "{age:.1f}s in the TLS handshake ({sent}): {why}, the most held "
                "(max_handshakes {limit}, {per_address} per address)",
                target=factory.service,
                address=address_text(self.address),
                age=factory.clock.seconds() - self._started,
                sent="it sent something" if self.heard() else "it sent nothing",
                why=why,
                limit=factory.handshakes.limit,
                per_address=factory.handshakes.per_address,
                allowed=False,
                decision="denied",
                reason="too many handshakes",
                service=factory.service,
                peer_address=peer_address(self.address),
                outcome="refused",
            )
        _abort(self.transport)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        self._finished = True
        factory = self.gate_factory
        factory.handshakes.leave(self)
        if factory.metrics is not None:
            factory.metrics.refused("handshake_timeout")
        if self._refused_now("handshakes timed out"):
            log.warn(
                "Connect {target}: aborted a connection from {address}: the TLS "
                "handshake did not complete within {timeout:g}s",
                target=factory.service,
                address=address_text(self.address),
                timeout=self._handshake_timeout,
                allowed=False,
                decision="denied",
                reason="handshake timeout",
                service=factory.service,
                peer_address=peer_address(self.address),
                outcome="refused",
                duration=self._handshake_timeout,
            )
        _abort(self.transport)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def handshakeCompleted(self) -> None:
        self._cancel_timer()
        self._handshaken = True
        factory = self.gate_factory
        factory.handshakes.leave(self)
        if self._finished:
            return
        now = factory.clock.seconds()
        if factory.metrics is not None:
            factory.metrics.observe_handshake(now - self._started)
        self._started = now
        verified = verified_peer(self.transport)
        if verified is None:
            self._decide(
                Decision.deny("the TLS handshake verified no peer identity"), None
            )
            return
        peer = self._peer = Peer(verified.identity, verified.serial)
        try:
            pending = factory.authorizer.authorize(peer, factory.service)
        except Exception as e:
            failure = Failure(e)  # type: ignore[no-untyped-call]
            self._decide(
                Decision.deny(
                    f"the authorizer failed: {failure.getErrorMessage()}", "error"
                ),
                peer,
            )
            log.failure("the authorizer raised", failure)
            return
        if not isinstance(pending, Deferred):
            self._decide(
                Decision.deny(
                    f"the authorizer returned {type(pending).__name__}, not a Deferred",
                    "error",
                ),
                peer,
            )
            return
        self._pending = pending
        pending.addCallbacks(
            lambda decision: self._answered(decision, peer),
            lambda failure: self._failed(failure, peer),
        )
        if self._finished:
            # Answered at once (a local or remembered decision): nothing was
            # read meanwhile, so there was nothing to hold and no wait to
            # bound.
            return
        # Hold the client until it is authorized: nothing more is read from
        # the socket, so the early bytes stay bounded.
        _underlying(self.transport).pauseProducing()
        self._paused = True
        self._timer = factory.clock.callLater(
            factory.authorize_timeout, self._authorize_timed_out
        )

    def _authorize_timed_out(self) -> None:
        self._timer = None
        self._timed_out = True
        if self._pending is not None:
            self._pending.cancel()
        if not self._finished:
            # An authorizer whose Deferred ignores cancellation still denies.
            self._decide(
                Decision.deny(
                    "the authorizer did not answer within "
                    f"{self.gate_factory.authorize_timeout:g}s",
                    "timeout",
                ),
                self._peer,
            )

    def _answered(self, decision: object, peer: Peer) -> None:
        self._pending = None
        if not isinstance(decision, Decision):
            decision = Decision.deny(
                f"the authorizer answered {type(decision).__name__}, not a Decision"
            )
        self._decide(decision, peer)

    def _failed(self, failure: Failure, peer: Peer) -> None:
        self._pending = None
        if self._timed_out and isinstance(failure.value, CancelledError):
            self._decide(
                Decision.deny(
                    "the authorizer did not answer within "
                    f"{self.gate_factory.authorize_timeout:g}s",
                    "timeout",
                ),
                peer,
            )
        elif isinstance(failure.value, CancelledError) and self._finished:
            pass  # we cancelled it: the connection went away
        else:
            self._decide(
                Decision.deny(
                    f"the authorizer failed: {failure.getErrorMessage()}", "error"
                ),
                peer,
            )

    def _decide(self, decision: Decision, peer: Peer | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._cancel_timer()
        factory = self.gate_factory
        elapsed = factory.clock.seconds() - self._started
        if not decision.allowed and decision.per_request:
            decision = _per_request(decision, factory.creators.decides_each_request)
        app: IProtocol | None = None
        app_refused = False
        if decision.allowed:
            try:
                app = factory.app_factory.buildProtocol(self.address)
            except Exception:
                log.failure(
                    "Connect {target}: the application's factory failed to "
                    "build a protocol",
                    target=factory.service,
                )
                app = None
            if app is None:
                app_refused = True
                decision = Decision(
                    False,
                    f"{decision.reason}; but the application refused the "
                    "connection (its factory built no protocol)",
                    decision.source,
                )
        metrics = factory.metrics
        if metrics is not None:
            if peer is not None:
                metrics.observe_authorization(elapsed)
            if app is not None:
                metrics.allowed(self.transport)
            elif app_refused:
                metrics.refused("application")
            else:
                metrics.refused(_refusal_reason(decision, peer))
        if factory.log_allowed or not decision.allowed or app is None:
            _log_decision(
                peer,
                factory.service,
                decision,
                elapsed,
                self.address,
                "after the handshake",
                factory.refusals,
            )
        if not decision.allowed or app is None:
            self.early_bytes = []
            _abort(self.transport)
            return
        self._hand_over(app)

    def _hand_over(self, app: IProtocol) -> None:
        tls = self.transport
        tracked = _tracked(tls)
        if tracked is not None:
            tracked.connection_authorized()
        early, self.early_bytes = self.early_bytes, []
        tls.wrappedProtocol = app
        if self.gate_factory.http_versions is not None and isinstance(tls, SniffedTLS):
            # A Site: HTTP/2 or HTTP/1.1 by what the client sends, not by ALPN.
            if self.gate_factory.http_versions == (H2, HTTP11):
                tls.wrappedProtocol = PrefaceSniffer(tls, app)
            else:
                tls.spoken_protocol = HTTP11
        # Resume first: from here the application owns the transport's
        # pause state (twisted.web pauses it while it handles a request, and
        # a resume after the early bytes would undo that).  Resuming reads
        # nothing synchronously, so the order of bytes is unchanged.
        if self._paused:
            self._paused = False
            _underlying(tls).resumeProducing()
        app.makeConnection(tls)
        opened = self.gate_factory.open_connections
        if opened is not None and self._peer is not None:
            opened.add(self._peer, tls, self.address, self._since)
        if IHandshakeListener.providedBy(app):
            app.handshakeCompleted()
        for data in early:
            # As TLSMemoryBIOProtocol itself does: after loseConnection the
            # application still gets what was read, after abortConnection not.
            if _aborted(tls):
                break
            # The application, or the preface sniffer in front of it.
            tls.wrappedProtocol.dataReceived(data)
        if self._early_eof and not _aborted(tls):
            reader = tls.wrappedProtocol
            if IHalfCloseableProtocol.providedBy(reader):
                reader.readConnectionLost()
            else:
                tls.loseConnection()  # type: ignore[no-untyped-call]

    def readConnectionLost(self) -> None:
        self._early_eof = True

    def writeConnectionLost(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self._early_length += len(data)
        if self._early_length > MAX_EARLY_BYTES:
            self._decide(
                Decision.deny(
                    f"the client sent more than {MAX_EARLY_BYTES} bytes before "
                    "it was authorized",
                    "gate",
                ),
                self._peer,
            )
            return
        self.early_bytes.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self.gate_factory.handshakes.leave(self)
        self.early_bytes = []
        if not self._finished:
            self._finished = True
            refusal = None if self._handshaken else refusal_of(self.transport)
            if refusal is not None:
                self._log_refusal(refusal)
            elif not self._handshaken:
                self._log_failed_handshake(reason)
            elif self._peer is not None:
                log.info(
                    "Connect {target}: {peer} from {address} went away before it "
                    "was authorized",
                    target=self.gate_factory.service,
                    peer=self._peer.uri,
                    address=str(self.address),
                )
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _log_refusal(self, refusal: PeerRefused) -> None:
        """
        Log what the handshake refused (the verify callback only recorded
        it): a certificate, or the authorizer's early denial.
        """
        factory = self.gate_factory
        if factory.metrics is not None:
            factory.metrics.refused(
                "denied" if isinstance(refusal, _HandshakeDenied) else "certificate"
            )
        if isinstance(refusal, _HandshakeDenied):
            _log_decision(
                refusal.peer,
                factory.service,
                refusal.decision,
                0.0,
                self.address,
                "in the TLS handshake",
                factory.refusals,
            )
            return
        if self._refused_now("certificates refused"):
            log.warn(
                "Connect {target}: refused the peer's certificate from {address} "
                "({certificate}, depth {depth}): {reason}",
                target=factory.service,
                address=address_text(self.address),
                certificate=refusal.certificate or "?",
                depth="?" if refusal.depth is None else refusal.depth,
                reason=refusal.reason,
                allowed=False,
                decision="denied",
                service=factory.service,
                peer_address=peer_address(self.address),
                outcome="refused",
            )

    def _log_failed_handshake(self, reason: Failure) -> None:
        """
        Say why a connection ended before its TLS handshake completed.  The
        verify callback logs the certificates it refuses; this also covers
        what OpenSSL refuses before asking it (no client certificate, an old
        protocol version, garbage instead of a ClientHello).
        """
        target = self.gate_factory.service
        if isinstance(reason.value, SSL.Error):
            metrics = self.gate_factory.metrics
            if metrics is not None:
                metrics.refused("handshake_failed")
            if not self._refused_now("handshakes failed"):
                return
            log.warn(
                "Connect {target}: refused a connection from {address}: the TLS "
                "handshake failed: {reason}",
                target=target,
                address=str(self.address),
                reason=_ssl_error_text(reason.value),
                allowed=False,
                decision="denied",
                service=target,
                peer_address=peer_address(self.address),
                outcome="refused",
            )
        elif self._refused_now("connections closed before the handshake"):
            log.info(
                "Connect {target}: {address} closed the connection before "
                "completing the TLS handshake",
                target=target,
                address=str(self.address),
            )


def _bytes_waiting(tls: object) -> bool:
    """
    Whether the socket under ``tls`` has bytes to read (a peek, without
    reading them).  ``False`` when there is no socket to ask.
    """
    layer: Any = getattr(tls, "transport", None)
    for _ in range(3):
        if layer is None:
            return False
        get_handle = getattr(layer, "getHandle", None)
        handle = get_handle() if callable(get_handle) else None
        if isinstance(handle, socket.socket):
            try:
                return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except OSError:
                return False  # nothing waiting (or the socket is gone)
        layer = getattr(layer, "transport", None)
    return False


def _tracked(tls: object) -> Any:
    """
    What counts this connection for a connection tracker (the terminator's
    ``--max-connections``): the TLS transport itself, or a wrapper under it;
    ``None`` when nothing does.
    """
    layer: Any = tls
    for _ in range(3):
        if layer is None:
            return None
        if callable(getattr(layer, "connection_authorized", None)):
            return layer
        layer = getattr(layer, "transport", None)
    return None


def _ssl_error_text(error: SSL.Error) -> str:
    """
    OpenSSL's reasons, e.g. ``peer did not return a certificate``, from the
    ``[(library, function, reason), ...]`` list pyOpenSSL raises.
    """
    reasons = [
        str(entry[2])
        for entry in (error.args[0] if error.args else [])
        if isinstance(entry, tuple) and len(entry) == 3 and entry[2]
    ]
    return "; ".join(reasons) or str(error)


@implementer(IListeningPort)
class _ConnectPort:
    """
    The wrapped endpoint's port; stopping it also runs the endpoint's stop
    hook (releasing the service's certificate manager).
    """

    def __init__(
        self,
        port: IListeningPort,
        factory: _ConnectTLSFactory,
        stop_hook: StopHook | None,
        unfollow: Callable[[], None] | None = None,
    ) -> None:
        self.port = port
        self.factory = factory
        self._stop_hook = stop_hook
        self._unfollow = unfollow
        self._stopped = False

    def startListening(self) -> None:
        self.port.startListening()

    def stopListening(self) -> Deferred[Any]:
        stopping: Deferred[Any] = maybeDeferred(self.port.stopListening)
        unfollow, self._unfollow = self._unfollow, None
        if unfollow is not None:
            unfollow()
        hook = self._stop_hook
        if self._stopped or hook is None:
            return stopping
        self._stopped = True

        def run_hook(result: object) -> Deferred[object]:
            released: Deferred[Any] = maybeDeferred(hook)
            released.addErrback(
                lambda failure: log.failure(
                    "Connect: the endpoint's stop hook failed", failure
                )
            )
            # The port's own outcome (stopped, or why not) is the answer.
            return released.addCallback(lambda _: result)

        return stopping.addBoth(run_hook)

    def getHost(self) -> IAddress:
        return self.port.getHost()


@implementer(IStreamServerEndpoint)
class ConnectServerEndpoint:
    """
    A server endpoint for a Connect service: mutual TLS with the service's
    certificates over ``wrapped_endpoint``, and an authorization gate before
    the application.

    :param reactor: the clock for every bound and for TLS's write
        scheduling (``TLSMemoryBIOFactory(clock=...)``).
    :param wrapped_endpoint: where to listen, e.g. ``TCP4ServerEndpoint``.
    :param bundle_source: the service's certificates; asked once per new
        connection.
    :param authorizer: decides, per connection, whether its verified peer
        may reach ``service``.
    :param service: the service being served: the authorization target.
    :param ready_timeout: how long ``listen()`` waits for the first
        certificate before failing.
    :param handshake_timeout: how long a client has to complete the TLS
        handshake before it is disconnected.
    :param authorize_timeout: how long the authorizer has to decide before
        the connection is denied.
    :param alpn_protocols: the ALPN protocols to offer; by default, taken
        from the application's factory (:func:`alpn_protocols_for`).
    :param release_buffers: have OpenSSL free an idle connection's record
        buffers (``SSL_MODE_RELEASE_BUFFERS``): less memory per idle
        connection, at a CPU cost too small to measure here (see
        ``docs/performance.rst``).
    :param buffer_small_writes: keep the default of Twisted's TLS transport,
        which holds writes under 64 kB until the next turn of the reactor to
        make fewer, larger TLS records out of many small writes (what
        twisted.web wants).  ``False`` encrypts each write and hands it to
        the connection at once: for a protocol that writes whole reads, such
        as the terminator's forwarder, that saves a delayed call and a copy
        per write (see ``docs/performance.rst``).
    :param tls_protocol: the TLS transport to carry each connection, as a
        :data:`TLSProtocolFactory`; by default Twisted's
        ``TLSMemoryBIOProtocol``, which is what twisted.web, HTTP/2 and any
        application expect.  ``twistd connect-native`` injects its own, a
        smaller transport for a byte stream (see ``docs/server.rst``).  With
        an injected transport, ``buffer_small_writes`` does not apply: that
        transport decides when its writes go out.
    :param log_allowed: log each allowed connection (info: peer, address,
        reason, who decided, how long it took).  Refusals are always logged
        (warn).  ``False`` for a busy service whose access log is kept
        elsewhere: the line is about 4 % of the terminator's CPU per new
        connection (``docs/performance.rst``).
    :param max_handshakes: connections of one port in their TLS handshake
        at once; one more takes the place of the oldest that has sent
        nothing yet (else of the oldest), and past half of it new handshakes
        get a fifth of ``handshake_timeout`` (at least 1 s).  Clients holding
        sockets open without a handshake cannot keep real ones out.
    :param max_handshakes_per_address: the same, from one source address.
    :param keep_open_on_deny: keep open the connections already let
        through when the intentions or the trusted roots change.  By
        default each is decided again (``authorize()``, within
        ``authorize_timeout``; after a roots change its certificate must
        also chain to a current root) and closed if now refused, with a
        logged reason; this needs an authorizer that provides
        :class:`~connect_native.authorize.INotifiesChanges` (both of ours
        do) and, for roots, a source with ``subscribe_bundles`` (a
        :class:`~connect_native.certs.CertManager`).
    :param start_hook: called at the start of every ``listen()`` (e.g. to
        start or take a reference on the service's certificate manager).
    :param stop_hook: called once when a port from ``listen()`` stops, or
        when ``listen()`` fails after ``start_hook`` ran; may return a
        Deferred.
    :param metrics: where to count the connections, their handshakes and
        their authorizations (:class:`~connect_native.metrics.ServiceMetrics`);
        an endpoint made by a :class:`~connect_native.service.ConnectService`
        counts in the service's.  ``None``: not counted.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        wrapped_endpoint: IStreamServerEndpoint,
        bundle_source: IBundleSource,
        authorizer: IAuthorizer,
        service: str,
        *,
        ready_timeout: float = 60.0,
        handshake_timeout: float = 10.0,
        authorize_timeout: float = 10.0,
        alpn_protocols: Sequence[bytes] | None = None,
        release_buffers: bool = False,
        buffer_small_writes: bool = True,
        log_allowed: bool = True,
        tls_protocol: TLSProtocolFactory | None = None,
        max_handshakes: int = MAX_HANDSHAKES,
        max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS,
        keep_open_on_deny: bool = False,
        start_hook: Callable[[], object] | None = None,
        stop_hook: StopHook | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        if not isinstance(service, str) or not service:
            raise ValueError(
                f"service must be the name of the service being served, not {service!r}"
            )
        ready_timeout = positive_seconds("ready_timeout", ready_timeout)
        handshake_timeout = positive_seconds("handshake_timeout", handshake_timeout)
        authorize_timeout = positive_seconds("authorize_timeout", authorize_timeout)
        self._reactor = reactor
        self._wrapped = wrapped_endpoint
        self._source = bundle_source
        self._authorizer = authorizer
        self.service = service
        self._ready_timeout = float(ready_timeout)
        self._handshake_timeout = float(handshake_timeout)
        self._authorize_timeout = float(authorize_timeout)
        self._alpn = None if alpn_protocols is None else tuple(alpn_protocols)
        self._start_hook = start_hook
        self._stop_hook = stop_hook
        self._release_buffers = bool(release_buffers)
        self._buffer_small_writes = bool(buffer_small_writes)
        self._log_allowed = bool(log_allowed)
        self._keep_open_on_deny = bool(keep_open_on_deny)
        self._tls_protocol = tls_protocol
        self._own_tls = tls_protocol is not None
        whole_number("max_handshakes", max_handshakes, 1)
        whole_number("max_handshakes_per_address", max_handshakes_per_address, 1)
        self._max_handshakes = max_handshakes
        self._max_handshakes_per_address = max_handshakes_per_address
        self._metrics = metrics

    @classmethod
    def for_service(
        cls,
        reactor: IReactorTime,
        wrapped_endpoint: IStreamServerEndpoint,
        client: ConsulClient,
        service: str,
        *,
        authorizer: IAuthorizer | None = None,
        registry: CertManagerRegistry | None = None,
        **options: Any,
    ) -> ConnectServerEndpoint:
        """
        An endpoint for ``service`` made from what the process shares for
        (``client``, ``service``), as the
        :class:`~connect_native.service.ConnectService` that
        :data:`~connect_native.service.connect_services` gives for them
        does: its certificates come from the service's shared
        :class:`~connect_native.certs.CertManager`, and each ``listen()``
        holds the service (starting it if it is the first) until its port
        stops (the last one stops it).

        :param client: the Consul agent's client
            (:class:`~connect_native.consul.client.ConsulClient`).
        :param authorizer: by default the service's own (an
            :class:`~connect_native.authorize.AgentAuthorizer` on ``client``).
        :param registry: where managers are shared; the process's
            :data:`connect_native.service.cert_managers` by default.
        :param options: the constructor's keyword arguments.
        """
        shared = shared_services.get(
            reactor, service, consul=client, cert_managers=registry
        )
        return cls._of_shared(
            shared, wrapped_endpoint, authorizer=authorizer, **options
        )

    @classmethod
    def _of_shared(
        cls,
        shared: SharedService,
        wrapped_endpoint: IStreamServerEndpoint,
        *,
        authorizer: IAuthorizer | None = None,
        **options: Any,
    ) -> ConnectServerEndpoint:
        # The one way an endpoint is made for a service's shared state: here
        # for for_service, and for ConnectService.server_endpoint above.
        return cls(
            shared.reactor,
            wrapped_endpoint,
            shared.identity,
            shared.authorizer if authorizer is None else authorizer,
            shared.service,
            start_hook=shared.hold,
            stop_hook=shared.let_go,
            **{"metrics": shared.metrics, **options},
        )

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """
        Wait (at most ``ready_timeout``) for the service's first certificate,
        then listen on the wrapped endpoint.

        Fires with the port; stopping it runs the stop hook.  Fails with
        :class:`CertificateNotReady` saying what is missing if no certificate
        came in time, with the source's error if it gave up first (e.g.
        :class:`~connect_native.errors.LeafPermissionDenied`), or with the
        wrapped endpoint's error.
        """
        try:
            if self._start_hook is not None:
                self._start_hook()
        except Exception:
            return fail()
        ready: Deferred[Any] = self._wait_until_ready()
        ready.addCallback(lambda bundle: self._listen(protocolFactory))

        def release(failure: Failure) -> Deferred[Any] | Failure:
            if self._stop_hook is None:
                return failure
            return maybeDeferred(self._stop_hook).addBoth(lambda _: failure)

        ready.addErrback(release)
        return ready

    def _wait_until_ready(self) -> Deferred[Bundle]:
        try:
            waiting = self._source.when_ready()
        except Exception:
            return fail()
        return bounded(
            waiting,
            self._ready_timeout,
            self._reactor,
            lambda: CertificateNotReady(self._not_ready_message()),
        )

    def _not_ready_message(self) -> str:
        # A CertManager says where it is stuck in ``reason`` (e.g. "reading
        # the leaf certificate for 'web' from the agent failed: connection
        # refused"); any other source may offer one too.
        detail = getattr(self._source, "reason", None)
        if not isinstance(detail, str) or not detail:
            detail = "the certificate source has no leaf certificate and CA roots yet"
        return (
            f"no certificate for service {self.service!r} after "
            f"{self._ready_timeout:g}s: {detail}. Check that the Consul agent "
            "is reachable, that Connect is enabled on it, and that the token "
            f"may write service {self.service!r} (its leaf certificate needs "
            "service:write)"
        )

    def _listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        alpn = self._alpn
        if alpn is None:
            alpn = alpn_protocols_for(protocolFactory)
        each_request = decides_each_request(protocolFactory)
        creators = _Creators(
            self._source,
            self.service,
            alpn,
            self._authorizer,
            self._reactor,
            self._release_buffers,
            each_request,
        )
        gates = _GateFactory(
            protocolFactory,
            creators,
            self._authorizer,
            self.service,
            self._reactor,
            self._handshake_timeout,
            self._authorize_timeout,
            self._log_allowed,
            self._max_handshakes,
            self._max_handshakes_per_address,
            self._metrics,
        )
        opened = OpenConnections(
            self._reactor,
            self._authorizer,
            self.service,
            self._authorize_timeout,
            decides_each_request=each_request,
        )
        if not self._keep_open_on_deny:
            gates.open_connections = opened
        tls_factory: Any
        if self._tls_protocol is not None:
            tls_factory = _OwnTLSFactory(gates, self._tls_protocol)
        else:
            tls_factory = _ConnectTLSFactory(
                _GateCreator(),
                isClient=False,
                wrappedFactory=gates,
                clock=self._reactor,
            )
        if not self._buffer_small_writes and not self._own_tls:
            # The factory's default protocol is BufferingTLSTransport, which
            # aggregates small writes; its public base class writes through.
            tls_factory.protocol = HalfCloseTLS
        versions = _http_versions(protocolFactory)
        if versions is not None and not self._own_tls:
            # Twisted's HTTP server picks HTTP/2 or HTTP/1.1 from the
            # transport's negotiatedProtocol: these transports report what
            # the client's first bytes say (connect_native._preface).
            gates.http_versions = versions
            tls_factory.protocol = (
                _HalfCloseBufferingSniffedTLS
                if self._buffer_small_writes
                else _HalfCloseSniffedTLS
            )
        listening: Deferred[IListeningPort] = self._wrapped.listen(tls_factory)

        def wrap(port: IListeningPort) -> IListeningPort:
            log.info(
                "Connect {target}: listening on {address}",
                target=self.service,
                address=str(port.getHost()),
            )
            # Followed even when kept open: the agent authorizer's watch
            # that drops its remembered decisions runs while subscribed.
            unfollow = opened.follow(self._source)
            return _ConnectPort(port, tls_factory, self._stop_hook, unfollow)

        return listening.addCallback(wrap)
