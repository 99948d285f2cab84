"""
Helpers for testing Connect-native applications: Hypothesis strategies for
Consul's SPIFFE identities, and (in later sections) fakes for the seams.

Hypothesis is a test extra, not a runtime dependency: this module imports
without it, and each strategy imports it when called.
"""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import frozen
from cryptography import x509

from connect_native import _certbuild

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy
    from twisted.internet.interfaces import IReactorTime
    from twisted.web.resource import IResource

    from connect_native.identity import (
        AgentIdentity,
        ServiceIdentity,
        SigningIdentity,
    )


# --- SPIFFE identities (Hypothesis strategies) ---
#
# Like ``hyperlink.hypothesis``: strategies shipped beside the code they
# generate for, so that applications can property-test their own handling of
# peer identities.  Every value generated is valid, so
# ``parse_spiffe_id(x.uri) == x`` for each of them.

_LABEL_INNER = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
_LABEL_EDGE = _LABEL_INNER.replace("-", "")
# Names that exercise escaping: space, non-ASCII, "/", "%", dot segments,
# characters Go leaves unescaped, and the real captures' ``a b`` and ``ünï``.
_AWKWARD_NAMES = (
    "web",
    "Web",
    "a b",
    "ünï",
    "a/b",
    "%",
    "%41",
    ".",
    "..",
    "...",
    "a.b",
    "a_b",
    "~",
    "$&+,:;=@",
    "!*'()",
    "?#[]",
    "default",
    "\x00",
    "日本",
)


def trust_domain_labels() -> SearchStrategy[str]:
    """
    One DNS-like label of a trust domain: 1 to 63 letters (either case),
    digits, ``-`` and ``_``, not starting or ending with ``-``.
    """
    from hypothesis import strategies as st

    edge = st.sampled_from(_LABEL_EDGE)
    middle = st.text(alphabet=_LABEL_INNER, max_size=61)
    return st.one_of(
        edge,
        st.tuples(edge, middle, edge).map("".join),
    )


def trust_domains() -> SearchStrategy[str]:
    """
    Valid trust domains, as given (mixed case); the identity records store
    them lower-cased.  Includes Consul's real shape, ``<uuid>.consul``.
    """
    from hypothesis import strategies as st

    consul_like = st.uuids().map(lambda u: f"{u}.consul")
    generic = st.lists(trust_domain_labels(), min_size=1, max_size=4).map(".".join)
    return st.one_of(consul_like, generic)


def identity_names() -> SearchStrategy[str]:
    """
    Values for the path segments of a SPIFFE ID (namespace, datacenter,
    service, agent, partition): any non-empty text that UTF-8 can encode,
    weighted towards names that need escaping.
    """
    from hypothesis import strategies as st

    return st.one_of(
        st.sampled_from(_AWKWARD_NAMES),
        st.text(
            alphabet=st.characters(codec="utf-8"),
            min_size=1,
            max_size=30,
        ),
    )


def partitions() -> SearchStrategy[str | None]:
    """
    Admin partitions: ``None`` (the default partition), ``"default"`` in
    any case, or another name.
    """
    from hypothesis import strategies as st

    return st.one_of(
        st.none(),
        st.sampled_from(["default", "DEFAULT", ""]),
        identity_names(),
    )


def service_identities(
    trust_domain: SearchStrategy[str] | None = None,
    partition: SearchStrategy[str | None] | None = None,
) -> SearchStrategy[ServiceIdentity]:
    """
    Valid :class:`~connect_native.identity.ServiceIdentity` values.  Pass
    ``trust_domain`` (e.g. ``just("<uuid>.consul")``) or ``partition``
    (e.g. ``none()``) to narrow them.
    """
    from hypothesis import strategies as st

    from connect_native.identity import ServiceIdentity

    return st.builds(
        ServiceIdentity,
        trust_domain=trust_domain if trust_domain is not None else trust_domains(),
        namespace=identity_names(),
        datacenter=identity_names(),
        service=identity_names(),
        partition=partition if partition is not None else partitions(),
    )


def agent_identities(
    trust_domain: SearchStrategy[str] | None = None,
) -> SearchStrategy[AgentIdentity]:
    """
    Valid :class:`~connect_native.identity.AgentIdentity` values.
    """
    from hypothesis import strategies as st

    from connect_native.identity import AgentIdentity

    return st.builds(
        AgentIdentity,
        trust_domain=trust_domain if trust_domain is not None else trust_domains(),
        datacenter=identity_names(),
        agent=identity_names(),
        partition=partitions(),
    )


