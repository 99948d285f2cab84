"""
One Connect service in a process, one set of watches at the agent: a
``connect:`` server endpoint and ``connect_native.http.client()`` for the
same service share its certificate manager, counted at an HTTP proxy in front
of a real Consul 1.8.7 agent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.static import File

from connect_native import http
from connect_native.consul.client import ConsulClient
from tests.consul_agent import RealConsulAgent

# Fixtures: the session agent's client, a directory to serve.
from tests.test_endpoints_real import (  # noqa: F401
    CONTENT,
    bounded,
    consul,
    docroot,
    escaped,
    registered,
    until,
)


class CountingProxy(Resource):
    """Forwards every request to the agent and remembers its URI."""

    isLeaf = True

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.seen: list[bytes] = []

    def render(self, request: Request) -> bytes | int:
        self.seen.append(request.uri)
        path = b"/" + b"/".join(request.postpath)
        forward = ReverseProxyResource(self.host, self.port, path)
        rendered: bytes | int = forward.render(request)
        return rendered

    def leaf_watches(self, service: str) -> int:
        """How many watches of ``service``'s leaf started (each reads index 0)."""
        path = f"/v1/agent/connect/ca/leaf/{service}".encode()
        reads = [uri for uri in self.seen if uri.split(b"?")[0] == path]
        return sum(1 for uri in reads if b"?index=0&" in uri or b"index=" not in uri)


@pytest_twisted.ensureDeferred
async def test_a_server_endpoint_and_an_http_client_share_one_leaf_watch(
    real_consul: RealConsulAgent,
    consul: ConsulClient,  # noqa: F811 (the fixture)
    unique_name: str,
    docroot: Path,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host, port = real_consul.http_address.rsplit(":", 1)
    proxy = CountingProxy(host, int(port))
    listening = reactor.listenTCP(0, Site(proxy), interface="127.0.0.1")  # type: ignore[attr-defined]
    address = f"127.0.0.1:{listening.getHost().port}"
    # The endpoint names the agent with consul=, the HTTP client from the
    # environment: one agent all the same.
    monkeypatch.setenv("CONSUL_HTTP_ADDR", address)
    web = f"{unique_name}-web"
    endpoint = serverFromString(
        reactor,
        f"connect:{web}:port=0:interface=127.0.0.1:register=yes:consul={escaped(address)}",
    )
    served = await bounded(endpoint.listen(Site(File(str(docroot)))), 40)
    client = http.client(web)
    try:
        await until(registered(consul, web), 30, "web registered and passing")
        response = await bounded(client.get(f"https://{web}.service.consul/hello.txt"))
        assert response.code == 200
        assert await bounded(response.content()) == CONTENT
        assert proxy.leaf_watches(web) == 1, proxy.seen
    finally:
        await bounded(client.close())
        await bounded(served.stopListening())
        await bounded(listening.stopListening())
