"""
Tests for connect_native.certs.Bundle: what it holds when built from a real
Consul 1.8.7 agent's answers, and every way Bundle.build refuses.

``now`` is an argument of Bundle.build, so these tests never depend on the
wall clock: real captures are checked at a moment inside their validity.
"""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from connect_native.certs import Bundle, InvalidBundle, RootPEMs
from connect_native.consul.records import (
    CARoots,
    LeafCert,
    decode_ca_roots,
    decode_leaf,
)
from connect_native.identity import ServiceIdentity
from connect_native.testing import CertificateFactory, TestLeaf
from tests.captures import body

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "real-1.8.7"
CONNECT_TESTDATA = FIXTURES / "pem" / "connect-testdata"

REAL_TRUST_DOMAIN = "35fbb6e4-f678-8abb-17a1-d9437ce1a4b3.consul"
# Inside the validity of every real 1.8.7 leaf used here (issued on
# 2026-11-25 between 23:54 and 23:56, valid 72 hours).
REAL_NOW = datetime.datetime(
    2026, 11, 26, 12, 0, tzinfo=datetime.timezone.utc
).timestamp()
# Inside the validity of Consul's connect/testdata (2018-03-23 to 2028-03-20).
TESTDATA_NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc).timestamp()


def real_roots(name: str) -> CARoots:
    return decode_ca_roots(body(name))


def real_leaf(name: str) -> LeafCert:
    return decode_leaf(body(name))


def root_pems(roots: CARoots) -> list[RootPEMs]:
    return [RootPEMs(r.root_cert_pem, r.intermediate_certs_pem) for r in roots.roots]


def from_agent(leaf: LeafCert, roots: CARoots, now: float = REAL_NOW) -> Bundle:
    return Bundle.build(
        leaf_cert_pem=leaf.cert_pem,
        private_key_pem=leaf.private_key_pem,
        roots=root_pems(roots),
        trust_domain=roots.trust_domain,
        now=now,
    )


def connect_testdata(name: str) -> str:
    return (CONNECT_TESTDATA / name).read_text()


# --- built from the real agent ----------------------------------------------


def test_bundle_from_the_real_agents_leaf_and_roots() -> None:
    leaf = real_leaf("leaf-web.http")
    roots = real_roots("ca-roots.http")
    bundle = from_agent(leaf, roots)

    assert bundle.identity == ServiceIdentity(
        REAL_TRUST_DOMAIN, "default", "dc1", "web"
    )
    assert bundle.identity.uri == leaf.service_uri
    assert bundle.trust_domains == frozenset({REAL_TRUST_DOMAIN})
    assert bundle.leaf == x509.load_pem_x509_certificate(leaf.cert_pem.encode())
    assert bundle.chain == ()
    assert bundle.root_certificates == (
        x509.load_pem_x509_certificate(roots.roots[0].root_cert_pem.encode()),
    )
    assert bundle.not_before == leaf.valid_after.timestamp()
    assert bundle.not_after == leaf.valid_before.timestamp()


def test_after_a_real_rotation_both_roots_and_the_cross_signed_chain() -> None:
    """
    After the real agent's CA rotation: two roots (the new one listing the
    cross-signed certificate), and a leaf whose CertPEM is the leaf followed
    by that cross-signed certificate.
    """
    roots = real_roots("rotation-roots-after.http")
    leaf = real_leaf("rotation-leaf-web-block.http")
    bundle = from_agent(leaf, roots)

    cross_signed = x509.load_pem_x509_certificate(
        (REAL / "rotation-cross-signed.pem").read_bytes()
    )
    assert len(bundle.roots) == 2
    assert bundle.chain == (cross_signed,)
    assert cross_signed in [i for r in bundle.roots for i in r.intermediates]
    assert bundle.identity.service == "web"


def test_a_new_leaf_verifies_against_the_old_root_via_the_cross_signed_one() -> None:
    roots = real_roots("rotation-roots-after.http")
    old_root = next(r for r in roots.roots if not r.active)
    leaf = real_leaf("rotation-leaf-web-block.http")
    bundle = Bundle.build(
        leaf_cert_pem=leaf.cert_pem,
        private_key_pem=leaf.private_key_pem,
        roots=[RootPEMs(old_root.root_cert_pem)],
        trust_domain=roots.trust_domain,
        now=REAL_NOW,
    )
    assert bundle.identity.service == "web"


def test_an_old_leaf_does_not_verify_against_the_new_root_alone() -> None:
    """
    Roots are replaced as a whole set: with only the new root, a leaf of the
    old one (from before the rotation) is refused.
    """
    roots = real_roots("rotation-roots-after.http")
    new_root = next(r for r in roots.roots if r.active)
    leaf = real_leaf("rotation-leaf-nb-before.http")
    with pytest.raises(
        InvalidBundle, match="does not verify against the current roots"
    ):
        Bundle.build(
            leaf_cert_pem=leaf.cert_pem,
            private_key_pem=leaf.private_key_pem,
            roots=[RootPEMs(new_root.root_cert_pem, new_root.intermediate_certs_pem)],
            trust_domain=roots.trust_domain,
            now=REAL_NOW,
        )


