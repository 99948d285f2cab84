"""
Tests for connect_native.tls: in-memory mutual TLS between connection
creators built from Bundles (two TLSMemoryBIOFactory, a shared Clock, iosim),
no sockets.

Certificates carry wall-clock validity that OpenSSL checks against real time,
so the test certificates are made around ``time.time()`` and the Clock starts
there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from attrs import evolve, frozen
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from zope.interface import implementer

from connect_native import tls as tls_module
from connect_native._certbuild import serial_hex
from connect_native.certs import Bundle, RootPEMs
from connect_native.identity import ServiceIdentity
from connect_native.testing import CertificateFactory, TestLeaf
from connect_native.tls import (
    ClientConnectionCreator,
    PeerIdentityMismatch,
    PeerRefused,
    ServerConnectionCreator,
    peer_identity,
    verified_peer,
)

HOUR = 3600.0
DAY = 24 * HOUR


# --- certificates ---------------------------------------------------------
#
# connect_native.testing's CertificateFactory, with the few conveniences
# these tests want: identities, Bundles, and a rotation's cross-signed chain.


def chain_of(leaf: TestLeaf) -> list[x509.Certificate]:
    """
    The certificates a peer presents after its leaf.
    """
    return x509.load_pem_x509_certificates(leaf.chain_pem.encode())[1:]


class CA:
    def __init__(self, trust_domain: str | None = None) -> None:
        self.factory = CertificateFactory(trust_domain)
        self.trust_domain = self.factory.trust_domain
        self._extra_chain = ""

    def uri(self, service: str) -> str:
        return self.factory.service_uri(service)

    def identity(self, service: str) -> ServiceIdentity:
        return ServiceIdentity.parse(self.uri(service))

    def leaf(self, service: str = "web", **kwargs: Any) -> TestLeaf:
        leaf = self.factory.leaf(service, **kwargs)
        return evolve(leaf, chain_pem=leaf.chain_pem + self._extra_chain)

    def another_ca(self) -> CA:
        """
        Another CA with the same trust domain: only the signatures differ.
        """
        return CA(self.trust_domain)

    def rotated_from(self, old: CA) -> None:
        """
        Leaves from now on carry this root cross-signed by ``old``, as after
        a Consul CA rotation.
        """
        self._extra_chain = old.factory.cross_sign(self.factory)

    def roots(self, *others: CA) -> list[RootPEMs]:
        return [RootPEMs(ca.factory.root_pem, ()) for ca in (self, *others)]

    def bundle(self, leaf: TestLeaf, *other_roots: CA) -> Bundle:
        return Bundle.build(
            leaf_cert_pem=leaf.chain_pem,
            private_key_pem=leaf.key_pem,
            roots=self.roots(*other_roots),
            trust_domain=self.trust_domain,
            now=time.time(),
        )


# --- in-memory connections --------------------------------------------------


@implementer(IHandshakeListener)
class Recorder(Protocol):
    def __init__(self) -> None:
        self.handshake_done = False
        self.received = b""
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


@frozen
class Connection:
    client: TLSMemoryBIOProtocol
    server: TLSMemoryBIOProtocol
    pump: IOPump
    client_app: Recorder
    server_app: Recorder


class RecorderFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: object) -> Recorder:
        protocol = Recorder()
        protocol.factory = self
        self.built.append(protocol)
        return protocol


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(time.time())
    return clock


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events  # type: ignore[misc]


def connect(server_creator: Any, client_creator: Any, clock: Clock) -> Connection:
    server_apps, client_apps = RecorderFactory(), RecorderFactory()
    server_factory = TLSMemoryBIOFactory(
        server_creator, False, server_apps, clock=clock
    )
    client_factory = TLSMemoryBIOFactory(client_creator, True, client_apps, clock=clock)
    address = IPv4Address("TCP", "127.0.0.1", 20000)
    client, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(address),
        lambda: client_factory.buildProtocol(address),
        clock=clock,
    )
    assert isinstance(client, TLSMemoryBIOProtocol)
    assert isinstance(server, TLSMemoryBIOProtocol)
    return Connection(client, server, pump, client_apps.built[0], server_apps.built[0])


def _peer_context(
    leaf: TestLeaf | None, version: int | None, ciphers: bytes | None
) -> SSL.Context:
    """
    A test's own peer: presenting ``leaf`` and its chain, speaking only
    ``version`` of TLS and only ``ciphers`` if given, checking nothing.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    if leaf is not None:
        context.use_certificate(leaf.certificate)
        context.use_privatekey(leaf.private_key)
        for certificate in chain_of(leaf):
            context.add_extra_chain_cert(certificate)
    if version is not None:
        context.set_min_proto_version(version)
        context.set_max_proto_version(version)
    if ciphers is not None:
        context.set_cipher_list(ciphers)
    return context


