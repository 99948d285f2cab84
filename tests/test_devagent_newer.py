"""
The development agent's Consul 1.9+ layer: ``/v1/connect/intentions/exact``,
``service-intentions`` config entries with L7 ``Permissions`` and their
effect on match, check and authorize, the newer authorize reasons and the
OSS 400 for namespaces on intention endpoints.

1.9+, from the source (``agent/intentions_endpoint.go``,
``agent/config_endpoint.go``, ``agent/structs/config_entry_intentions.go``
and ``API.md``), not compared with a real agent: the only real agent here is
1.8.7, whose answers the default ``version="1.8.7"`` keeps (checked at the
top of this file against what was measured).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
from klein import Klein
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.web.iweb import IRequest
from twisted.web.server import Site

import connect_native.http
from connect_native.authorize.rules import compile_intentions, decide_http
from connect_native.consul.client import ConsulClient
from connect_native.consul.records import (
    IntentionHTTPHeaderPermission,
    IntentionPermission,
    decode_intentions,
)
from connect_native.web import protect
from tests.agents import AgentUnderTest, serve_dev_agent
from tests.test_devagent_support import Harness
from tests.test_intentions import KITCHEN_SINK, L7_TABLE, ident

NEWER = "1.10.0"
NS_REFUSED = (
    'Bad request: Invalid query parameter: "ns" - Namespaces are a Consul '
    "Enterprise feature"
)


def newer(version: str = NEWER) -> Harness:
    return Harness(version=version)


def put_entry(h: Harness, name: str, sources: list[dict[str, Any]]) -> Any:
    return h.put(
        "/v1/config",
        {"Kind": "service-intentions", "Name": name, "Sources": sources},
    )


def header_json(rule: IntentionHTTPHeaderPermission) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": rule.name}
    for key, value in (
        ("Present", rule.present),
        ("Exact", rule.exact),
        ("Prefix", rule.prefix),
        ("Suffix", rule.suffix),
        ("Contains", rule.contains),
        ("Regex", rule.regex),
        ("Invert", rule.invert),
        ("IgnoreCase", rule.ignore_case),
    ):
        if value:
            out[key] = value
    return out


def permission_json(permission: IntentionPermission) -> dict[str, Any]:
    """A library permission record as a client writes it to Consul."""
    http: dict[str, Any] = {}
    assert permission.http is not None
    for key, value in (
        ("PathExact", permission.http.path_exact),
        ("PathPrefix", permission.http.path_prefix),
        ("PathRegex", permission.http.path_regex),
    ):
        if value:
            http[key] = value
    if permission.http.headers:
        http["Header"] = [header_json(h) for h in permission.http.headers]
    if permission.http.methods:
        http["Methods"] = list(permission.http.methods)
    return {"Action": permission.action, "HTTP": http}


# -- 1.8.7 by default (measured on the real agent) -------------------------------------


def test_default_version_answers_exact_and_config_as_1_8_7() -> None:
    h = Harness()
    exact = h.get("/v1/connect/intentions/exact?source=a&destination=b")
    assert (exact.status, exact.text) == (
        400,
        "Bad request: failed intention lookup: index error: UUID must be 36 characters",
    )
    config = h.get("/v1/config/service-intentions")
    assert (config.status, config.text) == (
        500,
        "invalid config entry kind: service-intentions",
    )
    assert h.get("/v1/connect/intentions?ns=x").status == 200


@pytest.mark.parametrize("version", ["1.8", "1.8.6", "two", ""])
def test_bad_versions_are_refused(version: str) -> None:
    with pytest.raises(ValueError, match="version"):
        Harness(version=version)


def test_agent_self_reports_the_version() -> None:
    assert newer().get("/v1/agent/self").json()["Config"]["Version"] == NEWER


# -- config entries -------------------------------------------------------------------


def test_config_entry_round_trip() -> None:
    h = newer()
    written = put_entry(
        h,
        "api",
        [
            {"Name": "*", "Action": "deny"},
            {
                "Name": "web",
                "Permissions": [
                    {
                        "Action": "allow",
                        "HTTP": {"PathPrefix": "/v1", "Methods": ["get"]},
                    }
                ],
            },
        ],
    )
    assert (written.status, written.json()) == (200, True)
    entry = h.get("/v1/config/service-intentions/api")
    assert entry.header("X-Consul-Index") is not None
    body = entry.json()
    assert (body["Kind"], body["Name"]) == ("service-intentions", "api")
    # Ordered by precedence, methods upper-cased, types defaulted.
    assert body["Sources"] == [
        {
            "Name": "web",
            "Permissions": [
                {"Action": "allow", "HTTP": {"PathPrefix": "/v1", "Methods": ["GET"]}}
            ],
            "Precedence": 9,
            "Type": "consul",
        },
        {"Name": "*", "Action": "deny", "Precedence": 8, "Type": "consul"},
    ]
    assert [e["Name"] for e in h.get("/v1/config/service-intentions").json()] == ["api"]
    deleted = h.call("DELETE", "/v1/config/service-intentions/api")
    assert (deleted.status, deleted.json()) == (200, True)
    missing = h.get("/v1/config/service-intentions/api")
    assert (missing.status, missing.text) == (
        404,
        'Config entry not found for "service-intentions" / "api"',
    )


def test_config_entry_cas() -> None:
    h = newer()
    sources = [{"Name": "web", "Action": "allow"}]
    assert h.put("/v1/config?cas=0", _entry("api", sources)).json() is True
    assert h.put("/v1/config?cas=0", _entry("api", sources)).json() is False
    index = h.get("/v1/config/service-intentions/api").json()["ModifyIndex"]
    assert h.put(f"/v1/config?cas={index}", _entry("api", sources)).json() is True


def _entry(name: str, sources: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Kind": "service-intentions", "Name": name, "Sources": sources}


INVALID_ENTRIES = [
    ([], "At least one source is required"),
    ([{"Action": "allow"}], "Sources[0].Name is required"),
    ([{"Name": "web"}], "Sources[0].Action must be set to 'allow' or 'deny'"),
    (
        [{"Name": "we*", "Action": "allow"}],
        "Sources[0].Name: wildcard character '*' cannot be used with partial values",
    ),
    (
        [
            {
                "Name": "web",
                "Action": "allow",
                "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}],
            }
        ],
        "Sources[0].Action must be omitted if Permissions are specified",
    ),
    (
        [{"Name": "web", "Permissions": [{"Action": "allow"}]}],
        "Sources[0].Permissions[0].HTTP is required",
    ),
    (
        [{"Name": "web", "Permissions": [{"Action": "allow", "HTTP": {}}]}],
        "Sources[0].Permissions[0].HTTP should not be empty",
    ),
    (
        [{"Name": "web", "Permissions": [{"Action": "x", "HTTP": {"PathExact": "/"}}]}],
        "Sources[0].Permissions[0].Action must be set to 'allow' or 'deny'",
    ),
    (
        [
            {
                "Name": "web",
                "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "a"}}],
            }
        ],
        "Sources[0].Permissions[0].HTTP.PathExact doesn't start with '/': \"a\"",
    ),
    (
        [
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "allow", "HTTP": {"PathExact": "/a", "PathRegex": "/b"}}
                ],
            }
        ],
        "Sources[0].Permissions[0].HTTP should only contain at most one of "
        "PathExact, PathPrefix, or PathRegex",
    ),
    (
        [
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "allow", "HTTP": {"Header": [{"Exact": "x"}]}}
                ],
            }
        ],
        "Sources[0].Permissions[0].HTTP.Header[0] missing required Name field",
    ),
    (
        [
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "allow", "HTTP": {"Methods": ["GET", "BREW"]}}
                ],
            }
        ],
        'Sources[0].Permissions[0].HTTP.Methods contains an invalid method "BREW"',
    ),
    (
        [
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "allow", "HTTP": {"Methods": ["GET", "get"]}}
                ],
            }
        ],
        'Sources[0].Permissions[0].HTTP.Methods contains "GET" more than once',
    ),
    (
        [{"Name": "web", "Action": "allow"}, {"Name": "web", "Action": "deny"}],
        'Sources[1] defines "default/web" more than once',
    ),
]


@pytest.mark.parametrize(("sources", "message"), INVALID_ENTRIES)
def test_invalid_entries_are_refused_with_consuls_message(
    sources: list[dict[str, Any]], message: str
) -> None:
    answer = put_entry(newer(), "api", sources)
    assert (answer.status, answer.text) == (500, message)


def test_permissions_are_refused_on_a_wildcard_destination() -> None:
    answer = put_entry(
        newer(),
        "*",
        [
            {
                "Name": "web",
                "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}}],
            }
        ],
    )
    assert answer.text == (
        "Sources[0].Permissions cannot be specified on intentions with wildcarded "
        "destinations"
    )


def test_other_kinds_are_refused_with_a_reason() -> None:
    answer = newer().get("/v1/config/service-defaults")
    assert answer.status == 500
    assert "only service-intentions" in answer.text


# -- match, check and authorize with L7 entries ----------------------------------------


def test_match_carries_the_permissions_and_no_legacy_fields() -> None:
    h = newer()
    put_entry(
        h,
        "api",
        [{"Name": "web", "Permissions": [permission_json(p) for p in KITCHEN_SINK]}],
    )
    (found,) = h.get("/v1/connect/intentions/match?by=destination&name=api").json()[
        "api"
    ]
    assert "ID" not in found
    assert "Action" not in found
    assert "CreatedAt" not in found
    assert found["Permissions"] == [permission_json(p) for p in KITCHEN_SINK]
    (decoded,) = decode_intentions([found])
    assert decoded.permissions == KITCHEN_SINK


@pytest.mark.parametrize(("request_", "default", "allowed", "source"), L7_TABLE)
def test_l7_table_through_the_agents_match_answer(
    request_: Any, default: bool, allowed: bool, source: str
) -> None:
    # issue 8's table, with the intentions as the agent stores and serves them.
    h = newer()
    put_entry(
        h,
        "api",
        [{"Name": "web", "Permissions": [permission_json(p) for p in KITCHEN_SINK]}],
    )
    served = h.get("/v1/connect/intentions/match?by=destination&name=api").json()
    table = compile_intentions(decode_intentions(served["api"]), "api")
    decision = decide_http(table, ident("web"), request_, default)
    assert decision is not None
    assert (decision.allowed, decision.source) == (allowed, source)


def test_check_counts_an_l7_intention_as_deny() -> None:
    h = newer()
    put_entry(
        h,
        "api",
        [
            {"Name": "web", "Permissions": [permission_json(KITCHEN_SINK[1])]},
            {"Name": "db", "Action": "allow"},
        ],
    )
    check = "/v1/connect/intentions/check?destination=api&source="
    assert h.get(check + "web").json() == {"Allowed": False}
    assert h.get(check + "db").json() == {"Allowed": True}


def authorize(h: Harness, target: str, source: str) -> dict[str, Any]:
    body: dict[str, Any] = h.post(
        "/v1/agent/connect/authorize",
        {"Target": target, "ClientCertURI": h.uri(source)},
    ).json()
    return body


def test_authorize_denies_an_l7_intention_with_the_newer_reasons() -> None:
    h = newer()
    put_entry(
        h,
        "api",
        [
            {"Name": "web", "Permissions": [permission_json(p) for p in KITCHEN_SINK]},
            {"Name": "db", "Action": "allow"},
        ],
    )
    assert authorize(h, "api", "web") == {
        "Authorized": False,
        "Reason": "Matched L7 intention: default/web => default/api "
        "(Precedence: 9, Permissions: 4)",
    }
    assert authorize(h, "api", "db") == {
        "Authorized": True,
        "Reason": "Matched L4 intention: default/db => default/api "
        "(Precedence: 9, Action: ALLOW)",
    }


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        ("1.8.7", "ACLs disabled, access is allowed by default"),
        ("1.10.0", "ACLs disabled, access is allowed by default"),
        ("1.11.0", "Default behavior configured by ACLs"),
    ],
)
def test_no_match_reason_by_version(version: str, reason: str) -> None:
    assert authorize(Harness(version=version), "api", "web") == {
        "Authorized": True,
        "Reason": reason,
    }


def test_legacy_intentions_get_the_newer_reason_with_their_id() -> None:
    h = newer()
    created = h.post(
        "/v1/connect/intentions",
        {"SourceName": "web", "DestinationName": "api", "Action": "deny"},
    ).json()["ID"]
    assert authorize(h, "api", "web")["Reason"] == (
        f"Matched L4 intention: default/web => default/api (ID: {created}, "
        "Precedence: 9, Action: DENY)"
    )
    # An entry may not define the same source again.
    clash = put_entry(h, "api", [{"Name": "web", "Action": "allow"}])
    assert clash.status == 500
    assert clash.text.startswith("duplicate intention found: ")


# -- exact -----------------------------------------------------------------------------


def test_exact_put_get_delete() -> None:
    h = newer()
    exact = "/v1/connect/intentions/exact?source=web&destination=api"
    missing = h.get(exact)
    assert (missing.status, missing.text) == (404, "Intention not found")
    put = h.call("PUT", exact, '{"Action": "allow", "Description": "d"}')
    assert (put.status, put.json()) == (200, True)
    got = h.get(exact)
    assert got.header("X-Consul-Index") is None
    assert got.json() == {
        "Description": "d",
        "SourceNS": "default",
        "SourceName": "web",
        "DestinationNS": "default",
        "DestinationName": "api",
        "SourceType": "consul",
        "Action": "allow",
        "Precedence": 9,
        "CreateIndex": got.json()["CreateIndex"],
        "ModifyIndex": got.json()["ModifyIndex"],
    }
    h.call(
        "PUT",
        "/v1/connect/intentions/exact?source=db&destination=api",
        '{"Permissions": [{"Action": "deny", "HTTP": {"PathPrefix": "/admin"}}]}',
    )
    entry = h.get("/v1/config/service-intentions/api").json()
    assert [s["Name"] for s in entry["Sources"]] == ["web", "db"]
    deleted = h.call("DELETE", exact)
    assert (deleted.status, deleted.json()) == (200, True)
    assert h.get(exact).status == 404


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("destination=api", "required query parameter 'source' not set"),
        ("source=web", "required query parameter 'destination' not set"),
    ],
)
def test_exact_needs_both_names(query: str, message: str) -> None:
    answer = newer().get(f"/v1/connect/intentions/exact?{query}")
    assert (answer.status, answer.text) == (500, message)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/connect/intentions?ns=team",
        "/v1/connect/intentions/match?by=source&name=web&ns=team",
        "/v1/connect/intentions/check?source=a&destination=b&ns=team",
        "/v1/connect/intentions/exact?source=a&destination=b&ns=team",
    ],
)
def test_newer_versions_refuse_namespaces_on_intentions(path: str) -> None:
    answer = newer().get(path)
    assert (answer.status, answer.text) == (400, NS_REFUSED)


def test_a_match_watcher_is_woken_by_an_entry_write() -> None:
    h = newer()
    index = h.get("/v1/connect/intentions").header("X-Consul-Index")
    pending = h.start(
        "GET", f"/v1/connect/intentions/match?by=destination&name=api&index={index}"
    )
    h.advance(1)
    assert not pending.done
    put_entry(h, "api", [{"Name": "web", "Action": "allow"}])
    assert pending.done


# -- end to end: a Klein app protected per request by an L7 entry ----------------------

BOUND = 15.0


async def eventually(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    deadline = time.monotonic() + BOUND
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {BOUND:g}s: {what}")
        await deferLater(reactor, 0.05, lambda: None)


class Pages:
    app = Klein()

    @app.route("/public")
    def public(self, request: IRequest) -> str:
        return "public\n"

    @app.route("/admin")
    def admin(self, request: IRequest) -> str:
        return "admin\n"


@pytest_twisted.async_yield_fixture
async def newer_agent() -> AsyncIterator[AgentUnderTest]:
    served = serve_dev_agent(version=NEWER)
    yield served
    await served.close()


@pytest_twisted.ensureDeferred
async def test_l7_entry_protects_a_klein_app_per_request(
    newer_agent: AgentUnderTest,
) -> None:
    agent = newer_agent
    written = await agent.http.put(
        "/v1/config",
        _entry(
            "web",
            [
                {
                    "Name": "frontend",
                    "Permissions": [
                        {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                        {
                            "Action": "allow",
                            "HTTP": {"PathExact": "/public", "Methods": ["GET"]},
                        },
                    ],
                }
            ],
        ),
    )
    assert written.json() is True
    address = agent.address.replace(":", "\\:")
    endpoint = serverFromString(
        reactor,
        f"connect:web:port=0:interface=127.0.0.1:consul={address}:"
        "authorize=intentions:register=yes",
    )
    opened: list[Any] = []
    try:
        port = await endpoint.listen(
            Site(protect(Pages().app.resource(), endpoint.authorizer))
        )
        opened.append(port)

        async def healthy() -> bool:
            answer = await agent.http.get("/v1/health/connect/web?passing=1")
            return len(answer.json()) == 1

        await eventually("web is registered and passing", healthy)
        caller = ConsulClient(reactor, address=agent.address, timeout=BOUND)
        frontend = connect_native.http.client(
            "frontend", reactor=reactor, consul=caller
        )
        opened.append(frontend)
        public = await frontend.get("https://web.service.consul/public")
        assert (public.code, await public.text()) == (200, "public\n")
        admin = await frontend.get("https://web.service.consul/admin")
        await admin.content()
        assert admin.code == 403
        # No permission matches a POST: the default (deny) decides.
        posted = await frontend.post("https://web.service.consul/public")
        await posted.content()
        assert posted.code == 403
    finally:
        for thing in reversed(opened):
            if hasattr(thing, "stopListening"):
                await thing.stopListening()
            else:
                await thing.close()
