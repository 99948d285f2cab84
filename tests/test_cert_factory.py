"""
Tests for connect_native.testing.CertificateFactory: every certificate shape
it makes has the property it claims, and only that one (a bad leaf is bad in
one way: an expired leaf still chains to the root, a leaf with a foreign
trust domain still verifies, and so on).
"""

from __future__ import annotations

import datetime
import re
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL, crypto
from twisted.internet.task import Clock

from connect_native.identity import (
    AgentIdentity,
    InvalidIdentity,
    ServiceIdentity,
    SigningIdentity,
    identity_of_certificate,
    parse_spiffe_id,
)
from connect_native.testing import CertificateFactory, TestLeaf
from tests.test_devagent_ca import (
    ext,
    openssl_verify,
    pem_certs,
    real_cert,
    shape,
    verify,
)

CLIENT = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER = ExtendedKeyUsageOID.SERVER_AUTH


@pytest.fixture(scope="module")
def factory() -> CertificateFactory:
    # Module-wide: building a CA costs a key generation, and a factory is
    # never changed by the calls made on it.
    return CertificateFactory()


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def chain_of(leaf: TestLeaf) -> list[x509.Certificate]:
    return pem_certs(leaf.chain_pem)[1:]


def uris_of(cert: x509.Certificate) -> list[str]:
    try:
        san = ext(cert, x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


# --- the CA ---


def test_root_is_a_consul_shaped_ca(factory: CertificateFactory) -> None:
    root = factory.root_certificate
    assert re.fullmatch(r"[0-9a-f-]{36}\.consul", factory.trust_domain)
    assert shape(root) == shape(real_cert("root.pem"))
    assert uris_of(root) == [f"spiffe://{factory.trust_domain}"] == [factory.ca_uri]
    assert pem_certs(factory.root_pem) == [root]
    assert factory.intermediates_pem == ""


def test_trust_domain_can_be_chosen() -> None:
    factory = CertificateFactory("example.consul")
    assert factory.trust_domain == "example.consul"
    assert uris_of(factory.root_certificate) == ["spiffe://example.consul"]


def test_rsa_ca_signs_verifiable_leaves() -> None:
    factory = CertificateFactory(key_type="rsa")
    assert isinstance(factory.root_certificate.public_key(), rsa.RSAPublicKey)
    leaf = factory.leaf("web")
    verify(leaf.certificate, [], [factory.root_certificate], utcnow())


# --- the good leaf ---


def test_good_leaf_has_the_real_leafs_structure(factory: CertificateFactory) -> None:
    leaf = factory.leaf("web")
    assert shape(leaf.certificate, factory.root_certificate) == shape(
        real_cert("leaf-web.pem"), real_cert("root.pem")
    )


def test_good_leaf_names_the_service(factory: CertificateFactory) -> None:
    leaf = factory.leaf("web")
    expected = ServiceIdentity(factory.trust_domain, "default", "dc1", "web")
    assert identity_of_certificate(leaf.certificate) == expected
    assert leaf.uri == expected.uri == factory.service_uri("web")
    assert leaf.uris == (leaf.uri,)
    [cn] = leaf.certificate.subject
    assert cn.value == f"web.svc.default.{factory.trust_domain[:8]}.consul"


def test_good_leaf_verifies_for_client_and_server_auth(
    factory: CertificateFactory,
) -> None:
    leaf = factory.leaf("web")
    for purpose in (CLIENT, SERVER):
        verify(leaf.certificate, [], [factory.root_certificate], utcnow(), purpose)
    openssl_verify(leaf.certificate, [], [factory.root_certificate])


def test_good_leaf_is_valid_from_a_minute_ago_for_72_hours() -> None:
    clock = Clock()
    clock.advance(time.time())
    factory = CertificateFactory(clock=clock)
    clock.advance(7200)
    leaf = factory.leaf("web")
    start = datetime.datetime.fromtimestamp(int(clock.seconds()), datetime.timezone.utc)
    start -= datetime.timedelta(minutes=1)
    assert leaf.certificate.not_valid_before_utc == start
    assert leaf.certificate.not_valid_after_utc == start + datetime.timedelta(hours=72)


def test_leaf_key_matches_and_loads_into_openssl(factory: CertificateFactory) -> None:
    leaf = factory.leaf("web")
    assert leaf.key_pem.startswith("-----BEGIN EC PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(leaf.key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == leaf.certificate.public_key()
    assert leaf.private_key.public_key() == key.public_key()
    context = SSL.Context(SSL.TLS_METHOD)
    context.use_certificate(leaf.certificate)
    context.use_privatekey(leaf.private_key)
    context.check_privatekey()


def test_rsa_leaf(factory: CertificateFactory) -> None:
    leaf = factory.leaf("web", key_type="rsa")
    assert isinstance(leaf.certificate.public_key(), rsa.RSAPublicKey)
    assert leaf.key_pem.startswith("-----BEGIN RSA PRIVATE KEY-----\n")
    verify(leaf.certificate, [], [factory.root_certificate], utcnow())


def test_leaf_names_namespace_datacenter_and_partition(
    factory: CertificateFactory,
) -> None:
    leaf = factory.leaf("web", namespace="team", datacenter="east", partition="ap1")
    assert identity_of_certificate(leaf.certificate) == ServiceIdentity(
        factory.trust_domain, "team", "east", "web", partition="ap1"
    )
    assert "/ap/ap1/ns/team/dc/east/svc/web" in str(leaf.uri)
    default = factory.leaf("web", partition="default")
    assert "/ap/" not in str(default.uri)


def test_leaf_uri_is_escaped_as_consul_escapes_it(factory: CertificateFactory) -> None:
    assert str(factory.leaf("a b").uri).endswith("/svc/a%20b")
    assert str(factory.leaf("ünï").uri).endswith("/svc/%C3%BCn%C3%AF")


# --- the bad shapes ---


def test_self_signed_leaf_is_signed_by_its_own_key(factory: CertificateFactory) -> None:
    leaf = factory.self_signed("web")
    cert = leaf.certificate
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert leaf.uri == factory.service_uri("web")
    assert leaf.chain_pem == leaf.cert_pem
    with pytest.raises(verification.VerificationError):
        verify(cert, [], [factory.root_certificate], utcnow())
    with pytest.raises(crypto.X509StoreContextError):
        openssl_verify(cert, [], [factory.root_certificate])


def test_another_ca_shares_the_trust_domain_but_not_the_key(
    factory: CertificateFactory,
) -> None:
    other = factory.another_ca()
    assert other.trust_domain == factory.trust_domain
    assert other.root_certificate.public_key() != factory.root_certificate.public_key()
    leaf = other.leaf("web")
    assert leaf.uri == factory.service_uri("web")
    verify(leaf.certificate, [], [other.root_certificate], utcnow())
    with pytest.raises(verification.VerificationError):
        verify(leaf.certificate, [], [factory.root_certificate], utcnow())
    with pytest.raises(crypto.X509StoreContextError):
        openssl_verify(leaf.certificate, [], [factory.root_certificate])


def test_another_ca_with_a_foreign_trust_domain(factory: CertificateFactory) -> None:
    other = factory.another_ca("other.consul")
    assert other.trust_domain == "other.consul"
    assert str(other.leaf("web").uri).startswith("spiffe://other.consul/")


def test_expired_leaf_fails_only_for_its_dates(factory: CertificateFactory) -> None:
    leaf = factory.expired_leaf("web")
    cert = leaf.certificate
    assert cert.not_valid_after_utc < utcnow()
    with pytest.raises(verification.VerificationError, match="not valid at"):
        verify(cert, [], [factory.root_certificate], utcnow())
    with pytest.raises(crypto.X509StoreContextError, match="expired"):
        openssl_verify(cert, [], [factory.root_certificate])
    inside = cert.not_valid_before_utc + datetime.timedelta(hours=1)
    verify(cert, [], [factory.root_certificate], inside)
    assert identity_of_certificate(cert).service == "web"


def test_not_yet_valid_leaf_fails_only_for_its_dates(
    factory: CertificateFactory,
) -> None:
    cert = factory.not_yet_valid_leaf("web").certificate
    assert cert.not_valid_before_utc > utcnow()
    with pytest.raises(verification.VerificationError, match="not valid at"):
        verify(cert, [], [factory.root_certificate], utcnow())
    with pytest.raises(crypto.X509StoreContextError, match="not yet valid"):
        openssl_verify(cert, [], [factory.root_certificate])
    inside = cert.not_valid_before_utc + datetime.timedelta(hours=1)
    verify(cert, [], [factory.root_certificate], inside)


def test_explicit_validity(factory: CertificateFactory) -> None:
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    end = datetime.datetime(2040, 1, 1, tzinfo=datetime.timezone.utc)
    cert = factory.leaf("web", not_before=start, not_after=end).certificate
    assert (cert.not_valid_before_utc, cert.not_valid_after_utc) == (start, end)
    with pytest.raises(ValueError, match="not_after"):
        factory.leaf("web", not_before=end, not_after=start)


def test_leaf_without_uri_san_still_chains(factory: CertificateFactory) -> None:
    leaf = factory.leaf("web", uris=[])
    assert leaf.uri is None
    assert leaf.uris == ()
    with pytest.raises(x509.ExtensionNotFound):
        ext(leaf.certificate, x509.SubjectAlternativeName)
    openssl_verify(leaf.certificate, [], [factory.root_certificate])
    with pytest.raises(InvalidIdentity, match="no spiffe:// URI SAN"):
        identity_of_certificate(leaf.certificate)


def test_leaf_with_two_uri_sans_still_chains(factory: CertificateFactory) -> None:
    uris = [factory.service_uri("web"), factory.service_uri("db")]
    leaf = factory.leaf("web", uris=uris)
    assert uris_of(leaf.certificate) == uris
    assert leaf.uris == tuple(uris)
    assert leaf.uri == uris[0]
    verify(leaf.certificate, [], [factory.root_certificate], utcnow())
    with pytest.raises(InvalidIdentity, match="2 spiffe:// URI SANs"):
        identity_of_certificate(leaf.certificate)


def test_agent_leaf_carries_an_agent_uri(factory: CertificateFactory) -> None:
    leaf = factory.agent_leaf("x")
    assert leaf.uri == f"spiffe://{factory.trust_domain}/agent/client/dc/dc1/id/x"
    assert parse_spiffe_id(str(leaf.uri)) == AgentIdentity(
        factory.trust_domain, "dc1", "x"
    )
    [cn] = leaf.certificate.subject
    assert cn.value == f"x.agnt.{factory.trust_domain[:8]}.consul"
    verify(leaf.certificate, [], [factory.root_certificate], utcnow())


def test_leaf_with_the_ca_uri(factory: CertificateFactory) -> None:
    leaf = factory.leaf("web", uris=[factory.ca_uri])
    assert parse_spiffe_id(str(leaf.uri)) == SigningIdentity(factory.trust_domain)
    verify(leaf.certificate, [], [factory.root_certificate], utcnow())


def test_leaf_with_an_unknown_trust_domain_still_chains(
    factory: CertificateFactory,
) -> None:
    leaf = factory.leaf("web", trust_domain="unknown.consul")
    identity = identity_of_certificate(leaf.certificate)
    assert identity == ServiceIdentity("unknown.consul", "default", "dc1", "web")
    verify(leaf.certificate, [], [factory.root_certificate], utcnow())


@pytest.mark.parametrize(
    "path", ["/garbage", "/ns/default/dc/dc1/svc", "/ns//dc/dc1/svc/web", "/x/y/z"]
)
def test_leaf_with_a_garbage_spiffe_path(
    factory: CertificateFactory, path: str
) -> None:
    uri = f"spiffe://{factory.trust_domain}{path}"
    leaf = factory.leaf("web", uris=[uri])
    assert uris_of(leaf.certificate) == [uri]
    with pytest.raises(InvalidIdentity):
        parse_spiffe_id(uri)
    verify(leaf.certificate, [], [factory.root_certificate], utcnow())


def test_server_auth_only_leaf_fails_client_auth(factory: CertificateFactory) -> None:
    cert = factory.leaf("web", extended_key_usages=[SERVER]).certificate
    assert list(ext(cert, x509.ExtendedKeyUsage)) == [SERVER]
    verify(cert, [], [factory.root_certificate], utcnow(), SERVER)
    with pytest.raises(verification.VerificationError):
        verify(cert, [], [factory.root_certificate], utcnow(), CLIENT)


def test_client_auth_only_leaf_fails_server_auth(factory: CertificateFactory) -> None:
    cert = factory.leaf("web", extended_key_usages=[CLIENT]).certificate
    verify(cert, [], [factory.root_certificate], utcnow(), CLIENT)
    with pytest.raises(verification.VerificationError):
        verify(cert, [], [factory.root_certificate], utcnow(), SERVER)


def test_leaf_without_eku(factory: CertificateFactory) -> None:
    cert = factory.leaf("web", extended_key_usages=None).certificate
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.ExtendedKeyUsage)
    with pytest.raises(ValueError, match="extended_key_usages"):
        factory.leaf("web", extended_key_usages=[])


def test_ca_flagged_leaf(factory: CertificateFactory) -> None:
    cert = factory.leaf("web", ca=True).certificate
    assert ext(cert, x509.BasicConstraints).ca is True
    assert ext(cert, x509.KeyUsage).key_cert_sign is True
    assert uris_of(cert) == [factory.service_uri("web")]
    assert ext(factory.leaf("web").certificate, x509.BasicConstraints).ca is False


# --- intermediates and cross-signing ---


def test_intermediate_leaves_chain_through_it(factory: CertificateFactory) -> None:
    sub = factory.intermediate()
    assert sub.trust_domain == factory.trust_domain
    assert sub.root_pem == factory.root_pem
    leaf = sub.leaf("web")
    [intermediate] = chain_of(leaf)
    assert pem_certs(sub.intermediates_pem) == [intermediate]
    assert intermediate.issuer == factory.root_certificate.subject
    assert ext(intermediate, x509.BasicConstraints).ca
    assert uris_of(intermediate) == [factory.ca_uri]
    root = factory.root_certificate
    assert verify(leaf.certificate, [intermediate], [root], utcnow()) == [
        leaf.certificate,
        intermediate,
        root,
    ]
    openssl_verify(leaf.certificate, [intermediate], [root])
    with pytest.raises(verification.VerificationError):
        verify(leaf.certificate, [], [root], utcnow())


def test_nested_intermediates_are_all_in_the_chain(factory: CertificateFactory) -> None:
    leaf = factory.intermediate().intermediate().leaf("web")
    chain = chain_of(leaf)
    assert len(chain) == 2
    assert chain[1].issuer == factory.root_certificate.subject
    verify(leaf.certificate, chain, [factory.root_certificate], utcnow())


def test_cross_signed_root_links_another_ca_to_this_one(
    factory: CertificateFactory,
) -> None:
    new = factory.another_ca()
    [cross] = pem_certs(factory.cross_sign(new))
    old_root, new_root = factory.root_certificate, new.root_certificate
    assert cross.subject == new_root.subject
    assert cross.issuer == old_root.subject
    assert cross.public_key() == new_root.public_key()
    assert ext(cross, x509.SubjectKeyIdentifier) == ext(
        new_root, x509.SubjectKeyIdentifier
    )
    assert (
        ext(cross, x509.AuthorityKeyIdentifier).key_identifier
        == ext(old_root, x509.SubjectKeyIdentifier).digest
    )
    lifetime = cross.not_valid_after_utc - cross.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=7)
    # The real cross-signed certificate has the subject and 20-byte SKID of
    # the OpenSSL-made root it was given; the rest of its structure is Consul's.
    assert shape(cross) == shape(real_cert("rotation-cross-signed.pem")) | {
        "skid_length": 32,
        "subject": shape(new_root)["subject"],
    }
    leaf = new.leaf("web").certificate
    verify(leaf, [cross], [old_root], utcnow())
    openssl_verify(leaf, [cross], [old_root])
    with pytest.raises(verification.VerificationError):
        verify(leaf, [], [old_root], utcnow())


def test_factory_is_not_collected_as_a_test_class() -> None:
    assert TestLeaf.__test__ is False  # type: ignore[attr-defined]