@implementer(IOpenSSLClientConnectionCreator)
class AnyClient:
    """
    A TLS client that presents whatever it is given and accepts any server,
    so that every refusal in these tests can only come from the server.
    """

    def __init__(
        self,
        leaf: TestLeaf | None,
        *,
        version: int | None = None,
        ciphers: bytes | None = None,
        session: SSL.Session | None = None,
    ) -> None:
        context = _peer_context(leaf, version, ciphers)
        context.set_verify(SSL.VERIFY_NONE)
        self.context = context
        self.session = session
        self.connections: list[SSL.Connection] = []

    def clientConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        if self.session is not None:
            connection.set_session(self.session)
        self.connections.append(connection)
        return connection


@implementer(IOpenSSLServerConnectionCreator)
class AnyServer:
    """
    A TLS server that presents whatever it is given and asks for no client
    certificate, so that every refusal can only come from the client.
    """

    def __init__(
        self,
        leaf: TestLeaf,
        *,
        version: int | None = None,
        ciphers: bytes | None = None,
    ) -> None:
        self.context = _peer_context(leaf, version, ciphers)

    def serverConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def server_refusals(events: list[LogEvent]) -> list[str]:
    return [
        e["reason"]
        for e in events
        if e.get("side") == "server" and e.get("decision") == "denied"
    ]


def client_refusals(events: list[LogEvent]) -> list[str]:
    return [
        e["reason"]
        for e in events
        if e.get("side") == "client" and e.get("decision") == "denied"
    ]


def assert_server_refused(conn: Connection) -> None:
    """
    The server ended the connection in the handshake: its application never
    saw a completed handshake, and it recorded no peer.
    """
    assert not conn.server_app.handshake_done
    assert conn.server_app.lost is not None
    assert peer_identity(conn.server) is None
    assert conn.server_app.received == b""


# --- the handshake ----------------------------------------------------------


def test_two_leaves_of_one_ca_connect_and_each_records_the_other(
    clock: Clock,
) -> None:
    """
    A web server and an api client with leaves from one CA complete the
    handshake; each side records the other's verified identity and serial.
    """
    ca = CA()
    web, api = ca.leaf("web"), ca.leaf("api")
    server = ServerConnectionCreator(ca.bundle(web))
    client = ClientConnectionCreator(ca.bundle(api), ca.identity("web"))

    conn = connect(server, client, clock)
    conn.client.write(b"hello")
    conn.pump.flush()

    assert conn.server_app.handshake_done
    assert conn.client_app.handshake_done
    assert conn.server_app.received == b"hello"
    assert peer_identity(conn.server) == ca.identity("api")
    assert peer_identity(conn.client) == ca.identity("web")
    peer = verified_peer(conn.server)
    assert peer is not None
    assert peer.certificate == api.certificate
    assert peer.serial == serial_hex(api.certificate.serial_number)
    assert peer.early_decision is None


def test_peer_identity_is_found_through_transport_attributes(clock: Clock) -> None:
    """
    Given the application protocol's transport (or something whose
    ``.transport`` leads to it, as for an HTTP/2 stream), peer_identity finds
    the TLS connection under it.
    """
    ca = CA()
    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web"))),
        ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web")),
        clock,
    )

    class Stream:
        transport = conn.server_app.transport

    assert peer_identity(conn.server_app.transport) == ca.identity("api")
    assert peer_identity(Stream()) == ca.identity("api")
    assert peer_identity(conn.server.getHandle()) == ca.identity("api")
    assert peer_identity(object()) is None


def test_peer_identity_is_found_through_a_web_requests_channel(clock: Clock) -> None:
    """
    Given a twisted.web ``Request`` (whose ``channel.transport`` is the TLS
    transport), peer_identity and verified_peer find the peer, as
    connect_native.peer_identity does, for which this is the lookup.
    """
    ca = CA()
    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web"))),
        ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web")),
        clock,
    )

    class Channel:
        transport = conn.server_app.transport

    class Request:
        channel = Channel()
        transport = None  # a finished request's

    assert peer_identity(Request()) == ca.identity("api")
    peer = verified_peer(Request())
    assert peer is not None
    assert peer.identity == ca.identity("api")


