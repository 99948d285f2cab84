"""
The pure intention rules of connect_native.authorize.rules: Consul's precedence,
the first matching intention deciding, and L7 permission matching.

The case tables are our own, written from Consul's source: precedence from
``agent/structs/intention_test.go`` (``TestIntentionUpdatePrecedence``) and
``UpdatePrecedence``; source matching from ``connect.IntentionMatch``; L7
from ``agent/xds/rbac_test.go`` (``TestRemoveIntentionPrecedence``,
``TestMakeRBACNetworkAndHTTPFilters``) and ``convertPermission``; validation
from ``ServiceIntentionsConfigEntry.validate``.
"""

from __future__ import annotations

import re

import pytest
from twisted.web.http_headers import Headers

from connect_native.authorize.rules import (
    DEFAULT_SOURCE,
    L7_SOURCE,
    MATCH_SOURCE,
    HTTPRequest,
    InvalidPermission,
    compile_intentions,
    decide_connection,
    decide_http,
    first_match,
    header_matches,
    http_matches,
    intention_precedence,
    matches_source,
    validate_permission,
)
from connect_native.consul.records import (
    Intention,
    IntentionHTTPHeaderPermission,
    IntentionHTTPPermission,
    IntentionPermission,
)
from connect_native.identity import ServiceIdentity

TD = "11111111-2222-3333-4444-555555555555.consul"


def ident(
    service: str, namespace: str = "default", partition: str | None = None
) -> ServiceIdentity:
    return ServiceIdentity(
        trust_domain=TD,
        namespace=namespace,
        datacenter="dc1",
        service=service,
        partition=partition,
    )


def ixn(
    source: str,
    destination: str = "api",
    action: str | None = "allow",
    *,
    source_ns: str = "default",
    destination_ns: str = "default",
    permissions: tuple[IntentionPermission, ...] = (),
    source_partition: str | None = None,
    source_peer: str | None = None,
) -> Intention:
    return Intention(
        source_ns=source_ns,
        source_name=source,
        destination_ns=destination_ns,
        destination_name=destination,
        source_type="consul",
        precedence=intention_precedence(source_ns, source, destination_ns, destination),
        action=None if permissions else action,
        permissions=permissions,
        id=f"id-{source_ns}-{source}-{destination_ns}-{destination}",
        source_partition=source_partition,
        source_peer=source_peer,
    )


def perm(action: str = "allow", **http: object) -> IntentionPermission:
    return IntentionPermission(action=action, http=IntentionHTTPPermission(**http))  # type: ignore[arg-type]


def hdr(name: str, **rule: object) -> IntentionHTTPHeaderPermission:
    return IntentionHTTPHeaderPermission(name=name, **rule)  # type: ignore[arg-type]


def req(method: str = "GET", path: str = "/", **headers: str) -> HTTPRequest:
    return HTTPRequest.of(
        method, path, {k.replace("_", "-"): v for k, v in headers.items()}
    )


# -- precedence -----------------------------------------------------------------

# (source ns, source name, destination ns, destination name) -> precedence,
# the whole range of UpdatePrecedence (TestIntentionUpdatePrecedence's cases).
PRECEDENCE = [
    (("default", "web", "default", "api"), 9),
    (("default", "*", "default", "api"), 8),
    (("*", "*", "default", "api"), 7),
    (("default", "web", "default", "*"), 6),
    (("default", "*", "default", "*"), 5),
    (("*", "*", "default", "*"), 4),
    (("default", "web", "*", "*"), 3),
    (("default", "*", "*", "*"), 2),
    (("*", "*", "*", "*"), 1),
]


@pytest.mark.parametrize(("names", "expected"), PRECEDENCE)
def test_precedence_follows_update_precedence(
    names: tuple[str, str, str, str], expected: int
) -> None:
    assert intention_precedence(*names) == expected


def test_first_match_is_the_highest_precedence_whatever_the_order_given() -> None:
    # rbac_test.go "default-deny-mixed-precedence": web->api allow (9),
    # *->api deny (8), web->* deny (6).
    table = [
        ixn("web", "*", "deny"),
        ixn("*", "api", "deny"),
        ixn("web", "api", "allow"),
    ]
    assert first_match(table, ident("web")) == table[2]
    assert first_match(table, ident("cron")) == table[1]
    assert first_match(list(reversed(table)), ident("web")) == table[2]


