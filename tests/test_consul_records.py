"""
The records decoded from the agent's JSON: every captured answer of a real
Consul 1.8.7 agent decodes, the shapes newer agents send decode, and
anything else is refused with an error naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest

from connect_native.consul.records import (
    CARoots,
    ConsulError,
    ConsulResponseError,
    FrozenDict,
    HealthCheck,
    HealthEntry,
    Indexed,
    Node,
    ServiceInstance,
    ServiceRegistration,
    TTLCheck,
    decode_agent_self,
    decode_authorize,
    decode_ca_configuration,
    decode_ca_roots,
    decode_catalog_entries,
    decode_health_entries,
    decode_intention,
    decode_intention_check,
    decode_intentions,
    decode_intentions_match,
    decode_leaf,
    decode_prepared_query_result,
    format_duration,
    seconds_or_zero,
    whole_number,
)
from tests.captures import body as body_of
from tests.captures import load

FIXTURES = Path(__file__).parent / "fixtures"
REAL = FIXTURES / "real-1.8.7"
DOCS = FIXTURES / "docs-samples"


# Which decoder reads the answer of which GET, by path.
DECODERS: list[tuple[str, Callable[[object], object]]] = [
    ("/v1/agent/connect/ca/roots", decode_ca_roots),
    ("/v1/connect/ca/roots", decode_ca_roots),
    ("/v1/agent/connect/ca/leaf/", decode_leaf),
    ("/v1/health/connect/", decode_health_entries),
    ("/v1/health/service/", decode_health_entries),
    ("/v1/catalog/connect/", decode_catalog_entries),
    ("/v1/connect/intentions/match", decode_intentions_match),
    ("/v1/connect/intentions/check", decode_intention_check),
    ("/v1/connect/intentions/", decode_intention),
    ("/v1/connect/intentions", decode_intentions),
    ("/v1/connect/ca/configuration", decode_ca_configuration),
    ("/v1/agent/self", decode_agent_self),
    ("/v1/query/", decode_prepared_query_result),
]


def _captured_reads() -> list[tuple[str, Callable[[object], object]]]:
    cases = []
    for path in sorted(REAL.glob("*.http")):
        meta, status, _, _ = load(path)
        method, _, target = meta.get("request", "").partition(" ")
        target = target.partition("?")[0]
        if method not in ("GET", "POST") or status != 200:
            continue
        if method == "POST" and target != "/v1/agent/connect/authorize":
            continue
        if target == "/v1/agent/connect/authorize":
            cases.append((path.name, decode_authorize))
            continue
        if target.endswith("/execute") or not target.startswith("/v1/query"):
            for prefix, decoder in DECODERS:
                if target == prefix or (
                    prefix.endswith("/") and target.startswith(prefix)
                ):
                    cases.append((path.name, decoder))
                    break
    return cases


CAPTURED = _captured_reads()


def test_the_capture_set_covers_every_decoder() -> None:
    used = {decoder for _, decoder in CAPTURED}
    assert used == {decoder for _, decoder in DECODERS} | {decode_authorize}
    assert len(CAPTURED) > 80


@pytest.mark.parametrize(("name", "decoder"), CAPTURED, ids=[n for n, _ in CAPTURED])
def test_every_captured_answer_decodes(
    name: str, decoder: Callable[[object], object]
) -> None:
    decoded = decoder(body_of(name))
    # Records are hashable, maps included: the watch loop can compare and
    # callers can keep them in sets.
    hash(decoded)
    assert decoded == decoder(body_of(name))


# -- exact real shapes ----------------------------------------------------------


def test_root_serial_is_a_number_and_leaf_serial_a_hex_string() -> None:
    roots = decode_ca_roots(body_of("ca-roots.http"))
    leaf = decode_leaf(body_of("leaf-web.http"))
    assert roots.roots[0].serial_number == 7
    assert leaf.serial_number == "08"


def test_a_string_root_serial_is_refused_and_named() -> None:
    body = body_of("ca-roots.http")
    body["Roots"][0]["SerialNumber"] = "07"
    with pytest.raises(ConsulResponseError) as caught:
        decode_ca_roots(body)
    assert str(caught.value) == (
        "ca roots: field 'Roots[0].SerialNumber' is a string, expected an integer"
    )


def test_a_numeric_leaf_serial_is_refused_and_named() -> None:
    body = body_of("leaf-web.http")
    body["SerialNumber"] = 8
    with pytest.raises(ConsulResponseError, match="'SerialNumber' is an integer"):
        decode_leaf(body)


def test_null_intermediates_meta_and_tags_read_as_empty() -> None:
    root = decode_ca_roots(body_of("ca-roots.http")).roots[0]
    assert root.intermediate_certs_pem == ()
    query = decode_prepared_query_result(body_of("query-execute-connect.http"))
    assert all(n.service.tags == () for n in query.nodes)
    assert all(n.service.meta == {} for n in query.nodes)


def test_native_health_entries_have_no_kind_key_and_read_as_typical() -> None:
    raw = body_of("health-connect-db.http")
    assert "Kind" not in raw[0]["Service"]
    entry = decode_health_entries(raw)[0]
    assert entry.service.kind == ""
    assert entry.service.connect_native is True


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("CertPEM", "leaf: field 'CertPEM' missing"),
        ("PrivateKeyPEM", "leaf: field 'PrivateKeyPEM' missing"),
        ("ServiceURI", "leaf: field 'ServiceURI' missing"),
        ("ValidBefore", "leaf: field 'ValidBefore' missing"),
        ("ModifyIndex", "leaf: field 'ModifyIndex' missing"),
    ],
)
def test_a_missing_leaf_field_is_named(field: str, message: str) -> None:
    body = body_of("leaf-web.http")
    del body[field]
    with pytest.raises(ConsulResponseError) as caught:
        decode_leaf(body)
    assert str(caught.value) == message
    assert isinstance(caught.value, ConsulError)


def test_a_null_required_field_is_named() -> None:
    body = body_of("authz-open-allowed.http")
    body["Authorized"] = None
    with pytest.raises(ConsulResponseError) as caught:
        decode_authorize(body)
    assert str(caught.value) == (
        "authorize: field 'Authorized' is null, expected a boolean"
    )


def test_a_bad_nested_check_is_named_with_its_path() -> None:
    body = body_of("health-connect-db.http")
    del body[1]["Checks"][1]["Status"]
    with pytest.raises(ConsulResponseError) as caught:
        decode_health_entries(body)
    assert str(caught.value) == "health/connect: field '[1].Checks[1].Status' missing"


def test_a_meta_value_that_is_not_a_string_is_named() -> None:
    body = body_of("intentions-list.http")
    body[1]["Meta"]["team"] = 7
    with pytest.raises(ConsulResponseError) as caught:
        decode_intentions(body)
    assert str(caught.value) == (
        "intentions: field '[1].Meta.team' is an integer, expected a string"
    )


def test_the_docs_roots_sample_without_a_trust_domain_is_refused() -> None:
    # Consul's own API docs sample for the agent roots lacks TrustDomain;
    # the real agent always sends it, and a client cannot work without it.
    sample = json.loads((DOCS / "agent-connect-ca-roots.json").read_text())
    with pytest.raises(ConsulResponseError) as caught:
        decode_ca_roots(sample)
    assert str(caught.value) == "ca roots: field 'TrustDomain' missing"


def test_the_server_roots_docs_sample_decodes() -> None:
    roots = decode_ca_roots(json.loads((DOCS / "connect-ca-roots.json").read_text()))
    assert isinstance(roots, CARoots)
    assert roots.active_root is not None


# -- times ------------------------------------------------------------------------


def test_nanosecond_times_are_truncated_to_microseconds() -> None:
    ixn = decode_intentions(body_of("intentions-list.http"))[0]
    # "2026-11-25T23:55:23.932166957Z"
    assert ixn.created_at == datetime(
        2026, 11, 25, 23, 55, 23, 932166, tzinfo=timezone.utc
    )


def test_times_with_an_offset_are_aware() -> None:
    body = body_of("leaf-web.http")
    body["ValidAfter"] = "2026-11-26T01:54:18+02:00"
    leaf = decode_leaf(body)
    assert leaf.valid_after.utcoffset() == timedelta(hours=2)
    assert leaf.valid_after == datetime(2026, 11, 25, 23, 54, 18, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "text", ["2026-11-25 23:54:18", "2026-11-25T23:54:18", "2026-13-01T00:00:00Z", ""]
)
def test_a_bad_time_is_named(text: str) -> None:
    body = body_of("leaf-web.http")
    body["ValidAfter"] = text
    with pytest.raises(ConsulResponseError, match=r"'ValidAfter' is .*RFC 3339"):
        decode_leaf(body)


# -- intentions of newer agents ----------------------------------------------------

L7_INTENTION = {
    "SourceNS": "default",
    "SourceName": "web",
    "DestinationNS": "default",
    "DestinationName": "api",
    "SourceType": "consul",
    "Permissions": [
        {
            "Action": "allow",
            "HTTP": {
                "PathPrefix": "/v1/",
                "Methods": ["GET", "HEAD"],
                "Header": [{"Name": "x-debug", "Present": True, "Invert": True}],
            },
        },
        {"Action": "deny", "HTTP": {"PathExact": "/admin"}},
    ],
    "Precedence": 9,
    "CreateIndex": 12,
    "ModifyIndex": 12,
}


def test_an_l7_intention_from_a_config_entry_decodes() -> None:
    ixn = decode_intention(L7_INTENTION)
    assert ixn.action is None
    assert ixn.id is None  # config-entry intentions have no ID
    assert ixn.created_at is None
    allow, deny = ixn.permissions
    assert allow.action == "allow"
    assert allow.http is not None
    assert allow.http.path_prefix == "/v1/"
    assert allow.http.methods == ("GET", "HEAD")
    (header,) = allow.http.headers
    assert (header.name, header.present, header.invert) == ("x-debug", True, True)
    assert header.exact is None
    assert deny.http is not None
    assert deny.http.path_exact == "/admin"


def test_an_intention_with_neither_action_nor_permissions_is_refused() -> None:
    bare = {k: v for k, v in L7_INTENTION.items() if k != "Permissions"}
    with pytest.raises(ConsulResponseError, match="'Action' missing"):
        decode_intention(bare)


def test_a_match_entry_may_be_null() -> None:
    assert decode_intentions_match({"web": None}) == {"web": ()}


# -- the shapes themselves ----------------------------------------------------------


def test_frozen_dict_is_a_hashable_read_only_mapping() -> None:
    a = FrozenDict({"x": "1"})
    assert a == {"x": "1"}
    assert a == FrozenDict({"x": "1"})
    assert a != {"x": "2"}
    assert hash(a) == hash(FrozenDict({"x": "1"}))
    with pytest.raises(TypeError):
        a["y"] = "2"  # type: ignore[index]
    assert {a: 1}[FrozenDict({"x": "1"})] == 1


def test_records_are_frozen() -> None:
    leaf = decode_leaf(body_of("leaf-web.http"))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        leaf.service = "other"  # type: ignore[misc]


def test_indexed_keeps_its_fields() -> None:
    answer = Indexed(value=1, index=None)
    assert attrs.fields_dict(Indexed).keys() == {
        "value",
        "index",
        "known_leader",
        "last_contact_ms",
        "cache_hit",
        "age_s",
    }
    assert (answer.known_leader, answer.cache_hit) == (None, None)


def test_health_entry_address_falls_back_to_the_node() -> None:
    node = Node(id="n", name="vm", address="10.0.0.9", datacenter="dc1")
    service = ServiceInstance(id="db-2", service="db", port=5002)
    checks = (HealthCheck(node="vm", check_id="c", name="c", status="warning"),)
    entry = HealthEntry(node=node, service=service, checks=checks)
    assert entry.address == "10.0.0.9"
    assert not entry.passing  # warning is not passing


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(15, "15s"), (15.0, "15s"), (0.5, "500ms"), (90.25, "90250ms"), (3600, "3600s")],
)
def test_durations_render_as_go_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), 0.0001])
def test_bad_durations_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="duration"):
        format_duration(bad)


def test_registration_converts_and_stays_hashable() -> None:
    registration = ServiceRegistration(
        name="web",
        port=8443,
        tags=["a", "b"],
        meta={"k": "v"},
        checks=[TTLCheck(ttl=10)],
    )
    assert registration.tags == ("a", "b")
    assert registration.meta == {"k": "v"}
    hash(registration)
    assert registration.to_json()["Checks"] == [{"TTL": "10s"}]


def test_a_plain_non_native_registration_has_no_connect_block() -> None:
    body = ServiceRegistration(name="web", port=80, connect_native=False).to_json()
    assert "Connect" not in body


# --- the shared settings checks ---------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (0.0, 0.0), (2, 2.0)])
def test_seconds_or_zero_takes_zero_and_positive_seconds(
    value: float, expected: float
) -> None:
    assert seconds_or_zero("bound", value) == expected


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), False, "1", None])
def test_seconds_or_zero_refuses_the_rest_naming_the_setting(bad: Any) -> None:
    with pytest.raises(
        ValueError, match="bound must be a finite number of seconds >= 0"
    ):
        seconds_or_zero("bound", bad)


def test_whole_number_takes_an_int_of_at_least_the_minimum() -> None:
    assert whole_number("size", 4096, 4096) == 4096


@pytest.mark.parametrize("bad", [4095, 4096.0, True, "4096", None])
def test_whole_number_refuses_the_rest_naming_the_setting_and_unit(bad: Any) -> None:
    with pytest.raises(
        ValueError, match="size must be a whole number of bytes >= 4096, not"
    ):
        whole_number("size", bad, 4096, "bytes")
