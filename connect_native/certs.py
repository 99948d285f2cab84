"""
Certificates for Connect: the immutable :class:`Bundle` of our leaf, its key,
its chain and every current CA root, checked once when it is built.

A Bundle is what the TLS layer (``connect_native.tls``) turns into connection
creators.  :meth:`Bundle.build` refuses, with an error naming the input at
fault, anything a peer would refuse: a leaf that does not chain to a current
root, that is outside its validity, whose key is not the certificate's, or
whose identity is not exactly one ``spiffe://`` service URI in a trust domain
that a current root carries.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto
from twisted.internet.defer import Deferred
from zope.interface import Interface

from connect_native.identity import (
    InvalidIdentity,
    ServiceIdentity,
    SigningIdentity,
    identity_of_certificate,
    normalize_trust_domain,
    parse_spiffe_id,
    spiffe_uris,
)

__all__ = [
    "Bundle",
    "InvalidBundle",
    "RootPEMs",
    "TrustedRoot",
]

#: The private key types a Connect leaf can have (Consul issues EC P-256;
#: an external CA may issue RSA).
LeafPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class InvalidBundle(ValueError):  # noqa: N818 (a refusal, named for what it refuses)
    """
    The leaf certificate, key and roots do not make a usable Bundle.  The
    message names the input at fault (``leaf_cert_pem``,
    ``private_key_pem``, ``roots[i]``, ``trust_domain``) and what is wrong.
    """


def _tuple_of_str(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@frozen
class RootPEMs:
    """
    One root from ``/v1/agent/connect/ca/roots``: its ``RootCert`` and its
    ``IntermediateCerts`` (PEM text, as the agent sends them).
    """

    root_cert_pem: str
    intermediate_pems: tuple[str, ...] = field(default=(), converter=_tuple_of_str)


@frozen
class TrustedRoot:
    """
    A current CA root, parsed: the trust anchor and the intermediates the
    agent lists with it.  Only ``certificate`` is a trust anchor; the
    intermediates are not trusted by themselves (as in Consul's Go library,
    peers present the intermediates they need).
    """

    certificate: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _load_certificates(pem: str, name: str) -> list[x509.Certificate]:
    if not isinstance(pem, str):
        raise InvalidBundle(f"{name} must be PEM text (str), not {type(pem).__name__}")
    try:
        return x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise InvalidBundle(
            f"{name} holds no readable PEM certificate ({e}); it should be the "
            "PEM text the Consul agent sent"
        ) from None


def _load_one_certificate(pem: str, name: str) -> x509.Certificate:
    certificates = _load_certificates(pem, name)
    if len(certificates) != 1:
        raise InvalidBundle(
            f"{name} holds {len(certificates)} certificates where one was expected"
        )
    return certificates[0]


def _load_private_key(pem: str) -> LeafPrivateKey:
    if not isinstance(pem, str):
        raise InvalidBundle(
            f"private_key_pem must be PEM text (str), not {type(pem).__name__}"
        )
    try:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        # The underlying message never contains key material.
        raise InvalidBundle(
            "private_key_pem is not an unencrypted PEM private key "
            f"({type(e).__name__}); it should be the agent's PrivateKeyPEM"
        ) from None
    if not isinstance(key, LeafPrivateKey):
        raise InvalidBundle(
            f"private_key_pem is a {type(key).__name__}; a Connect leaf key is "
            "EC or RSA"
        )
    return key


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _root_trust_domains(roots: Sequence[TrustedRoot]) -> set[str]:
    domains = set()
    for root in roots:
        for uri in spiffe_uris(root.certificate):
            try:
                identity = parse_spiffe_id(uri)
            except InvalidIdentity:
                # A root with an odd URI still anchors chains; it just
                # vouches for no trust domain.
                continue
            if isinstance(identity, SigningIdentity):
                domains.add(identity.trust_domain)
    return domains


def _extended_key_usages(cert: x509.Certificate) -> frozenset[x509.ObjectIdentifier]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(extension.value)


def _verify_chain(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    roots: Sequence[TrustedRoot],
    now: float,
) -> None:
    """
    Verify the leaf to a root with OpenSSL, as a peer's handshake will:
    the roots are the trust anchors, the leaf's own chain the untrusted
    intermediates, and the verification time is ``now``.
    """
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root.certificate))
    store.set_time(datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc))
    context = crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        [crypto.X509.from_cryptography(c) for c in chain],
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as e:
        raise InvalidBundle(
            f"leaf_cert_pem does not verify against the current roots: {e}; "
            "the leaf (and the intermediates after it) must chain to one of "
            "the roots from /v1/agent/connect/ca/roots"
        ) from None


@frozen
class Bundle:
    """
    Everything TLS needs for one service, checked and immutable.

    :ivar leaf: our leaf certificate.
    :ivar leaf_pem: its PEM text.
    :ivar private_key_pem: the leaf's private key (left out of ``repr``).
    :ivar chain: the intermediates that follow the leaf in the agent's
        ``CertPEM``, in order: what we present after the leaf.
    :ivar roots: every current root (active or not) and its intermediates.
    :ivar trust_domains: the trust domains the roots carry (lower-cased).
    :ivar identity: our service identity, from the leaf's URI SAN.
    :ivar not_before: start of the leaf's validity, in POSIX seconds.
    :ivar not_after: end of the leaf's validity, in POSIX seconds.
    """

    leaf: x509.Certificate
    leaf_pem: str
    private_key_pem: str = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    roots: tuple[TrustedRoot, ...]
    trust_domains: frozenset[str]
    identity: ServiceIdentity
    not_before: float
    not_after: float

    @property
    def chain_pems(self) -> tuple[str, ...]:
        """
        The PEM text of each certificate in :attr:`chain`.
        """
        return tuple(_pem(c) for c in self.chain)

    @property
    def root_certificates(self) -> tuple[x509.Certificate, ...]:
        """
        The trust anchors: every current root certificate.
        """
        return tuple(root.certificate for root in self.roots)

    def private_key(self) -> LeafPrivateKey:
        """
        The leaf's private key, parsed.
        """
        return _load_private_key(self.private_key_pem)

    def carries_trust_domain(self, trust_domain: str) -> bool:
        """
        Whether a current root carries ``trust_domain`` (compared as a host
        name, case-insensitively).
        """
        try:
            return normalize_trust_domain(trust_domain) in self.trust_domains
        except InvalidIdentity:
            return False

    @classmethod
    def build(
        cls,
        *,
        leaf_cert_pem: str,
        private_key_pem: str,
        roots: Sequence[RootPEMs],
        trust_domain: str,
        now: float,
    ) -> Bundle:
        """
        Check the agent's leaf and roots and make a Bundle of them.

        :param leaf_cert_pem: the leaf's ``CertPEM``: the leaf, then the
            intermediates that lead to a root.
        :param private_key_pem: the leaf's ``PrivateKeyPEM``.
        :param roots: every root in ``/v1/agent/connect/ca/roots``, active or
            not (peers may still hold leaves from an old root).
        :param trust_domain: the roots' ``TrustDomain`` field; ``""`` when the
            agent sent none, in which case the roots' URI SANs alone say which
            trust domains they carry.
        :param now: the current time in POSIX seconds (the injected clock's
            ``seconds()``).

        :raises InvalidBundle: unless the leaf verifies against the roots
            (directly or through the intermediates after it) at ``now``, is
            within its validity at ``now``, carries the client and server
            authentication key usages, matches the private key, and has
            exactly one ``spiffe://`` service URI whose trust domain one of
            the roots carries.
        """
        certificates = _load_certificates(leaf_cert_pem, "leaf_cert_pem")
        leaf, chain = certificates[0], tuple(certificates[1:])
        key = _load_private_key(private_key_pem)
        if _spki(key.public_key()) != _spki(leaf.public_key()):
            raise InvalidBundle(
                "private_key_pem is not the key of the certificate in "
                "leaf_cert_pem; both must come from the same "
                "/v1/agent/connect/ca/leaf answer"
            )

        if not roots:
            raise InvalidBundle(
                "roots is empty: there is no CA root to verify the leaf with "
                "(has the agent's CA finished initializing?)"
            )
        trusted = []
        for index, root in enumerate(roots):
            certificate = _load_one_certificate(
                root.root_cert_pem, f"roots[{index}].root_cert_pem"
            )
            intermediates = tuple(
                _load_one_certificate(pem, f"roots[{index}].intermediate_pems[{i}]")
                for i, pem in enumerate(root.intermediate_pems)
            )
            trusted.append(TrustedRoot(certificate, intermediates))

        domains = _root_trust_domains(trusted)
        if trust_domain:
            try:
                domains.add(normalize_trust_domain(trust_domain))
            except InvalidIdentity as e:
                raise InvalidBundle(f"trust_domain: {e}") from None
        if not domains:
            raise InvalidBundle(
                "neither trust_domain nor any root's spiffe:// URI SAN names a "
                "trust domain, so no peer identity could be accepted"
            )

        try:
            identity = identity_of_certificate(leaf)
        except InvalidIdentity as e:
            raise InvalidBundle(f"leaf_cert_pem: {e}") from None
        if identity.trust_domain not in domains:
            raise InvalidBundle(
                f"leaf_cert_pem: the leaf's identity {identity.uri} is in trust "
                f"domain {identity.trust_domain!r}, which no current root "
                f"carries (roots carry {', '.join(sorted(domains))})"
            )

        try:
            is_ca = leaf.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if is_ca:
            raise InvalidBundle(
                "leaf_cert_pem: the first certificate is a CA certificate "
                "(BasicConstraints CA:TRUE), not a service's leaf"
            )

        usages = _extended_key_usages(leaf)
        for usage, what in (
            (ExtendedKeyUsageOID.CLIENT_AUTH, "client"),
            (ExtendedKeyUsageOID.SERVER_AUTH, "server"),
        ):
            if usage not in usages:
                raise InvalidBundle(
                    f"leaf_cert_pem: the leaf lacks the TLS {what} authentication "
                    "extended key usage; a Connect leaf serves both sides of "
                    "mutual TLS"
                )

        not_before = leaf.not_valid_before_utc.timestamp()
        not_after = leaf.not_valid_after_utc.timestamp()
        if now < not_before:
            raise InvalidBundle(
                f"leaf_cert_pem: the leaf is not valid yet: its validity starts "
                f"at {leaf.not_valid_before_utc.isoformat()}, {not_before - now:.0f}s "
                "from now (is the clock behind?)"
            )
        if now >= not_after:
            raise InvalidBundle(
                f"leaf_cert_pem: the leaf expired at "
                f"{leaf.not_valid_after_utc.isoformat()}, {now - not_after:.0f}s ago"
            )
        _verify_chain(leaf, chain, trusted, now)

        return cls(
            leaf=leaf,
            leaf_pem=_pem(leaf),
            private_key_pem=private_key_pem,
            chain=chain,
            roots=tuple(trusted),
            trust_domains=frozenset(domains),
            identity=identity,
            not_before=not_before,
            not_after=not_after,
        )


class IBundleSource(Interface):
    """
    Where endpoints get the certificates for a new connection.

    ``CertManager`` provides it; ``connect_native.testing`` has a fake.  A
    source is asked once per new connection, so that new connections get new
    certificates while open ones keep theirs.
    """

    def current() -> Bundle | None:
        """
        The Bundle to use for a new connection now, or ``None`` when there is
        none that may be used (not ready yet, or expired): the caller must
        then refuse the connection.
        """

    def when_ready() -> Deferred[Bundle]:
        """
        Fires with the first usable Bundle; cancellable.
        """
