"""
Nothing sent to the development agent can crash it: any method, path, query
and body gets an HTTP answer, never an internal error, and the agent keeps
answering afterwards.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_devagent_support import Harness

PATHS = [
    "/v1/agent/self",
    "/v1/agent/services",
    "/v1/agent/service/",
    "/v1/agent/service/register",
    "/v1/agent/service/deregister/",
    "/v1/agent/checks",
    "/v1/agent/check/pass/",
    "/v1/agent/check/update/",
    "/v1/agent/connect/authorize",
    "/v1/agent/connect/ca/roots",
    "/v1/agent/connect/ca/leaf/",
    "/v1/connect/ca/roots",
    "/v1/connect/ca/configuration",
    "/v1/connect/intentions",
    "/v1/connect/intentions/",
    "/v1/connect/intentions/match",
    "/v1/connect/intentions/check",
    "/v1/health/service/",
    "/v1/health/connect/",
    "/v1/",
    "/",
]
QUERY_KEYS = [
    "index",
    "wait",
    "passing",
    "by",
    "name",
    "source",
    "destination",
    "dc",
    "stale",
    "consistent",
    "cached",
    "hash",
    "note",
    "tag",
    "max_stale",
    "replace-existing-checks",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda c: (
        st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=20), c, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "Name",
        "ID",
        "Port",
        "Kind",
        "Check",
        "Checks",
        "Connect",
        "Proxy",
        "Meta",
        "Tags",
        "Weights",
        "Target",
        "ClientCertURI",
        "SourceName",
        "DestinationName",
        "Action",
        "Provider",
        "Config",
        "Status",
        "Output",
        "TTL",
    ]
)
bodies = st.binary(max_size=120) | st.dictionaries(
    field_names | st.text(max_size=10), json_values, max_size=5
).map(lambda d: json.dumps(d).encode())


def _alive(h: Harness) -> None:
    assert h.get("/v1/agent/self").status == 200


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"]),
    path=st.sampled_from(PATHS),
    tail=st.text(max_size=20),
    query=st.lists(
        st.tuples(st.sampled_from(QUERY_KEYS), st.text(max_size=12)), max_size=4
    ),
    body=bodies,
)
def test_any_request_gets_an_answer(
    method: str, path: str, tail: str, query: list[tuple[str, str]], body: bytes
) -> None:
    h = Harness()
    qs = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query)
    url = path + quote(tail, safe="") + ("?" + qs if qs else "")
    pending = h.start(method, url, body)
    h.advance(700)
    if not pending.done:
        # Only agent-cache reads at the current index may block for ever.
        assert path in ("/v1/agent/connect/ca/roots", "/v1/agent/connect/ca/leaf/")
        assert any(k == "index" for k, _ in query)
        pending.cancel()
        _alive(h)
        return
    answer = pending.answer()
    assert not answer.text.startswith("dev agent internal error"), (url, answer.text)
    assert answer.status in (200, 301, 400, 403, 404, 405, 500)
    assert _admitted_500(answer), (method, url, body, answer.text)
    _alive(h)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(body=bodies)
def test_registration_bodies_never_break_the_agent(body: bytes) -> None:
    h = Harness()
    answer = h.put("/v1/agent/service/register", body)
    assert not answer.text.startswith("dev agent internal error"), answer.text
    assert h.get("/v1/agent/services").status == 200
    assert h.get("/v1/health/service/x").status == 200
    _alive(h)


NASTY = [
    ("GET", "/v1/agent/connect/ca/leaf/%ff", None),
    ("GET", "/v1/agent/connect/ca/leaf/" + "x" * 5000, None),
    ("PUT", "/v1/agent/check/pass/x%00y", None),
    ("PUT", "/v1/agent/service/register", {"Name": "w", "Checks": [None]}),
    ("PUT", "/v1/agent/service/register", {"Name": "w", "Port": 99999999999}),
    (
        "PUT",
        "/v1/agent/service/register",
        {"Name": "w", "TaggedAddresses": {"l": None}},
    ),
    ("PUT", "/v1/agent/service/register", {"Name": "w", "Check": {"TTL": "1ns"}}),
    (
        "PUT",
        "/v1/agent/service/register",
        {
            "Name": "w",
            "Kind": "connect-proxy",
            "Port": 1,
            "Proxy": {"Upstreams": [None]},
        },
    ),
    (
        "POST",
        "/v1/agent/connect/authorize",
        {"Target": "w", "ClientCertURI": "spiffe://[::1/"},
    ),
    (
        "POST",
        "/v1/connect/intentions",
        {
            "SourceName": "a",
            "DestinationName": "b",
            "Action": "allow",
            "Meta": {"k": None},
        },
    ),
    (
        "PUT",
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"PrivateKeyBits": 1e300}},
    ),
    (
        "PUT",
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"LeafCertTTL": [1]}},
    ),
    (
        "PUT",
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"PrivateKey": "x", "RootCert": "y"}},
    ),
    (
        "GET",
        "/v1/connect/intentions/match?by=destination&name=" + "/".join("a" * 3),
        None,
    ),
]


def test_hand_picked_nasty_requests_get_an_answer() -> None:
    for method, path, body in NASTY:
        h = Harness()
        raw = None if body is None else json.dumps(body)
        answer = h.call(method, path, raw)
        assert not answer.text.startswith("dev agent internal error"), (
            path,
            answer.text,
        )
        _alive(h)
        # and a leaf can still be issued afterwards
        assert h.get("/v1/agent/connect/ca/leaf/after").status == 200


def test_huge_or_tiny_leaf_ttl_is_refused_with_the_limits() -> None:
    h = Harness()
    for ttl in (1e30, -5, "0s"):
        answer = h.put(
            "/v1/connect/ca/configuration",
            {
                "Provider": "consul",
                "Config": {"LeafCertTTL": ttl, "SkipValidate": True},
            },
        )
        assert answer.status == 500
        assert "LeafCertTTL above 0 and at most 876000h" in answer.text
    assert h.get("/v1/agent/connect/ca/leaf/web").status == 200


# -- the endpoints of ACLs, prepared queries and the 1.9+ layer ----------------------

from typing import Any  # noqa: E402

import pytest  # noqa: E402
from twisted.logger import globalLogPublisher  # noqa: E402

MASTER = "3b1c5f1e-8a7d-4c3e-9b2a-1f0e2d3c4b5a"
AGENTS = {
    "acl-deny": {"acl_default_policy": "deny", "master_token": MASTER},
    "acl-allow": {"acl_default_policy": "allow", "master_token": MASTER},
    "newer": {"version": "1.10.0"},
    "newer-acl": {
        "version": "1.11.0",
        "acl_default_policy": "deny",
        "master_token": MASTER,
    },
}
NEW_PATHS = [
    "/v1/query",
    "/v1/query/",
    "/v1/query/q/execute",
    "/v1/acl/policy",
    "/v1/acl/token",
    "/v1/config",
    "/v1/config/service-intentions",
    "/v1/config/service-intentions/",
    "/v1/config/",
    "/v1/connect/intentions/exact",
    "/v1/catalog/service/",
    "/v1/catalog/connect/",
    "/v1/agent/connect/authorize",
    "/v1/agent/connect/ca/leaf/",
    "/v1/health/connect/",
    "/v1/connect/intentions/match",
]
NEW_QUERY_KEYS = [
    *QUERY_KEYS,
    "token",
    "limit",
    "connect",
    "cas",
    "source-type",
    "ns",
    "near",
    "filter",
]
new_fields = st.sampled_from(
    [
        "Kind",
        "Sources",
        "Permissions",
        "HTTP",
        "PathExact",
        "PathRegex",
        "Methods",
        "Header",
        "Service",
        "Tags",
        "OnlyPassing",
        "Failover",
        "NearestN",
        "DNS",
        "Template",
        "Rules",
        "Policies",
        "SecretID",
        "ServiceIdentities",
        "Name",
        "Action",
        "SourceName",
        "DestinationName",
    ]
)


def nested(children: Any) -> Any:
    return st.lists(children, max_size=3) | st.dictionaries(
        new_fields | st.text(max_size=8), children, max_size=4
    )


new_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(["allow", "deny", "/", "/a", "GET", "*", "service-intentions"]),
    nested,
    max_leaves=16,
)
new_bodies = (
    st.binary(max_size=80)
    | st.dictionaries(new_fields, new_values, max_size=5).map(
        lambda d: json.dumps(d).encode()
    )
    | st.just(b"{" * 20000)
    | st.just(json.dumps({"Name": "x" * 100000}).encode())
)
tokens = st.sampled_from([None, "", MASTER, "bogus", "Bearer x"])


class _Unhandled:
    """Every ``log.failure`` the agent writes while a test runs."""

    def __init__(self) -> None:
        self.failures: list[Any] = []

    def __call__(self, event: Any) -> None:
        if event.get("log_failure") is not None:
            self.failures.append(event)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    kind=st.sampled_from(sorted(AGENTS)),
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"]),
    path=st.sampled_from(NEW_PATHS),
    tail=st.text(max_size=20),
    query=st.lists(
        st.tuples(st.sampled_from(NEW_QUERY_KEYS), st.text(max_size=12)), max_size=4
    ),
    body=new_bodies,
    token=tokens,
)
def test_any_request_to_any_kind_of_agent_gets_a_plain_answer(
    kind: str,
    method: str,
    path: str,
    tail: str,
    query: list[tuple[str, str]],
    body: bytes,
    token: str | None,
) -> None:
    unhandled = _Unhandled()
    globalLogPublisher.addObserver(unhandled)
    try:
        h = Harness(**AGENTS[kind])  # type: ignore[arg-type]
        h.post("/v1/query", json.dumps({"Name": "q", "Service": {"Service": "s"}}))
        qs = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query)
        url = path + quote(tail, safe="") + ("?" + qs if qs else "")
        headers = {}
        if token is not None:
            headers["X-Consul-Token"] = token
        pending = h.start(method, url, body, headers)
        # Bounded on the clock: past the longest wait only agent-cache
        # reads at their index may still be waiting.
        h.advance(700)
        if not pending.done:
            assert path == "/v1/agent/connect/ca/leaf/"
            pending.cancel()
        else:
            answer = pending.answer()
            assert answer.status in (200, 301, 400, 401, 403, 404, 405, 500), url
            assert not answer.text.startswith("dev agent internal error"), (
                url,
                answer.text,
            )
            assert _admitted_500(answer), (method, url, body, answer.text)
            if answer.status >= 400 and answer.body:
                assert answer.header("Content-Type") == "text/plain; charset=utf-8"
        assert h.get("/v1/agent/connect/ca/roots").status == 200
    finally:
        globalLogPublisher.removeObserver(unhandled)
    assert unhandled.failures == [], [
        f["log_failure"].getTraceback() for f in unhandled.failures
    ]


NEW_NASTY = [
    (
        "PUT",
        "/v1/config",
        {"Kind": "service-intentions", "Name": "a", "Sources": [None]},
    ),
    (
        "PUT",
        "/v1/config",
        {
            "Kind": "service-intentions",
            "Name": "a",
            "Sources": [{"Name": "b", "Permissions": [None, {"HTTP": None}]}],
        },
    ),
    (
        "PUT",
        "/v1/config",
        {
            "Kind": "service-intentions",
            "Name": "a",
            "Sources": [
                {
                    "Name": "b",
                    "Permissions": [{"Action": "allow", "HTTP": {"Header": [None]}}],
                }
            ],
        },
    ),
    ("PUT", "/v1/config?cas=99999999999999999999999", {"Kind": "service-intentions"}),
    (
        "PUT",
        "/v1/connect/intentions/exact?source=a/b/c&destination=d",
        {"Action": "allow"},
    ),
    (
        "PUT",
        "/v1/connect/intentions/exact?source=a&destination=x/y",
        {"Action": "allow"},
    ),
    ("POST", "/v1/query", {"Name": "q2", "Service": {"Service": "s", "Tags": [None]}}),
    (
        "POST",
        "/v1/query",
        {"Name": "q3", "Service": {"Service": "s"}, "DNS": {"TTL": "-1s"}},
    ),
    ("GET", "/v1/query/q/execute?limit=99999999999999999999999", None),
    ("GET", "/v1/query/q/execute?limit=-5", None),
    ("PUT", "/v1/acl/policy", {"Name": "p", "Rules": 'service "x" { policy = "read" '}),
    ("PUT", "/v1/acl/policy", {"Name": "p2", "Rules": '{"service": [1]}'}),
    ("PUT", "/v1/acl/policy", {"Name": "p3", "Rules": 'service = "x"'}),
    ("PUT", "/v1/acl/policy", {"Name": "p4", "Rules": "[1, 2]"}),
    ("PUT", "/v1/acl/policy", {"Name": "p5", "Rules": '{"acl": ["write"]}'}),
    ("PUT", "/v1/acl/token", {"Policies": [None, {}]}),
    ("PUT", "/v1/acl/token", {"ServiceIdentities": [{"ServiceName": "Bad Name"}]}),
]


@pytest.mark.parametrize("kind", sorted(AGENTS))
def test_hand_picked_nasty_requests_to_the_new_endpoints(kind: str) -> None:
    for method, path, body in NEW_NASTY:
        h = Harness(**AGENTS[kind])  # type: ignore[arg-type]
        h.post("/v1/query", json.dumps({"Name": "q", "Service": {"Service": "s"}}))
        raw = None if body is None else json.dumps(body)
        answer = h.call(method, path, raw, {"X-Consul-Token": MASTER})
        assert answer.status in (200, 400, 401, 403, 404, 500), (path, answer.text)
        assert not answer.text.startswith("dev agent internal error"), (
            path,
            answer.text,
        )
        _alive_for(h)


def _alive_for(h: Harness) -> None:
    answer = h.call("GET", "/v1/agent/self", None, {"X-Consul-Token": MASTER})
    assert answer.status == 200


# -- issue 20: CA configuration bodies ------------------------------------------------
#
# Real Consul 1.8.7 answers many bad CA configurations with a 500 of its own
# (tests/fixtures/real-1.8.7/ca20err-*.http, ca-config-put-*.http,
# ca20-put-key-garbage.http): the development agent may answer 500 only
# there, with the real text's prefix.

import datetime  # noqa: E402
import functools  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402

from connect_native import _certbuild  # noqa: E402
from tests.test_devagent_support import CAPTURES as CAPTURES_DIR  # noqa: E402
from tests.test_devagent_support import load  # noqa: E402

CA_CONFIGURATION = "/v1/connect/ca/configuration"
# The real agent's own 500 texts for a CA configuration, each seen in a
# capture (test_the_allowed_ca_500s_are_the_real_agents_own holds them to it).
CA_500_PREFIXES = (
    "could not initialize provider: ",
    "error configuring provider: ",
    "error generating CA root certificate: ",
    "error parsing root cert: ",
    "error parsing root fingerprint: ",
)
CA_DECODE_400 = "Bad request: Request decode failed: "


def test_the_allowed_ca_500s_are_the_real_agents_own() -> None:
    captured = [
        load(name)
        for name in (
            "ca20err-no-provider.http",
            "ca20err-vault-empty.http",
            "ca20err-aws-empty.http",
            "ca20err-rootcert-junk-pem.http",
            "ca20err-rootcert-junk-with-key.http",
        )
    ]
    assert [c.status for c in captured] == [500] * 5
    assert sorted(CA_500_PREFIXES) == sorted(
        next(p for p in CA_500_PREFIXES if c.body.startswith(p)) for c in captured
    )
    assert load("ca20err-body-list.http").body.startswith(CA_DECODE_400)


@functools.cache
def _key_material() -> dict[str, str]:
    """
    PEM texts to put in ``PrivateKey``/``RootCert``: CA roots of several key
    types and sizes with their keys, a key of another kind, a leaf
    certificate, PKCS#8 and encrypted keys.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    keys: dict[str, Any] = {
        "ec224": ec.generate_private_key(ec.SECP224R1()),
        "ec256": ec.generate_private_key(ec.SECP256R1()),
        "ec384": ec.generate_private_key(ec.SECP384R1()),
        "ec521": ec.generate_private_key(ec.SECP521R1()),
        "rsa1024": rsa.generate_private_key(65537, 1024),
        "rsa2048": rsa.generate_private_key(65537, 2048),
    }
    out: dict[str, str] = {}
    for name, key in keys.items():
        out[f"key-{name}"] = _certbuild.private_key_pem(key)
        subject = _certbuild.common_name(f"robust {name}")
        for ca in (True, False):
            cert = _certbuild.build_certificate(
                subject=subject,
                issuer=subject,
                public_key=key.public_key(),
                signing_key=key,
                serial=1,
                not_before=now - datetime.timedelta(minutes=1),
                not_after=now + datetime.timedelta(days=30),
                ca=ca,
                uris=[],
            )
            out[f"{'root' if ca else 'leaf'}-{name}"] = _certbuild.certificate_pem(cert)
    ed = ed25519.Ed25519PrivateKey.generate()
    out["key-ed25519"] = ed.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    ed_subject = _certbuild.common_name("robust ed25519")
    out["root-ed25519"] = _certbuild.certificate_pem(
        _certbuild.build_certificate(
            subject=ed_subject,
            issuer=ed_subject,
            public_key=ed.public_key(),
            signing_key=ed,
            serial=2,
            not_before=now,
            not_after=now + datetime.timedelta(days=30),
            ca=True,
            uris=[],
        )
    )
    out["key-pkcs8-ec256"] = (
        keys["ec256"]
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    out["key-encrypted-ec256"] = (
        keys["ec256"]
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
        .decode()
    )
    out["junk-key"] = (
        "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n"
    )
    out["junk-cert"] = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    out["junk-pkcs8"] = "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n"
    out["begin-only"] = "-----BEGIN"
    return out


KEY_NAMES = ["ec224", "ec256", "ec384", "ec521", "rsa1024", "rsa2048"]
pems = st.sampled_from(
    [
        *(f"{kind}-{name}" for kind in ("key", "root", "leaf") for name in KEY_NAMES),
        "key-ed25519",
        "root-ed25519",
        "key-pkcs8-ec256",
        "key-encrypted-ec256",
        "junk-key",
        "junk-cert",
        "junk-pkcs8",
        "begin-only",
    ]
).map(lambda name: _key_material()[name])
# A matching key and root, or a key with another key's root.
key_pairs = st.tuples(st.sampled_from(KEY_NAMES), st.sampled_from(KEY_NAMES)).map(
    lambda names: {
        "PrivateKey": _key_material()[f"key-{names[0]}"],
        "RootCert": _key_material()[f"root-{names[1]}"],
    }
)
odd_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
)
durations = (
    st.sampled_from(
        [
            "72h",
            "1h",
            "3h",
            "8760h",
            "10000h",
            "876000h",
            "876001h",
            "1m",
            "0s",
            "-5h",
            "1.5h",
            "2h30m",
            "9223372036854775807ns",
            "9223372036854775808ns",
            "99999999999999h",
            "",
            "bogus",
            "1",
            "1 h",
            "+3h",
        ]
    )
    | odd_values
)
config_values: dict[str, Any] = {
    "LeafCertTTL": durations,
    "IntermediateCertTTL": durations,
    "RotationPeriod": durations,
    "PrivateKeyType": st.sampled_from(["ec", "rsa", "dsa", "", "EC", "Rsa"])
    | odd_values,
    "PrivateKeyBits": st.sampled_from(
        [224, 256, 384, 521, 2048, 4096, 1024, 512, 0, -1, "256", "0x100", "x", 1e300]
    )
    | odd_values,
    "PrivateKey": pems | odd_values,
    "RootCert": pems | odd_values,
    "SkipValidate": st.sampled_from([True, False, "true", "false", "1", "yes", 0, 2])
    | odd_values,
    "CSRMaxPerSecond": st.sampled_from([0, 50, 1.5, -1, 1e300, "10", "x"]) | odd_values,
    "CSRMaxConcurrent": st.sampled_from([0, 1, -1, 2**63, 1e300, "4", "x"])
    | odd_values,
    "DisableCrossSigning": st.booleans() | odd_values,
}
config_keys = st.sampled_from(sorted(config_values))


