"""
Certificates for Connect: the immutable :class:`Bundle` of our leaf, its key,
its chain and every current CA root, checked once when it is built.

A Bundle is what the TLS layer (``connect_native.tls``) turns into connection
creators.  :meth:`Bundle.build` refuses, with an error naming the input at
fault, anything a peer would refuse: a leaf that does not chain to a current
root, that is outside its validity, whose key is not the certificate's, or
whose identity is not exactly one ``spiffe://`` service URI in a trust domain
that a current root carries.

:class:`CertManager` (an ``IService``) keeps one service's Bundle fresh from
the local agent's CA roots and leaf certificate, and says how it stands
(:class:`ManagerState`): starting, ready, degraded or expired.
"""

from __future__ import annotations

import datetime
import enum
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from connect_native import _logging
from connect_native._checks import service_name
from connect_native._deferreds import Subscribers, Waiters
from connect_native.consul.blocking import Watch
from connect_native.consul.client import ConsulPermissionDenied
from connect_native.consul.records import CARoots, Indexed, LeafCert
from connect_native.errors import (
    CertManagerStopped,
    InvalidBundle,
    LeafPermissionDenied,
)
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
    "CertManager",
    "CertManagerStopped",
    "CertificateAuthorityClient",
    "IBundleSource",
    "IIdentitySource",
    "InvalidBundle",
    "LeafPermissionDenied",
    "ManagerState",
    "RootPEMs",
    "StateChange",
    "TrustedRoot",
]

#: The private key types a Connect leaf can have (Consul issues EC P-256;
#: an external CA may issue RSA).
LeafPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


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


def verify_to_roots(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    roots: Sequence[TrustedRoot],
    now: float,
) -> None:
    """
    Verify ``leaf`` to one of ``roots`` (the trust anchors) with OpenSSL,
    ``chain`` the untrusted intermediates, at POSIX time ``now``.

    :raises OpenSSL.crypto.X509StoreContextError: saying why not.
    """
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root.certificate))
    store.set_time(datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc))
    crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        [crypto.X509.from_cryptography(c) for c in chain],
    ).verify_certificate()


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
    try:
        verify_to_roots(leaf, chain, roots, now)
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


class IIdentitySource(IBundleSource):
    """
    Where a service's identity comes from: its leaf certificate and key, and
    the roots it trusts, delivered as :class:`Bundle` s.

    Two are built in: the agent (:class:`CertManager`, by blocking queries
    on the agent's leaf and roots) and files
    (:class:`connect_native.sources.files.FileIdentitySource`, watched
    certificate, key and CA bundle paths).  A source that is a Twisted
    service is started and stopped by the
    :class:`~connect_native.service.ConnectService` that holds it.
    """

    def subscribe_bundles(callback: Callable[[Bundle], object]) -> Callable[[], None]:
        """
        Call ``callback`` with each new Bundle once it is current (a new
        leaf, or new roots with the same leaf), so that open connections can
        be decided again against the new roots.

        :returns: a function that unsubscribes ``callback``.
        """


# --- CertManager ---
#
# Keeps one service's Bundle fresh from the local agent: two blocking
# watches (CA roots, leaf), a new Bundle whenever either changes and the pair
# checks out, the last good one kept while the agent is away, never one past
# its expiry.


class ManagerState(enum.Enum):
    """
    Where a :class:`CertManager` stands.

    ``STARTING``: no certificate yet.  ``READY``: a valid certificate and the
    agent answering.  ``DEGRADED``: a valid certificate, but the agent is
    unreachable or what it sends cannot be used; the certificate stays in use
    until it expires.  ``EXPIRED``: the certificate ran out before a new one
    came; :meth:`CertManager.current` returns ``None`` (fail closed).
    ``STOPPED``: the service was stopped.
    """

    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    EXPIRED = "expired"
    STOPPED = "stopped"


@frozen
class StateChange:
    """
    What a :meth:`CertManager.subscribe` callback receives: the new state,
    why (a sentence for logs and health checks), and the state before.
    """

    state: ManagerState
    reason: str
    previous: ManagerState