# (intentions for destination api, source, expected allowed or None for no match)
L4_TABLE = [
    pytest.param([ixn("web", action="allow")], "web", True, id="exact-allow"),
    pytest.param([ixn("web", action="deny")], "web", False, id="exact-deny"),
    pytest.param([ixn("*", action="allow")], "web", True, id="wildcard-source-allow"),
    pytest.param([ixn("*", "*", "deny")], "web", False, id="wildcard-both-deny"),
    pytest.param(
        [ixn("web", action="deny"), ixn("*", action="allow")],
        "web",
        False,
        id="exact-deny-over-wildcard-allow",
    ),
    pytest.param(
        [ixn("web", action="deny"), ixn("*", action="allow")],
        "cron",
        True,
        id="wildcard-allow-for-others",
    ),
    pytest.param(
        [ixn("web", action="allow"), ixn("*", "*", "deny")],
        "web",
        True,
        id="exact-allow-over-wildcard-deny",
    ),
    pytest.param(
        # rbac_test.go "default-deny-kitchen-sink"
        [
            ixn("web", action="allow"),
            ixn("unsafe", action="deny"),
            ixn("cron", action="allow"),
            ixn("*", action="allow"),
        ],
        "unsafe",
        False,
        id="kitchen-sink-unsafe",
    ),
    pytest.param([ixn("db", action="allow")], "web", None, id="no-match"),
    pytest.param(
        [ixn("web", action="allow", source_ns="other")],
        "web",
        None,
        id="other-namespace",
    ),
    pytest.param(
        [ixn("*", action="allow", source_ns="*")], "web", True, id="wildcard-namespace"
    ),
    pytest.param(
        [ixn("web", action="allow", source_partition="part1")],
        "web",
        None,
        id="other-partition",
    ),
    pytest.param(
        [ixn("web", action="allow", source_peer="peer1")],
        "web",
        None,
        id="peered-source",
    ),
]


@pytest.mark.parametrize(("intentions", "source", "expected"), L4_TABLE)
def test_l4_decision_table(
    intentions: list[Intention], source: str, expected: bool | None
) -> None:
    table = compile_intentions(intentions, "api")
    decision = decide_connection(table, ident(source), None)
    if expected is None:
        assert decision is None
    else:
        assert decision is not None
        assert (decision.allowed, decision.source) == (expected, MATCH_SOURCE)


def test_reason_names_the_intention_like_consul() -> None:
    table = compile_intentions([ixn("web", action="deny")], "api")
    decision = decide_connection(table, ident("web"), False)
    assert decision is not None
    assert decision.reason == (
        "Matched intention: DENY default/web => default/api "
        "(ID: id-default-web-default-api, Precedence: 9)"
    )


@pytest.mark.parametrize("default", [True, False])
def test_no_match_takes_the_default(default: bool) -> None:
    table = compile_intentions([ixn("db")], "api")
    decision = decide_connection(table, ident("web"), default)
    assert decision is not None
    assert (decision.allowed, decision.source) == (default, DEFAULT_SOURCE)


def test_intentions_for_other_destinations_are_ignored() -> None:
    table = compile_intentions([ixn("web", "db", "allow")], "api")
    assert table.ordered == ()
    assert decide_connection(table, ident("web"), False) == decide_connection(
        compile_intentions([], "api"), ident("web"), False
    )


def test_source_partition_absent_means_default() -> None:
    assert matches_source(ixn("web", source_partition="default"), ident("web"))
    assert matches_source(ixn("web"), ident("web", partition="default"))
    assert not matches_source(ixn("web"), ident("web", partition="part1"))


# -- L4 for intentions with L7 permissions ---------------------------------------


def test_l7_intention_denies_the_connection_pending_per_request_checks() -> None:
    # As Consul's authorize API: an L7 intention is a deny at L4.  It is
    # marked per_request, so only a server that decides each request lifts it.
    table = compile_intentions(
        [ixn("web", permissions=(perm(path_prefix="/v1"),))], "api"
    )
    decision = decide_connection(table, ident("web"), False)
    assert decision is not None
    assert (decision.allowed, decision.source, decision.per_request) == (
        False,
        L7_SOURCE,
        True,
    )
    assert "connect_native.web.protect()" in decision.reason


