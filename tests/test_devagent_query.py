"""
Prepared queries on the development agent, beyond the shared suite's
comparison with a real agent: the order of an execution's nodes comes from
the injected ``random.Random``, and an execution never waits on a ``Clock``.
"""

from __future__ import annotations

import random

from tests.test_devagent_support import Harness


def registered(seed: int) -> Harness:
    h = Harness(rng=random.Random(seed))
    for n in range(6):
        h.register(
            {
                "ID": f"db-{n}",
                "Name": "db",
                "Port": 5000 + n,
                "Check": {"TTL": "10m", "Status": "passing"},
            }
        )
    assert (
        h.post("/v1/query", {"Name": "q", "Service": {"Service": "db"}}).status == 200
    )
    return h


def order(h: Harness) -> list[str]:
    answer = h.get("/v1/query/q/execute")
    return [n["Service"]["ID"] for n in answer.json()["Nodes"]]


def test_execution_order_comes_from_the_injected_rng() -> None:
    first = order(registered(1))
    assert first == order(registered(1))
    orders = {tuple(order(registered(seed))) for seed in range(2, 8)}
    assert len(orders) > 1
    assert all(sorted(o) == [f"db-{n}" for n in range(6)] for o in orders)


def test_execution_never_blocks() -> None:
    h = registered(1)
    pending = h.start("GET", "/v1/query/q/execute?index=1000&wait=10m")
    assert pending.done
    assert pending.answer().header("X-Consul-Index") == "1"


def test_list_blocks_until_a_query_changes() -> None:
    h = registered(1)
    index = h.get("/v1/query").header("X-Consul-Index")
    pending = h.start("GET", f"/v1/query?index={index}&wait=1m")
    h.advance(1)
    assert not pending.done
    h.post("/v1/query", {"Name": "q2", "Service": {"Service": "db"}})
    assert pending.done
    assert len(pending.answer().json()) == 2


def test_templates_are_refused_with_a_reason() -> None:
    answer = Harness().post(
        "/v1/query",
        {
            "Name": "t",
            "Template": {"Type": "name_prefix_match"},
            "Service": {"Service": "${name.full}"},
        },
    )
    assert answer.status == 500
    assert "does not support prepared query templates" in answer.text
