"""
``/v1/status/leader``, ``/v1/status/peers``, ``/v1/agent/members``,
``/v1/catalog/services``, ``/v1/catalog/nodes`` and
``/v1/catalog/datacenters`` on the development agent: answered as a fresh
real Consul 1.8.7 answers them (same status, header names and JSON shape),
and enough for Consul's own CLI: ``consul members`` and ``consul catalog
services`` work against ``python -m connect_native.devagent``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.consul_agent import RealConsulAgent
from tests.test_devagent_support import IGNORED_HEADERS, Harness

SOURCE_TREE = Path(__file__).resolve().parent.parent

# Two instances of one service, tags overlapping, and a second service.
REGISTRATIONS = [
    {"ID": "web-1", "Name": "web", "Port": 1, "Tags": ["v1", "primary"]},
    {"ID": "web-2", "Name": "web", "Port": 2, "Tags": ["v2", "primary"]},
    {"Name": "db", "Port": 3},
]
READS = [
    "/v1/status/leader",
    "/v1/status/peers",
    "/v1/agent/members",
    "/v1/agent/members?wan=1",
    "/v1/catalog/services",
    "/v1/catalog/nodes",
    "/v1/catalog/datacenters",
]


def _real(agent: RealConsulAgent) -> list[tuple[int, frozenset[str], Any]]:
    def call(method: str, path: str, body: Any = None) -> tuple[int, Any, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{agent.http_address}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    for registration in REGISTRATIONS:
        assert call("PUT", "/v1/agent/service/register", registration)[0] == 200
    seen = []
    for path in READS:
        status, headers, body = call("GET", path)
        names = {h.lower() for h in headers} - IGNORED_HEADERS - {"connection"}
        seen.append((status, frozenset(names), json.loads(body)))
    return seen


def _dev() -> list[tuple[int, frozenset[str], Any]]:
    h = Harness(node_name="dev")
    for registration in REGISTRATIONS:
        assert (
            h.call(
                "PUT", "/v1/agent/service/register", json.dumps(registration).encode()
            ).status
            == 200
        )
    seen = []
    for path in READS:
        answer = h.call("GET", path)
        seen.append(
            (answer.status, frozenset(answer.header_names), json.loads(answer.text))
        )
    return seen


def _shape(value: Any) -> Any:
    """Types, not values, except for the catalog's service listing."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


@pytest.fixture(scope="module")
def answers(
    module_real_consul: RealConsulAgent,
) -> tuple[list[Any], list[Any]]:
    # A fresh agent of this module's own: the session's holds other
    # modules' services.
    return _real(module_real_consul), _dev()


@pytest.mark.parametrize("number", range(len(READS)))
def test_answers_as_a_fresh_real_agent(
    answers: tuple[list[Any], list[Any]], number: int
) -> None:
    real, dev = answers[0][number], answers[1][number]
    assert dev[0] == real[0]
    assert dev[1] == real[1], READS[number]
    assert _shape(dev[2]) == _shape(real[2]), READS[number]


def test_the_service_listing_is_the_real_agents(
    answers: tuple[list[Any], list[Any]],
) -> None:
    number = READS.index("/v1/catalog/services")
    real, dev = answers[0][number][2], answers[1][number][2]
    assert list(dev) == list(real) == ["consul", "db", "web"]
    assert dev["consul"] == real["consul"] == []
    assert dev["db"] == real["db"] == []
    # Each tag once, whatever the order a Go map gave it.
    assert sorted(dev["web"]) == sorted(real["web"]) == ["primary", "v1", "v2"]


def test_a_wan_member_is_named_for_its_datacenter(
    answers: tuple[list[Any], list[Any]],
) -> None:
    number = READS.index("/v1/agent/members?wan=1")
    for seen in answers:
        (member,) = seen[number][2]
        assert member["Name"].endswith(".dc1")
        assert "wan_join_port" not in member["Tags"]


def test_the_services_listing_blocks_until_a_service_changes() -> None:
    h = Harness(node_name="dev")
    first = h.call("GET", "/v1/catalog/services")
    index = int(first.headers["X-Consul-Index"])
    waiting = h.start("GET", f"/v1/catalog/services?index={index}&wait=30s")
    assert not waiting.done
    h.call(
        "PUT",
        "/v1/agent/service/register",
        json.dumps({"Name": "late", "Port": 9}).encode(),
    )
    answer = waiting.answer()
    assert int(answer.headers["X-Consul-Index"]) > index
    assert "late" in json.loads(answer.text)


# --- Consul's CLI against python -m connect_native.devagent -----------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def devagent() -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(SOURCE_TREE))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connect_native.devagent",
            "--port",
            str(port),
            "--quiet",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/v1/status/leader", timeout=2)
                break
            except OSError:
                assert process.poll() is None, "the development agent exited"
                assert time.monotonic() < deadline, (
                    "the development agent never answered"
                )
                time.sleep(0.1)
        yield address
    finally:
        process.terminate()
        process.wait(10)


def _cli(binary: Path, address: str, *args: str) -> str:
    result = subprocess.run(
        [str(binary), *args, f"-http-addr={address}"],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_consul_members_and_catalog_services_work_against_it(
    consul_binary_path: Path, devagent: str
) -> None:
    request = urllib.request.Request(
        f"http://{devagent}/v1/agent/service/register",
        data=json.dumps({"Name": "web", "Port": 8443, "Tags": ["v1"]}).encode(),
        method="PUT",
    )
    urllib.request.urlopen(request, timeout=10).read()
    members = _cli(consul_binary_path, devagent, "members").splitlines()
    assert members[0].split()[:4] == ["Node", "Address", "Status", "Type"]
    assert members[1].split()[2:4] == ["alive", "server"]
    services = _cli(consul_binary_path, devagent, "catalog", "services", "-tags")
    assert [line.split() for line in services.splitlines()] == [
        ["consul"],
        ["web", "v1"],
    ]
    nodes = _cli(consul_binary_path, devagent, "catalog", "nodes").splitlines()
    assert len(nodes) == 2
