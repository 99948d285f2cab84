"""
A twisted.web ``Site`` on a ConnectServerEndpoint: HTTP/2 or HTTP/1.1 by
what the client sends first, whatever ALPN said, and a client whose ALPN
offer we don't share served rather than refused (issue 17: Consul's
built-in proxy offers only ``h2`` and tunnels whatever its client sends).

On Twisted's TLS transport only (what twistd web and Klein get): with an
injected transport nothing is sniffed (``docs/server.rst``).
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from connect_native._preface import (
    BufferingSniffedTLS,
    SniffedTLS,
    spoken_http,
)
from connect_native.server import peer_identity
from connect_native.testing import CertificateFactory, FakeAuthorizer
from connect_native.tls import HalfCloseBufferingTLS, HalfCloseTLS
from tests.test_server import Harness, StaticSource, bundle


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


def test_the_preface_decides_as_soon_as_it_can() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert spoken_http(preface) == b"h2"
    assert spoken_http(preface + b"\x00\x00") == b"h2"
    assert spoken_http(b"") is None
    assert spoken_http(preface[:10]) is None
    assert spoken_http(b"G") == b"http/1.1"
    assert spoken_http(b"POST / HTTP/1.1\r\n") == b"http/1.1"
    assert spoken_http(b"PRI * HTTP/1.1\r\n") == b"http/1.1"


GET = b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"


class Spoken(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return (
            f"secure={request.isSecure()} peer={peer_identity(request).uri} "
            f"spoken={request.clientproto.decode()}"
        ).encode()


def site_harness(ca: CertificateFactory, **options: Any) -> Harness:
    """A Site on Twisted's TLS transport (what twistd web and Klein get)."""
    h = Harness(ca, FakeAuthorizer({"api"}), StaticSource(bundle(ca, ca.leaf("web"))))
    h.listen(Site(Spoken()), tls_protocol=None, **options)
    return h


def body_of(response: bytes) -> bytes:
    assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response
    return response.split(b"\r\n\r\n", 1)[1]


@pytest.mark.parametrize(
    "alpn", [(b"h2",), (b"x-other",), ()], ids=["h2 only", "another", "none"]
)
def test_a_site_serves_http_1_1_to_a_client_whatever_it_offered_in_alpn(
    ca: CertificateFactory, alpn: tuple[bytes, ...]
) -> None:
    """
    Consul's built-in proxy offers ALPN ``h2`` only and tunnels HTTP/1.1
    (issue 17): the handshake completes and the Site answers in HTTP/1.1,
    whether ALPN selected ``h2`` (we speak it), nothing, or was not offered.
    """
    h = site_harness(ca)
    conn = h.connect([GET], alpn=alpn)
    conn.pump.flush()
    assert conn.client_app.handshake_done
    assert body_of(conn.client_app.received) == (
        f"secure=True peer={ca.service_uri('api')} spoken=HTTP/1.1".encode()
    )
    # What the application sees as negotiated is what the client speaks.
    assert conn.server.negotiatedProtocol == b"http/1.1"


def h2_request() -> tuple[Any, bytes]:
    """An HTTP/2 client (the h2 package) and the bytes of its GET /."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(
        1,
        [
            (":method", "GET"),
            (":path", "/"),
            (":scheme", "https"),
            (":authority", "web"),
        ],
        end_stream=True,
    )
    return client, client.data_to_send()


def h2_response(client: Any, received: bytes) -> tuple[bytes, bytes]:
    """The status and body of stream 1, from what the server sent."""
    from h2.events import DataReceived, ResponseReceived

    status, body = b"", b""
    for event in client.receive_data(received):
        if isinstance(event, ResponseReceived):
            status = dict(event.headers)[b":status"]
        elif isinstance(event, DataReceived):
            body += event.data
    return status, body


@pytest.mark.parametrize(
    "alpn", [(b"http/1.1",), (b"x-other",), ()], ids=["http/1.1", "another", "none"]
)
@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte by byte"])
@pytest_twisted.ensureDeferred
async def test_a_site_serves_http_2_to_a_client_sending_the_preface(
    ca: CertificateFactory, alpn: tuple[bytes, ...], split: bool
) -> None:
    """
    HTTP/2 with prior knowledge, whatever ALPN said (Go's HTTPClient through
    a tunnel, or an h2c client behind Consul's proxy): the preface decides,
    even when it comes a byte at a time.
    """
    pytest.importorskip("h2")
    h = site_harness(ca)
    client, request = h2_request()
    chunks = [request[i : i + 1] for i in range(len(request))] if split else [request]
    conn = h.connect(chunks, alpn=alpn)
    conn.pump.flush()
    assert conn.client_app.handshake_done
    # twisted.web's HTTP/2 sends DATA frames from a call on the global
    # reactor (not the test's clock): let it run, a bounded number of turns.
    for _turn in range(20):
        if b"spoken=HTTP/2" in conn.client_app.received:
            break
        await deferLater(global_reactor, 0, lambda: None)
        conn.pump.flush()
    status, body = h2_response(client, conn.client_app.received)
    assert status == b"200"
    assert body == f"secure=True peer={ca.service_uri('api')} spoken=HTTP/2".encode()
    assert conn.server.negotiatedProtocol == b"h2"


def test_a_site_without_http_2_support_answers_the_preface_in_http_1_1(
    ca: CertificateFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Without twisted.web's HTTP/2 (no ``h2`` package) the Site is offered
    as HTTP/1.1 only and everything goes to its HTTP/1.1 channel, which
    refuses the preface as a bad request rather than failing inside Twisted.
    """
    import twisted.web.http

    monkeypatch.setattr(twisted.web.http, "H2_ENABLED", False)
    h = site_harness(ca)
    _client, request = h2_request() if _have_h2() else (None, b"PRI * HTTP/2.0\r\n")
    conn = h.connect([request], alpn=(b"h2",))
    conn.pump.flush()
    assert conn.client_app.handshake_done
    assert conn.client_app.received.startswith(b"HTTP/1.1 400 ")


def _have_h2() -> bool:
    try:
        import h2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("buffer_small_writes", [True, False], ids=["buffered", "not"])
def test_only_a_site_gets_the_sniffing_transport(
    ca: CertificateFactory, buffer_small_writes: bool
) -> None:
    """
    A Site gets Twisted's TLS transport through our subclass (either kind);
    any other factory gets Twisted's own, nothing held or sniffed.
    """
    h = site_harness(ca, buffer_small_writes=buffer_small_writes)
    conn = h.connect([GET], alpn=(b"h2",))
    conn.pump.flush()
    wanted = BufferingSniffedTLS if buffer_small_writes else SniffedTLS
    assert isinstance(conn.server, wanted)
    # ... and it carries half-close, as every Connect transport does.
    half_close = HalfCloseBufferingTLS if buffer_small_writes else HalfCloseTLS
    assert isinstance(conn.server, half_close)
    assert conn.client_app.received.startswith(b"HTTP/1.1 200 OK")

    class Echo(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[union-attr]

    plain = Harness(
        ca, FakeAuthorizer({"api"}), StaticSource(bundle(ca, ca.leaf("web")))
    )
    plain.listen(
        Factory.forProtocol(Echo),
        tls_protocol=None,
        buffer_small_writes=buffer_small_writes,
    )
    conn = plain.connect([b"PRI * HTTP/2.0\r\n"])
    conn.pump.flush()
    base = HalfCloseBufferingTLS if buffer_small_writes else HalfCloseTLS
    assert type(conn.server) is base
    assert conn.client_app.received == b"PRI * HTTP/2.0\r\n"
