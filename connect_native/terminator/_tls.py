"""
A TLS server transport of our own, over a memory BIO, for connections whose
application is known to need only a byte stream (the terminator's forwarder).

Twisted's ``TLSMemoryBIOProtocol`` is general: it accepts writes before the
handshake, wraps producers in membranes, declares every interface of the
transport it wraps on each new connection (``directlyProvides``, 15 calls a
connection), encrypts each write in 16 KiB slices (each slice a copy) and
hands the TCP transport one write per record.  :class:`TLSServerProtocol`
does what a server that hands the connection over only after the handshake
needs, with the same observable behaviour towards the application and the
peer (see the docs' "TLS transport" section for what each difference
measured):

- the OpenSSL connection comes from a connection creator
  (``serverConnectionForTLS``), exactly as with Twisted, so the verify
  callback, the leaf memory and ALPN are the same code;
- a write is encrypted record by record from one view of the caller's bytes
  and handed to TCP as one write;
- a producer is registered on the TCP transport itself (nothing is buffered
  in between once the handshake is done);
- ``loseConnection`` (and ``loseWriteConnection``) sends ``close_notify``
  and keeps reading until the peer's (or the connection's end);
  ``abortConnection`` drops whatever is still unread; a peer that ends the
  TCP connection without ``close_notify`` is reported as
  ``ConnectionLost``, as Twisted does (a truncation is not a clean end);
- half-close (TLS 1.3, RFC 8446 section 6.1): the peer's ``close_notify``
  is ``readConnectionLost()`` for an application that provides
  ``IHalfCloseableProtocol`` and has not closed its own side, which may go
  on writing until its ``loseConnection()`` answers with ``close_notify``;
  a TCP FIN after the peer's ``close_notify`` leaves the write side open
  too (as with connect_native's ``HalfCloseTLS`` for Twisted's transport);
- a TLS failure (a handshake refused by the verify callback, a corrupt
  record) sends OpenSSL's alert, closes the connection and is the reason
  the application's ``connectionLost`` receives;
- a small write goes to the socket within the call when nothing is queued
  (:func:`write_now`).

The transport uses the public APIs of Twisted and pyOpenSSL, and two private
paths, each checked before use with the public way kept as the fallback (tests
run both): :func:`write_now` reads three private attributes of Twisted's
``FileDescriptor`` to know that its queue is empty, and :func:`_memory_bios`
finds the ``Connection``'s two memory BIOs (pyOpenSSL's ``_into_ssl`` and
``_from_ssl``) so that the transport can ask how many bytes each holds
(``BIO_get_mem_data``, from the cryptography bindings pyOpenSSL uses).  With
that, neither the read loop nor the flush after it ends in a
``WantReadError`` raised and caught when it can be known that nothing is
left: two of them per request otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IHandshakeListener,
    INegotiated,
    IProducer,
    IProtocol,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["WRITE_NOW_MAX", "TLSServerProtocol", "close_now", "write_now"]

# What one SSL_read may return is one record: at most 16 KiB of plaintext.
# pyOpenSSL allocates the size asked for on every call, so ask for no more.
_RECV_SIZE = 2**14 + 1024

# Room for the framing OpenSSL adds to each record (TLS 1.3: 5 bytes of
# header, 1 of content type, a 16-byte tag; TLS 1.2 with GCM: 29 bytes).
_RECORD_PLAINTEXT = 2**14
_RECORD_OVERHEAD = 64

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _mem_length: Callable[[Any, Any], int] | None = _lib.BIO_get_mem_data
    _NULL: Any = _ffi.NULL
    _BIO_TYPE: Any = _ffi.typeof("BIO *")
except (ImportError, AttributeError):  # another pyOpenSSL: the public way
    _mem_length = None
    _NULL = _BIO_TYPE = None


def _memory_bios(tls: SSL.Connection) -> tuple[Any, Any] | None:
    """
    The memory BIOs of ``tls`` (the one OpenSSL reads the peer's bytes from,
    the one it writes its own into), or ``None`` when this pyOpenSSL does not
    keep them where expected: then the transport reads and flushes until
    OpenSSL says ``WantReadError``, as it did before.
    """
    if _mem_length is None:
        return None
    into = getattr(tls, "_into_ssl", None)
    out = getattr(tls, "_from_ssl", None)
    try:
        if _ffi.typeof(into) is not _BIO_TYPE or _ffi.typeof(out) is not _BIO_TYPE:
            return None
    except TypeError:  # not a cffi pointer
        return None
    return into, out


# What a flush after handshake traffic reads at once (a handshake flight with
# a certificate chain is a few KiB).
_FLUSH_SIZE = 2**15


def _idle(tcp: Any) -> bool:
    """
    Whether ``tcp`` (a Twisted TCP or UNIX socket transport) is connected,
    writing, and has nothing queued: then a write may go to the socket at
    once without overtaking anything.  Twisted keeps the queue in
    ``dataBuffer`` and ``_tempDataLen``, and a half-close in
    ``_writeDisconnecting`` / ``_writeDisconnected``; anything without them
    (another transport, another Twisted) is never idle, so its writes take
    the ordinary path.

    Only a ``FileDescriptor`` itself qualifies: a wrapper (Twisted's TLS
    transport, a ``ProtocolWrapper``) hands unknown attribute lookups to the
    transport it wraps, and writing to that directly would skip the wrapper
    (for TLS: send plaintext).
    """
    if not isinstance(tcp, FileDescriptor):
        return False
    try:
        return bool(
            tcp.connected
            and not tcp.disconnecting
            and not tcp.dataBuffer
            and not tcp._tempDataLen
            and not tcp._writeDisconnecting
            and not tcp._writeDisconnected
        )
    except AttributeError:
        return False


# write_now sends at once only writes up to this size: one TLS record and
# its framing.  A bulk transfer's large writes take the ordinary path, which
# keeps the socket registered for writing while its queue drains (sending
# them at once measured 18 % more CPU per GiB over 8 connections, run 26:
# the queue empties and fills, and each time the reactor's registration
# changes).
WRITE_NOW_MAX = 2**15


def write_now(tcp: Any, data: bytes) -> None:
    """
    Write ``data`` to the transport ``tcp``, sending what the socket takes
    within this call when nothing is queued ahead of it and it is small
    (:data:`WRITE_NOW_MAX`).

    Twisted's ``write()`` queues the bytes and asks the reactor to watch the
    socket for writing (an ``epoll_ctl``), sends them on the next turn of
    the reactor and stops watching (another ``epoll_ctl``).  A forwarder
    answering one small message at a time pays that on every message; here
    the socket's ``writeSomeData`` (``FileDescriptor``'s method for this)
    sends at once, and only what the socket did not take is queued the
    ordinary way, behind nothing.  An error is left to the ordinary path too:
    the queued write meets it and Twisted closes the connection as usual.
    """
    if 0 < len(data) <= WRITE_NOW_MAX and _idle(tcp):
        sent = tcp.writeSomeData(data)
        if type(sent) is int and sent > 0:
            if sent >= len(data):
                return
            data = data[sent:]
    tcp.write(data)


def close_now(tcp: Any) -> None:
    """
    ``tcp.loseConnection()``, without the wait for a writable socket when
    nothing is queued, no producer is registered and the write side is open.

    Twisted's ``loseConnection`` stops reading and starts writing (an
    ``epoll_ctl``, two on Twisted's own epoll reactor), and closes when the
    reactor reports the socket writable and its ``doWrite`` finds the queue
    empty.  With an empty queue the socket is closed on the reactor's next
    turn instead, the same way (``connectionLost`` with ``ConnectionDone``,
    an orderly close), and the only registration change is the stop of
    reading, which ``--reactor cn-epoll`` skips for a socket closed before
    its next poll.  A write or a producer that arrives meanwhile puts the
    close back on Twisted's path: queued bytes are sent first.
    """
    if (
        _idle(tcp)
        and getattr(tcp, "producer", True) is None
        and not getattr(tcp, "_aborting", True)
    ):
        tcp.stopReading()
        tcp.stopWriting()
        tcp.disconnecting = True
        tcp.reactor.callLater(0, _close_queued_nothing, tcp)
        return
    tcp.loseConnection()


def _close_queued_nothing(tcp: Any) -> None:
    if tcp.disconnected or tcp._aborting:
        return  # lost meanwhile, or an abort ends it
    if tcp.dataBuffer or tcp._tempDataLen or tcp.producer is not None:
        # Written to (or produced for) since: Twisted's doWrite sends what is
        # queued, then closes, as after its own loseConnection.
        tcp.startWriting()
        return
    tcp.connectionLost(Failure(CONNECTION_DONE))  # type: ignore[no-untyped-call]


class _Tracker(TypingProtocol):
    def _add(self, connection: Any) -> None: ...

    def _remove(self, connection: Any) -> None: ...

    def _authorizing(self, connection: Any) -> None: ...

    def _authorized(self, connection: Any) -> None: ...


@implementer(
    ISSLTransport, INegotiated, IConsumer, IPushProducer, IHalfCloseableProtocol
)
class TLSServerProtocol(Protocol):
    """
    The server side of TLS on one accepted connection: the TCP transport's
    protocol, and the transport of ``wrappedProtocol``.

    :param connection_for: called once, with this protocol, for the
        connection's ``OpenSSL.SSL.Connection`` (a connection creator's
        ``serverConnectionForTLS``).
    :param wrappedProtocol: the protocol that gets the plaintext.  It is
        connected at once (``makeConnection``) and told when the handshake
        completes (``handshakeCompleted``, if it is an
        ``IHandshakeListener``); it may be replaced by assigning
        ``wrappedProtocol`` (the authorization gate hands the connection to
        the application that way).
    """

    disconnecting = False
    _aborted = False
    _handshake_done = False
    # The peer's close_notify arrived, or TLS failed: nothing more to read.
    _lost_tls = False
    #: The peer's close_notify arrived and was delivered to the application
    #: as ``readConnectionLost``: we may still write.
    _peer_eof = False
    _reason: Failure | None = None
    _producer: IProducer | None = None
    _tracker: _Tracker | None = None
    #: Some bytes came from the peer: a client that never sends any is the
    #: first to go when too many handshakes are waiting.
    heard = False

    def __init__(
        self,
        connection_for: Callable[[TLSServerProtocol], SSL.Connection],
        wrappedProtocol: IProtocol,
    ) -> None:
        self._connection_for = connection_for
        self.wrappedProtocol = wrappedProtocol
        self._tls: SSL.Connection | None = None
        # The connection's memory BIOs, when their lengths can be asked.
        self._bios: tuple[Any, Any] | None = None
        self._early_writes: list[bytes] = []

    # -- for the connection tracker ---------------------------------------

    def track(self, tracker: _Tracker) -> None:
        """
        Count this connection in ``tracker`` (``ConnectionTracker``) from
        its accept to its end, without a wrapping protocol.
        """
        self._tracker = tracker

    def abort(self) -> None:
        """What a tracker's drain deadline calls: ``abortConnection``."""
        self.abortConnection()

    def connection_authorizing(self) -> None:
        """
        The authorization gate took the connection: until it is authorized
        it counts as a handshake, not against the tracker's maximum.
        """
        if self._tracker is not None:
            self._tracker._authorizing(self)

    def connection_authorized(self) -> None:
        """The gate let the connection through: it counts from now on."""
        if self._tracker is not None:
            self._tracker._authorized(self)

    # -- IProtocol, towards the TCP transport -------------------------------

    def connectionMade(self) -> None:
        tls = self._tls = self._connection_for(self)
        tls.set_accept_state()
        self._bios = _memory_bios(tls)
        # No set_app_data (Twisted's creators set it): nothing on the server
        # side reads it, and it would tie the connection and this protocol
        # in a cycle for the garbage collector.
        try:
            # Each handshake flight, and each forwarded write, goes out at
            # once rather than waiting for the peer's ACK (Nagle).
            self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            pass  # not TCP (a UNIX socket), or already closed
        if self._tracker is not None:
            self._tracker._add(self)
        self.wrappedProtocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        tls = self._tls
        if tls is None or self._lost_tls or self._peer_eof:
            return
        tls.bio_write(data)
        if not self._handshake_done:
            self.heard = True
            if self._aborted:
                return
            try:
                tls.do_handshake()
            except SSL.WantReadError:
                self._flush(_FLUSH_SIZE)
                return
            except SSL.Error:
                self._tls_failed(Failure())  # type: ignore[no-untyped-call]
                return
            self._handshake_done = True
            self._flush(_FLUSH_SIZE)
            wrapped = self.wrappedProtocol
            if IHandshakeListener.providedBy(wrapped):
                wrapped.handshakeCompleted()
            if self._early_writes:
                early, self._early_writes = self._early_writes, []
                for each in early:
                    self._encrypt(each)
                if self.disconnecting and self._producer is None:
                    self._shutdown()
        self._read()

    def _read(self) -> None:
        tls = self._tls
        bios = self._bios
        while not self._lost_tls and not self._peer_eof and tls is not None:
            try:
                data = tls.recv(_RECV_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                if self._half_closed():
                    break
                self._peer_closed()
                return
            except SSL.Error:
                self._tls_failed(Failure())  # type: ignore[no-untyped-call]
                return
            if not self._aborted:
                self.wrappedProtocol.dataReceived(data)
            # Nothing decrypted left in OpenSSL and no byte of the peer's
            # unread: another recv could only raise WantReadError.  (OpenSSL
            # reads a record's header, then exactly its length: without
            # read-ahead, which nothing here turns on, what it has not
            # handed out stays in the BIO.)
            if (
                bios is not None
                and tls is not None
                and not tls.pending()
                and not _mem_length(bios[0], _NULL)  # type: ignore[misc]
            ):
                break
        # A read can make OpenSSL answer (a key update, an alert).
        self._flush(_FLUSH_SIZE)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._reason is not None:
            reason = self._reason
        elif self._peer_eof:
            reason = Failure(  # type: ignore[no-untyped-call]
                ConnectionDone("the peer sent a TLS close_notify")
            )
        elif not self._lost_tls:
            # The TCP connection ended without the peer's close_notify: a
            # truncation, not a clean end (as Twisted reports it).
            reason = Failure(  # type: ignore[no-untyped-call]
                ConnectionLost("the connection ended without a TLS close_notify")
            )
        self._lost_tls = True
        self._reason = None
        self.connected = False
        self.disconnecting = True
        try:
            self.wrappedProtocol.connectionLost(reason)
        finally:
            if self._tracker is not None:
                self._tracker._remove(self)
            self._early_writes = []
            # As Twisted's: the peer's identity goes with the connection.
            self._tls = None
            self._bios = None

    # -- what ends TLS -----------------------------------------------------

    def _flush(self, size: int) -> None:
        """Hand what OpenSSL wrote to the TCP transport, as one write."""
        tls = self._tls
        if tls is None:
            return
        bios = self._bios
        if bios is not None:
            # As many bytes as the BIO holds, in one read, or none at all.
            waiting = _mem_length(bios[1], _NULL)  # type: ignore[misc]
            if waiting > 0:
                write_now(self.transport, tls.bio_read(waiting))
            return
        while True:
            try:
                out = tls.bio_read(size)
            except SSL.WantReadError:
                return
            write_now(self.transport, out)
            if len(out) < size:
                return

    def _tls_failed(self, failure: Failure) -> None:
        if self._reason is None:
            self._reason = failure
        self._lost_tls = True
        # OpenSSL's alert, then the end of the TCP connection.
        self._flush(_FLUSH_SIZE)
        close_now(self.transport)

    def _half_closed(self) -> bool:
        """
        The peer's close_notify as the end of its direction only, when the
        application can take that (and has not closed its own side).
        """
        wrapped = self.wrappedProtocol
        if (
            self.disconnecting
            or self._aborted
            or not IHalfCloseableProtocol.providedBy(wrapped)
        ):
            return False
        self._peer_eof = True
        wrapped.readConnectionLost()
        return True

    # -- IHalfCloseableProtocol, towards the TCP transport --------------------

    def readConnectionLost(self) -> None:
        """
        The TCP connection's FIN.  After the peer's close_notify it is the
        end of a half-closed direction: our side may still write (or is
        already closing, after what it had to send).  Before, it is a
        truncation, and the connection ends (as a TCP transport ends a
        protocol that cannot half-close).
        """
        if not (self._peer_eof or self._lost_tls):
            self.transport.abortConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def _peer_closed(self) -> None:
        self._lost_tls = True
        self._reason = Failure(  # type: ignore[no-untyped-call]
            ConnectionDone("the peer sent a TLS close_notify")
        )
        self._shutdown_now()
        close_now(self.transport)

    def _shutdown_now(self) -> bool:
        tls = self._tls
        if tls is None:
            return False
        try:
            done = bool(tls.shutdown())
        except SSL.Error:
            done = False
        self._flush(_FLUSH_SIZE)
        return done

    def _shutdown(self) -> None:
        if self._shutdown_now():
            close_now(self.transport)

    # -- ITransport, towards the application ----------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting and self._producer is None:
            return
        if self._lost_tls:
            return
        if not self._handshake_done:
            self._early_writes.append(bytes(data))
            return
        self._encrypt(data)

    def _encrypt(self, data: bytes) -> None:
        tls = self._tls
        if tls is None or not data:
            return
        view = memoryview(data)
        total = len(view)
        sent = 0
        try:
            while sent < total:
                sent += tls.send(view[sent:])
        except SSL.Error:
            # WantReadError included: renegotiation is refused, so a write
            # that waits for the peer is a broken connection, not a pause.
            self._tls_failed(Failure())  # type: ignore[no-untyped-call]
            return
        records = total // _RECORD_PLAINTEXT + 1
        self._flush(total + records * _RECORD_OVERHEAD)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.disconnecting or not self.connected:
            return
        if not self._handshake_done and not self._early_writes:
            self.abortConnection()
            return
        self.disconnecting = True
        if self._handshake_done and self._producer is None and not self._lost_tls:
            self._shutdown()

    def loseWriteConnection(self) -> None:
        """A TLS stream ends its writing side with ``close_notify``."""
        self.loseConnection()

    def abortConnection(self) -> None:
        self._aborted = True
        self.disconnecting = True
        self._early_writes = []
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def getPeer(self) -> Any:
        return self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> Any:
        return self.transport.getHost()  # type: ignore[union-attr]

    def getTcpNoDelay(self) -> bool:
        return bool(self.transport.getTcpNoDelay())  # type: ignore[union-attr]

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)  # type: ignore[union-attr]

    def getTcpKeepAlive(self) -> bool:
        return bool(self.transport.getTcpKeepAlive())  # type: ignore[union-attr]

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)  # type: ignore[union-attr]

    # -- ISSLTransport, INegotiated -----------------------------------------------

    def getHandle(self) -> SSL.Connection | None:
        """The ``OpenSSL.SSL.Connection`` (as Twisted's TLS transport)."""
        return self._tls

    def getPeerCertificate(self) -> Any:
        tls = self._tls
        return None if tls is None else tls.get_peer_certificate()

    @property
    def negotiatedProtocol(self) -> bytes | None:
        tls = self._tls
        if tls is None:
            return None
        name: bytes | None = tls.get_alpn_proto_negotiated()
        return name or None

    # -- IConsumer, IPushProducer: straight to the TCP transport --------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._lost_tls:
            producer.stopProducing()
            return
        self.transport.registerProducer(producer, streaming)  # type: ignore[union-attr]
        self._producer = producer

    def unregisterProducer(self) -> None:
        if self._producer is None:
            return
        self._producer = None
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        if self.disconnecting and not self._lost_tls and self._handshake_done:
            self._shutdown()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]
