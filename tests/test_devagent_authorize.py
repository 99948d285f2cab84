"""
``POST /v1/agent/connect/authorize`` on the development agent decides as
real Consul 1.8.7 with ACLs off (``REAL-BEHAVIOUR.md`` section 6): the
first intention for the target by precedence whose source matches the
client's service and namespace decides; with none, access is allowed; trust
domain, datacenter and serial are not checked; input is checked first.
"""

from __future__ import annotations

import json

import pytest

from tests.test_devagent_support import Harness

AUTHORIZE = "/v1/agent/connect/authorize"


def intend(h: Harness, source: str, destination: str, action: str) -> str:
    answer = h.post(
        "/v1/connect/intentions",
        {"SourceName": source, "DestinationName": destination, "Action": action},
    )
    assert answer.status == 200, answer.text
    intention_id: str = answer.json()["ID"]
    return intention_id


def authorize(h: Harness, target: str, uri: str) -> tuple[bool, str]:
    answer = h.post(AUTHORIZE, {"Target": target, "ClientCertURI": uri})
    assert answer.status == 200, answer.text
    body = answer.json()
    return body["Authorized"], body["Reason"]


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_no_intention_allows_by_default(h: Harness) -> None:
    assert authorize(h, "web", h.uri("api")) == (
        True,
        "ACLs disabled, access is allowed by default",
    )


@pytest.mark.parametrize(
    ("present", "winner", "precedence"),
    [
        ([("api", "web", "deny"), ("*", "web", "allow")], ("api", "web"), 9),
        ([("*", "web", "deny"), ("api", "*", "allow")], ("*", "web"), 8),
        ([("api", "*", "deny"), ("*", "*", "allow")], ("api", "*"), 6),
        ([("*", "*", "deny")], ("*", "*"), 5),
    ],
)
def test_the_most_precise_intention_decides(
    h: Harness,
    present: list[tuple[str, str, str]],
    winner: tuple[str, str],
    precedence: int,
) -> None:
    ids = {(s, d): intend(h, s, d, a) for s, d, a in present}
    action = {(s, d): a for s, d, a in present}[winner]
    allowed, reason = authorize(h, "web", h.uri("api"))
    assert allowed is (action == "allow")
    source, destination = winner
    assert reason == (
        f"Matched intention: {action.upper()} default/{source} => "
        f"default/{destination} (ID: {ids[winner]}, Precedence: {precedence})"
    )


def test_intentions_for_other_sources_and_targets_do_not_match(h: Harness) -> None:
    intend(h, "api", "web", "deny")
    intend(h, "db", "*", "deny")
    assert authorize(h, "web", h.uri("other"))[0] is True
    assert authorize(h, "api", h.uri("web"))[0] is True


def test_trust_domain_datacenter_and_serial_are_not_checked(h: Harness) -> None:
    intend(h, "api", "web", "deny")
    foreign = "spiffe://11111111-2222-3333-4444-555555555555.consul"
    for uri in (
        f"{foreign}/ns/default/dc/dc1/svc/api",
        h.uri("api", dc="dc9"),
    ):
        answer = h.post(
            AUTHORIZE,
            {"Target": "web", "ClientCertURI": uri, "ClientCertSerial": "01:02"},
        )
        assert answer.json()["Authorized"] is False


def test_source_namespace_must_match_the_intention(h: Harness) -> None:
    intend(h, "api", "web", "deny")
    intend(h, "*", "web", "deny")
    assert authorize(h, "web", h.uri("api", ns="other"))[0] is True


def test_escaped_service_names_in_the_uri_are_unescaped(h: Harness) -> None:
    intend(h, "a b", "web", "deny")
    assert authorize(h, "web", h.uri("a%20b"))[0] is False


def test_scheme_case_query_and_fragment_are_go_url_parsing(h: Harness) -> None:
    intend(h, "api", "web", "deny")
    uri = h.uri("api").replace("spiffe:", "SPIFFE:") + "?x=1#y"
    assert authorize(h, "web", uri)[0] is False


def test_cache_header_per_target(h: Harness) -> None:
    def cache(target: str) -> tuple[str | None, str | None]:
        answer = h.post(AUTHORIZE, {"Target": target, "ClientCertURI": h.uri("api")})
        return answer.header("X-Cache"), answer.header("Age")

    assert cache("web") == ("MISS", None)
    assert cache("web") == ("HIT", "0")
    assert cache("db") == ("MISS", None)


def test_decision_follows_intention_changes_at_once(h: Harness) -> None:
    deny = intend(h, "api", "web", "deny")
    assert authorize(h, "web", h.uri("api"))[0] is False
    h.call("DELETE", f"/v1/connect/intentions/{deny}")
    assert authorize(h, "web", h.uri("api"))[0] is True


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ("{}", "Bad request: Target service must be specified"),
        (
            {"Target": "", "ClientCertURI": "spiffe://bad"},
            "Bad request: Target service must be specified",
        ),
        (
            {"Target": "web", "ClientCertURI": "spiffe://bad"},
            "Bad request: ClientCertURI not a valid Connect identifier",
        ),
        (
            {"Target": "web", "ClientCertURI": "spiffe://td.consul"},
            "Bad request: ClientCertURI not a valid Service identifier",
        ),
        (
            {"Target": "web", "ClientCertURI": "spiffe://td.consul/ns/a/svc/b"},
            "Bad request: ClientCertURI not a valid Connect identifier",
        ),
        (
            {"Target": "web", "ClientCertURI": "spiffe://td.consul/ns/d/dc/d/svc/%zz"},
            "Bad request: ClientCertURI not a valid Connect identifier",
        ),
        (
            {"Target": "web", "ClientCertURI": "x", "Extra": 1},
            'Bad request: Request decode failed: json: unknown field "Extra"',
        ),
        (
            {"Target": 5},
            "Bad request: Request decode failed: json: cannot unmarshal number "
            "into Go struct field ConnectAuthorizeRequest.Target of type string",
        ),
    ],
)
def test_bad_input_is_a_400(h: Harness, body: object, text: str) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    answer = h.post(AUTHORIZE, raw)
    assert (answer.status, answer.text) == (400, text)
