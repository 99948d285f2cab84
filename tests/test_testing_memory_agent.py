"""
connect_native.testing.MemoryAgent: the development agent in memory, wired to
a ConsulClient, as users test their own Connect applications with it.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.web.resource import IResource, Resource, getChildForRequest

from connect_native.certs import CertManager
from connect_native.consul.client import ConsulPermissionDenied
from connect_native.testing import MemoryAgent


def test_a_cert_manager_becomes_ready_against_it() -> None:
    memory = MemoryAgent()
    manager = CertManager(memory.reactor, memory.client, "web")
    manager.startService()
    try:
        bundle = memory.result(manager.when_ready())
    finally:
        manager.stopService()
    roots = memory.result(memory.client.agent_ca_roots()).value
    assert bundle.identity.service == "web"
    assert bundle.identity.trust_domain == roots.trust_domain


def test_time_passes_on_its_clock() -> None:
    memory = MemoryAgent()
    first = memory.result(memory.client.leaf("web"))
    blocked = memory.client.leaf("web", index=first.index, wait=10)
    memory.advance(9)
    assert not blocked.called
    memory.advance(2)
    assert memory.result(blocked).value.serial_number == first.value.serial_number


def test_agent_options_reach_the_dev_agent() -> None:
    memory = MemoryAgent(acl_default_policy="deny", master_token="root-token")
    with pytest.raises(ConsulPermissionDenied):
        memory.result(memory.client.leaf("web"))
    privileged = MemoryAgent(
        acl_default_policy="deny", master_token="root-token", token="root-token"
    )
    assert privileged.result(privileged.client.leaf("web")).value.service == "web"


def test_a_front_sees_every_request() -> None:
    seen: list[bytes] = []

    class Recording(Resource):
        isLeaf = True

        def __init__(self, wrapped: IResource) -> None:
            super().__init__()
            self.wrapped = wrapped

        def render(self, request: Any) -> Any:
            seen.append(request.path)
            return getChildForRequest(self.wrapped, request).render(request)

    memory = MemoryAgent(front=Recording)
    memory.result(memory.client.agent_ca_roots())
    assert seen == [b"/v1/agent/connect/ca/roots"]


def test_result_says_when_nothing_has_fired() -> None:
    memory = MemoryAgent()
    first = memory.result(memory.client.leaf("web"))
    with pytest.raises(AssertionError, match="has not fired"):
        memory.result(memory.client.leaf("web", index=first.index, wait=10))