def signing_identities() -> SearchStrategy[SigningIdentity]:
    """
    Valid :class:`~connect_native.identity.SigningIdentity` values.
    """
    from hypothesis import strategies as st

    from connect_native.identity import SigningIdentity

    return st.builds(SigningIdentity, trust_domain=trust_domains())


def spiffe_ids() -> SearchStrategy[ServiceIdentity | AgentIdentity | SigningIdentity]:
    """
    Any of Consul's SPIFFE identities that
    :func:`~connect_native.identity.parse_spiffe_id` returns.
    """
    from hypothesis import strategies as st

    return st.one_of(service_identities(), agent_identities(), signing_identities())


# --- end of SPIFFE identities ---


# --- Certificates ---
#
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


# --- end of Certificates ---


# --- Authorizers ---
#
# An ``IAuthorizer`` whose answers a test chooses: by the peer's service
# name, at once or held until the test releases them, and optionally known
# in the TLS handshake (``decide_now``), where a denial is a TLS alert.

from collections.abc import Iterable  # noqa: E402

from twisted.internet.defer import Deferred, succeed  # noqa: E402
from zope.interface import implementer  # noqa: E402

from connect_native.authorize import Decision, IAuthorizer, Peer  # noqa: E402


@implementer(IAuthorizer)
class FakeAuthorizer:
    """
    An authorizer for tests: a peer whose service name is in ``allowed`` may
    connect, any other is denied.

    :param allowed: the source service names to allow (change
        :attr:`allowed` at any time).
    :param in_handshake: if true, ``decide_now`` answers too, so a denied
        peer is refused with a TLS alert; otherwise it says "don't know yet".
    :param hold: if true, ``authorize`` returns a Deferred that fires only
        when the test calls :meth:`release` (to test what happens while the
        decision is pending, or when it never comes).

    :ivar decide_now_calls: every ``(peer, target)`` given to ``decide_now``.
    :ivar authorize_calls: every ``(peer, target)`` given to ``authorize``.
    :ivar pending: the held ``(peer, target, deferred)`` not yet released.
    :ivar cancelled: how many held Deferreds their caller cancelled.
    """

    def __init__(
        self,
        allowed: Iterable[str] = (),
        *,
        in_handshake: bool = False,
        hold: bool = False,
        source: str = "fake",
    ) -> None:
        self.allowed = set(allowed)
        self.in_handshake = in_handshake
        self.hold = hold
        self.source = source
        self.decide_now_calls: list[tuple[Peer, str]] = []
        self.authorize_calls: list[tuple[Peer, str]] = []
        self.pending: list[tuple[Peer, str, Deferred[Decision]]] = []
        self.cancelled = 0

    def decision_for(self, peer: Peer, target: str) -> Decision:
        """
        What this authorizer decides for ``peer`` reaching ``target``.
        """
        service = peer.identity.service
        if service in self.allowed:
            return Decision(True, f"{service!r} may reach {target!r}", self.source)
        return Decision(False, f"{service!r} may not reach {target!r}", self.source)

    def decide_now(self, peer: Peer, target: str) -> Decision | None:
        self.decide_now_calls.append((peer, target))
        if not self.in_handshake:
            return None
        return self.decision_for(peer, target)

    def authorize(self, peer: Peer, target: str) -> Deferred[Decision]:
        self.authorize_calls.append((peer, target))
        if not self.hold:
            return succeed(self.decision_for(peer, target))
        entry: tuple[Peer, str, Deferred[Decision]]

        def cancel(d: Deferred[Decision]) -> None:
            self.cancelled += 1
            if entry in self.pending:
                self.pending.remove(entry)

        held: Deferred[Decision] = Deferred(cancel)
        entry = (peer, target, held)
        self.pending.append(entry)
        return held

    def release(self, decision: Decision | None = None) -> int:
        """
        Answer every held call: with ``decision`` if given, otherwise with
        :meth:`decision_for`.  Returns how many were answered.
        """
        pending, self.pending = self.pending, []
        for peer, target, held in pending:
            held.callback(
                decision if decision is not None else self.decision_for(peer, target)
            )
        return len(pending)


