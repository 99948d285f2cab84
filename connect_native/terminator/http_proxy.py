"""
``--protocol http``: the terminator as an HTTP reverse proxy that decides
every request by the intentions' L7 permissions (:class:`ProxySite`).

The public side is a twisted.web site over the mutual-TLS listener; HTTP/2
or HTTP/1.1 is chosen by the client's first bytes, as for the ``connect:``
web endpoints (:mod:`connect_native._preface`).  Each request is decided by
:class:`connect_native.web.ConnectProtected` as soon as its headers are in,
before anything is sent to ``--to``: a denied request is answered ``403``
and its body is read and dropped; an allowed one goes to ``--to`` over a
pool of keep-alive HTTP/1.1 connections (twisted.web's ``Agent``).

Bodies stream both ways.  The request's body is handed to the backend's
connection as it arrives (:class:`StreamingBody`): while the backend does
not keep up (or is not connected yet and more than :data:`HIGH_WATER` bytes
wait) the client's connection is not read (HTTP/1.1) or its stream's flow
control window is not opened again (HTTP/2).  The response's body is
written to the client as it arrives, and the backend's connection is
paused while the client's is full.  So memory per request is bounded by a
few reads, whatever the bodies' sizes.

What the application sees: hop-by-hop headers dropped (``Connection`` and
the headers it names, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``,
``Transfer-Encoding``, ``Upgrade`` except for an upgrade), ``Host`` kept,
``X-Forwarded-For`` (the caller's address appended), ``X-Forwarded-Proto:
https`` and ``X-Forwarded-Client-Cert: By=<our SPIFFE ID>;URI=<the
caller's>`` (any such header from the caller removed first).

Errors are HTTP answers: ``502`` when ``--to`` refuses or fails, ``504``
when it sends nothing for ``--request-timeout`` seconds, ``400`` for a
malformed request, ``414`` for a request line longer than
``--max-request-line``; after ``--max-requests-per-connection`` requests an
HTTP/1.1 connection is closed (``Connection: close``).

An allowed HTTP/1.1 request with ``Upgrade`` (a WebSocket) goes to ``--to``
on a connection of its own, and from then on both connections are one byte
stream each way (with backpressure), as in ``--protocol tcp``.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from twisted.web.resource import IResource
from twisted.web.server import Site
from zope.interface import implementer

from connect_native import _logging
from connect_native.web import FORBIDDEN_BODY, ConnectProtected

__all__ = [
    "HIGH_WATER",
    "HOP_BY_HOP",
    "ProxyRequest",
    "ProxySettings",
    "ProxySite",
    "StreamingBody",
    "backend_headers",
    "response_headers",
]

log = Logger(observer=_logging.observer)

clientFromString: Any = endpoints.clientFromString  # noqa: N816

# twisted.web.http carries no annotations: its classes are subclassed as Any.
_Request: Any = http.Request
_HTTPChannel: Any = http.HTTPChannel
_Pool: Any = HTTPConnectionPool
_AgentAny: Any = Agent

#: Request-body bytes held for a backend connection not open yet before the
#: client's connection stops being read.
HIGH_WATER = 64 * 1024

#: Headers that concern one connection only (RFC 9110, section 7.6.1), never
#: passed on; ``Upgrade`` is passed on for an upgrade.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: What the caller may not say about itself: set by us only.
XFCC = b"x-forwarded-client-cert"

BAD_GATEWAY_BODY = b"Bad Gateway: the application behind this service did not answer\n"
GATEWAY_TIMEOUT_BODY = (
    b"Gateway Timeout: the application behind this service answered too slowly\n"
)


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy needs from the terminator's options."""

    #: The service, for the logs.
    service: str
    #: ``--to``: the application, a client endpoint description.
    to: str
    #: ``--request-timeout``: seconds ``--to`` may stay silent.
    request_timeout: float = 60.0
    #: ``--max-request-line``: bytes of the request line (and of each header
    #: line); nginx's ``large_client_header_buffers 4 8k``.
    max_request_line: int = 8192
    #: ``--max-headers-size``: bytes of the request line and all headers.
    max_headers_size: int = 32768
    #: ``--max-requests-per-connection``: nginx's ``keepalive_requests``.
    max_requests: int = 1000
    #: Seconds an idle keep-alive client connection stays open.
    idle_timeout: float = 75.0
    #: Log allowed requests at info (else debug).
    log_allowed: bool = False
    #: Keep-alive connections kept open to ``--to``.
    max_backend_connections: int = 1000


