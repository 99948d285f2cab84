"""
Blocking queries on the development agent follow the real agent's rules
(``REAL-BEHAVIOUR.md`` section 1), on a ``Clock``: agent-cache endpoints
(roots, leaf) block exactly ``wait`` with no jitter and forever without a
``wait``; catalog-backed endpoints (health, intentions, server roots) add up
to ``wait/16`` and default to five minutes; a higher index than the current
one blocks the whole wait and brings the lower index back.
"""

from __future__ import annotations

import pytest

from tests.test_devagent_support import Harness, fixed_random

ROOTS = "/v1/agent/connect/ca/roots"


def index_of(h: Harness, path: str) -> int:
    return int(h.get(path).header("X-Consul-Index") or 0)


# --------------------------------------------------------------------------
# agent cache: roots and leaf


def test_roots_at_current_index_block_exactly_the_wait() -> None:
    # a jitter would show with random() close to 1
    h = Harness(rng=fixed_random(0.999))
    current = index_of(h, ROOTS)
    pending = h.start("GET", f"{ROOTS}?index={current}&wait=2s")
    h.advance(1.999)
    assert not pending.done
    h.advance(0.001)
    answer = pending.answer()
    assert answer.status == 200
    assert answer.header("X-Cache") == "MISS"
    assert answer.header("Age") is None
    assert answer.header("X-Consul-Index") == str(current)


def test_roots_at_higher_index_block_and_return_the_lower_index() -> None:
    h = Harness()
    current = index_of(h, ROOTS)
    pending = h.start("GET", f"{ROOTS}?index={current + 1000}&wait=2s")
    h.advance(1.9)
    assert not pending.done
    h.advance(0.1)
    assert pending.answer().header("X-Consul-Index") == str(current)


@pytest.mark.parametrize("wait", ["", "&wait=0s", "&wait=", "&wait=-1s"])
def test_roots_without_a_positive_wait_never_time_out(wait: str) -> None:
    h = Harness()
    current = index_of(h, ROOTS)
    pending = h.start("GET", f"{ROOTS}?index={current}{wait}")
    h.advance(25 * 60)
    assert not pending.done
    # ... until the roots index moves
    h.put(
        "/v1/connect/ca/configuration",
        {"Provider": "consul", "Config": {"PrivateKeyBits": 384}},
    )
    answer = pending.answer()
    assert int(answer.header("X-Consul-Index") or 0) > current


def test_roots_wake_on_a_configuration_change_with_identical_roots() -> None:
    h = Harness()
    before = h.get(ROOTS)
    current = int(before.header("X-Consul-Index") or 0)
    pending = h.start("GET", f"{ROOTS}?index={current}&wait=15s")
    h.advance(1)
    assert not pending.done
    h.put(
        "/v1/connect/ca/configuration",
        {
            "Provider": "consul",
            "Config": {
                "LeafCertTTL": "72h",
                "PrivateKeyType": "ec",
                "PrivateKeyBits": 384,
            },
        },
    )
    answer = pending.answer()
    assert answer.json() == before.json()
    assert int(answer.header("X-Consul-Index") or 0) > current


def test_roots_with_a_tiny_wait_return_at_once() -> None:
    h = Harness()
    current = index_of(h, ROOTS)
    pending = h.start("GET", f"{ROOTS}?index={current}&wait=1ms")
    h.advance(0.001)
    assert pending.answer().status == 200


def test_empty_index_does_not_block() -> None:
    h = Harness()
    h.get(ROOTS)
    answer = h.get(f"{ROOTS}?index=&wait=1s")
    assert answer.header("X-Cache") == "HIT"


def test_leaf_at_current_index_blocks_exactly_the_wait_and_keeps_the_cert() -> None:
    h = Harness(rng=fixed_random(0.999))
    first = h.get("/v1/agent/connect/ca/leaf/web")
    index = first.json()["ModifyIndex"]
    pending = h.start("GET", f"/v1/agent/connect/ca/leaf/web?index={index}&wait=2s")
    h.advance(1.999)
    assert not pending.done
    h.advance(0.001)
    answer = pending.answer()
    assert answer.json() == first.json()
    assert answer.header("X-Cache") == "MISS"
    assert answer.header("X-Consul-Index") == str(index)


def test_leaf_at_higher_index_returns_the_lower_index_after_the_wait() -> None:
    h = Harness()
    index = h.get("/v1/agent/connect/ca/leaf/web").json()["ModifyIndex"]
    pending = h.start(
        "GET", f"/v1/agent/connect/ca/leaf/web?index={index + 1000}&wait=2s"
    )
    h.advance(1.9)
    assert not pending.done
    h.advance(0.1)
    assert pending.answer().header("X-Consul-Index") == str(index)


def test_first_leaf_request_above_the_new_index_keeps_blocking() -> None:
    h = Harness()
    pending = h.start("GET", "/v1/agent/connect/ca/leaf/web?index=1000&wait=2s")
    h.advance(1.9)
    assert not pending.done
    h.advance(0.1)
    answer = pending.answer()
    assert answer.header("X-Cache") == "MISS"
    assert answer.header("X-Consul-Index") == "14"