@st.composite
def ca_configs(draw: st.DrawFn) -> Any:
    """
    A ``Config``: a few known keys (any spelling case) with valid or
    invalid values, maybe a supplied key pair, maybe unknown keys; or not a
    dict at all.
    """
    if draw(st.integers(0, 9)) == 0:
        return draw(odd_values)
    config: dict[str, Any] = {}
    if draw(st.booleans()):
        config.update(draw(key_pairs))
    for key in draw(st.lists(config_keys, max_size=4, unique=True)):
        spelled = draw(st.sampled_from([key, key.lower(), key.upper()]))
        config[spelled] = draw(config_values[key])
    config.update(draw(st.dictionaries(st.text(max_size=8), odd_values, max_size=2)))
    return config


@st.composite
def ca_bodies(draw: st.DrawFn) -> bytes:
    """
    A ``PUT /v1/connect/ca/configuration`` body: mostly an object with a
    provider and a configuration, sometimes any JSON or bytes at all.
    """
    shape = draw(st.integers(0, 19))
    if shape == 0:
        return draw(st.binary(max_size=40))
    if shape == 1:
        return json.dumps(draw(json_values)).encode()
    if shape == 2:
        return draw(st.sampled_from([b"null", b"[]", b"", b"{}", b'"x"', b"1", b"{"]))
    body: dict[str, Any] = {}
    # Mostly the built-in provider with a configuration, so that most
    # bodies reach the provider's checks and some rotate.
    provider = draw(st.integers(0, 19))
    if provider < 14:
        body["Provider"] = "consul"
    elif provider < 16:
        body["Provider"] = draw(st.sampled_from(["vault", "aws-pca", "aws"]))
    elif provider < 18:
        body["Provider"] = draw(st.sampled_from(["", "Consul", "nope"]))
    elif provider == 18:
        body["Provider"] = draw(odd_values)
    if draw(st.integers(0, 9)):
        body["Config"] = draw(ca_configs())
    if draw(st.integers(0, 4)) == 0:
        for key in draw(
            st.lists(
                st.sampled_from(
                    [
                        "ForceWithoutCrossSigning",
                        "force_without_cross_signing",
                        "ClusterID",
                        "State",
                        "CreateIndex",
                        "ModifyIndex",
                        "Bogus",
                    ]
                ),
                min_size=1,
                max_size=2,
                unique=True,
            )
        ):
            body[key] = draw(odd_values | st.booleans() | st.text(max_size=4))
    return json.dumps(body).encode()


