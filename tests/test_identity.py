"""
Tests for connect_native.identity: Consul's SPIFFE IDs, parsed, formatted,
compared, and read from certificates.
"""

from __future__ import annotations

import datetime
import importlib
import json
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from connect_native.identity import (
    AgentIdentity,
    InvalidIdentity,
    ServiceIdentity,
    SigningIdentity,
    identity_of_certificate,
    normalize_trust_domain,
    parse_spiffe_id,
    spiffe_uris,
)
from connect_native.testing import (
    agent_identities,
    identity_names,
    service_identities,
    signing_identities,
    spiffe_ids,
    trust_domains,
)
from tests.captures import load
from tests.consul_agent import RealConsulAgent

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "real-1.8.7"
TD = "35fbb6e4-f678-8abb-17a1-d9437ce1a4b3.consul"
TESTDATA_TD = "11111111-2222-3333-4444-555555555555.consul"


def pem_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


_KEY = ec.generate_private_key(ec.SECP256R1())


def make_cert(sans: list[x509.GeneralName] | None) -> x509.Certificate:
    """
    A self-signed certificate with the given SANs (or no SAN extension), for
    the shapes Consul never issues.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")]))
        .public_key(_KEY.public_key())
        .serial_number(0x2A)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if sans is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=True
        )
    return builder.sign(_KEY, hashes.SHA256())


def uri_san(uri: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(uri)


# --- the service form ---


def test_service_uri_formats_consul_default_partition_form() -> None:
    identity = ServiceIdentity(TD, "default", "dc1", "web")
    assert identity.uri == f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    assert str(identity) == identity.uri


def test_service_parse_reads_each_field() -> None:
    identity = ServiceIdentity.parse(f"spiffe://{TD}/ns/team/dc/dc2/svc/db")
    assert identity == ServiceIdentity(
        trust_domain=TD, namespace="team", datacenter="dc2", service="db"
    )
    assert identity.partition is None


def test_service_partition_form_round_trips() -> None:
    uri = f"spiffe://{TD}/ap/part1/ns/default/dc/dc1/svc/web"
    identity = ServiceIdentity.parse(uri)
    assert identity.partition == "part1"
    assert identity.uri == uri


@pytest.mark.parametrize("partition", [None, "", "default", "DEFAULT", "Default"])
def test_default_partition_is_none_and_omitted_from_the_uri(
    partition: str | None,
) -> None:
    identity = ServiceIdentity(TD, "default", "dc1", "web", partition=partition)
    assert identity.partition is None
    assert "/ap/" not in identity.uri


def test_explicit_default_partition_in_a_uri_parses_as_the_default() -> None:
    identity = ServiceIdentity.parse(
        f"spiffe://{TD}/ap/default/ns/default/dc/dc1/svc/w"
    )
    assert identity == ServiceIdentity(TD, "default", "dc1", "w")


def test_partition_is_lower_cased_as_consul_formats_it() -> None:
    identity = ServiceIdentity(TD, "default", "dc1", "web", partition="Part1")
    assert identity.partition == "part1"
    assert identity.uri == f"spiffe://{TD}/ap/part1/ns/default/dc/dc1/svc/web"


@pytest.mark.parametrize(
    ("service", "escaped"),
    [
        # What real Consul 1.8.7 put in the leaf URI SANs (leaf-name-*.http).
        ("a b", "a%20b"),
        ("ünï", "%C3%BCn%C3%AF"),
        ("Web", "Web"),
        ("a.b", "a.b"),
        ("a_b", "a_b"),
        # Go's path escaping keeps these; "/" must be escaped in a segment.
        ("$&+,:;=@", "$&+,:;=@"),
        ("a/b", "a%2Fb"),
        ("100%", "100%25"),
        ("q?#", "q%3F%23"),
        # Dot segments would vanish under URI normalization.
        (".", "%2E"),
        ("..", "%2E%2E"),
    ],
)
def test_service_name_is_percent_escaped_and_keeps_its_case(
    service: str, escaped: str
) -> None:
    identity = ServiceIdentity(TD, "default", "dc1", service)
    assert identity.uri == f"spiffe://{TD}/ns/default/dc/dc1/svc/{escaped}"
    assert ServiceIdentity.parse(identity.uri) == identity


def test_parse_accepts_lower_case_hex_and_escaped_unreserved_characters() -> None:
    identity = ServiceIdentity.parse(f"spiffe://{TD}/ns/default/dc/dc1/svc/%c3%bc%41")
    assert identity.service == "üA"


def test_namespace_and_datacenter_are_unescaped_too() -> None:
    identity = ServiceIdentity.parse(f"spiffe://{TD}/ns/foo%2Fbar/dc/d%20c/svc/web")
    assert (identity.namespace, identity.datacenter) == ("foo/bar", "d c")


# --- the agent and CA forms ---


def test_agent_uri_format_and_parse() -> None:
    uri = f"spiffe://{TD}/agent/client/dc/dc1/id/0b1e6c2a-node"
    identity = AgentIdentity.parse(uri)
    assert identity == AgentIdentity(TD, "dc1", "0b1e6c2a-node")
    assert identity.uri == uri


def test_agent_partition_form() -> None:
    uri = f"spiffe://{TD}/ap/p1/agent/client/dc/dc1/id/n1"
    identity = AgentIdentity.parse(uri)
    assert identity.partition == "p1"
    assert identity.uri == uri


def test_signing_identity_is_the_trust_domain_alone() -> None:
    identity = SigningIdentity.parse(f"spiffe://{TD}")
    assert identity == SigningIdentity(TD)
    assert identity.uri == f"spiffe://{TD}"


def test_service_signing_identity_has_its_trust_domain() -> None:
    assert ServiceIdentity(TD, "default", "dc1", "w").signing_identity == (
        SigningIdentity(TD)
    )


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/web", ServiceIdentity),
        (f"spiffe://{TD}/agent/client/dc/dc1/id/n", AgentIdentity),
        (f"spiffe://{TD}", SigningIdentity),
    ],
)
def test_parse_spiffe_id_returns_the_matching_kind(uri: str, kind: type) -> None:
    identity = parse_spiffe_id(uri)
    assert type(identity) is kind
    assert identity.uri == uri


@pytest.mark.parametrize(
    ("parser", "uri", "message"),
    [
        (
            ServiceIdentity.parse,
            f"spiffe://{TD}/agent/client/dc/dc1/id/n",
            "is an agent identity, not a service identity",
        ),
        (
            ServiceIdentity.parse,
            f"spiffe://{TD}",
            "is the CA signing identity, not a service identity",
        ),
        (
            AgentIdentity.parse,
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web",
            "is a service identity, not an agent identity",
        ),
        (
            SigningIdentity.parse,
            f"spiffe://{TD}/ns/default/dc/dc1/svc/web",
            "is a service identity, not a CA signing identity",
        ),
    ],
)
def test_class_parse_rejects_the_other_forms(
    parser: object, uri: str, message: str
) -> None:
    with pytest.raises(InvalidIdentity, match=message) as info:
        parser(uri)  # type: ignore[operator]
    assert uri in str(info.value)
    assert info.value.value == uri


# --- strict rejection ---

SVC = f"spiffe://{TD}/ns/default/dc/dc1/svc/web"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "SPIFFE ID is empty"),
        ("web", "has no scheme"),
        (
            "http://" + TD + "/ns/default/dc/dc1/svc/web",
            "scheme is 'http', not 'spiffe'",
        ),
        ("SPIFFE://" + TD, "scheme 'SPIFFE' must be lower-case 'spiffe'"),
        ("spiffe:" + TD, "has no trust domain"),
        ("spiffe:///ns/default/dc/dc1/svc/web", "has an empty trust domain"),
        ("spiffe://", "has an empty trust domain"),
        (f"spiffe://user@{TD}/ns/default/dc/dc1/svc/web", r"user information \('@'\)"),
        (f"spiffe://{TD}:8500/ns/default/dc/dc1/svc/web", "has a port"),
        ("spiffe://[::1]/ns/default/dc/dc1/svc/web", "IP literal"),
        (SVC + "?x=1", r"has a query \('\?'\)"),
        (SVC + "?", r"has a query"),
        (SVC + "#frag", r"has a fragment \('#'\)"),
        (SVC + "/", "empty path segment at position 7"),
        (f"spiffe://{TD}/", "empty path segment at position 1"),
        (f"spiffe://{TD}/ns//dc/dc1/svc/web", "empty path segment at position 2"),
        (f"spiffe://{TD}/ns/default/dc/dc1/svc", "has 5 path segments"),
        (SVC + "/extra", "has 7 path segments"),
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/a/b", "has 7 path segments"),
        (f"spiffe://{TD}/ns/default/DC/dc1/svc/web", "segment 3 is 'DC'"),
        (f"spiffe://{TD}/ns/default/dc/dc1/service/web", "segment 5 is 'service'"),
        (f"spiffe://{TD}/NS/default/dc/dc1/svc/web", "path segment 1 is 'NS'"),
        (f"spiffe://{TD}/n%73/default/dc/dc1/svc/web", "path segment 1 is 'n%73'"),
        (f"spiffe://{TD}/agent/client/dc/dc1/node/n", "segment 5 is 'node'"),
        (f"spiffe://{TD}/agent/client/dc/dc1/id", "has 5 path segments"),
        (f"spiffe://{TD}/agent/server/dc/dc1", "Consul server identity"),
        (f"spiffe://{TD}/gateway/mesh/dc/dc1", "Consul gateway identity"),
        (f"spiffe://{TD}/ap", "'/ap' with no partition"),
        (f"spiffe://{TD}/ap/p1", "partition but nothing after it"),
        (f"spiffe://{TD}/ap/p1/ap/p2/ns/a/dc/b/svc/c", "path segment 3 is 'ap'"),
        (f"spiffe://{TD}/svc/web", "not in a Consul format: path segment 1"),
        (SVC[:-3] + "w%zz", "bad percent escape '%zz' in path segment 6"),
        (SVC[:-3] + "w%4", "bad percent escape '%4' in path segment 6"),
        (SVC[:-3] + "w%", "bad percent escape '%' in path segment 6"),
        (SVC[:-3] + "%C3", "percent escapes are not UTF-8"),
        (SVC[:-3] + "%FF%FE", "percent escapes are not UTF-8"),
        (SVC[:-3] + "a b", "contains ' ' at position"),
        (SVC[:-3] + "ünï", "contains 'ü' at position"),
        (SVC + "\n", r"contains '\\n' at position"),
        (SVC[:-3] + "a<b", "has '<' in path segment 6"),
        (SVC[:-3] + "a%3Cb\\", r"has '\\\\' in path segment 6"),
        (SVC[:-3] + "..", "dot segment '..' at path segment 6"),
        (f"spiffe://{TD}/ns/./dc/dc1/svc/web", "dot segment '.' at path segment 2"),
        ("spiffe://exa%6Dple.consul", "a percent escape"),
        ("spiffe://-bad.consul", "invalid label '-bad'"),
        ("spiffe://bad..consul", "empty label at position 2"),
        ("spiffe://bad.consul.", "empty label at position 3"),
        ("spiffe://b!d.consul", "invalid label 'b!d'"),
        ("spiffe://" + "a" * 64 + ".consul", "invalid label"),
    ],
)
def test_parse_rejects_with_a_message_saying_what_is_wrong(
    uri: str, message: str
) -> None:
    with pytest.raises(InvalidIdentity, match=message) as info:
        parse_spiffe_id(uri)
    assert info.value.value == uri
    if uri:
        assert repr(uri)[:50] in str(info.value)


@pytest.mark.parametrize("uri", [None, b"spiffe://a.consul", 42])
def test_parse_rejects_non_strings(uri: object) -> None:
    with pytest.raises(InvalidIdentity, match="must be a str"):
        parse_spiffe_id(uri)  # type: ignore[arg-type]


def test_error_messages_cut_huge_inputs_short() -> None:
    uri = SVC[:-3] + "x" * 100_000 + " "
    with pytest.raises(InvalidIdentity) as info:
        parse_spiffe_id(uri)
    assert len(str(info.value)) < 1000
    assert "(truncated)" in str(info.value)


# --- trust domains ---


def test_normalize_trust_domain_lower_cases() -> None:
    assert normalize_trust_domain("8C352D6F-AAAA.Consul") == "8c352d6f-aaaa.consul"


def test_trust_domain_compares_case_insensitively_in_records() -> None:
    upper = ServiceIdentity.parse(f"spiffe://{TD.upper()}/ns/default/dc/dc1/svc/web")
    assert upper == ServiceIdentity(TD, "default", "dc1", "web")
    assert upper.uri == f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
    assert SigningIdentity(TD.upper()) == SigningIdentity(TD)


@pytest.mark.parametrize(
    ("td", "message"),
    [
        ("", "trust domain is empty"),
        ("exämple.consul", "non-ASCII"),
        ("a.consul:8500", r"a port \(':'\)"),
        ("u@a.consul", r"user information \('@'\)"),
        ("a%2Eb", "a percent escape"),
        (".consul", "empty label at position 1"),
        ("a.consul.", "empty label at position 3"),
        ("a b.consul", "invalid label 'a b'"),
        ("a-.consul", "invalid label 'a-'"),
        ("a/b", "invalid label 'a/b'"),
        ("x" * 64, "invalid label"),
        ("a." * 128, "at most 255"),
    ],
)
def test_normalize_trust_domain_rejects(td: str, message: str) -> None:
    with pytest.raises(InvalidIdentity, match=message):
        normalize_trust_domain(td)


def test_normalize_trust_domain_rejects_non_strings() -> None:
    with pytest.raises(InvalidIdentity, match="trust domain must be a str"):
        normalize_trust_domain(None)  # type: ignore[arg-type]


def test_underscores_and_single_labels_are_accepted() -> None:
    assert normalize_trust_domain("my_cluster") == "my_cluster"


# --- constructing records ---


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"namespace": ""}, "namespace is empty"),
        ({"datacenter": ""}, "datacenter is empty"),
        ({"service": ""}, "service is empty"),
        ({"service": None}, "service must be a str, not NoneType"),
        ({"service": "\udcff"}, "service '\\\\udcff' cannot be encoded as UTF-8"),
        ({"partition": 3}, "partition must be a str, not int"),
        ({"trust_domain": "bad domain"}, "invalid label 'bad domain'"),
    ],
)
def test_service_identity_rejects_bad_fields(
    kwargs: dict[str, object], message: str
) -> None:
    fields: dict[str, object] = {
        "trust_domain": TD,
        "namespace": "default",
        "datacenter": "dc1",
        "service": "web",
    }
    fields.update(kwargs)
    with pytest.raises(InvalidIdentity, match=message):
        ServiceIdentity(**fields)  # type: ignore[arg-type]


def test_agent_identity_rejects_an_empty_agent() -> None:
    with pytest.raises(InvalidIdentity, match="agent is empty"):
        AgentIdentity(TD, "dc1", "")


def test_records_are_frozen() -> None:
    identity = ServiceIdentity(TD, "default", "dc1", "web")
    with pytest.raises(AttributeError):
        identity.service = "db"  # type: ignore[misc]


# --- matches: as Consul's Go library compares a peer ---

WEB = ServiceIdentity(TD, "default", "dc1", "web")


@pytest.mark.parametrize(
    "peer",
    [
        WEB,
        ServiceIdentity(TD, "default", "dc1", "WEB"),
        ServiceIdentity(TD, "Default", "DC1", "Web"),
        ServiceIdentity(TD.upper(), "default", "dc1", "web"),
        ServiceIdentity(TD, "default", "dc1", "web", partition="default"),
    ],
)
def test_matches_ignores_ascii_case_and_the_default_partition_spelling(
    peer: ServiceIdentity,
) -> None:
    assert peer.matches(WEB)
    assert WEB.matches(peer)


@pytest.mark.parametrize(
    "peer",
    [
        ServiceIdentity(TD, "default", "dc1", "db"),
        ServiceIdentity(TD, "team", "dc1", "web"),
        ServiceIdentity(TD, "default", "dc2", "web"),
        ServiceIdentity(TD, "default", "dc1", "web", partition="p1"),
        ServiceIdentity(TESTDATA_TD, "default", "dc1", "web"),
        ServiceIdentity(TD, "default", "dc1", "web2"),
    ],
)
def test_matches_rejects_a_different_field(peer: ServiceIdentity) -> None:
    assert not peer.matches(WEB)
    assert not WEB.matches(peer)


def test_matches_compares_non_ascii_exactly() -> None:
    # Go's EqualFold runs on escaped URIs, where ü and Ü are different escapes.
    lower = ServiceIdentity(TD, "default", "dc1", "ünï")
    assert lower.matches(ServiceIdentity(TD, "default", "dc1", "ÜNÏ")) is False
    assert lower.matches(ServiceIdentity(TD, "default", "dc1", "üNï")) is True


def test_matches_refuses_a_non_service_expectation() -> None:
    with pytest.raises(TypeError, match="expected must be a ServiceIdentity"):
        WEB.matches(AgentIdentity(TD, "dc1", "web"))  # type: ignore[arg-type]


# --- certificates ---


def test_identity_of_the_real_consul_leaf() -> None:
    cert = pem_cert(REAL / "leaf-web.pem")
    assert identity_of_certificate(cert) == ServiceIdentity(TD, "default", "dc1", "web")


@pytest.mark.parametrize(
    ("name", "service"),
    [
        ("ca1-svc-web.cert.pem", "web"),
        ("ca1-svc-db.cert.pem", "db"),
        ("ca2-svc-web.cert.pem", "web"),
        ("ca2-svc-db.cert.pem", "db"),
    ],
)
def test_identity_of_consul_testdata_leaves(name: str, service: str) -> None:
    cert = pem_cert(FIXTURES / "pem" / "connect-testdata" / name)
    assert identity_of_certificate(cert) == ServiceIdentity(
        TESTDATA_TD, "default", "dc01", service
    )


def test_leaves_from_real_consul_name_captures() -> None:
    # Consul mangles the CN ("a b" -> "ab"); the URI SAN keeps the name.
    seen = 0
    for path in sorted(REAL.glob("leaf-name-*.http")):
        _, status, _, body = load(path)
        if status != 200:
            continue
        leaf = json.loads(body)
        cert = x509.load_pem_x509_certificates(leaf["CertPEM"].encode())[0]
        identity = identity_of_certificate(cert)
        assert identity.service == leaf["Service"], path.name
        assert identity == ServiceIdentity.parse(leaf["ServiceURI"]), path.name
        # Our formatting reproduces Consul's string exactly.
        assert identity.uri == leaf["ServiceURI"], path.name
        seen += 1
    assert seen >= 6


@pytest.mark.parametrize(
    "path",
    [
        REAL / "root.pem",
        REAL / "rotation-new-root.pem",
        FIXTURES / "pem" / "connect-testdata" / "ca1-ca-consul-internal.cert.pem",
        FIXTURES / "pem" / "connect-testdata" / "ca2-xc-by-ca1.cert.pem",
    ],
)
def test_a_ca_certificate_is_not_a_service(path: Path) -> None:
    cert = pem_cert(path)
    with pytest.raises(InvalidIdentity, match="carries the CA signing identity"):
        identity_of_certificate(cert)
    assert isinstance(parse_spiffe_id(spiffe_uris(cert)[0]), SigningIdentity)


def test_real_root_carries_the_trust_domain_as_its_signing_identity() -> None:
    (uri,) = spiffe_uris(pem_cert(REAL / "root.pem"))
    assert SigningIdentity.parse(uri) == SigningIdentity(TD)


def test_certificate_without_a_san_extension() -> None:
    with pytest.raises(InvalidIdentity, match="has no spiffe:// URI SAN") as info:
        identity_of_certificate(make_cert(None))
    assert "CN=web" in str(info.value)
    assert "serial 0x2a" in str(info.value)


def test_certificate_with_only_non_spiffe_sans() -> None:
    cert = make_cert(
        [x509.DNSName("web.service.consul"), uri_san("https://web.example/")]
    )
    assert spiffe_uris(cert) == []
    with pytest.raises(InvalidIdentity, match="has no spiffe:// URI SAN"):
        identity_of_certificate(cert)


def test_other_uri_sans_beside_the_spiffe_id_are_ignored() -> None:
    cert = make_cert([uri_san("https://web.example/"), uri_san(SVC)])
    assert spiffe_uris(cert) == [SVC]
    assert identity_of_certificate(cert) == WEB


def test_certificate_with_two_spiffe_ids_is_ambiguous() -> None:
    other = f"spiffe://{TD}/ns/default/dc/dc1/svc/admin"
    cert = make_cert([uri_san(SVC), uri_san(other)])
    with pytest.raises(InvalidIdentity, match="has 2 spiffe:// URI SANs") as info:
        identity_of_certificate(cert)
    assert SVC in str(info.value)
    assert other in str(info.value)


def test_a_mis_cased_spiffe_scheme_counts_and_makes_the_identity_ambiguous() -> None:
    cert = make_cert([uri_san(SVC), uri_san(f"SPIFFE://{TD}/ns/default/dc/dc1/svc/x")])
    assert len(spiffe_uris(cert)) == 2
    with pytest.raises(InvalidIdentity, match="has 2 spiffe:// URI SANs"):
        identity_of_certificate(cert)


def test_certificate_with_an_agent_identity() -> None:
    agent = f"spiffe://{TD}/agent/client/dc/dc1/id/node-1"
    with pytest.raises(InvalidIdentity, match="carries the agent identity"):
        identity_of_certificate(make_cert([uri_san(agent)]))


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        (f"spiffe://{TD}/ns/default/dc/dc1/svc/a/b", "has 7 path segments"),
        (f"spiffe://{TD}/whatever", "not in a Consul format"),
        (f"spiffe://{TD}:1/ns/default/dc/dc1/svc/web", "has a port"),
        ("spiffe:garbage", "has no trust domain"),
    ],
)
def test_certificate_with_a_garbage_spiffe_id(uri: str, reason: str) -> None:
    with pytest.raises(
        InvalidIdentity, match="has an invalid SPIFFE ID in its URI SAN"
    ) as info:
        identity_of_certificate(make_cert([uri_san(uri)]))
    assert reason in str(info.value)


# --- Hypothesis round trips ---


@given(spiffe_ids())
def test_parse_inverts_format(
    identity: ServiceIdentity | AgentIdentity | SigningIdentity,
) -> None:
    assert parse_spiffe_id(identity.uri) == identity


@given(service_identities())
def test_service_round_trip_through_its_class(identity: ServiceIdentity) -> None:
    assert ServiceIdentity.parse(identity.uri) == identity
    assert ServiceIdentity.parse(identity.uri).uri == identity.uri


@given(agent_identities())
def test_agent_round_trip_through_its_class(identity: AgentIdentity) -> None:
    assert AgentIdentity.parse(identity.uri) == identity


@given(signing_identities())
def test_signing_round_trip_through_its_class(identity: SigningIdentity) -> None:
    assert SigningIdentity.parse(identity.uri) == identity


@given(spiffe_ids())
def test_formatted_uris_are_plain_ascii_uris(
    identity: ServiceIdentity | AgentIdentity | SigningIdentity,
) -> None:
    uri = identity.uri
    assert uri.isascii()
    assert all("!" <= c <= "~" for c in uri)
    assert "?" not in uri
    assert "#" not in uri


@given(identity_names(), identity_names(), identity_names(), trust_domains())
def test_any_names_round_trip_as_a_service(
    namespace: str, datacenter: str, service: str, td: str
) -> None:
    identity = ServiceIdentity(td, namespace, datacenter, service)
    parsed = ServiceIdentity.parse(identity.uri)
    assert (parsed.namespace, parsed.datacenter, parsed.service) == (
        namespace,
        datacenter,
        service,
    )
    assert parsed.trust_domain == td.lower()


@given(service_identities())
def test_matches_is_reflexive_and_ignores_ascii_case_of_the_service(
    identity: ServiceIdentity,
) -> None:
    assert identity.matches(identity)
    swapped = ServiceIdentity(
        identity.trust_domain.upper(),
        identity.namespace,
        identity.datacenter,
        "".join(c.swapcase() if c.isascii() else c for c in identity.service),
        identity.partition,
    )
    assert swapped.matches(identity)


@given(st.text(max_size=80))
def test_parse_of_any_text_fails_closed_with_invalid_identity(text: str) -> None:
    try:
        identity = parse_spiffe_id(text)
    except InvalidIdentity:
        return
    assert parse_spiffe_id(identity.uri) == identity


@given(st.text(alphabet="/%a.:@?#nsdcvpgtl2FC", max_size=40))
def test_parse_of_near_miss_paths_fails_closed(path: str) -> None:
    uri = f"spiffe://{TD}{path}"
    try:
        identity = parse_spiffe_id(uri)
    except InvalidIdentity as e:
        message = str(e)
    else:
        assert parse_spiffe_id(identity.uri) == identity
        return
    assert repr(uri)[:50] in message


@given(service_identities())
def test_identity_of_a_certificate_carrying_any_service_id(
    identity: ServiceIdentity,
) -> None:
    assert identity_of_certificate(make_cert([uri_san(identity.uri)])) == identity


# --- connect_native.testing without hypothesis ---


def test_testing_module_imports_without_hypothesis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "connect_native.testing")
    for name in [m for m in sys.modules if m.split(".")[0] == "hypothesis"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    module = importlib.import_module("connect_native.testing")
    assert callable(module.service_identities)
    with pytest.raises(ImportError):
        module.service_identities()


# --- real Consul 1.8.7 ---


def test_real_consul_leaf_identity_for_an_awkward_name(
    real_consul: RealConsulAgent, unique_name: str
) -> None:
    name = f"{unique_name} Ünï"
    status, body = real_consul.request(
        "GET", f"/v1/agent/connect/ca/leaf/{quote(name, safe='')}"
    )
    assert status == 200, body
    leaf = json.loads(body)
    status, body = real_consul.request("GET", "/v1/agent/connect/ca/roots")
    assert status == 200, body
    roots = json.loads(body)

    cert = x509.load_pem_x509_certificates(leaf["CertPEM"].encode())[0]
    identity = identity_of_certificate(cert)
    assert identity == ServiceIdentity(roots["TrustDomain"], "default", "dc1", name)
    assert identity.uri == leaf["ServiceURI"]
    (root,) = [r for r in roots["Roots"] if r["Active"]]
    (root_uri,) = spiffe_uris(x509.load_pem_x509_certificate(root["RootCert"].encode()))
    assert SigningIdentity.parse(root_uri) == identity.signing_identity
