"""
Service registration, TTL checks and health on the development agent, with
real Consul 1.8.7's rules (``REAL-BEHAVIOUR.md`` sections 8 and 10): TTL
checks start critical, re-registering keeps their status, deregistering an
unknown ID is fine, unknown checks are a 500, output-only changes reach the
catalog later, and registration errors carry Consul's texts.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_devagent_support import Harness, fixed_random

REGISTER = "/v1/agent/service/register"


def checks(h: Harness) -> dict[str, Any]:
    result: dict[str, Any] = h.get("/v1/agent/checks").json()
    return result


def health(h: Harness, path: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = h.get(path).json()
    return result


def service_ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["Service"]["ID"] for e in entries]


def index_of(h: Harness, path: str) -> int:
    return int(h.get(path).header("X-Consul-Index") or 0)


WEB = {
    "Name": "web",
    "Port": 8080,
    "Connect": {"Native": True},
    "Check": {"CheckID": "web-ttl", "TTL": "15m"},
}


# --------------------------------------------------------------------------
# registration


def test_ttl_check_starts_critical_unless_a_status_is_given() -> None:
    h = Harness()
    h.register(WEB)
    h.register({"Name": "db", "Port": 1, "Check": {"TTL": "1m", "Status": "warning"}})
    found = checks(h)
    assert found["web-ttl"]["Status"] == "critical"
    assert found["service:db"]["Status"] == "warning"
    assert found["service:db"]["Name"] == "Service 'db' check"


def test_several_checks_are_numbered() -> None:
    h = Harness()
    h.register(
        {
            "Name": "web",
            "Check": {"TTL": "1m"},
            "Checks": [{"TTL": "2m"}, {"Name": "named", "TTL": "3m"}],
        }
    )
    found = checks(h)
    assert set(found) == {"service:web:1", "service:web:2", "service:web:3"}
    assert found["service:web:3"]["Name"] == "named"


def test_re_registering_keeps_the_check_status_and_output() -> None:
    h = Harness()
    h.register(WEB)
    h.put("/v1/agent/check/update/web-ttl", {"Status": "passing", "Output": "ok"})
    h.register({**WEB, "Check": {"CheckID": "web-ttl", "TTL": "15m"}})
    check = checks(h)["web-ttl"]
    assert (check["Status"], check["Output"]) == ("passing", "ok")


def test_re_registration_syncs_a_deferred_output_change_at_once() -> None:
    h = Harness()
    h.register(WEB)
    h.put("/v1/agent/check/pass/web-ttl?note=one")
    h.put("/v1/agent/check/pass/web-ttl?note=two")
    (entry,) = health(h, "/v1/health/service/web")
    assert entry["Checks"][1]["Output"] == "one"
    h.register(WEB)
    (entry,) = health(h, "/v1/health/service/web")
    assert entry["Checks"][1]["Output"] == "two"
    h.advance(600)
    assert checks(h)["web-ttl"]["Output"] == "two"


def test_identical_re_registration_moves_no_index() -> None:
    h = Harness()
    h.register(WEB)
    before = index_of(h, "/v1/health/service/web")
    h.register(WEB)
    assert index_of(h, "/v1/health/service/web") == before


def test_re_registering_with_new_tags_updates_the_service_and_its_checks() -> None:
    h = Harness()
    h.register(WEB)
    before = index_of(h, "/v1/health/service/web")
    pending = h.start("GET", f"/v1/health/service/web?index={before}&wait=10s")
    # the check is kept (no replace-existing-checks) and takes the new tags
    h.register(
        {"Name": "web", "Port": 8080, "Connect": {"Native": True}, "Tags": ["v2"]}
    )
    (entry,) = pending.answer().json()
    assert entry["Service"]["Tags"] == ["v2"]
    (check,) = [c for c in entry["Checks"] if c["CheckID"] == "web-ttl"]
    assert check["ServiceTags"] == ["v2"]
    assert entry["Service"]["ModifyIndex"] > entry["Service"]["CreateIndex"]


def test_replace_existing_checks_drops_checks_not_registered_again() -> None:
    h = Harness()
    h.register({"Name": "web", "Checks": [{"CheckID": "a", "TTL": "1m"}]})
    h.register({"Name": "web", "Checks": [{"CheckID": "b", "TTL": "1m"}]})
    assert set(checks(h)) == {"a", "b"}
    answer = h.put(
        f"{REGISTER}?replace-existing-checks",
        {"Name": "web", "Checks": [{"CheckID": "b", "TTL": "1m"}]},
    )
    assert answer.status == 200
    assert set(checks(h)) == {"b"}


def test_service_address_adds_tagged_addresses() -> None:
    h = Harness()
    h.register({"Name": "a", "Address": "10.0.0.1", "Port": 80})
    h.register({"Name": "b", "Address": "host.example", "Port": 80})
    h.register({"Name": "c", "Address": "::1", "Port": 80})
    services = h.get("/v1/agent/services").json()
    assert services["a"]["TaggedAddresses"] == {
        "lan_ipv4": {"Address": "10.0.0.1", "Port": 80},
        "wan_ipv4": {"Address": "10.0.0.1", "Port": 80},
    }
    assert "TaggedAddresses" not in services["b"]
    assert set(services["c"]["TaggedAddresses"]) == {"lan_ipv6", "wan_ipv6"}


def test_unknown_fields_inside_connect_are_ignored_as_consul_does() -> None:
    h = Harness()
    h.register({"Name": "web", "Connect": {"Native": True, "Bogus": 1}})
    assert h.get("/v1/agent/service/web").json()["Connect"] == {"Native": True}


@pytest.mark.parametrize(
    ("flag", "replaced"),
    [("", True), ("=", True), ("=true", True), ("=1", False), ("=TRUE", False)],
)
def test_replace_existing_checks_flag_values(flag: str, replaced: bool) -> None:
    h = Harness()
    h.register({"Name": "r", "Checks": [{"CheckID": "a", "TTL": "1m"}]})
    answer = h.put(
        f"{REGISTER}?replace-existing-checks{flag}",
        {"Name": "r", "Checks": [{"CheckID": "b", "TTL": "1m"}]},
    )
    assert answer.status == 200
    assert set(checks(h)) == ({"b"} if replaced else {"a", "b"})


def test_snake_case_and_lower_case_keys_and_numeric_durations() -> None:
    h = Harness()
    h.register(
        {
            "name": "web",
            "enable_tag_override": True,
            "check": {"ttl": 60_000_000_000, "checkid": "c"},
        }
    )
    assert h.get("/v1/agent/service/web").json()["EnableTagOverride"] is True
    assert checks(h)["c"]["Type"] == "ttl"


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        ({"Name": "x", "Address": "0.0.0.0"}, 400, "Invalid service address"),
        (
            {"Name": "x", "Weights": {"Passing": 0, "Warning": 1}},
            400,
            "Invalid Weights: Passing must be greater than 0",
        ),
        (
            {"Name": "x", "Meta": {"consul-x": "1"}},
            400,
            "Invalid Service Meta: Couldn't load metadata pair ('consul-x', '1'): "
            "Key prefix 'consul-' is reserved for internal use",
        ),
        (
            {"Name": "x", "Check": {"TTL": "1m", "Interval": "10s"}},
            400,
            "Invalid check: Interval and TTL cannot both be specified",
        ),
        (
            {"Name": "x", "Check": {"HTTP": "http://x/"}},
            400,
            "Invalid check: Interval must be > 0 for Script, HTTP, or TCP checks",
        ),
        (
            {"Name": "x", "Kind": "connect-proxy"},
            400,
            "2 errors occurred:\n"
            "\t* Proxy.DestinationServiceName must be non-empty for Connect proxy "
            "services\n"
            "\t* Port must be set for a Connect proxy\n\n",
        ),
        (
            {"Name": "x", "Check": {"TTL": "1m", "Bogus": 1}},
            400,
            'Request decode failed: json: unknown field "Bogus"',
        ),
        (
            {"Name": "x", "Check": {"TTL": "1h", "CheckID": 5}},
            400,
            "Request decode failed: json: cannot unmarshal number into Go struct "
            "field .Check of type types.CheckID",
        ),
        (
            {"Name": "x", "Weights": {"Passing": "a"}},
            400,
            "Request decode failed: json: cannot unmarshal string into Go struct "
            "field Weights.Weights.Passing of type int",
        ),
        (
            {"Name": "x", "Port": 1.5},
            400,
            "Request decode failed: json: cannot unmarshal number 1.5 into Go "
            "struct field .Port of type int",
        ),
        (
            {"Name": "x", "Connect": {"Native": "yes"}},
            400,
            "Request decode failed: json: cannot unmarshal string into Go struct "
            "field .Connect of type bool",
        ),
        (
            {"Name": "x", "Proxy": {"Upstreams": [{"LocalBindPort": "a"}]}},
            400,
            "Request decode failed: json: cannot unmarshal string into Go struct "
            "field .Proxy of type int",
        ),
        (
            {"Name": "x", "TaggedAddresses": {"lan": {"Port": "a"}}},
            400,
            "Request decode failed: json: cannot unmarshal string into Go struct "
            "field ServiceAddress.TaggedAddresses.Port of type int",
        ),
        (
            {"Name": "x", "Proxy": "a"},
            400,
            "Request decode failed: json: cannot unmarshal string into Go struct "
            'field .Proxy of type struct { DestinationServiceNameSnake string "json:'
            '\\"destination_service_name\\""; DestinationServiceIDSnake string '
            '"json:\\"destination_service_id\\""; LocalServiceAddressSnake string '
            '"json:\\"local_service_address\\""; LocalServicePortSnake int '
            '"json:\\"local_service_port\\""; *structs.Alias }',
        ),
        (
            {"Name": "x", "Check": {"TTL": "1m", "args": ["a"]}},
            400,
            "Invalid check: Interval must be > 0 for Script, HTTP, or TCP checks",
        ),
        (
            {"Name": "x", "Check": {"Args": ["a"], "Interval": "10s"}},
            500,
            "Scripts are disabled on this agent from remote calls; to enable, "
            "configure 'enable_script_checks' to true",
        ),
        (
            {"Name": "x", "Connect": {"SidecarService": {"ID": "mine"}}},
            400,
            "1 error occurred:\n\t* A SidecarService cannot specify an ID as this "
            "is managed by the agent\n\n",
        ),
    ],
)
def test_registration_errors(body: dict[str, Any], status: int, text: str) -> None:
    answer = Harness().put(REGISTER, body)
    assert (answer.status, answer.text) == (status, text)
    assert answer.header("Content-Type") == "text/plain; charset=utf-8"


# --------------------------------------------------------------------------
# deregistration and sidecars


def test_deregister_removes_the_service_and_its_checks() -> None:
    h = Harness()
    h.register(WEB)
    assert h.put("/v1/agent/service/deregister/web").status == 200
    assert h.get("/v1/agent/services").json() == {}
    assert checks(h) == {}
    assert h.get("/v1/health/service/web").json() == []


def test_deregister_of_an_unknown_id_is_not_an_error() -> None:
    answer = Harness().put("/v1/agent/service/deregister/nosuch")
    assert (answer.status, answer.body) == (200, b"")
    assert answer.header("Content-Type") is None


def test_sidecar_is_created_with_the_next_free_port_and_removed_with_its_parent() -> (
    None
):
    h = Harness()
    h.register({"Name": "n2", "Port": 9000, "Connect": {"SidecarService": {}}})
    h.register({"Name": "n3", "Connect": {"SidecarService": {}}})
    services = h.get("/v1/agent/services").json()
    assert services["n2-sidecar-proxy"]["Port"] == 21000
    assert services["n3-sidecar-proxy"]["Port"] == 21001
    proxy = services["n2-sidecar-proxy"]["Proxy"]
    assert proxy["DestinationServiceName"] == "n2"
    assert proxy["LocalServicePort"] == 9000
    sidecar_checks = {
        c["Name"]: c for c in checks(h).values() if c["ServiceID"] == "n2-sidecar-proxy"
    }
    assert set(sidecar_checks) == {
        "Connect Sidecar Listening",
        "Connect Sidecar Aliasing n2",
    }
    # measured on 1.8.7: the TCP check has not passed, the alias mirrors n2
    listening = sidecar_checks["Connect Sidecar Listening"]
    assert (listening["Type"], listening["Status"]) == ("tcp", "critical")
    alias = sidecar_checks["Connect Sidecar Aliasing n2"]
    assert (alias["Type"], alias["Status"], alias["Output"]) == (
        "alias",
        "passing",
        "No checks found.",
    )
    # the proxy answers for n2 in Connect discovery, but is not healthy
    assert service_ids(health(h, "/v1/health/connect/n2")) == ["n2-sidecar-proxy"]
    assert health(h, "/v1/health/connect/n2?passing") == []
    h.put("/v1/agent/service/deregister/n2")
    assert set(h.get("/v1/agent/services").json()) == {"n3", "n3-sidecar-proxy"}


# --------------------------------------------------------------------------
# TTL checks


def test_check_updates_set_status_and_output() -> None:
    h = Harness()
    h.register(WEB)
    for verb, status in [
        ("pass", "passing"),
        ("warn", "warning"),
        ("fail", "critical"),
    ]:
        answer = h.put(f"/v1/agent/check/{verb}/web-ttl?note=n-{verb}")
        assert (answer.status, answer.body) == (200, b"")
        check = checks(h)["web-ttl"]
        assert (check["Status"], check["Output"]) == (status, f"n-{verb}")


def test_unknown_and_non_ttl_checks_are_a_500() -> None:
    h = Harness()
    h.register(
        {"Name": "web", "Check": {"CheckID": "http", "HTTP": "x", "Interval": "1s"}}
    )
    for check_id in ("nosuch", "http"):
        answer = h.put(f"/v1/agent/check/pass/{check_id}")
        assert (answer.status, answer.text) == (
            500,
            f'CheckID "{check_id}" does not have associated TTL',
        )


def test_check_update_validates_the_status_before_the_check() -> None:
    answer = Harness().put("/v1/agent/check/update/nosuch", {"Output": "x"})
    assert (answer.status, answer.text) == (400, "Invalid check status: ''")


def test_ttl_expiry_turns_the_check_critical_with_the_last_output() -> None:
    h = Harness()
    h.register({"Name": "web", "Check": {"CheckID": "c", "TTL": "10s"}})
    h.put("/v1/agent/check/pass/c?note=all%20good")
    h.advance(9)
    assert checks(h)["c"]["Status"] == "passing"
    h.put("/v1/agent/check/pass/c?note=still%20good")
    h.advance(9.9)
    assert checks(h)["c"]["Status"] == "passing"
    h.advance(0.1)
    check = checks(h)["c"]
    assert check["Status"] == "critical"
    assert check["Output"] == (
        "TTL expired (last output before timeout follows): still good"
    )
    (entry,) = health(h, "/v1/health/service/web")
    assert entry["Checks"][1]["Status"] == "critical"


def test_ttl_expiry_without_output() -> None:
    h = Harness()
    h.register({"Name": "web", "Check": {"CheckID": "c", "TTL": "10s"}})
    h.advance(10)
    assert checks(h)["c"]["Output"] == "TTL expired"


def test_alias_check_follows_the_aliased_service() -> None:
    h = Harness()
    h.register(
        {
            "Name": "web",
            "Checks": [
                {"CheckID": "a", "TTL": "1m", "Status": "passing"},
                {"CheckID": "b", "Name": "bee", "TTL": "1m", "Status": "passing"},
            ],
        }
    )
    h.register({"Name": "mirror", "Check": {"CheckID": "m", "AliasService": "web"}})
    h.register({"Name": "lost", "Check": {"CheckID": "l", "AliasService": "nosuch"}})

    def alias() -> tuple[str, str]:
        check = checks(h)["m"]
        return check["Status"], check["Output"]

    assert alias() == ("passing", "All checks passing.")
    h.put("/v1/agent/check/warn/b?note=slow")
    # Consul resets the message after a warning (agent/checks/alias.go)
    assert alias() == ("warning", "All checks passing.")
    h.put("/v1/agent/check/fail/b?note=down")
    assert alias() == ("critical", 'Aliased check "bee" failing: down')
    h.put("/v1/agent/service/deregister/web")
    assert alias() == ("critical", "Service web could not be found on node ")
    assert checks(h)["l"]["Output"] == "Service nosuch could not be found on node "


def test_long_output_is_truncated_like_consul() -> None:
    h = Harness()
    h.register(WEB)
    h.put("/v1/agent/check/update/web-ttl", {"Status": "passing", "Output": "x" * 5000})
    assert checks(h)["web-ttl"]["Output"] == (
        "x" * 4096 + " ... (captured 4096 of 5000 bytes)"
    )


def test_output_only_change_reaches_health_later_without_waking_watchers() -> None:
    # check_update_interval: interval/2 + RandomStagger(interval) = 150 s here
    h = Harness(rng=fixed_random(0.0))
    h.register(WEB)
    h.put("/v1/agent/check/pass/web-ttl?note=one")
    index = index_of(h, "/v1/health/service/web")
    pending = h.start("GET", f"/v1/health/service/web?index={index}&wait=10m")
    h.put("/v1/agent/check/pass/web-ttl?note=two")
    assert checks(h)["web-ttl"]["Output"] == "two"
    h.advance(149)
    assert not pending.done
    (entry,) = health(h, "/v1/health/service/web")
    assert entry["Checks"][1]["Output"] == "one"
    h.advance(1)
    (entry,) = pending.answer().json()
    assert entry["Checks"][1]["Output"] == "two"


# --------------------------------------------------------------------------
# health


def test_passing_drops_warning_and_critical_instances() -> None:
    h = Harness()
    for n, status in enumerate(["passing", "warning", "critical"]):
        h.register(
            {
                "ID": f"w{n}",
                "Name": "web",
                "Connect": {"Native": True},
                "Check": {"TTL": "1m", "Status": status},
            }
        )
    assert service_ids(health(h, "/v1/health/connect/web")) == ["w0", "w1", "w2"]
    assert service_ids(health(h, "/v1/health/connect/web?passing")) == ["w0"]
    assert service_ids(health(h, "/v1/health/connect/web?passing=true")) == ["w0"]
    assert len(health(h, "/v1/health/connect/web?passing=0")) == 3


def test_health_service_filters_by_tags_case_insensitively() -> None:
    h = Harness()
    h.register({"ID": "a", "Name": "web", "Tags": ["Blue", "v1"]})
    h.register({"ID": "b", "Name": "web", "Tags": ["green"]})
    assert service_ids(health(h, "/v1/health/service/web?tag=blue")) == ["a"]
    assert service_ids(health(h, "/v1/health/service/web?tag=blue&tag=v2")) == []


def test_health_service_names_match_case_insensitively() -> None:
    h = Harness()
    h.register({"ID": "a", "Name": "web"})
    assert service_ids(health(h, "/v1/health/service/WEB")) == ["a"]


def test_health_connect_includes_proxies_and_natives_but_not_plain_instances() -> None:
    h = Harness()
    h.register({"ID": "native", "Name": "db", "Port": 1, "Connect": {"Native": True}})
    h.register({"ID": "plain", "Name": "db", "Port": 2})
    h.register(
        {
            "ID": "proxy",
            "Name": "db-sidecar-proxy",
            "Kind": "connect-proxy",
            "Port": 21000,
            "Proxy": {"DestinationServiceName": "db"},
        }
    )
    entries = health(h, "/v1/health/connect/db")
    assert service_ids(entries) == ["native", "proxy"]
    proxy = entries[1]["Service"]
    assert proxy["Kind"] == "connect-proxy"
    assert proxy["Connect"] == {}
    assert "Kind" not in entries[0]["Service"]
    assert service_ids(health(h, "/v1/health/service/db")) == ["native", "plain"]


def test_other_datacenter_has_no_path() -> None:
    answer = Harness().get("/v1/health/service/web?dc=dc2")
    assert (answer.status, answer.text) == (500, "No path to datacenter")


def test_namespaces_are_enterprise() -> None:
    answer = Harness().get("/v1/health/service/web?ns=team")
    assert answer.status == 400
    assert answer.text == (
        'Bad request: Invalid query parameter: "ns" - Namespaces are a Consul '
        "Enterprise feature"
    )


def test_stale_and_consistent_conflict() -> None:
    answer = Harness().get("/v1/health/service/web?stale&consistent")
    assert (answer.status, answer.text) == (
        400,
        "Cannot specify ?stale with ?consistent, conflicting semantics.",
    )


def test_stale_read_reports_its_consistency() -> None:
    answer = Harness().get("/v1/health/service/web?stale")
    assert answer.header("X-Consul-Effective-Consistency") == "stale"