@pytest.mark.parametrize("wait", ["", "&wait=0s", "&wait=-1s"])
def test_leaf_without_a_positive_wait_never_times_out(wait: str) -> None:
    h = Harness()
    index = h.get("/v1/agent/connect/ca/leaf/web").json()["ModifyIndex"]
    pending = h.start("GET", f"/v1/agent/connect/ca/leaf/web?index={index}{wait}")
    for _ in range(5):
        h.advance(10 * 60)
        assert not pending.done


# --------------------------------------------------------------------------
# catalog-backed (RPC) reads: health, intentions, server roots


def register_db(h: Harness) -> None:
    h.register(
        {
            "ID": "db-1",
            "Name": "db",
            "Port": 5001,
            "Address": "127.0.0.1",
            "Connect": {"Native": True},
            "Check": {"CheckID": "db-1-ttl", "TTL": "15m", "Status": "passing"},
        }
    )
    h.register(
        {
            "ID": "db-2",
            "Name": "db",
            "Port": 5002,
            "Connect": {"Native": True},
            "Check": {"CheckID": "db-2-ttl", "TTL": "15m"},
        }
    )
    h.register(
        {
            "ID": "db-3",
            "Name": "db",
            "Port": 5003,
            "Tags": ["plain"],
            "Check": {"TTL": "15m", "Status": "passing"},
        }
    )
    h.register(
        {
            "Name": "web",
            "Port": 8080,
            "Connect": {"Native": True},
            "Check": {"CheckID": "web-ttl", "TTL": "15m"},
        }
    )


HEALTH = "/v1/health/connect/db?passing=1"


def test_health_blocks_the_wait_plus_its_jitter() -> None:
    h = Harness(rng=fixed_random(0.5))
    register_db(h)
    current = index_of(h, HEALTH)
    pending = h.start("GET", f"{HEALTH}&index={current}&wait=2s")
    # jitter = random() * wait / 16 = 0.0625 s
    h.advance(2.0624)
    assert not pending.done
    h.advance(0.0001)
    answer = pending.answer()
    assert answer.header("X-Consul-Index") == str(current)


def test_health_jitter_stays_within_a_sixteenth_of_the_wait() -> None:
    h = Harness(rng=fixed_random(0.999999))
    register_db(h)
    current = index_of(h, HEALTH)
    pending = h.start("GET", f"{HEALTH}&index={current}&wait=3s")
    h.advance(3.1)
    assert not pending.done
    h.advance(3.0 / 16 - 0.1)
    assert pending.done


@pytest.mark.parametrize(
    ("wait", "timeout"), [("", 300.0), ("&wait=0s", 300.0), ("&wait=20m", 600.0)]
)
def test_health_wait_defaults_to_five_minutes_and_is_clamped_to_ten(
    wait: str, timeout: float
) -> None:
    h = Harness(rng=fixed_random(0.0))
    register_db(h)
    current = index_of(h, HEALTH)
    pending = h.start("GET", f"{HEALTH}&index={current}{wait}")
    h.advance(timeout - 0.01)
    assert not pending.done
    h.advance(0.01)
    assert pending.done


def test_health_at_higher_index_returns_the_lower_index() -> None:
    h = Harness()
    register_db(h)
    current = index_of(h, HEALTH)
    pending = h.start("GET", f"{HEALTH}&index={current + 1000}&wait=2s")
    h.advance(2.2)
    assert pending.answer().header("X-Consul-Index") == str(current)


def test_health_wakes_when_a_native_instance_check_passes() -> None:
    h = Harness()
    register_db(h)
    current = index_of(h, HEALTH)
    assert [e["Service"]["ID"] for e in h.get(HEALTH).json()] == ["db-1"]
    pending = h.start("GET", f"{HEALTH}&index={current}&wait=10s")
    h.advance(1)
    assert not pending.done
    h.put("/v1/agent/check/pass/db-2-ttl")
    answer = pending.answer()
    assert int(answer.header("X-Consul-Index") or 0) > current
    assert [e["Service"]["ID"] for e in answer.json()] == ["db-1", "db-2"]


def test_health_connect_wakes_on_a_non_connect_instance_of_the_same_name() -> None:
    h = Harness()
    register_db(h)
    current = index_of(h, HEALTH)
    pending = h.start("GET", f"{HEALTH}&index={current}&wait=10s")
    h.advance(1)
    h.put("/v1/agent/check/fail/service:db-3")
    answer = pending.answer()
    assert int(answer.header("X-Consul-Index") or 0) > current
    assert [e["Service"]["ID"] for e in answer.json()] == ["db-1"]


def test_health_is_not_woken_by_an_unrelated_service() -> None:
    h = Harness(rng=fixed_random(0.0))
    register_db(h)
    current = index_of(h, HEALTH)
    pending = h.start("GET", f"{HEALTH}&index={current}&wait=3s")
    h.advance(1)
    h.put("/v1/agent/check/pass/web-ttl")
    assert not pending.done
    h.advance(2)
    assert pending.answer().header("X-Consul-Index") == str(current)