def test_peer_identity_of_an_http2_request_goes_through_its_stream(
    clock: Clock,
) -> None:
    """
    An HTTP/2 request's channel is twisted.web's H2Stream, which has no
    transport: the lookup follows its ``_conn`` (the H2Connection, whose
    transport is the TLS one), and only an H2Stream's.
    """
    pytest.importorskip("h2")
    from twisted.web._http2 import H2Connection, H2Stream
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    ca = CA()
    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web"))),
        ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web")),
        clock,
    )
    h2 = H2Connection()
    h2.makeConnection(conn.server)
    stream = H2Stream(1, h2, [], Request, Site(Resource()), None)
    request = stream._request
    assert request.transport is None
    assert peer_identity(request) == ca.identity("api")

    class NotAStream:
        transport = None
        _conn = h2

    class Impostor:
        channel = NotAStream()
        transport = None

    assert peer_identity(Impostor()) is None


def test_alpn_picks_the_servers_first_protocol_the_client_offers(
    clock: Clock,
) -> None:
    ca = CA()
    conn = connect(
        ServerConnectionCreator(
            ca.bundle(ca.leaf("web")), alpn_protocols=[b"h2", b"http/1.1"]
        ),
        ClientConnectionCreator(
            ca.bundle(ca.leaf("api")),
            ca.identity("web"),
            alpn_protocols=[b"http/1.1", b"h2"],
        ),
        clock,
    )
    assert conn.server.negotiatedProtocol == b"h2"
    assert conn.client.negotiatedProtocol == b"h2"


def test_alpn_without_overlap_completes_the_handshake_with_no_protocol(
    clock: Clock, logged: list[LogEvent]
) -> None:
    """
    A client offering only protocols we do not speak is not refused (issue
    17: Consul's built-in proxy offers only ``h2``, whatever it tunnels):
    the handshake completes, no protocol is selected, bytes flow.
    """
    ca = CA()
    conn = connect(
        ServerConnectionCreator(
            ca.bundle(ca.leaf("web")), alpn_protocols=[b"http/1.1"]
        ),
        ClientConnectionCreator(
            ca.bundle(ca.leaf("api")), ca.identity("web"), alpn_protocols=[b"h2"]
        ),
        clock,
    )
    assert conn.server_app.handshake_done
    assert conn.client_app.handshake_done
    assert conn.server.negotiatedProtocol is None
    assert conn.client.negotiatedProtocol is None
    assert peer_identity(conn.server) == ca.identity("api")
    conn.client.write(b"GET / HTTP/1.1\r\n")
    conn.pump.flush()
    assert conn.server_app.received == b"GET / HTTP/1.1\r\n"
    assert not any(e.get("log_level") == LogLevel.warn for e in logged)


# --- what the server refuses -----------------------------------------------


def test_no_client_certificate_is_refused_by_the_server(clock: Clock) -> None:
    ca = CA()
    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web"))), AnyClient(None), clock
    )
    assert_server_refused(conn)
    assert conn.server_app.lost is not None
    assert "peer did not return a certificate" in str(conn.server_app.lost.value)


def _bad_leaves(ca: CA) -> dict[str, tuple[TestLeaf, str]]:
    """
    Client leaves the server must refuse, each with a fragment of the reason
    the server gives.
    """
    td = ca.trust_domain
    f = ca.factory
    return {
        "self-signed": (f.self_signed("api"), "X509 error 18"),
        "another CA, same trust domain": (f.another_ca().leaf("api"), "X509 error 20"),
        "expired": (f.expired_leaf("api"), "X509 error 10"),
        "not yet valid": (f.not_yet_valid_leaf("api"), "X509 error 9"),
        "no URI SAN": (ca.leaf("api", uris=[]), "no spiffe:// URI SAN"),
        "two URI SANs": (
            ca.leaf("api", uris=[ca.uri("api"), ca.uri("admin")]),
            "2 spiffe:// URI SANs",
        ),
        "agent URI": (f.agent_leaf("node-1"), "agent identity"),
        "CA URI": (ca.leaf("api", uris=[f.ca_uri]), "CA signing identity"),
        "trust domain no root carries": (
            ca.leaf("api", trust_domain=f"{uuid.uuid4()}.consul"),
            "which no current root carries",
        ),
        "garbage path": (
            ca.leaf("api", uris=[f"spiffe://{td}/foo/bar"]),
            "not in a Consul format",
        ),
        "no datacenter": (
            ca.leaf("api", uris=[f"spiffe://{td}/ns/default/svc/api"]),
            "4 path segments",
        ),
        "missing service": (
            ca.leaf("api", uris=[f"spiffe://{td}/ns/default/dc/dc1/svc"]),
            "path segments",
        ),
        "extra segment": (
            ca.leaf("api", uris=[f"spiffe://{td}/ns/default/dc/dc1/svc/api/x"]),
            "path segments",
        ),
        "bad escape": (
            ca.leaf("api", uris=[f"spiffe://{td}/ns/default/dc/dc1/svc/a%zz"]),
            "bad percent escape",
        ),
        "empty trust domain": (
            ca.leaf("api", uris=["spiffe://"]),
            "empty trust domain",
        ),
        "serverAuth only": (
            ca.leaf("api", extended_key_usages=[ExtendedKeyUsageOID.SERVER_AUTH]),
            "X509 error 26",
        ),
        "no extended key usage": (
            ca.leaf("api", extended_key_usages=None),
            "has no extended key usage",
        ),
        "a CA certificate": (ca.leaf("api", ca=True), "is a CA certificate"),
    }


