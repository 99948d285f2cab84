"""
The development agent's certificate authority, shaped like Consul 1.8.7's
built-in ("consul") CA provider.

:class:`DevCA` keeps the roots, signs leaf certificates and rotates the root
the way a real ``consul agent -dev`` does (``REAL-BEHAVIOUR.md`` sections 2 to
4, the captures in ``tests/fixtures/real-1.8.7/``): an EC P-256 root valid for
ten years from the moment it is made, leaves backdated one minute with one
URI SAN and no DNS names, one small serial counter for every certificate, and
on rotation the old root kept inactive while the new one carries its public
key cross-signed by the old root.  Time comes from an injected
``IReactorTime``; randomness (cluster id, root names) from an injectable
``random.Random``.

The records it returns (:class:`CARoots`, :class:`CARoot`,
:class:`IssuedLeaf`) carry everything the agent's JSON needs and render it
with ``to_json()``, with real Consul's field names and types.
"""

from __future__ import annotations

import datetime
import hashlib
import random
import re
import secrets
import uuid
from collections.abc import Callable
from itertools import count
from typing import Any

from attrs import evolve, frozen
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.interfaces import IReactorTime

from connect_native import _certbuild

__all__ = [
    "CARoot",
    "CARoots",
    "DevCA",
    "IssuedLeaf",
    "LeafRequestError",
]

# The serial of a fresh -dev agent's root (measured on 1.8.7).
FIRST_SERIAL = 7

ROOT_NAME = "Consul CA Root Cert"
DEFAULT_LEAF_TTL = 72 * 3600.0
_ROOT_YEARS = 10
_BACKDATE = datetime.timedelta(minutes=1)
_CROSS_SIGNED_LIFETIME = datetime.timedelta(days=7)
# Consul's spiffeIDServiceRegexp, applied to the escaped path.
_SERVICE_PATH = re.compile(r"^/ns/[^/]+/dc/[^/]+/svc/[^/]+$")


class LeafRequestError(ValueError):
    """
    Consul refuses to sign a leaf for this name.  The message is Consul's own
    (the agent answers it with a 500), e.g. ``URI must be either service or
    agent`` for an empty name.
    """


