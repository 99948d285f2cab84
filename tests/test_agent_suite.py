"""
One client-level suite, run against the development agent and against a real
Consul 1.8.7 agent: same requests through the same client code, same
assertions on status codes, headers, JSON field names and types, error
bodies and certificate structure.

Every test takes ``agent`` (or ``fresh_agent`` for destructive cases) and runs
twice: ``[dev]`` is :class:`connect_native.devagent.DevAgent` served over TCP
on the real reactor, ``[real]`` is ``consul agent -dev``.  What real Consul
picks at random (trust domain, IDs, indexes, times, serials) is compared by
shape and type, never by value.

Where the development agent still answers differently, the test carries
:func:`dev_differs`: an ``xfail(strict=True)`` on the ``[dev]`` run only, so
the suite stays green and the marker must go as soon as the agent is fixed.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer

from connect_native.consul.client import ConsulHTTPError
from connect_native.consul.records import ServiceRegistration, TTLCheck
from tests.agents import (
    AgentUnderTest,
    RawAnswer,
    colon_hex,
    load_capture,
    load_pems,
    reach_real_agent,
    serve_dev_agent,
    sha1_id,
    shape,
)
from tests.roots import new_key_pem, new_root

REAL = pytest.param("real", marks=pytest.mark.real_consul)
AGENTS = ["dev", REAL]


def dev_differs(reason: str, *, fixture: str = "agent_kind") -> pytest.MarkDecorator:
    """
    Run the test on both agents, expecting the development agent to fail it
    (strictly: once it passes, remove the marker).
    """
    dev = pytest.param(
        "dev",
        marks=pytest.mark.xfail(strict=True, reason=f"devagent differs: {reason}"),
    )
    return pytest.mark.parametrize(fixture, [dev, REAL], indirect=True)


@pytest.fixture(params=AGENTS)
def agent_kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=AGENTS)
def fresh_agent_kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def _real_address(request: pytest.FixtureRequest, agent_kind: str) -> str | None:
    # Only the [real] run starts (or shares) a Consul process.
    if agent_kind == "real":
        return request.getfixturevalue("real_consul").http_address  # type: ignore[no-any-return]
    return None


@pytest.fixture
def _fresh_real_address(
    request: pytest.FixtureRequest, fresh_agent_kind: str
) -> str | None:
    if fresh_agent_kind == "real":
        return request.getfixturevalue("fresh_real_consul").http_address  # type: ignore[no-any-return]
    return None


async def _agent_under_test(address: str | None) -> AgentUnderTest:
    return serve_dev_agent() if address is None else reach_real_agent(address)


@pytest_twisted.async_yield_fixture
async def agent(_real_address: str | None) -> AsyncIterator[AgentUnderTest]:
    """The session's real agent (use ``unique_name``) or a new dev agent."""
    under_test = await _agent_under_test(_real_address)
    yield under_test
    await under_test.close()


@pytest_twisted.async_yield_fixture
async def fresh_agent(
    _fresh_real_address: str | None,
) -> AsyncIterator[AgentUnderTest]:
    """An agent of this test's own: CA rotation, CA configuration."""
    under_test = await _agent_under_test(_fresh_real_address)
    yield under_test
    await under_test.close()


# -- helpers -------------------------------------------------------------------

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
COLON_HEX_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2})*")
RFC3339_S_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
LEAF_TTL = datetime.timedelta(hours=72)


def assert_error(answer: RawAnswer, status: int, body: str) -> None:
    """A plain-text error exactly as real Consul words it."""
    assert (answer.status, answer.text) == (status, body)
    assert answer.header("Content-Type") == TEXT


def assert_empty_write(answer: RawAnswer) -> None:
    """Agent writes: 200, no body, no content type."""
    assert answer.status == 200, answer.text
    assert answer.body == b""
    assert answer.header("Content-Type") is None


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def key_usages(cert: x509.Certificate) -> tuple[bool, set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.KeyUsage)
    ku = ext.value
    names = {
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    }
    return ext.critical, {n for n in names if getattr(ku, n)}