_BAD_LEAF_CASES = list(_bad_leaves(CA()))


@pytest.mark.parametrize("case", _BAD_LEAF_CASES)
def test_bad_client_certificate_is_refused_by_the_servers_verify(
    case: str, clock: Clock, logged: list[LogEvent]
) -> None:
    """
    The server's verify callback refuses each bad client leaf, logging why,
    and the handshake fails; the client accepts any server, so the refusal
    can only be the server's.
    """
    ca = CA()
    leaf, reason = _bad_leaves(ca)[case]
    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web"))), AnyClient(leaf), clock
    )
    assert_server_refused(conn)
    refusals = server_refusals(logged)
    assert len(refusals) == 1, refusals
    assert reason in refusals[0]


_BELOW_1_2 = pytest.mark.parametrize(
    "version", [SSL.TLS1_VERSION, SSL.TLS1_1_VERSION], ids=["TLS1.0", "TLS1.1"]
)

# Security level 0: the test's own peer may speak TLS 1.0 and 1.1, which
# OpenSSL's default level forbids.
_ANY_LEVEL = b"DEFAULT:@SECLEVEL=0"


def old_client(ca: CA, version: int) -> AnyClient:
    return AnyClient(ca.leaf("api"), version=version, ciphers=_ANY_LEVEL)


def old_server(ca: CA, version: int) -> AnyServer:
    return AnyServer(ca.leaf("web"), version=version, ciphers=_ANY_LEVEL)


def assert_no_version_in_common(conn: Connection) -> None:
    """
    Neither side finished the handshake: the server found no TLS version it
    shares with the client and said so with a protocol_version alert.
    """
    assert not conn.server_app.handshake_done
    assert not conn.client_app.handshake_done
    assert conn.server_app.lost is not None
    assert "unsupported protocol" in str(conn.server_app.lost.value)
    assert conn.client_app.lost is not None
    assert "protocol version" in str(conn.client_app.lost.value)


@_BELOW_1_2
def test_tls_below_1_2_is_refused_by_the_server(version: int, clock: Clock) -> None:
    """
    A client configured to offer only TLS 1.0 or 1.1 is refused by the
    server with a protocol version alert.
    """
    ca = CA()
    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web"))),
        old_client(ca, version),
        clock,
    )
    assert_server_refused(conn)
    assert_no_version_in_common(conn)


@_BELOW_1_2
def test_tls_below_1_2_is_not_offered_by_the_client(version: int, clock: Clock) -> None:
    """
    Our client offers nothing below TLS 1.2, so a server speaking only
    TLS 1.0 or 1.1 finds no version in common.
    """
    ca = CA()
    conn = connect(
        old_server(ca, version),
        ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web")),
        clock,
    )
    assert_no_version_in_common(conn)
    assert peer_identity(conn.client) is None


# What a host with a legacy crypto policy configures: TLS 1.0 and security
# level 0 for every context that does not say otherwise.
_LEGACY_OPENSSL_CONF = """\
openssl_conf = openssl_init

[openssl_init]
ssl_conf = ssl_sect

[ssl_sect]
system_default = system_default_sect

[system_default_sect]
MinProtocol = TLSv1
CipherString = DEFAULT@SECLEVEL=0
"""


def check_the_tls_floor() -> None:
    """
    The two tests above, after showing that peers with this OpenSSL's
    defaults do connect with TLS 1.0 and 1.1; run by the next test in an
    interpreter started with the legacy configuration.
    """
    clock = Clock()
    clock.advance(time.time())
    ca = CA()
    for version in (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION):
        for conn in (
            connect(AnyServer(ca.leaf("web")), old_client(ca, version), clock),
            connect(old_server(ca, version), AnyClient(ca.leaf("api")), clock),
        ):
            assert conn.server_app.handshake_done, conn.server_app.lost
            assert conn.server.getHandle().get_protocol_version() == version
        test_tls_below_1_2_is_refused_by_the_server(version, clock)
        test_tls_below_1_2_is_not_offered_by_the_client(version, clock)
    print("the floor held")