def test_health_wakes_when_a_new_instance_registers() -> None:
    h = Harness()
    register_db(h)
    path = "/v1/health/connect/db"
    current = index_of(h, path)
    pending = h.start("GET", f"{path}?index={current}&wait=10s")
    h.advance(1)
    h.register({"ID": "db-4", "Name": "db", "Port": 5004, "Connect": {"Native": True}})
    answer = pending.answer()
    assert "db-4" in [e["Service"]["ID"] for e in answer.json()]


def test_health_reports_a_bad_passing_value_only_after_blocking() -> None:
    h = Harness(rng=fixed_random(0.0))
    register_db(h)
    current = index_of(h, "/v1/health/connect/db")
    pending = h.start(
        "GET", f"/v1/health/connect/db?passing=bad&index={current}&wait=2s"
    )
    h.advance(1)
    assert not pending.done
    h.advance(1)
    answer = pending.answer()
    assert (answer.status, answer.text) == (400, "Invalid value for ?passing")


def test_cached_health_blocks_without_jitter() -> None:
    h = Harness(rng=fixed_random(0.999))
    register_db(h)
    path = "/v1/health/connect/db?cached"
    first = h.get(path)
    assert first.header("X-Cache") == "MISS"
    assert h.get(path).header("X-Cache") == "HIT"
    current = int(first.header("X-Consul-Index") or 0)
    pending = h.start("GET", f"{path}&index={current}&wait=2s")
    h.advance(2)
    answer = pending.answer()
    assert answer.header("X-Cache") == "MISS"


def test_intentions_list_blocks_and_wakes_on_a_write() -> None:
    h = Harness(rng=fixed_random(0.0))
    current = index_of(h, "/v1/connect/intentions")
    pending = h.start("GET", f"/v1/connect/intentions?index={current}&wait=10s")
    h.advance(5)
    assert not pending.done
    h.post(
        "/v1/connect/intentions",
        {"SourceName": "api", "DestinationName": "web", "Action": "deny"},
    )
    answer = pending.answer()
    assert len(answer.json()) == 1
    assert int(answer.header("X-Consul-Index") or 0) > current


def test_intention_match_blocks_without_an_index_header_and_any_write_wakes_it() -> (
    None
):
    h = Harness(rng=fixed_random(0.0))
    h.post(
        "/v1/connect/intentions",
        {"SourceName": "api", "DestinationName": "web", "Action": "deny"},
    )
    current = index_of(h, "/v1/connect/intentions")
    path = "/v1/connect/intentions/match?by=destination&name=web"
    pending = h.start("GET", f"{path}&index={current}&wait=15s")
    h.advance(1)
    assert not pending.done
    h.post(
        "/v1/connect/intentions",
        {"SourceName": "db", "DestinationName": "other", "Action": "allow"},
    )
    answer = pending.answer()
    assert answer.header("X-Consul-Index") is None
    assert [i["SourceName"] for i in answer.json()["web"]] == ["api"]


def test_intention_match_with_index_below_current_returns_at_once() -> None:
    h = Harness()
    h.post(
        "/v1/connect/intentions",
        {"SourceName": "api", "DestinationName": "web", "Action": "deny"},
    )
    pending = h.start(
        "GET", "/v1/connect/intentions/match?by=destination&name=web&index=1&wait=2s"
    )
    assert pending.done


def test_server_roots_block_with_jitter() -> None:
    h = Harness(rng=fixed_random(0.5))
    current = index_of(h, "/v1/connect/ca/roots")
    pending = h.start("GET", f"/v1/connect/ca/roots?index={current}&wait=2s")
    h.advance(2.06)
    assert not pending.done
    h.advance(0.01)
    assert pending.answer().header("X-Cache") is None


def test_agent_service_blocks_on_its_content_hash() -> None:
    h = Harness(rng=fixed_random(0.0))
    h.register({"Name": "web", "Port": 8080})
    digest = h.get("/v1/agent/service/web").header("X-Consul-Contenthash")
    pending = h.start("GET", f"/v1/agent/service/web?hash={digest}&wait=30s")
    h.advance(10)
    assert not pending.done
    h.register({"Name": "web", "Port": 8081})
    answer = pending.answer()
    assert answer.json()["Port"] == 8081
    assert answer.header("X-Consul-Contenthash") != digest


# --------------------------------------------------------------------------
# the wait primitive


def test_cancelled_wait_forgets_its_watcher_and_timer() -> None:
    h = Harness()
    waiting = h.agent.wait_until(lambda: False, 30)
    waiting.addErrback(lambda f: None)
    assert h.clock.getDelayedCalls()
    waiting.cancel()
    assert not h.agent.store._watchers
    assert not [c for c in h.clock.getDelayedCalls() if c.active()]


def test_client_that_goes_away_cancels_its_blocking_query() -> None:
    h = Harness()
    current = index_of(h, ROOTS)
    pending = h.start("GET", f"{ROOTS}?index={current}")
    assert h.agent.store._watchers
    pending.cancel()
    assert not h.agent.store._watchers
