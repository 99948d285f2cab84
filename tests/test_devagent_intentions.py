"""
Intentions on the development agent: precedence, validation and the
create/read/update/delete errors of real Consul 1.8.7 (``REAL-BEHAVIOUR.md``
section 7).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_devagent_support import Harness

INTENTIONS = "/v1/connect/intentions"


def create(h: Harness, **fields: Any) -> str:
    body = {"SourceName": "api", "DestinationName": "web", "Action": "allow", **fields}
    answer = h.post(INTENTIONS, body)
    assert answer.status == 200, answer.text
    intention_id: str = answer.json()["ID"]
    return intention_id


@pytest.mark.parametrize(
    ("source_ns", "source", "destination_ns", "destination", "precedence"),
    [
        ("", "api", "", "web", 9),
        ("", "*", "", "web", 8),
        ("", "api", "", "*", 6),
        ("", "*", "", "*", 5),
        ("*", "*", "", "web", 7),
        ("*", "*", "*", "*", 1),
    ],
)
def test_precedence(
    source_ns: str, source: str, destination_ns: str, destination: str, precedence: int
) -> None:
    h = Harness()
    intention_id = create(
        h,
        SourceNS=source_ns,
        SourceName=source,
        DestinationNS=destination_ns,
        DestinationName=destination,
    )
    body = h.get(f"{INTENTIONS}/{intention_id}").json()
    assert body["Precedence"] == precedence
    assert body["SourceNS"] == (source_ns or "default")


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        (
            {"Action": "maybe", "SourceType": "foo"},
            "2 errors occurred:\n\t* Action must be set to 'allow' or 'deny'\n"
            "\t* SourceType must be set to 'consul'\n\n",
        ),
        (
            {"SourceName": "", "DestinationName": ""},
            "2 errors occurred:\n\t* SourceName must be set\n"
            "\t* DestinationName must be set\n\n",
        ),
        (
            {"SourceNS": "*", "SourceName": "api"},
            "1 error occurred:\n\t* SourceName: exact value cannot follow wildcard "
            "namespace\n\n",
        ),
        (
            {"DestinationName": "we*"},
            "1 error occurred:\n\t* DestinationName: wildcard character '*' cannot be "
            "used with partial values\n\n",
        ),
        (
            {"Description": "x" * 513},
            "1 error occurred:\n\t* Description exceeds maximum length 512\n\n",
        ),
        (
            {"ID": "00000000-0000-0000-0000-000000000001"},
            "ID must be empty when creating a new intention",
        ),
        (
            {"Precedence": "high"},
            "Failed to decode request body: json: cannot unmarshal string into Go "
            "struct field .Precedence of type int",
        ),
    ],
)
def test_create_errors_are_500(fields: dict[str, Any], text: str) -> None:
    h = Harness()
    body = {"SourceName": "api", "DestinationName": "web", "Action": "allow", **fields}
    answer = h.post(INTENTIONS, body)
    assert (answer.status, answer.text) == (500, text)
    assert h.get(INTENTIONS).json() == []


def test_other_namespaces_are_stored_as_given_like_consul_1_8_oss() -> None:
    h = Harness()
    intention_id = create(h, SourceNS="team", DestinationNS="other")
    body = h.get(f"{INTENTIONS}/{intention_id}").json()
    assert (body["SourceNS"], body["DestinationNS"], body["Precedence"]) == (
        "team",
        "other",
        9,
    )
    match = h.get(f"{INTENTIONS}/match?by=destination&name=web&name=other/web")
    assert match.json()["web"] is None
    assert [i["ID"] for i in match.json()["other/web"]] == [intention_id]


def test_time_and_hash_fields_in_a_body_are_ignored() -> None:
    h = Harness()
    intention_id = create(h, CreatedAt="x", Hash="!!", Precedence=3)
    body = h.get(f"{INTENTIONS}/{intention_id}").json()
    assert body["CreatedAt"] != "x"
    assert body["Precedence"] == 9


def test_a_new_intention_is_created_and_updated_at_one_instant() -> None:
    h = Harness()
    body = h.get(f"{INTENTIONS}/{create(h)}").json()
    assert body["CreatedAt"] == body["UpdatedAt"]


def test_list_is_empty_array_with_an_index() -> None:
    answer = Harness().get(INTENTIONS)
    assert answer.json() == []
    assert answer.header("X-Consul-Index") == "1"


def test_update_of_unknown_intention_is_a_500() -> None:
    unknown = "00000000-0000-0000-0000-000000000000"
    answer = Harness().put(
        f"{INTENTIONS}/{unknown}",
        {"SourceName": "a", "DestinationName": "b", "Action": "allow"},
    )
    assert (answer.status, answer.text) == (
        500,
        f"Cannot modify non-existent intention: '{unknown}'",
    )


def test_update_into_a_duplicate_is_refused() -> None:
    h = Harness()
    first = create(h)
    second = create(h, SourceName="db")
    answer = h.put(
        f"{INTENTIONS}/{second}",
        {"SourceName": "api", "DestinationName": "web", "Action": "deny"},
    )
    assert answer.status == 500
    assert answer.text == (
        "duplicate intention found: ALLOW default/api => default/web "
        f"(ID: {first}, Precedence: 9)"
    )


@pytest.mark.parametrize(
    ("source", "destination"), [("api", "Web"), ("API", "web"), ("Api", "WEB")]
)
def test_a_duplicate_is_found_whatever_the_case(source: str, destination: str) -> None:
    # Measured on 1.8.7: its intentions table indexes both sides lowercased.
    h = Harness()
    first = create(h)
    answer = h.post(
        INTENTIONS,
        {"SourceName": source, "DestinationName": destination, "Action": "deny"},
    )
    assert (answer.status, answer.text) == (
        500,
        "duplicate intention found: ALLOW default/api => default/web "
        f"(ID: {first}, Precedence: 9)",
    )
    second = create(h, SourceName="db")
    moved = h.put(
        f"{INTENTIONS}/{second}",
        {"SourceName": source, "DestinationName": destination, "Action": "deny"},
    )
    assert moved.status == 500
    assert moved.text.startswith("duplicate intention found: ")


def test_match_folds_the_case_and_check_compares_the_source_exactly() -> None:
    # Measured on 1.8.7 with "* => web allow" and "evil => Web deny": match
    # finds both for web, WEB or Web (and by source for EVIL); the agent's
    # answers compare the caller with the source exactly.
    h = Harness()
    create(h, SourceName="*", DestinationName="web", Action="allow")
    create(h, SourceName="evil", DestinationName="Web", Action="deny")
    for name in ("web", "WEB"):
        found = h.get(f"{INTENTIONS}/match?by=destination&name={name}").json()[name]
        assert [(i["SourceName"], i["DestinationName"]) for i in found] == [
            ("evil", "Web"),
            ("*", "web"),
        ]
    by_source = h.get(f"{INTENTIONS}/match?by=source&name=EVIL").json()["EVIL"]
    assert [i["DestinationName"] for i in by_source] == ["Web", "web"]
    check = f"{INTENTIONS}/check"
    assert h.get(f"{check}?source=evil&destination=web").json() == {"Allowed": False}
    assert h.get(f"{check}?source=evil&destination=WEB").json() == {"Allowed": False}
    assert h.get(f"{check}?source=Evil&destination=web").json() == {"Allowed": True}


@pytest.mark.parametrize(
    ("raw_id", "problem"),
    [
        ("short", "UUID must be 36 characters"),
        ("zzzzzzzz-0000-0000-0000-000000000000", None),
    ],
)
def test_ids_that_are_not_uuids(raw_id: str, problem: str | None) -> None:
    h = Harness()
    answer = h.get(f"{INTENTIONS}/{raw_id}")
    assert answer.status == 400
    assert answer.text.startswith("Bad request: failed intention lookup: index error: ")
    if problem:
        assert answer.text.endswith(problem)
    deleted = h.call("DELETE", f"{INTENTIONS}/{raw_id}")
    assert deleted.status == 500
    assert deleted.text.startswith(
        "Intention lookup failed: failed intention lookup: index error: "
    )


def test_match_with_no_intention_is_null() -> None:
    h = Harness()
    create(h)
    answer = h.get(f"{INTENTIONS}/match?by=destination&name=web&name=zzz")
    assert answer.json()["zzz"] is None
    assert [i["SourceName"] for i in answer.json()["web"]] == ["api"]


def test_match_accepts_namespace_and_name() -> None:
    h = Harness()
    create(h)
    answer = h.get(f"{INTENTIONS}/match?by=source&name=default/api")
    assert [i["DestinationName"] for i in answer.json()["default/api"]] == ["web"]
    bad = h.get(f"{INTENTIONS}/match?by=source&name=a/b/c")
    assert (bad.status, bad.text) == (
        500,
        "name \"a/b/c\" is invalid: input can contain at most one '/'",
    )


def test_check_follows_precedence_and_defaults_to_allow() -> None:
    h = Harness()
    create(h, Action="deny")
    create(h, SourceName="*", Action="allow")
    check = f"{INTENTIONS}/check"
    assert h.get(f"{check}?source=api&destination=web").json() == {"Allowed": False}
    assert h.get(f"{check}?source=db&destination=web").json() == {"Allowed": True}
    assert h.get(f"{check}?source=db&destination=other").json() == {"Allowed": True}
    other = h.get(f"{check}?source=db&destination=web&source-type=k8s")
    assert (other.status, other.text) == (500, 'unsupported SourceType: "k8s"')


def test_match_ignores_cached_as_consul_1_8_does() -> None:
    h = Harness()
    create(h)
    answer = h.get(f"{INTENTIONS}/match?by=destination&name=web&cached")
    assert answer.status == 200
    assert answer.header("X-Cache") is None


def test_other_datacenter_has_no_path() -> None:
    answer = Harness().get(f"{INTENTIONS}?dc=dc2")
    assert (answer.status, answer.text) == (500, "No path to datacenter")
