"""
ConnectServerEndpoint's ``buffer_small_writes``: by default Twisted's TLS
transport holds a small write until the next turn of the reactor; with
``False`` the encrypted bytes reach the connection within the write itself.
The terminator's public listener uses ``False``.  In memory, with the
harness of ``tests/test_server.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

from connect_native.terminator._tls import TLSServerProtocol
from connect_native.testing import CertificateFactory, FakeAuthorizer
from tests.test_release_buffers import ADDRESS, public_listener
from tests.test_server import harness


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


def sent_by_server(conn: Any) -> bytes:
    return b"".join(conn.server_transport.stream)


@pytest.mark.parametrize("buffered", [True, False])
def test_a_small_write_reaches_the_connection_at_once_only_unbuffered(
    ca: CertificateFactory, buffered: bool
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}), buffer_small_writes=buffered)
    conn = h.connect()
    [app] = h.apps.built
    conn.pump.flush()
    before = sent_by_server(conn)
    app.transport.write(b"pong")  # type: ignore[union-attr]
    written_at_once = sent_by_server(conn) != before
    assert written_at_once is not buffered
    h.reactor.advance(0)
    conn.pump.flush()
    assert conn.client_app.received == b"pong"


def test_unbuffered_keeps_the_order_and_content_of_many_writes(
    ca: CertificateFactory,
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}), buffer_small_writes=False)
    conn = h.connect([b"early"])
    [app] = h.apps.built
    assert app.received == b"early"
    chunks = [bytes([i]) * (i * 997 % 70000 + 1) for i in range(40)]
    for chunk in chunks:
        app.transport.write(chunk)  # type: ignore[union-attr]
    conn.pump.flush()
    assert conn.client_app.received == b"".join(chunks)


def test_the_terminators_public_listener_uses_its_own_tls_transport() -> None:
    with public_listener(release=False) as factory:
        accepted = factory.buildProtocol(ADDRESS)
        # No wrapper either: it reports its lifetime to the tracker itself.
        assert isinstance(accepted, TLSServerProtocol)


def test_with_twisteds_tls_the_terminators_public_listener_writes_through() -> None:
    with public_listener(release=False, tls_transport="twisted") as factory:
        tls = factory.buildProtocol(ADDRESS).wrappedProtocol
        assert isinstance(tls, TLSMemoryBIOProtocol)
        assert not isinstance(tls, BufferingTLSTransport)
