"""
Where the captures say nothing, the development agent is compared with a
live Consul 1.8.7: the same requests, in the same order, against the
session's real agent (during fixture setup, with service names of this
module's own) and against a development agent, then status, header names and
body compared step by step.  These are the answers that were only inferred
from Consul's source before: nested decode errors, lax ``Connect`` decoding,
stored intention namespaces, alias checks, refused script checks, the ``dc``
errors, ``replace-existing-checks`` values.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from attrs import frozen

from tests.consul_agent import RealConsulAgent
from tests.test_devagent_support import IGNORED_HEADERS, Harness

U = f"vr{uuid.uuid4().hex[:6]}"  # this module's service names

JSON = "json"  # compare JSON shapes and these values
TEXT = "text"  # compare the body exactly


@frozen
class Step:
    method: str
    path: str
    body: Any = None
    compare: str = TEXT
    # JSON keys whose values may differ (only their types are compared)
    loose: frozenset[str] = frozenset()


STEPS = [
    # decoding of registrations
    Step("PUT", "/v1/agent/service/register", {"Name": U, "Check": {"CheckID": 5}}),
    Step("PUT", "/v1/agent/service/register", {"Name": U, "Weights": {"Passing": "a"}}),
    Step("PUT", "/v1/agent/service/register", {"Name": U, "Connect": {"Native": "y"}}),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": U, "Proxy": {"Upstreams": [{"LocalBindPort": "a"}]}},
    ),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": U, "TaggedAddresses": {"lan": {"Port": "a"}}},
    ),
    Step("PUT", "/v1/agent/service/register", {"Name": U, "Check": "a"}),
    Step("PUT", "/v1/agent/service/register", b"[]"),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": U, "Check": {"TTL": "1m", "args": ["a"]}},
    ),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": U, "Check": {"Args": ["a"], "Interval": "10s"}},
    ),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": f"{U}-lax", "Port": 1, "Connect": {"Native": True, "Bogus": 1}},
    ),
    Step("GET", f"/v1/agent/service/{U}-lax", compare=JSON),
    # replace-existing-checks values
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": f"{U}-r", "Checks": [{"CheckID": f"{U}-a", "TTL": "1m"}]},
    ),
    Step(
        "PUT",
        "/v1/agent/service/register?replace-existing-checks=1",
        {"Name": f"{U}-r", "Checks": [{"CheckID": f"{U}-b", "TTL": "1m"}]},
    ),
    Step("GET", f"/v1/health/service/{U}-r", compare=JSON),
    Step(
        "PUT",
        "/v1/agent/service/register?replace-existing-checks=true",
        {"Name": f"{U}-r", "Checks": [{"CheckID": f"{U}-b", "TTL": "1m"}]},
    ),
    Step("GET", f"/v1/health/service/{U}-r", compare=JSON),
    # a sidecar and its alias check
    Step(
        "PUT",
        "/v1/agent/service/register",
        {
            "Name": f"{U}-p",
            "Port": 9000,
            "Connect": {"SidecarService": {"Port": 21999}},
        },
    ),
    # Real Consul runs the alias check a moment after registering it.
    Step(
        "GET",
        f"/v1/health/connect/{U}-p",
        compare=JSON,
        loose=frozenset({"Status", "Output"}),
    ),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": f"{U}-m", "Check": {"CheckID": f"{U}-m", "AliasService": f"{U}-no"}},
    ),
    Step("GET", f"/v1/health/service/{U}-m", compare=JSON),
    # checks
    Step(
        "PUT",
        "/v1/agent/service/register",
        {
            "Name": f"{U}-h",
            "Check": {"CheckID": f"{U}-h", "HTTP": "x", "Interval": "1h"},
        },
    ),
    Step("PUT", f"/v1/agent/check/pass/{U}-h"),
    Step("PUT", f"/v1/agent/check/update/{U}-h", {"Output": "x"}),
    # intentions and authorize
    Step(
        "POST",
        "/v1/connect/intentions",
        {"SourceName": "a", "DestinationName": U, "Action": "allow", "Precedence": "x"},
    ),
    Step(
        "POST",
        "/v1/connect/intentions",
        {
            "SourceNS": "team",
            "SourceName": f"{U}-api",
            "DestinationName": f"{U}-web",
            "Action": "deny",
            "CreatedAt": "x",
            "Hash": "!!",
        },
        compare=JSON,
    ),
    Step(
        "GET",
        f"/v1/connect/intentions/match?by=destination&name={U}-web&cached",
        compare=JSON,
    ),
    Step(
        "POST",
        "/v1/agent/connect/authorize",
        {
            "Target": f"{U}-web",
            "ClientCertURI": f"spiffe://<td>/ns/team/dc/dc1/svc/{U}-api",
        },
    ),
    Step(
        "GET", f"/v1/connect/intentions/check?source=team/{U}-api&destination={U}-web"
    ),
    Step("DELETE", "/v1/connect/intentions/short"),
    Step("PUT", "/v1/connect/intentions/short", {"SourceName": "a"}),
    # other datacenters, filters, paths
    Step("GET", "/v1/connect/intentions?dc=dc2"),
    Step("GET", f"/v1/health/service/{U}?dc=dc2"),
    Step("GET", "/v1/connect/ca/roots?dc=dc2"),
    Step("GET", "/v1/agent/connect/ca/leaf/x?dc=dc2"),
    Step("GET", "/v1/nosuch"),
    Step("PUT", "/v1/connect/ca/configuration", {"Provider": "vault", "Config": {}}),
    Step("PUT", "/v1/connect/ca/configuration", {"Provider": 5}),
    # what twistd connect-native's --tag, --meta and
    # --deregister-critical-after register (issue 17, item 4)
    Step(
        "PUT",
        "/v1/agent/service/register",
        {
            "Name": f"{U}-tm",
            "Port": 8443,
            "Connect": {"Native": True},
            "Tags": ["blue", "v2", "blue"],
            "Meta": {"version": "1.2", "team": ""},
            "Checks": [
                {
                    "CheckID": f"{U}-tm:ttl",
                    "TTL": "30s",
                    "Status": "critical",
                    "DeregisterCriticalServiceAfter": "10m",
                }
            ],
        },
    ),
    Step("GET", f"/v1/agent/service/{U}-tm", compare=JSON),
    Step("GET", f"/v1/health/connect/{U}-tm", compare=JSON),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": f"{U}-tm2", "Meta": {"consul-version": "1"}},
    ),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": f"{U}-tm2", "Meta": {"a b": "1"}},
    ),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": f"{U}-tm2", "Meta": {"k": "v" * 513}},
    ),
    Step(
        "PUT",
        "/v1/agent/service/register",
        {"Name": f"{U}-tm2", "Meta": {"k" * 129: "v"}},
    ),
]

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Values that differ on every run, or by design (docs/devagent.rst)
VARYING = {
    "CreateIndex",
    "ModifyIndex",
    "ID",
    "CreatedAt",
    "UpdatedAt",
    "Hash",
    "ContentHash",
}


@frozen
class Seen:
    status: int
    headers: frozenset[str]
    body: str


def _encode(step: Step, trust_domain: str) -> bytes | None:
    if step.body is None:
        return None
    raw = step.body if isinstance(step.body, bytes) else json.dumps(step.body).encode()
    return raw.replace(b"<td>", trust_domain.encode())


def _normal(text: str, trust_domain: str, node: str) -> str:
    text = text.replace(trust_domain, "<td>")
    text = UUID.sub("<uuid>", text)
    return text.replace(f'"Node": "{node}"', '"Node": "<node>"')


def _real_answers(agent: RealConsulAgent) -> list[Seen]:
    def call(method: str, path: str, data: bytes | None) -> tuple[int, Any, bytes]:
        request = urllib.request.Request(
            f"http://{agent.http_address}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    roots = json.loads(call("GET", "/v1/agent/connect/ca/roots", None)[2])
    td = roots["TrustDomain"]
    seen = []
    for step in STEPS:
        status, headers, body = call(step.method, step.path, _encode(step, td))
        names = {h.lower() for h in headers} - IGNORED_HEADERS - {"connection"}
        seen.append(
            Seen(status, frozenset(names), _normal(body.decode(), td, agent.node_name))
        )
    return seen


def _dev_answers() -> list[Seen]:
    h = Harness(node_name="dev")
    td = h.agent.ca.trust_domain
    seen = []
    for step in STEPS:
        answer = h.call(step.method, step.path, _encode(step, td))
        seen.append(
            Seen(
                answer.status,
                frozenset(answer.header_names),
                _normal(answer.text, td, "dev"),
            )
        )
    return seen


@pytest.fixture(scope="module")
def answers(real_consul: RealConsulAgent) -> tuple[list[Seen], list[Seen]]:
    return _real_answers(real_consul), _dev_answers()


def _shape(value: Any, loose: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {
            k: (type(v).__name__ if k in VARYING or k in loose else _shape(v, loose))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_shape(v, loose) for v in value]
    return value


@pytest.mark.parametrize("number", range(len(STEPS)))
def test_step_answers_as_the_real_agent(
    answers: tuple[list[Seen], list[Seen]], number: int
) -> None:
    step = STEPS[number]
    real, dev = answers[0][number], answers[1][number]
    assert dev.status == real.status, (step, real.body, dev.body)
    assert dev.headers == real.headers, step
    if step.compare == TEXT:
        assert dev.body == real.body, step
    else:
        ours, theirs = json.loads(dev.body), json.loads(real.body)
        assert _shape(ours, step.loose) == _shape(theirs, step.loose), step
