"""
HTTP/2 or HTTP/1.1 from the client's first bytes, whatever ALPN said.

A Connect peer's ALPN offer does not say what it will speak: Consul's
built-in proxy (``consul connect proxy``) offers ``h2`` only on every
connection it makes, and tunnels whatever its own client sends, HTTP/1.1
as often as not, while Go's ``connect.Service.HTTPClient`` offers the same
``h2`` and speaks it.  So a twisted.web ``Site`` behind a
:class:`~connect_native.server.ConnectServerEndpoint` decides by what the
client sends: HTTP/2's connection preface (RFC 9113, section 3.4) means
HTTP/2, anything else HTTP/1.1.  (No HTTP/1.1 request starts with the
preface: ``PRI`` is a method reserved for it.)

Twisted's HTTP server picks its channel, when the first bytes arrive, from
the transport's ``negotiatedProtocol``.  The TLS transports here report the
protocol found from the first bytes there (:attr:`SniffedTLS.spoken_protocol`)
and ALPN's answer otherwise; :class:`PrefaceSniffer` holds the first bytes
until it knows, then steps aside.
"""

from __future__ import annotations

from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

#: What a client speaking HTTP/2 sends first (RFC 9113, section 3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

H2 = b"h2"
HTTP11 = b"http/1.1"


def spoken_http(first: bytes) -> bytes | None:
    """
    ``b"h2"`` if ``first`` starts with HTTP/2's preface, ``None`` while it
    could still (a prefix of it), ``b"http/1.1"`` otherwise.
    """
    if first.startswith(HTTP2_PREFACE):
        return H2
    if HTTP2_PREFACE.startswith(first):
        return None
    return HTTP11


class SniffedTLS(TLSMemoryBIOProtocol):
    """
    Twisted's TLS transport, whose ``negotiatedProtocol`` is the protocol
    the client turned out to speak once that is known.
    """

    #: The protocol found from the client's first bytes (``None``: not
    #: looked for, or not known yet; ALPN's answer stands).
    spoken_protocol: bytes | None = None

    @property
    def negotiatedProtocol(self) -> bytes | None:
        """
        The protocol the client speaks, if found from its first bytes;
        otherwise the one ALPN selected, if any.
        """
        spoken = self.spoken_protocol
        if spoken is not None:
            return spoken
        negotiated: bytes | None = super().negotiatedProtocol
        return negotiated


class BufferingSniffedTLS(SniffedTLS, BufferingTLSTransport):
    """:class:`SniffedTLS` over Twisted's default, which batches small writes."""


class PrefaceSniffer(Protocol):
    """
    The TLS transport's wrapped protocol between the authorization and the
    application's first bytes: it holds what arrives until the preface is
    there or cannot be (at most 24 bytes), records what the client speaks on
    the transport, and hands the transport's reads to ``app`` from then on.

    The application is connected before (``app.makeConnection(tls)``), so
    its own idle timeout bounds a client that sends part of the preface and
    stops.
    """

    def __init__(self, tls: SniffedTLS, app: IProtocol) -> None:
        self._tls = tls
        self._app = app
        self._first = b""

    def dataReceived(self, data: bytes) -> None:
        first = self._first + data
        spoken = spoken_http(first)
        if spoken is None:
            self._first = first
            return
        self._first = b""
        self._tls.spoken_protocol = spoken
        self._tls.wrappedProtocol = self._app
        self._app.dataReceived(first)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._first = b""
        self._tls.wrappedProtocol = self._app
        self._app.connectionLost(reason)