def _ca_answer_allowed(answer: Any) -> None:
    """
    200 with no body, a one-line 400 of Go's decode family, or a 500 the
    real agent gives too (by prefix); never a Python error.
    """
    text = answer.text
    assert "Traceback" not in text, text
    assert "dev agent internal error" not in text, text
    if answer.status == 200:
        assert answer.body == b""
    elif answer.status == 400:
        assert text.startswith(CA_DECODE_400), text
        assert "\n" not in text, text
    else:
        assert answer.status == 500, (answer.status, text)
        assert text.startswith(CA_500_PREFIXES), text


_leaf_names = itertools.count()


def _ca_consistent(h: Harness) -> dict[str, Any]:
    """
    Both roots endpoints list exactly one active root, the one
    ``ActiveRootID`` names, each root once; the configuration reads back;
    and a leaf for a new name is signed by the active root.  The server
    roots answer.
    """
    answers = [h.get(p) for p in ("/v1/connect/ca/roots", "/v1/agent/connect/ca/roots")]
    for answer in answers:
        assert answer.status == 200, answer.text
        roots = answer.json()
        active = [r for r in roots["Roots"] if r["Active"]]
        assert len(active) == 1, roots
        assert roots["ActiveRootID"] == active[0]["ID"]
        assert len({r["ID"] for r in roots["Roots"]}) == len(roots["Roots"])
    assert answers[0].json() == answers[1].json()
    config = h.get(CA_CONFIGURATION)
    assert config.status == 200
    assert config.json()["Provider"] == "consul"
    leaf = h.get(f"/v1/agent/connect/ca/leaf/robust{next(_leaf_names)}")
    assert leaf.status == 200, leaf.text
    cert = x509.load_pem_x509_certificate(leaf.json()["CertPEM"].encode())
    root = x509.load_pem_x509_certificate(active[0]["RootCert"].encode())
    cert.verify_directly_issued_by(root)
    return {"roots": answers[0].json(), "config": config.json()}


