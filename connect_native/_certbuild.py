"""
Build X.509 certificates shaped like the ones Consul's built-in CA issues.

The one place in the project that assembles certificates: the development
agent's CA (``connect_native.devagent.ca``) and the certificate factory for
tests (``connect_native.testing``) both use it, so a leaf from either has the
same extensions, criticality, names and key identifiers as a leaf from a real
Consul 1.8.7 agent (see ``tests/fixtures/real-1.8.7/certs-*.txt``).
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Sequence
from typing import Literal
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: Consul's leaf EKU: both directions of mutual TLS.
LEAF_EXTENDED_KEY_USAGES: tuple[x509.ObjectIdentifier, ...] = (
    ExtendedKeyUsageOID.CLIENT_AUTH,
    ExtendedKeyUsageOID.SERVER_AUTH,
)

_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=True,
    key_agreement=True,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)

# Consul's invalidDNSNameChars: what survives into a common name.
_NOT_DNS_LABEL = re.compile(r"[^a-z0-9]")
_PRINTABLE = re.compile(r"^[A-Za-z0-9 '()+,\-./:=?]*$")
# A common name is at most 64 characters; ".svc." + 8 + ".consul" + the dot
# between service and namespace take 21 of them (Consul's ServiceCN).
_MAX_SERVICE_AND_NAMESPACE = 64 - 21
_MIN_SERVICE = 15
_MIN_NAMESPACE = 15
# Go's url.URL.EscapedPath keeps these besides letters, digits and "-_.~".
_GO_PATH_SAFE = "$&+,/:;=@"


def generate_private_key(key_type: KeyType = "ec") -> PrivateKey:
    """
    A fresh key: EC P-256 (what Consul generates) or RSA 2048.
    """
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key_type must be 'ec' or 'rsa', not {key_type!r}")


def key_id(public_key: CertificatePublicKeyTypes) -> bytes:
    """
    Consul's key identifier: SHA-256 of the SubjectPublicKeyInfo DER (32 bytes).

    RFC 5280's usual method is SHA-1 of the key bits only; Consul differs, and
    the roots' ``SigningKeyID`` exposes it.
    """
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def colon_hex(data: bytes) -> str:
    """
    Consul's HexString: lowercase hex, two digits per byte, colon-separated.
    """
    return ":".join(f"{b:02x}" for b in data)


def serial_hex(serial: int) -> str:
    """
    A certificate serial as Consul's leaf ``SerialNumber`` (EncodeSerialNumber:
    the big-endian bytes of the serial in colon hex, e.g. ``"08"``, ``"01:00"``).
    """
    length = max(1, (serial.bit_length() + 7) // 8)
    return colon_hex(serial.to_bytes(length, "big"))


def common_name(value: str) -> x509.Name:
    """
    A subject with only a common name, a PrintableString where the characters
    allow it (as Go's crypto/x509 encodes Consul's names), UTF8String otherwise.
    """
    asn1_type = (
        _ASN1Type.PrintableString if _PRINTABLE.match(value) else _ASN1Type.UTF8String
    )
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value, asn1_type)])


def _truncate(value: str, length: int) -> str:
    return value[: max(length, 0)]


def _truncate_service_and_namespace(service: str, namespace: str) -> tuple[str, str]:
    total = len(service) + len(namespace)
    if total <= _MAX_SERVICE_AND_NAMESPACE:
        return service, namespace
    to_remove = total - _MAX_SERVICE_AND_NAMESPACE
    if len(service) <= _MIN_SERVICE:
        return service, _truncate(namespace, len(namespace) - to_remove)
    if len(namespace) <= _MIN_NAMESPACE:
        return _truncate(service, len(service) - to_remove), namespace
    service_length = len(service) - to_remove // 2 - to_remove % 2
    namespace_length = len(namespace) - to_remove // 2
    if service_length <= _MIN_SERVICE:
        service_length = _MIN_SERVICE
        namespace_length = _MAX_SERVICE_AND_NAMESPACE - _MIN_SERVICE
    elif namespace_length <= _MIN_NAMESPACE:
        service_length = _MAX_SERVICE_AND_NAMESPACE - _MIN_NAMESPACE
        namespace_length = _MIN_NAMESPACE
    return _truncate(service, service_length), _truncate(namespace, namespace_length)


def service_common_name(service: str, namespace: str, trust_domain: str) -> str:
    """
    Consul's ServiceCN: ``<svc>.svc.<ns>.<first 8 of trust domain>.consul``.

    The service label is lower-cased and keeps only ``[a-z0-9]``, then cut so
    the name fits in 64 characters. Identities live in the URI SAN, never here.
    """
    label = _NOT_DNS_LABEL.sub("", service.lower())
    label, namespace = _truncate_service_and_namespace(label, namespace)
    return f"{label}.svc.{namespace}.{trust_domain[:8]}.consul"


def agent_common_name(node: str, trust_domain: str) -> str:
    """
    Consul's AgentCN: ``<node>.agnt.<first 8 of trust domain>.consul``.
    """
    label = _NOT_DNS_LABEL.sub("", node.lower())[: 64 - 21]
    return f"{label}.agnt.{trust_domain[:8]}.consul"


def ca_common_name(unique_id: str, trust_domain: str) -> str:
    """
    Consul's CACN for the built-in provider in the primary datacenter:
    ``pri-<unique id>.consul.ca.<first 8 of trust domain>.consul``.
    """
    label = _NOT_DNS_LABEL.sub("", unique_id.lower())[:8]
    return f"pri-{label}.consul.ca.{trust_domain[:8]}.consul"


def escape_path_segment(value: str) -> str:
    """
    Escape a name the way Go's ``url.URL.String()`` escapes a path, so a SPIFFE
    URI built here is byte-identical to Consul's (``a b`` -> ``a%20b``). A
    ``/`` is kept, as Go keeps it; Consul then rejects the URI.
    """
    return quote(value, safe=_GO_PATH_SAFE)


def service_uri(
    trust_domain: str,
    service: str,
    *,
    namespace: str = "default",
    datacenter: str = "dc1",
    partition: str | None = None,
) -> str:
    """
    The SPIFFE ID of a service: ``spiffe://<td>/ns/<ns>/dc/<dc>/svc/<svc>``,
    with ``/ap/<partition>`` first for a partition other than the default one,
    lower-cased, as newer Consul formats it.
    """
    prefix = ""
    if partition and partition.lower() != "default":
        prefix = f"/ap/{escape_path_segment(partition.lower())}"
    path = (
        f"{prefix}/ns/{escape_path_segment(namespace)}"
        f"/dc/{escape_path_segment(datacenter)}/svc/{escape_path_segment(service)}"
    )
    return f"spiffe://{trust_domain}{path}"


def agent_uri(trust_domain: str, node: str, *, datacenter: str = "dc1") -> str:
    """
    The SPIFFE ID of a client agent: ``spiffe://<td>/agent/client/dc/<dc>/id/<node>``.
    """
    return (
        f"spiffe://{trust_domain}/agent/client/dc/{escape_path_segment(datacenter)}"
        f"/id/{escape_path_segment(node)}"
    )


def signing_uri(trust_domain: str) -> str:
    """
    The SPIFFE ID a Consul CA certificate carries: ``spiffe://<td>``.
    """
    return f"spiffe://{trust_domain}"


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def build_certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    signing_key: CertificateIssuerPrivateKeyTypes,
    serial: int,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    ca: bool,
    uris: Sequence[str],
    extended_key_usages: Sequence[x509.ObjectIdentifier] | None = None,
    subject_key_id: bytes | None = None,
    authority_key_id: bytes | None = None,
) -> x509.Certificate:
    """
    Sign one certificate with Consul's extensions, in Consul's order.

    KeyUsage (critical; CA: digitalSignature, keyCertSign, cRLSign; leaf:
    digitalSignature, keyEncipherment, dataEncipherment, keyAgreement),
    ExtendedKeyUsage (non-critical, when given), BasicConstraints (critical,
    no path length), SubjectKeyIdentifier (``subject_key_id``, default Consul's
    SHA-256 key id), AuthorityKeyIdentifier (``authority_key_id``, default: the
    subject key id, i.e. self-signed), SubjectAlternativeName with exactly
    ``uris`` (left out when empty). No DNS or IP names, ever.
    """
    if extended_key_usages is not None and not extended_key_usages:
        raise ValueError(
            "extended_key_usages must name at least one usage, or be None to "
            "leave the extension out"
        )
    skid = key_id(public_key) if subject_key_id is None else subject_key_id
    akid = skid if authority_key_id is None else authority_key_id
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_CA_KEY_USAGE if ca else _LEAF_KEY_USAGE, critical=True)
    )
    if extended_key_usages is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usages)), critical=False
        )
    builder = (
        builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier(skid), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier(
                key_identifier=akid,
                authority_cert_issuer=None,
                authority_cert_serial_number=None,
            ),
            critical=False,
        )
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(uri) for uri in uris]
            ),
            critical=False,
        )
    return builder.sign(signing_key, _hash_for(signing_key))


def subject_key_id_of(certificate: x509.Certificate) -> bytes:
    """
    The certificate's SubjectKeyIdentifier, or Consul's key id of its public
    key when it carries none.
    """
    try:
        return certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    except x509.ExtensionNotFound:
        return key_id(certificate.public_key())


def certificate_pem(certificate: x509.Certificate) -> str:
    """
    PEM text of one certificate, ending in a newline (as Consul's JSON has it).
    """
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def private_key_pem(key: PrivateKey) -> str:
    """
    The traditional PEM form Consul hands out: SEC1 ``EC PRIVATE KEY`` for EC,
    PKCS#1 ``RSA PRIVATE KEY`` for RSA, unencrypted.
    """
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")


def utc_from_timestamp(seconds: float) -> datetime.datetime:
    """
    A UTC datetime, whole seconds only (certificate times have no fractions).
    """
    return datetime.datetime.fromtimestamp(int(seconds), tz=datetime.timezone.utc)