def test_consul_testdata_leaf_of_the_second_ca_verifies_via_the_cross_signed_root() -> (
    None
):
    bundle = Bundle.build(
        leaf_cert_pem=connect_testdata("ca2-svc-web.cert.pem")
        + connect_testdata("ca2-xc-by-ca1.cert.pem"),
        private_key_pem=connect_testdata("ca2-svc-web.key.pem"),
        roots=[RootPEMs(connect_testdata("ca1-ca-consul-internal.cert.pem"))],
        trust_domain="",
        now=TESTDATA_NOW,
    )
    assert bundle.identity.uri == (
        "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc01/svc/web"
    )
    with pytest.raises(InvalidBundle, match="does not verify"):
        Bundle.build(
            leaf_cert_pem=connect_testdata("ca2-svc-web.cert.pem"),
            private_key_pem=connect_testdata("ca2-svc-web.key.pem"),
            roots=[RootPEMs(connect_testdata("ca1-ca-consul-internal.cert.pem"))],
            trust_domain="",
            now=TESTDATA_NOW,
        )


def test_the_private_key_is_left_out_of_the_repr() -> None:
    leaf = real_leaf("leaf-web.http")
    bundle = from_agent(leaf, real_roots("ca-roots.http"))
    assert "PRIVATE KEY" not in repr(bundle)
    assert bundle.private_key_pem == leaf.private_key_pem


# --- refusals -----------------------------------------------------------------


@pytest.fixture
def factory() -> CertificateFactory:
    return CertificateFactory()


def build(
    factory: CertificateFactory,
    leaf: TestLeaf,
    *,
    now: float | None = None,
    **overrides: Any,
) -> Bundle:
    arguments: dict[str, Any] = {
        "leaf_cert_pem": leaf.chain_pem,
        "private_key_pem": leaf.key_pem,
        "roots": [RootPEMs(factory.root_pem)],
        "trust_domain": factory.trust_domain,
        "now": leaf.certificate.not_valid_before_utc.timestamp() + 3600
        if now is None
        else now,
    }
    arguments.update(overrides)
    return Bundle.build(**arguments)


def test_a_good_leaf_of_a_factory_builds(factory: CertificateFactory) -> None:
    bundle = build(factory, factory.leaf("web"))
    assert bundle.identity.uri == factory.service_uri("web")


def test_a_leaf_through_an_intermediate_builds(factory: CertificateFactory) -> None:
    secondary = factory.intermediate()
    leaf = secondary.leaf("web")
    bundle = build(factory, leaf)
    assert len(bundle.chain) == 1


def test_a_leaf_missing_its_intermediate_is_refused(
    factory: CertificateFactory,
) -> None:
    leaf = factory.intermediate().leaf("web")
    with pytest.raises(InvalidBundle, match="leaf_cert_pem does not verify"):
        build(factory, leaf, leaf_cert_pem=leaf.cert_pem)


def test_the_key_must_be_the_certificates(factory: CertificateFactory) -> None:
    with pytest.raises(InvalidBundle, match="private_key_pem is not the key"):
        build(factory, factory.leaf("web"), private_key_pem=factory.leaf("web").key_pem)


def test_an_expired_leaf_is_refused(factory: CertificateFactory) -> None:
    leaf = factory.leaf("web")
    after = leaf.certificate.not_valid_after_utc.timestamp()
    with pytest.raises(InvalidBundle, match="leaf_cert_pem: the leaf expired"):
        build(factory, leaf, now=after + 1)
    # One second before its end it is fine.
    assert build(factory, leaf, now=after - 1).not_after == after


def test_a_leaf_not_yet_valid_is_refused(factory: CertificateFactory) -> None:
    leaf = factory.leaf("web")
    before = leaf.certificate.not_valid_before_utc.timestamp()
    with pytest.raises(InvalidBundle, match="not valid yet"):
        build(factory, leaf, now=before - 1)
    assert build(factory, leaf, now=before).not_before == before


def test_a_leaf_of_another_ca_is_refused(factory: CertificateFactory) -> None:
    with pytest.raises(
        InvalidBundle, match="does not verify against the current roots"
    ):
        build(factory, factory.another_ca().leaf("web"))