def extension_oids(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return {ext.oid for ext in cert.extensions}


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert all(isinstance(n, x509.UniformResourceIdentifier) for n in san.value)
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def skid(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value.digest


def akid(cert: x509.Certificate) -> bytes | None:
    return cert.extensions.get_extension_for_class(
        x509.AuthorityKeyIdentifier
    ).value.key_identifier


def only_cn(cert: x509.Certificate) -> str:
    """The subject is a single PrintableString CN, as Consul writes it."""
    (rdn,) = cert.subject.rdns
    (attr,) = rdn
    assert attr.oid == NameOID.COMMON_NAME
    assert attr._type == _ASN1Type.PrintableString
    return attr.value  # type: ignore[return-value]


def spki_sha256(cert: x509.Certificate) -> bytes:
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return hashlib.sha256(spki).digest()


def mangled_cn(service: str, trust_domain: str) -> str:
    """Consul's leaf CN: the name kept to [a-z0-9], cut so the CN fits 64."""
    suffix = f".svc.default.{trust_domain[:8]}.consul"
    label = re.sub("[^a-z0-9]", "", service.lower())
    return label[: 64 - len(suffix)] + suffix


async def elapsed(d: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = await d
    return result, time.monotonic() - start


async def register_ttl(
    agent: AgentUnderTest, name: str, *, port: int = 5001, address: str | None = None
) -> str:
    check_id = f"{name}-ttl"
    await agent.client.register_service(
        ServiceRegistration(
            name=name,
            port=port,
            address=address,
            checks=[TTLCheck(ttl=60, check_id=check_id)],
        )
    )
    return check_id


# -- agent self ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_agent_self_shape(agent: AgentUnderTest) -> None:
    answer = await agent.http.get("/v1/agent/self")
    assert answer.status == 200
    assert answer.header_names == {"content-type", "vary"}
    assert answer.header("Content-Type") == JSON
    body = answer.json()
    assert set(body) == {
        "Config",
        "Coord",
        "DebugConfig",
        "Member",
        "Meta",
        "Stats",
        "xDS",
    }
    assert shape(body["Config"]) == {
        "Datacenter": "str",
        "NodeName": "str",
        "NodeID": "str",
        "Server": "bool",
        "Version": "str",
        "Revision": "str",
    }
    me = await agent.client.agent_self()
    assert (me.datacenter, me.server, me.version) == ("dc1", True, "1.8.7")
    assert UUID_RE.fullmatch(me.node_id)


@pytest.mark.parametrize(
    ("method", "path", "content_type"),
    [
        ("GET", "/v1/connect/ca/configuration", JSON),
        ("PUT", "/v1/agent/check/pass/nosuch", TEXT),
    ],
)
@pytest_twisted.ensureDeferred
async def test_small_bodies_are_gzipped_when_asked(
    agent: AgentUnderTest, method: str, path: str, content_type: str
) -> None:
    plain = await agent.http.request(method, path)
    zipped = await agent.http.request(method, path, headers={"Accept-Encoding": "gzip"})
    assert plain.header("Content-Encoding") is None
    assert zipped.header("Content-Encoding") == "gzip"
    assert zipped.header("Content-Type") == content_type
    assert gzip.decompress(zipped.body) == plain.body


@pytest_twisted.ensureDeferred
async def test_large_bodies_are_gzipped_when_asked(agent: AgentUnderTest) -> None:
    path = "/v1/agent/connect/ca/roots"
    plain = await agent.http.get(path)
    zipped = await agent.http.request("GET", path, headers={"Accept-Encoding": "gzip"})
    assert plain.header("Content-Encoding") is None
    assert zipped.header("Content-Encoding") == "gzip"
    assert gzip.decompress(zipped.body) == plain.body


@pytest_twisted.ensureDeferred
async def test_empty_bodies_are_not_gzipped(
    agent: AgentUnderTest, unique_name: str
) -> None:
    answer = await agent.http.request(
        "PUT",
        f"/v1/agent/service/deregister/{unique_name}",
        headers={"Accept-Encoding": "gzip"},
    )
    assert_empty_write(answer)
    assert answer.header("Content-Encoding") is None


# -- CA roots --------------------------------------------------------------------

ROOT_SHAPE = {
    "ID": "str",
    "Name": "str",
    "SerialNumber": "int",
    "SigningKeyID": "str",
    "ExternalTrustDomain": "str",
    "NotBefore": "str",
    "NotAfter": "str",
    "RootCert": "str",
    "IntermediateCerts": "null",
    "Active": "bool",
    "PrivateKeyType": "str",
    "PrivateKeyBits": "int",
    "CreateIndex": "int",
    "ModifyIndex": "int",
}


@pytest_twisted.ensureDeferred
async def test_agent_roots_shape_and_headers(agent: AgentUnderTest) -> None:
    answer = await agent.http.get("/v1/agent/connect/ca/roots")
    assert answer.status == 200
    assert answer.header("Content-Type") == JSON
    assert {"x-cache", "x-consul-index", "x-consul-knownleader"} <= answer.header_names
    assert answer.header("X-Consul-Knownleader") == "false"
    assert answer.header("X-Consul-Lastcontact") == "0"
    body = answer.json()
    assert shape(body) == {
        "ActiveRootID": "str",
        "TrustDomain": "str",
        "Roots": ["list", ROOT_SHAPE],
    }
    (root,) = body["Roots"]
    assert root["Active"] is True
    assert root["ID"] == body["ActiveRootID"]
    assert root["Name"] == "Consul CA Root Cert"
    assert body["TrustDomain"] == root["ExternalTrustDomain"] + ".consul"
    assert UUID_RE.fullmatch(root["ExternalTrustDomain"])
    assert (root["PrivateKeyType"], root["PrivateKeyBits"]) == ("ec", 256)
    assert RFC3339_S_RE.fullmatch(root["NotBefore"])
    assert int(answer.header("X-Consul-Index") or "") >= root["ModifyIndex"]


@pytest_twisted.ensureDeferred
async def test_agent_roots_cache_hit_has_age(agent: AgentUnderTest) -> None:
    await agent.http.get("/v1/agent/connect/ca/roots")
    again = await agent.http.get("/v1/agent/connect/ca/roots")
    assert again.header("X-Cache") == "HIT"
    assert again.header("Age") is not None
    assert int(again.header("Age") or "") >= 0


@pytest_twisted.ensureDeferred
async def test_server_roots_same_body_without_cache_headers(
    agent: AgentUnderTest,
) -> None:
    cached = await agent.http.get("/v1/agent/connect/ca/roots")
    server = await agent.http.get("/v1/connect/ca/roots")
    assert server.status == 200
    assert server.json() == cached.json()
    assert "x-cache" not in server.header_names
    assert {"x-consul-index", "x-consul-knownleader", "x-consul-lastcontact"} <= (
        server.header_names
    )


@pytest_twisted.ensureDeferred
async def test_root_ids_are_the_certificate_fingerprint_and_key_id(
    agent: AgentUnderTest,
) -> None:
    roots = (await agent.client.agent_ca_roots()).value
    (root,) = roots.roots
    (cert,) = load_pems(root.root_cert_pem)
    assert root.id == sha1_id(cert)
    assert len(root.id.split(":")) == 20
    assert root.signing_key_id == colon_hex(skid(cert))
    assert root.serial_number == cert.serial_number & (2**64 - 1)
    assert root.not_before == cert.not_valid_before_utc
    assert root.not_after == cert.not_valid_after_utc


@pytest_twisted.ensureDeferred
async def test_root_certificate_structure(agent: AgentUnderTest) -> None:
    roots = (await agent.client.agent_ca_roots()).value
    (cert,) = load_pems(roots.roots[0].root_cert_pem)
    td = roots.trust_domain
    assert cert.version == x509.Version.v3
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert cert.issuer == cert.subject
    assert re.fullmatch(
        rf"pri-[a-z0-9]{{7,8}}\.consul\.ca\.{td[:8]}\.consul", only_cn(cert)
    )
    assert extension_oids(cert) == {
        x509.KeyUsage.oid,
        x509.BasicConstraints.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.AuthorityKeyIdentifier.oid,
        x509.SubjectAlternativeName.oid,
    }
    assert key_usages(cert) == (
        True,
        {"digital_signature", "key_cert_sign", "crl_sign"},
    )
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert (bc.critical, bc.value.ca, bc.value.path_length) == (True, True, None)
    assert skid(cert) == akid(cert) == spki_sha256(cert)
    assert uri_sans(cert) == [f"spiffe://{td}"]
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert validity in (
        datetime.timedelta(days=3652),
        datetime.timedelta(days=3653),
    )


# -- leaf certificates ---------------------------------------------------------------

LEAF_SHAPE = {
    "SerialNumber": "str",
    "CertPEM": "str",
    "PrivateKeyPEM": "str",
    "Service": "str",
    "ServiceURI": "str",
    "ValidAfter": "str",
    "ValidBefore": "str",
    "CreateIndex": "int",
    "ModifyIndex": "int",
}


@pytest_twisted.ensureDeferred
async def test_leaf_shape_headers_and_cache(
    agent: AgentUnderTest, unique_name: str
) -> None:
    answer = await agent.http.get(f"/v1/agent/connect/ca/leaf/{unique_name}")
    assert answer.status == 200
    assert answer.header_names == {"content-type", "vary", "x-cache", "x-consul-index"}
    assert answer.header("X-Cache") == "MISS"
    body = answer.json()
    assert shape(body) == LEAF_SHAPE
    assert int(answer.header("X-Consul-Index") or "") == body["ModifyIndex"]
    roots = (await agent.client.agent_ca_roots()).value
    assert body["Service"] == unique_name
    assert body["ServiceURI"] == (
        f"spiffe://{roots.trust_domain}/ns/default/dc/dc1/svc/{unique_name}"
    )
    again = await agent.http.get(f"/v1/agent/connect/ca/leaf/{unique_name}")
    assert again.header("X-Cache") == "HIT"
    assert again.header("Age") is not None
    assert again.json() == body


@pytest_twisted.ensureDeferred
async def test_leaf_serial_validity_and_key(
    agent: AgentUnderTest, unique_name: str
) -> None:
    before = datetime.datetime.now(datetime.timezone.utc)
    leaf = (await agent.client.leaf(unique_name)).value
    after = datetime.datetime.now(datetime.timezone.utc)
    cert, *rest = load_pems(leaf.cert_pem)
    assert rest == []
    # A hex string (colon hex beyond one byte), the certificate's serial.
    assert COLON_HEX_RE.fullmatch(leaf.serial_number)
    assert int(leaf.serial_number.replace(":", ""), 16) == cert.serial_number
    # Backdated by one minute; the TTL counts from there.
    minute = datetime.timedelta(minutes=1)
    slack = datetime.timedelta(seconds=2)
    assert before - minute - slack <= leaf.valid_after <= after - minute + slack
    assert leaf.valid_before - leaf.valid_after == LEAF_TTL
    assert cert.not_valid_before_utc == leaf.valid_after
    assert cert.not_valid_after_utc == leaf.valid_before
    assert leaf.private_key_pem.startswith("-----BEGIN EC PRIVATE KEY-----\n")
    key = serialization.load_pem_private_key(leaf.private_key_pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()


@pytest_twisted.ensureDeferred
async def test_leaf_certificate_structure(
    agent: AgentUnderTest, unique_name: str
) -> None:
    roots = (await agent.client.agent_ca_roots()).value
    (root,) = load_pems(roots.roots[0].root_cert_pem)
    leaf = (await agent.client.leaf(unique_name)).value
    (cert,) = load_pems(leaf.cert_pem)
    assert cert.version == x509.Version.v3
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    assert cert.issuer == root.subject
    cert.verify_directly_issued_by(root)
    assert only_cn(cert) == mangled_cn(unique_name, roots.trust_domain)
    assert extension_oids(cert) == {
        x509.KeyUsage.oid,
        x509.ExtendedKeyUsage.oid,
        x509.BasicConstraints.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.AuthorityKeyIdentifier.oid,
        x509.SubjectAlternativeName.oid,
    }
    assert key_usages(cert) == (
        True,
        {"digital_signature", "key_encipherment", "data_encipherment", "key_agreement"},
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert not eku.critical
    assert list(eku.value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.SERVER_AUTH,
    ]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert (bc.critical, bc.value.ca) == (True, False)
    assert skid(cert) == spki_sha256(cert)
    assert akid(cert) == skid(root)
    # Exactly one name, the URI: no DNS or IP names.
    assert uri_sans(cert) == [leaf.service_uri]


@pytest.mark.parametrize(
    "form",
    [
        "Upper{}",
        "dots.{}.x",
        "under_{}",
        "space {}",
        "ünï{}",
        "long-{}-" + "abcdefghij" * 4,
    ],
)
@pytest_twisted.ensureDeferred
async def test_leaf_name_mangling(
    agent: AgentUnderTest, unique_name: str, form: str
) -> None:
    name = form.format(unique_name)
    roots = (await agent.client.agent_ca_roots()).value
    answer = await agent.http.get(f"/v1/agent/connect/ca/leaf/{quote(name, safe='')}")
    assert answer.status == 200, answer.text
    body = answer.json()
    (cert,) = load_pems(body["CertPEM"])
    assert body["Service"] == name
    uri = f"spiffe://{roots.trust_domain}/ns/default/dc/dc1/svc/{quote(name, safe='')}"
    assert body["ServiceURI"] == uri
    assert uri_sans(cert) == [uri]
    assert only_cn(cert) == mangled_cn(name, roots.trust_domain)
    assert len(only_cn(cert)) <= 64


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "a%2Fb",
            "SPIFFE ID is not in the expected format: "
            "spiffe://{td}/ns/default/dc/dc1/svc/a/b",
        ),
        ("", "URI must be either service or agent"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_leaf_bad_names(agent: AgentUnderTest, path: str, message: str) -> None:
    td = (await agent.client.agent_ca_roots()).value.trust_domain
    answer = await agent.http.get(f"/v1/agent/connect/ca/leaf/{path}")
    assert_error(answer, 500, message.format(td=td))


# -- blocking queries ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_blocking_at_the_current_index_returns_the_same_after_wait(
    agent: AgentUnderTest, unique_name: str
) -> None:
    roots = await agent.client.agent_ca_roots()
    leaf = await agent.client.leaf(unique_name)
    assert roots.index is not None
    assert leaf.index is not None
    start = time.monotonic()
    roots_again, leaf_again = await defer.gatherResults(
        [
            agent.client.agent_ca_roots(index=roots.index, wait=1),
            agent.client.leaf(unique_name, index=leaf.index, wait=1),
        ]
    )
    assert time.monotonic() - start >= 0.9
    assert (roots_again.index, roots_again.value) == (roots.index, roots.value)
    assert (leaf_again.index, leaf_again.value) == (leaf.index, leaf.value)
    # A blocking call that timed out without a change is a cache miss.
    assert roots_again.cache_hit is False
    assert leaf_again.cache_hit is False


@pytest_twisted.ensureDeferred
async def test_blocking_at_a_higher_index_returns_the_lower_current_one(
    agent: AgentUnderTest, unique_name: str
) -> None:
    roots = await agent.client.agent_ca_roots()
    leaf = await agent.client.leaf(unique_name)
    assert roots.index is not None
    assert leaf.index is not None
    roots_again, leaf_again = await defer.gatherResults(
        [
            agent.client.agent_ca_roots(index=roots.index + 1000, wait=1),
            agent.client.leaf(unique_name, index=leaf.index + 1000, wait=1),
        ]
    )
    assert roots_again.index == roots.index
    assert leaf_again.index == leaf.index
    assert leaf_again.value == leaf.value


@pytest.mark.parametrize("query", ["index=&wait=5s", "index={index}&wait=1ms"])
@pytest_twisted.ensureDeferred
async def test_empty_index_or_tiny_wait_answers_at_once(
    agent: AgentUnderTest, query: str
) -> None:
    first = await agent.client.agent_ca_roots()
    answer, took = await elapsed(
        agent.http.get(f"/v1/agent/connect/ca/roots?{query.format(index=first.index)}")
    )
    assert took < 1
    assert answer.status == 200
    assert int(answer.header("X-Consul-Index") or "") == first.index


BAD_BLOCKING_PARAMS = [
    ("wait=bad", "Invalid wait time"),
    ("wait=1", "Invalid wait time"),
    ("index=abc", "Invalid index"),
    ("index=-1", "Invalid index"),
    ("index=1.5", "Invalid index"),
    ("index=%2B5", "Invalid index"),
    ("index=99999999999999999999", "Invalid index"),
]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/agent/connect/ca/roots",
        "/v1/agent/connect/ca/leaf/{}",
        "/v1/health/connect/{}",
    ],
)
@pytest.mark.parametrize(("query", "message"), BAD_BLOCKING_PARAMS)
@pytest_twisted.ensureDeferred
async def test_bad_blocking_parameters(
    agent: AgentUnderTest, unique_name: str, path: str, query: str, message: str
) -> None:
    answer = await agent.http.get(f"{path.format(unique_name)}?{query}")
    assert_error(answer, 400, message)


# -- authorize ---------------------------------------------------------------------


def client_uri(trust_domain: str, service: str) -> str:
    return f"spiffe://{trust_domain}/ns/default/dc/dc1/svc/{service}"


@pytest_twisted.ensureDeferred
async def test_authorize_allowed_by_default(
    agent: AgentUnderTest, unique_name: str
) -> None:
    td = (await agent.client.agent_ca_roots()).value.trust_domain
    body = {
        "Target": unique_name,
        "ClientCertURI": client_uri(td, "someone"),
        "ClientCertSerial": "01",
    }
    first = await agent.http.post("/v1/agent/connect/authorize", body)
    assert first.status == 200
    assert first.header_names == {"content-type", "vary", "x-cache"}
    assert first.header("X-Cache") == "MISS"
    assert first.json() == {
        "Authorized": True,
        "Reason": "ACLs disabled, access is allowed by default",
    }
    second = await agent.http.post("/v1/agent/connect/authorize", body)
    assert second.header("X-Cache") == "HIT"
    assert second.header("Age") == "0"


@pytest_twisted.ensureDeferred
async def test_authorize_ignores_trust_domain_and_datacenter(
    agent: AgentUnderTest, unique_name: str
) -> None:
    foreign = (
        "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc9/svc/x"
    )
    result = await agent.client.authorize(unique_name, foreign, "")
    assert result.authorized


@pytest_twisted.ensureDeferred
async def test_authorize_denied_by_an_intention_names_it(
    agent: AgentUnderTest, unique_name: str
) -> None:
    source = f"{unique_name}-src"
    td = (await agent.client.agent_ca_roots()).value.trust_domain
    intention_id = await agent.client.create_intention(source, unique_name, "deny")
    try:
        result = await agent.client.authorize(unique_name, client_uri(td, source), "01")
        assert not result.authorized
        assert result.reason == (
            f"Matched intention: DENY default/{source} => default/{unique_name} "
            f"(ID: {intention_id}, Precedence: 9)"
        )
    finally:
        await agent.client.delete_intention(intention_id)


@pytest_twisted.ensureDeferred
async def test_authorize_allowed_by_a_wildcard_source_intention(
    agent: AgentUnderTest, unique_name: str
) -> None:
    td = (await agent.client.agent_ca_roots()).value.trust_domain
    intention_id = await agent.client.create_intention("*", unique_name, "allow")
    try:
        result = await agent.client.authorize(unique_name, client_uri(td, "x"), "")
        assert result.authorized
        assert result.reason == (
            f"Matched intention: ALLOW default/* => default/{unique_name} "
            f"(ID: {intention_id}, Precedence: 8)"
        )
    finally:
        await agent.client.delete_intention(intention_id)


AUTHORIZE_ERRORS = [
    (
        {"Target": "web", "ClientCertURI": "http://x/y"},
        "not a valid Connect identifier",
    ),
    (
        {"Target": "web", "ClientCertURI": "spiffe://bad"},
        "not a valid Connect identifier",
    ),
    ({"Target": "web", "ClientCertURI": ""}, "not a valid Connect identifier"),
    ({"Target": "web"}, "not a valid Connect identifier"),
    (
        {"Target": "web", "ClientCertURI": "spiffe://{td}/agent/client/dc/dc1/id/abc"},
        "not a valid Service identifier",
    ),
    ({"ClientCertURI": "spiffe://{td}/ns/default/dc/dc1/svc/api"}, "target"),
    (
        {"Target": "", "ClientCertURI": "spiffe://{td}/ns/default/dc/dc1/svc/api"},
        "target",
    ),
]


@pytest.mark.parametrize(("body", "what"), AUTHORIZE_ERRORS)
@pytest_twisted.ensureDeferred
async def test_authorize_validation(
    agent: AgentUnderTest, body: dict[str, str], what: str
) -> None:
    td = (await agent.client.agent_ca_roots()).value.trust_domain
    body = {k: v.format(td=td) for k, v in body.items()}
    answer = await agent.http.post("/v1/agent/connect/authorize", body)
    expected = (
        "Bad request: Target service must be specified"
        if what == "target"
        else f"Bad request: ClientCertURI {what}"
    )
    assert_error(answer, 400, expected)


@pytest.mark.parametrize(
    ("raw", "decode_error"),
    [
        ("not json", "invalid character 'o' in literal null (expecting 'u')"),
        ("", "EOF"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_authorize_undecodable_body(
    agent: AgentUnderTest, raw: str, decode_error: str
) -> None:
    answer = await agent.http.post("/v1/agent/connect/authorize", raw)
    assert_error(answer, 400, f"Bad request: Request decode failed: {decode_error}")


@pytest_twisted.ensureDeferred
async def test_authorize_wrong_method(agent: AgentUnderTest) -> None:
    answer = await agent.http.get("/v1/agent/connect/authorize")
    assert_error(answer, 405, "method GET not allowed")
    assert answer.header("Allow") == "OPTIONS,POST"


@pytest_twisted.ensureDeferred
async def test_authorize_accepts_lower_case_keys(
    agent: AgentUnderTest, unique_name: str
) -> None:
    td = (await agent.client.agent_ca_roots()).value.trust_domain
    answer = await agent.http.post(
        "/v1/agent/connect/authorize",
        {"target": unique_name, "clientcerturi": client_uri(td, "api")},
    )
    assert answer.status == 200
    assert answer.json()["Authorized"] is True


# -- intentions ----------------------------------------------------------------------

INTENTION_SHAPE = {
    "ID": "str",
    "Description": "str",
    "SourceNS": "str",
    "SourceName": "str",
    "DestinationNS": "str",
    "DestinationName": "str",
    "SourceType": "str",
    "Action": "str",
    "DefaultAddr": "str",
    "DefaultPort": "int",
    "Meta": {},
    "Precedence": "int",
    "CreatedAt": "str",
    "UpdatedAt": "str",
    "Hash": "str",
    "CreateIndex": "int",
    "ModifyIndex": "int",
}


@pytest_twisted.ensureDeferred
async def test_intention_create_get_list(
    agent: AgentUnderTest, unique_name: str
) -> None:
    source = f"{unique_name}-src"
    created = await agent.http.post(
        "/v1/connect/intentions",
        {"SourceName": source, "DestinationName": unique_name, "Action": "deny"},
    )
    assert created.status == 200
    assert created.header("Content-Type") == JSON
    assert shape(created.json()) == {"ID": "str"}
    intention_id = created.json()["ID"]
    assert UUID_RE.fullmatch(intention_id)
    try:
        got = await agent.http.get(f"/v1/connect/intentions/{intention_id}")
        assert got.status == 200
        assert "x-consul-index" not in got.header_names
        body = got.json()
        assert shape(body) == INTENTION_SHAPE
        assert body["ID"] == intention_id
        assert (body["SourceNS"], body["DestinationNS"]) == ("default", "default")
        assert (body["SourceType"], body["Action"]) == ("consul", "deny")
        assert (body["Precedence"], body["Meta"]) == (9, {})
        listed = await agent.http.get("/v1/connect/intentions")
        assert listed.status == 200
        assert {
            "x-consul-index",
            "x-consul-knownleader",
            "x-consul-lastcontact",
        } <= listed.header_names
        (mine,) = [i for i in listed.json() if i["ID"] == intention_id]
        assert mine == body
    finally:
        await agent.client.delete_intention(intention_id)


@pytest_twisted.ensureDeferred
async def test_new_intention_created_and_updated_at_the_same_time(
    agent: AgentUnderTest, unique_name: str
) -> None:
    intention_id = await agent.client.create_intention("a", unique_name, "deny")
    try:
        body = (await agent.http.get(f"/v1/connect/intentions/{intention_id}")).json()
        assert body["CreatedAt"] == body["UpdatedAt"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", body["CreatedAt"])
    finally:
        await agent.client.delete_intention(intention_id)


@pytest_twisted.ensureDeferred
async def test_intention_update_keeps_creation(
    agent: AgentUnderTest, unique_name: str
) -> None:
    source = f"{unique_name}-src"
    intention_id = await agent.client.create_intention(source, unique_name, "deny")
    try:
        before = await agent.client.get_intention(intention_id)
        answer = await agent.http.put(
            f"/v1/connect/intentions/{intention_id}",
            {
                "ID": str(uuid.uuid4()),
                "SourceName": source,
                "DestinationName": unique_name,
                "Action": "allow",
                "Description": "now allowed",
            },
        )
        assert answer.status == 200
        assert answer.json() == {"ID": intention_id}
        after = await agent.client.get_intention(intention_id)
        assert (after.action, after.description) == ("allow", "now allowed")
        assert (after.created_at, after.create_index) == (
            before.created_at,
            before.create_index,
        )
        assert after.updated_at is not None
        assert before.updated_at is not None
        assert after.updated_at > before.updated_at
        assert after.modify_index > before.modify_index
    finally:
        await agent.client.delete_intention(intention_id)


@pytest_twisted.ensureDeferred
async def test_intention_delete_and_missing(
    agent: AgentUnderTest, unique_name: str
) -> None:
    intention_id = await agent.client.create_intention("a", unique_name, "deny")
    path = f"/v1/connect/intentions/{intention_id}"
    deleted = await agent.http.request("DELETE", path)
    assert deleted.status == 200
    assert deleted.json() is True
    again = await agent.http.request("DELETE", path)
    assert_error(again, 500, f"Cannot delete non-existent intention: '{intention_id}'")
    assert_error(await agent.http.get(path), 404, "Intention not found")
    assert_error(
        await agent.http.get("/v1/connect/intentions/not-a-uuid"),
        400,
        "Bad request: failed intention lookup: index error: UUID must be 36 characters",
    )


@pytest_twisted.ensureDeferred
async def test_intention_duplicate(agent: AgentUnderTest, unique_name: str) -> None:
    source = f"{unique_name}-src"
    intention_id = await agent.client.create_intention(source, unique_name, "deny")
    try:
        answer = await agent.http.post(
            "/v1/connect/intentions",
            {"SourceName": source, "DestinationName": unique_name, "Action": "allow"},
        )
        assert_error(
            answer,
            500,
            f"duplicate intention found: DENY default/{source} => "
            f"default/{unique_name} (ID: {intention_id}, Precedence: 9)",
        )
    finally:
        await agent.client.delete_intention(intention_id)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"SourceName": "x", "DestinationName": "{}", "Action": "maybe"},
            "Action must be set to 'allow' or 'deny'",
        ),
        (
            {"SourceName": "", "DestinationName": "{}", "Action": "allow"},
            "SourceName must be set",
        ),
        (
            {"SourceName": "ap*", "DestinationName": "{}", "Action": "allow"},
            "SourceName: wildcard character '*' cannot be used with partial values",
        ),
        (
            {
                "SourceName": "q",
                "DestinationName": "{}",
                "Action": "allow",
                "SourceType": "foo",
            },
            "SourceType must be set to 'consul'",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_intention_validation(
    agent: AgentUnderTest, unique_name: str, body: dict[str, str], message: str
) -> None:
    body = {k: v.format(unique_name) for k, v in body.items()}
    answer = await agent.http.post("/v1/connect/intentions", body)
    assert_error(answer, 500, f"1 error occurred:\n\t* {message}\n\n")


@pytest_twisted.ensureDeferred
async def test_intention_create_bad_json_and_wrong_method(
    agent: AgentUnderTest,
) -> None:
    bad = await agent.http.post("/v1/connect/intentions", "xx")
    assert_error(
        bad,
        500,
        "Failed to decode request body: invalid character 'x' looking for "
        "beginning of value",
    )
    put = await agent.http.put("/v1/connect/intentions", {"SourceName": "q"})
    assert_error(put, 405, "method PUT not allowed")
    assert put.header("Allow") == "OPTIONS,GET,POST"


@pytest_twisted.ensureDeferred
async def test_intentions_match_and_check(
    agent: AgentUnderTest, unique_name: str
) -> None:
    source = f"{unique_name}-src"
    deny = await agent.client.create_intention(source, unique_name, "deny")
    allow = await agent.client.create_intention("*", unique_name, "allow")
    try:
        answer = await agent.http.get(
            f"/v1/connect/intentions/match?by=destination&name={unique_name}"
        )
        assert answer.status == 200
        assert "x-consul-index" not in answer.header_names
        body = answer.json()
        assert list(body) == [unique_name]
        mine = [i for i in body[unique_name] if i["DestinationName"] == unique_name]
        assert [(i["ID"], i["Precedence"]) for i in mine] == [(deny, 9), (allow, 8)]
        assert shape(mine[0]) == INTENTION_SHAPE
        assert not await agent.client.intentions_check(source, unique_name)
        assert await agent.client.intentions_check("other", unique_name)
        check = await agent.http.get(
            f"/v1/connect/intentions/check?source={source}&destination={unique_name}"
        )
        assert check.json() == {"Allowed": False}
    finally:
        await agent.client.delete_intention(deny)
        await agent.client.delete_intention(allow)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("match?by=destination", "required query parameter 'name' not set"),
        ("match?name=web", "required query parameter 'by' not set"),
        (
            "match?by=foo&name=web",
            "'by' parameter must be one of 'source' or 'destination'",
        ),
        ("check?source=api", "required query parameter 'destination' not set"),
        ("check?destination=web", "required query parameter 'source' not set"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_intentions_query_errors(
    agent: AgentUnderTest, query: str, message: str
) -> None:
    answer = await agent.http.get(f"/v1/connect/intentions/{query}")
    assert_error(answer, 500, message)


@pytest_twisted.ensureDeferred
async def test_intentions_match_blocking_woken_by_any_intention_write(
    agent: AgentUnderTest, unique_name: str
) -> None:
    listed = await agent.client.intentions_list()
    assert listed.index is not None
    blocked = agent.client.intentions_match(
        "destination", unique_name, index=listed.index, wait=5
    )
    unrelated = await agent.client.create_intention(
        f"{unique_name}-a", f"{unique_name}-b", "deny"
    )
    try:
        woken, took = await elapsed(blocked)
        assert took < 4
        assert woken.index is None
        assert dict(woken.value) == {unique_name: ()}
    finally:
        await agent.client.delete_intention(unrelated)


# -- registration and checks -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_register_and_ttl_check_lifecycle(
    agent: AgentUnderTest, unique_name: str
) -> None:
    check_id = f"{unique_name}-ttl"
    answer = await agent.http.put(
        "/v1/agent/service/register",
        {
            "Name": unique_name,
            "Port": 5001,
            "Connect": {"Native": True},
            "Check": {"CheckID": check_id, "TTL": "60s"},
        },
    )
    assert_empty_write(answer)
    try:

        async def check() -> dict[str, Any]:
            checks = (await agent.http.get("/v1/agent/checks")).json()
            return checks[check_id]  # type: ignore[no-any-return]

        first = await check()
        assert first["Status"] == "critical"
        assert (first["Type"], first["ServiceName"]) == ("ttl", unique_name)
        assert first["Name"] == f"Service '{unique_name}' check"
        steps = [
            ("pass", "", "passing", ""),
            ("warn", "?note=slow", "warning", "slow"),
            ("fail", "", "critical", ""),
        ]
        for verb, query, status, output in steps:
            mark = await agent.http.put(f"/v1/agent/check/{verb}/{check_id}{query}")
            assert_empty_write(mark)
            now = await check()
            assert (now["Status"], now["Output"]) == (status, output)
        update = await agent.http.put(
            f"/v1/agent/check/update/{check_id}",
            {"Status": "passing", "Output": "fine"},
        )
        assert_empty_write(update)
        now = await check()
        assert (now["Status"], now["Output"]) == ("passing", "fine")
    finally:
        await agent.client.deregister_service(unique_name)


@pytest_twisted.ensureDeferred
async def test_agent_services_and_checks_shapes(
    agent: AgentUnderTest, unique_name: str
) -> None:
    check_id = await register_ttl(agent, unique_name)
    try:
        services = await agent.http.get("/v1/agent/services")
        checks = await agent.http.get("/v1/agent/checks")
        for answer in (services, checks):
            assert answer.status == 200
            assert answer.header_names == {"content-type", "vary"}
        service = services.json()[unique_name]
        captured = load_capture("agent-services-after-deregister.http").json()
        assert shape(service) == shape(next(iter(captured.values())))
        check = checks.json()[check_id]
        captured_check = load_capture("agent-checks-after-register.http").json()
        assert shape(check) == shape(captured_check["web-ttl"])
    finally:
        await agent.client.deregister_service(unique_name)


@pytest_twisted.ensureDeferred
async def test_check_errors(agent: AgentUnderTest, unique_name: str) -> None:
    check_id = await register_ttl(agent, unique_name)
    try:
        bad = await agent.http.put(
            f"/v1/agent/check/update/{check_id}", {"Status": "bogus"}
        )
        assert_error(bad, 400, "Invalid check status: 'bogus'")
        unknown = await agent.http.put("/v1/agent/check/pass/nosuch")
        assert_error(unknown, 500, 'CheckID "nosuch" does not have associated TTL')
        with pytest.raises(ConsulHTTPError) as e:
            await agent.client.check_pass("nosuch")
        assert e.value.status == 500
        wrong = await agent.http.get(f"/v1/agent/check/pass/{check_id}")
        assert wrong.status == 405
    finally:
        await agent.client.deregister_service(unique_name)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '{"Name":"x","Unknown":1}',
            'Request decode failed: json: unknown field "Unknown"',
        ),
        (
            '{"Name":"x","Check":{"TTL":"bogus"}}',
            'Request decode failed: time: invalid duration "bogus"',
        ),
        ('{"Port":1}', "Missing service name"),
        ('{"Name":"","Port":1}', "Missing service name"),
        ("", "Request decode failed: EOF"),
        (
            "not json",
            "Request decode failed: invalid character 'o' in literal null "
            "(expecting 'u')",
        ),
        (
            '{"Name":"x","Port":"abc"}',
            "Request decode failed: json: cannot unmarshal string into Go struct "
            "field .Port of type int",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_register_errors(agent: AgentUnderTest, body: str, message: str) -> None:
    answer = await agent.http.put("/v1/agent/service/register", body)
    assert_error(answer, 400, message)


@pytest_twisted.ensureDeferred
async def test_register_accepts_lower_case_keys(
    agent: AgentUnderTest, unique_name: str
) -> None:
    answer = await agent.http.put(
        "/v1/agent/service/register",
        f'{{"name":"{unique_name}","port":1,"connect":{{"native":true}}}}',
    )
    assert_empty_write(answer)
    try:
        got = await agent.http.get(f"/v1/agent/service/{unique_name}")
        assert got.status == 200
        body = got.json()
        assert (body["Service"], body["Port"], body["Connect"]) == (
            unique_name,
            1,
            {"Native": True},
        )
        assert shape(body) == shape(load_capture("agent-service-lower.http").json())
    finally:
        await agent.client.deregister_service(unique_name)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/agent/service/register", "OPTIONS,PUT"),
        ("POST", "/v1/agent/service/register", "OPTIONS,PUT"),
        ("DELETE", "/v1/agent/service/deregister/x", "OPTIONS,PUT"),
        ("PUT", "/v1/agent/connect/authorize", "OPTIONS,POST"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_method(
    agent: AgentUnderTest, method: str, path: str, allow: str
) -> None:
    answer = await agent.http.request(method, path)
    assert_error(answer, 405, f"method {method} not allowed")
    assert answer.header("Allow") == allow


@pytest_twisted.ensureDeferred
async def test_deregister_unknown_is_fine(
    agent: AgentUnderTest, unique_name: str
) -> None:
    answer = await agent.http.put(f"/v1/agent/service/deregister/{unique_name}")
    assert_empty_write(answer)


# -- discovery ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_health_connect_passing_shape(
    agent: AgentUnderTest, unique_name: str
) -> None:
    check_id = await register_ttl(agent, unique_name, address="127.0.0.1")
    try:
        await agent.client.check_pass(check_id)
        answer = await agent.http.get(f"/v1/health/connect/{unique_name}?passing=1")
        assert answer.status == 200
        assert answer.header_names == {
            "content-type",
            "vary",
            "x-consul-effective-consistency",
            "x-consul-index",
            "x-consul-knownleader",
            "x-consul-lastcontact",
        }
        (entry,) = answer.json()
        captured = load_capture("health-connect-db-passing.http").json()[0]
        assert shape(entry) == shape(captured)
        assert entry["Service"]["Connect"] == {"Native": True}
        assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", check_id]
    finally:
        await agent.client.deregister_service(unique_name)


@pytest_twisted.ensureDeferred
async def test_health_connect_unknown_is_empty_with_an_index(
    agent: AgentUnderTest, unique_name: str
) -> None:
    answer = await agent.client.health_connect(unique_name)
    assert answer.value == ()
    assert answer.index is not None
    assert answer.index > 0
    bad = await agent.http.get(f"/v1/health/connect/{unique_name}?passing=bad")
    assert_error(bad, 400, "Invalid value for ?passing")


@pytest_twisted.ensureDeferred
async def test_health_connect_blocking_woken_by_check_change(
    agent: AgentUnderTest, unique_name: str
) -> None:
    check_id = await register_ttl(agent, unique_name)
    try:
        first = await agent.client.health_connect(unique_name, passing=True)
        assert first.value == ()
        assert first.index is not None
        blocked = agent.client.health_connect(
            unique_name, passing=True, index=first.index, wait=5
        )
        await agent.client.check_pass(check_id)
        woken, took = await elapsed(blocked)
        assert took < 4
        assert woken.index is not None
        assert woken.index > first.index
        assert [e.service.id for e in woken.value] == [unique_name]
    finally:
        await agent.client.deregister_service(unique_name)


def db_registrations(name: str) -> list[dict[str, Any]]:
    """The captured run's ``db`` instances, under ``name``."""
    return [
        {
            "ID": f"{name}-1",
            "Name": name,
            "Port": 5001,
            "Address": "127.0.0.1",
            "Connect": {"Native": True},
            "Check": {"CheckID": f"{name}-1-ttl", "TTL": "15m", "Status": "passing"},
        },
        {
            "ID": f"{name}-2",
            "Name": name,
            "Port": 5002,
            "Connect": {"Native": True},
            "Check": {"CheckID": f"{name}-2-ttl", "TTL": "15m"},
        },
        {
            "ID": f"{name}-3",
            "Name": name,
            "Port": 5003,
            "Tags": ["plain"],
            "Check": {"TTL": "15m", "Status": "passing"},
        },
        {
            "ID": f"{name}-proxy-1",
            "Name": f"{name}-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {
                "DestinationServiceName": name,
                "DestinationServiceID": f"{name}-3",
                "LocalServiceAddress": "127.0.0.1",
                "LocalServicePort": 5003,
            },
            "Check": {
                "CheckID": f"{name}-proxy-1-ttl",
                "TTL": "15m",
                "Status": "passing",
            },
        },
    ]


@pytest_twisted.async_yield_fixture
async def db_like(agent: AgentUnderTest, unique_name: str) -> AsyncIterator[str]:
    """``unique_name`` as the captures' ``db``: 2 native, 1 plain, 1 proxy."""
    for body in db_registrations(unique_name):
        assert_empty_write(await agent.http.put("/v1/agent/service/register", body))
    yield unique_name
    for body in db_registrations(unique_name):
        await agent.client.deregister_service(body["ID"])


def by_service_id(
    entries: list[dict[str, Any]], key: str = "Service"
) -> dict[str, Any]:
    return {(e[key]["ID"] if key else e["ServiceID"]): e for e in entries}


def captured_by_instance(
    name: str, capture: str, key: str = "Service"
) -> dict[str, Any]:
    """A capture's entries keyed as ``db_registrations(name)`` names them."""
    entries = load_capture(capture).json()
    return {k.replace("db", name, 1): v for k, v in by_service_id(entries, key).items()}


@pytest_twisted.ensureDeferred
async def test_health_connect_has_native_instances_and_proxies(
    agent: AgentUnderTest, db_like: str
) -> None:
    answer = await agent.http.get(f"/v1/health/connect/{db_like}")
    assert answer.status == 200
    live = by_service_id(answer.json())
    captured = captured_by_instance(db_like, "health-connect-db.http")
    assert set(live) == {f"{db_like}-1", f"{db_like}-2", f"{db_like}-proxy-1"}
    assert set(live) == set(captured)
    for instance, entry in live.items():
        assert shape(entry) == shape(captured[instance]), instance
    proxy = live[f"{db_like}-proxy-1"]["Service"]
    assert (proxy["Kind"], proxy["Service"], proxy["Port"]) == (
        "connect-proxy",
        f"{db_like}-sidecar-proxy",
        21000,
    )
    assert proxy["Proxy"]["DestinationServiceName"] == db_like
    assert "Kind" not in live[f"{db_like}-1"]["Service"]
    assert live[f"{db_like}-2"]["Service"]["Address"] == ""


@pytest_twisted.ensureDeferred
async def test_health_connect_passing_drops_critical_instances(
    agent: AgentUnderTest, db_like: str
) -> None:
    for query in ("?passing=1", "?passing"):
        answer = await agent.http.get(f"/v1/health/connect/{db_like}{query}")
        assert set(by_service_id(answer.json())) == {
            f"{db_like}-1",
            f"{db_like}-proxy-1",
        }
    everything = await agent.http.get(f"/v1/health/connect/{db_like}?passing=false")
    assert len(everything.json()) == 3


@pytest_twisted.ensureDeferred
async def test_health_service_has_every_instance_and_no_proxy(
    agent: AgentUnderTest, db_like: str
) -> None:
    answer = await agent.http.get(f"/v1/health/service/{db_like}")
    live = by_service_id(answer.json())
    captured = captured_by_instance(db_like, "health-service-db.http")
    assert set(live) == {f"{db_like}-1", f"{db_like}-2", f"{db_like}-3"}
    for instance, entry in live.items():
        assert shape(entry) == shape(captured[instance]), instance
    # A check registered without an ID is named after the service instance.
    plain_checks = [c["CheckID"] for c in live[f"{db_like}-3"]["Checks"]]
    assert plain_checks == ["serfHealth", f"service:{db_like}-3"]


@pytest_twisted.ensureDeferred
async def test_catalog_connect_flat_form(agent: AgentUnderTest, db_like: str) -> None:
    answer = await agent.http.get(f"/v1/catalog/connect/{db_like}")
    assert answer.status == 200
    assert answer.header_names == {
        "content-type",
        "vary",
        "x-consul-effective-consistency",
        "x-consul-index",
        "x-consul-knownleader",
        "x-consul-lastcontact",
    }
    live = by_service_id(answer.json(), key="")
    captured = captured_by_instance(db_like, "catalog-connect-db.http", key="")
    assert set(live) == set(captured)
    for instance, entry in live.items():
        assert shape(entry) == shape(captured[instance]), instance
    assert live[f"{db_like}-1"]["ServiceKind"] == ""


@pytest_twisted.ensureDeferred
async def test_health_connect_woken_by_a_non_connect_instance(
    agent: AgentUnderTest, db_like: str
) -> None:
    first = await agent.client.health_connect(db_like)
    assert first.index is not None
    blocked = agent.client.health_connect(db_like, index=first.index, wait=5)
    await agent.client.check_fail(f"service:{db_like}-3")
    woken, took = await elapsed(blocked)
    assert took < 4
    assert woken.index is not None
    assert woken.index > first.index
    assert [e.service.id for e in woken.value] == [e.service.id for e in first.value]


# -- CA configuration ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ca_configuration_shape(agent: AgentUnderTest) -> None:
    answer = await agent.http.get("/v1/connect/ca/configuration")
    assert answer.status == 200
    assert answer.header_names == {"content-type", "vary"}
    body = answer.json()
    assert shape(body) == {
        "Provider": "str",
        "Config": {
            "IntermediateCertTTL": "str",
            "LeafCertTTL": "str",
            "RotationPeriod": "str",
        },
        "State": "null",
        "ForceWithoutCrossSigning": "bool",
        "CreateIndex": "int",
        "ModifyIndex": "int",
    }
    assert body["Provider"] == "consul"
    assert body["Config"] == {
        "IntermediateCertTTL": "8760h",
        "LeafCertTTL": "72h",
        "RotationPeriod": "2160h",
    }


@pytest_twisted.ensureDeferred
async def test_leaf_ttl_below_an_hour_needs_skip_validate(
    agent: AgentUnderTest,
) -> None:
    answer = await agent.http.put(
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"LeafCertTTL": "2m"}},
    )
    assert_error(
        answer,
        500,
        "error configuring provider: leaf cert TTL must be greater or equal "
        "than 1h0m0s",
    )


# Junk DER (three zero bytes) in PEM armour, and what Go's asn1 says of it
# (before the name of the struct it was decoding, and the offset).
JUNK_KEY = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"
JUNK_ROOT = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
JUNK_ASN1 = (
    "asn1: structure error: tags don't match (16 vs {class:0 tag:0 length:0 "
    "isCompound:false}) {optional:false explicit:false application:false "
    "private:false defaultValue:<nil> tag:<nil> stringType:0 timeType:0 "
    "set:false omitEmpty:false}"
)


A_KEY = new_key_pem()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            "xx",
            400,
            "Bad request: Request decode failed: invalid character 'x' looking "
            "for beginning of value",
        ),
        (
            {"Provider": "nope", "Config": {}},
            500,
            'could not initialize provider: unknown CA provider "nope"',
        ),
        (
            {"Provider": "consul", "Config": {"LeafCertTTL": "bogus"}},
            500,
            "error configuring provider: error decoding config: 1 error(s) "
            "decoding:\n\n* error decoding 'LeafCertTTL': time: invalid "
            'duration "bogus"',
        ),
        # issue 20 (ca20err-*.http and by hand on 1.8.7)
        (
            {"Provider": "consul", "Config": {"IntermediateCertTTL": "1h"}},
            500,
            "error configuring provider: Intermediate Cert TTL must be greater "
            "or equal than 3h",
        ),
        (
            {"Provider": "consul", "Config": {"IntermediateCertTTL": "100h"}},
            500,
            "error configuring provider: Intermediate Cert TTL must be greater "
            "or equal than 3 * LeafCertTTL (>=216h0m0s).",
        ),
        (
            {
                "Provider": "consul",
                "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 512},
            },
            500,
            "error configuring provider: EC key length must be one of (224, 256, "
            "384, 521) bits",
        ),
        (
            {"Provider": "consul", "Config": {"SkipValidate": "yes"}},
            500,
            "error configuring provider: error decoding config: 1 error(s) "
            "decoding:\n\n* cannot parse 'SkipValidate' as bool: "
            'strconv.ParseBool: parsing "yes": invalid syntax',
        ),
        (
            {"Provider": "consul", "Config": {"RootCert": "junk"}},
            500,
            "error configuring provider: must provide a private key when "
            "providing a root cert",
        ),
        (
            {"Provider": "consul", "Config": {"PrivateKey": JUNK_KEY}},
            500,
            "error generating CA root certificate: error generating CA: error "
            f"parsing private key {json.dumps(JUNK_KEY)}: x509: failed to parse "
            f"EC private key: {JUNK_ASN1} ecPrivateKey @2",
        ),
        (
            {
                "Provider": "consul",
                "Config": {"PrivateKey": A_KEY, "RootCert": JUNK_ROOT},
            },
            500,
            f"error parsing root cert: {JUNK_ASN1} certificate @2",
        ),
        (
            {"Provider": "consul", "Config": {"PrivateKey": A_KEY, "RootCert": "junk"}},
            500,
            "error parsing root fingerprint: no PEM-encoded data found",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_ca_configuration_errors(
    agent: AgentUnderTest, body: object, status: int, message: str
) -> None:
    answer = await agent.http.put("/v1/connect/ca/configuration", body)
    assert_error(answer, status, message)


@pytest_twisted.ensureDeferred
async def test_config_change_without_rotation_moves_the_roots_index(
    fresh_agent: AgentUnderTest,
) -> None:
    agent = fresh_agent
    before = await agent.client.agent_ca_roots()
    server_before = await agent.client.ca_roots()
    assert before.index is not None
    assert server_before.index is not None
    blocked = defer.gatherResults(
        [
            agent.client.agent_ca_roots(index=before.index, wait=5),
            agent.client.ca_roots(index=server_before.index, wait=5),
        ]
    )
    answer = await agent.http.put(
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"LeafCertTTL": "80h"}},
    )
    assert_empty_write(answer)
    (cached, server), took = await elapsed(blocked)
    assert took < 4
    assert cached.index > before.index
    assert server.index > server_before.index
    assert cached.value == before.value
    config = await agent.client.ca_configuration()
    assert config.config["LeafCertTTL"] == "80h"