def test_l7_intention_of_denials_only_denies_the_connection_under_default_deny() -> (
    None
):
    table = compile_intentions(
        [ixn("web", permissions=(perm("deny", path_prefix="/"),))], "api"
    )
    decision = decide_connection(table, ident("web"), False)
    assert decision is not None
    assert (decision.allowed, decision.source) == (False, MATCH_SOURCE)
    assert not decision.per_request


def test_l7_intention_of_denials_allows_the_connection_under_default_allow() -> None:
    # Requests no permission matches fall to the default, which allows.
    table = compile_intentions(
        [ixn("web", permissions=(perm("deny", path_exact="/admin"),))], "api"
    )
    decision = decide_connection(table, ident("web"), True)
    assert decision is not None
    assert (decision.allowed, decision.source, decision.per_request) == (
        False,
        L7_SOURCE,
        True,
    )


# -- L7 requests -----------------------------------------------------------------------


# (permission, request, matches?) : convertPermission's parts, one at a time.
HTTP_TABLE = [
    pytest.param(
        perm(path_exact="/v1/secret"), req(path="/v1/secret"), True, id="exact"
    ),
    pytest.param(
        perm(path_exact="/v1/secret"),
        req(path="/v1/secret/x"),
        False,
        id="exact-longer",
    ),
    pytest.param(
        perm(path_exact="/v1/secret"),
        req(path="/v1/secret?a=1"),
        True,
        id="exact-query",
    ),
    pytest.param(perm(path_prefix="/v1"), req(path="/v1/x"), True, id="prefix"),
    pytest.param(
        perm(path_prefix="/v1"), req(path="/v10"), True, id="prefix-not-segment"
    ),
    pytest.param(perm(path_prefix="/v1"), req(path="/v2"), False, id="prefix-miss"),
    pytest.param(perm(path_regex="/v[123]"), req(path="/v2"), True, id="regex"),
    pytest.param(perm(path_regex="/v[123]"), req(path="/v2/x"), False, id="regex-full"),
    pytest.param(
        perm(path_regex="/v[123]"), req(path="/x/v2"), False, id="regex-anchor"
    ),
    pytest.param(perm(methods=("GET", "HEAD")), req("HEAD"), True, id="method"),
    pytest.param(perm(methods=("GET", "HEAD")), req("POST"), False, id="method-miss"),
    pytest.param(perm(methods=("GET",)), req("get"), False, id="method-case"),
    pytest.param(
        perm(path_regex="/v[123]", methods=("GET", "HEAD", "OPTIONS")),
        req("DELETE", "/v1"),
        False,
        id="path-and-method",
    ),
]


@pytest.mark.parametrize(("permission", "request_", "expected"), HTTP_TABLE)
def test_http_match_table(
    permission: IntentionPermission, request_: HTTPRequest, expected: bool
) -> None:
    assert http_matches(permission.http, request_) is expected