# --- end of Authorizers ---


# --- Bundle sources ---
#
# An ``IBundleSource`` a test drives by hand, for endpoints and TLS tests that
# need certificates without a CertManager and an agent.

from connect_native.certs import Bundle, IBundleSource, RootPEMs  # noqa: E402


def make_bundle(
    factory: CertificateFactory,
    service: str,
    *,
    now: float | None = None,
    extra_roots: Sequence[CertificateFactory] = (),
) -> Bundle:
    """
    A :class:`~connect_native.certs.Bundle` for ``service`` with a good leaf
    from ``factory``, trusting ``factory``'s root (and those of
    ``extra_roots``), checked at ``now`` (default: the wall clock).
    """
    leaf = factory.leaf(service)
    # The leaf's chain carries any intermediates; only roots are anchors.
    roots = [RootPEMs(f.root_pem) for f in (factory, *extra_roots)]
    return Bundle.build(
        leaf_cert_pem=leaf.chain_pem,
        private_key_pem=leaf.key_pem,
        roots=roots,
        trust_domain=factory.trust_domain,
        now=time.time() if now is None else now,
    )


@implementer(IBundleSource)
class FakeBundleSource:
    """
    A bundle source for tests: :meth:`current` is whatever the test last
    :meth:`set` (``None`` to act as not ready or expired), and
    :meth:`when_ready` waits for the next :meth:`set` or fails on
    :meth:`fail`.

    :ivar current_calls: how many times :meth:`current` was asked (once per
        new connection, for an endpoint).
    """

    def __init__(self, bundle: Bundle | None = None) -> None:
        self._bundle = bundle
        self._waiters: list[Deferred[Bundle]] = []
        self._subscribers: list[Callable[[Bundle], object]] = []
        self.current_calls = 0

    def subscribe_bundles(
        self, callback: Callable[[Bundle], object]
    ) -> Callable[[], None]:
        """
        Call ``callback`` with each Bundle :meth:`set` (as
        :meth:`connect_native.certs.CertManager.subscribe_bundles` does);
        returns the function that unsubscribes it.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def current(self) -> Bundle | None:
        self.current_calls += 1
        return self._bundle

    def when_ready(self) -> Deferred[Bundle]:
        if self._bundle is not None:
            return succeed(self._bundle)

        def forget(waiter: Deferred[Bundle]) -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

        waiter: Deferred[Bundle] = Deferred(forget)
        self._waiters.append(waiter)
        return waiter

    def set(self, bundle: Bundle | None) -> None:
        """
        Make ``bundle`` current; a Bundle also fires pending waiters, then
        tells the subscribers.
        """
        self._bundle = bundle
        if bundle is not None:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(bundle)
            for callback in list(self._subscribers):
                callback(bundle)

    def fail(self, error: Exception) -> None:
        """Fail pending waiters with ``error`` (e.g. ``LeafPermissionDenied``)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(error)


# --- end of Bundle sources ---


# --- Resolvers and fake instances ---
#
# What a test of a Connect client needs: a resolver it controls, and a fake
# running instance of a service that accepts, refuses or stalls the
# connection a ``ConnectClientEndpoint`` makes on a ``MemoryReactor``, with
# real TLS in memory (``twisted.test.iosim``).


from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.error import ConnectionRefusedError  # noqa: E402
from twisted.internet.interfaces import IProtocolFactory  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from connect_native.resolve import (  # noqa: E402
    ExpectedIdentity,
    Instance,
    IResolver,
)

# The static resolver, for tests that need fixed instances.
from connect_native.resolve import StaticResolver as StaticResolver  # noqa: E402


def fake_instance(
    service: str,
    *,
    address: str = "10.0.0.1",
    port: int = 8443,
    datacenter: str = "dc1",
    namespace: str = "default",
    partition: str | None = None,
    trust_domain: str | None = None,
    node: str = "node1",
    instance_id: str = "",
) -> Instance:
    """
    An :class:`~connect_native.resolve.Instance` of ``service``, expecting
    its identity in any trusted trust domain (or ``trust_domain``).
    """
    return Instance(
        address=address,
        port=port,
        identity=ExpectedIdentity(
            service=service,
            datacenter=datacenter,
            namespace=namespace,
            partition=partition,
            trust_domain=trust_domain,
        ),
        node=node,
        instance_id=instance_id or f"{service}-{port}",
    )


