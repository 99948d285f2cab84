"""
The development agent's ACLs beyond what the shared suite compares with a
real agent (``tests/test_agent_suite.py``, ``test_acl_*``): the rules engine
(exact over prefix, deny over write over read, intentions following the
service policy, JSON rules), default policy ``allow``, service identities,
ACLs off, and the command-line options.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.task import Clock

from connect_native.devagent import DevAgent
from connect_native.devagent.__main__ import parse_args
from connect_native.devagent.tables.acl_rules import (
    Authorizer,
    Rules,
    RulesError,
    parse_rules,
)
from tests.test_devagent_support import Answer, Harness

MASTER = "b6a0d5c8-1c39-4f0e-9d8e-5f7a1b2c3d4e"


def acl_harness(default: str = "deny") -> Harness:
    return Harness(acl_default_policy=default, master_token=MASTER)


def call(
    h: Harness, method: str, path: str, body: Any = None, token: str | None = None
) -> Answer:
    data = None if body is None else json.dumps(body)
    headers = {} if token is None else {"X-Consul-Token": token}
    return h.call(method, path, data, headers)


def token_with(h: Harness, rules: str = "", **extra: Any) -> str:
    name = f"p{len(h.agent.acl_table._policies)}"
    assert (
        call(h, "PUT", "/v1/acl/policy", {"Name": name, "Rules": rules}, MASTER).status
        == 200
    )
    made = call(
        h, "PUT", "/v1/acl/token", {"Policies": [{"Name": name}], **extra}, MASTER
    )
    assert made.status == 200, made.text
    secret: str = made.json()["SecretID"]
    return secret


def authorizer(rules: str, *, default_allow: bool = False) -> Authorizer:
    return Authorizer(parse_rules(rules), default_allow)


def test_exact_rule_beats_a_longer_prefix() -> None:
    a = authorizer(
        'service "web" { policy = "read" }\nservice_prefix "we" { policy = "write" }'
    )
    assert a.service_read("web")
    assert not a.service_write("web")
    assert a.service_write("wet")


def test_longest_prefix_wins() -> None:
    a = authorizer(
        'service_prefix "" { policy = "write" }\n'
        'service_prefix "db" { policy = "deny" }'
    )
    assert a.service_write("web")
    assert not a.service_read("db-1")


def test_deny_beats_write_across_policies() -> None:
    merged = Rules.merge(
        [
            parse_rules('service "web" { policy = "write" }'),
            parse_rules('service "web" { policy = "deny" }'),
        ]
    )
    assert not Authorizer(merged, True).service_read("web")


def test_intentions_follow_the_service_policy_unless_given() -> None:
    a = authorizer(
        'service "web" { policy = "write" }\n'
        'service "db" { policy = "deny" }\n'
        'service "api" { policy = "read" intentions = "write" }'
    )
    assert a.intention_read("web")
    assert not a.intention_write("web")
    assert not a.intention_read("db")
    assert a.intention_write("api")


def test_json_rules_and_comments() -> None:
    a = authorizer('{"service": {"db": {"policy": "write"}}, "operator": "read"}')
    assert a.service_write("db")
    assert a.allowed("operator", "", "read")
    b = authorizer('# a comment\nservice "x" {\n  policy = "read" // why\n}')
    assert b.service_read("x")


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            'service "x" { policy = "bogus" }',
            'Invalid service policy: &acl.ServiceRule{Name:"x", Policy:"bogus", '
            'Intentions:"", EnterpriseRule:acl.EnterpriseRule{}}',
        ),
        (
            "garbage {",
            "Failed to parse ACL rules: At 1:11: object expected closing RBRACE "
            "got: EOF",
        ),
        ('operator = "all"', 'Invalid operator policy: "all"'),
    ],
)
def test_bad_rules_are_refused_with_consuls_message(rules: str, message: str) -> None:
    with pytest.raises(RulesError) as raised:
        parse_rules(rules)
    assert str(raised.value) == message


def test_unknown_resources_are_ignored_as_in_1_8_7() -> None:
    assert parse_rules('foo "x" { policy = "read" }') == Rules()


def test_default_allow_allows_without_rules_but_not_acl_management() -> None:
    h = acl_harness("allow")
    assert call(h, "GET", "/v1/agent/connect/ca/leaf/web").status == 200
    answer = call(
        h,
        "POST",
        "/v1/agent/connect/authorize",
        {"Target": "web", "ClientCertURI": h.uri("api")},
    )
    assert answer.json() == {
        "Authorized": True,
        "Reason": "Default behavior configured by ACLs",
    }
    check = call(h, "GET", "/v1/connect/intentions/check?source=a&destination=web")
    assert check.json() == {"Allowed": True}
    refused = call(h, "PUT", "/v1/acl/policy", {"Name": "x"})
    assert (refused.status, refused.text) == (403, "Permission denied")


def test_a_rule_denies_under_default_allow() -> None:
    h = acl_harness("allow")
    token = token_with(h, 'service "web" { policy = "deny" }')
    answer = call(h, "GET", "/v1/agent/connect/ca/leaf/web", token=token)
    assert (answer.status, answer.text) == (403, "Permission denied")


def test_global_management_policy_makes_a_management_token() -> None:
    h = acl_harness()
    made = call(
        h,
        "PUT",
        "/v1/acl/token",
        {"Policies": [{"Name": "global-management"}]},
        MASTER,
    )
    token = made.json()["SecretID"]
    assert made.json()["Policies"] == [
        {"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}
    ]
    assert call(h, "GET", "/v1/agent/self", token=token).status == 200


def test_service_identity_grants_write_on_the_name_and_its_sidecar() -> None:
    h = acl_harness()
    made = call(
        h,
        "PUT",
        "/v1/acl/token",
        {"ServiceIdentities": [{"ServiceName": "web"}]},
        MASTER,
    )
    assert made.json()["ServiceIdentities"] == [{"ServiceName": "web"}]
    token = made.json()["SecretID"]
    for name, status in (("web", 200), ("web-sidecar-proxy", 200), ("db", 403)):
        answer = call(h, "GET", f"/v1/agent/connect/ca/leaf/{name}", token=token)
        assert (name, answer.status) == (name, status)
    assert (
        call(h, "GET", "/v1/health/connect/db", token=token).header(
            "X-Consul-Knownleader"
        )
        == "true"
    )


def test_token_from_bearer_and_query() -> None:
    h = acl_harness()
    token = token_with(h, 'service "web" { policy = "write" }')
    bearer = h.call(
        "GET",
        "/v1/agent/connect/ca/leaf/web",
        headers={"Authorization": f"Bearer {token}"},
    )
    query = h.get(f"/v1/agent/connect/ca/leaf/web?token={token}")
    assert (bearer.status, query.status) == (200, 200)


def test_acls_off_ignore_tokens_and_refuse_acl_endpoints() -> None:
    h = Harness()
    leaf = call(h, "GET", "/v1/agent/connect/ca/leaf/web", token="anything")
    assert leaf.status == 200
    answer = call(h, "PUT", "/v1/acl/policy", {"Name": "x"}, "anything")
    assert (answer.status, answer.text) == (401, "ACL support disabled")


def test_agent_self_reports_the_acl_settings() -> None:
    config = call(acl_harness(), "GET", "/v1/agent/self", token=MASTER).json()
    debug = config["DebugConfig"]
    assert (debug["ACLsEnabled"], debug["ACLDefaultPolicy"]) == (True, "deny")


def test_the_master_token_is_never_logged_or_shown() -> None:
    h = acl_harness()
    body = call(h, "GET", "/v1/agent/self", token=MASTER).text
    assert MASTER not in body


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"acl_default_policy": "maybe"}, "acl_default_policy"),
        ({"master_token": "x"}, "master_token"),
        ({"acl_default_policy": "deny", "master_token": ""}, "master_token"),
    ],
)
def test_bad_acl_options(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        DevAgent(Clock(), **kwargs)


def test_command_line_acl_options() -> None:
    args = parse_args(["--acl-default-policy", "deny", "--master-token", "T"])
    assert (args.acl_default_policy, args.master_token) == ("deny", "T")
    assert parse_args([]).acl_default_policy is None
    with pytest.raises(SystemExit):
        parse_args(["--master-token", "T"])
    with pytest.raises(SystemExit):
        parse_args(["--acl-default-policy", "sometimes"])