def test_the_tls_floor_holds_where_openssl_allows_tls_1_0(tmp_path: Path) -> None:
    """
    OpenSSL's default security level alone already rules out TLS 1.0 and
    1.1, so the tests above pass without connect_native's own floor.  Under a
    configuration allowing them (read once, when OpenSSL starts: hence a new
    interpreter), peers with OpenSSL's defaults connect with them, and ours
    still refuse them for their version (without the floor, our TLS 1.2-only
    cipher list would end the handshake, with "no shared cipher").
    """
    conf = tmp_path / "openssl.cnf"
    conf.write_text(_LEGACY_OPENSSL_CONF)
    root = Path(__file__).resolve().parent.parent
    path = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    result = subprocess.run(
        [sys.executable, "-c", "import tests.test_tls as t; t.check_the_tls_floor()"],
        cwd=root,
        env={
            **os.environ,
            "OPENSSL_CONF": str(conf),
            "PYTHONPATH": os.pathsep.join(path),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the floor held\n"


def _options(context: SSL.Context) -> int:
    # pyOpenSSL has set_options but no getter; setting nothing returns the
    # current options.  Only for an unused context.
    return context.set_options(0)


def test_server_context_forbids_renegotiation_and_resumption() -> None:
    ca = CA()
    context = ServerConnectionCreator(ca.bundle(ca.leaf("web"))).context
    options = _options(context)
    assert options & SSL.OP_NO_RENEGOTIATION
    assert options & SSL.OP_NO_TICKET
    assert context.get_session_cache_mode() == SSL.SESS_CACHE_OFF
    assert context.get_verify_mode() == (
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    )


def test_renegotiation_is_refused_by_the_server(clock: Clock) -> None:
    """
    A TLS 1.2 client that asks to renegotiate after the handshake gets no
    second handshake: the server answers with a no_renegotiation alert.

    OpenSSL 3 and later refuse client-initiated renegotiation by default as
    well; the test above checks that the server does not rely on that.
    """
    ca = CA()
    client = AnyClient(ca.leaf("api"), version=SSL.TLS1_2_VERSION)
    conn = connect(ServerConnectionCreator(ca.bundle(ca.leaf("web"))), client, clock)
    assert conn.server_app.handshake_done
    server_tls = conn.server.getHandle()
    assert server_tls.get_protocol_version_name() == "TLSv1.2"

    # The client's OpenSSL writes a renegotiation ClientHello; put it on the
    # wire ourselves (Twisted sends nothing until it has application data).
    client_tls = conn.client.getHandle()
    assert client_tls.renegotiate()
    with pytest.raises(SSL.WantReadError):
        client_tls.do_handshake()
    conn.client.transport.write(client_tls.bio_read(65536))
    conn.pump.flush()

    assert server_tls.total_renegotiations() == 0
    assert conn.client_app.lost is not None
    assert "no renegotiation" in str(conn.client_app.lost.value)


def session_reused(connection: SSL.Connection) -> bool:
    # pyOpenSSL wraps SSL_session_reused in no public method.
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(connection._ssl))


def test_a_session_cannot_be_resumed(clock: Clock) -> None:
    """
    A second connection offering the first one's session gets a full
    handshake, so the server verifies the client's certificate again.
    """
    ca = CA()
    server = ServerConnectionCreator(ca.bundle(ca.leaf("web")))
    api = ca.leaf("api")
    client = AnyClient(api)
    first = connect(server, client, clock)
    first.client.write(b"1")
    first.pump.flush()
    assert first.server_app.handshake_done
    session = first.client.getHandle().get_session()
    assert session is not None

    client.session = session
    second = connect(server, client, clock)
    second.client.write(b"2")
    second.pump.flush()

    assert second.server_app.handshake_done
    assert not session_reused(second.server.getHandle())
    assert not session_reused(client.connections[1])
    assert peer_identity(second.server) == ca.identity("api")


# --- decide_now -------------------------------------------------------------


def test_decide_now_false_refuses_the_handshake(
    clock: Clock, logged: list[LogEvent]
) -> None:
    ca = CA()
    asked: list[ServiceIdentity] = []

    def deny(peer: ServiceIdentity) -> bool:
        asked.append(peer)
        return False

    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web")), decide_now=deny),
        AnyClient(ca.leaf("api")),
        clock,
    )
    assert asked == [ca.identity("api")]
    assert_server_refused(conn)
    assert "not allowed" in server_refusals(logged)[0]