def _ca_put(h: Harness, body: bytes) -> Any:
    before = _ca_consistent(h)
    pending = h.start("PUT", CA_CONFIGURATION, body)
    h.advance(0)
    assert pending.done, body
    answer = pending.answer()
    _ca_answer_allowed(answer)
    after = _ca_consistent(h)
    if answer.status != 200:
        # A refused configuration changes nothing.
        assert after == before, body
    return answer


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(body=ca_bodies())
def test_any_ca_configuration_body_gets_a_real_answer(body: bytes) -> None:
    unhandled = _Unhandled()
    globalLogPublisher.addObserver(unhandled)
    try:
        _ca_put(Harness(), body)
    finally:
        globalLogPublisher.removeObserver(unhandled)
    assert unhandled.failures == [], [
        f["log_failure"].getTraceback() for f in unhandled.failures
    ]


def _supplied(name: str) -> bytes:
    return json.dumps(
        {
            "Provider": "consul",
            "Config": {
                "PrivateKey": _key_material()[f"key-{name}"],
                "RootCert": _key_material()[f"root-{name}"],
            },
        }
    ).encode()


GENERATED = b'{"Provider":"consul","Config":{}}'
ca_steps = (
    ca_bodies()
    | st.sampled_from(["ec256", "ec384", "rsa2048"]).map(_supplied)
    | st.just(GENERATED)
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(steps=st.lists(ca_steps, min_size=2, max_size=6))
def test_sequences_of_ca_configurations_keep_one_active_root(
    steps: list[bytes],
) -> None:
    unhandled = _Unhandled()
    globalLogPublisher.addObserver(unhandled)
    try:
        h = Harness()
        for body in steps:
            _ca_put(h, body)
    finally:
        globalLogPublisher.removeObserver(unhandled)
    assert unhandled.failures == [], [
        f["log_failure"].getTraceback() for f in unhandled.failures
    ]


def test_rotation_then_bad_configuration_then_rotation_back() -> None:
    h = Harness()
    first = h.get("/v1/connect/ca/roots").json()["ActiveRootID"]
    assert _ca_put(h, _supplied("ec384")).status == 200
    supplied = h.get("/v1/connect/ca/roots").json()["ActiveRootID"]
    assert supplied != first
    bad = {
        "Provider": "consul",
        "Config": {"PrivateKey": _key_material()["key-ec256"], "RootCert": "junk"},
    }
    assert _ca_put(h, json.dumps(bad).encode()).status == 500
    assert _ca_put(h, b"null").status == 400
    assert h.get("/v1/connect/ca/roots").json()["ActiveRootID"] == supplied
    assert _ca_put(h, GENERATED).status == 200
    assert _ca_put(h, _supplied("ec384")).status == 200
    roots = h.get("/v1/connect/ca/roots").json()
    assert roots["ActiveRootID"] == supplied
    assert len(roots["Roots"]) == 3


@pytest.mark.parametrize("body", [b"null", b" null\n", b"null {}"])
def test_a_null_ca_configuration_is_a_400_not_a_500(body: bytes) -> None:
    # Real 1.8.7 panics and drops the connection (ca20err-body-null.http,
    # curl exit 52); the development agent refuses it as it refuses a list
    # (ca20err-body-list.http), and changes nothing.
    assert "curl-exit: 52" in (CAPTURES_DIR / "ca20err-body-null.http").read_text()
    listed = load("ca20err-body-list.http")
    h = Harness()
    before = _ca_consistent(h)
    answer = h.put(CA_CONFIGURATION, body)
    assert answer.status == 400
    assert answer.text == listed.body.replace(
        "cannot unmarshal array", "cannot unmarshal null"
    )
    assert answer.header("Content-Type") == "text/plain; charset=utf-8"
    assert _ca_consistent(h)["config"] == before["config"]
    assert h.put(CA_CONFIGURATION, listed.request_body).text == listed.body


# What the suite found beyond the CA configuration, against real 1.8.7
# (capture_issue20.py's robust20 sequence).
ROBUST20_AS_CAPTURED = [
    "robust20-path-nul-check-pass.http",
    "robust20-path-nul-unknown-route.http",
    "robust20-path-del-root.http",
    "robust20-path-zwsp-catalog.http",
    "robust20-path-nbsp-leaf.http",
    "robust20-path-space-check-pass.http",
    "robust20-config-put-null.http",
    "robust20-config-put-empty.http",
    "robust20-check-register-script-unknown-service.http",
    "robust20-check-register-script.http",
    "robust20-config-delete-bogus.http",
    "robust20-config-delete-bogus-dc.http",
    "robust20-config-delete-intentions.http",
    "robust20-config-delete-no-name.http",
    "robust20-config-delete-no-kind.http",
    "robust20-intention-delete-bad-id.http",
    "robust20-query-get-bad-id.http",
    "robust20-query-delete-bad-id.http",
    "robust20-query-update-missing.http",
    "robust20-config-get-bogus.http",
    "robust20-health-other-dc.http",
    "robust20-match-name-slashes.http",
]


@pytest.mark.parametrize("name", ROBUST20_AS_CAPTURED)
def test_the_suites_findings_answer_as_the_real_agent(name: str) -> None:
    real = load(name)
    h = Harness()
    answer = h.call(real.method, real.path, real.request_body)
    assert (answer.status, answer.text) == (real.status, real.body)
    assert answer.header_names == real.header_names


@pytest.mark.parametrize(
    ("name", "go_type"),
    [
        ("robust20-query-create-null.http", "structs.PreparedQuery"),
        (
            "robust20-intention-put-null.http",
            "struct { Hash string; CreatedAt string; UpdatedAt string; "
            "*structs.Alias }",
        ),
    ],
)
def test_a_null_body_real_consul_panics_on_is_a_400(name: str, go_type: str) -> None:
    real = load(name)
    assert real.status is None
    assert "curl-exit: 52" in (CAPTURES_DIR / name).read_text()
    h = Harness()
    answer = h.call(real.method, real.path, real.request_body)
    assert answer.status == 400
    assert answer.text.endswith(
        f"Request decode failed: json: cannot unmarshal null into Go value of "
        f"type {go_type}"
    )
    assert "\n" not in answer.text
    assert h.get("/v1/query").json() == []


def test_a_path_that_is_not_utf8_is_not_refused() -> None:
    # Go sees U+FFFD, which is printable: the handler answers (real quotes
    # the raw byte, "a\\xffb"; the agent decodes the path with U+FFFD).
    real = load("robust20-path-ff-check-pass.http")
    answer = Harness().call(real.method, real.path)
    assert answer.status == real.status == 500
    assert answer.text.startswith('CheckID "a')
    assert real.body.startswith('CheckID "a')


# The check and ACL routes: a 500 only where 1.8.7 gives one, with its text.
SCRIPTS_DISABLED = (
    "Scripts are disabled on this agent from remote calls; to enable, "
    "configure 'enable_script_checks' to true"
)
CHECK_ROUTES_500: dict[str, tuple[str, ...]] = {
    # misc20-check-register-unknown-service.http, robust20-check-register-*.http
    "/v1/agent/check/register": ('ServiceID "', SCRIPTS_DISABLED),
    # misc20-check-deregister-empty-id.http
    "/v1/agent/check/deregister/": ("CheckID missing",),
    # check-pass-unknown.http
    "/v1/agent/check/pass/": ('CheckID "',),
    "/v1/agent/check/warn/": ('CheckID "',),
    "/v1/agent/check/fail/": ('CheckID "',),
    "/v1/agent/check/update/": ('CheckID "',),
}
ACL_OFF_PATHS = [
    "/v1/acl/bootstrap",
    "/v1/acl/policy",
    "/v1/acl/policy/",
    "/v1/acl/token",
    "/v1/acl/token/",
    "/v1/acl/token/self",
    "/v1/acl/tokens",
    "/v1/acl/role",
    "/v1/acl/login",
    "/v1/acl/rules/translate",
    "/v1/acl/create",
]
check_fields = st.sampled_from(
    [
        "Name",
        "ID",
        "CheckID",
        "ServiceID",
        "service_id",
        "Status",
        "Notes",
        "Output",
        "TTL",
        "Interval",
        "Timeout",
        "HTTP",
        "TCP",
        "GRPC",
        "Args",
        "ScriptArgs",
        "DockerContainerID",
        "Shell",
        "AliasService",
        "AliasNode",
        "DeregisterCriticalServiceAfter",
        "SuccessBeforePassing",
        "Header",
        "Method",
        "Token",
    ]
)
check_values = (
    st.sampled_from(
        ["10s", "0s", "-1s", "bogus", "", "web", "nosuch", "passing", "critical", "x"]
    )
    | odd_values
)
check_bodies = (
    st.dictionaries(check_fields, check_values, max_size=5).map(
        lambda d: json.dumps(d).encode()
    )
    | st.sampled_from([b"null", b"[]", b"", b"{", b'"x"'])
    | st.binary(max_size=30)
)


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    route=st.sampled_from(sorted(CHECK_ROUTES_500)),
    tail=st.sampled_from(["", "web-check", "nosuch", "a/b"]) | st.text(max_size=8),
    body=check_bodies,
    method=st.sampled_from(["PUT", "PUT", "PUT", "GET", "POST"]),
)
def test_check_routes_answer_only_the_real_agents_500s(
    route: str, tail: str, body: bytes, method: str
) -> None:
    unhandled = _Unhandled()
    globalLogPublisher.addObserver(unhandled)
    try:
        h = Harness()
        h.register(
            {
                "Name": "web",
                "Port": 1,
                "Check": {"CheckID": "web-check", "TTL": "10s"},
            }
        )
        path = route + (quote(tail, safe="/") if route.endswith("/") else "")
        answer = h.call(method, path, body)
        assert "dev agent internal error" not in answer.text, answer.text
        if answer.status == 500:
            assert answer.text.startswith(CHECK_ROUTES_500[route]), (path, answer.text)
        else:
            assert answer.status in (200, 400, 405), (path, answer.status)
        assert h.get("/v1/agent/checks").status == 200
        assert h.get("/v1/health/service/web").status == 200
    finally:
        globalLogPublisher.removeObserver(unhandled)
    assert unhandled.failures == []


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    path=st.sampled_from(ACL_OFF_PATHS),
    tail=st.sampled_from(["", "x", "self"]),
    body=new_bodies | check_bodies,
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE"]),
    token=tokens,
)
def test_acl_routes_with_acls_off_answer_only_401_or_405(
    path: str, tail: str, body: bytes, method: str, token: str | None
) -> None:
    h = Harness()
    url = path + (tail if path.endswith("/") else "")
    headers = {} if token is None else {"X-Consul-Token": token}
    answer = h.call(method, url, body, headers)
    if answer.status == 405:
        assert answer.header("Allow") is not None
    else:
        # misc20-acl-*-acl-off.http: before the body or token is looked at.
        assert (answer.status, answer.text) == (401, "ACL support disabled"), url