def _tokens(values: Iterable[bytes]) -> set[bytes]:
    found: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                found.add(token)
    return found


def _is_upgrade(headers: Headers) -> bool:
    connection = _tokens(headers.getRawHeaders(b"connection", []))
    return b"upgrade" in connection and headers.hasHeader(b"upgrade")


def _end_to_end(headers: Headers, keep: frozenset[bytes] = frozenset()) -> Headers:
    """``headers`` without the hop-by-hop ones (but those in ``keep``)."""
    named = _tokens(headers.getRawHeaders(b"connection", []))
    drop = (HOP_BY_HOP | named) - keep
    out = Headers()
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in drop:
            continue
        out.setRawHeaders(name, list(values))
    return out


def backend_headers(
    incoming: Headers,
    *,
    client_ip: str | None,
    own_uri: str | None,
    peer_uri: str,
    upgrade: bool = False,
) -> Headers:
    """
    The headers a request is passed on to ``--to`` with: end to end ones
    only (``Upgrade`` and ``Connection: Upgrade`` for an upgrade), no
    ``Content-Length`` (the client side sets it from the body), the caller
    appended to ``X-Forwarded-For``, ``X-Forwarded-Proto: https``, and the
    caller's identity in ``X-Forwarded-Client-Cert`` in place of any the
    caller sent.
    """
    keep = frozenset({b"upgrade"}) if upgrade else frozenset()
    out = _end_to_end(incoming, keep)
    out.removeHeader(XFCC)
    if not upgrade:
        out.removeHeader(b"content-length")
    else:
        out.setRawHeaders(b"connection", [b"Upgrade"])
    if client_ip is not None:
        before = b", ".join(incoming.getRawHeaders(b"x-forwarded-for", []))
        ip = client_ip.encode("ascii", "replace")
        out.setRawHeaders(b"x-forwarded-for", [before + b", " + ip if before else ip])
    out.setRawHeaders(b"x-forwarded-proto", [b"https"])
    fields = []
    if own_uri:
        fields.append(f"By={own_uri}")
    fields.append(f"URI={peer_uri}")
    out.setRawHeaders(XFCC, [";".join(fields).encode("utf-8", "replace")])
    return out


def response_headers(incoming: Headers) -> Headers:
    """The headers of ``--to``'s answer passed on to the caller."""
    return _end_to_end(incoming)


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", "replace")