@pytest.mark.parametrize("decision", [True, None])
def test_decide_now_allowing_or_undecided_is_recorded(
    decision: bool | None, clock: Clock
) -> None:
    ca = CA()
    conn = connect(
        ServerConnectionCreator(
            ca.bundle(ca.leaf("web")), decide_now=lambda peer: decision
        ),
        AnyClient(ca.leaf("api")),
        clock,
    )
    assert conn.server_app.handshake_done
    peer = verified_peer(conn.server)
    assert peer is not None
    assert peer.early_decision is decision


def test_decide_peer_now_is_given_the_identity_and_colon_hex_serial(
    clock: Clock, logged: list[LogEvent]
) -> None:
    ca = CA()
    api = ca.leaf("api")
    asked: list[tuple[ServiceIdentity, str]] = []

    def deny(peer: ServiceIdentity, serial: str) -> bool:
        asked.append((peer, serial))
        return False

    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web")), decide_peer_now=deny),
        AnyClient(api),
        clock,
    )
    assert asked == [(ca.identity("api"), serial_hex(api.certificate.serial_number))]
    assert_server_refused(conn)
    assert "not allowed" in server_refusals(logged)[0]


def test_decide_now_and_decide_peer_now_are_exclusive() -> None:
    ca = CA()
    with pytest.raises(ValueError, match="not both"):
        ServerConnectionCreator(
            ca.bundle(ca.leaf("web")),
            decide_now=lambda peer: None,
            decide_peer_now=lambda peer, serial: None,
        )


def test_an_error_in_decide_now_refuses_the_peer(
    clock: Clock, logged: list[LogEvent]
) -> None:
    """
    Fail closed: an exception inside the verify callback refuses the
    handshake and is logged.
    """
    ca = CA()

    def broken(peer: ServiceIdentity) -> bool:
        raise RuntimeError("authorizer exploded")

    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web")), decide_now=broken),
        AnyClient(ca.leaf("api")),
        clock,
    )
    assert_server_refused(conn)
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert failures[0]["side"] == "server"
    assert failures[0]["log_failure"].check(RuntimeError)


# --- the client side --------------------------------------------------------


def test_client_refuses_a_server_of_another_service_naming_both_uris(
    clock: Clock, logged: list[LogEvent]
) -> None:
    ca = CA()
    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("db"))),
        ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web")),
        clock,
    )
    assert conn.client_app.lost is not None
    error = conn.client_app.lost.value
    assert isinstance(error, PeerIdentityMismatch)
    assert error.got == ca.uri("db")
    assert error.wanted == ca.uri("web")
    assert ca.uri("db") in str(error)
    assert ca.uri("web") in str(error)
    assert peer_identity(conn.client) is None
    assert not conn.server_app.handshake_done or conn.server_app.lost is not None
    assert client_refusals(logged) == [str(error)]


def test_client_matches_service_names_as_consul_does(clock: Clock) -> None:
    """
    The expected service compares ASCII case-insensitively (Go's
    strings.EqualFold), so a client expecting ``Web`` reaches ``web``.
    """
    ca = CA()
    conn = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web"))),
        ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("Web")),
        clock,
    )
    assert conn.client_app.handshake_done
    assert peer_identity(conn.client) == ca.identity("web")


def test_client_refuses_a_server_of_another_ca(clock: Clock) -> None:
    ca = CA()
    stranger = ca.another_ca()
    conn = connect(
        ServerConnectionCreator(stranger.bundle(stranger.leaf("web"))),
        ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web")),
        clock,
    )
    assert conn.client_app.lost is not None
    error = conn.client_app.lost.value
    assert isinstance(error, PeerRefused)
    assert "does not verify" in str(error)
    assert peer_identity(conn.client) is None


def test_client_refuses_a_server_leaf_without_server_auth(clock: Clock) -> None:
    ca = CA()
    server_leaf = ca.leaf("web", extended_key_usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    conn = connect(
        AnyServer(server_leaf),
        ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web")),
        clock,
    )
    assert conn.client_app.lost is not None
    assert isinstance(conn.client_app.lost.value, PeerRefused)
    assert peer_identity(conn.client) is None


# --- the system's trust store -------------------------------------------------


def test_a_ca_the_system_trusts_is_not_trusted_on_either_side(
    clock: Clock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    logged: list[LogEvent],
) -> None:
    """
    Only the Bundle's roots are trust anchors.  A CA that OpenSSL's default
    verify paths trust (here through ``SSL_CERT_FILE``), issuing leaves with
    the right trust domain and a well-formed SPIFFE ID, is refused by our
    server and by our client, whose peers check nothing themselves.
    """
    ca = CA()
    system = ca.another_ca()
    assert system.trust_domain == ca.trust_domain
    trusted = tmp_path / "cert.pem"
    trusted.write_text(system.factory.root_pem)
    (tmp_path / "certs").mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "certs"))
    api, web = system.leaf("api"), system.leaf("web")
    # The premise: a context using the default verify paths trusts them.
    witness = SSL.Context(SSL.TLS_METHOD)
    witness.set_default_verify_paths()
    store = witness.get_cert_store()
    assert store is not None
    for leaf in (api, web):
        crypto.X509StoreContext(
            store, crypto.X509.from_cryptography(leaf.certificate)
        ).verify_certificate()

    to_server = connect(
        ServerConnectionCreator(ca.bundle(ca.leaf("web"))), AnyClient(api), clock
    )
    assert_server_refused(to_server)
    [server_refusal] = server_refusals(logged)
    assert "does not verify against the current roots" in server_refusal

    to_client = connect(
        AnyServer(web),
        ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web")),
        clock,
    )
    assert not to_client.client_app.handshake_done
    assert to_client.client_app.lost is not None
    error = to_client.client_app.lost.value
    assert isinstance(error, PeerRefused)
    assert "does not verify against the current roots" in str(error)
    assert peer_identity(to_client.client) is None
    assert to_client.server_app.received == b""