# Header rules of rbac_test.go's "...single-intention-with-kitchen-sink-perms".
HEADER_TABLE = [
    pytest.param(hdr("x-foo", present=True), {"x-foo": ""}, True, id="present-empty"),
    pytest.param(hdr("x-foo", present=True), {}, False, id="present-missing"),
    pytest.param(hdr("x-bar", exact="xyz"), {"x-bar": "xyz"}, True, id="exact"),
    pytest.param(hdr("x-bar", exact="xyz"), {"x-bar": "XYZ"}, False, id="exact-case"),
    pytest.param(
        hdr("x-bar", exact="xyz", ignore_case=True),
        {"x-bar": "XYZ"},
        True,
        id="ignore-case",
    ),
    pytest.param(hdr("x-dib", prefix="gaz"), {"x-dib": "gazelle"}, True, id="prefix"),
    pytest.param(hdr("x-gir", suffix="zim"), {"x-gir": "gazim"}, True, id="suffix"),
    pytest.param(
        hdr("x-gir", suffix="zim"), {"x-gir": "zimx"}, False, id="suffix-miss"
    ),
    pytest.param(hdr("x-c", contains="mid"), {"x-c": "amidst"}, True, id="contains"),
    pytest.param(hdr("x-zim", regex="gi[rR]"), {"x-zim": "giR"}, True, id="regex"),
    pytest.param(
        hdr("x-zim", regex="gi[rR]"), {"x-zim": "gir!"}, False, id="regex-full"
    ),
    pytest.param(
        hdr("z-foo", present=True, invert=True), {}, True, id="inverted-present-missing"
    ),
    pytest.param(
        hdr("z-foo", present=True, invert=True),
        {"z-foo": "1"},
        False,
        id="inverted-present-there",
    ),
    pytest.param(
        hdr("z-bar", exact="xyz", invert=True), {"z-bar": "abc"}, True, id="inv"
    ),
    pytest.param(
        hdr("z-bar", exact="xyz", invert=True), {"z-bar": "xyz"}, False, id="inv-equal"
    ),
    pytest.param(
        # Envoy: a missing header matches nothing but an inverted Present.
        hdr("z-bar", exact="xyz", invert=True),
        {},
        False,
        id="inverted-exact-missing",
    ),
    pytest.param(hdr("X-Bar", exact="xyz"), {"x-bar": "xyz"}, True, id="name-case"),
]


@pytest.mark.parametrize(("rule", "headers", "expected"), HEADER_TABLE)
def test_header_rule_table(
    rule: IntentionHTTPHeaderPermission, headers: dict[str, str], expected: bool
) -> None:
    assert header_matches(rule, HTTPRequest.of("GET", "/", headers)) is expected


def test_repeated_header_values_are_joined_with_commas() -> None:
    headers = Headers({"x-tag": ["a", "b"]})
    request = HTTPRequest.of(b"GET", b"/", headers)
    assert header_matches(hdr("x-tag", exact="a,b"), request)
    assert not header_matches(hdr("x-tag", exact="a"), request)


def test_pseudo_headers_are_visible_to_header_rules() -> None:
    request = HTTPRequest.of("PUT", "/a?b=1", {"Host": "api.example"})
    assert header_matches(hdr(":method", exact="PUT"), request)
    assert header_matches(hdr(":path", exact="/a?b=1"), request)
    assert header_matches(hdr(":authority", exact="api.example"), request)


KITCHEN_SINK = (
    perm("deny", path_exact="/v1/secret"),
    perm("allow", path_prefix="/v1"),
    perm("allow", path_regex="/v[123]", methods=("GET", "HEAD", "OPTIONS")),
    perm("allow", headers=(hdr("x-foo", present=True), hdr("x-bar", exact="xyz"))),
)

# (request, default allows?, expected allowed, expected source)
L7_TABLE = [
    pytest.param(req(path="/v1/secret"), False, False, MATCH_SOURCE, id="first-deny"),
    pytest.param(req(path="/v1/other"), False, True, MATCH_SOURCE, id="prefix-allow"),
    pytest.param(req("GET", "/v3"), False, True, MATCH_SOURCE, id="regex-method"),
    pytest.param(
        req("POST", "/v3"), False, False, DEFAULT_SOURCE, id="none-deny-default"
    ),
    pytest.param(
        req("POST", "/v3"), True, True, DEFAULT_SOURCE, id="none-allow-default"
    ),
    pytest.param(
        req("POST", "/x", x_foo="1", x_bar="xyz"),
        False,
        True,
        MATCH_SOURCE,
        id="headers",
    ),
    pytest.param(
        req("POST", "/x", x_foo="1", x_bar="no"),
        False,
        False,
        DEFAULT_SOURCE,
        id="one-hdr",
    ),
]


@pytest.mark.parametrize(("request_", "default", "allowed", "source"), L7_TABLE)
def test_first_matching_permission_decides(
    request_: HTTPRequest, default: bool, allowed: bool, source: str
) -> None:
    table = compile_intentions([ixn("web", permissions=KITCHEN_SINK)], "api")
    decision = decide_http(table, ident("web"), request_, default)
    assert decision is not None
    assert (decision.allowed, decision.source) == (allowed, source)


