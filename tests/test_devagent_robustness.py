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