@pytest_twisted.ensureDeferred
async def test_the_ca_configuration_already_stored_writes_nothing(
    fresh_agent: AgentUnderTest,
) -> None:
    # ConfigurationSet returns at once when Provider and Config are those
    # stored (ca20-put-same-key-again.http): no index moves, and the
    # ForceWithoutCrossSigning flag of such a PUT is dropped.
    agent = fresh_agent
    path = "/v1/connect/ca/configuration"
    config = {"Provider": "consul", "Config": {"LeafCertTTL": "80h", "X": 5}}
    assert_empty_write(await agent.http.put(path, config))
    before = (await agent.http.get(path)).json()
    roots = (await agent.http.get("/v1/connect/ca/roots")).header("X-Consul-Index")
    again = {
        "Provider": "consul",
        "Config": {"LeafCertTTL": "80h", "X": 5.0},
        "ForceWithoutCrossSigning": True,
    }
    assert_empty_write(await agent.http.put(path, again))
    assert (await agent.http.get(path)).json() == before
    answer = await agent.http.get("/v1/connect/ca/roots")
    assert answer.header("X-Consul-Index") == roots
    # true is not 1: a change, written.
    config["Config"] = {"LeafCertTTL": "80h", "X": True}
    assert_empty_write(await agent.http.put(path, config))
    after = (await agent.http.get(path)).json()
    assert after["ModifyIndex"] > before["ModifyIndex"]
    assert after["Config"]["X"] is True