class CertificateAuthorityClient(Protocol):
    """
    The two agent reads a :class:`CertManager` needs
    (:class:`connect_native.consul.client.ConsulClient` has them).
    """

    def agent_ca_roots(
        self, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[CARoots]]: ...

    def leaf(
        self, service: str, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[LeafCert]]: ...


def _never_equal(old: object, new: object) -> bool:
    # The manager wants every answer (a repeated value after errors is the
    # sign that the agent is back) and compares values itself.
    return False


def _iso(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


def _root_pems(roots: CARoots) -> list[RootPEMs]:
    return [RootPEMs(r.root_cert_pem, r.intermediate_certs_pem) for r in roots.roots]


@implementer(IIdentitySource)
class CertManager(Service):
    """
    Keep the Bundle of one service fresh, from the local Consul agent.

    A Twisted service: ``startService`` starts two blocking watches, on
    ``/v1/agent/connect/ca/roots`` and ``/v1/agent/connect/ca/leaf/<service>``;
    ``stopService`` stops them and fails pending :meth:`when_ready` Deferreds
    with :class:`CertManagerStopped`.  Each time either answer changes, a new
    :class:`Bundle` is built from the latest leaf and *all* the latest roots
    (the roots are replaced as a whole set: roots that the agent no longer
    lists, e.g. those of a development agent that restarted with a new trust
    domain, stop being trusted).  A pair that does not make a valid Bundle
    (typically new roots whose leaf has not arrived yet) is logged and the
    previous Bundle stays in use while it is valid.

    Processes normally share one manager per service through
    :mod:`connect_native.service` rather than making their own.

    :param clock: schedules the watches, the expiry warning and the expiry;
        ``clock.seconds()`` is the time certificates are checked at.
    :param client: reads the agent, see :class:`CertificateAuthorityClient`.
    :param service: the service name whose leaf certificate to use.
    :param wait: seconds each blocking read may be held by the agent.
    :param expiry_warning: log a warning this many seconds before the
        certificate expires when no renewal has come; by default a twentieth
        of the certificate's lifetime (the agent renews by 90 % of it).
    :param min_interval: least seconds between two reads of the same watch.
    :param backoff_initial: first retry delay after an error, in seconds.
    :param backoff_max: cap on the retry delay, in seconds.
    :param jitter: randomness for the retry delays (tests pass a seeded
        :class:`random.Random`).
    """

    _log = Logger(observer=_logging.observer)

    def __init__(
        self,
        clock: IReactorTime,
        client: CertificateAuthorityClient,
        service: str,
        *,
        wait: float = 300.0,
        expiry_warning: float | None = None,
        min_interval: float = 1.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        jitter: random.Random | Callable[[], float] | None = None,
    ) -> None:
        service_name("service", service)
        if expiry_warning is not None and not (
            isinstance(expiry_warning, int | float)
            and math.isfinite(expiry_warning)
            and expiry_warning >= 0
        ):
            raise ValueError(
                "expiry_warning must be None or a finite number of seconds >= 0, "
                f"not {expiry_warning!r}"
            )
        self.clock = clock
        self.client = client
        self.service = service
        self.expiry_warning = expiry_warning
        settings: dict[str, Any] = {
            "wait": wait,
            "min_interval": min_interval,
            "backoff_initial": backoff_initial,
            "backoff_max": backoff_max,
            "jitter": jitter,
            "equal": _never_equal,
        }
        self._roots_watch: Watch[CARoots] = Watch(
            clock,
            self._fetch_roots,
            self._roots_answered,
            name=f"CA roots (for {service})",
            on_error=self._roots_failed,
            **settings,
        )
        self._leaf_watch: Watch[LeafCert] = Watch(
            clock,
            self._fetch_leaf,
            self._leaf_answered,
            name=f"leaf {service}",
            on_error=self._leaf_failed,
            **settings,
        )
        self._roots: CARoots | None = None
        self._leaf: LeafCert | None = None
        self._bundle: Bundle | None = None
        self._expired = False
        self._expired_at = 0.0
        self._roots_error: str | None = None
        self._leaf_error: str | None = None
        self._build_error: str | None = None
        self._denied: LeafPermissionDenied | None = None
        self._stopped = False
        self._state = ManagerState.STARTING
        self._reason = self._waiting_reason()
        self._waiters: Waiters[Bundle] = Waiters()
        self._subscribers: Subscribers[StateChange] = Subscribers(
            self._log,
            f"certificate manager for {service}: a state subscriber",
            level=LogLevel.error,
        )
        self._bundle_subscribers: Subscribers[Bundle] = Subscribers(
            self._log, f"certificate manager for {service}: a Bundle subscriber"
        )
        self._warning_call: IDelayedCall | None = None
        self._expiry_call: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<CertManager service={self.service!r} state={self._state.value}>"

    # -- IBundleSource ---------------------------------------------------------

    def current(self) -> Bundle | None:
        """
        The Bundle for a new connection, or ``None`` when there is none that
        may be used: not started, not ready yet, stopped, or expired.
        """
        bundle = self._bundle
        if not self.running or bundle is None:
            return None
        if self.clock.seconds() >= bundle.not_after:
            # The expiry call may not have run yet; never hand out a
            # certificate past its end.
            return None
        return bundle

    def when_ready(self) -> Deferred[Bundle]:
        """
        A Deferred that fires with a usable Bundle: at once if there is one,
        else with the next one.  It fails with :class:`LeafPermissionDenied`
        as soon as the agent answers 403 for the leaf (and at once while that
        lasts), and with :class:`CertManagerStopped` when the service stops.
        Cancelling it only drops this waiter.
        """
        bundle = self.current()
        if bundle is not None:
            return succeed(bundle)
        if self._stopped:
            return fail(CertManagerStopped(self.service))
        if self._denied is not None:
            return fail(self._denied)
        return self._waiters.wait()

    # -- observing ----------------------------------------------------------------

    @property
    def state(self) -> ManagerState:
        """The current :class:`ManagerState`."""
        return self._state

    @property
    def reason(self) -> str:
        """Why the manager is in its state, as a sentence."""
        return self._reason

    def subscribe(
        self, callback: Callable[[StateChange], object]
    ) -> Callable[[], None]:
        """
        Call ``callback`` with a :class:`StateChange` whenever the state or its
        reason changes (a new certificate changes the reason of ``READY``).
        An exception it raises is logged and ignored.

        :returns: a function that unsubscribes ``callback``.
        """
        return self._subscribers.add(callback)

    def subscribe_bundles(
        self, callback: Callable[[Bundle], object]
    ) -> Callable[[], None]:
        """
        Call ``callback`` with each new Bundle, once it is current (a new
        leaf, or new roots with the same leaf).  An exception it raises is
        logged and ignored.

        :returns: a function that unsubscribes ``callback``.
        """
        return self._bundle_subscribers.add(callback)

    # -- IService -------------------------------------------------------------------

    def startService(self) -> None:
        if self.running:
            return
        super().startService()  # type: ignore[no-untyped-call]
        self._stopped = False
        # What went wrong before a stop says nothing about the agent now.
        self._roots_error = self._leaf_error = self._build_error = None
        self._denied = None
        self._log.info(
            "certificate manager for {service} starting", service=self.service
        )
        if self._bundle is not None:
            self._schedule_timers(self._bundle)
        self._refresh_state()
        self._roots_watch.start()
        self._leaf_watch.start()

    def stopService(self) -> None:
        if not self.running:
            return
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopped = True
        self._roots_watch.stop()
        self._leaf_watch.stop()
        self._cancel_timers()
        self._waiters.fail(CertManagerStopped(self.service))
        self._set_state(ManagerState.STOPPED, "the service was stopped")
        self._log.info(
            "certificate manager for {service} stopped", service=self.service
        )

    # -- the watches --------------------------------------------------------------

    # After a failure the next read asks for an immediate answer (index 0):
    # a read blocked at the old index would leave the manager degraded for
    # up to ``wait`` seconds after the agent is back.

    def _fetch_roots(self, index: int, wait: float) -> Deferred[Indexed[CARoots]]:
        if self._roots_error is not None:
            index = 0
        return self.client.agent_ca_roots(index=index, wait=wait)

    def _fetch_leaf(self, index: int, wait: float) -> Deferred[Indexed[LeafCert]]:
        if self._leaf_error is not None:
            index = 0
        return self.client.leaf(self.service, index=index, wait=wait)

    def _roots_answered(self, roots: CARoots) -> None:
        self._roots_error = None
        if roots == self._roots:
            self._refresh_state()
            return
        self._roots = roots
        self._rebuild()

    def _leaf_answered(self, leaf: LeafCert) -> None:
        self._leaf_error = None
        self._denied = None
        if leaf == self._leaf:
            self._refresh_state()
            return
        self._leaf = leaf
        self._rebuild()

    def _roots_failed(self, failure: Failure) -> None:
        self._roots_error = (
            f"reading the CA roots from the agent failed: {failure.getErrorMessage()}"
        )
        self._refresh_state()

    def _leaf_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, ConsulPermissionDenied):
            denied = LeafPermissionDenied(self.service, error.body)
            self._denied = denied
            self._leaf_error = str(denied)
            self._log.error("{message}", message=str(denied))
            self._waiters.fail(denied)
        else:
            self._denied = None
            self._leaf_error = (
                f"reading the leaf certificate for {self.service!r} from the "
                f"agent failed: {failure.getErrorMessage()}"
            )
        self._refresh_state()

    # -- building ------------------------------------------------------------------

    def _rebuild(self) -> None:
        roots, leaf = self._roots, self._leaf
        if roots is None or leaf is None:
            self._refresh_state()
            return
        try:
            bundle = Bundle.build(
                leaf_cert_pem=leaf.cert_pem,
                private_key_pem=leaf.private_key_pem,
                roots=_root_pems(roots),
                trust_domain=roots.trust_domain,
                now=self.clock.seconds(),
            )
            if bundle.identity.service != self.service:
                raise InvalidBundle(
                    f"leaf_cert_pem: the leaf names service "
                    f"{bundle.identity.service!r} ({bundle.identity.uri}), not "
                    f"{self.service!r}"
                )
        except InvalidBundle as e:
            kept = self.current()
            what = (
                f"keeping the certificate serial {kept.leaf.serial_number:x} "
                f"until the agent sends a leaf that matches its roots (it "
                f"expires at {_iso(kept.not_after)})"
                if kept is not None
                else "no certificate to use yet"
            )
            self._build_error = (
                f"the leaf (serial {leaf.serial_number}) and the "
                f"{len(roots.roots)} CA root(s) of trust domain "
                f"{roots.trust_domain!r} from the agent make no usable "
                f"certificate: {e}; {what}"
            )
            self._log.warn(
                "certificate manager for {service}: {problem}",
                service=self.service,
                problem=self._build_error,
            )
            self._refresh_state()
            return
        self._build_error = None
        self._install(bundle)

    def _install(self, bundle: Bundle) -> None:
        previous = self._bundle
        self._bundle = bundle
        self._expired = False
        self._schedule_timers(bundle)
        self._log.info(
            "certificate manager for {service}: new certificate for {identity}, "
            "serial {serial}, valid until {not_after}, trusting {roots} root(s) "
            "of {trust_domains}",
            service=self.service,
            identity=bundle.identity.uri,
            serial=f"{bundle.leaf.serial_number:x}",
            not_after=_iso(bundle.not_after),
            roots=len(bundle.roots),
            trust_domains=", ".join(sorted(bundle.trust_domains)),
            replaces=None if previous is None else f"{previous.leaf.serial_number:x}",
        )
        self._refresh_state()
        self._waiters.fire(bundle)
        self._bundle_subscribers.tell(bundle)

    # -- expiry --------------------------------------------------------------------

    def _warning_lead(self, bundle: Bundle) -> float:
        if self.expiry_warning is not None:
            return self.expiry_warning
        return (bundle.not_after - bundle.not_before) / 20

    def _schedule_timers(self, bundle: Bundle) -> None:
        self._cancel_timers()
        now = self.clock.seconds()
        warn_at = bundle.not_after - self._warning_lead(bundle)
        self._warning_call = self.clock.callLater(
            max(0.0, warn_at - now), self._warn, bundle
        )
        self._expiry_call = self.clock.callLater(
            max(0.0, bundle.not_after - now), self._expire, bundle
        )

    def _cancel_timers(self) -> None:
        for call in (self._warning_call, self._expiry_call):
            if call is not None and call.active():
                call.cancel()
        self._warning_call = self._expiry_call = None

    def _warn(self, bundle: Bundle) -> None:
        self._warning_call = None
        if bundle is not self._bundle:
            return
        self._log.warn(
            "certificate manager for {service}: the certificate for {identity} "
            "(serial {serial}) expires at {not_after}, in {remaining:.0f}s, and "
            "no renewed one has come from the agent ({state}: {reason}); "
            "connections will be refused once it expires",
            service=self.service,
            identity=bundle.identity.uri,
            serial=f"{bundle.leaf.serial_number:x}",
            not_after=_iso(bundle.not_after),
            remaining=bundle.not_after - self.clock.seconds(),
            state=self._state.value,
            reason=self._reason,
        )

    def _expire(self, bundle: Bundle) -> None:
        self._expiry_call = None
        if bundle is not self._bundle:
            return
        if self._warning_call is not None and self._warning_call.active():
            self._warning_call.cancel()
        self._warning_call = None
        self._bundle = None
        self._expired = True
        self._expired_at = bundle.not_after
        self._log.error(
            "certificate manager for {service}: the certificate for {identity} "
            "(serial {serial}) expired at {not_after}; refusing connections "
            "until the agent sends a new one",
            service=self.service,
            identity=bundle.identity.uri,
            serial=f"{bundle.leaf.serial_number:x}",
            not_after=_iso(bundle.not_after),
        )
        self._refresh_state()

    # -- state ---------------------------------------------------------------------

    def _waiting_reason(self) -> str:
        return (
            f"waiting for the CA roots and the leaf certificate for "
            f"{self.service!r} from the agent"
        )

    def _problems(self) -> list[str]:
        return [
            p
            for p in (self._roots_error, self._leaf_error, self._build_error)
            if p is not None
        ]

    def _refresh_state(self) -> None:
        if not self.running:
            return
        problems = self._problems()
        bundle = self._bundle
        if bundle is None:
            if self._expired:
                state = ManagerState.EXPIRED
                reason = (
                    f"the certificate for {self.service!r} expired at "
                    f"{_iso(self._expired_at)} and no new one has come"
                )
                if problems:
                    reason += ": " + "; ".join(problems)
            else:
                state = ManagerState.STARTING
                reason = "; ".join(problems) if problems else self._waiting_reason()
        elif problems:
            state = ManagerState.DEGRADED
            reason = "; ".join(problems) + (
                f"; the certificate serial {bundle.leaf.serial_number:x} stays "
                f"in use until it expires at {_iso(bundle.not_after)}"
            )
        else:
            state = ManagerState.READY
            reason = (
                f"serving {bundle.identity.uri} with certificate serial "
                f"{bundle.leaf.serial_number:x}, valid until "
                f"{_iso(bundle.not_after)}"
            )
        self._set_state(state, reason)

    def _set_state(self, state: ManagerState, reason: str) -> None:
        if state is self._state and reason == self._reason:
            return
        previous = self._state
        self._state = state
        self._reason = reason
        if state is not previous:
            level = (
                LogLevel.info
                if state in (ManagerState.READY, ManagerState.STOPPED)
                else LogLevel.warn
            )
            self._log.emit(
                level,
                "certificate manager for {service}: {previous} -> {state}: {reason}",
                service=self.service,
                previous=previous.value,
                state=state.value,
                reason=reason,
            )
        change = StateChange(state=state, reason=reason, previous=previous)
        self._subscribers.tell(change)
