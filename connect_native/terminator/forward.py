"""
Byte forwarding between two connections, for the terminator: an accepted
connection (the *front*) is joined to a connection the forwarder dials (the
*back*), and bytes are copied both ways unchanged.

- **Backpressure**: each transport is registered as the other's streaming
  producer, so a side that cannot write fast enough pauses reading on the
  other; nothing is buffered beyond the transports' own write buffers and
  the bytes that arrive while the back connection is being dialled (the
  front is paused once :data:`PAUSE_PENDING_BYTES` are held, so that is at
  most that and one read).
- **Half-close**: an end of stream from one side closes only the write
  direction towards the other side, and the opposite direction keeps
  flowing until it ends too.  On a plaintext TCP connection that is
  ``loseWriteConnection()`` (TCP FIN) and ``IHalfCloseableProtocol`` on the
  way in.  On a TLS connection it is ``close_notify`` (TLS 1.3 closes one
  direction with it, RFC 8446 section 6.1): ``loseConnection()`` (or
  ``loseWriteConnection()``) sends it and keeps reading until the peer
  answers with its own, and a ``close_notify`` *received* is
  ``readConnectionLost()``, both with the terminator's TLS transport and
  with Twisted's (connect_native's ``HalfCloseTLS``).  So a client that
  writes its request and shuts its write side gets the whole reply, through
  an upstream and through the public listener alike (see
  ``docs/terminator.rst``).
- **No Nagle**: every connection the forwarder touches (accepted,
  dialled, and the TCP connection under a TLS one) gets ``TCP_NODELAY``,
  as nginx's stream module does: a forwarder's small answer must not wait
  for the peer's delayed acknowledgement of what went before it (up to
  40 ms on Linux, e.g. behind TLS 1.3's session tickets).
- **Bounds**: the dial has a deadline, and a pair of connections with no
  bytes moving either way for ``idle_timeout`` seconds is aborted.
  :class:`ConnectionTracker` bounds how many accepted connections are open
  at once and drains them on shutdown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from connect_native import _logging
from connect_native._checks import positive_seconds, whole_number
from connect_native._deferreds import Waiters, bounded
from connect_native._refusals import RefusalLog
from connect_native.terminator._tls import TLSServerProtocol, close_now, write_now

__all__ = [
    "BUFFER_SIZE",
    "MAX_PENDING_BYTES",
    "PAUSE_PENDING_BYTES",
    "ConnectionTracker",
    "Dial",
    "ForwardingFactory",
    "TrackedEndpoint",
    "set_buffer_size",
    "set_no_delay",
]

log = Logger(observer=_logging.observer)

#: Bytes a front connection may send before its back connection is up.  The
#: front is paused once :data:`PAUSE_PENDING_BYTES` are held, so only what
#: came with the same read arrives after that; more is refused.
MAX_PENDING_BYTES = 1024 * 1024

#: Bytes held from the front while the back connection is dialled before the
#: front is paused.  A client's first request (a few bytes, the usual case)
#: does not pause it: pausing and resuming cost two ``epoll_ctl`` system
#: calls per connection (run 30 in ``benchmarks/RUNS.rst``).
PAUSE_PENDING_BYTES = 64 * 1024

#: Dials the back connection: given the factory of the back protocol, fires
#: with the connected protocol (an endpoint's ``connect``).
Dial = Callable[[IProtocolFactory], "Deferred[Any]"]


# --- TCP_NODELAY ---------------------------------------------------------------

# How many transports deep a TCP connection may sit under wrappers (TLS over
# the tracker's wrapper over TCP is three).
_MAX_WRAPPING = 8


def _tcp_transport(transport: object) -> Any:
    """
    The innermost transport providing ``ITCPTransport`` in the chain
    ``transport``, ``transport.transport``, ... (a wrapper such as TLS
    declares the interfaces of what it wraps; the socket's owner is the
    last), or ``None`` if none does (a UNIX socket, a test's transport).
    """
    found: Any = None
    for _ in range(_MAX_WRAPPING):
        if transport is None:
            break
        if ITCPTransport.providedBy(transport):
            found = transport
        transport = getattr(transport, "transport", None)
    return found


def set_no_delay(transport: object) -> bool:
    """
    Turn off Nagle's algorithm (``TCP_NODELAY``) on the TCP connection under
    ``transport``, looking through wrappers (TLS, protocol wrappers).

    :returns: whether a TCP connection was found.  Anything else (a UNIX
        socket, a connection already closed) is left as it is.
    """
    return _no_delay(_tcp_transport(transport))


def _no_delay(tcp: Any) -> bool:
    if tcp is None:
        return False
    try:
        tcp.setTcpNoDelay(True)
    except (OSError, AttributeError):
        # Closed in the meantime (Twisted deletes a lost connection's
        # socket): nothing left to delay.
        return False
    return True


#: What the forwarder reads at once from each TCP connection, and how much
#: its write buffer holds before it pauses the other side: four times
#: Twisted's 64 KiB (see :class:`ForwardingFactory`).
BUFFER_SIZE = 256 * 1024


def set_buffer_size(transport: object, size: int) -> bool:
    """
    Have the TCP connection under ``transport`` (looking through wrappers, as
    :func:`set_no_delay`) read up to ``size`` bytes at a time, and hold up to
    ``size`` bytes in its write buffer before it pauses its producer:
    Twisted's ``FileDescriptor.bufferSize``, 64 KiB by default.

    :returns: whether a TCP connection was found.
    """
    return _buffer_size(_tcp_transport(transport), size)


def _buffer_size(tcp: Any, size: int) -> bool:
    if tcp is None or not hasattr(tcp, "bufferSize"):
        return False
    tcp.bufferSize = size
    return True


def _tune(transport: object, size: int) -> None:
    """
    :func:`set_no_delay` and :func:`set_buffer_size`, with one lookup.
    connect_native's TLS transport turned Nagle off when it accepted the
    connection (for the handshake): no second system call for it.
    """
    tcp = _tcp_transport(transport)
    if not isinstance(transport, TLSServerProtocol):
        _no_delay(tcp)
    _buffer_size(tcp, size)


# --- how many connections, and draining them ---------------------------------


class ConnectionTracker:
    """
    The accepted connections of a process (all listeners that share it),
    bounded by ``max_connections``, and drained on shutdown.

    A Connect connection counts against ``max_connections`` once its
    authorization gate lets it through; until then (its TLS handshake and its
    authorization) it counts against ``max_unauthorized``, so that clients
    that never complete a handshake cannot take the places of authorized
    ones.  The endpoint's own handshake budget
    (``ConnectServerEndpoint(max_handshakes=...)``) decides which waiting
    handshakes go first; this is the hard bound on memory behind it.

    :param clock: times the drain's deadline.
    :param max_connections: authorized (or plain, ungated) connections open
        at once; one more is refused (closed at once, before any TLS
        handshake).
    :param max_unauthorized: connections in their handshake or being
        authorized at once; one more is refused.  By default as many as
        ``max_connections``.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_connections: int,
        max_unauthorized: int | None = None,
    ) -> None:
        self.clock = clock
        self.max_connections = whole_number("max_connections", max_connections, 1)
        self.max_unauthorized = whole_number(
            "max_unauthorized",
            self.max_connections if max_unauthorized is None else max_unauthorized,
            1,
        )
        self.unauthorized: set[Any] = set()
        self.open: set[_Tracked] = set()
        self.draining = False
        self._drained: Waiters[None] = Waiters()
        self._drain_deadline: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self.open)

    def refusal(self) -> str | None:
        """Why a new connection would be refused now, or ``None``."""
        refused = self.refusal_and_reason()
        return None if refused is None else refused[0]

    def refusal_and_reason(self) -> tuple[str, str] | None:
        """
        Why a new connection would be refused now, and the
        ``connections_total`` reason it counts under
        (:data:`connect_native.metrics.REFUSAL_REASONS`); or ``None``.
        """
        if self.draining:
            return "the terminator is shutting down", "shutting_down"
        counted = len(self.open) - len(self.unauthorized)
        if counted >= self.max_connections:
            return (
                f"{counted} connections are open, the maximum (--max-connections)",
                "too_many_connections",
            )
        if len(self.unauthorized) >= self.max_unauthorized:
            return (
                f"{len(self.unauthorized)} connections are in their TLS handshake "
                "or being authorized, the most held "
                "(--max-handshakes plus --max-connections)",
                "too_many_connections",
            )
        return None

    def _add(self, connection: _Tracked) -> None:
        self.open.add(connection)

    def _authorizing(self, connection: Any) -> None:
        if connection in self.open:
            self.unauthorized.add(connection)

    def _authorized(self, connection: Any) -> None:
        self.unauthorized.discard(connection)

    def _remove(self, connection: _Tracked) -> None:
        self.open.discard(connection)
        self.unauthorized.discard(connection)
        if not self.open and self._drained:
            self._drained.fire(None)

    def hurry(self) -> int:
        """
        End a drain now (a second SIGTERM): abort the connections still
        open at once instead of at the drain's deadline.  Returns how many
        were open.
        """
        timer = self._drain_deadline
        if timer is None or not timer.active():
            return 0
        timer.reset(0)
        return len(self.open)

    def drain(self, timeout: float) -> Deferred[int]:
        """
        Refuse new connections from now on, wait for the open ones to close
        (at most ``timeout`` seconds), then abort the rest.  Fires with how
        many were aborted.
        """
        self.draining = True
        if not self.open:
            return succeed(0)
        log.info(
            "draining {count} open connections (at most {timeout:g}s)",
            count=len(self.open),
            timeout=timeout,
        )
        waiter = self._drained.wait()
        aborted: list[int] = [0]

        def deadline() -> None:
            remaining = list(self.open)
            aborted[0] = len(remaining)
            log.warn(
                "{count} connections still open after {timeout:g}s: aborting them",
                count=len(remaining),
                timeout=timeout,
            )
            for connection in remaining:
                connection.abort()
            # Aborted connections report their loss on a later turn of the
            # reactor; the deadline is the end of the wait either way.
            self.open.clear()
            self.unauthorized.clear()
            self._drained.fire(None)

        timer = self._drain_deadline = self.clock.callLater(timeout, deadline)

        def done(_: object) -> int:
            if timer.active():
                timer.cancel()
            return aborted[0]

        return waiter.addCallback(done)