@pytest_twisted.ensureDeferred
async def test_leaf_ttl_with_skip_validate(
    fresh_agent: AgentUnderTest, unique_name: str
) -> None:
    agent = fresh_agent
    answer = await agent.http.put(
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"LeafCertTTL": "2m", "SkipValidate": True}},
    )
    assert_empty_write(answer)
    config = await agent.client.ca_configuration()
    assert config.config["LeafCertTTL"] == "2m"
    assert config.config["SkipValidate"] is True
    leaf = await agent.client.leaf(unique_name)
    assert leaf.value.valid_before - leaf.value.valid_after == datetime.timedelta(
        minutes=2
    )
    # Under ten minutes of lifetime a blocking caller gets a new one at once.
    renewed, took = await elapsed(
        agent.client.leaf(unique_name, index=leaf.index, wait=5)
    )
    assert took < 4
    assert renewed.index != leaf.index
    assert renewed.value.serial_number != leaf.value.serial_number


# -- CA rotation -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ca_rotation_with_a_supplied_root(
    fresh_agent: AgentUnderTest, unique_name: str
) -> None:
    agent = fresh_agent
    before = await agent.client.agent_ca_roots()
    (old,) = before.value.roots
    (old_cert,) = load_pems(old.root_cert_pem)
    td = before.value.trust_domain
    key_pem, root_pem, root_cert = new_root(td)
    blocked = agent.client.agent_ca_roots(index=before.index, wait=5)
    put = await agent.http.put(
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"PrivateKey": key_pem, "RootCert": root_pem}},
    )
    assert_empty_write(put)

    woken, took = await elapsed(blocked)
    assert took < 4
    assert woken.index is not None
    assert before.index is not None
    assert woken.index > before.index

    answer = await agent.http.get("/v1/agent/connect/ca/roots")
    body = answer.json()
    (new_json,) = [r for r in body["Roots"] if r["Active"]]
    (old_json,) = [r for r in body["Roots"] if not r["Active"]]
    assert shape(new_json) == {**ROOT_SHAPE, "IntermediateCerts": ["list", "str"]}
    assert shape(old_json) == ROOT_SHAPE
    assert body["ActiveRootID"] == new_json["ID"] == sha1_id(root_cert)
    assert old_json["ID"] == old.id
    assert old_json["ModifyIndex"] > old.modify_index
    assert new_json["RootCert"] == root_pem
    assert new_json["Name"] == "Consul CA Root Cert"
    assert new_json["SerialNumber"] == root_cert.serial_number & (2**64 - 1)
    assert new_json["SigningKeyID"] == colon_hex(skid(root_cert))

    (cross,) = load_pems(new_json["IntermediateCerts"][0])
    assert cross.issuer == old_cert.subject
    assert cross.subject == root_cert.subject
    assert cross.public_key() == root_cert.public_key()
    assert skid(cross) == skid(root_cert)
    assert akid(cross) == skid(old_cert)
    cross.verify_directly_issued_by(old_cert)
    assert key_usages(cross) == (
        True,
        {"digital_signature", "key_cert_sign", "crl_sign"},
    )
    bc = cross.extensions.get_extension_for_class(x509.BasicConstraints)
    assert (bc.critical, bc.value.ca) == (True, True)
    assert uri_sans(cross) == [f"spiffe://{td}"]
    assert cross.not_valid_after_utc - cross.not_valid_before_utc == (
        datetime.timedelta(days=7)
    )

    server = await agent.http.get("/v1/connect/ca/roots")
    assert server.json() == body