def test_a_self_signed_leaf_is_refused(factory: CertificateFactory) -> None:
    with pytest.raises(InvalidBundle, match="does not verify"):
        build(factory, factory.self_signed("web"))


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("no URI", "no spiffe:// URI SAN"),
        ("two URIs", "2 spiffe:// URI SANs"),
        ("agent", "agent identity"),
        ("CA URI", "CA signing identity"),
        ("garbage", "not in a Consul format"),
        ("foreign trust domain", "which no current root carries"),
        ("no EKU", "lacks the TLS client authentication"),
        ("serverAuth only", "lacks the TLS client authentication"),
        ("clientAuth only", "lacks the TLS server authentication"),
        ("CA", "is a CA certificate"),
    ],
)
def test_a_leaf_without_one_trusted_service_identity_is_refused(
    factory: CertificateFactory, shape: str, message: str
) -> None:
    td = factory.trust_domain
    leaves = {
        "no URI": lambda: factory.leaf("web", uris=[]),
        "two URIs": lambda: factory.leaf(
            "web", uris=[factory.service_uri("web"), factory.service_uri("db")]
        ),
        "agent": lambda: factory.agent_leaf("node-1"),
        "CA URI": lambda: factory.leaf("web", uris=[factory.ca_uri]),
        "garbage": lambda: factory.leaf("web", uris=[f"spiffe://{td}/garbage"]),
        "foreign trust domain": lambda: factory.leaf(
            "web", trust_domain=f"{uuid.uuid4()}.consul"
        ),
        "no EKU": lambda: factory.leaf("web", extended_key_usages=None),
        "serverAuth only": lambda: factory.leaf(
            "web", extended_key_usages=[ExtendedKeyUsageOID.SERVER_AUTH]
        ),
        "clientAuth only": lambda: factory.leaf(
            "web", extended_key_usages=[ExtendedKeyUsageOID.CLIENT_AUTH]
        ),
        "CA": lambda: factory.leaf("web", ca=True),
    }
    with pytest.raises(InvalidBundle, match=message) as caught:
        build(factory, leaves[shape]())
    assert str(caught.value).startswith("leaf_cert_pem")


def test_no_roots_is_refused(factory: CertificateFactory) -> None:
    with pytest.raises(InvalidBundle, match="roots is empty"):
        build(factory, factory.leaf("web"), roots=[])


def test_the_trust_domain_field_alone_can_vouch_for_a_root_without_a_uri(
    factory: CertificateFactory,
) -> None:
    """
    Trust domains come from the roots' URI SANs and from the roots'
    TrustDomain field; with neither, no identity can be trusted.
    """
    leaf = factory.leaf("web")
    foreign = f"{uuid.uuid4()}.consul"
    other = factory.another_ca(trust_domain=foreign)
    roots = [RootPEMs(factory.root_pem), RootPEMs(other.root_pem)]
    bundle = build(factory, leaf, roots=roots, trust_domain="")
    assert bundle.trust_domains == {factory.trust_domain, foreign}
    assert bundle.carries_trust_domain(foreign.upper())
    assert not bundle.carries_trust_domain("nope.consul")

    bundle = build(factory, leaf, trust_domain=factory.trust_domain.upper())
    assert bundle.trust_domains == {factory.trust_domain}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"leaf_cert_pem": "not a certificate"}, "leaf_cert_pem holds no readable PEM"),
        ({"leaf_cert_pem": b"bytes"}, "leaf_cert_pem must be PEM text"),
        ({"private_key_pem": "nope"}, "private_key_pem is not an unencrypted PEM"),
        (
            {"roots": [RootPEMs("garbage")]},
            r"roots\[0\].root_cert_pem holds no readable",
        ),
        ({"trust_domain": "bad domain!"}, "trust_domain: "),
    ],
)
def test_bad_input_is_refused_naming_the_field(
    factory: CertificateFactory, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidBundle, match=message):
        build(factory, factory.leaf("web"), **overrides)


def test_a_root_entry_with_two_certificates_is_refused(
    factory: CertificateFactory,
) -> None:
    doubled = factory.root_pem + factory.another_ca().root_pem
    with pytest.raises(InvalidBundle, match=r"roots\[0\].root_cert_pem holds 2"):
        build(factory, factory.leaf("web"), roots=[RootPEMs(doubled)])


def test_a_bad_intermediate_of_a_root_is_refused(factory: CertificateFactory) -> None:
    with pytest.raises(
        InvalidBundle, match=r"roots\[0\].intermediate_pems\[0\] holds no readable"
    ):
        build(
            factory,
            factory.leaf("web"),
            roots=[RootPEMs(factory.root_pem, ["junk"])],
        )


def test_the_key_error_never_shows_key_material(factory: CertificateFactory) -> None:
    secret = factory.leaf("web").key_pem
    broken = secret.replace("\n", "\n!", 2)
    with pytest.raises(InvalidBundle) as caught:
        build(factory, factory.leaf("web"), private_key_pem=broken)
    body = "".join(secret.splitlines()[1:-1])
    assert body[:20] not in str(caught.value)