def _json_time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@frozen
class CARoot:
    """
    One CA root as ``/v1/agent/connect/ca/roots`` lists it.

    ``id`` is the SHA-1 of the root's DER in lowercase colon hex;
    ``serial_number`` the low 64 bits of its serial; ``signing_key_id`` its
    SubjectKeyIdentifier in colon hex; ``intermediate_certs`` is ``None`` (JSON
    ``null``) until a rotation gives the root a cross-signed certificate.
    """

    id: str
    name: str
    serial_number: int
    signing_key_id: str
    external_trust_domain: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    root_cert: str
    intermediate_certs: tuple[str, ...] | None
    active: bool
    private_key_type: str
    private_key_bits: int
    create_index: int
    modify_index: int

    def to_json(self) -> dict[str, Any]:
        """
        The JSON object real Consul 1.8.7 sends for this root, in its key order.
        """
        return {
            "ID": self.id,
            "Name": self.name,
            "SerialNumber": self.serial_number,
            "SigningKeyID": self.signing_key_id,
            "ExternalTrustDomain": self.external_trust_domain,
            "NotBefore": _json_time(self.not_before),
            "NotAfter": _json_time(self.not_after),
            "RootCert": self.root_cert,
            "IntermediateCerts": (
                None
                if self.intermediate_certs is None
                else list(self.intermediate_certs)
            ),
            "Active": self.active,
            "PrivateKeyType": self.private_key_type,
            "PrivateKeyBits": self.private_key_bits,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@frozen
class CARoots:
    """
    The CA's roots: the body of ``/v1/agent/connect/ca/roots``.

    ``roots`` are ordered by ID, as Consul's state store lists them; ``index``
    is the highest ``ModifyIndex`` among them.
    """

    active_root_id: str
    trust_domain: str
    roots: tuple[CARoot, ...]
    index: int

    @property
    def active_root(self) -> CARoot:
        """
        The root that signs new leaves.
        """
        return next(root for root in self.roots if root.id == self.active_root_id)

    def to_json(self) -> dict[str, Any]:
        """
        The JSON object real Consul 1.8.7 sends, in its key order.
        """
        return {
            "ActiveRootID": self.active_root_id,
            "TrustDomain": self.trust_domain,
            "Roots": [root.to_json() for root in self.roots],
        }


@frozen
class IssuedLeaf:
    """
    A leaf certificate as ``/v1/agent/connect/ca/leaf/<service>`` returns it.

    ``serial_number`` is colon hex (``"08"``); ``cert_pem`` is the leaf, then
    the signing root's cross-signed certificate after a rotation;
    ``private_key_pem`` is SEC1 ``EC PRIVATE KEY``; ``service`` the raw name
    and ``service_uri`` the escaped SPIFFE ID.  ``root_id`` names the root that
    signed it (not part of the JSON: the agent uses it to see that a leaf
    predates a rotation).
    """

    serial_number: str
    cert_pem: str
    private_key_pem: str
    service: str
    service_uri: str
    valid_after: datetime.datetime
    valid_before: datetime.datetime
    create_index: int
    modify_index: int
    root_id: str

    def to_json(self) -> dict[str, Any]:
        """
        The JSON object real Consul 1.8.7 sends, in its key order.
        """
        return {
            "SerialNumber": self.serial_number,
            "CertPEM": self.cert_pem,
            "PrivateKeyPEM": self.private_key_pem,
            "Service": self.service,
            "ServiceURI": self.service_uri,
            "ValidAfter": _json_time(self.valid_after),
            "ValidBefore": _json_time(self.valid_before),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@frozen
class _Root:
    """
    A root with the private key that signs with it.
    """

    key: _certbuild.PrivateKey
    certificate: x509.Certificate
    pem: str
    intermediates: tuple[str, ...] | None
    active: bool
    create_index: int
    modify_index: int

    @property
    def id(self) -> str:
        return _certbuild.colon_hex(hashlib.sha1(self.der).digest())  # noqa: S324

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def subject_key_id(self) -> bytes:
        return _certbuild.subject_key_id_of(self.certificate)


def _add_years(moment: datetime.datetime, years: int) -> datetime.datetime:
    """
    Go's ``AddDate(years, 0, 0)``: 29 February becomes 1 March.
    """
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:
        return moment.replace(year=moment.year + years, month=3, day=1)


def _compact_uid(rng: random.Random) -> str:
    """
    Consul's CompactUID as CACN uses it: a random int64 in base 36, cut to 8
    characters, with the minus sign of a negative one dropped (7 or 8 chars).
    """
    value = rng.getrandbits(64)
    if value >= 1 << 63:
        value -= 1 << 64
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    magnitude, text = abs(value), ""
    while True:
        magnitude, digit = divmod(magnitude, 36)
        text = digits[digit] + text
        if not magnitude:
            break
    return (("-" if value < 0 else "") + text)[:8].replace("-", "")


def _key_description(key: _certbuild.PrivateKey) -> tuple[str, int]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ec", key.curve.key_size
    return "rsa", key.key_size


class DevCA:
    """
    A certificate authority that issues what Consul 1.8.7's built-in CA
    issues.

    :param clock: where time comes from (``clock.seconds()``); a test
        ``Clock`` should start at the wall-clock time, since OpenSSL checks
        certificate validity against it.
    :param cluster_id: the cluster UUID; the trust domain is
        ``<cluster_id>.consul``.  Random when not given.
    :param datacenter: the datacenter in leaf SPIFFE IDs by default.
    :param leaf_ttl: leaf lifetime in seconds (Consul's ``LeafCertTTL``).
    :param rng: randomness for the cluster id and root names.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        cluster_id: str | None = None,
        datacenter: str = "dc1",
        leaf_ttl: float = DEFAULT_LEAF_TTL,
        rng: random.Random | None = None,
        next_index: Callable[[], int] | None = None,
    ) -> None:
        self._clock = clock
        self._rng: random.Random = secrets.SystemRandom() if rng is None else rng
        if cluster_id is None:
            cluster_id = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        else:
            try:
                cluster_id = str(uuid.UUID(cluster_id))
            except (ValueError, TypeError, AttributeError):
                raise ValueError(
                    f"cluster_id must be a UUID such as "
                    f"'35fbb6e4-f678-8abb-17a1-d9437ce1a4b3', not {cluster_id!r}"
                ) from None
        if not datacenter or "/" in datacenter:
            raise ValueError(
                f"datacenter must be a non-empty name without '/', not {datacenter!r}"
            )
        self._cluster_id = cluster_id
        self._datacenter = datacenter
        self._leaf_ttl = 0.0
        self.set_leaf_ttl(leaf_ttl)
        # A fresh `consul agent -dev` signs its root with serial 7 and its
        # first leaf with 8 ("08"): the same numbers here.
        self._serials = count(FIRST_SERIAL)
        self._next_index: Callable[[], int] = (
            count(1).__next__ if next_index is None else next_index
        )
        self._roots: list[_Root] = [self._new_root()]

    @property
    def cluster_id(self) -> str:
        """
        The cluster UUID (``ExternalTrustDomain``).
        """
        return self._cluster_id

    @property
    def trust_domain(self) -> str:
        """
        ``<cluster id>.consul``, the host of every SPIFFE ID this CA signs.
        """
        return f"{self._cluster_id}.consul"

    @property
    def datacenter(self) -> str:
        return self._datacenter

    @property
    def leaf_ttl(self) -> float:
        """
        The lifetime of new leaves, in seconds.
        """
        return self._leaf_ttl

    @property
    def active_root_id(self) -> str:
        """
        The ID of the root that signs new leaves.
        """
        return self._active().id

    def set_leaf_ttl(self, seconds: float) -> None:
        """
        Set the lifetime of leaves signed from now on.  The agent's
        configuration endpoint enforces Consul's one-hour minimum; this takes
        any positive number of seconds.
        """
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not seconds > 0
            or seconds == float("inf")
        ):
            raise ValueError(
                f"leaf_ttl must be a positive number of seconds, not {seconds!r}"
            )
        self._leaf_ttl = float(seconds)

    def roots(self) -> CARoots:
        """
        Every root, active or not, as the roots endpoint lists them.
        """
        records = sorted((self._record(root) for root in self._roots), key=_by_id)
        return CARoots(
            active_root_id=self.active_root_id,
            trust_domain=self.trust_domain,
            roots=tuple(records),
            index=max(root.modify_index for root in records),
        )

    def sign_leaf(
        self,
        service: str,
        *,
        namespace: str = "default",
        datacenter: str | None = None,
    ) -> IssuedLeaf:
        """
        Issue a new leaf for ``service`` (the unescaped name) from the active
        root.

        :raises LeafRequestError: with Consul's message, for the names Consul
            refuses: an empty name, or one that puts a ``/`` in the SPIFFE ID.
        """
        if datacenter is None:
            datacenter = self._datacenter
        if not service:
            raise LeafRequestError("URI must be either service or agent")
        uri = _certbuild.service_uri(
            self.trust_domain, service, namespace=namespace, datacenter=datacenter
        )
        if not _SERVICE_PATH.match(uri[len("spiffe://" + self.trust_domain) :]):
            raise LeafRequestError(f"SPIFFE ID is not in the expected format: {uri}")
        root = self._active()
        key = _certbuild.generate_private_key("ec")
        not_before = self._now() - _BACKDATE
        not_after = not_before + datetime.timedelta(seconds=round(self._leaf_ttl))
        serial = next(self._serials)
        certificate = _certbuild.build_certificate(
            subject=_certbuild.common_name(
                _certbuild.service_common_name(service, namespace, self.trust_domain)
            ),
            issuer=root.certificate.subject,
            public_key=key.public_key(),
            signing_key=root.key,
            serial=serial,
            not_before=not_before,
            not_after=not_after,
            ca=False,
            uris=[uri],
            extended_key_usages=_certbuild.LEAF_EXTENDED_KEY_USAGES,
            authority_key_id=root.subject_key_id,
        )
        index = self._next_index()
        return IssuedLeaf(
            serial_number=_certbuild.serial_hex(serial),
            cert_pem=_certbuild.certificate_pem(certificate)
            + "".join(root.intermediates or ()),
            private_key_pem=_certbuild.private_key_pem(key),
            service=service,
            service_uri=uri,
            valid_after=not_before,
            valid_before=not_after,
            create_index=index,
            modify_index=index,
            root_id=root.id,
        )

    def rotate(
        self,
        private_key_pem: str | None = None,
        root_cert_pem: str | None = None,
    ) -> CARoot:
        """
        Make a new root active, as ``PUT /v1/connect/ca/configuration`` does.

        With no arguments a new key and root are generated; with only
        ``private_key_pem``, a new root is made for that key (as Consul's
        built-in provider does for a ``PrivateKey`` without ``RootCert``,
        counting the root's serial before it reads the key, so a key that
        does not parse still uses one up);
        with both, the supplied root is used and its PEM kept
        byte-identical.  The old root stays listed, inactive; the new root's
        ``IntermediateCerts`` is its public key cross-signed by the old
        root, valid for seven days from a minute ago, so leaves it signs also
        chain to the old root.  Supplying the active root again changes
        nothing; supplying an inactive one makes it active again, listed
        once, with a new cross-signed intermediate, as in Consul.

        :returns: the new active root.
        :raises ValueError: naming the argument, when only the certificate is
            given, a PEM does not parse, the key does not match the
            certificate, or the certificate is not a CA.
        """
        if private_key_pem is None and root_cert_pem is not None:
            raise ValueError(
                "rotate() needs private_key_pem with root_cert_pem (a root "
                "certificate is used with its own key)"
            )
        old = self._active()
        if private_key_pem is None:
            new = self._new_root(index=0)
        elif root_cert_pem is None:
            serial = next(self._serials)
            new = self._new_root(
                key=_load_private_key(private_key_pem), index=0, serial=serial
            )
        else:
            new = self._supplied_root(private_key_pem, root_cert_pem)
            if new.id == old.id:
                return self._record(old)
        index = self._next_index()
        listed = next((root for root in self._roots if root.id == new.id), None)
        create_index = listed.create_index if listed is not None else index
        cross_signed = self._cross_sign(new.certificate, old)
        new = evolve(
            new,
            intermediates=(_certbuild.certificate_pem(cross_signed),),
            create_index=create_index,
            modify_index=index,
        )
        self._roots = [
            evolve(root, active=False, modify_index=index) if root is old else root
            for root in self._roots
            if root is not listed
        ]
        self._roots.append(new)
        return self._record(new)

    def _now(self) -> datetime.datetime:
        return _certbuild.utc_from_timestamp(self._clock.seconds())

    def _active(self) -> _Root:
        return next(root for root in self._roots if root.active)

    def _new_root(
        self,
        index: int | None = None,
        *,
        key: _certbuild.PrivateKey | None = None,
        serial: int | None = None,
    ) -> _Root:
        if key is None:
            key = _certbuild.generate_private_key("ec")
        now = self._now()
        subject = _certbuild.common_name(
            _certbuild.ca_common_name(_compact_uid(self._rng), self.trust_domain)
        )
        certificate = _certbuild.build_certificate(
            subject=subject,
            issuer=subject,
            public_key=key.public_key(),
            signing_key=key,
            serial=next(self._serials) if serial is None else serial,
            not_before=now,
            not_after=_add_years(now, _ROOT_YEARS),
            ca=True,
            uris=[_certbuild.signing_uri(self.trust_domain)],
        )
        if index is None:
            index = self._next_index()
        return _Root(
            key=key,
            certificate=certificate,
            pem=_certbuild.certificate_pem(certificate),
            intermediates=None,
            active=True,
            create_index=index,
            modify_index=index,
        )

    def _supplied_root(self, private_key_pem: str, root_cert_pem: str) -> _Root:
        key = _load_private_key(private_key_pem)
        try:
            certificate = x509.load_pem_x509_certificate(root_cert_pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise ValueError("root_cert_pem is not a PEM certificate") from None
        if certificate.public_key() != key.public_key():
            raise ValueError(
                "private_key_pem does not match the public key in root_cert_pem"
            )
        try:
            is_ca = certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ValueError(
                "root_cert_pem is not a CA certificate (BasicConstraints CA:TRUE "
                "is required to sign leaves)"
            )
        return _Root(
            key=key,
            certificate=certificate,
            pem=root_cert_pem,
            intermediates=None,
            active=True,
            create_index=0,
            modify_index=0,
        )

    def _cross_sign(self, certificate: x509.Certificate, by: _Root) -> x509.Certificate:
        not_before = self._now() - _BACKDATE
        return _certbuild.build_certificate(
            subject=certificate.subject,
            issuer=by.certificate.subject,
            public_key=certificate.public_key(),
            signing_key=by.key,
            serial=next(self._serials),
            not_before=not_before,
            not_after=not_before + _CROSS_SIGNED_LIFETIME,
            ca=True,
            uris=[_certbuild.signing_uri(self.trust_domain)],
            subject_key_id=_certbuild.subject_key_id_of(certificate),
            authority_key_id=by.subject_key_id,
        )

    def _record(self, root: _Root) -> CARoot:
        key_type, key_bits = _key_description(root.key)
        return CARoot(
            id=root.id,
            name=ROOT_NAME,
            serial_number=root.certificate.serial_number & ((1 << 64) - 1),
            signing_key_id=_certbuild.colon_hex(root.subject_key_id),
            external_trust_domain=self._cluster_id,
            not_before=root.certificate.not_valid_before_utc,
            not_after=root.certificate.not_valid_after_utc,
            root_cert=root.pem,
            intermediate_certs=root.intermediates,
            active=root.active,
            private_key_type=key_type,
            private_key_bits=key_bits,
            create_index=root.create_index,
            modify_index=root.modify_index,
        )


def _load_private_key(private_key_pem: str) -> _certbuild.PrivateKey:
    try:
        key = serialization.load_pem_private_key(
            private_key_pem.encode("ascii"), password=None
        )
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
        # No library text: what cryptography says is not Consul's, and the
        # agent's callers show this message to users.
        raise ValueError(
            "private_key_pem is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(
            f"private_key_pem must be an EC or RSA key, not {type(key).__name__}"
        )
    return key


def _by_id(root: CARoot) -> str:
    return root.id
