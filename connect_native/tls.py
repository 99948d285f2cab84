"""
TLS for Connect: OpenSSL connection creators built from a
:class:`~connect_native.certs.Bundle`, their verify callbacks, and the record
of which peer each connection verified.

Each creator owns one ``OpenSSL.SSL.Context``, configured completely when the
creator is made and never touched again (pyOpenSSL refuses to modify a context
that has made a connection).  A new Bundle means new creators; connections
opened with the old ones keep their context, certificate and roots.

Chain verification is OpenSSL's own, inside the handshake: the context's
certificate store holds every current root as a trust anchor, and OpenSSL
builds the chain with the intermediates the peer sends (a cross-signed one
during a CA rotation, a secondary datacenter's or an external CA's
intermediate), checks signatures, validity at the current time and basic
constraints, and the TLS purpose (client authentication when we are the
server, server authentication when we are the client).  The verify callback
then checks the leaf (depth 0): the extended key usage, exactly one
``spiffe://`` service URI (:func:`connect_native.identity.identity_of_certificate`),
a trust domain that a current root carries, and, for a client, the expected
service.  Each creator remembers the leaves that passed those checks, by
their bytes, so a returning peer's certificate is not parsed again (the chain
is still verified and authorization still asked in every handshake).
``cryptography.x509.verification`` is not used in the handshake
because OpenSSL's verify callback is not given the intermediates the peer sent
(pyOpenSSL sets the peer chain only after verification), and a check after the
handshake would let a TLS 1.3 client finish its handshake before being
refused.

Anything unexpected inside a callback refuses the peer (fail closed) and is
logged with :mod:`twisted.logger`.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from attrs import evolve, frozen
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native import _logging
from connect_native.certs import Bundle
from connect_native.errors import (
    PeerIdentityMismatch,
    PeerRefused,
)
from connect_native.identity import (
    InvalidIdentity,
    ServiceIdentity,
    identity_of_certificate,
)

__all__ = [
    "ClientConnectionCreator",
    "DecideNow",
    "DecidePeerNow",
    "HalfCloseBufferingTLS",
    "HalfCloseTLS",
    "PeerIdentityMismatch",
    "PeerRefused",
    "ServerConnectionCreator",
    "VerifiedPeer",
    "peer_identity",
    "received_alert",
    "verified_peer",
]

_log = Logger(observer=_logging.observer)

#: ``decide_now(peer)``: allow (True), deny (False, a TLS alert), or
#: undecided (None: the authorization gate decides after the handshake).
DecideNow = Callable[[ServiceIdentity], "bool | None"]

#: ``decide_peer_now(identity, serial)``: as :data:`DecideNow`, also given the
#: leaf's serial in Consul's colon-hex form (what an authorizer that remembers
#: decisions per certificate needs).
DecidePeerNow = Callable[[ServiceIdentity, str], "bool | None"]

# TLS 1.2 cipher suites: forward-secret AEAD only, as Consul's Go library
# (connect/tls.go defaultTLSConfig).  TLS 1.3 suites are all AEAD already.
_TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"

# Resumption would skip the verify callback, and with it every identity
# check, so it must be impossible: no server session cache, no tickets.
# TLS 1.3 servers still send (stateful) NewSessionTicket messages with
# OP_NO_TICKET; with the cache off they name sessions nobody stored, so a
# client offering one gets a full handshake.  pyOpenSSL has no
# set_num_tickets to stop sending them.
_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_NO_TICKET
    | SSL.OP_CIPHER_SERVER_PREFERENCE
)

_MAX_PEER_CHAIN_DEPTH = 8

# Which certificate each side verifies.
_PEER_ROLE = {"server": "client", "client": "server"}


@frozen
class VerifiedPeer:
    """
    What the verify callback established about a connection's peer.

    :ivar identity: the peer's service identity.
    :ivar certificate: the peer's leaf certificate.
    :ivar serial: its serial number in Consul's colon-hex form (as
        ``ClientCertSerial`` in ``/v1/agent/connect/authorize``).
    :ivar early_decision: what ``decide_now`` said in the handshake: ``True``
        (allowed), or ``None`` (undecided, or no ``decide_now``; the
        authorization gate must decide).  A denial never gets this far.
    """

    identity: ServiceIdentity
    certificate: x509.Certificate
    serial: str
    early_decision: bool | None = None


# Keyed by the OpenSSL connection: Twisted keeps the connection's app data
# for the TLS protocol, and a weak key lets the record go with the connection.
_verified: weakref.WeakKeyDictionary[SSL.Connection, VerifiedPeer] = (
    weakref.WeakKeyDictionary()
)
# Refusals our verify callback made (and logged), so that the layer above
# need not log the failed handshake a second time.
_refusals: weakref.WeakKeyDictionary[SSL.Connection, PeerRefused] = (
    weakref.WeakKeyDictionary()
)


#: OpenSSL's reason for an alert the peer sent ("tlsv1 alert internal
#: error"); errors OpenSSL finds itself are named otherwise ("certificate
#: verify failed").
_RECEIVED_ALERT = re.compile(r"^(?:sslv3|tlsv1|tlsv13) alert (.+)$")


def received_alert(error: object) -> str | None:
    """
    The name of the TLS alert the peer sent (``"internal error"``, ``"bad
    certificate"``), when ``error`` (an exception or a ``Failure``) is
    OpenSSL's report of one; ``None`` for anything else.
    """
    if isinstance(error, Failure):
        error = error.value
    if not isinstance(error, SSL.Error) or not error.args:
        return None
    reasons = error.args[0] if isinstance(error.args[0], list) else []
    for item in reasons:
        if isinstance(item, tuple) and item:
            found = _RECEIVED_ALERT.match(str(item[-1]))
            if found is not None:
                return found.group(1)
    return None


def _ssl_connection(transport: object) -> SSL.Connection | None:
    """
    Find the OpenSSL connection under ``transport``: the object itself, the
    handle of a TLS transport (``TLSMemoryBIOProtocol.getHandle()``), or that
    of a transport further down the ``.transport`` attributes (an HTTP/2
    stream's connection, say).
    """
    current: object = transport
    for _ in range(_MAX_PEER_CHAIN_DEPTH):
        if current is None:
            return None
        if isinstance(current, SSL.Connection):
            return current
        get_handle = getattr(current, "getHandle", None)
        if callable(get_handle):
            try:
                handle = get_handle()
            except Exception:
                handle = None
            if isinstance(handle, SSL.Connection):
                return handle
        below = getattr(current, "transport", None)
        if below is None and type(current).__module__ == "twisted.web._http2":
            # twisted.web's HTTP/2 stream (H2Stream, a Request's channel)
            # has no transport and keeps its connection only in ``_conn``
            # (docs/design.rst, "What comes from Twisted").  Only there: an
            # attribute of that name elsewhere is nothing we know.
            below = getattr(current, "_conn", None)
        current = below
    return None


def verified_peer(transport: object) -> VerifiedPeer | None:
    """
    The peer that the handshake of ``transport`` verified, or ``None`` if it
    verified none (not a Connect TLS connection, the handshake not done, or
    the peer refused).  Treat ``None`` as unauthenticated.

    :param transport: a TLS transport, or anything whose ``.transport``
        chain leads to one (a protocol, an HTTP/2 stream), a twisted.web
        ``Request`` (its ``channel.transport``), or an
        ``OpenSSL.SSL.Connection``.
    """
    candidates: list[object] = []
    channel = getattr(transport, "channel", None)
    if channel is not None:
        candidates.append(getattr(channel, "transport", None))
        candidates.append(channel)
    candidates.append(transport)
    for candidate in candidates:
        connection = _ssl_connection(candidate)
        if connection is not None:
            peer = _verified.get(connection)
            if peer is not None:
                return peer
    return None


def peer_identity(transport: object) -> ServiceIdentity | None:
    """
    The service identity of the peer of ``transport``, as verified in its
    TLS handshake; ``None`` if there is none (see :func:`verified_peer`).

    This is the lookup behind :func:`connect_native.peer_identity`, which
    takes the same arguments and raises
    :class:`~connect_native.errors.NotAConnectConnection` instead of
    returning ``None``: use that one unless your code handles an
    unauthenticated peer itself.
    """
    peer = verified_peer(transport)
    return None if peer is None else peer.identity


def _serial(certificate: x509.Certificate) -> str:
    serial = certificate.serial_number
    length = max(1, (serial.bit_length() + 7) // 8)
    return ":".join(f"{b:02x}" for b in serial.to_bytes(length, "big"))


def _x509_error_text(errno: int) -> str:
    # Only the refusal's wording: the peer is refused whatever this returns.
    # OpenSSL's text for a verify error is reachable only through pyOpenSSL's
    # private cffi bindings (X509StoreContextError carries it, but only from
    # a verification pyOpenSSL ran itself); if they move, the errno alone is
    # shown.
    try:
        from OpenSSL._util import ffi, lib

        text: bytes = ffi.string(lib.X509_verify_cert_error_string(errno))
        return text.decode("ascii", "replace")
    except Exception:
        return "unknown error"


def _describe(certificate: crypto.X509) -> str:
    try:
        cert = certificate.to_cryptography()
        subject = cert.subject.rfc4514_string() or "empty subject"
        return f"{subject}, serial {cert.serial_number:#x}"
    except Exception:
        return "unreadable certificate"


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca


def _check_leaf(
    bundle: Bundle, leaf: x509.Certificate, usage: x509.ObjectIdentifier, role: str
) -> ServiceIdentity:
    """
    The peer leaf's identity, if it may be a Connect ``role`` ("client" or
    "server"); :class:`PeerRefused` saying why not otherwise.
    """
    if _is_ca(leaf):
        raise PeerRefused(
            f"the {role} certificate is a CA certificate (BasicConstraints "
            "CA:TRUE), not a service's leaf"
        )
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise PeerRefused(
            f"the {role} certificate has no extended key usage; a Connect leaf "
            f"carries TLS {role} authentication"
        ) from None
    if usage not in usages:
        raise PeerRefused(
            f"the {role} certificate lacks the TLS {role} authentication "
            "extended key usage"
        )
    try:
        identity = identity_of_certificate(leaf)
    except InvalidIdentity as e:
        raise PeerRefused(f"the {role} certificate: {e}") from None
    if identity.trust_domain not in bundle.trust_domains:
        raise PeerRefused(
            f"the {role} certificate's identity {identity.uri} is in trust "
            f"domain {identity.trust_domain!r}, which no current root carries "
            f"(roots carry {', '.join(sorted(bundle.trust_domains))})"
        )
    return identity


#: How many distinct peer leaves a creator remembers as checked.
_LEAVES_KEPT = 256


class _Leaves:
    """
    The peer leaves that passed :func:`_check_leaf` for one creator (so one
    Bundle and its trust domains), by their DER bytes.

    A peer reconnecting with the same certificate, the usual case since a
    leaf lives for days, is then neither parsed nor checked again: that work
    was about 60 us of every handshake.  What is remembered is only what the
    certificate's own bytes decide (its identity, key usages, serial); OpenSSL
    still verifies the chain, the signatures and the validity period in every
    handshake, and authorization is asked every time.  A leaf that fails is
    not remembered, so each refusal is worked out and logged afresh.
    """

    def __init__(self, bundle: Bundle, usage: x509.ObjectIdentifier, role: str) -> None:
        self._bundle = bundle
        self._usage = usage
        self._role = role
        self._passed: dict[bytes, tuple[x509.Certificate, ServiceIdentity, str]] = {}

    def check(
        self, certificate: crypto.X509
    ) -> tuple[x509.Certificate, ServiceIdentity, str]:
        """
        The leaf, its identity and its colon-hex serial; :class:`PeerRefused`
        if it may not be a Connect peer in this role.
        """
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
        known = self._passed.get(der)
        if known is not None:
            return known
        leaf = x509.load_der_x509_certificate(der)
        identity = _check_leaf(self._bundle, leaf, self._usage, self._role)
        checked = (leaf, identity, _serial(leaf))
        if len(self._passed) >= _LEAVES_KEPT:
            # The oldest first: dicts keep insertion order.
            del self._passed[next(iter(self._passed))]
        self._passed[der] = checked
        return checked


def _refused(side: str, reason: str, depth: int, certificate: str) -> None:
    _log.warn(
        "TLS {side}: refused the peer's certificate ({certificate}, depth "
        "{depth}): {reason}",
        side=side,
        reason=reason,
        depth=depth,
        certificate=certificate,
        decision="denied",
    )


VerifyCallback = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


def _verify_callback(
    side: str,
    check: Callable[[SSL.Connection, crypto.X509], VerifiedPeer],
    on_refusal: Callable[[SSL.Connection, PeerRefused], None],
    log_refusals: bool = True,
) -> VerifyCallback:
    """
    A pyOpenSSL verify callback: OpenSSL's chain result at every depth, then
    ``check`` on the leaf, and every failure a refusal.  Without
    ``log_refusals`` the layer that knows the peer's address logs them
    (from :func:`refusal_of`).
    """

    def callback(
        connection: SSL.Connection,
        certificate: crypto.X509,
        errno: int,
        depth: int,
        ok: int,
    ) -> bool:
        try:
            if not ok:
                refusal = PeerRefused(
                    f"the {_PEER_ROLE[side]} certificate chain does not verify "
                    f"against the current roots: {_x509_error_text(errno)} "
                    f"(X509 error {errno})"
                )
            elif depth != 0:
                return True
            else:
                try:
                    _verified[connection] = check(connection, certificate)
                    return True
                except PeerRefused as e:
                    refusal = e
            refusal.depth = depth
            refusal.certificate = _describe(certificate)
            if log_refusals:
                _refused(side, refusal.reason, depth, refusal.certificate)
            on_refusal(connection, refusal)
            return False
        except Exception:
            _log.failure(
                "TLS {side}: refused the peer's certificate: error while verifying it",
                side=side,
                decision="denied",
            )
            return False

    return callback


def _context(bundle: Bundle, release_buffers: bool = False) -> SSL.Context:
    """
    The settings both sides share: our leaf and chain, every root as a trust
    anchor, TLS 1.2 at least, no renegotiation, no resumption; with
    ``release_buffers``, OpenSSL frees an idle connection's record buffers.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(_OPTIONS)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if release_buffers:
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_cipher_list(_TLS12_CIPHERS)
    context.use_certificate(bundle.leaf)
    context.use_privatekey(bundle.private_key())
    for certificate in bundle.chain:
        context.add_extra_chain_cert(certificate)
    context.check_privatekey()
    store = context.get_cert_store()
    if store is None:  # pragma: no cover (OpenSSL always makes one)
        raise RuntimeError("OpenSSL context has no certificate store")
    for root in bundle.roots:
        store.add_cert(crypto.X509.from_cryptography(root.certificate))
    return context


def _protocols(alpn_protocols: Sequence[bytes]) -> tuple[bytes, ...]:
    protocols = tuple(alpn_protocols)
    for protocol in protocols:
        if not isinstance(protocol, bytes) or not 0 < len(protocol) < 256:
            raise ValueError(
                f"alpn_protocols: {protocol!r} is not an ALPN protocol name "
                "(1 to 255 bytes, e.g. b'h2' or b'http/1.1')"
            )
    return protocols


class _ConnectionCreator:
    """
    What both sides' creators share: one OpenSSL context, made whole in the
    constructor and only read afterwards.
    """

    _context: SSL.Context

    @property
    def context(self) -> SSL.Context:
        """
        The OpenSSL context all this creator's connections share; read it,
        never modify it.
        """
        return self._context

    def _connection(self) -> SSL.Connection:
        return SSL.Connection(self._context, None)


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnectionCreator(_ConnectionCreator):
    """
    Makes the OpenSSL connections of a Connect server from one Bundle.

    The client must present a certificate that chains to a current root,
    carries the client authentication key usage and exactly one ``spiffe://``
    service URI in a trust domain a current root carries; otherwise the
    handshake fails with a TLS alert.  The verified identity is then
    available from :func:`peer_identity`.

    :param bundle: our certificates and the roots.
    :param alpn_protocols: the protocols we speak, most preferred first
        (``b"h2"``, ``b"http/1.1"``); empty for no ALPN.  A client offering
        only other protocols is not refused: the handshake completes with no
        protocol selected (as with Go's ``crypto/tls`` before Go 1.17;
        Consul's own proxy offers only ``h2``, whatever it tunnels), and
        what it speaks is the application's to find out.
    :param decide_now: called with the verified peer's identity inside the
        handshake: ``False`` refuses the handshake, ``True`` or ``None``
        (undecided) lets it complete, recorded as
        :attr:`VerifiedPeer.early_decision`.
    :param decide_peer_now: as ``decide_now``, called with the identity and
        the leaf's colon-hex serial; give one or the other.
    :param release_buffers: set OpenSSL's ``SSL_MODE_RELEASE_BUFFERS``: an
        idle connection's read and write buffers are freed and allocated
        again when bytes move (about 24 KiB less per idle connection; see
        ``docs/performance.rst``).
    :param log_refusals: log each refused certificate here (what the
        certificate was, and why).  ``False`` when the layer above logs it
        with the peer's address, from :func:`refusal_of` (the
        :class:`~connect_native.server.ConnectServerEndpoint` does).
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        alpn_protocols: Sequence[bytes] = (),
        decide_now: DecideNow | None = None,
        decide_peer_now: DecidePeerNow | None = None,
        release_buffers: bool = False,
        log_refusals: bool = True,
    ) -> None:
        if decide_now is not None and decide_peer_now is not None:
            raise ValueError("give decide_now or decide_peer_now, not both")
        if decide_now is not None:
            # Bind it now: a default argument keeps mypy's narrowing.
            def decide_peer_now(
                identity: ServiceIdentity, serial: str, decide: DecideNow = decide_now
            ) -> bool | None:
                return decide(identity)

        self.bundle = bundle
        self._protocols = _protocols(alpn_protocols)
        self._decide_now = decide_peer_now
        self._leaves = _Leaves(bundle, ExtendedKeyUsageOID.CLIENT_AUTH, "client")
        context = _context(bundle, release_buffers)
        context.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _verify_callback("server", self._check, _ignore_refusal, log_refusals),
        )
        if self._protocols:
            context.set_alpn_select_callback(self._select_protocol)
        self._context = context

    def _check(
        self, connection: SSL.Connection, certificate: crypto.X509
    ) -> VerifiedPeer:
        leaf, identity, serial = self._leaves.check(certificate)
        decision: bool | None = None
        if self._decide_now is not None:
            decision = self._decide_now(identity, serial)
            if decision is False:
                raise PeerRefused(f"{identity.uri} is not allowed to connect")
            if decision is not True:
                decision = None
        return VerifiedPeer(identity, leaf, serial, decision)

    def _select_protocol(
        self, connection: SSL.Connection, offered: list[bytes]
    ) -> bytes | SSL._NoOverlappingProtocols:
        for protocol in self._protocols:
            if protocol in offered:
                return protocol
        _log.debug(
            "TLS server: no ALPN protocol selected: the client offered only "
            "{offered} (we speak {ours})",
            offered=offered,
            ours=list(self._protocols),
        )
        # Not b"", which ends the handshake with an alert: Consul's built-in
        # proxy offers only h2 whatever it tunnels (issue 17).
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """
        A connection for one accepted client, sharing this creator's context
        (for Twisted's ``TLSMemoryBIOProtocol`` or an injected transport such
        as the terminator's own).
        """
        return self._connection()


def _ignore_refusal(connection: SSL.Connection, refusal: PeerRefused) -> None:
    # The server lets OpenSSL fail the handshake, which sends the client a
    # TLS alert; aborting here would drop the alert.  It only remembers the
    # refusal (already logged), for refusal_of().
    _refusals[connection] = refusal


def refusal_of(transport: object) -> PeerRefused | None:
    """
    The refusal our server-side verify callback made (and logged) for the
    handshake of ``transport``, if it made one.
    """
    connection = _ssl_connection(transport)
    return None if connection is None else _refusals.get(connection)


def _fail_client_connection(connection: SSL.Connection, refusal: PeerRefused) -> None:
    """
    Give the application the reason (Twisted's ``failVerification``), as
    Twisted's own host name check does.
    """
    protocol: Any = connection.get_app_data()
    fail = getattr(protocol, "failVerification", None)
    if callable(fail):
        fail(Failure(refusal))  # type: ignore[no-untyped-call]


@implementer(IOpenSSLClientConnectionCreator)
class ClientConnectionCreator(_ConnectionCreator):
    """
    Makes the OpenSSL connections of a Connect client reaching one service.

    We present our leaf and its chain.  The server's chain must verify
    against a current root, its leaf carry the server authentication key
    usage and exactly one ``spiffe://`` service URI in a trust domain a
    current root carries, matching ``expected``
    (:meth:`ServiceIdentity.matches`: service, namespace, partition and
    datacenter as Consul's Go library compares them).  There is no host name
    check: the URI is the server's name.  A refused server's connection is
    closed with :class:`PeerRefused` (:class:`PeerIdentityMismatch` when it
    is another service) as the reason.

    :param bundle: our certificates and the roots.
    :param expected: the service we mean to reach.
    :param alpn_protocols: the protocols to offer, most preferred first.
    :param any_trusted_trust_domain: accept the expected service in any
        trust domain a current root carries, not only ``expected``'s (as
        Consul's Go library, which leaves the trust domain to the chain
        check); ``expected``'s is then only shown in a mismatch error.
    """

    def __init__(
        self,
        bundle: Bundle,
        expected: ServiceIdentity,
        *,
        alpn_protocols: Sequence[bytes] = (),
        any_trusted_trust_domain: bool = False,
    ) -> None:
        if not isinstance(expected, ServiceIdentity):
            raise TypeError(
                "expected must be a ServiceIdentity, not "
                f"{type(expected).__name__}: {expected!r}"
            )
        self.bundle = bundle
        self.expected = expected
        self.any_trusted_trust_domain = any_trusted_trust_domain
        self._leaves = _Leaves(bundle, ExtendedKeyUsageOID.SERVER_AUTH, "server")
        protocols = _protocols(alpn_protocols)
        context = _context(bundle)
        context.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _verify_callback("client", self._check, _fail_client_connection),
        )
        if protocols:
            context.set_alpn_protos(list(protocols))
        self._context = context

    def _check(
        self, connection: SSL.Connection, certificate: crypto.X509
    ) -> VerifiedPeer:
        leaf, identity, serial = self._leaves.check(certificate)
        wanted = self.expected
        if self.any_trusted_trust_domain:
            # _check_leaf refused a trust domain no current root carries.
            wanted = evolve(wanted, trust_domain=identity.trust_domain)
        if not identity.matches(wanted):
            raise PeerIdentityMismatch(identity.uri, self.expected.uri)
        return VerifiedPeer(identity, leaf, serial)

    def clientConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        """
        A connection to one server, sharing this creator's context.
        """
        return self._connection()


# --- half-close over Twisted's TLS transport ---------------------------------


@implementer(IHalfCloseableProtocol)
class _HalfClose:
    """
    Half-close for Twisted's ``TLSMemoryBIOProtocol``: TLS 1.3 lets one
    ``close_notify`` end one direction (RFC 8446 section 6.1).

    - ``loseWriteConnection()`` sends ``close_notify`` after what was
      written and keeps reading (Twisted's ``loseConnection`` does that
      already; ``ProtocolWrapper`` would otherwise hand the call to the TCP
      transport, a FIN under TLS without ``close_notify``).
    - The peer's ``close_notify`` is the end of what it sends: a wrapped
      protocol that provides ``IHalfCloseableProtocol`` (and has not closed
      its own side yet) gets ``readConnectionLost()`` and may go on writing;
      its ``loseConnection()`` then answers with ``close_notify`` and closes
      the TCP connection.  Any other protocol gets what Twisted gives it: the
      whole connection closes.
    - A TCP FIN after the peer's ``close_notify`` (a peer that also shuts
      its socket's write side) leaves our write side open; a FIN before it
      is a truncation and ends the connection, as before.

    OpenSSL 3 lets either side write after receiving ``close_notify`` with
    TLS 1.2 as well (measured); RFC 5246 asks a TLS 1.2 peer to answer
    ``close_notify`` with its own at once, which a strict peer does (the
    reply is then lost, as with any TLS 1.2 stack that follows it).

    This overrides ``_flushReceiveBIO``, the one place Twisted reads
    application data, with the same loop; the private names it uses are
    pinned by ``tests/test_twisted_surface.py``.
    """

    #: The peer's close_notify arrived and was delivered as
    #: ``readConnectionLost``: nothing more to read.
    peer_write_closed = False

    #: Application data came from the peer.
    heard_data = False

    def _peer_half_closed(self: Any) -> bool:
        """Deliver the peer's close_notify as a half-close, if we may."""
        if self.disconnecting or self._aborted:
            return False
        wrapped = self.wrappedProtocol
        if not IHalfCloseableProtocol.providedBy(wrapped):
            return False
        self.peer_write_closed = True
        wrapped.readConnectionLost()
        return True

    def _flushReceiveBIO(self: Any) -> None:
        while not self._lostTLSConnection and not self.peer_write_closed:
            try:
                data = self._tlsConnection.recv(2**15)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                if self._peer_half_closed():
                    break
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                failure = Failure()  # type: ignore[no-untyped-call]
                self._tlsShutdownFinished(failure)
                if self._reason is failure:
                    # What the wrapped protocol's connectionLost() gets.
                    self._reason = self._read_failure(failure)
            else:
                self.heard_data = True
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)  # type: ignore[no-untyped-call]
        self._flushSendBIO()

    def _read_failure(self, failure: Failure) -> Failure:
        """
        The reason the wrapped protocol is given for ``failure``, the
        ``SSL.Error`` that ended the connection (a subclass may say more).
        """
        return failure

    def loseWriteConnection(self: Any) -> None:
        """End what we send with ``close_notify``; keep reading."""
        self.loseConnection()

    # IHalfCloseableProtocol, towards the TCP transport.

    def readConnectionLost(self: Any) -> None:
        if self.peer_write_closed or self._lostTLSConnection:
            # After close_notify: our side may still write (or is closing
            # the connection already, after what it still had to send).
            return
        # No close_notify first: a truncation, reported as Twisted does when
        # TCP ends a protocol that cannot half-close.
        self.transport.abortConnection()

    def writeConnectionLost(self) -> None:
        pass


class HalfCloseTLS(_HalfClose, TLSMemoryBIOProtocol):
    """Twisted's TLS transport (writes through), with half-close."""


class HalfCloseBufferingTLS(_HalfClose, BufferingTLSTransport):
    """Twisted's buffering TLS transport, with half-close."""
