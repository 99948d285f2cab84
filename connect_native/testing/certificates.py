"""
Certificates for tests: a Consul-shaped CA (:class:`CertificateFactory`) and its leaves.
"""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from attrs import frozen
from cryptography import x509

from connect_native import _certbuild

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime


# A CA shaped like Consul's built-in one and leaves of every shape, good and
# bad, that a Connect server or client must accept or refuse.  Built on
# ``connect_native._certbuild``, the module the development agent's CA uses,
# so a good leaf here has exactly the structure of a real Consul leaf.

#: The EKU of a Consul leaf: clientAuth and serverAuth.
LEAF_EXTENDED_KEY_USAGES = _certbuild.LEAF_EXTENDED_KEY_USAGES

_DEFAULT_LEAF_LIFETIME = datetime.timedelta(hours=72)
_BACKDATE = datetime.timedelta(minutes=1)
# Roots start a week back, so that an expired leaf (a day or two old) is
# still inside its issuer's validity and fails for its own dates only.
_ROOT_BACKDATE = datetime.timedelta(days=7)
_CA_LIFETIME = datetime.timedelta(days=3650)
_CROSS_SIGNED_LIFETIME = datetime.timedelta(days=7)


@frozen
class TestLeaf:
    """
    A leaf certificate made by :class:`CertificateFactory`.

    ``cert_pem`` is the leaf alone; ``chain_pem`` the leaf followed by the
    intermediates between it and the root (what a peer presents, as in
    Consul's ``CertPEM``); ``key_pem`` the private key in traditional PEM
    (SEC1 ``EC PRIVATE KEY`` or PKCS#1 ``RSA PRIVATE KEY``); ``uris`` every URI
    SAN and ``uri`` the first one, or ``None`` when there is none.
    """

    __test__ = False  # a record, not a pytest test class

    certificate: x509.Certificate
    cert_pem: str
    key_pem: str
    chain_pem: str
    uri: str | None
    uris: tuple[str, ...]
    private_key: _certbuild.PrivateKey


@frozen
class _Authority:
    """
    What signs a factory's leaves: the root, and the CA certificate that
    signs (the root itself, or an intermediate with its chain up to the root).
    """

    trust_domain: str
    root_certificate: x509.Certificate
    signer_key: _certbuild.PrivateKey
    signer_certificate: x509.Certificate
    intermediates: tuple[str, ...]
    clock: IReactorTime | None
    key_type: _certbuild.KeyType