@implementer(IResolver)
class FakeResolver:
    """
    A resolver a test drives: :meth:`resolve` answers :attr:`instances` at
    once, or, with ``hold=True``, only when the test calls :meth:`release`;
    :meth:`fail` fails the held (and later) calls.

    :ivar calls: how many times :meth:`resolve` was called.
    """

    description = "fake resolver"

    def __init__(self, instances: Sequence[Instance] = (), *, hold: bool = False):
        self.instances = tuple(instances)
        self.hold = hold
        self.calls = 0
        self.error: Exception | None = None
        self._held: list[Deferred[Sequence[Instance]]] = []

    def resolve(self) -> Deferred[Sequence[Instance]]:
        self.calls += 1
        if self.error is not None:
            failed: Deferred[Sequence[Instance]] = Deferred()
            failed.errback(self.error)
            return failed
        if not self.hold:
            return succeed(self.instances)

        def forget(d: Deferred[Sequence[Instance]]) -> None:
            if d in self._held:
                self._held.remove(d)

        held: Deferred[Sequence[Instance]] = Deferred(forget)
        self._held.append(held)
        return held

    def release(self) -> int:
        """Answer the held calls; returns how many there were."""
        held, self._held = self._held, []
        for d in held:
            d.callback(self.instances)
        return len(held)

    def fail(self, error: Exception) -> None:
        """Fail the held calls, and every later one, with ``error``."""
        self.error = error
        held, self._held = self._held, []
        for d in held:
            d.errback(error)