class _Tracked(ProtocolWrapper):
    """
    Counts one accepted connection for its tracker while it is open.
    """

    factory: _TrackingFactory

    def connectionMade(self) -> None:
        self.factory.tracker._add(self)
        # From the accept on, so that no TLS handshake flight waits either.
        set_no_delay(self.transport)
        if IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            # ProtocolWrapper declares only its transport's interfaces: without
            # this, TCP would end the whole connection at the client's FIN,
            # and a half-closed client would never get its reply.
            alsoProvides(self, IHalfCloseableProtocol)
        super().connectionMade()  # type: ignore[no-untyped-call]

    def readConnectionLost(self) -> None:
        self.wrappedProtocol.readConnectionLost()  # type: ignore[attr-defined]

    def writeConnectionLost(self) -> None:
        self.wrappedProtocol.writeConnectionLost()  # type: ignore[attr-defined]

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connection_authorizing(self) -> None:
        """The authorization gate took it: a handshake until authorized."""
        self.factory.tracker._authorizing(self)

    def connection_authorized(self) -> None:
        """The gate let it through: it counts against the maximum."""
        self.factory.tracker._authorized(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.tracker._remove(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class _TrackingFactory(WrappingFactory):
    protocol = _Tracked
    noisy = False

    def __init__(
        self,
        wrapped: IProtocolFactory,
        tracker: ConnectionTracker,
        label: str,
        metrics: Any = None,
    ) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.tracker = tracker
        self.label = label
        self.metrics = metrics
        self.refusals = RefusalLog(tracker.clock, label)

    def doStop(self) -> None:
        self.refusals.flush()
        super().doStop()  # type: ignore[no-untyped-call]

    def registerProtocol(self, p: Any) -> None:
        pass  # the tracker counts; WrappingFactory's dict would hold them twice

    def unregisterProtocol(self, p: Any) -> None:
        pass

    def buildProtocol(  # type: ignore[override]
        self, addr: IAddress
    ) -> _Tracked | TLSServerProtocol | None:
        refusal = self.tracker.refusal_and_reason()
        if refusal is not None:
            refused, reason = refusal
            if self.metrics is not None:
                self.metrics.refused(reason)
            if not self.refusals.allow("connections refused at the limit", addr):
                return None
            log.warn(
                "{label}: refused a connection from {address}: {reason}",
                label=self.label,
                address=str(addr),
                reason=refused,
                refused=True,
            )
            return None
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        if isinstance(wrapped, TLSServerProtocol):
            # It reports its own lifetime (and turns Nagle off): no wrapper
            # in between.
            wrapped.track(self.tracker)
            return wrapped
        return _Tracked(self, wrapped)  # type: ignore[arg-type]


@implementer(IStreamServerEndpoint)
class TrackedEndpoint:
    """
    A server endpoint whose accepted connections count against ``tracker``:
    over its maximum, or while it drains, a new connection is closed as soon
    as it is accepted, and the refusal is logged.  With ``metrics`` (a
    :class:`~connect_native.metrics.ServiceMetrics`) each refusal is counted
    in ``connect_native_connections_total`` (reason ``too_many_connections``
    or ``shutting_down``).
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        tracker: ConnectionTracker,
        label: str,
        metrics: Any = None,
    ) -> None:
        self._wrapped = wrapped
        self._tracker = tracker
        self._label = label
        self._metrics = metrics

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._wrapped.listen(
            _TrackingFactory(protocolFactory, self._tracker, self._label, self._metrics)
        )


# --- forwarding --------------------------------------------------------------


@implementer(IPushProducer)
class _Valve:
    """
    One transport as the other's producer: pause and resume reach it, but
    ``stopProducing`` (which a transport calls on its producer when it is
    lost) does not, since the forwarder closes each side in its own way.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


def _is_tls(transport: object) -> bool:
    return isinstance(transport, TLSMemoryBIOProtocol | TLSServerProtocol)


def _close_write(transport: Any) -> None:
    """
    End the byte stream towards ``transport``'s peer and keep reading from
    it: ``close_notify`` on TLS, a FIN on plain TCP.
    """
    if _is_tls(transport):
        # Sends close_notify and waits for the peer's, delivering what the
        # peer still sends meanwhile (on Twisted's transport too: a
        # loseWriteConnection of a TLSMemoryBIOProtocol that is not
        # connect_native's would be a FIN under TLS).
        transport.loseConnection()
    elif hasattr(transport, "loseWriteConnection"):
        transport.loseWriteConnection()
    else:
        transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class _Back(Protocol):
    """
    The dialled connection's protocol: it reports everything to its front.
    """

    def __init__(self, front: _Front) -> None:
        self.front = front

    def connectionMade(self) -> None:
        self.front._back_made(self)

    def dataReceived(self, data: bytes) -> None:
        self.front._from_back(data)

    def readConnectionLost(self) -> None:
        self.front._back_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.front._back_lost(reason)


class _BackFactory(Factory):
    noisy = False

    def __init__(self, front: _Front) -> None:
        self.front = front

    def buildProtocol(self, addr: IAddress) -> _Back:  # type: ignore[override]
        return _Back(self.front)


@implementer(IHalfCloseableProtocol)
class _Front(Protocol):
    """
    The accepted connection's protocol, and the owner of its pair: it dials
    the back connection, joins the two, and closes each side as the other
    ends.
    """

    factory: ForwardingFactory

    def __init__(self, factory: ForwardingFactory, address: IAddress | None) -> None:
        self.factory = factory
        self.address = address
        self.back: Any = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._front_eof = False
        self._back_eof_seen = False
        self._front_gone = False
        self._back_gone = False
        self._aborted = False
        #: The front was paused while the back is dialled.
        self._paused = False
        self._dialing: Deferred[Any] | None = None
        self._idle: IDelayedCall | None = None
        self._last = 0.0
        # The transports a producer is registered on (TLS waits for its
        # producer to go before it sends close_notify).
        self._producing: set[int] = set()
        #: Counts the bytes each way (``ByteCounts``), or ``None``.
        self._counts = factory.byte_counts

    def _unregister(self, transport: Any) -> None:
        if id(transport) in self._producing:
            self._producing.discard(id(transport))
            transport.unregisterProducer()

    def _close_write(self, transport: Any) -> None:
        self._unregister(transport)
        _close_write(transport)

    def _close(self, transport: Any) -> None:
        self._unregister(transport)
        close_now(transport)

    # -- the front connection -------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        transport: Any = self.transport
        _tune(transport, factory.buffer_size)
        self._last = factory.clock.seconds()
        self._idle = factory.clock.callLater(factory.idle_timeout, self._check_idle)
        try:
            dialing: Deferred[Any] = factory.dial(_BackFactory(self))
        except Exception:
            dialing = fail()
        timeout = factory.connect_timeout
        bounded(
            dialing,
            timeout,
            factory.clock,
            lambda: DeferredTimeoutError(timeout, "Deferred"),
        )
        self._dialing = dialing
        dialing.addCallbacks(self._dialled, self._dial_failed)

    def dataReceived(self, data: bytes) -> None:
        if self._aborted:
            # Bytes the transport had read before the abort took effect.
            return
        self._last = self.factory.clock.seconds()
        counts = self._counts
        if counts is not None:
            counts.received += len(data)
        back = self.back
        if back is not None:
            write_now(back, data)
            return
        self._pending_size += len(data)
        if self._pending_size > MAX_PENDING_BYTES:
            log.warn(
                "{label}: aborted the connection from {address}: it sent more "
                "than {limit} bytes before {target} was reached",
                label=self.factory.label,
                address=str(self.address),
                target=self.factory.target,
                limit=MAX_PENDING_BYTES,
            )
            self.abort()
            return
        self._pending.append(data)
        if self._pending_size >= PAUSE_PENDING_BYTES and not self._paused:
            # Nothing more is read from the front until the back can take it.
            self._paused = True
            transport: Any = self.transport
            transport.pauseProducing()

    def readConnectionLost(self) -> None:
        self._front_eof = True
        if self.back is not None:
            self._front_to_back_ended()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._front_gone = True
        self._pending = []
        dialing, self._dialing = self._dialing, None
        if dialing is not None:
            dialing.cancel()
        back = self.back
        if back is not None and not self._back_gone:
            if isinstance(reason.value, ConnectionDone):
                self._close(back)
            else:
                back.abortConnection()
        self._maybe_finished()

    # -- the back connection --------------------------------------------------

    def _back_made(self, back_protocol: _Back) -> None:
        back: Any = back_protocol.transport
        self.back = back
        _tune(back, self.factory.buffer_size)
        if self._front_gone:
            # A dial that ignored its cancellation: nobody will read this
            # connection and there is nothing to flush, and a graceful TLS
            # close could wait for the peer's close_notify with no idle
            # timer left to bound it.
            back.abortConnection()
            return
        front: Any = self.transport
        front.registerProducer(_Valve(back), True)
        back.registerProducer(_Valve(front), True)
        self._producing = {id(front), id(back)}
        pending, self._pending = self._pending, []
        for data in pending:
            back.write(data)
        if self._front_eof:
            self._front_to_back_ended()
        elif self._paused:
            self._paused = False
            front.resumeProducing()

    def _dialled(self, result: object) -> None:
        self._dialing = None

    def _dial_failed(self, failure: Failure) -> None:
        self._dialing = None
        if self._front_gone or self._aborted or self.back is not None:
            # Our own cancellation (the front went away, or we aborted it
            # and said why): not the backend's failure.
            return
        if isinstance(failure.value, CancelledError) or _is_timeout(failure):
            why = f"no connection within {self.factory.connect_timeout:g}s"
        else:
            why = failure.getErrorMessage()
        log.warn(
            "{label}: could not reach {target} for the connection from "
            "{address}: {error}",
            label=self.factory.label,
            target=self.factory.target,
            address=str(self.address),
            error=why,
            upstream_failure=True,
        )
        self.abort()

    def _from_back(self, data: bytes) -> None:
        self._last = self.factory.clock.seconds()
        counts = self._counts
        if counts is not None:
            counts.sent += len(data)
        # A plain TCP front (an upstream listener) sends a small answer at
        # once; a TLS front's transport does the same itself.
        write_now(self.transport, data)

    def _back_eof(self) -> None:
        self._back_eof_seen = True
        if self._front_gone:
            return
        if self._front_eof:
            self._close(self.back)
            self._close(self.transport)
        else:
            self._close_write(self.transport)

    def _back_lost(self, reason: Failure) -> None:
        self._back_gone = True
        if not self._front_gone:
            if isinstance(reason.value, ConnectionDone):
                self._close(self.transport)
            else:
                log.warn(
                    "{label}: the connection to {target} for {address} failed: {error}",
                    label=self.factory.label,
                    target=self.factory.target,
                    address=str(self.address),
                    error=reason.getErrorMessage(),
                    upstream_failure=True,
                )
                transport: Any = self.transport
                transport.abortConnection()
        self._maybe_finished()

    def _front_to_back_ended(self) -> None:
        if self._back_eof_seen:
            self._close(self.back)
            self._close(self.transport)
        else:
            self._close_write(self.back)

    # -- bounds and the end ---------------------------------------------------

    def _check_idle(self) -> None:
        self._idle = None
        clock = self.factory.clock
        remaining = self._last + self.factory.idle_timeout - clock.seconds()
        if remaining > 0:
            self._idle = clock.callLater(remaining, self._check_idle)
            return
        log.info(
            "{label}: closed the connection from {address}: no bytes either "
            "way for {timeout:g}s",
            label=self.factory.label,
            address=str(self.address),
            timeout=self.factory.idle_timeout,
        )
        self.abort()

    def abort(self) -> None:
        """Abort both connections (and the dial, if it is still going)."""
        self._aborted = True
        dialing, self._dialing = self._dialing, None
        if dialing is not None:
            dialing.cancel()
        if self.back is not None and not self._back_gone:
            self.back.abortConnection()
        if not self._front_gone:
            transport: Any = self.transport
            transport.abortConnection()

    def _maybe_finished(self) -> None:
        if self._front_gone and (self.back is None or self._back_gone):
            if self._idle is not None and self._idle.active():
                self._idle.cancel()
            self._idle = None


def _is_timeout(failure: Failure) -> bool:
    from twisted.internet.defer import TimeoutError as DeferredTimeout
    from twisted.internet.error import TimeoutError as ConnectTimeout

    return isinstance(failure.value, DeferredTimeout | ConnectTimeout)


class ForwardingFactory(Factory):
    """
    Builds, for each accepted connection, a forwarder to what ``dial``
    connects to.

    :param clock: times the dial's deadline and the idle timeout.
    :param dial: connects the back connection, e.g. an endpoint's
        ``connect``.
    :param target: what ``dial`` reaches, for the logs.
    :param connect_timeout: seconds the dial may take; then the accepted
        connection is aborted.
    :param idle_timeout: seconds without a byte in either direction after
        which both connections are aborted.
    :param label: names this forwarder in the logs.
    :param buffer_size: bytes read at once from each TCP connection, and the
        bytes a connection's write buffer may hold before the other side is
        paused (so a slow reader holds up to this much of the other side's
        bytes, per direction).  256 KiB by default, four times Twisted's own:
        fewer, larger reads made one bulk connection about 1.2x faster
        (``docs/performance.rst``).
    :param byte_counts: where to count the bytes forwarded (an object with
        integer ``received`` and ``sent``, such as
        :class:`connect_native.metrics.ByteCounts`): ``received`` from the
        accepted connections, ``sent`` to them; ``None``: not counted.
    """

    noisy = False

    def __init__(
        self,
        clock: IReactorTime,
        dial: Dial,
        target: str,
        *,
        connect_timeout: float,
        idle_timeout: float,
        label: str,
        buffer_size: int = BUFFER_SIZE,
        byte_counts: Any = None,
    ) -> None:
        self.byte_counts = byte_counts
        self.buffer_size = whole_number("buffer_size", buffer_size, 4096, "bytes")
        self.clock = clock
        self.dial = dial
        self.target = target
        self.connect_timeout = positive_seconds("connect_timeout", connect_timeout)
        self.idle_timeout = positive_seconds("idle_timeout", idle_timeout)
        self.label = label

    def buildProtocol(self, addr: IAddress) -> IProtocol:  # type: ignore[override]
        return _Front(self, addr)