# --- rotation and renewal -----------------------------------------------------


def test_after_rotation_a_new_leaf_verifies_with_peers_trusting_only_the_old_root(
    clock: Clock,
) -> None:
    """
    During a CA rotation a leaf from the new root carries the new root
    cross-signed by the old one; a peer that still knows only the old root
    builds the chain through it, on both sides of the connection.
    """
    old = CA()
    new = old.another_ca()
    new.rotated_from(old)

    new_web = new.leaf("web")
    assert chain_of(new_web)
    # The new side knows both roots; the old side only the old one.
    server = ServerConnectionCreator(new.bundle(new_web, old))
    client = ClientConnectionCreator(old.bundle(old.leaf("api")), old.identity("web"))
    conn = connect(server, client, clock)
    assert conn.client_app.handshake_done
    assert conn.server_app.handshake_done
    assert peer_identity(conn.client) == old.identity("web")

    server = ServerConnectionCreator(old.bundle(old.leaf("web")))
    client = ClientConnectionCreator(
        new.bundle(new.leaf("api"), old), old.identity("web")
    )
    conn = connect(server, client, clock)
    assert conn.client_app.handshake_done
    assert conn.server_app.handshake_done
    assert peer_identity(conn.server) == old.identity("api")


def test_without_the_cross_signed_certificate_old_root_peers_refuse(
    clock: Clock,
) -> None:
    """
    The counterpart of the test above: the same new leaf, without the
    cross-signed intermediate, is refused by a server knowing only the old
    root.
    """
    old = CA()
    new = old.another_ca()
    conn = connect(
        ServerConnectionCreator(old.bundle(old.leaf("web"))),
        AnyClient(new.leaf("api")),
        clock,
    )
    assert_server_refused(conn)


def test_a_new_bundle_gives_a_new_context_and_open_connections_keep_theirs(
    clock: Clock,
) -> None:
    """
    After a leaf renewal, new creators own a new context; a connection made
    before keeps the old certificate and keeps working, and a new connection
    presents the new one.
    """
    ca = CA()
    api = ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web"))
    before_leaf, after_leaf = ca.leaf("web"), ca.leaf("web")
    before = ServerConnectionCreator(ca.bundle(before_leaf))
    old_conn = connect(before, api, clock)
    assert old_conn.client_app.handshake_done

    after = ServerConnectionCreator(ca.bundle(after_leaf))
    new_conn = connect(after, api, clock)

    assert after.context is not before.context
    assert verified_peer(old_conn.client) is not None
    assert verified_peer(old_conn.client).certificate == before_leaf.certificate  # type: ignore[union-attr]
    assert verified_peer(new_conn.client).certificate == after_leaf.certificate  # type: ignore[union-attr]
    # The old connection still carries traffic, with its old context.
    old_conn.client.write(b"still here")
    old_conn.pump.flush()
    assert old_conn.server_app.received == b"still here"
    assert old_conn.server.getHandle().get_context() is before.context
    # And the old creator still makes connections with the old leaf.
    again = connect(before, api, clock)
    assert verified_peer(again.client).certificate == before_leaf.certificate  # type: ignore[union-attr]