@implementer(IBodyProducer, IPushProducer)
class StreamingBody:
    """
    A request's body as it arrives, for twisted.web's client
    (``IBodyProducer``).

    :param length: the body's ``Content-Length``, or ``None`` (chunked).
    :param pause_reading: stop reading the client's request.
    :param resume_reading: read it again.

    Until the backend's connection takes the body (``startProducing``), up
    to :data:`HIGH_WATER` bytes are held; past that, the client is not read.
    While the connection is paused (its send buffer full), the client is not
    read either.  After ``stopProducing`` (the backend's request failed or
    it answered early) what still arrives is dropped.
    """

    def __init__(
        self,
        length: int | None,
        pause_reading: Callable[[], None],
        resume_reading: Callable[[], None],
    ) -> None:
        self.length: int | object = UNKNOWN_LENGTH if length is None else length
        self._pause_reading = pause_reading
        self._resume_reading = resume_reading
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._consumer: IConsumer | None = None
        self._finished: Deferred[None] | None = None
        self._ended = False
        self._stopped = False
        self._consumer_paused = False
        self._reading_paused = False

    # -- from the client's side -------------------------------------------

    def write(self, data: bytes) -> None:
        """A chunk of the body from the client."""
        if self._stopped or not data:
            return
        if self._consumer is not None and not self._held:
            self._consumer.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._consumer is None and self._held_bytes > HIGH_WATER:
            self._pause()

    def end(self) -> None:
        """The whole body has arrived."""
        self._ended = True
        if self._consumer is not None and not self._held:
            self._finish()

    # -- IBodyProducer ----------------------------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._flush()
        if not self._consumer_paused:
            self._resume()
        if self._ended and not self._held:
            return succeed(None)
        self._finished = Deferred()
        return self._finished

    def pauseProducing(self) -> None:
        self._consumer_paused = True
        self._pause()

    def resumeProducing(self) -> None:
        self._consumer_paused = False
        self._flush()
        if not self._consumer_paused:
            self._resume()

    def stopProducing(self) -> None:
        self._stopped = True
        self._held = []
        self._held_bytes = 0
        # What still comes is read and dropped.
        self._resume()

    # -- inside -----------------------------------------------------------

    def _flush(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        held, self._held, self._held_bytes = self._held, [], 0
        for data in held:
            consumer.write(data)
        if self._ended:
            self._finish()

    def _finish(self) -> None:
        finished, self._finished = self._finished, None
        if finished is not None:
            finished.callback(None)

    def _pause(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._pause_reading()

    def _resume(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._resume_reading()


class _Relay(Protocol):
    """The backend's response body, written to the client as it arrives."""

    def __init__(self, request: ProxyRequest) -> None:
        self.request = request

    def connectionMade(self) -> None:
        request = self.request
        if request.finished or request._disconnected:
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        # The client's connection pauses the backend's while it is full.
        request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        request = self.request
        request._touch()
        if not request._disconnected:
            request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.request._response_ended(reason)


@implementer(IAgentEndpointFactory)
class _OneBackend:
    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: Any) -> Any:
        return self.endpoint


class ProxyRequest(_Request):  # type: ignore[misc]
    """
    One request through the proxy: decided when its headers are in, passed
    on to ``--to`` then, its body streamed (:class:`StreamingBody`), the
    answer streamed back.
    """

    site: ProxySite

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.site = channel.site
        self._cookies = False
        self._length_seen = False
        self._length: int | None = 0
        self._begun = False
        self._received = False
        self._denied = False
        self._upgrade = False
        self._body: StreamingBody | None = None
        self._asking: Deferred[Any] | None = None
        self._response: Any = None
        self._answer: tuple[int, bytes] | None = None
        self._timer: IDelayedCall | None = None
        self._relaying = False
        self._timed_out_once = False
        self._peer_uri = "?"

    # -- what the channel calls, in its order -----------------------------

    def parseCookies(self) -> None:
        # Cookies go to the application as they came; nothing to parse.
        self._cookies = True
        if self._length_seen:
            self._begin()

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()
        self._length = length
        self._length_seen = True
        if self._cookies:
            self._begin()

    def handleContentChunk(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            self._touch()
            body.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._received = True
        if not self._begun:  # pragma: no cover (the channel always begins)
            self._begin()
        body = self._body
        if body is not None:
            body.end()
        if self._denied:
            self._send_answer(403, FORBIDDEN_BODY)
        elif self._upgrade:
            self._start_upgrade()
        elif self._answer is not None:
            self._send_answer(*self._answer)
        elif self._response is not None:
            self._relay(self._response)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._stop_timer()
        asking, self._asking = self._asking, None
        if asking is not None:
            asking.cancel()
        body = self._body
        if body is not None:
            body.stopProducing()
        response, self._response = self._response, None
        if response is not None and not self._relaying:
            response.deliverBody(_Discard())

    # -- deciding and asking ----------------------------------------------

    def _begin(self) -> None:
        if self._begun:
            return
        self._begun = True
        channel = self.channel
        method = getattr(channel, "_command", None) or channel.command
        uri = getattr(channel, "_path", None) or channel.path
        version = getattr(channel, "_version", None) or b"HTTP/2"
        self.method, self.uri, self.clientproto = method, uri, version
        self.client = channel.getPeer()
        self.host = channel.getHost()
        path = uri.split(b"?", 1)[0]
        if not path.startswith(b"/"):
            # Absolute form (http://host/path) or '*': not what a service
            # behind a mesh is asked.
            self.path = path
            nothing: list[bytes] = []
            self.prepath, self.postpath = nothing, []
            self._answer = (400, b"Bad Request: the request target must be a path\n")
            return
        self.path = path
        self.prepath = []
        self.postpath = [unquote_to_bytes(s) for s in path[1:].split(b"/")]
        site = self.site
        decision = site.decide(self)
        site.count(decision)
        if not decision.allowed:
            self._denied = True
            return
        self._peer_uri = site.peer_uri(self)
        if (
            _is_upgrade(self.requestHeaders)
            and isinstance(channel, http.HTTPChannel)
            and self._length == 0
        ):
            self._upgrade = True
            return
        if self._length != 0:
            self._body = StreamingBody(
                self._length, self._pause_reading, self._resume_reading
            )
        self._ask()

    def _ask(self) -> None:
        site = self.site
        headers = backend_headers(
            self.requestHeaders,
            client_ip=getattr(self.client, "host", None),
            own_uri=site.own_uri(),
            peer_uri=self._peer_uri,
        )
        self._touch()
        asking = site.agent.request(
            self.method, site.backend_url + self.uri, headers, self._body
        )
        self._asking = asking
        asking.addCallbacks(self._answered, self._failed)

    def _answered(self, response: Any) -> None:
        self._asking = None
        self._touch()
        if self._disconnected:
            response.deliverBody(_Discard())
            return
        if not self._received:
            # The answer came before the request's body ended: written once
            # the body is in (the client's side is still reading it).
            self._response = response
            return
        self._relay(response)

    def _failed(self, failure: Failure) -> None:
        self._asking = None
        if self._disconnected:
            return
        if self._timed_out_once or isinstance(failure.value, CancelledError):
            code, body, why = 504, GATEWAY_TIMEOUT_BODY, "timed out"
        else:
            code, body, why = 502, BAD_GATEWAY_BODY, failure.getErrorMessage()
            if isinstance(failure.value, ConnectError):
                why = f"cannot connect: {why}"
        self._stop_timer()
        log.warn(
            "connect-native {service}: {code} for {method} {path} from {peer} at "
            "{address}: {to} {why}",
            service=self.site.settings.service,
            code=code,
            method=_text(self.method),
            path=_text(self.path),
            peer=self._peer_uri,
            address=str(self.client),
            to=self.site.settings.to,
            why=why,
        )
        if self._received:
            self._send_answer(code, body)
        else:
            self._answer = (code, body)

    # -- answering ----------------------------------------------------------

    def _relay(self, response: Any) -> None:
        self._response = None
        self._relaying = True
        self.setResponseCode(response.code, response.phrase)
        self.responseHeaders = response_headers(response.headers)
        if response.length is not UNKNOWN_LENGTH and not self.responseHeaders.hasHeader(
            b"content-length"
        ):
            self.responseHeaders.setRawHeaders(
                b"content-length", [str(response.length).encode("ascii")]
            )
        self._limit_requests()
        response.deliverBody(_Relay(self))

    def _response_ended(self, reason: Failure) -> None:
        self._stop_timer()
        if self._disconnected or self.finished:
            return
        if self.producer is not None:
            self.unregisterProducer()
        if isinstance(reason.value, ResponseDone):
            self.finish()
            return
        log.warn(
            "connect-native {service}: {to} broke off its answer to {method} "
            "{path} from {peer}: {why}",
            service=self.site.settings.service,
            to=self.site.settings.to,
            method=_text(self.method),
            path=_text(self.path),
            peer=self._peer_uri,
            why=reason.getErrorMessage(),
        )
        self._abort()

    def _send_answer(self, code: int, body: bytes) -> None:
        self._stop_timer()
        if self._disconnected or self.finished:
            return
        self.setResponseCode(code)
        self.responseHeaders = Headers()
        self.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.setHeader(b"content-length", str(len(body)).encode("ascii"))
        self._limit_requests()
        self.write(body)
        self.finish()

    def _limit_requests(self) -> None:
        channel = self.channel
        if isinstance(channel, http.HTTPChannel) and not channel.persistent:
            self.setHeader(b"connection", b"close")

    def _abort(self) -> None:
        channel: Any = self.channel
        if isinstance(self.channel, http.HTTPChannel):
            channel.transport.abortConnection()
        else:
            channel.abortConnection()

    # -- flow control and the timeout ---------------------------------------

    def _pause_reading(self) -> None:
        channel = self.channel
        if isinstance(channel, _ProxyChannel):
            channel.pause_reading()
        else:
            channel.pauseProducing()

    def _resume_reading(self) -> None:
        channel = self.channel
        if isinstance(channel, _ProxyChannel):
            channel.resume_reading()
        else:
            channel.resumeProducing()

    def _touch(self) -> None:
        """Progress: ``--request-timeout`` counts again from now."""
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(self.site.settings.request_timeout)
            return
        self._timer = self.site.reactor.callLater(
            self.site.settings.request_timeout, self._timed_out
        )

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timed_out(self) -> None:
        self._timer = None
        self._timed_out_once = True
        asking = self._asking
        if asking is not None:
            asking.cancel()  # answered 504 by _failed
            return
        if self._relaying or self._response is not None:
            log.warn(
                "connect-native {service}: {to} sent nothing of its answer to "
                "{method} {path} for {timeout:g}s (--request-timeout): cut off",
                service=self.site.settings.service,
                to=self.site.settings.to,
                method=_text(self.method),
                path=_text(self.path),
                timeout=self.site.settings.request_timeout,
            )
            response, self._response = self._response, None
            if response is not None:
                response.deliverBody(_Discard())
            self._abort()

    # -- upgrades -----------------------------------------------------------

    def _start_upgrade(self) -> None:
        site = self.site
        head = backend_headers(
            self.requestHeaders,
            client_ip=getattr(self.client, "host", None),
            own_uri=site.own_uri(),
            peer_uri=self._peer_uri,
            upgrade=True,
        )
        lines = [b"%s %s HTTP/1.1" % (self.method, self.uri)]
        for name, values in head.getAllRawHeaders():
            lines.extend(name + b": " + value for value in values)
        request_head = b"\r\n".join(lines) + b"\r\n\r\n"
        connecting = site.backend_endpoint.connect(
            Factory.forProtocol(lambda: _UpgradedBackend(self, request_head))
        )
        self._touch()
        self._asking = connecting
        connecting.addErrback(self._failed)

    def _upgraded(self, backend: _UpgradedBackend) -> None:
        """The backend's connection is open: both are one byte stream now."""
        self._asking = None
        self._stop_timer()
        channel: Any = self.channel
        client: Any = channel.transport
        early = b"".join(channel._dataBuffer)
        channel._dataBuffer = []
        channel.setTimeout(None)
        channel.dataReceived = backend.transport.write  # type: ignore[union-attr]
        channel.connectionLost = backend.client_lost
        backend.client = client
        client.unregisterProducer()
        client.registerProducer(backend.transport, True)
        backend.transport.registerProducer(client, True)  # type: ignore[union-attr]
        # twisted.web paused the client while it handled the request.
        client.resumeProducing()
        log.debug(
            "connect-native {service}: {method} {path} from {peer} upgraded: "
            "a byte stream to {to} from now",
            service=site_service(self),
            method=_text(self.method),
            path=_text(self.path),
            peer=self._peer_uri,
            to=self.site.settings.to,
        )
        if early:
            backend.transport.write(early)  # type: ignore[union-attr]


def site_service(request: ProxyRequest) -> str:
    return request.site.settings.service


class _UpgradedBackend(Protocol):
    """The backend's side of an upgraded connection."""

    def __init__(self, request: ProxyRequest, head: bytes) -> None:
        self.request = request
        self.head = head
        self.client: Any = None

    def connectionMade(self) -> None:
        request = self.request
        if request._disconnected:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.transport.write(self.head)  # type: ignore[union-attr]
        request._upgraded(self)

    def dataReceived(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.unregisterProducer()
            client.loseConnection()

    def client_lost(self, reason: Failure = connectionDone) -> None:
        self.client = None
        transport: Any = self.transport
        if transport is not None:
            transport.unregisterProducer()
            transport.loseConnection()


class _Discard(Protocol):
    """An answer no one waits for any more: its connection is closed."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


class _ProxyChannel(_HTTPChannel):  # type: ignore[misc]
    """
    HTTP/1.1 with nginx's limits: ``MAX_LENGTH`` bytes per line (request
    line: ``414``; header line: ``400``), ``totalHeadersSize`` for the lot
    (``400``), ``max_requests`` per connection (then ``Connection: close``);
    and reading paused for a request body's backpressure stays paused when
    twisted.web resumes its transport for its own reasons.
    """

    max_requests = 1000
    _served = 0
    _reading_paused = False

    def allHeadersReceived(self) -> None:
        self._served += 1
        super().allHeadersReceived()
        if self._served >= self.max_requests:
            self.persistent = False

    def lineLengthExceeded(self, line: bytes) -> None:
        if getattr(self, "_command", None) is None:
            self.transport.write(
                b"HTTP/1.1 414 URI Too Long\r\nConnection: close\r\n\r\n"
            )
        else:
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"
            )
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
        self.loseConnection()

    def pause_reading(self) -> None:
        self._reading_paused = True
        self.transport.pauseProducing()

    def resume_reading(self) -> None:
        self._reading_paused = False
        self.transport.resumeProducing()

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self._reading_paused:
            self.transport.pauseProducing()

    def requestDone(self, request: Any) -> None:
        if self._reading_paused:
            self.resume_reading()
        super().requestDone(request)


@implementer(IResource)
class _NothingHere:
    """The site's resource tree: never rendered (the requests are proxied)."""

    isLeaf = True

    def getChildWithDefault(self, name: bytes, request: Any) -> IResource:
        return self  # pragma: no cover

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("the proxy has no resources")

    def render(self, request: Any) -> bytes:  # pragma: no cover
        raise NotImplementedError("the proxy renders nothing")


class ProxySite(Site):
    """
    The public listener's factory for ``--protocol http``.

    :param reactor: the reactor (TCP to ``--to``, time).
    :param settings: the proxy's settings.
    :param authorizer: decides each request (it has ``decide_request``:
        :class:`~connect_native.authorize.intentions.IntentionAuthorizer`);
        or ``None``: the connection's decision stands for every request
        on it (``--authorize agent``, ``allow-ids``), and callers whose
        intention has HTTP permissions are refused at the connection.
    :param own_uri: gives our SPIFFE ID (``None`` while there is no
        certificate) for ``X-Forwarded-Client-Cert``'s ``By=``.
    :param metrics: the service's
        :class:`~connect_native.metrics.ServiceMetrics`, or ``None``.
    :param backend_endpoint: where ``--to`` is (default: from its
        description).
    """

    requestFactory = ProxyRequest

    def __init__(
        self,
        reactor: Any,
        settings: ProxySettings,
        authorizer: Any,
        own_uri: Callable[[], str | None],
        *,
        metrics: Any = None,
        backend_endpoint: Any = None,
    ) -> None:
        self.settings = settings
        self.protector: ConnectProtected | None = None
        root: Any = _NothingHere()
        if authorizer is not None:
            self.protector = ConnectProtected(
                root,
                authorizer,
                service=settings.service,
                log_allowed=settings.log_allowed,
            )
            # The root provides IDecidesEachRequest: callers under an L7
            # intention are let through to be decided request by request.
            root = self.protector
        super().__init__(root, reactor=reactor)  # type: ignore[no-untyped-call]
        self.timeOut = settings.idle_timeout
        self.reactor = reactor
        self._own_uri = own_uri
        self.metrics = metrics
        if backend_endpoint is None:
            backend_endpoint = clientFromString(reactor, settings.to)
        self.backend_endpoint = backend_endpoint
        self.pool: Any = _Pool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = settings.max_backend_connections
        self.pool.cachedConnectionTimeout = 60
        self.agent: Any = _AgentAny.usingEndpointFactory(
            reactor, _OneBackend(backend_endpoint), pool=self.pool
        )
        self.backend_url = b"http://" + _authority(settings.to)

    def protocol(self) -> Any:
        channel = _ProxyChannel()
        channel.MAX_LENGTH = self.settings.max_request_line
        channel.totalHeadersSize = self.settings.max_headers_size
        channel.max_requests = self.settings.max_requests
        return http._GenericHTTPChannelProtocol(channel)

    def log(self, request: Any) -> None:
        # The decisions and the errors are logged; no access log.
        pass

    def decide(self, request: ProxyRequest) -> Any:
        from connect_native.authorize import Decision

        protector = self.protector
        if protector is None:
            return Decision(True, "decided for the connection", "connection")
        untyped: Any = request
        return protector.decide(untyped)

    def count(self, decision: Any) -> None:
        metrics = self.metrics
        if metrics is not None:
            metrics.request_decided(bool(decision.allowed))

    def peer_uri(self, request: ProxyRequest) -> str:
        from connect_native.web import request_peer

        try:
            untyped: Any = request
            return request_peer(untyped).uri
        except Exception:
            return "?"

    def own_uri(self) -> str | None:
        try:
            return self._own_uri()
        except Exception:
            return None

    def close(self) -> Deferred[None]:
        """Close the keep-alive connections to ``--to``."""
        closing: Deferred[None] = self.pool.closeCachedConnections()
        return closing


def _authority(to: str) -> bytes:
    """``host:port`` of a ``tcp:`` description, for the backend's URL."""
    fields = to.split(":")
    if fields and fields[0] in ("tcp", "tcp6") and len(fields) >= 3:
        host = port = None
        positional = [f for f in fields[1:] if "=" not in f]
        named = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        host = named.get("host") or (positional[0] if positional else None)
        port = named.get("port") or (positional[1] if len(positional) > 1 else None)
        if host and port and port.isdigit():
            if ":" in host:
                host = f"[{host}]"
            return f"{host}:{port}".encode("ascii", "replace")
    return b"localhost"
