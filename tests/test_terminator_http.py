"""
``connect_native.terminator.http_proxy`` in memory: the client's and the
backend's connections are StringTransports, time is a Clock
(``MemoryReactorClock``), the backend's connection attempts are the memory
reactor's.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from connect_native.authorize import Decision
from connect_native.metrics import ServiceMetrics
from connect_native.terminator.http_proxy import (
    HIGH_WATER,
    ProxySettings,
    ProxySite,
    StreamingBody,
    backend_headers,
    response_headers,
)
from connect_native.terminator.options import Options

OWN = "spiffe://td.consul/ns/default/dc/dc1/svc/web"
CALLER = IPv4Address("TCP", "10.1.2.3", 40000)


class Everyone:
    """An authorizer that allows each request (and records them)."""

    service = "web"

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def decide_request(self, peer: Any, method: Any, path: Any, headers: Any) -> Any:
        self.asked.append((method, path))  # pragma: no cover (no verified peer)
        return Decision(True, "allowed", "test")  # pragma: no cover


class Proxy:
    """A ProxySite with one client connection and the backend's in memory."""

    def __init__(self, authorizer: Any = None, **settings: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = ServiceMetrics("web")
        self.site = ProxySite(
            self.reactor,
            ProxySettings(service="web", to="tcp:127.0.0.1:8080", **settings),
            authorizer,
            lambda: OWN,
            metrics=self.metrics,
            backend_endpoint=TCP4ClientEndpoint(self.reactor, "127.0.0.1", 8080),
        )
        self.client = StringTransport(peerAddress=CALLER)
        self.protocol: Any = self.site.buildProtocol(CALLER)
        self.protocol.makeConnection(self.client)
        self.backends: list[tuple[Any, StringTransport]] = []

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def answered(self) -> bytes:
        value = self.client.value()
        self.client.clear()
        return value

    def backend(self, index: int = -1) -> tuple[Any, StringTransport]:
        """Connect the backend's attempts made so far; the one at ``index``."""
        while len(self.backends) < len(self.reactor.tcpClients):
            _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[
                len(self.backends)
            ]
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.backends.append((protocol, transport))
        return self.backends[index]

    def refuse_backend(self) -> None:
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        connector = self.reactor.connectors[-1]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))