def test_unmatched_request_falls_to_the_default_not_to_a_lower_intention() -> None:
    # rbac_test.go "default-deny-allow-all-and-path-deny": web's L7 intention
    # excludes web from *->api allow; web's unmatched request is the default's.
    table = compile_intentions(
        [ixn("web", permissions=(perm("deny", path_prefix="/admin"),)), ixn("*")], "api"
    )
    decision = decide_http(table, ident("web"), req(path="/public"), False)
    assert decision is not None
    assert (decision.allowed, decision.source) == (False, DEFAULT_SOURCE)
    other = decide_http(table, ident("cron"), req(path="/public"), False)
    assert other is not None
    assert other.allowed


def test_l4_intention_decides_every_request() -> None:
    table = compile_intentions([ixn("web", action="deny")], "api")
    decision = decide_http(table, ident("web"), req(path="/"), True)
    assert decision is not None
    assert (decision.allowed, decision.source) == (False, MATCH_SOURCE)


def test_no_match_with_an_undecided_default_is_none() -> None:
    table = compile_intentions(
        [ixn("web", permissions=(perm(path_exact="/a"),))], "api"
    )
    assert decide_http(table, ident("web"), req(path="/b"), None) is None
    assert decide_http(table, ident("cron"), req(path="/a"), None) is None


# -- validation -----------------------------------------------------------------------

INVALID = [
    pytest.param(
        perm(path_exact="/a", path_prefix="/b"), "at most one of", id="two-paths"
    ),
    pytest.param(perm(path_exact="a"), "doesn't start with '/'", id="relative-exact"),
    pytest.param(perm(path_prefix="a"), "doesn't start with '/'", id="relative-prefix"),
    pytest.param(perm(path_regex="("), "PathRegex", id="bad-regex"),
    pytest.param(perm(), "should not be empty", id="empty"),
    pytest.param(perm(methods=("FETCH",)), "invalid method 'FETCH'", id="bad-method"),
    pytest.param(perm(methods=("GET", "GET")), "more than once", id="dup-method"),
    pytest.param(perm(headers=(hdr(""),)), "missing required Name", id="no-name"),
    pytest.param(
        perm(headers=(hdr("x", exact="a", prefix="b"),)),
        "only contain one of",
        id="two",
    ),
    pytest.param(perm(headers=(hdr("x"),)), "only contain one of", id="no-rule"),
    pytest.param(
        IntentionPermission(
            action="maybe", http=IntentionHTTPPermission(path_exact="/")
        ),
        "'allow' or 'deny'",
        id="action",
    ),
    pytest.param(IntentionPermission(action="allow"), "HTTP is required", id="no-http"),
]


@pytest.mark.parametrize(("permission", "message"), INVALID)
def test_invalid_permissions_are_refused_naming_the_field(
    permission: IntentionPermission, message: str
) -> None:
    with pytest.raises(
        InvalidPermission, match=re.escape("Sources[0].Permissions[2]")
    ) as e:
        validate_permission(permission, "Sources[0].Permissions[2]")
    assert message in str(e.value)


def test_an_intention_with_an_unusable_permission_denies_its_source() -> None:
    table = compile_intentions(
        [ixn("web", permissions=(perm(path_regex="("),)), ixn("*")], "api"
    )
    assert table.invalid
    for check in (
        decide_connection(table, ident("web"), True),
        decide_http(table, ident("web"), req(), True),
    ):
        assert check is not None
        assert not check.allowed
        assert "PathRegex" in check.reason
    other = decide_connection(table, ident("cron"), False)
    assert other is not None
    assert other.allowed


def test_the_destination_name_compares_case_insensitively_as_consul() -> None:
    # "* => web allow" and "evil => Web deny": the agent denies evil.
    table = compile_intentions(
        [ixn("*", "web", "allow"), ixn("evil", "Web", "deny")], "web"
    )
    decision = decide_connection(table, ident("evil"), True)
    assert decision is not None
    assert not decision.allowed
    assert "Web" in decision.reason


def test_the_source_name_compares_exactly_as_consul() -> None:
    table = compile_intentions(
        [ixn("*", "web", "allow"), ixn("Evil", "web", "deny")], "web"
    )
    decision = decide_connection(table, ident("evil"), False)
    assert decision is not None
    assert decision.allowed