class CertificateFactory:
    """
    A certificate authority for tests, shaped like Consul's built-in CA: an
    EC P-256 (or RSA) root with the ``spiffe://<trust domain>`` URI SAN, and
    leaves of any shape, valid or deliberately broken.

    The good leaf, ``factory.leaf("web")``, has a real Consul leaf's structure.
    The bad ones a Connect peer must refuse:

    ========================== =====================================================
    self-signed                ``factory.self_signed("web")``
    another CA                 ``factory.another_ca().leaf("web")`` (same trust
                               domain, different key: only the signature differs)
    expired / not yet valid    ``factory.expired_leaf("web")``,
                               ``factory.not_yet_valid_leaf("web")``
    no URI SAN / two URI SANs  ``factory.leaf("web", uris=[])``,
                               ``factory.leaf("web", uris=[a, b])``
    an agent's or the CA's URI ``factory.agent_leaf("node1")``,
                               ``factory.leaf("web", uris=[factory.ca_uri])``
    unknown trust domain       ``factory.leaf("web", trust_domain="other.consul")``
    garbage SPIFFE path        ``factory.leaf("web", uris=["spiffe://td/garbage"])``
    wrong key usage            ``factory.leaf("web", extended_key_usages=[...])``
    a CA certificate as leaf   ``factory.leaf("web", ca=True)``
    ========================== =====================================================

    :param trust_domain: the trust domain, ``<uuid>.consul`` (random) by default.
    :param clock: where "now" comes from (``clock.seconds()``), wall-clock
        time by default.  OpenSSL checks validity against the wall clock, so a
        test ``Clock`` should start at ``time.time()``.
    :param key_type: ``"ec"`` (P-256, as Consul) or ``"rsa"`` for the CA key.
    """

    def __init__(
        self,
        trust_domain: str | None = None,
        *,
        clock: IReactorTime | None = None,
        key_type: _certbuild.KeyType = "ec",
    ) -> None:
        if trust_domain is None:
            trust_domain = f"{uuid.uuid4()}.consul"
        if not trust_domain or "/" in trust_domain:
            raise ValueError(
                f"trust_domain must be a host name such as '<uuid>.consul', "
                f"not {trust_domain!r}"
            )
        key = _certbuild.generate_private_key(key_type)
        now = _now(clock)
        subject = _certbuild.common_name(
            _certbuild.ca_common_name(uuid.uuid4().hex[:8], trust_domain)
        )
        root = _certbuild.build_certificate(
            subject=subject,
            issuer=subject,
            public_key=key.public_key(),
            signing_key=key,
            serial=x509.random_serial_number(),
            not_before=now - _ROOT_BACKDATE,
            not_after=now + _CA_LIFETIME,
            ca=True,
            uris=[_certbuild.signing_uri(trust_domain)],
        )
        self._authority = _Authority(
            trust_domain=trust_domain,
            root_certificate=root,
            signer_key=key,
            signer_certificate=root,
            intermediates=(),
            clock=clock,
            key_type=key_type,
        )

    @classmethod
    def _signing_with(cls, authority: _Authority) -> CertificateFactory:
        factory = cls.__new__(cls)
        factory._authority = authority
        return factory

    @property
    def trust_domain(self) -> str:
        return self._authority.trust_domain

    @property
    def root_certificate(self) -> x509.Certificate:
        """
        The root: the trust anchor a peer should be given.
        """
        return self._authority.root_certificate

    @property
    def root_pem(self) -> str:
        return _certbuild.certificate_pem(self._authority.root_certificate)

    @property
    def intermediates_pem(self) -> str:
        """
        The intermediates between this factory's leaves and the root, in
        order from the leaf up ("" when the root signs directly).
        """
        return "".join(self._authority.intermediates)

    @property
    def signing_key_pem(self) -> str:
        """
        The private key that signs this factory's leaves, in PEM: with
        :attr:`root_pem` it makes a real Consul agent's CA this factory's
        (``PUT /v1/connect/ca/configuration`` with ``PrivateKey`` and
        ``RootCert``) for a factory whose root signs directly.
        """
        return _certbuild.private_key_pem(self._authority.signer_key)

    @property
    def ca_uri(self) -> str:
        """
        The CA's own SPIFFE ID, ``spiffe://<trust domain>``.
        """
        return _certbuild.signing_uri(self.trust_domain)

    def service_uri(
        self,
        service: str,
        *,
        namespace: str = "default",
        datacenter: str = "dc1",
        partition: str | None = None,
        trust_domain: str | None = None,
    ) -> str:
        """
        A service's SPIFFE ID, escaped as Consul escapes it.
        """
        return _certbuild.service_uri(
            self.trust_domain if trust_domain is None else trust_domain,
            service,
            namespace=namespace,
            datacenter=datacenter,
            partition=partition,
        )

    def agent_uri(self, node: str, *, datacenter: str = "dc1") -> str:
        """
        A client agent's SPIFFE ID, ``spiffe://<td>/agent/client/dc/<dc>/id/<node>``.
        """
        return _certbuild.agent_uri(self.trust_domain, node, datacenter=datacenter)

    def leaf(
        self,
        service: str,
        *,
        namespace: str = "default",
        datacenter: str = "dc1",
        partition: str | None = None,
        trust_domain: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        uris: Sequence[str] | None = None,
        extended_key_usages: Sequence[x509.ObjectIdentifier]
        | None = LEAF_EXTENDED_KEY_USAGES,
        ca: bool = False,
        key_type: _certbuild.KeyType = "ec",
    ) -> TestLeaf:
        """
        A leaf for ``service``, signed by this factory's CA.

        With the defaults it is what Consul issues: one URI SAN naming the
        service, CN mangled as Consul does, valid from a minute ago for 72
        hours, EKU clientAuth and serverAuth, CA:FALSE.

        :param trust_domain: the trust domain in the URI, if not the CA's.
        :param not_before: default a minute ago.
        :param not_after: default ``not_before`` + 72 hours.
        :param uris: the URI SANs instead of the service's SPIFFE ID; ``[]``
            for none.
        :param extended_key_usages: ``None`` leaves the extension out.
        :param ca: mark the certificate as a CA (BasicConstraints CA:TRUE and
            CA key usages).
        :param key_type: the leaf's key, ``"ec"`` (P-256) or ``"rsa"``.
        """
        if uris is None:
            uris = [
                self.service_uri(
                    service,
                    namespace=namespace,
                    datacenter=datacenter,
                    partition=partition,
                    trust_domain=trust_domain,
                )
            ]
        return self._leaf(
            _certbuild.service_common_name(service, namespace, self.trust_domain),
            uris=uris,
            not_before=not_before,
            not_after=not_after,
            extended_key_usages=extended_key_usages,
            ca=ca,
            key_type=key_type,
        )

    def agent_leaf(self, node: str, *, datacenter: str = "dc1") -> TestLeaf:
        """
        A leaf for a client agent (``.../agent/client/dc/<dc>/id/<node>``):
        valid, but not a service identity.
        """
        return self._leaf(
            _certbuild.agent_common_name(node, self.trust_domain),
            uris=[self.agent_uri(node, datacenter=datacenter)],
        )

    def expired_leaf(
        self, service: str, *, namespace: str = "default", datacenter: str = "dc1"
    ) -> TestLeaf:
        """
        A leaf that expired a day ago (valid from two days ago).
        """
        now = _now(self._authority.clock)
        return self.leaf(
            service,
            namespace=namespace,
            datacenter=datacenter,
            not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1),
        )

    def not_yet_valid_leaf(
        self, service: str, *, namespace: str = "default", datacenter: str = "dc1"
    ) -> TestLeaf:
        """
        A leaf that becomes valid a day from now.
        """
        now = _now(self._authority.clock)
        return self.leaf(
            service,
            namespace=namespace,
            datacenter=datacenter,
            not_before=now + datetime.timedelta(days=1),
            not_after=now + datetime.timedelta(days=2),
        )

    def self_signed(
        self,
        service: str,
        *,
        namespace: str = "default",
        datacenter: str = "dc1",
    ) -> TestLeaf:
        """
        A leaf with the service's good URI, signed by its own key rather than
        by any CA.
        """
        key = _certbuild.generate_private_key("ec")
        now = _now(self._authority.clock)
        subject = _certbuild.common_name(
            _certbuild.service_common_name(service, namespace, self.trust_domain)
        )
        uri = self.service_uri(service, namespace=namespace, datacenter=datacenter)
        certificate = _certbuild.build_certificate(
            subject=subject,
            issuer=subject,
            public_key=key.public_key(),
            signing_key=key,
            serial=x509.random_serial_number(),
            not_before=now - _BACKDATE,
            not_after=now - _BACKDATE + _DEFAULT_LEAF_LIFETIME,
            ca=False,
            uris=[uri],
            extended_key_usages=LEAF_EXTENDED_KEY_USAGES,
        )
        pem = _certbuild.certificate_pem(certificate)
        return TestLeaf(
            certificate=certificate,
            cert_pem=pem,
            key_pem=_certbuild.private_key_pem(key),
            chain_pem=pem,
            uri=uri,
            uris=(uri,),
            private_key=key,
        )

    def another_ca(self, trust_domain: str | None = None) -> CertificateFactory:
        """
        An unrelated CA.  By default it has *this* factory's trust domain, so
        that its leaves differ from this one's only in who signed them; pass
        ``trust_domain`` for a foreign one.
        """
        return CertificateFactory(
            self.trust_domain if trust_domain is None else trust_domain,
            clock=self._authority.clock,
            key_type=self._authority.key_type,
        )

    def intermediate(self) -> CertificateFactory:
        """
        A factory whose leaves are signed by a new intermediate CA under this
        one: same root and trust domain, and each leaf's ``chain_pem``
        carries the intermediate(s).
        """
        authority = self._authority
        key = _certbuild.generate_private_key(authority.key_type)
        now = _now(authority.clock)
        subject = _certbuild.common_name(
            _certbuild.ca_common_name(uuid.uuid4().hex[:8], self.trust_domain).replace(
                "pri-", "int-", 1
            )
        )
        certificate = _certbuild.build_certificate(
            subject=subject,
            issuer=authority.signer_certificate.subject,
            public_key=key.public_key(),
            signing_key=authority.signer_key,
            serial=x509.random_serial_number(),
            not_before=now - _ROOT_BACKDATE,
            not_after=now + _CA_LIFETIME,
            ca=True,
            uris=[self.ca_uri],
            authority_key_id=_certbuild.subject_key_id_of(authority.signer_certificate),
        )
        return CertificateFactory._signing_with(
            _Authority(
                trust_domain=authority.trust_domain,
                root_certificate=authority.root_certificate,
                signer_key=key,
                signer_certificate=certificate,
                intermediates=(
                    _certbuild.certificate_pem(certificate),
                    *authority.intermediates,
                ),
                clock=authority.clock,
                key_type=authority.key_type,
            )
        )

    def cross_sign(self, other: CertificateFactory) -> str:
        """
        ``other``'s root public key and subject, signed by this factory's CA,
        as Consul cross-signs a new root with the old one on rotation (valid
        seven days from a minute ago).  A leaf of ``other`` presented with
        this certificate after it verifies against this factory's root.

        :returns: the cross-signed certificate's PEM.
        """
        authority = self._authority
        target = other.root_certificate
        try:
            target_uris = target.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            target_uris = []
        not_before = _now(authority.clock) - _BACKDATE
        certificate = _certbuild.build_certificate(
            subject=target.subject,
            issuer=authority.signer_certificate.subject,
            public_key=target.public_key(),
            signing_key=authority.signer_key,
            serial=x509.random_serial_number(),
            not_before=not_before,
            not_after=not_before + _CROSS_SIGNED_LIFETIME,
            ca=True,
            uris=target_uris,
            subject_key_id=_certbuild.subject_key_id_of(target),
            authority_key_id=_certbuild.subject_key_id_of(authority.signer_certificate),
        )
        return _certbuild.certificate_pem(certificate)

    def _leaf(
        self,
        name: str,
        *,
        uris: Sequence[str],
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        extended_key_usages: Sequence[x509.ObjectIdentifier]
        | None = LEAF_EXTENDED_KEY_USAGES,
        ca: bool = False,
        key_type: _certbuild.KeyType = "ec",
    ) -> TestLeaf:
        authority = self._authority
        if not_before is None:
            not_before = _now(authority.clock) - _BACKDATE
        if not_after is None:
            not_after = not_before + _DEFAULT_LEAF_LIFETIME
        if not_after < not_before:
            raise ValueError(
                f"not_after ({not_after.isoformat()}) is before not_before "
                f"({not_before.isoformat()})"
            )
        key = _certbuild.generate_private_key(key_type)
        certificate = _certbuild.build_certificate(
            subject=_certbuild.common_name(name),
            issuer=authority.signer_certificate.subject,
            public_key=key.public_key(),
            signing_key=authority.signer_key,
            serial=x509.random_serial_number(),
            not_before=not_before,
            not_after=not_after,
            ca=ca,
            uris=list(uris),
            extended_key_usages=extended_key_usages,
            authority_key_id=_certbuild.subject_key_id_of(authority.signer_certificate),
        )
        pem = _certbuild.certificate_pem(certificate)
        return TestLeaf(
            certificate=certificate,
            cert_pem=pem,
            key_pem=_certbuild.private_key_pem(key),
            chain_pem=pem + "".join(authority.intermediates),
            uri=uris[0] if uris else None,
            uris=tuple(uris),
            private_key=key,
        )


def _now(clock: IReactorTime | None) -> datetime.datetime:
    return _certbuild.utc_from_timestamp(
        time.time() if clock is None else clock.seconds()
    )