def test_creators_refuse_malformed_alpn_protocols() -> None:
    ca = CA()
    bundle = ca.bundle(ca.leaf("web"))
    with pytest.raises(ValueError, match="alpn_protocols"):
        ServerConnectionCreator(bundle, alpn_protocols=["h2"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="alpn_protocols"):
        ClientConnectionCreator(bundle, ca.identity("db"), alpn_protocols=[b""])
    with pytest.raises(TypeError, match="ServiceIdentity"):
        ClientConnectionCreator(bundle, ca.uri("db"))  # type: ignore[arg-type]


# --- leaves checked once per creator -------------------------------------------


@pytest.fixture
def leaf_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """
    The URIs of the leaves the creators parse and check, in order.
    """
    checked: list[str] = []
    real = tls_module._check_leaf

    def counting(
        bundle: Bundle, leaf: x509.Certificate, usage: Any, role: str
    ) -> ServiceIdentity:
        identity = real(bundle, leaf, usage, role)
        checked.append(identity.uri)
        return identity

    monkeypatch.setattr(tls_module, "_check_leaf", counting)
    return checked


def test_a_returning_client_leaf_is_checked_once_but_authorized_every_time(
    clock: Clock, leaf_checks: list[str]
) -> None:
    """
    A client reconnecting with the same leaf is recognised by its bytes: its
    fields are not parsed and checked again, but every connection records
    the peer and asks decide_peer_now afresh.
    """
    ca = CA()
    api = ca.leaf("api")
    asked: list[str] = []

    def decide(identity: ServiceIdentity, serial: str) -> bool:
        asked.append(serial)
        return True

    server = ServerConnectionCreator(ca.bundle(ca.leaf("web")), decide_peer_now=decide)
    for _ in range(3):
        conn = connect(server, AnyClient(api), clock)
        assert conn.server_app.handshake_done
        assert peer_identity(conn.server) == ca.identity("api")
        peer = verified_peer(conn.server)
        assert peer is not None
        assert peer.certificate == api.certificate
    assert leaf_checks == [ca.uri("api")]
    assert asked == [serial_hex(api.certificate.serial_number)] * 3

    # Another creator (a new Bundle: other roots, other trust domains)
    # checks for itself.
    connect(ServerConnectionCreator(ca.bundle(ca.leaf("web"))), AnyClient(api), clock)
    assert leaf_checks == [ca.uri("api")] * 2


def test_a_refused_leaf_is_checked_and_logged_every_time(
    clock: Clock, leaf_checks: list[str], logged: list[LogEvent]
) -> None:
    ca = CA()
    server = ServerConnectionCreator(ca.bundle(ca.leaf("web")))
    bad = ca.leaf("api", extended_key_usages=None)
    for _ in range(2):
        assert_server_refused(connect(server, AnyClient(bad), clock))
    refusals = server_refusals(logged)
    assert len(refusals) == 2
    assert all("has no extended key usage" in r for r in refusals)


def test_a_refused_decision_is_not_remembered_as_allowed(clock: Clock) -> None:
    """
    Only the certificate's own facts are remembered: a peer allowed once and
    denied the next time is refused.
    """
    ca = CA()
    api = ca.leaf("api")
    answers = [True, False]
    server = ServerConnectionCreator(
        ca.bundle(ca.leaf("web")), decide_now=lambda peer: answers.pop(0)
    )
    assert connect(server, AnyClient(api), clock).server_app.handshake_done
    assert_server_refused(connect(server, AnyClient(api), clock))


def test_the_remembered_leaves_are_bounded(
    clock: Clock, leaf_checks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A creator remembers at most _LEAVES_KEPT leaves, forgetting the oldest.
    """
    monkeypatch.setattr(tls_module, "_LEAVES_KEPT", 2)
    ca = CA()
    server = ServerConnectionCreator(ca.bundle(ca.leaf("web")))
    leaves = [ca.leaf(name) for name in ("a", "b", "c")]
    for leaf in [*leaves, leaves[2], leaves[0]]:
        assert connect(server, AnyClient(leaf), clock).server_app.handshake_done
    # c was still remembered; a had been forgotten when c came.
    assert leaf_checks == [ca.uri("a"), ca.uri("b"), ca.uri("c"), ca.uri("a")]


def test_a_returning_server_leaf_is_still_matched_against_the_expected_service(
    clock: Clock, leaf_checks: list[str]
) -> None:
    """
    The client side remembers a server's leaf too, and still compares its
    identity with the service it means to reach on every connection.
    """
    ca = CA()
    web = ca.leaf("web")
    client = ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("web"))
    for _ in range(2):
        conn = connect(AnyServer(web), client, clock)
        assert peer_identity(conn.client) == ca.identity("web")
    assert leaf_checks == [ca.uri("web")]
    wrong = ClientConnectionCreator(ca.bundle(ca.leaf("api")), ca.identity("db"))
    for _ in range(2):
        conn = connect(AnyServer(web), wrong, clock)
        assert peer_identity(conn.client) is None
        assert conn.client_app.lost is not None