@pytest_twisted.ensureDeferred
async def test_roots_are_listed_by_id_not_by_age(fresh_agent: AgentUnderTest) -> None:
    # Consul's state store lists roots in its ID index order: the new root
    # comes first or last by chance (its SHA-1), never by when it was added.
    agent = fresh_agent
    td = (await agent.client.agent_ca_roots()).value.trust_domain
    for _ in range(2):
        key_pem, root_pem, _cert = new_root(td)
        await agent.client.set_ca_configuration(
            "consul", {"PrivateKey": key_pem, "RootCert": root_pem}
        )
    for read in (agent.client.agent_ca_roots, agent.client.ca_roots):
        roots = (await read()).value
        ids = [r.id for r in roots.roots]
        assert len(ids) == 3
        assert ids == sorted(ids)


@pytest_twisted.ensureDeferred
async def test_after_rotation_a_never_requested_name_is_on_the_new_root(
    fresh_agent: AgentUnderTest, unique_name: str
) -> None:
    agent = fresh_agent
    td = (await agent.client.agent_ca_roots()).value.trust_domain
    known = f"{unique_name}-known"
    stale = await agent.client.leaf(known)
    key_pem, root_pem, root_cert = new_root(td)
    await agent.client.set_ca_configuration(
        "consul", {"PrivateKey": key_pem, "RootCert": root_pem}
    )
    roots = (await agent.client.agent_ca_roots()).value
    assert roots.active_root_id == sha1_id(root_cert)
    # A name read before stays on the old root for non-blocking readers.
    still = await agent.client.leaf(known)
    assert still.cache_hit is True
    assert (still.index, still.value) == (stale.index, stale.value)
    leaf = (await agent.client.leaf(unique_name)).value
    cert, *chain = load_pems(leaf.cert_pem)
    assert cert.issuer == root_cert.subject
    cert.verify_directly_issued_by(root_cert)
    assert akid(cert) == skid(root_cert)
    # The leaf carries the cross-signed intermediate after it, as real does.
    (cross_pem,) = roots.active_root.intermediate_certs_pem  # type: ignore[union-attr]
    assert chain == load_pems(cross_pem)


# -- ACLs (default deny, a master token) --------------------------------------------
#
# ``acl_agent`` is a development agent with ``acl_default_policy="deny"`` and a
# master token, or the session's real agent with ACLs on (``real_consul_acl``).
# Policies and tokens are made through the HTTP API with the master token, by
# the same code for both.


@pytest.fixture(params=AGENTS)
def acl_agent_kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest_twisted.async_yield_fixture
async def acl_agent(
    request: pytest.FixtureRequest, acl_agent_kind: str
) -> AsyncIterator[AgentUnderTest]:
    if acl_agent_kind == "real":
        real = request.getfixturevalue("real_consul_acl")
        under_test = reach_real_agent(real.http_address, master_token=real.master_token)
    else:
        under_test = serve_dev_agent(
            acl_default_policy="deny", master_token=str(uuid.uuid4())
        )
    yield under_test
    await under_test.close()


def token_header(token: str) -> dict[str, str]:
    return {"X-Consul-Token": token}


