"""
What connect_native takes from Twisted beyond its documented API, pinned:
each name below is one Twisted does not promise, and this test fails the day
a Twisted release moves it, before anything else breaks.  The list is in
docs/design.rst ("What comes from Twisted"); keep both in step.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.internet import ssl

PACKAGE = Path(__file__).resolve().parent.parent / "connect_native"


def test_the_trust_root_interface_is_where_the_type_is_imported_from() -> None:
    # consul/client.py names it in a type only (TYPE_CHECKING): Twisted has
    # no public name for the interface optionsForClientTLS's trustRoot takes.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

    assert IOpenSSLTrustRoot.providedBy(ssl.platformTrust())


def test_request_not_sent_is_the_pools_error() -> None:
    # _http.py retries a request whose pooled connection closed before it
    # was sent: twisted.web.client re-exports the class without listing it.
    from twisted.web import _newclient
    from twisted.web.client import RequestNotSent  # type: ignore[attr-defined]

    assert RequestNotSent is _newclient.RequestNotSent
    assert issubclass(RequestNotSent, Exception)


def test_an_http2_streams_connection_is_its_conn() -> None:
    # tls._ssl_connection finds the TLS connection of an HTTP/2 request
    # through its channel, twisted.web's H2Stream, which keeps its
    # H2Connection only in _conn (peer_identity() of an HTTP/2 request).
    import pytest

    pytest.importorskip("h2")
    from twisted.internet.testing import StringTransport
    from twisted.web._http2 import H2Connection, H2Stream
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    connection = H2Connection()
    connection.makeConnection(StringTransport())
    stream = H2Stream(1, connection, [], Request, Site(Resource()), None)
    assert stream.transport is None
    assert stream._conn is connection
    # tls._ssl_connection follows _conn only from this module's objects.
    assert type(stream).__module__ == "twisted.web._http2"


def test_no_other_private_twisted_import() -> None:
    """Every import of a private Twisted module or name is one listed here."""
    allowed = {("twisted.internet._sslverify", "IOpenSSLTrustRoot")}
    found = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "twisted"
            ):
                module = node.module or ""
                for alias in node.names:
                    private_module = any(p.startswith("_") for p in module.split("."))
                    if private_module or alias.name.startswith("_"):
                        found.add((module, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "twisted" and any(p.startswith("_") for p in parts):
                        found.add((alias.name, ""))
    assert found == allowed


def test_the_tls_transport_internals_half_close_overrides_are_there() -> None:
    # connect_native.tls._HalfClose replaces TLSMemoryBIOProtocol's
    # _flushReceiveBIO (the one loop that reads application data) with the
    # same loop, reading the private state it reads.
    import inspect

    from twisted.protocols.tls import TLSMemoryBIOProtocol

    for method in ("_flushReceiveBIO", "_flushSendBIO", "_shutdownTLS"):
        assert callable(getattr(TLSMemoryBIOProtocol, method))
    assert callable(TLSMemoryBIOProtocol._tlsShutdownFinished)
    # _reason: what the wrapped protocol's connectionLost() gets after an
    # SSL.Error (the Connect client says a server's refusal there).
    for attribute in ("_lostTLSConnection", "_aborted", "_reason"):
        assert hasattr(TLSMemoryBIOProtocol, attribute)
    lost = inspect.getsource(TLSMemoryBIOProtocol.connectionLost)
    assert "self._reason or reason" in lost
    source = inspect.getsource(TLSMemoryBIOProtocol._flushReceiveBIO)
    for name in ("_tlsConnection.recv", "ZeroReturnError", "_tlsShutdownFinished"):
        assert name in source
