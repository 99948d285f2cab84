"""
The development agent answers as the real Consul 1.8.7 agent answered in the
captures (``tests/fixtures/real-1.8.7/``): same status, same headers present,
same JSON keys and types, same error bodies.  Each test replays the
captured requests on an agent in the same state as the real one was.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from cryptography import x509

from tests.test_devagent_support import (
    Answer,
    Capture,
    Harness,
    load,
    real_trust_domain,
    shape,
    with_trust_domain,
    without_uuids,
)

FIXTURES = load("ca-roots.http").name  # the captures are present


def assert_like(
    answer: Answer,
    capture: Capture,
    *,
    body: str | None = "exact",
    trust_domain: str | None = None,
) -> None:
    """
    ``answer`` has the capture's status, header names, content type and
    (``body="exact"``) body or (``body="shape"``) JSON shape.
    """
    assert answer.status == capture.status, answer.text
    assert answer.header_names == capture.header_names, capture.name
    assert answer.header("Content-Type") == capture.headers.get("Content-Type")
    if body == "exact":
        expected = capture.body
        if trust_domain is not None:
            expected = with_trust_domain(expected, trust_domain)
        assert answer.text == expected, capture.name
    elif body == "shape":
        assert shape(answer.json()) == shape(capture.json()), capture.name


def replay(h: Harness, name: str) -> tuple[Answer, Capture]:
    capture = load(name)
    td = h.agent.ca.trust_domain
    body = capture.request_body
    if body is not None:
        body = with_trust_domain(body.decode("utf-8"), td).encode("utf-8")
    answer = h.call(capture.method, with_trust_domain(capture.path, td), body)
    return answer, capture


# --------------------------------------------------------------------------
# errors that need no state: status, headers and body exactly as real


STATELESS_ERRORS = [
    "err-roots-index-abc.http",
    "err-roots-index-float.http",
    "err-roots-index-negative.http",
    "err-roots-index-overflow.http",
    "err-roots-wait-bad.http",
    "err-roots-wait-nounit.http",
    "err-leaf-index-abc.http",
    "err-leaf-index-float.http",
    "err-leaf-index-negative.http",
    "err-leaf-index-overflow.http",
    "err-leaf-wait-bad.http",
    "err-leaf-wait-nounit.http",
    "err-health-index-abc.http",
    "err-health-index-float.http",
    "err-health-index-negative.http",
    "err-health-index-overflow.http",
    "err-health-wait-bad.http",
    "err-health-wait-nounit.http",
    "leaf-name-empty.http",
    "leaf-name-slash.http",
    "authz-bad-json.http",
    "authz-empty-body.http",
    "authz-bad-spiffe.http",
    "authz-agent-uri.http",
    "authz-http-uri.http",
    "authz-empty-uri.http",
    "authz-missing-uri.http",
    "authz-missing-target.http",
    "authz-empty-target.http",
    "authz-get-405.http",
    "authz-put-405.http",
    "register-bad-json.http",
    "register-empty-body.http",
    "register-missing-name.http",
    "register-empty-name.http",
    "register-port-string.http",
    "register-bad-ttl.http",
    "register-check-interval-only.http",
    "register-bad-check-status.http",
    "register-proxy-no-destination.http",
    "register-proxy-native.http",
    "register-unknown-field.http",
    "register-get-405.http",
    "register-post-405.http",
    "deregister-delete-405.http",
    "deregister-missing.http",
    "check-pass-unknown.http",
    "check-pass-get-405.http",
    "check-update-bad-json.http",
    "check-update-bad-status.http",
    "intention-create-bad-action.http",
    "intention-create-bad-json.http",
    "intention-create-bad-source-type.http",
    "intention-create-missing-source.http",
    "intention-create-partial-wildcard.http",
    "intention-create-put-405.http",
    "intention-get-bad-id.http",
    "intention-get-missing.http",
    "intentions-match-missing-by.http",
    "intentions-match-missing-name.http",
    "intentions-match-bad-by.http",
    "intentions-check-missing-source.http",
    "intentions-check-missing-destination.http",
    "ca-config-put-leafttl-1m.http",
    "ca-config-put-leafttl-bogus.http",
    "ca-config-put-unknown-provider.http",
    "ca-config-put-bad-json.http",
    "agent-service-missing.http",
]


@pytest.mark.parametrize("name", STATELESS_ERRORS)
def test_error_answers_as_real(name: str) -> None:
    h = Harness()
    answer, capture = replay(h, name)
    assert_like(answer, capture, trust_domain=h.agent.ca.trust_domain)


def test_health_passing_bad_value_as_real() -> None:
    h = Harness()
    h.register({"ID": "db-1", "Name": "db", "Port": 5001, "Connect": {"Native": True}})
    answer, capture = replay(h, "health-connect-db-passing-bad.http")
    assert_like(answer, capture)


def test_unknown_path_is_404_with_no_body_and_no_vary() -> None:
    # measured on 1.8.7: this handler sits outside the API's gzip wrapper
    answer = Harness().get("/v1/nosuch")
    assert answer.status == 404
    assert answer.body == b""
    assert answer.header("Vary") is None


def test_subtree_path_without_its_slash_is_redirected_like_go() -> None:
    answer = Harness().call("GET", "/v1/agent/service?x=1", follow=False)
    assert answer.status == 301
    assert answer.header("Location") == "/v1/agent/service/?x=1"


def test_options_answers_allowed_methods() -> None:
    answer = Harness().call("OPTIONS", "/v1/connect/intentions")
    assert answer.status == 200
    assert answer.header("Allow") == "OPTIONS,GET,POST"


# --------------------------------------------------------------------------
# agent/self


def test_agent_self_has_real_sections_and_config() -> None:
    h = Harness(datacenter="dc7", node_name="box")
    answer = h.get("/v1/agent/self")
    capture = load("agent-self.http")
    assert_like(answer, capture, body=None)
    ours, real = answer.json(), capture.json()
    assert set(ours) == set(real)
    assert shape(ours["Config"]) == shape(real["Config"])
    assert shape(ours["Member"]) == shape(real["Member"])
    assert shape(ours["Coord"]) == shape(real["Coord"])
    assert {k: set(v) for k, v in ours["Stats"].items()} == {
        k: set(v) - {"latest_configuration", "latest_configuration_index"}
        for k, v in real["Stats"].items()
    }
    for key, value in ours["DebugConfig"].items():
        assert shape(value) == shape(real["DebugConfig"][key]), key
    assert ours["Config"]["Datacenter"] == "dc7"
    assert ours["Config"]["NodeName"] == "box"
    assert ours["Config"]["Version"] == "1.8.7"
    assert ours["DebugConfig"]["ACLsEnabled"] is False


# --------------------------------------------------------------------------
# CA roots and configuration


def test_agent_roots_miss_then_hit() -> None:
    h = Harness()
    first = h.get("/v1/agent/connect/ca/roots")
    assert_like(first, load("ca-roots.http"), body="shape")
    second = h.get("/v1/agent/connect/ca/roots")
    assert_like(second, load("ca-roots-hit.http"), body="shape")
    assert first.header("X-Cache") == "MISS"
    assert second.header("X-Cache") == "HIT"
    assert second.header("Age") == "0"
    assert second.header("X-Consul-Knownleader") == "false"


def test_roots_body_values_are_consul_shaped() -> None:
    h = Harness()
    body = h.get("/v1/agent/connect/ca/roots").json()
    (root,) = body["Roots"]
    assert body["ActiveRootID"] == root["ID"]
    assert body["TrustDomain"] == h.agent.ca.trust_domain
    assert body["TrustDomain"] == root["ExternalTrustDomain"] + ".consul"
    assert root["IntermediateCerts"] is None
    assert root["Active"] is True
    assert root["Name"] == "Consul CA Root Cert"
    assert (root["CreateIndex"], root["ModifyIndex"]) == (9, 9)


def test_server_roots_have_no_cache_headers() -> None:
    h = Harness()
    assert_like(
        h.get("/v1/connect/ca/roots"), load("ca-roots-server.http"), body="shape"
    )


@pytest.mark.parametrize(
    "name", ["ca-roots-block-index-0.http", "ca-roots-block-index-lower.http"]
)
def test_roots_below_current_index_are_a_hit_at_once(name: str) -> None:
    h = Harness()
    h.get("/v1/agent/connect/ca/roots")
    answer, capture = replay(h, name)
    assert_like(answer, capture, body="shape")


def test_ca_configuration_as_real() -> None:
    h = Harness()
    answer = h.get("/v1/connect/ca/configuration")
    assert_like(answer, load("ca-config.http"), body="exact")


def test_ca_configuration_change_without_rotation() -> None:
    h = Harness()
    before = h.get("/v1/agent/connect/ca/roots")
    answer, capture = replay(h, "ca-config-put-keybits-384.http")
    assert_like(answer, capture)
    config = h.get("/v1/connect/ca/configuration")
    real = load("ca-config-after-keybits.http")
    assert_like(config, real, body="shape")
    assert config.json()["Config"] == real.json()["Config"]
    roots = h.get("/v1/agent/connect/ca/roots")
    assert roots.json() == before.json()
    assert int(roots.header("X-Consul-Index") or 0) == config.json()["ModifyIndex"]
    assert config.json()["ModifyIndex"] > int(before.header("X-Consul-Index") or 0)


def test_rotation_with_supplied_root_as_real() -> None:
    h = Harness()
    old = h.get("/v1/agent/connect/ca/roots").json()
    answer, capture = replay(h, "rotation-ca-config-put.http")
    assert_like(answer, capture)
    roots = h.get("/v1/agent/connect/ca/roots")
    assert_like(roots, load("rotation-roots-after.http"), body="shape")
    body = roots.json()
    supplied = json.loads(capture.meta["request-body"])["Config"]["RootCert"]
    new = next(r for r in body["Roots"] if r["Active"])
    old_root = next(r for r in body["Roots"] if not r["Active"])
    assert new["RootCert"] == supplied
    assert old_root["ID"] == old["ActiveRootID"]
    assert body["ActiveRootID"] == new["ID"]
    assert len(new["IntermediateCerts"]) == 1
    assert old_root["IntermediateCerts"] is None
    assert old_root["ModifyIndex"] == new["CreateIndex"] > old_root["CreateIndex"]
    config = h.get("/v1/connect/ca/configuration")
    assert_like(config, load("rotation-ca-config-after.http"), body="shape")
    server = h.get("/v1/connect/ca/roots")
    assert_like(server, load("rotation-roots-server-after.http"), body="shape")


# --------------------------------------------------------------------------
# leaf certificates


def test_leaf_miss_then_hit_as_real() -> None:
    h = Harness()
    first = h.get("/v1/agent/connect/ca/leaf/web")
    assert_like(first, load("leaf-web.http"), body="shape")
    h.advance(3)
    second = h.get("/v1/agent/connect/ca/leaf/web")
    assert_like(second, load("leaf-web-hit.http"), body="shape")
    assert second.header("Age") == "3"
    assert second.json() == first.json()


def test_leaf_body_values_are_consul_shaped() -> None:
    h = Harness()
    now = h.clock.seconds()
    answer = h.get("/v1/agent/connect/ca/leaf/web")
    leaf = answer.json()
    assert leaf["Service"] == "web"
    assert leaf["ServiceURI"] == h.uri("web")
    assert answer.header("X-Consul-Index") == str(leaf["ModifyIndex"])
    assert leaf["CreateIndex"] == leaf["ModifyIndex"]
    assert isinstance(leaf["SerialNumber"], str)
    int(leaf["SerialNumber"].replace(":", ""), 16)
    after = datetime.datetime.fromisoformat(leaf["ValidAfter"])
    before = datetime.datetime.fromisoformat(leaf["ValidBefore"])
    assert before - after == datetime.timedelta(hours=72)
    assert abs(after.timestamp() - (now - 60)) <= 1
    assert leaf["PrivateKeyPEM"].startswith("-----BEGIN EC PRIVATE KEY-----")


def test_first_leaf_index_is_the_real_first_leaf_index() -> None:
    h = Harness()
    answer, capture = replay(h, "leaf-web.http")
    assert answer.json()["ModifyIndex"] == capture.json()["ModifyIndex"] == 14
    # each further signing is two raft writes, as real (14, 16, 18, ...)
    second = h.get("/v1/agent/connect/ca/leaf/never-registered")
    assert second.json()["ModifyIndex"] == 16


@pytest.mark.parametrize(
    "name",
    [
        "leaf-unregistered.http",
        "leaf-name-uppercase.http",
        "leaf-name-dot.http",
        "leaf-name-underscore.http",
        "leaf-name-space.http",
        "leaf-name-unicode.http",
        "leaf-name-long.http",
    ],
)
def test_leaf_names_as_real(name: str) -> None:
    h = Harness()
    answer, capture = replay(h, name)
    assert_like(answer, capture, body="shape")
    ours, real = answer.json(), capture.json()
    td = h.agent.ca.trust_domain
    assert ours["Service"] == real["Service"]
    assert ours["ServiceURI"] == with_trust_domain(real["ServiceURI"], td)
    cert = x509.load_pem_x509_certificate(ours["CertPEM"].encode())
    real_cert = x509.load_pem_x509_certificate(real["CertPEM"].encode())
    ours_cn = cert.subject.rfc4514_string()
    real_cn = real_cert.subject.rfc4514_string()
    assert ours_cn.split(".svc.")[0] == real_cn.split(".svc.")[0]


@pytest.mark.parametrize(
    "name", ["leaf-block-index-0.http", "leaf-block-index-lower.http"]
)
def test_leaf_below_current_index_is_a_hit_at_once(name: str) -> None:
    h = Harness()
    h.get("/v1/agent/connect/ca/leaf/web")
    answer, capture = replay(h, name)
    assert_like(answer, capture, body="shape")


# --------------------------------------------------------------------------
# authorize


OPEN_AUTHORIZE = [
    ("authz-open-allowed.http", "MISS"),
    ("authz-open-allowed-cached.http", "HIT"),
    ("authz-open-unknown-target.http", "MISS"),
    ("authz-foreign-trust-domain.http", "HIT"),
    ("authz-other-dc.http", "HIT"),
    ("authz-other-namespace.http", "HIT"),
    ("authz-lowercase-keys.http", "HIT"),
]


def test_authorize_without_intentions_as_real() -> None:
    h = Harness()
    for name, cache in OPEN_AUTHORIZE:
        answer, capture = replay(h, name)
        assert_like(answer, capture, trust_domain=h.agent.ca.trust_domain)
        assert answer.header("X-Cache") == cache, name


def create_real_intentions(h: Harness) -> dict[tuple[str, str], str]:
    """
    The intentions of the capture run, created from its requests.
    """
    ids = {}
    for name in [
        "intention-create-deny-api-web.http",
        "intention-create-wild-src.http",
        "intention-create-wild-both.http",
        "intention-create-wild-dst.http",
        "intention-create-with-meta.http",
    ]:
        answer, capture = replay(h, name)
        assert_like(answer, capture, body="shape")
        request = json.loads(capture.meta["request-body"])
        ids[(request["SourceName"], request["DestinationName"])] = answer.json()["ID"]
    return ids


@pytest.mark.parametrize(
    "name",
    [
        "authz-denied-exact.http",
        "authz-allowed-wild-src.http",
        "authz-allowed-wild-dst.http",
        "authz-denied-wild-both.http",
    ],
)
def test_authorize_by_intention_as_real(name: str) -> None:
    h = Harness()
    create_real_intentions(h)
    answer, capture = replay(h, name)
    assert answer.status == capture.status
    assert answer.header_names - {"age"} == capture.header_names - {"age"}
    ours, real = answer.json(), capture.json()
    assert ours["Authorized"] == real["Authorized"]
    assert without_uuids(ours["Reason"]) == without_uuids(real["Reason"])
    assert "=\\u003e" in answer.text


def test_authorize_after_delete_as_real() -> None:
    h = Harness()
    ids = create_real_intentions(h)
    replay(h, "authz-denied-exact.http")
    deleted = h.call("DELETE", f"/v1/connect/intentions/{ids[('api', 'web')]}")
    assert_like(deleted, load("intention-delete.http"))
    answer, capture = replay(h, "authz-after-delete.http")
    assert_like(answer, capture, body=None)
    assert without_uuids(answer.json()["Reason"]) == without_uuids(
        capture.json()["Reason"]
    )


# --------------------------------------------------------------------------
# intentions


def test_intention_list_as_real() -> None:
    h = Harness()
    create_real_intentions(h)
    answer = h.get("/v1/connect/intentions")
    capture = load("intentions-list.http")
    assert_like(answer, capture, body="shape")

    def order(body: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
        return [(i["SourceName"], i["DestinationName"], i["Precedence"]) for i in body]

    assert order(answer.json()) == order(capture.json())
    with_meta = next(i for i in answer.json() if i["SourceName"] == "billing")
    assert with_meta["Meta"] == {"team": "payments"}
    assert int(answer.header("X-Consul-Index") or 0) == max(
        i["ModifyIndex"] for i in answer.json()
    )


def test_intention_get_has_no_index_header() -> None:
    h = Harness()
    ids = create_real_intentions(h)
    answer = h.get(f"/v1/connect/intentions/{ids[('api', 'web')]}")
    assert_like(answer, load("intention-get.http"), body="shape")
    assert answer.json()["Description"] == "fixture"


@pytest.mark.parametrize(
    "name",
    [
        "intentions-match-dest-web.http",
        "intentions-match-dest-multi.http",
        "intentions-match-source-api.http",
        "intentions-match-dest-unknown.http",
    ],
)
def test_intention_match_as_real(name: str) -> None:
    h = Harness()
    create_real_intentions(h)
    answer, capture = replay(h, name)
    assert_like(answer, capture, body="shape")

    def order(body: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
        return {
            k: [(i["SourceName"], i["DestinationName"]) for i in v]
            for k, v in body.items()
        }

    assert order(answer.json()) == order(capture.json())


@pytest.mark.parametrize(
    "name", ["intentions-check-allowed.http", "intentions-check-denied.http"]
)
def test_intention_check_as_real(name: str) -> None:
    h = Harness()
    create_real_intentions(h)
    answer, capture = replay(h, name)
    assert_like(answer, capture)


def test_intention_duplicate_as_real() -> None:
    h = Harness()
    ids = create_real_intentions(h)
    answer, capture = replay(h, "intention-create-duplicate.http")
    assert_like(answer, capture, body=None)
    assert answer.text == capture.body.replace(
        "d2469546-56a3-b738-a1be-efbdc9f9ed58", ids[("api", "web")]
    )


def test_intention_update_as_real() -> None:
    h = Harness()
    created = h.post(
        "/v1/connect/intentions",
        {"SourceName": "db", "DestinationName": "other", "Action": "allow"},
    ).json()["ID"]
    before = h.get(f"/v1/connect/intentions/{created}").json()
    h.advance(0.064)
    capture = load("intention-update.http")
    answer = h.put(f"/v1/connect/intentions/{created}", capture.request_body)
    assert_like(answer, capture, body="shape")
    assert answer.json() == {"ID": created}
    after = h.get(f"/v1/connect/intentions/{created}")
    real = load("intention-get-after-update.http")
    assert_like(after, real, body="shape")
    body = after.json()
    assert body["CreatedAt"] == before["CreatedAt"]
    assert body["UpdatedAt"] != before["UpdatedAt"]
    assert body["CreateIndex"] == before["CreateIndex"] < body["ModifyIndex"]
    assert (body["Action"], body["Description"]) == ("deny", "updated")
    mismatch = load("intention-update-id-mismatch.http")
    answer = h.put(f"/v1/connect/intentions/{created}", mismatch.request_body)
    assert_like(answer, mismatch, body="shape")
    assert answer.json() == {"ID": created}


def test_intention_delete_twice_as_real() -> None:
    h = Harness()
    ids = create_real_intentions(h)
    target = ids[("api", "web")]
    assert_like(
        h.call("DELETE", f"/v1/connect/intentions/{target}"),
        load("intention-delete.http"),
    )
    missing = load("intention-delete-missing.http")
    answer = h.call("DELETE", f"/v1/connect/intentions/{target}")
    assert_like(answer, missing, body=None)
    assert answer.text == missing.body.replace(
        "d2469546-56a3-b738-a1be-efbdc9f9ed58", target
    )
    assert_like(
        h.get(f"/v1/connect/intentions/{target}"), load("intention-get-deleted.http")
    )


# --------------------------------------------------------------------------
# registration, agent services and checks


def test_registration_sequence_as_real() -> None:
    h = Harness(node_name="vm")
    answer, capture = replay(h, "register-web-native.http")
    assert_like(answer, capture)
    service = h.get("/v1/agent/service/web")
    real = load("agent-service-web.http")
    assert_like(service, real, body="shape")
    assert {k: v for k, v in service.json().items() if k != "ContentHash"} == {
        k: v for k, v in real.json().items() if k != "ContentHash"
    }
    assert service.header("X-Consul-Contenthash") == service.json()["ContentHash"]
    checks = h.get("/v1/agent/checks")
    assert_like(checks, load("agent-checks-after-register.http"))

    for name, shown, sid in [
        ("register-lowercase-keys.http", "agent-service-lower.http", "lower"),
        ("register-native-with-connect-proxy.http", "agent-service-n1.http", "n1"),
        ("register-unknown-kind.http", "agent-service-k1.http", "k1"),
        (
            "register-native-with-sidecar.http",
            "agent-service-n2-sidecar.http",
            "n2-sidecar-proxy",
        ),
    ]:
        answer, capture = replay(h, name)
        assert_like(answer, capture)
        service = h.get(f"/v1/agent/service/{sid}")
        real = load(shown)
        assert_like(service, real, body="shape")
        assert {k: v for k, v in service.json().items() if k != "ContentHash"} == {
            k: v for k, v in real.json().items() if k != "ContentHash"
        }

    answer, capture = replay(h, "deregister-existing.http")
    assert_like(answer, capture)
    for sid in ("lower", "n1", "k1"):
        h.put(f"/v1/agent/service/deregister/{sid}")
    assert_like(
        h.get("/v1/agent/services"), load("agent-services-after-deregister.http")
    )

    for name in ["check-pass.http", "check-warn-note.http", "check-fail.http"]:
        answer, capture = replay(h, name)
        assert_like(answer, capture)
    answer, capture = replay(h, "check-update.http")
    assert_like(answer, capture)
    answer, capture = replay(h, "register-web-again.http")
    assert_like(answer, capture)
    assert_like(h.get("/v1/agent/checks"), load("agent-checks.http"))


# --------------------------------------------------------------------------
# health


def register_real_db(h: Harness) -> None:
    for name in [
        "register-db-1.http",
        "register-db-2.http",
        "register-db-3.http",
        "register-db-proxy.http",
    ]:
        answer, capture = replay(h, name)
        assert_like(answer, capture)


@pytest.mark.parametrize(
    "name",
    [
        "health-connect-db.http",
        "health-connect-db-passing.http",
        "health-connect-db-passing-bare.http",
        "health-connect-db-passing-false.http",
        "health-connect-db-cached.http",
        "health-service-db.http",
        "health-service-db-passing.http",
    ],
)
def test_health_as_real(name: str) -> None:
    h = Harness(node_name="vm")
    register_real_db(h)
    answer, capture = replay(h, name)
    assert_like(answer, capture, body="shape")
    ours, real = answer.json(), capture.json()

    def view(entries: list[dict[str, Any]]) -> list[Any]:
        return [
            (
                e["Service"],
                [
                    (c["CheckID"], c["Status"], c["Type"], c["Name"])
                    for c in e["Checks"]
                ],
            )
            for e in entries
        ]

    def strip(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                **e,
                "Service": {
                    k: v
                    for k, v in e["Service"].items()
                    if k not in ("CreateIndex", "ModifyIndex")
                },
            }
            for e in entries
        ]

    assert view(strip(ours)) == view(strip(real))
    assert [e["Node"]["Node"] for e in ours] == [e["Node"]["Node"] for e in real]


@pytest.mark.parametrize(
    ("name", "connect"),
    [("catalog-connect-db.http", True), ("catalog-service-db.http", False)],
)
def test_catalog_flat_form_as_real(name: str, connect: bool) -> None:
    h = Harness(node_name="vm")
    register_real_db(h)
    answer, capture = replay(h, name)
    assert_like(answer, capture, body="shape")
    ours, real = answer.json(), capture.json()

    def view(entries: list[dict[str, Any]]) -> list[Any]:
        return [
            {
                k: v
                for k, v in e.items()
                if k not in ("ID", "CreateIndex", "ModifyIndex")
            }
            for e in entries
        ]

    assert view(ours) == view(real)
    # 1.8.7 does not count the proxy in the catalog's index
    assert answer.header("X-Consul-Index") == h.get("/v1/health/service/db").header(
        "X-Consul-Index"
    )


def test_catalog_connect_of_unknown_service_as_real() -> None:
    h = Harness()
    register_real_db(h)
    answer, capture = replay(h, "catalog-connect-nosuch.http")
    assert_like(answer, capture)


def test_health_connect_of_unknown_service_is_empty_with_an_index() -> None:
    h = Harness()
    register_real_db(h)
    answer, capture = replay(h, "health-connect-nosuch.http")
    assert_like(answer, capture)
    assert int(answer.header("X-Consul-Index") or 0) >= 1


def test_health_connect_index_includes_proxies_but_service_index_does_not() -> None:
    h = Harness()
    register_real_db(h)
    connect = int(h.get("/v1/health/connect/db").header("X-Consul-Index") or 0)
    service = int(h.get("/v1/health/service/db").header("X-Consul-Index") or 0)
    real_connect = int(load("health-connect-db.http").headers["X-Consul-Index"])
    real_service = int(load("health-service-db.http").headers["X-Consul-Index"])
    assert connect - service == real_connect - real_service == 1


def test_real_trust_domain_is_replaced_in_replays() -> None:
    h = Harness()
    assert real_trust_domain() != h.agent.ca.trust_domain
    answer, _ = replay(h, "leaf-name-slash.http")
    assert h.agent.ca.trust_domain in answer.text


def _raw(h: Harness, path: str, accept: bytes | None) -> tuple[int, Any, bytes]:
    import treq
    from treq.testing import RequestTraversalAgent
    from twisted.web.http_headers import Headers

    agent = RequestTraversalAgent(h.agent.resource())
    headers = Headers({b"Accept-Encoding": [accept]} if accept else {})
    responses: list[Any] = []
    agent.request(b"GET", f"http://127.0.0.1{path}".encode(), headers).addBoth(
        responses.append
    )
    agent.flush()
    bodies: list[Any] = []
    treq.content(responses[0]).addBoth(bodies.append)
    agent.flush()
    return responses[0].code, responses[0].headers, bodies[0]


def test_bodies_are_gzipped_only_when_asked() -> None:
    # Consul's gziphandler has MinSize(0): small bodies and errors too
    import gzip

    h = Harness()
    for path in ("/v1/agent/connect/ca/leaf/web", "/v1/connect/intentions"):
        _, headers, body = _raw(h, path, b"gzip")
        assert headers.getRawHeaders(b"Content-Encoding") == [b"gzip"]
        assert headers.getRawHeaders(b"Vary") == [b"Accept-Encoding"]
        _, plain_headers, plain = _raw(h, path, None)
        assert plain_headers.getRawHeaders(b"Content-Encoding") is None
        assert json.loads(gzip.decompress(body)) == json.loads(plain)
    _, headers, body = _raw(h, "/v1/intentions/nosuch-path", b"gzip")
    assert headers.getRawHeaders(b"Content-Encoding") is None


def test_writes_answer_with_no_content_type_and_no_server_header() -> None:
    h = Harness()
    _, headers, _ = _raw(h, "/v1/agent/self", None)
    assert headers.getRawHeaders(b"Server") is None
    answer = h.put("/v1/agent/service/register", {"Name": "web"})
    assert answer.header("Content-Type") is None
    assert answer.body == b""