# Every 500 the generic properties admit: the start of a 500 the real agent
# gave in a capture (held to them by the test below), or one of the
# development agent's documented refusals of what it does not model.
REAL_500_PREFIXES = (
    *CA_500_PREFIXES,
    'CheckID "',
    "CheckID missing",
    'Unknown check "',
    'ServiceID "',
    SCRIPTS_DISABLED,
    "Failed to decode request body: ",
    "1 error occurred:",
    "duplicate intention found: ",
    "Cannot delete non-existent intention: ",
    "Cannot modify non-existent prepared query: ",
    "Intention lookup failed: ",
    "Prepared Query lookup failed: ",
    "failed prepared query lookup: ",
    "Invalid prepared query: ",
    "Error parsing 'connect' value: ",
    "invalid config entry kind: ",
    "No path to datacenter",
    "required query parameter '",
    "'by' parameter must be one of 'source' or 'destination'",
    'name "',
    "URI must be either service or agent",
    "SPIFFE ID is not in the expected format: ",
    "Failed to create boolean expression evaluator: ",
)
DEV_REFUSALS_500 = (
    # docs/devagent.rst, "Differences from real Consul".
    "the development agent has no ",
)


def test_every_admitted_500_is_one_the_real_agent_gave() -> None:
    captured = [
        load(path.name)
        for path in sorted(CAPTURES_DIR.glob("*.http"))
        if "\nHTTP/1.1 500 " in "\n" + path.read_text(encoding="utf-8")
    ]
    bodies = [c.body for c in captured if c.status == 500]
    assert len(bodies) > 50
    for prefix in REAL_500_PREFIXES:
        assert any(body.startswith(prefix) for body in bodies), prefix


def _admitted_500(answer: Any) -> bool:
    # "1 error occurred:" stands for any count of validation errors.
    text = re.sub(r"^\d+ errors occurred:", "1 error occurred:", answer.text)
    return answer.status != 500 or text.startswith(REAL_500_PREFIXES + DEV_REFUSALS_500)


def test_a_non_printable_query_string_is_not_refused() -> None:
    # Only the path is checked (robust20-query-nul-self.http).
    real = load("robust20-query-nul-self.http")
    assert real.status == 200
    answer = Harness().call(real.method, real.path)
    assert answer.status == 200
    assert answer.json()["Config"]["Datacenter"] == real.json()["Config"]["Datacenter"]