def head(data: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    lines = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, value = line.split(b":", 1)
        fields[name.strip().lower()] = value.strip()
    return lines[0], fields


# -- headers ------------------------------------------------------------------


def test_hop_by_hop_headers_are_dropped_and_the_identity_is_set() -> None:
    incoming = Headers(
        {
            b"Host": [b"web.example"],
            b"Connection": [b"keep-alive, X-Private"],
            b"X-Private": [b"hop"],
            b"Keep-Alive": [b"timeout=5"],
            b"TE": [b"trailers"],
            b"Trailer": [b"x-sum"],
            b"Transfer-Encoding": [b"chunked"],
            b"Upgrade": [b"websocket"],
            b"Proxy-Authorization": [b"secret"],
            b"Content-Length": [b"3"],
            b"X-Forwarded-Client-Cert": [b"By=spiffe://forged;URI=spiffe://forged"],
            b"X-Forwarded-For": [b"192.0.2.1"],
            b"Accept": [b"text/plain"],
        }
    )
    out = backend_headers(
        incoming,
        client_ip="10.1.2.3",
        own_uri=OWN,
        peer_uri="spiffe://td.consul/ns/default/dc/dc1/svc/api",
    )
    names = {name.lower() for name, _ in out.getAllRawHeaders()}
    assert names == {
        b"host",
        b"accept",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-client-cert",
    }
    assert out.getRawHeaders(b"host") == [b"web.example"]
    assert out.getRawHeaders(b"x-forwarded-for") == [b"192.0.2.1, 10.1.2.3"]
    assert out.getRawHeaders(b"x-forwarded-proto") == [b"https"]
    assert out.getRawHeaders(b"x-forwarded-client-cert") == [
        f"By={OWN};URI=spiffe://td.consul/ns/default/dc/dc1/svc/api".encode()
    ]


def test_an_upgrade_keeps_its_upgrade_headers() -> None:
    incoming = Headers(
        {
            b"Connection": [b"Upgrade"],
            b"Upgrade": [b"websocket"],
            b"Sec-WebSocket-Key": [b"abc"],
        }
    )
    out = backend_headers(
        incoming, client_ip=None, own_uri=None, peer_uri="spiffe://x", upgrade=True
    )
    assert out.getRawHeaders(b"upgrade") == [b"websocket"]
    assert out.getRawHeaders(b"connection") == [b"Upgrade"]
    assert out.getRawHeaders(b"sec-websocket-key") == [b"abc"]
    assert out.getRawHeaders(b"x-forwarded-client-cert") == [b"URI=spiffe://x"]


def test_the_answers_hop_by_hop_headers_are_dropped() -> None:
    out = response_headers(
        Headers(
            {
                b"Connection": [b"close, X-Mine"],
                b"X-Mine": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"Content-Type": [b"text/plain"],
            }
        )
    )
    assert [name.lower() for name, _ in out.getAllRawHeaders()] == [b"content-type"]


# -- the request's body ----------------------------------------------------------


class Consumer:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


def test_a_body_waiting_for_its_connection_pauses_the_client_past_the_mark() -> None:
    paused: list[str] = []
    body = StreamingBody(
        None, lambda: paused.append("pause"), lambda: paused.append("go")
    )
    body.write(b"x" * HIGH_WATER)
    assert paused == []
    body.write(b"y")
    assert paused == ["pause"]
    consumer = Consumer()
    finished = body.startProducing(consumer)  # type: ignore[arg-type]
    assert b"".join(consumer.data) == b"x" * HIGH_WATER + b"y"
    assert paused == ["pause", "go"]
    body.pauseProducing()
    body.resumeProducing()
    assert paused == ["pause", "go", "pause", "go"]
    body.write(b"z")
    assert consumer.data[-1] == b"z"
    assert not finished.called
    body.end()
    assert finished.called


def test_a_paused_connection_pauses_the_client_and_a_resumed_one_reads_it() -> None:
    paused: list[str] = []
    body = StreamingBody(5, lambda: paused.append("pause"), lambda: paused.append("go"))
    consumer = Consumer()
    body.startProducing(consumer)  # type: ignore[arg-type]
    body.pauseProducing()
    assert paused == ["pause"]
    body.write(b"abcde")  # what was already read still goes
    assert consumer.data == [b"abcde"]
    body.resumeProducing()
    assert paused == ["pause", "go"]


def test_a_stopped_body_drops_what_comes_and_reads_on() -> None:
    paused: list[str] = []
    body = StreamingBody(
        None, lambda: paused.append("pause"), lambda: paused.append("go")
    )
    body.write(b"x" * (HIGH_WATER + 1))
    body.stopProducing()
    assert paused == ["pause", "go"]
    body.write(b"more")
    consumer = Consumer()
    body.end()
    assert body.startProducing(consumer).called  # type: ignore[arg-type]
    assert consumer.data == []


# -- through the site ------------------------------------------------------------


def test_an_allowed_request_goes_to_the_backend_and_its_answer_comes_back() -> None:
    proxy = Proxy()
    proxy.send(
        b"GET /a?b=c HTTP/1.1\r\nHost: web\r\nX-Forwarded-Client-Cert: x\r\n\r\n"
    )
    protocol, backend = proxy.backend()
    line, fields = head(backend.value())
    assert line == b"GET /a?b=c HTTP/1.1"
    assert fields[b"host"] == b"web"
    assert fields[b"x-forwarded-for"] == b"10.1.2.3"
    assert fields[b"x-forwarded-client-cert"] == f"By={OWN};URI=?".encode()
    protocol.dataReceived(
        b"HTTP/1.1 201 Made\r\nContent-Length: 5\r\nKeep-Alive: timeout=1\r\n\r\nhello"
    )
    line, fields = head(proxy.answered())
    assert line == b"HTTP/1.1 201 Made"
    assert b"keep-alive" not in fields
    assert fields[b"content-length"] == b"5"
    assert proxy.client.connected


def test_a_request_on_an_unverified_connection_is_denied_and_not_sent() -> None:
    # Every request is decided: with no verified Connect peer there is no one
    # to decide for, and the authorizer is not even asked.
    authorizer = Everyone()
    proxy = Proxy(authorizer)
    proxy.send(b"DELETE /admin/users HTTP/1.1\r\nHost: web\r\n\r\n")
    answer = proxy.answered()
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert answer.endswith(
        b"Forbidden: the service's intentions do not allow this request\n"
    )
    assert proxy.reactor.tcpClients == []
    assert authorizer.asked == []
    assert proxy.metrics.requests.labels("web", "denied")._value.get() == 1


def test_a_denied_requests_body_is_read_and_dropped() -> None:
    proxy = Proxy(Everyone())
    proxy.send(b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\n\r\nab")
    assert proxy.answered() == b""
    proxy.send(b"cd")
    assert proxy.answered().startswith(b"HTTP/1.1 403 ")
    assert proxy.reactor.tcpClients == []


def test_a_refused_backend_is_a_502() -> None:
    proxy = Proxy()
    proxy.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    proxy.refuse_backend()
    answer = proxy.answered()
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert answer.endswith(
        b"Bad Gateway: the application behind this service did not answer\n"
    )


def test_a_silent_backend_is_a_504_after_the_request_timeout() -> None:
    proxy = Proxy(request_timeout=30.0)
    proxy.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    _protocol, backend = proxy.backend()
    proxy.reactor.advance(29.9)
    assert proxy.answered() == b""
    proxy.reactor.advance(0.2)
    assert proxy.answered().startswith(b"HTTP/1.1 504 ")
    assert backend.disconnecting


def test_a_backend_silent_in_the_middle_of_its_answer_is_cut_off() -> None:
    proxy = Proxy(request_timeout=30.0)
    proxy.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    protocol, _backend = proxy.backend()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    proxy.reactor.advance(20)
    protocol.dataReceived(b"wo")  # progress: counted again from here
    proxy.reactor.advance(20)
    assert proxy.client.connected
    proxy.reactor.advance(11)
    assert proxy.client.disconnecting


def test_a_malformed_request_is_a_400() -> None:
    proxy = Proxy()
    proxy.send(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
    assert proxy.answered().startswith(b"HTTP/1.1 400 Bad Request")
    assert proxy.client.disconnecting
    assert proxy.reactor.tcpClients == []


def test_a_request_line_past_the_limit_is_a_414() -> None:
    proxy = Proxy(max_request_line=64)
    proxy.send(b"GET /" + b"a" * 100 + b" HTTP/1.1\r\n")
    assert proxy.answered().startswith(b"HTTP/1.1 414 ")
    assert proxy.client.disconnecting


def test_a_header_line_past_the_limit_is_a_400() -> None:
    proxy = Proxy(max_request_line=64)
    proxy.send(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 100 + b"\r\n")
    assert proxy.answered().startswith(b"HTTP/1.1 400 ")


def test_headers_past_their_total_limit_are_a_400() -> None:
    proxy = Proxy(max_headers_size=200)
    proxy.send(b"GET / HTTP/1.1\r\n" + b"X-A: " + b"a" * 50 + b"\r\n")
    proxy.send(b"".join(b"X-%d: %s\r\n" % (i, b"b" * 50) for i in range(4)))
    assert proxy.answered().startswith(b"HTTP/1.1 400 ")


def test_the_last_request_of_a_connection_closes_it() -> None:
    proxy = Proxy(max_requests=2)
    for number in (1, 2):
        proxy.send(b"GET /%d HTTP/1.1\r\nHost: web\r\n\r\n" % number)
        protocol, _backend = proxy.backend()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        line, fields = head(proxy.answered())
        assert line == b"HTTP/1.1 200 OK"
        if number == 1:
            assert b"connection" not in fields
            assert not proxy.client.disconnecting
    assert fields[b"connection"] == b"close"
    assert proxy.client.disconnecting


def test_a_request_body_is_streamed_with_backpressure() -> None:
    proxy = Proxy()
    proxy.send(b"PUT /up HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n")
    # Not connected yet: held up to the mark, then the client is not read.
    proxy.send(b"%x\r\n%s\r\n" % (HIGH_WATER + 1, b"a" * (HIGH_WATER + 1)))
    assert proxy.client.producerState == "paused"
    protocol, backend = proxy.backend()
    assert proxy.client.producerState == "producing"
    assert backend.value().endswith(b"a" * 100 + b"\r\n")
    # The backend's connection full: the client's is paused until it drains.
    backend.producer.pauseProducing()
    assert proxy.client.producerState == "paused"
    backend.producer.resumeProducing()
    assert proxy.client.producerState == "producing"
    proxy.send(b"3\r\nend\r\n0\r\n\r\n")
    assert backend.value().endswith(b"3\r\nend\r\n0\r\n\r\n")
    protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert proxy.answered().startswith(b"HTTP/1.1 204 ")


def test_an_answer_is_streamed_with_backpressure() -> None:
    proxy = Proxy()
    proxy.send(b"GET /down HTTP/1.1\r\nHost: web\r\n\r\n")
    protocol, backend = proxy.backend()
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    assert proxy.answered().endswith(b"abc")
    # The client's connection full: the backend's is not read.
    proxy.client.producer.pauseProducing()
    assert backend.producerState == "paused"
    proxy.client.producer.resumeProducing()
    assert backend.producerState == "producing"
    protocol.dataReceived(b"def")
    assert proxy.answered() == b"def"


def test_an_upgrade_becomes_a_byte_stream_both_ways() -> None:
    proxy = Proxy()
    proxy.send(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\nearly"
    )
    protocol, backend = proxy.backend()
    sent = backend.value()
    line, fields = head(sent)
    assert line == b"GET /ws HTTP/1.1"
    assert fields[b"upgrade"] == b"websocket"
    assert fields[b"connection"] == b"Upgrade"
    assert fields[b"x-forwarded-client-cert"] == f"By={OWN};URI=?".encode()
    assert sent.endswith(b"\r\n\r\nearly")
    protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n\r\nframe")
    assert proxy.answered() == b"HTTP/1.1 101 Switching Protocols\r\n\r\nframe"
    proxy.send(b"\x81\x05hello")
    assert backend.value().endswith(b"\x81\x05hello")
    protocol.connectionLost(Failure(ConnectionRefusedError()))
    assert proxy.client.disconnecting


# -- options ----------------------------------------------------------------------


def test_protocol_http_implies_intentions_and_nginx_like_limits() -> None:
    options = Options()
    options.parseOptions(
        ["--service", "web", "--to", "tcp:127.0.0.1:8080", "--protocol", "http"]
    )
    settings = options.settings
    assert settings is not None
    assert settings.protocol == "http"
    assert settings.authorize == "intentions"
    assert settings.request_timeout == 60.0
    assert settings.max_request_line == 8192
    assert settings.max_headers_size == 32768
    assert settings.max_requests_per_connection == 1000
    assert not settings.log_allowed_requests


def test_protocol_http_keeps_an_explicit_authorize_agent() -> None:
    options = Options()
    options.parseOptions(
        [
            "--service",
            "web",
            "--to",
            "tcp:127.0.0.1:8080",
            "--protocol",
            "http",
            "--authorize",
            "agent",
            "--log-allowed",
        ]
    )
    assert options.settings is not None
    assert options.settings.authorize == "agent"
    assert options.settings.log_allowed_requests


def test_protocol_tcp_stays_the_default_with_the_agent() -> None:
    options = Options()
    options.parseOptions(["--service", "web", "--to", "tcp:127.0.0.1:8080"])
    assert options.settings is not None
    assert (options.settings.protocol, options.settings.authorize) == ("tcp", "agent")


# -- HTTP/2 ------------------------------------------------------------------------


async def _turns(count: int = 5) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(count):
        await deferLater(reactor, 0, lambda: None)


@pytest_twisted.ensureDeferred
async def test_an_http2_request_is_decided_and_proxied_over_http11() -> None:
    # twisted.web's HTTP/2 connection schedules its writes on the global
    # reactor: a few turns of it let them out.
    import h2.config
    import h2.connection
    import h2.events

    proxy = Proxy()
    proxy.client.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(
        1,
        [
            (":method", "POST"),
            (":path", "/h2?x=1"),
            (":scheme", "https"),
            (":authority", "web"),
            ("x-forwarded-client-cert", "forged"),
        ],
    )
    client.send_data(1, b"body", end_stream=True)
    proxy.send(client.data_to_send())
    await _turns()
    protocol, backend = proxy.backend()
    line, fields = head(backend.value())
    assert line == b"POST /h2?x=1 HTTP/1.1"
    assert fields[b"host"] == b"web"
    assert fields[b"x-forwarded-client-cert"] == f"By={OWN};URI=?".encode()
    assert backend.value().endswith(b"\r\n\r\n4\r\nbody\r\n0\r\n\r\n")
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: 1\r\n\r\nok")
    await _turns()
    events = client.receive_data(proxy.answered())
    [response] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    got = dict(response.headers)
    assert got[b":status"] == b"200"
    assert got[b"x-app"] == b"1"
    data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert data == b"ok"
