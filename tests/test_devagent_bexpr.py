"""
``?filter=`` (Consul's bexpr language) on the development agent: the
parser and evaluator (connect_native.devagent.bexpr), and the five reads held
to the real 1.8.7 agent's answers (``tests/fixtures/real-1.8.7/filter-*.http``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connect_native.devagent.bexpr import (
    AGENT_SERVICE,
    CHECK_SERVICE_NODE,
    BexprError,
    BexprNilPointerError,
    compile_filter,
    parse,
)
from tests.captures import REAL
from tests.test_devagent_support import Harness, load

FILTER_CAPTURES = sorted(p.name for p in REAL.glob("filter-*.http"))

# The three registrations the captures were taken after (README.md).
REGISTRATIONS = [
    {
        "Name": "web",
        "ID": "web1",
        "Port": 8080,
        "Tags": ["v1", "primary"],
        "Meta": {"env": "prod", "team": "a"},
        "Connect": {"Native": True},
        "Check": {
            "TTL": "30m",
            "CheckID": "web1-ttl",
            "Name": "web ttl",
            "Status": "passing",
        },
    },
    {
        "Name": "web",
        "ID": "web2",
        "Port": 8081,
        "Tags": ["v2"],
        "Meta": {"env": "staging"},
        "Connect": {"Native": True},
        "Check": {
            "TTL": "30m",
            "CheckID": "web2-ttl",
            "Name": "web2 ttl",
            "Status": "critical",
        },
    },
    {
        "Name": "db",
        "ID": "db1",
        "Port": 5432,
        "Check": {
            "TTL": "30m",
            "CheckID": "db1-ttl",
            "Name": "db ttl",
            "Status": "warning",
        },
    },
]


def ids(body: Any) -> list[str]:
    """The service (or check) IDs an answer lists, whatever its shape."""
    if isinstance(body, dict):
        return sorted(body)
    return sorted(
        e["Service"]["ID"] if isinstance(e.get("Service"), dict) else e["ServiceID"]
        for e in body
    )


@pytest.fixture(scope="module")
def harness() -> Harness:
    h = Harness(node_name="vm")
    for reg in REGISTRATIONS:
        answer = h.call("PUT", "/v1/agent/service/register", json.dumps(reg).encode())
        assert answer.status == 200, answer.text
    return h


def test_every_filter_capture_is_replayed() -> None:
    assert len(FILTER_CAPTURES) >= 40


@pytest.mark.parametrize("name", FILTER_CAPTURES)
def test_filter_as_real(harness: Harness, name: str) -> None:
    capture = load(name)
    answer = harness.call("GET", capture.path, None)
    if capture.status is None:
        # 1.8.7 panics on the nil *ServiceConnect of db1 and drops the
        # connection; ours refuses in one line instead.
        assert answer.status == 500
        assert "nil pointer at selector" in answer.text
        assert "\n" not in answer.text
        return
    assert answer.status == capture.status, answer.text
    assert answer.header_names == capture.header_names, name
    if capture.status == 200:
        assert ids(answer.json()) == ids(capture.json()), name
    else:
        assert answer.text == capture.body, name


# --------------------------------------------------------------------------
# the language


def matching(expression: str, items: list[dict[str, Any]]) -> list[str]:
    flt = compile_filter(expression, AGENT_SERVICE)
    return [i["ID"] for i in items if flt.matches(i)]


SERVICES = [
    {"ID": "a", "Service": "web", "Tags": ["x", "y"], "Meta": {"k": "v"}, "Port": 1},
    {"ID": "b", "Service": "web", "Tags": [], "Meta": {}, "Port": 2},
    {"ID": "c", "Service": "db", "Port": 3, "Connect": {"Native": True}},
]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Service == web", ["a", "b"]),
        ("Service != web", ["c"]),
        ('"x" in Tags', ["a"]),
        ("x not in Tags", ["b", "c"]),
        ("Tags contains y", ["a"]),
        ("Tags not contains y", ["b", "c"]),
        ("Tags is empty", ["b", "c"]),
        ("Tags is not empty", ["a"]),
        ("k in Meta", ["a"]),
        ("Meta.k == v", ["a"]),
        ('Meta["k"] != v', ["b", "c"]),
        ("Meta is empty", ["b", "c"]),
        ("Port == 2", ["b"]),
        ("eb in Service", ["a", "b"]),
        ("Service matches `^d`", ["c"]),
        ("Service not matches `^d`", ["a", "b"]),
        ("not Port == 1 and (Service == web or Port == 3)", ["b", "c"]),
        ("( Service == db )", ["c"]),
        ("not not Port == 3", ["c"]),
        ("Port == 1 or Port == 2 and Service == db", ["a"]),
    ],
)
def test_operators(expression: str, expected: list[str]) -> None:
    assert matching(expression, SERVICES) == expected


def test_any_element_of_a_list_of_structs() -> None:
    entries = [
        {"Node": {}, "Service": {"ID": "a"}, "Checks": [{"Status": "passing"}]},
        {
            "Node": {},
            "Service": {"ID": "b"},
            "Checks": [{"Status": "passing"}, {"Status": "critical"}],
        },
    ]
    flt = compile_filter("Checks.Status == critical", CHECK_SERVICE_NODE)
    assert [e["Service"]["ID"] for e in entries if flt.matches(e)] == ["b"]
    flt = compile_filter("Checks.Status != critical", CHECK_SERVICE_NODE)
    assert [e["Service"]["ID"] for e in entries if flt.matches(e)] == ["a", "b"]


def test_nil_pointer_is_its_own_error() -> None:
    flt = compile_filter("Connect.Native == true", AGENT_SERVICE)
    with pytest.raises(BexprNilPointerError, match='selector "Connect"'):
        flt.matches(SERVICES[0])
    assert flt.matches(SERVICES[2])


# Texts the real 1.8.7 agent gave for these (after its evaluator prefix).
@pytest.mark.parametrize(
    ("expression", "message"),
    [
        (
            "Service\n== x y",
            '2:6 (13): no match found, expected: "and", "or", [ \\t\\r\\n] or EOF',
        ),
        ("Port == 0x2", '1:10 (9): rule "number": Invalid number literal'),
        ('Service == "a\\q"', '1:12 (11): rule "string": invalid syntax'),
        ('Meta["k" == v', '1:10 (9): rule "index": Unclosed index expression'),
        ("a in 1", '1:6 (5): rule "match": Invalid selector'),
        ("Tags.x == y", 'Selector "Tags.x" is not valid'),
        (
            "Meta.env is empty",
            'Invalid match operator "Is Empty" for selector "Meta.env"',
        ),
    ],
)
def test_errors(expression: str, message: str) -> None:
    with pytest.raises(BexprError) as e:
        compile_filter(expression, AGENT_SERVICE)
    assert str(e.value) == message


@given(
    st.text(
        alphabet=st.sampled_from(list(' \t\n()"`[].=!-_0123456789abcnotiempyrdsS'))
        | st.characters(),
        max_size=60,
    )
)
def test_parser_raises_only_its_own_error(text: str) -> None:
    # Anything else escaping (IndexError, RecursionError...) fails the test.
    message = ""
    try:
        compile_filter(text, CHECK_SERVICE_NODE)
    except BexprError as e:
        message = str(e)
    else:
        message = "parsed"
    assert message


def test_deep_nesting_is_a_clear_error() -> None:
    with pytest.raises(BexprError):
        parse("(" * 400 + "a == b" + ")" * 400)


# --------------------------------------------------------------------------
# blocking queries: the filter applies to the answer, the index is the table's


def test_blocking_health_read_filters_the_answer_it_wakes_with() -> None:
    h = Harness(node_name="vm")
    h.register({"Name": "api", "ID": "api-1", "Port": 1, "Tags": ["old"]})
    path = "/v1/health/service/api?filter=" + quote("new in Service.Tags")
    first = h.get(path)
    assert (first.status, first.json()) == (200, [])
    index = int(first.header("X-Consul-Index") or 0)
    pending = h.start("GET", f"{path}&index={index}&wait=60s")
    h.advance(1.0)
    assert not pending.done
    h.register({"Name": "api", "ID": "api-2", "Port": 2, "Tags": ["new"]})
    h.advance(1.0)
    answer = pending.answer()
    assert answer.status == 200
    assert [e["Service"]["ID"] for e in answer.json()] == ["api-2"]
    # The index is the unfiltered service's, as on the real agent.
    assert answer.header("X-Consul-Index") == h.get("/v1/health/service/api").header(
        "X-Consul-Index"
    )
    assert int(answer.header("X-Consul-Index") or 0) > index


def test_blocking_read_with_a_bad_filter_answers_at_once() -> None:
    h = Harness(node_name="vm")
    h.register({"Name": "api", "ID": "api-1", "Port": 1})
    pending = h.start("GET", "/v1/catalog/service/api?index=999&wait=60s&filter=Nope")
    answer = pending.answer()
    assert answer.status == 500
    assert answer.text.startswith("Failed to create boolean expression evaluator: ")
    assert answer.header("X-Consul-Index") == "1"
