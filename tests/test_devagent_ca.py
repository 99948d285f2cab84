"""
Tests for connect_native.devagent.ca: the development agent's CA issues what
Consul 1.8.7's built-in CA issues.

The structure tests parse the real agent's certificates from
``tests/fixtures/real-1.8.7/`` and compare them, extension by extension, with
the DevCA's; the JSON tests compare keys and types with the captured bodies.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet.task import Clock

from connect_native import _certbuild
from connect_native.devagent.ca import DevCA, LeafRequestError
from tests.captures import body as real_json
from tests.captures import load as load_http
from tests.consul_agent import RealConsulAgent

REAL = Path(__file__).parent / "fixtures" / "real-1.8.7"
REAL_CLUSTER = "35fbb6e4-f678-8abb-17a1-d9437ce1a4b3"
REAL_TD = REAL_CLUSTER + ".consul"


def real_cert(name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((REAL / name).read_bytes())


def real_certs(name: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((REAL / name).read_bytes())


def pem_certs(text: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(text.encode("ascii"))


def start_clock() -> Clock:
    # Certificate validity is checked against the wall clock by OpenSSL, so a
    # test clock starts at the real time.
    clock = Clock()
    clock.advance(time.time())
    return clock


@pytest.fixture
def clock() -> Clock:
    return start_clock()


@pytest.fixture
def ca(clock: Clock) -> DevCA:
    return DevCA(clock, rng=random.Random(7))


def now_of(clock: Clock) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(clock.seconds()), datetime.timezone.utc)


def ext(cert: x509.Certificate, kind: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(kind).value


def shape(
    cert: x509.Certificate, issuer: x509.Certificate | None = None
) -> dict[str, Any]:
    """
    Everything about a certificate's structure that does not vary per run:
    the values that do (keys, names, times, serials) are reduced to their form.
    """
    key = cert.public_key()
    san = ext(cert, x509.SubjectAlternativeName)
    skid = ext(cert, x509.SubjectKeyIdentifier).digest
    akid = ext(cert, x509.AuthorityKeyIdentifier)
    result: dict[str, Any] = {
        "version": cert.version,
        "signature": cert.signature_algorithm_oid,
        "key": (
            isinstance(key, ec.EllipticCurvePublicKey),
            getattr(key, "curve", None).__class__,
        ),
        "subject": [(a.oid, a._type) for a in cert.subject],
        "issuer": [(a.oid, a._type) for a in cert.issuer],
        "extensions": [(e.oid, e.critical) for e in cert.extensions],
        "key_usage": ext(cert, x509.KeyUsage),
        "basic_constraints": ext(cert, x509.BasicConstraints),
        "skid_length": len(skid),
        "akid_fields": (
            akid.authority_cert_issuer,
            akid.authority_cert_serial_number,
        ),
        "san_types": [type(name) for name in san],
        "uri_count": len(san.get_values_for_type(x509.UniformResourceIdentifier)),
        "self_signed_akid": akid.key_identifier == skid,
    }
    if issuer is not None:
        result["issuer_is_signer"] = cert.issuer == issuer.subject
        result["akid_is_signer_skid"] = (
            akid.key_identifier == ext(issuer, x509.SubjectKeyIdentifier).digest
        )
    try:
        result["eku"] = list(ext(cert, x509.ExtendedKeyUsage))
    except x509.ExtensionNotFound:
        result["eku"] = None
    return result


def json_types(value: Any) -> Any:
    """
    The JSON's shape: keys in order and the type of each value.
    """
    if isinstance(value, dict):
        return [(k, json_types(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [json_types(v) for v in value]
    return type(value).__name__


def verify(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    at: datetime.datetime,
    purpose: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> list[x509.Certificate]:
    """
    Verify with cryptography's RFC 5280 path builder.  Its ClientVerifier
    takes a URI-only SAN; for serverAuth the EKU check is swapped for one
    that wants serverAuth (ServerVerifier insists on a DNS or IP name).
    """
    builder = verification.PolicyBuilder().store(verification.Store(list(roots)))
    builder = builder.time(at)
    if purpose != ExtendedKeyUsageOID.CLIENT_AUTH:

        def wants_purpose(policy: object, cert: object, value: Any) -> None:
            if purpose not in list(value):
                raise ValueError(f"no {purpose} in the EKU")

        builder = builder.extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=verification.ExtensionPolicy.webpki_defaults_ee().require_present(
                x509.ExtendedKeyUsage, verification.Criticality.AGNOSTIC, wants_purpose
            ),
        )
    return builder.build_client_verifier().verify(leaf, list(intermediates)).chain


def openssl_verify(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> None:
    """
    Verify with OpenSSL itself (what the TLS layer runs), at the wall clock.
    """
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        chain=[crypto.X509.from_cryptography(c) for c in intermediates],
    ).verify_certificate()


def root_certs(ca: DevCA) -> list[x509.Certificate]:
    return [pem_certs(root.root_cert)[0] for root in ca.roots().roots]


def active_root_cert(ca: DevCA) -> x509.Certificate:
    return pem_certs(ca.roots().active_root.root_cert)[0]


def rotate_to_real_supplied_root(ca: DevCA) -> None:
    ca.rotate(
        (REAL / "rotation-new-root-input.key.pem").read_text(),
        (REAL / "rotation-new-root-input.pem").read_text(),
    )


# --- structure against the real agent's certificates ---


def test_root_has_the_real_roots_structure(ca: DevCA) -> None:
    real = real_cert("root.pem")
    ours = active_root_cert(ca)
    assert shape(ours) == shape(real)


def test_leaf_has_the_real_leafs_structure(ca: DevCA) -> None:
    real = real_cert("leaf-web.pem")
    real_root = real_cert("root.pem")
    [ours] = pem_certs(ca.sign_leaf("web").cert_pem)
    assert shape(ours, active_root_cert(ca)) == shape(real, real_root)


def test_cross_signed_has_the_real_cross_signed_structure(ca: DevCA) -> None:
    # The real rotation used a supplied (OpenSSL-made) root; supplying the
    # very same one makes even the 20-byte SKID and UTF8String name comparable.
    real = real_cert("rotation-cross-signed.pem")
    real_old_root = real_cert("root.pem")
    old_root = active_root_cert(ca)
    rotate_to_real_supplied_root(ca)
    intermediates = ca.roots().active_root.intermediate_certs
    assert intermediates is not None
    [ours] = pem_certs(intermediates[0])
    assert shape(ours, old_root) == shape(real, real_old_root)


def test_leaf_after_rotation_has_the_real_structure(ca: DevCA) -> None:
    real_leaf, real_cross = real_certs("rotation-leaf-web-after.pem")
    real_new_root = real_cert("rotation-new-root.pem")
    rotate_to_real_supplied_root(ca)
    ours_leaf, ours_cross = pem_certs(ca.sign_leaf("web").cert_pem)
    assert shape(ours_leaf, active_root_cert(ca)) == shape(real_leaf, real_new_root)
    assert (
        ours_cross.public_bytes(serialization.Encoding.PEM).decode()
        == (ca.roots().active_root.intermediate_certs or ("",))[0]
    )
    assert shape(ours_cross) == shape(real_cross)


def test_supplied_root_is_listed_exactly_as_the_real_agent_lists_it(
    ca: DevCA,
) -> None:
    real = real_json("rotation-roots-after.http")["Roots"]
    real_new = next(root for root in real if root["Active"])
    rotate_to_real_supplied_root(ca)
    ours = ca.roots().active_root.to_json()
    for key in ("ID", "Name", "SerialNumber", "SigningKeyID", "NotBefore",
                "NotAfter", "RootCert", "Active", "PrivateKeyType",
                "PrivateKeyBits"):  # fmt: skip
        assert ours[key] == real_new[key], key
    # 7625921383430209242: the low 64 bits of a 159-bit serial, beyond 2**53.
    assert ours["SerialNumber"] > 2**53


# --- the root ---


def test_root_names_the_cluster_and_its_trust_domain(clock: Clock) -> None:
    ca = DevCA(clock, cluster_id=REAL_CLUSTER)
    root = active_root_cert(ca)
    [cn] = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert re.fullmatch(
        r"pri-[0-9a-z]{7,8}\.consul\.ca\.35fbb6e4\.consul", str(cn.value)
    )
    assert root.issuer == root.subject
    assert ext(root, x509.SubjectAlternativeName).get_values_for_type(
        x509.UniformResourceIdentifier
    ) == ["spiffe://" + REAL_TD]
    assert ca.trust_domain == REAL_TD
    assert ca.roots().trust_domain == REAL_TD


def test_root_is_valid_for_ten_years_from_now_not_backdated(clock: Clock) -> None:
    root = active_root_cert(DevCA(clock))
    now = now_of(clock)
    assert root.not_valid_before_utc == now
    assert root.not_valid_after_utc == now.replace(year=now.year + 10)


def test_root_key_ids_are_sha256_of_the_public_key_info(ca: DevCA) -> None:
    root = active_root_cert(ca)
    spki = root.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    skid = ext(root, x509.SubjectKeyIdentifier).digest
    assert skid == hashlib.sha256(spki).digest()
    assert ext(root, x509.AuthorityKeyIdentifier).key_identifier == skid
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)


def test_roots_json_has_the_real_keys_and_types(ca: DevCA) -> None:
    real = real_json("ca-roots.http")
    assert json_types(ca.roots().to_json()) == json_types(real)


def test_roots_json_ids_are_the_real_derivations(ca: DevCA) -> None:
    body = ca.roots().to_json()
    [root] = body["Roots"]
    cert = pem_certs(root["RootCert"])[0]
    der = cert.public_bytes(serialization.Encoding.DER)
    assert root["ID"] == body["ActiveRootID"]
    assert root["ID"] == ":".join(f"{b:02x}" for b in hashlib.sha1(der).digest())
    assert root["SigningKeyID"] == ":".join(
        f"{b:02x}" for b in ext(cert, x509.SubjectKeyIdentifier).digest
    )
    assert root["SerialNumber"] == cert.serial_number
    assert root["RootCert"].endswith("-----END CERTIFICATE-----\n")
    assert root["IntermediateCerts"] is None
    assert root["ExternalTrustDomain"] == ca.cluster_id
    assert body["TrustDomain"] == ca.cluster_id + ".consul"
    assert root["NotBefore"] == cert.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (root["Name"], root["Active"], root["PrivateKeyType"]) == (
        "Consul CA Root Cert",
        True,
        "ec",
    )
    assert root["PrivateKeyBits"] == 256


# --- leaves ---


def test_leaf_json_has_the_real_keys_and_types(ca: DevCA) -> None:
    assert json_types(ca.sign_leaf("web").to_json()) == json_types(
        real_json("leaf-web.http")
    )


def test_leaf_is_backdated_a_minute_and_lives_for_the_ttl(clock: Clock) -> None:
    ca = DevCA(clock)
    clock.advance(3600.7)
    leaf = ca.sign_leaf("web")
    [cert] = pem_certs(leaf.cert_pem)
    expected_start = now_of(clock) - datetime.timedelta(minutes=1)
    assert leaf.valid_after == cert.not_valid_before_utc == expected_start
    assert leaf.valid_before == cert.not_valid_after_utc
    assert leaf.valid_before - leaf.valid_after == datetime.timedelta(hours=72)
    assert leaf.to_json()["ValidAfter"] == expected_start.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_set_leaf_ttl_changes_the_lifetime_of_new_leaves(ca: DevCA) -> None:
    ca.set_leaf_ttl(120)
    leaf = ca.sign_leaf("web")
    assert leaf.valid_before - leaf.valid_after == datetime.timedelta(minutes=2)
    assert ca.leaf_ttl == 120


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), True, "72h"])
def test_leaf_ttl_must_be_positive_seconds(clock: Clock, bad: Any) -> None:
    with pytest.raises(ValueError, match="leaf_ttl"):
        DevCA(clock, leaf_ttl=bad)


def test_leaf_key_is_sec1_p256_and_matches_the_certificate(ca: DevCA) -> None:
    leaf = ca.sign_leaf("web")
    assert leaf.private_key_pem.startswith("-----BEGIN EC PRIVATE KEY-----\n")
    assert leaf.private_key_pem.endswith("-----END EC PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(leaf.private_key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert pem_certs(leaf.cert_pem)[0].public_key() == key.public_key()


def test_leaf_uri_is_its_only_name_and_matches_service_uri(ca: DevCA) -> None:
    leaf = ca.sign_leaf("web")
    [cert] = pem_certs(leaf.cert_pem)
    san = ext(cert, x509.SubjectAlternativeName)
    assert list(san) == [x509.UniformResourceIdentifier(leaf.service_uri)]
    assert leaf.service_uri == f"spiffe://{ca.trust_domain}/ns/default/dc/dc1/svc/web"
    assert cert.issuer == active_root_cert(ca).subject


def test_leaf_datacenter_and_namespace_go_into_the_uri_and_cn(clock: Clock) -> None:
    ca = DevCA(clock, cluster_id=REAL_CLUSTER, datacenter="east")
    leaf = ca.sign_leaf("web")
    assert leaf.service_uri.endswith("/ns/default/dc/east/svc/web")
    other = ca.sign_leaf("web", namespace="team", datacenter="west")
    assert other.service_uri.endswith("/ns/team/dc/west/svc/web")
    [cn] = pem_certs(other.cert_pem)[0].subject
    assert cn.value == "web.svc.team.35fbb6e4.consul"


REAL_NAMED_LEAVES = [
    "leaf-web.http",
    "leaf-unregistered.http",
    "leaf-name-uppercase.http",
    "leaf-name-dot.http",
    "leaf-name-underscore.http",
    "leaf-name-space.http",
    "leaf-name-unicode.http",
    "leaf-name-long.http",
]


@pytest.mark.parametrize("capture", REAL_NAMED_LEAVES)
def test_cn_and_uri_are_mangled_as_the_real_agent_does(
    clock: Clock, capture: str
) -> None:
    real = real_json(capture)
    [real_cert_] = pem_certs(real["CertPEM"])
    ca = DevCA(clock, cluster_id=REAL_CLUSTER)
    leaf = ca.sign_leaf(real["Service"])
    [ours] = pem_certs(leaf.cert_pem)
    assert ours.subject == real_cert_.subject
    assert leaf.service_uri == real["ServiceURI"]
    assert leaf.service == real["Service"]
    assert ext(ours, x509.SubjectAlternativeName) == ext(
        real_cert_, x509.SubjectAlternativeName
    )


@pytest.mark.parametrize(
    ("service", "label"),
    [
        ("never-registered", "neverregistered"),
        ("a.b", "ab"),
        ("ünï", "n"),
        ("Web", "web"),
        ("a b", "ab"),
        ("x" * 70, "x" * 36),
    ],
)
def test_cn_mangling_table(clock: Clock, service: str, label: str) -> None:
    # REAL-BEHAVIOUR.md section 3, in the trust domain's own words.
    ca = DevCA(clock, cluster_id=REAL_CLUSTER)
    [cn] = pem_certs(ca.sign_leaf(service).cert_pem)[0].subject
    assert cn.value == f"{label}.svc.default.35fbb6e4.consul"
    assert len(str(cn.value)) <= 64


def test_empty_name_is_refused_with_consuls_message(ca: DevCA) -> None:
    body = load_http("leaf-name-empty.http")[3]
    with pytest.raises(LeafRequestError) as raised:
        ca.sign_leaf("")
    assert str(raised.value) == body
    assert isinstance(raised.value, ValueError)


def test_slash_in_name_is_refused_with_consuls_message(clock: Clock) -> None:
    body = load_http("leaf-name-slash.http")[3]
    ca = DevCA(clock, cluster_id=REAL_CLUSTER)
    with pytest.raises(LeafRequestError) as raised:
        ca.sign_leaf("a/b")
    assert str(raised.value) == body


def test_refused_names_use_no_serial(ca: DevCA) -> None:
    with pytest.raises(LeafRequestError):
        ca.sign_leaf("")
    assert ca.sign_leaf("web").serial_number == "08"


# --- serials and indexes ---


def test_one_serial_counter_for_roots_leaves_and_cross_signed(ca: DevCA) -> None:
    assert ca.roots().active_root.serial_number == 7
    assert ca.sign_leaf("web").serial_number == "08"
    assert ca.sign_leaf("db").serial_number == "09"
    ca.rotate()
    new_root = ca.roots().active_root
    assert new_root.serial_number == 10
    assert new_root.intermediate_certs is not None
    assert pem_certs(new_root.intermediate_certs[0])[0].serial_number == 11
    leaf = ca.sign_leaf("web")
    assert leaf.serial_number == "0c"
    assert pem_certs(leaf.cert_pem)[0].serial_number == 12


@pytest.mark.parametrize(
    ("serial", "text"),
    [(8, "08"), (30, "1e"), (255, "ff"), (256, "01:00"), (0x10203, "01:02:03")],
)
def test_leaf_serial_is_consuls_colon_hex(serial: int, text: str) -> None:
    assert _certbuild.serial_hex(serial) == text


def test_indexes_come_from_the_injected_source(clock: Clock) -> None:
    indexes = iter([9, 14, 82])
    ca = DevCA(clock, next_index=lambda: next(indexes))
    assert ca.roots().to_json()["Roots"][0]["CreateIndex"] == 9
    leaf = ca.sign_leaf("web").to_json()
    assert (leaf["CreateIndex"], leaf["ModifyIndex"]) == (14, 14)
    ca.rotate()
    roots = ca.roots()
    old = next(root for root in roots.roots if not root.active)
    assert (old.create_index, old.modify_index) == (9, 82)
    assert (roots.active_root.create_index, roots.active_root.modify_index) == (82, 82)
    assert roots.index == 82


# --- chains ---


def test_leaf_verifies_against_the_root_for_client_and_server_auth(
    ca: DevCA, clock: Clock
) -> None:
    [leaf] = pem_certs(ca.sign_leaf("web").cert_pem)
    root = active_root_cert(ca)
    for purpose in (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH):
        assert verify(leaf, [], [root], now_of(clock), purpose) == [leaf, root]
    openssl_verify(leaf, [], [root])


def test_leaf_does_not_verify_against_another_cas_root(ca: DevCA, clock: Clock) -> None:
    [leaf] = pem_certs(ca.sign_leaf("web").cert_pem)
    other = active_root_cert(DevCA(clock, cluster_id=ca.cluster_id))
    with pytest.raises(verification.VerificationError):
        verify(leaf, [], [other], now_of(clock))


def test_rotation_keeps_the_old_root_inactive_and_cross_signs_the_new(
    ca: DevCA, clock: Clock
) -> None:
    old = ca.roots().active_root
    clock.advance(86400)
    new = ca.rotate()
    roots = ca.roots()
    assert roots.active_root_id == new.id != old.id
    assert [r.id for r in roots.roots] == sorted([old.id, new.id])
    assert {r.id: r.active for r in roots.roots} == {old.id: False, new.id: True}
    old_after = next(r for r in roots.roots if r.id == old.id)
    assert old_after.intermediate_certs is None
    assert old_after.root_cert == old.root_cert
    assert new.intermediate_certs is not None
    [cross] = [pem_certs(p)[0] for p in new.intermediate_certs]
    old_cert, new_cert = pem_certs(old.root_cert)[0], pem_certs(new.root_cert)[0]
    assert cross.issuer == old_cert.subject
    assert cross.subject == new_cert.subject
    assert cross.public_key() == new_cert.public_key()
    assert ext(cross, x509.SubjectKeyIdentifier) == ext(
        new_cert, x509.SubjectKeyIdentifier
    )
    assert (
        ext(cross, x509.AuthorityKeyIdentifier).key_identifier
        == ext(old_cert, x509.SubjectKeyIdentifier).digest
    )
    assert ext(cross, x509.BasicConstraints).ca
    assert ext(cross, x509.SubjectAlternativeName).get_values_for_type(
        x509.UniformResourceIdentifier
    ) == ["spiffe://" + ca.trust_domain]
    start = now_of(clock) - datetime.timedelta(minutes=1)
    assert cross.not_valid_before_utc == start
    assert cross.not_valid_after_utc == start + datetime.timedelta(days=7)
    assert new_cert.not_valid_before_utc == now_of(clock)
    assert old_cert.subject != new_cert.subject


def test_leaf_after_rotation_chains_to_both_roots(ca: DevCA, clock: Clock) -> None:
    old_root = active_root_cert(ca)
    ca.rotate()
    new_root = active_root_cert(ca)
    leaf = ca.sign_leaf("web")
    cert, cross = pem_certs(leaf.cert_pem)
    assert cert.issuer == new_root.subject
    assert leaf.root_id == ca.active_root_id
    at = now_of(clock)
    assert verify(cert, [], [new_root], at) == [cert, new_root]
    assert verify(cert, [cross], [old_root], at) == [cert, cross, old_root]
    assert verify(cert, [cross], [old_root], at, ExtendedKeyUsageOID.SERVER_AUTH)
    openssl_verify(cert, [cross], [old_root])
    openssl_verify(cert, [], [new_root])


def test_leaf_from_before_rotation_verifies_only_with_the_old_root(
    ca: DevCA, clock: Clock
) -> None:
    before = ca.sign_leaf("web")
    [stale] = pem_certs(before.cert_pem)
    old_root = active_root_cert(ca)
    ca.rotate()
    assert before.root_id != ca.active_root_id
    new_root = active_root_cert(ca)
    with pytest.raises(verification.VerificationError):
        verify(stale, [], [new_root], now_of(clock))
    with pytest.raises(crypto.X509StoreContextError):
        openssl_verify(stale, [], [new_root])
    # The old root is still listed, so a peer holding every root accepts it.
    assert verify(stale, [], root_certs(ca), now_of(clock))[-1] == old_root


def test_second_rotation_is_cross_signed_by_the_previous_active_root(
    ca: DevCA, clock: Clock
) -> None:
    ca.rotate()
    middle = active_root_cert(ca)
    ca.rotate()
    roots = ca.roots()
    assert len(roots.roots) == 3
    assert sum(r.active for r in roots.roots) == 1
    assert roots.active_root.intermediate_certs is not None
    [cross] = pem_certs(roots.active_root.intermediate_certs[0])
    assert cross.issuer == middle.subject
    cert, chain_cross = pem_certs(ca.sign_leaf("web").cert_pem)
    assert verify(cert, [chain_cross], [middle], now_of(clock))[-1] == middle


def test_supplied_root_is_kept_byte_identical_and_signs_leaves(
    ca: DevCA, clock: Clock
) -> None:
    supplied = (REAL / "rotation-new-root-input.pem").read_text()
    new = ca.rotate((REAL / "rotation-new-root-input.key.pem").read_text(), supplied)
    assert new.root_cert == supplied
    assert (
        new.signing_key_id
        == "84:07:ad:e7:5f:8c:c6:a2:0c:81:a6:9a:d0:84:11:ce:53:73:86:e6"
    )
    assert new.external_trust_domain == ca.cluster_id
    cert, _cross = pem_certs(ca.sign_leaf("web").cert_pem)
    # The supplied root expires in 2036; check within both validities.
    verify(cert, [], [pem_certs(supplied)[0]], now_of(clock))


def test_supplying_the_active_root_again_changes_nothing(ca: DevCA) -> None:
    key = (REAL / "rotation-new-root-input.key.pem").read_text()
    cert = (REAL / "rotation-new-root-input.pem").read_text()
    ca.rotate(key, cert)
    before = ca.roots()
    assert ca.rotate(key, cert) == before.active_root
    assert ca.roots() == before


def test_a_key_alone_gets_a_new_root_made_for_it(ca: DevCA) -> None:
    # Consul's built-in provider makes a root for a PrivateKey without a
    # RootCert (ca-key-only: 200 and a new active root on that key).
    key = (REAL / "rotation-new-root-input.key.pem").read_text()
    supplied = x509.load_pem_x509_certificate(
        (REAL / "rotation-new-root-input.pem").read_bytes()
    )
    old = ca.roots().active_root
    new = ca.rotate(key)
    roots = ca.roots()
    assert len(roots.roots) == 2
    assert roots.active_root_id == new.id != old.id
    (cert,) = x509.load_pem_x509_certificates(new.root_cert.encode())
    assert cert.public_key() == supplied.public_key()
    assert cert != supplied
    assert new.intermediate_certs is not None
    assert len(new.intermediate_certs) == 1


def test_an_inactive_root_supplied_again_is_listed_once(ca: DevCA) -> None:
    key = (REAL / "rotation-new-root-input.key.pem").read_text()
    cert = (REAL / "rotation-new-root-input.pem").read_text()
    first = ca.rotate(key, cert)
    ca.rotate()
    again = ca.rotate(key, cert)
    roots = ca.roots()
    assert [r.id for r in roots.roots].count(first.id) == 1
    assert roots.active_root_id == first.id == again.id
    assert again.create_index == first.create_index
    assert again.modify_index > first.modify_index
    assert len(roots.roots) == 3


@pytest.mark.parametrize(
    ("key_file", "cert_file", "message"),
    [
        (None, "rotation-new-root-input.pem", "needs private_key_pem"),
        ("leaf-web.key.pem", "rotation-new-root-input.pem", "does not match"),
        ("leaf-web.key.pem", "leaf-web.pem", "not a CA"),
        (
            "rotation-new-root-input.pem",
            "rotation-new-root-input.pem",
            "private_key_pem",
        ),
        ("rotation-new-root-input.key.pem", "leaf-web.key.pem", "root_cert_pem"),
    ],
)
def test_bad_supplied_roots_are_refused_naming_the_input(
    ca: DevCA, key_file: str | None, cert_file: str | None, message: str
) -> None:
    before = ca.roots()
    with pytest.raises(ValueError, match=message):
        ca.rotate(
            None if key_file is None else (REAL / key_file).read_text(),
            None if cert_file is None else (REAL / cert_file).read_text(),
        )
    assert ca.roots() == before


# --- construction ---


def test_same_rng_seed_gives_the_same_cluster_and_root_name(clock: Clock) -> None:
    def name(ca: DevCA) -> Any:
        return active_root_cert(ca).subject

    first, second = (
        DevCA(clock, rng=random.Random(3)),
        DevCA(clock, rng=random.Random(3)),
    )
    assert first.cluster_id == second.cluster_id
    assert name(first) == name(second)
    assert name(DevCA(clock, rng=random.Random(4))) != name(first)


def test_rotated_roots_get_fresh_names(ca: DevCA) -> None:
    names = {active_root_cert(ca).subject}
    for _ in range(3):
        ca.rotate()
        names.add(active_root_cert(ca).subject)
    assert len(names) == 4


def test_cluster_id_must_be_a_uuid(clock: Clock) -> None:
    with pytest.raises(ValueError, match="cluster_id must be a UUID"):
        DevCA(clock, cluster_id="not-a-uuid")


def test_root_unique_ids_are_seven_or_eight_base36_chars(clock: Clock) -> None:
    rng = random.Random(11)
    labels = set()
    for _ in range(40):
        ca = DevCA(clock, rng=rng)
        [cn] = active_root_cert(ca).subject
        labels.add(len(str(cn.value).split(".")[0]) - len("pri-"))
    assert labels == {7, 8}


def test_time_comes_from_the_clock(clock: Clock) -> None:
    ca = DevCA(clock)
    first = ca.sign_leaf("web")
    clock.advance(3 * 86400)
    second = ca.sign_leaf("web")
    assert second.valid_after - first.valid_after == datetime.timedelta(days=3)


# --- against a live real Consul 1.8.7 ---


def live_json(agent: RealConsulAgent, path: str, body: object = None) -> Any:
    status, data = agent.request("GET" if body is None else "PUT", path, body)
    assert status == 200, (path, data)
    return json.loads(data) if data else None


def test_leaf_and_roots_match_a_live_agents(
    real_consul: RealConsulAgent, unique_name: str, clock: Clock
) -> None:
    # An awkward name exercises the CN mangling and URI escaping end to end.
    service = f"{unique_name}_Ab c"
    roots = live_json(real_consul, "/v1/agent/connect/ca/roots")
    leaf = live_json(real_consul, "/v1/agent/connect/ca/leaf/" + quote(service))
    [real_root] = [r for r in roots["Roots"] if r["Active"]]
    [real_leaf_cert] = pem_certs(leaf["CertPEM"])
    real_root_cert = pem_certs(real_root["RootCert"])[0]

    ca = DevCA(clock, cluster_id=real_root["ExternalTrustDomain"])
    ours = ca.sign_leaf(service)
    [our_cert] = pem_certs(ours.cert_pem)

    assert json_types(ca.roots().to_json()) == json_types(roots)
    assert json_types(ours.to_json()) == json_types(leaf)
    assert shape(active_root_cert(ca)) == shape(real_root_cert)
    assert shape(our_cert, active_root_cert(ca)) == shape(
        real_leaf_cert, real_root_cert
    )
    assert our_cert.subject == real_leaf_cert.subject
    assert (ours.service, ours.service_uri) == (leaf["Service"], leaf["ServiceURI"])
    assert ca.trust_domain == roots["TrustDomain"]
    [real_cn] = real_root_cert.subject
    [our_cn] = active_root_cert(ca).subject
    assert str(our_cn.value).split(".", 1)[1] == str(real_cn.value).split(".", 1)[1]


SAME_FOR_THE_SAME_ROOT = (
    "ID",
    "Name",
    "SerialNumber",
    "SigningKeyID",
    "RootCert",
    "NotBefore",
    "NotAfter",
    "PrivateKeyType",
    "PrivateKeyBits",
)


def by_active(root: dict[str, Any]) -> bool:
    return not root["Active"]


def test_rotation_to_a_supplied_root_matches_a_live_agents(
    fresh_real_consul: RealConsulAgent, clock: Clock
) -> None:
    agent = fresh_real_consul
    before = live_json(agent, "/v1/connect/ca/roots")
    [real_old] = before["Roots"]
    # The same supplied root goes to both CAs.
    key = _certbuild.generate_private_key("ec")
    subject = _certbuild.common_name("Supplied Test Root")
    supplied = _certbuild.build_certificate(
        subject=subject,
        issuer=subject,
        public_key=key.public_key(),
        signing_key=key,
        serial=x509.random_serial_number(),
        not_before=now_of(clock),
        not_after=now_of(clock) + datetime.timedelta(days=3650),
        ca=True,
        uris=[_certbuild.signing_uri(before["TrustDomain"])],
    )
    key_pem = _certbuild.private_key_pem(key)
    cert_pem = _certbuild.certificate_pem(supplied)
    live_json(
        agent,
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"PrivateKey": key_pem, "RootCert": cert_pem}},
    )
    after = live_json(agent, "/v1/connect/ca/roots")
    real_leaf = live_json(agent, "/v1/agent/connect/ca/leaf/fresh-after-rotation")

    ca = DevCA(clock, cluster_id=real_old["ExternalTrustDomain"])
    our_old_root = active_root_cert(ca)
    ca.rotate(key_pem, cert_pem)
    ours = ca.roots().to_json()
    our_leaf = ca.sign_leaf("fresh-after-rotation")

    # Both list roots in ID order (Consul's state store index), so which root
    # comes first depends on the old roots' random IDs: compare by activity.
    assert [r["ID"] for r in after["Roots"]] == sorted(r["ID"] for r in after["Roots"])
    assert [r["ID"] for r in ours["Roots"]] == sorted(r["ID"] for r in ours["Roots"])
    assert json_types(dict(ours, Roots=sorted(ours["Roots"], key=by_active))) == (
        json_types(dict(after, Roots=sorted(after["Roots"], key=by_active)))
    )
    real_new = next(r for r in after["Roots"] if r["Active"])
    our_new = next(r for r in ours["Roots"] if r["Active"])
    for field in SAME_FOR_THE_SAME_ROOT:
        assert our_new[field] == real_new[field], field
    assert [r["Active"] for r in after["Roots"] if r["ID"] == real_old["ID"]] == [False]
    [real_cross] = [pem_certs(p)[0] for p in real_new["IntermediateCerts"]]
    [our_cross] = [pem_certs(p)[0] for p in our_new["IntermediateCerts"]]
    real_old_cert = pem_certs(real_old["RootCert"])[0]
    assert shape(our_cross, our_old_root) == shape(real_cross, real_old_cert)
    real_chain, our_chain = (
        pem_certs(real_leaf["CertPEM"]),
        pem_certs(our_leaf.cert_pem),
    )
    assert len(real_chain) == len(our_chain) == 2
    assert shape(our_chain[0], supplied) == shape(real_chain[0], supplied)
    assert our_chain[0].subject == real_chain[0].subject