class RecordingProtocol(Protocol):
    """
    The default application of a :class:`FakeServiceInstance`: records what
    it receives, and whether and why the connection was lost.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason


def _iosim() -> Any:
    # Twisted's in-memory connections (untyped; a test helper module).
    from twisted.test import iosim

    return iosim


class _SwallowAll(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class FakeServiceInstance:
    """
    A running instance of a Connect service, in memory: its
    :class:`~connect_native.resolve.Instance` record, and a Connect TLS server
    presenting ``bundle``'s certificate (any client whose certificate
    verifies is accepted) to take the connections a client makes on a
    ``twisted.internet.testing.MemoryReactor``.

    :param bundle: the server's certificates (:func:`make_bundle`); the
        instance's expected identity is its service, namespace, datacenter
        and partition (what a resolver would expect there, which a test may
        override with ``identity``).
    :param app_factory: the server application (default: a factory of
        :class:`RecordingProtocol`, each kept in :attr:`protocols`).
    :param alpn_protocols: the ALPN protocols the server speaks.

    :ivar protocols: the server application protocols built, in order.
    """

    def __init__(
        self,
        bundle: Bundle,
        app_factory: IProtocolFactory | None = None,
        *,
        address: str = "10.0.0.1",
        port: int = 8443,
        node: str = "node1",
        identity: ExpectedIdentity | None = None,
        alpn_protocols: Sequence[bytes] = (),
    ) -> None:
        from connect_native.tls import ServerConnectionCreator

        served = bundle.identity
        if identity is None:
            identity = ExpectedIdentity(
                service=served.service,
                datacenter=served.datacenter,
                namespace=served.namespace,
                partition=served.partition,
            )
        self.instance = Instance(
            address, port, identity, node=node, instance_id=f"{served.service}-{port}"
        )
        self.bundle = bundle
        self.protocols: list[Protocol] = []
        if app_factory is None:
            app_factory = Factory.forProtocol(self._record)
        self.app_factory = app_factory
        self.creator = ServerConnectionCreator(bundle, alpn_protocols=alpn_protocols)

    def _record(self) -> Protocol:
        protocol = RecordingProtocol()
        self.protocols.append(protocol)
        return protocol

    def _pending(self, reactor: Any) -> tuple[int, Any]:
        """
        The oldest connection attempt to this instance not yet answered.
        """
        handled: set[int] = reactor.__dict__.setdefault(
            "_fake_instances_handled", set()
        )
        for index, (host, port, factory, _t, _b) in enumerate(reactor.tcpClients):
            if (host, port) == (self.instance.address, self.instance.port):
                if index not in handled:
                    handled.add(index)
                    return index, factory
        raise AssertionError(
            f"no pending connection to {self.instance.address}:"
            f"{self.instance.port} on the MemoryReactor"
        )

    def accept(self, reactor: Any, clock: Any) -> Any:
        """
        Accept the pending connection to this instance and run the TLS
        handshake in memory; returns the ``IOPump`` (pump it to move more
        bytes).  ``clock`` is the TLS factories' clock (a ``Clock``, which a
        ``MemoryReactorClock`` is).
        """
        from twisted.protocols.tls import TLSMemoryBIOFactory

        iosim = _iosim()

        _, client_factory = self._pending(reactor)
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        server_factory = TLSMemoryBIOFactory(
            self.creator, False, self.app_factory, clock=clock
        )
        server = server_factory.buildProtocol(address)
        client = client_factory.buildProtocol(
            IPv4Address("TCP", self.instance.address, self.instance.port)
        )
        return iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            clock=clock,
        )

    def accept_and_stall(self, reactor: Any, clock: Any) -> Any:
        """
        Accept the pending connection's TCP but never answer the TLS
        handshake (a server that hangs, or is not TLS).
        """
        iosim = _iosim()
        _, client_factory = self._pending(reactor)
        server = _SwallowAll()
        client = client_factory.buildProtocol(
            IPv4Address("TCP", self.instance.address, self.instance.port)
        )
        return iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            clock=clock,
        )

    def refuse(self, reactor: Any) -> None:
        """
        Refuse the pending connection to this instance (nothing listens).
        """
        index, client_factory = self._pending(reactor)
        failure: Any = Failure
        refused: Any = ConnectionRefusedError
        client_factory.clientConnectionFailed(
            reactor.connectors[index], failure(refused())
        )


# --- end of Resolvers and fake instances ---


# --- The development agent in memory ---


_T = TypeVar("_T")


class MemoryAgent:
    """
    The development agent in memory, wired to a
    :class:`~connect_native.consul.client.ConsulClient`: no sockets, no
    Consul binary, and time on a ``MemoryReactorClock`` that starts at the
    wall clock (OpenSSL checks certificate validity against real time).

    Hand ``client`` to anything that talks to the agent
    (:class:`~connect_native.certs.CertManager`,
    :class:`~connect_native.registration.Registration`, the authorizers, the
    resolvers) and ``reactor`` to anything that needs a clock or listens;
    call :meth:`flush` to let the agent answer, :meth:`advance` to let time
    pass.

    :param front: wraps the agent's resource, e.g. to inject faults between
        the client and the agent.
    :param agent_options: passed to
        :class:`~connect_native.devagent.DevAgent` (``datacenter``,
        ``acl_default_policy``, ``master_token``, ``version``, ...).
    """

    def __init__(
        self,
        *,
        front: Callable[[IResource], IResource] | None = None,
        seed: int = 0,
        timeout: float = 5.0,
        token: str | None = None,
        **agent_options: Any,
    ) -> None:
        import random

        from treq.testing import StubTreq
        from twisted.internet.testing import MemoryReactorClock

        from connect_native.consul.client import ConsulClient
        from connect_native.devagent import DevAgent

        self.reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
        self.reactor.advance(time.time())
        # A seeded generator: tests want the agent's choices repeatable.
        rng = random.Random(seed)  # noqa: S311
        self.agent = DevAgent(self.reactor, rng=rng, **agent_options)
        resource = self.agent.resource()
        self.front = resource if front is None else front(resource)
        self.http = StubTreq(self.front)  # type: ignore[no-untyped-call]
        self.client = ConsulClient(
            self.reactor, http_client=self.http, timeout=timeout, token=token
        )

    def flush(self) -> None:
        """
        Let the agent answer every request that it can answer now.
        """
        self.http.flush()  # type: ignore[no-untyped-call]

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """
        Let ``seconds`` pass in steps of ``step``, answering requests as they
        come.
        """
        self.flush()
        while seconds > 0:
            self.reactor.advance(min(step, seconds))
            seconds -= step
            self.flush()

    def result(self, d: Deferred[_T]) -> _T:
        """
        What ``d`` fired with, after the agent answered what it could; raises
        what it failed with, or ``AssertionError`` when it has not fired.
        """
        self.flush()
        results: list[Any] = []
        d.addBoth(results.append)
        if not results:
            raise AssertionError(f"{d!r} has not fired")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        answer: _T = results[0]
        return answer


# --- end of The development agent in memory ---