async def acl_call(
    agent: AgentUnderTest,
    method: str,
    path: str,
    body: object | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> RawAnswer:
    """A request with ``token`` (none: anonymous) as ``X-Consul-Token``."""
    all_headers = dict(headers or {})
    if token is not None:
        all_headers.update(token_header(token))
    data = None if body is None else body if isinstance(body, str) else json.dumps(body)
    return await agent.http.request(method, path, data, headers=all_headers)


async def make_token(agent: AgentUnderTest, rules: str) -> str:
    """A new policy with ``rules`` and a new token holding it: its secret."""
    assert agent.master_token is not None
    name = f"p-{uuid.uuid4().hex[:12]}"
    policy = await acl_call(
        agent,
        "PUT",
        "/v1/acl/policy",
        {"Name": name, "Rules": rules},
        agent.master_token,
    )
    assert policy.status == 200, policy.text
    secret = str(uuid.uuid4())
    token = await acl_call(
        agent,
        "PUT",
        "/v1/acl/token",
        {"Description": name, "SecretID": secret, "Policies": [{"Name": name}]},
        agent.master_token,
    )
    assert token.status == 200, token.text
    return secret


def write_rules(name: str) -> str:
    """The captures' ``web-write`` policy, for ``name``."""
    return (
        f'service "{name}" {{ policy = "write" }}\n'
        'service_prefix "" { policy = "read" }\n'
        'node_prefix "" { policy = "read" }'
    )


@pytest_twisted.ensureDeferred
async def test_acl_policy_and_token_shapes(acl_agent: AgentUnderTest) -> None:
    agent, master = acl_agent, acl_agent.master_token
    name = f"p-{uuid.uuid4().hex[:12]}"
    rules = write_rules(name)
    policy = await acl_call(
        agent, "PUT", "/v1/acl/policy", {"Name": name, "Rules": rules}, master
    )
    assert policy.status == 200
    assert policy.header_names == {"content-type", "vary"}
    assert shape(policy.json()) == shape(
        load_capture("acl-policy-create-web-write.http").json()
    )
    assert (policy.json()["Name"], policy.json()["Rules"]) == (name, rules)
    assert UUID_RE.fullmatch(policy.json()["ID"])
    secret = str(uuid.uuid4())
    token = await acl_call(
        agent,
        "PUT",
        "/v1/acl/token",
        {"Description": "web", "SecretID": secret, "Policies": [{"Name": name}]},
        master,
    )
    assert token.status == 200
    assert shape(token.json()) == shape(
        load_capture("acl-token-create-web.http").json()
    )
    assert token.json()["SecretID"] == secret
    assert token.json()["Policies"] == [{"ID": policy.json()["ID"], "Name": name}]
    bare = await acl_call(
        agent, "PUT", "/v1/acl/token", {"Description": "none"}, master
    )
    assert bare.status == 200
    assert "Policies" not in bare.json()
    assert UUID_RE.fullmatch(bare.json()["SecretID"])


@pytest_twisted.ensureDeferred
async def test_acl_policy_and_token_errors(acl_agent: AgentUnderTest) -> None:
    agent, master = acl_agent, acl_agent.master_token
    name = f"p-{uuid.uuid4().hex[:12]}"
    first = await acl_call(agent, "PUT", "/v1/acl/policy", {"Name": name}, master)
    assert first.status == 200
    cases: list[tuple[str, object, str | None, int, str]] = [
        (
            "/v1/acl/policy",
            {"Name": name},
            master,
            500,
            f'Invalid Policy: A Policy with Name "{name}" already exists',
        ),
        ("/v1/acl/policy", {"Name": ""}, master, 500, "Invalid Policy: no Name is set"),
        (
            "/v1/acl/policy",
            {"Name": "bad name!"},
            master,
            500,
            "Invalid Policy: invalid Name. Only alphanumeric characters, '-' and "
            "'_' are allowed",
        ),
        (
            "/v1/acl/policy",
            {"Name": f"{name}-x", "Rules": 'service "x" { policy = "bogus" }'},
            master,
            500,
            'Invalid service policy: &acl.ServiceRule{Name:"x", Policy:"bogus", '
            'Intentions:"", EnterpriseRule:acl.EnterpriseRule{}}',
        ),
        (
            "/v1/acl/policy",
            {"Name": f"{name}-y", "Rulez": ""},
            master,
            400,
            'Bad request: Policy decoding failed: json: unknown field "Rulez"',
        ),
        ("/v1/acl/policy", {"Name": f"{name}-z"}, None, 403, "Permission denied"),
        ("/v1/acl/policy", {"Name": f"{name}-z"}, "not-a-token", 403, "ACL not found"),
        (
            "/v1/acl/token",
            {"Policies": [{"Name": f"{name}-nosuch"}]},
            master,
            500,
            f'No such ACL policy with name "{name}-nosuch"',
        ),
        (
            "/v1/acl/token",
            {"Policies": [{"ID": "00000000-0000-0000-0000-000000000099"}]},
            master,
            500,
            'No such ACL policy with ID "00000000-0000-0000-0000-000000000099"',
        ),
        (
            "/v1/acl/token",
            {"SecretID": "not-uuid"},
            master,
            500,
            "Invalid Token: SecretID is not a valid UUID",
        ),
        ("/v1/acl/token", {"Description": "x"}, None, 403, "Permission denied"),
    ]
    for path, body, token, status, message in cases:
        answer = await acl_call(agent, "PUT", path, body, token)
        assert (path, body, answer.status, answer.text) == (path, body, status, message)
        assert answer.header("Content-Type") == TEXT
    secret = str(uuid.uuid4())
    assert (
        await acl_call(agent, "PUT", "/v1/acl/token", {"SecretID": secret}, master)
    ).status == 200
    again = await acl_call(agent, "PUT", "/v1/acl/token", {"SecretID": secret}, master)
    assert_error(again, 500, "Invalid Token: SecretID is already in use")
    wrong = await acl_call(agent, "GET", "/v1/acl/policy", None, master)
    assert_error(wrong, 405, "method GET not allowed")


@pytest_twisted.ensureDeferred
async def test_acl_roots_need_no_token(acl_agent: AgentUnderTest) -> None:
    for path in ("/v1/agent/connect/ca/roots", "/v1/connect/ca/roots"):
        answer = await acl_call(acl_agent, "GET", path)
        assert answer.status == 200
        assert answer.json()["Roots"]


@pytest_twisted.ensureDeferred
async def test_acl_leaf_needs_service_write(
    acl_agent: AgentUnderTest, unique_name: str
) -> None:
    agent = acl_agent
    web = await make_token(agent, write_rules(unique_name))
    reader = await make_token(
        agent, f'service "{unique_name}-api" {{ policy = "read" }}'
    )
    path = f"/v1/agent/connect/ca/leaf/{unique_name}"
    assert_error(await acl_call(agent, "GET", path), 403, "Permission denied")
    assert_error(
        await acl_call(agent, "GET", path, token="not-a-real-token"),
        403,
        "ACL not found",
    )
    assert_error(
        await acl_call(agent, "GET", f"{path}-other", token=web),
        403,
        "Permission denied",
    )
    assert_error(
        await acl_call(
            agent, "GET", f"/v1/agent/connect/ca/leaf/{unique_name}-api", token=reader
        ),
        403,
        "Permission denied",
    )
    first = await acl_call(agent, "GET", path, token=web)
    assert first.status == 200
    assert first.header_names == load_capture("acl-leaf-web-token.http").header_names
    # The token by each of the three ways; a query token wins over a header.
    bearer = await acl_call(
        agent, "GET", path, headers={"Authorization": f"Bearer {web}"}
    )
    query = await acl_call(agent, "GET", f"{path}?token={web}", token="bogus")
    empty_query = await acl_call(agent, "GET", f"{path}?token=", token=web)
    for answer in (bearer, query, empty_query):
        assert answer.status == 200
        assert answer.json()["SerialNumber"] == first.json()["SerialNumber"]


@pytest_twisted.ensureDeferred
async def test_acl_authorize(acl_agent: AgentUnderTest, unique_name: str) -> None:
    agent, master = acl_agent, acl_agent.master_token
    web = await make_token(agent, write_rules(unique_name))
    reader = await make_token(agent, f'service "{unique_name}" {{ policy = "read" }}')
    td = (await agent.http.get("/v1/agent/connect/ca/roots")).json()["TrustDomain"]
    api = client_uri(td, f"{unique_name}-api")
    body = {"Target": unique_name, "ClientCertURI": api}
    path = "/v1/agent/connect/authorize"
    # Validation comes before the ACL check.
    bad_uri = await acl_call(
        agent, "POST", path, {"Target": unique_name, "ClientCertURI": "spiffe://bad"}
    )
    assert_error(
        bad_uri, 400, "Bad request: ClientCertURI not a valid Connect identifier"
    )
    no_target = await acl_call(agent, "POST", path, {"ClientCertURI": api})
    assert_error(no_target, 400, "Bad request: Target service must be specified")
    assert_error(await acl_call(agent, "POST", path, body), 403, "Permission denied")
    assert_error(
        await acl_call(agent, "POST", path, body, "not-a-real-token"),
        403,
        "ACL not found",
    )
    assert_error(
        await acl_call(agent, "POST", path, body, reader), 403, "Permission denied"
    )
    other_target = {"Target": f"{unique_name}-db", "ClientCertURI": api}
    assert_error(
        await acl_call(agent, "POST", path, other_target, web),
        403,
        "Permission denied",
    )
    default = {"Authorized": False, "Reason": "Default behavior configured by ACLs"}
    as_master = await acl_call(agent, "POST", path, body, master)
    assert (as_master.status, as_master.json()) == (200, default)
    as_web = await acl_call(agent, "POST", path, body, web)
    assert (as_web.status, as_web.json()) == (200, default)
    created = await acl_call(
        agent,
        "POST",
        "/v1/connect/intentions",
        {
            "SourceName": f"{unique_name}-api",
            "DestinationName": unique_name,
            "Action": "allow",
        },
        master,
    )
    assert created.status == 200
    intention_id = created.json()["ID"]
    allowed = await acl_call(agent, "POST", path, body, web)
    assert allowed.json() == {
        "Authorized": True,
        "Reason": f"Matched intention: ALLOW default/{unique_name}-api => "
        f"default/{unique_name} (ID: {intention_id}, Precedence: 9)",
    }
    other_source = await acl_call(
        agent,
        "POST",
        path,
        {"Target": unique_name, "ClientCertURI": client_uri(td, "other")},
        web,
    )
    assert other_source.json() == default
    await acl_call(
        agent, "DELETE", f"/v1/connect/intentions/{intention_id}", None, master
    )


@pytest.mark.parametrize("read", ["health", "catalog"])
@pytest_twisted.ensureDeferred
async def test_acl_anonymous_connect_reads_are_empty_at_index_1_and_never_block(
    acl_agent: AgentUnderTest, unique_name: str, read: str
) -> None:
    agent, master = acl_agent, acl_agent.master_token
    registered = await acl_call(
        agent,
        "PUT",
        "/v1/agent/service/register",
        {"Name": unique_name, "Port": 5001, "Connect": {"Native": True}},
        master,
    )
    assert_empty_write(registered)
    path = f"/v1/{read}/connect/{unique_name}"
    answer = await acl_call(agent, "GET", path)
    captured = load_capture(f"acl-{read}-connect-anon.http")
    assert (answer.status, answer.json()) == (200, [])
    assert answer.header_names == captured.header_names
    for header in ("X-Consul-Index", "X-Consul-Knownleader"):
        assert answer.header(header) == captured.header(header)
    # A watch loop at index 1 is answered at once (it would spin).
    blocked, took = await elapsed(acl_call(agent, "GET", f"{path}?index=1&wait=5s"))
    assert (blocked.status, blocked.json(), blocked.header("X-Consul-Index")) == (
        200,
        [],
        "1",
    )
    assert took < 4
    reader = await make_token(agent, write_rules(f"{unique_name}-web"))
    seen = await acl_call(agent, "GET", path, token=reader)
    assert seen.status == 200
    assert len(seen.json()) == 1
    assert seen.header("X-Consul-Knownleader") == "true"
    assert int(seen.header("X-Consul-Index") or 0) > 1
    await acl_call(
        agent, "PUT", f"/v1/agent/service/deregister/{unique_name}", None, master
    )


@pytest.mark.parametrize("read", ["health", "catalog"])
@pytest_twisted.ensureDeferred
async def test_acl_anonymous_service_reads_are_filtered(
    acl_agent: AgentUnderTest, unique_name: str, read: str
) -> None:
    agent, master = acl_agent, acl_agent.master_token
    await acl_call(
        agent,
        "PUT",
        "/v1/agent/service/register",
        {"Name": unique_name, "Port": 5001},
        master,
    )
    answer = await acl_call(agent, "GET", f"/v1/{read}/service/{unique_name}")
    assert (answer.status, answer.json()) == (200, [])
    # Filtered inside the blocking query: a real index and leader.
    assert answer.header("X-Consul-Knownleader") == "true"
    assert int(answer.header("X-Consul-Index") or 0) > 1
    as_master = await acl_call(
        agent, "GET", f"/v1/{read}/service/{unique_name}", None, master
    )
    assert len(as_master.json()) == 1
    await acl_call(
        agent, "PUT", f"/v1/agent/service/deregister/{unique_name}", None, master
    )


@pytest_twisted.ensureDeferred
async def test_acl_intentions(acl_agent: AgentUnderTest, unique_name: str) -> None:
    agent = acl_agent
    web = await make_token(agent, write_rules(unique_name))
    writer = await make_token(
        agent, f'service "{unique_name}" {{ policy = "read" intentions = "write" }}'
    )
    nothing = await make_token(agent, "")
    source = f"{unique_name}-api"
    body = {"SourceName": source, "DestinationName": unique_name, "Action": "allow"}
    for token in (None, web):
        assert_error(
            await acl_call(agent, "POST", "/v1/connect/intentions", body, token),
            403,
            "Permission denied",
        )
    # The ACL check comes before validation.
    invalid = {"SourceName": source, "DestinationName": unique_name, "Action": "x"}
    assert_error(
        await acl_call(agent, "POST", "/v1/connect/intentions", invalid),
        403,
        "Permission denied",
    )
    created = await acl_call(agent, "POST", "/v1/connect/intentions", body, writer)
    assert created.status == 200
    intention_id = created.json()["ID"]
    anonymous_list = await acl_call(agent, "GET", "/v1/connect/intentions")
    assert (anonymous_list.status, anonymous_list.json()) == (200, [])
    assert anonymous_list.header("X-Consul-Knownleader") == "true"
    assert (
        await acl_call(agent, "GET", "/v1/connect/intentions", None, nothing)
    ).json() == []
    listed = await acl_call(agent, "GET", "/v1/connect/intentions", None, web)
    assert intention_id in [i["ID"] for i in listed.json()]
    match = f"/v1/connect/intentions/match?by=destination&name={unique_name}"
    assert_error(await acl_call(agent, "GET", match), 403, "Permission denied")
    matched = await acl_call(agent, "GET", match, None, web)
    assert [i["ID"] for i in matched.json()[unique_name]][:1] == [intention_id]
    bad_by = await acl_call(
        agent, "GET", f"/v1/connect/intentions/match?by=x&name={unique_name}"
    )
    assert_error(bad_by, 500, "'by' parameter must be one of 'source' or 'destination'")
    check = f"/v1/connect/intentions/check?source={source}&destination={unique_name}"
    assert_error(await acl_call(agent, "GET", check), 403, "Permission denied")
    assert_error(
        await acl_call(agent, "GET", check, None, nothing), 403, "Permission denied"
    )
    assert (await acl_call(agent, "GET", check, None, web)).json() == {"Allowed": True}
    other = f"/v1/connect/intentions/check?source=zzz&destination={unique_name}"
    assert (await acl_call(agent, "GET", other, None, web)).json() == {"Allowed": False}
    one = f"/v1/connect/intentions/{intention_id}"
    assert_error(await acl_call(agent, "GET", one), 403, "Permission denied")
    assert (await acl_call(agent, "GET", one, None, web)).status == 200
    deny = dict(body, Action="deny")
    assert_error(await acl_call(agent, "PUT", one, deny, web), 403, "Permission denied")
    assert_error(await acl_call(agent, "DELETE", one), 403, "Permission denied")
    missing = "/v1/connect/intentions/00000000-0000-0000-0000-000000000000"
    assert_error(
        await acl_call(agent, "DELETE", missing),
        500,
        "Cannot delete non-existent intention: '00000000-0000-0000-0000-000000000000'",
    )
    deleted = await acl_call(agent, "DELETE", one, None, writer)
    assert (deleted.status, deleted.json()) == (200, True)


@pytest_twisted.ensureDeferred
async def test_acl_registration_and_checks(
    acl_agent: AgentUnderTest, unique_name: str
) -> None:
    agent, master = acl_agent, acl_agent.master_token
    web = await make_token(agent, write_rules(unique_name))
    register = "/v1/agent/service/register"
    anonymous = await acl_call(
        agent, "PUT", register, {"Name": unique_name, "Connect": {"Native": True}}
    )
    assert_error(
        anonymous, 403, f"Permission denied: Missing service:write on {unique_name}"
    )
    # Validation comes first.
    assert_error(
        await acl_call(agent, "PUT", register, {"Name": ""}),
        400,
        "Missing service name",
    )
    proxy = {
        "Name": f"{unique_name}-proxy",
        "Kind": "connect-proxy",
        "Port": 21000,
        "Proxy": {"DestinationServiceName": unique_name},
    }
    assert_error(
        await acl_call(agent, "PUT", register, proxy, web),
        403,
        f"Permission denied: Missing service:write on {unique_name}-proxy",
    )
    check_id = f"{unique_name}-ttl"
    mine = {
        "Name": unique_name,
        "Port": 8080,
        "Connect": {"Native": True},
        "Check": {"CheckID": check_id, "TTL": "15m"},
    }
    assert_empty_write(await acl_call(agent, "PUT", register, mine, web))
    denied = f"Permission denied: Missing service:write on {unique_name}"
    assert_error(
        await acl_call(agent, "PUT", f"/v1/agent/check/pass/{check_id}"), 403, denied
    )
    assert_error(
        await acl_call(agent, "PUT", "/v1/agent/check/pass/nosuch"),
        500,
        'Unknown check "nosuch"',
    )
    assert_empty_write(
        await acl_call(agent, "PUT", f"/v1/agent/check/pass/{check_id}", None, web)
    )
    anonymous_services = await acl_call(agent, "GET", "/v1/agent/services")
    assert unique_name not in anonymous_services.json()
    assert (
        unique_name
        in (await acl_call(agent, "GET", "/v1/agent/services", None, web)).json()
    )
    assert check_id not in (await acl_call(agent, "GET", "/v1/agent/checks")).json()
    assert_error(
        await acl_call(agent, "GET", f"/v1/agent/service/{unique_name}"),
        403,
        "Permission denied",
    )
    deregister = f"/v1/agent/service/deregister/{unique_name}"
    assert_error(await acl_call(agent, "PUT", deregister), 403, denied)
    assert_error(
        await acl_call(
            agent, "PUT", "/v1/agent/service/deregister/nosuch", None, master
        ),
        500,
        'Unknown service {"nosuch" {}}',
    )
    assert_empty_write(await acl_call(agent, "PUT", deregister, None, web))


@pytest.mark.parametrize("path", ["/v1/agent/self", "/v1/connect/ca/configuration"])
@pytest_twisted.ensureDeferred
async def test_acl_agent_self_and_ca_configuration_need_privileges(
    acl_agent: AgentUnderTest, unique_name: str, path: str
) -> None:
    agent = acl_agent
    web = await make_token(agent, write_rules(unique_name))
    for token in (None, web):
        assert_error(
            await acl_call(agent, "GET", path, None, token), 403, "Permission denied"
        )
    assert_error(
        await acl_call(agent, "GET", path, None, "bogus"), 403, "ACL not found"
    )
    assert (await acl_call(agent, "GET", path, None, agent.master_token)).status == 200


# -- discovery: catalog service, prepared queries ------------------------------------


@pytest_twisted.ensureDeferred
async def test_catalog_service_flat_form(agent: AgentUnderTest, db_like: str) -> None:
    answer = await agent.http.get(f"/v1/catalog/service/{db_like}")
    assert answer.status == 200
    live = by_service_id(answer.json(), key="")
    captured = captured_by_instance(db_like, "catalog-service-db.http", key="")
    assert set(live) == {f"{db_like}-1", f"{db_like}-2", f"{db_like}-3"}
    for instance, entry in live.items():
        assert shape(entry) == shape(captured[instance]), instance


async def create_query(agent: AgentUnderTest, body: dict[str, Any]) -> str:
    created = await agent.http.post("/v1/query", body)
    assert created.status == 200, created.text
    assert created.header_names == {"content-type", "vary"}
    query_id: str = created.json()["ID"]
    assert UUID_RE.fullmatch(query_id)
    return query_id


def instance_ids(body: dict[str, Any]) -> set[str]:
    return {n["Service"]["ID"] for n in body["Nodes"]}


def assert_execute_shapes(
    body: dict[str, Any], capture: str, name: str, instances: list[str]
) -> None:
    """
    The answer's shape, and each instance's, as the capture's (instance by
    instance: the order is shuffled).
    """
    captured = load_capture(capture).json()
    assert shape({**body, "Nodes": []}) == shape({**captured, "Nodes": []})
    live = by_service_id(body["Nodes"])
    recorded = {
        k.replace("db", name, 1): v for k, v in by_service_id(captured["Nodes"]).items()
    }
    for instance in instances:
        assert shape(live[instance]) == shape(recorded[instance]), instance


@pytest_twisted.ensureDeferred
async def test_query_execute_connect(agent: AgentUnderTest, db_like: str) -> None:
    name = f"{db_like}-connect"
    query_id = await create_query(
        agent,
        {
            "Name": name,
            "Service": {"Service": db_like, "Connect": True, "OnlyPassing": True},
        },
    )
    try:
        captured = load_capture("query-execute-connect.http")
        for ref in (query_id, name):
            answer = await agent.http.get(f"/v1/query/{ref}/execute")
            assert answer.status == 200
            assert answer.header_names == captured.header_names
            assert answer.header("X-Consul-Index") == "1"
            body = answer.json()
            # Native instances and proxies, the critical one dropped.
            assert instance_ids(body) == {f"{db_like}-1", f"{db_like}-proxy-1"}
            assert {k: v for k, v in body.items() if k != "Nodes"} == {
                "Service": db_like,
                "DNS": {"TTL": ""},
                "Datacenter": "dc1",
                "Failovers": 0,
                "Index": 0,
                "LastContact": 0,
                "KnownLeader": True,
                "ConsistencyLevel": "leader",
            }
            assert_execute_shapes(
                body,
                "query-execute-connect.http",
                db_like,
                [f"{db_like}-1", f"{db_like}-proxy-1"],
            )
        # Never blocking, whatever the index.
        blocked, took = await elapsed(
            agent.http.get(f"/v1/query/{name}/execute?index=1&wait=5s")
        )
        assert blocked.status == 200
        assert took < 4
    finally:
        await agent.http.request("DELETE", f"/v1/query/{query_id}")


@pytest_twisted.ensureDeferred
async def test_query_execute_plain_and_connect_parameter(
    agent: AgentUnderTest, db_like: str
) -> None:
    name = f"{db_like}-plain"
    query_id = await create_query(
        agent, {"Name": name, "Service": {"Service": db_like}}
    )
    try:
        plain = await agent.http.get(f"/v1/query/{name}/execute")
        # The critical instance is dropped even without OnlyPassing.
        assert instance_ids(plain.json()) == {f"{db_like}-1", f"{db_like}-3"}
        assert_execute_shapes(
            plain.json(), "query-execute-plain.http", db_like, [f"{db_like}-1"]
        )
        connect = await agent.http.get(f"/v1/query/{name}/execute?connect=true")
        assert instance_ids(connect.json()) == {f"{db_like}-1", f"{db_like}-proxy-1"}
        limited = await agent.http.get(f"/v1/query/{name}/execute?limit=1")
        assert len(limited.json()["Nodes"]) == 1
        assert_error(
            await agent.http.get(f"/v1/query/{name}/execute?connect=bad"),
            500,
            "Error parsing 'connect' value: strconv.ParseBool: parsing \"bad\": "
            "invalid syntax",
        )
        assert_error(
            await agent.http.get(f"/v1/query/{name}/execute?limit=x"),
            500,
            'Bad limit: strconv.Atoi: parsing "x": invalid syntax',
        )
        tagged = await create_query(
            agent,
            {
                "Name": f"{name}-tag",
                "Service": {"Service": db_like, "Tags": ["!plain"]},
            },
        )
        not_plain = await agent.http.get(f"/v1/query/{tagged}/execute")
        assert instance_ids(not_plain.json()) == {f"{db_like}-1"}
        await agent.http.request("DELETE", f"/v1/query/{tagged}")
    finally:
        await agent.http.request("DELETE", f"/v1/query/{query_id}")


@pytest_twisted.ensureDeferred
async def test_query_list_get_update_delete(
    agent: AgentUnderTest, unique_name: str
) -> None:
    query_id = await create_query(
        agent, {"Name": unique_name, "Service": {"Service": unique_name}}
    )
    listed = await agent.http.get("/v1/query")
    assert listed.status == 200
    assert listed.header_names == load_capture("query-list.http").header_names
    mine = [q for q in listed.json() if q["ID"] == query_id]
    assert len(mine) == 1
    (captured,) = [
        q for q in load_capture("query-list.http").json() if q["Name"] == "db-plain"
    ]
    assert shape(mine[0]) == shape(captured)
    one = await agent.http.get(f"/v1/query/{query_id}")
    assert (one.status, one.json()) == (200, mine)
    assert one.header("X-Consul-Knownleader") == "true"
    updated = await agent.http.put(
        f"/v1/query/{query_id}",
        {"Name": unique_name, "Service": {"Service": unique_name, "OnlyPassing": True}},
    )
    assert_empty_write(updated)
    after = (await agent.http.get(f"/v1/query/{query_id}")).json()[0]
    assert after["Service"]["OnlyPassing"] is True
    assert after["ModifyIndex"] > after["CreateIndex"]
    assert_empty_write(await agent.http.request("DELETE", f"/v1/query/{query_id}"))
    missing = f"Cannot modify non-existent prepared query: '{query_id}'"
    assert_error(
        await agent.http.request("DELETE", f"/v1/query/{query_id}"), 500, missing
    )
    assert_error(await agent.http.get(f"/v1/query/{query_id}"), 404, "Query not found")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        (
            "POST",
            "/v1/query",
            {"Name": "bad"},
            500,
            "Invalid prepared query: Must provide a Service name to query",
        ),
        (
            "POST",
            "/v1/query",
            {"Service": {"Service": "db"}},
            500,
            "Invalid prepared query: Must be bound to a session",
        ),
        (
            "POST",
            "/v1/query",
            {"Name": "q", "Service": {"Service": "db", "Failover": {"NearestN": -1}}},
            500,
            "Invalid prepared query: Bad NearestN '-1', must be >= 0",
        ),
        (
            "POST",
            "/v1/query",
            {"Name": "q", "Service": {"Service": "db"}, "DNS": {"TTL": "bogus"}},
            500,
            "Invalid prepared query: Bad DNS TTL 'bogus': time: invalid duration "
            '"bogus"',
        ),
        (
            "POST",
            "/v1/query",
            {"Name": "q", "Service": {"Service": "db", "Port": 1}},
            400,
            'Request decode failed: json: unknown field "Port"',
        ),
        (
            "POST",
            "/v1/query",
            {"Name": "q", "ID": "x", "Service": {"Service": "db"}},
            500,
            "ID must be empty when creating a new prepared query",
        ),
        (
            "POST",
            "/v1/query",
            {"Name": "q", "Service": {"Service": "db"}, "Template": {"Type": "x"}},
            500,
            "failed compiling template: Bad Template.Type 'x'",
        ),
        ("POST", "/v1/query", "", 400, "Request decode failed: EOF"),
        ("PUT", "/v1/query", None, 405, "method PUT not allowed"),
        ("POST", "/v1/query/x/execute", None, 405, "method POST not allowed"),
        ("GET", "/v1/query/nosuch/execute", None, 404, "Query not found"),
        (
            "GET",
            "/v1/query/nosuch",
            None,
            500,
            "failed prepared query lookup: index error: UUID must be 36 characters",
        ),
        (
            "DELETE",
            "/v1/query/nosuch",
            None,
            500,
            "Prepared Query lookup failed: failed prepared query lookup: index "
            "error: UUID must be 36 characters",
        ),
        (
            "PUT",
            "/v1/query/00000000-0000-0000-0000-000000000000",
            {"Name": "q", "Service": {"Service": "db"}},
            500,
            "Cannot modify non-existent prepared query: "
            "'00000000-0000-0000-0000-000000000000'",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_query_errors(
    agent: AgentUnderTest,
    method: str,
    path: str,
    body: object,
    status: int,
    message: str,
) -> None:
    data = None if body is None else body if isinstance(body, str) else json.dumps(body)
    assert_error(await agent.http.request(method, path, data), status, message)


@pytest_twisted.ensureDeferred
async def test_query_names_may_not_alias(
    agent: AgentUnderTest, unique_name: str
) -> None:
    query_id = await create_query(
        agent, {"Name": unique_name, "Service": {"Service": "db"}}
    )
    try:
        again = await agent.http.post(
            "/v1/query", {"Name": unique_name, "Service": {"Service": "db"}}
        )
        assert_error(again, 500, f"name '{unique_name}' aliases an existing query name")
        as_id = await agent.http.post(
            "/v1/query", {"Name": query_id, "Service": {"Service": "db"}}
        )
        assert_error(as_id, 500, f"name '{query_id}' aliases an existing query ID")
    finally:
        await agent.http.request("DELETE", f"/v1/query/{query_id}")


@pytest_twisted.ensureDeferred
async def test_acl_queries(acl_agent: AgentUnderTest, unique_name: str) -> None:
    agent, master = acl_agent, acl_agent.master_token
    web = await make_token(agent, write_rules(unique_name))
    await acl_call(
        agent,
        "PUT",
        "/v1/agent/service/register",
        {"Name": unique_name, "Port": 1, "Check": {"TTL": "10m", "Status": "passing"}},
        master,
    )
    body = {"Name": unique_name, "Service": {"Service": unique_name}}
    for token in (None, web):
        assert_error(
            await acl_call(agent, "POST", "/v1/query", body, token),
            403,
            "Permission denied",
        )
    created = await acl_call(agent, "POST", "/v1/query", body, master)
    assert created.status == 200
    query_id = created.json()["ID"]
    listed = await acl_call(agent, "GET", "/v1/query")
    assert (listed.status, listed.json()) == (200, [])
    anonymous = await acl_call(agent, "GET", f"/v1/query/{unique_name}/execute")
    assert anonymous.status == 200
    assert anonymous.json()["Nodes"] == []
    seen = await acl_call(agent, "GET", f"/v1/query/{unique_name}/execute", None, web)
    assert len(seen.json()["Nodes"]) == 1
    assert_error(
        await acl_call(agent, "DELETE", f"/v1/query/{query_id}"),
        403,
        "Permission denied",
    )
    assert_empty_write(
        await acl_call(agent, "DELETE", f"/v1/query/{query_id}", None, master)
    )
    await acl_call(
        agent, "PUT", f"/v1/agent/service/deregister/{unique_name}", None, master
    )


@pytest_twisted.ensureDeferred
async def test_intention_endpoints_ignore_namespaces(
    agent: AgentUnderTest, unique_name: str
) -> None:
    # 1.8.7 reads no namespace on intention endpoints (the others refuse one).
    body = {"SourceName": "a", "DestinationName": unique_name, "Action": "allow"}
    created = await agent.http.post("/v1/connect/intentions?ns=team", body)
    assert created.status == 200
    intention_id = created.json()["ID"]
    paths = [
        "/v1/connect/intentions?ns=team",
        f"/v1/connect/intentions/{intention_id}?ns=team",
        f"/v1/connect/intentions/match?by=destination&name={unique_name}&ns=team",
        f"/v1/connect/intentions/check?source=a&destination={unique_name}&ns=team",
    ]
    for path in paths:
        answer = await agent.http.request(
            "GET", path, headers={"X-Consul-Namespace": "team"}
        )
        assert (path, answer.status) == (path, 200)
    deleted = await agent.http.request(
        "DELETE", f"/v1/connect/intentions/{intention_id}?ns=team"
    )
    assert deleted.status == 200
    refused = await agent.http.get(f"/v1/catalog/service/{unique_name}?ns=team")
    assert_error(
        refused,
        400,
        'Bad request: Invalid query parameter: "ns" - Namespaces are a Consul '
        "Enterprise feature",
    )


# -- issue 20: the last differences a client notices ---------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "body"),
    [
        ("GET", "/v1/acl/tokens", 401, "ACL support disabled"),
        ("GET", "/v1/acl/token/self", 401, "ACL support disabled"),
        ("DELETE", "/v1/acl/token/x", 401, "ACL support disabled"),
        ("GET", "/v1/acl/policy/name/x", 401, "ACL support disabled"),
        ("PUT", "/v1/acl/bootstrap", 401, "ACL support disabled"),
        ("POST", "/v1/acl/login", 401, "ACL support disabled"),
        ("PUT", "/v1/acl/login", 405, "method PUT not allowed"),
        ("POST", "/v1/acl/policy", 405, "method POST not allowed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_acl_endpoints_with_acls_off(
    agent: AgentUnderTest, method: str, path: str, status: int, body: str
) -> None:
    answer = await agent.http.request(method, path)
    assert_error(answer, status, body)


@pytest_twisted.ensureDeferred
async def test_check_register_and_deregister_errors(
    agent: AgentUnderTest, unique_name: str
) -> None:
    register = "/v1/agent/check/register"
    unknown = await agent.http.put(
        register, {"Name": "c", "ServiceID": f"{unique_name}-nosuch", "TTL": "10s"}
    )
    assert_error(unknown, 500, f'ServiceID "{unique_name}-nosuch" does not exist')
    assert_error(
        await agent.http.put(register, {"TTL": "10s"}), 400, "Missing check name"
    )
    assert_error(
        await agent.http.put(register, {"Name": "c"}),
        400,
        "Invalid check: TTL must be > 0 for TTL checks",
    )
    assert_error(
        await agent.http.put(register, {"Name": "c", "TTL": "1s", "Status": "bogus"}),
        400,
        "Bad check status",
    )
    assert_error(
        await agent.http.put(register, {"Name": "c", "CheckID": "x", "TTL": "1s"}),
        400,
        'Request decode failed: json: unknown field "CheckID"',
    )
    gone = await agent.http.put(f"/v1/agent/check/deregister/{unique_name}-nosuch")
    assert_empty_write(gone)
    assert_error(
        await agent.http.put("/v1/agent/check/deregister/"), 500, "CheckID missing"
    )


@pytest_twisted.ensureDeferred
async def test_check_register_for_a_service(
    agent: AgentUnderTest, unique_name: str
) -> None:
    await register_ttl(agent, unique_name)
    check_id = f"{unique_name}-extra"
    try:
        put = await agent.http.put(
            "/v1/agent/check/register",
            {
                "Name": "extra",
                "ID": check_id,
                "ServiceID": unique_name,
                "TTL": "10s",
                "Status": "passing",
            },
        )
        assert_empty_write(put)
        check = (await agent.http.get("/v1/agent/checks")).json()[check_id]
        assert (check["Name"], check["Status"], check["Type"]) == (
            "extra",
            "passing",
            "ttl",
        )
        assert (check["ServiceID"], check["ServiceName"]) == (unique_name, unique_name)
        assert_empty_write(
            await agent.http.put(f"/v1/agent/check/deregister/{check_id}")
        )
        assert check_id not in (await agent.http.get("/v1/agent/checks")).json()
    finally:
        await agent.client.deregister_service(unique_name)


@pytest_twisted.ensureDeferred
async def test_connect_reads_ignore_tag(
    agent: AgentUnderTest, unique_name: str
) -> None:
    # Measured on 1.8.7: ?tag= filters health/service and catalog/service but
    # is dropped on health/connect and catalog/connect.
    for sid, tags in ((f"{unique_name}-1", ["primary"]), (f"{unique_name}-2", ["b"])):
        await agent.http.put(
            "/v1/agent/service/register",
            {
                "Name": unique_name,
                "ID": sid,
                "Tags": tags,
                "Port": 1,
                "Connect": {"Native": True},
            },
        )
    try:
        for path in ("health/connect", "catalog/connect"):
            got = (await agent.http.get(f"/v1/{path}/{unique_name}?tag=primary")).json()
            assert len(got) == 2, path
        for path in ("health/service", "catalog/service"):
            got = (await agent.http.get(f"/v1/{path}/{unique_name}?tag=Primary")).json()
            assert len(got) == 1, path
    finally:
        for n in (1, 2):
            await agent.client.deregister_service(f"{unique_name}-{n}")


@pytest_twisted.ensureDeferred
async def test_ca_private_key_alone_and_back_to_a_generated_root(
    fresh_agent: AgentUnderTest,
) -> None:
    agent = fresh_agent
    path = "/v1/connect/ca/configuration"
    td = (await agent.client.agent_ca_roots()).value.trust_domain
    key_pem, root_pem, _cert = new_root(td)
    other_key = new_key_pem()

    async def roots() -> dict[str, Any]:
        return (await agent.http.get("/v1/connect/ca/roots")).json()  # type: ignore[no-any-return]

    put = agent.http.put
    assert_empty_write(
        await put(
            path,
            {
                "Provider": "consul",
                "Config": {"PrivateKey": key_pem, "RootCert": root_pem},
            },
        )
    )
    assert_empty_write(
        await put(path, {"Provider": "consul", "Config": {"PrivateKey": other_key}})
    )
    body = await roots()
    assert len(body["Roots"]) == 3
    (active,) = [r for r in body["Roots"] if r["Active"]]
    (cert,) = load_pems(active["RootCert"])
    assert (
        cert.public_key()
        == serialization.load_pem_private_key(other_key.encode(), None).public_key()
    )
    assert len(active["IntermediateCerts"]) == 1
    assert_empty_write(await put(path, {"Provider": "consul", "Config": {}}))
    body = await roots()
    assert len(body["Roots"]) == 4
    assert body["ActiveRootID"] not in {active["ID"]}
    assert_empty_write(await put(path, {"Provider": "consul", "Config": {}}))
    assert len((await roots())["Roots"]) == 4
    assert_error(
        await put(path, {"Provider": "consul", "Config": {"PrivateKey": "garbage"}}),
        500,
        "error generating CA root certificate: error generating CA: error parsing "
        'private key "garbage": no PEM-encoded data found',
    )
    # The first supplied root again: active once more, listed once.
    assert_empty_write(
        await put(
            path,
            {
                "Provider": "consul",
                "Config": {"PrivateKey": key_pem, "RootCert": root_pem},
            },
        )
    )
    body = await roots()
    assert len(body["Roots"]) == 4
    ids = [r["ID"] for r in body["Roots"]]
    assert len(set(ids)) == 4


@pytest_twisted.ensureDeferred
async def test_filter_on_the_five_reads(
    agent: AgentUnderTest, unique_name: str
) -> None:
    # ?filter= (bexpr), as measured on 1.8.7 (filter-*.http): the agent
    # filters each answer's elements; Checks in health answers match when
    # any element does; a missing Meta key is != anything.
    regs = (
        (f"{unique_name}-1", ["v1"], {"env": "prod"}, "passing"),
        (f"{unique_name}-2", ["v2"], {}, "critical"),
    )
    for sid, tags, meta, status in regs:
        await agent.http.put(
            "/v1/agent/service/register",
            {
                "Name": unique_name,
                "ID": sid,
                "Tags": tags,
                "Meta": meta,
                "Port": 1,
                "Connect": {"Native": True},
                "Check": {"CheckID": f"{sid}-ttl", "TTL": "30m", "Status": status},
            },
        )

    async def ids(path: str, expression: str) -> list[str]:
        answer = await agent.http.get(f"{path}?filter={quote(expression)}")
        assert answer.status == 200, answer.text
        body = answer.json()
        if isinstance(body, dict):  # agent/services by ID, agent/checks by CheckID
            body = list(body.values())
        found = (
            e["Service"] if isinstance(e.get("Service"), dict) else e for e in body
        )
        return sorted(
            sid
            for e in found
            if (sid := e.get("ServiceID") or e["ID"]).startswith(unique_name)
        )

    one, two = (r[0] for r in regs)
    try:
        assert await ids(
            "/v1/agent/services", f'Service == "{unique_name}" and v1 in Tags'
        ) == [one]
        assert await ids(
            "/v1/agent/services",
            f'Service == "{unique_name}" and not (Meta.env == prod)',
        ) == [two]
        assert await ids(
            "/v1/agent/checks", f'ServiceName == "{unique_name}" and Status == critical'
        ) == [two]
        for path in (
            f"/v1/health/service/{unique_name}",
            f"/v1/health/connect/{unique_name}",
        ):
            assert await ids(path, "Checks.Status == critical") == [two], path
            assert await ids(path, "Service.Meta is empty or v2 in Service.Tags") == [
                two
            ]
        catalog = f"/v1/catalog/service/{unique_name}"
        assert await ids(catalog, 'ServiceMeta.env != "prod"') == [two]
        assert await ids(catalog, "ServiceTags contains v1") == [one]
        # A malformed or invalid expression: 500 and the evaluator's text.
        wrapped = "Failed to create boolean expression evaluator: "
        for path, expression, text in (
            (
                catalog,
                "ServiceID ==",
                wrapped + "1:13 (12): no match found, expected: "
                '"-", "0", "\\"", "`", [ \\t\\r\\n], [1-9] or [a-zA-Z]',
            ),
            (
                "/v1/agent/services",
                "Nope == x",
                wrapped + 'Selector "Nope" is not valid',
            ),
            ("/v1/agent/checks", "Service == x", 'Selector "Service" is not valid'),
        ):
            answer = await agent.http.get(f"{path}?filter={quote(expression)}")
            assert (answer.status, answer.text) == (500, text), path
    finally:
        for sid, *_ in regs:
            await agent.client.deregister_service(sid)
