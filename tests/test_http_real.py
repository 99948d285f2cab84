"""
connect_native.http against a real Consul 1.8.7 agent: treq GET and POST
through ``https://<web>.service.consul/...`` to a Klein app served by
ConnectServerEndpoint, on the real reactor.  Service names come from
``unique_name``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
import treq
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python.failure import Failure
from twisted.web.server import Request, Site

from connect_native import http
from connect_native.consul.client import ConsulClient
from connect_native.consul.records import ServiceRegistration
from connect_native.http import ResponseBodyTimeout
from connect_native.server import ConnectServerEndpoint, peer_identity
from tests.consul_agent import RealConsulAgent


def web_app(stalled: list[Deferred[None]] | None = None) -> Klein:
    app = Klein()

    @app.route("/stall", methods=["GET"])
    def stall(request: Request) -> Deferred[bytes]:
        # The headers and a first chunk go out; the rest never does.
        request.write(b"the first bytes")
        if stalled is not None:
            stalled.append(request.notifyFinish())
        return Deferred()

    @app.route("/whoami", methods=["GET"])
    def whoami(request: Request) -> bytes:
        return peer_identity(request).uri.encode()

    @app.route("/items", methods=["POST"])
    def create(request: Request) -> bytes:
        assert request.content is not None
        body = json.loads(request.content.read())
        request.setResponseCode(201)
        return json.dumps(
            {"created": body, "by": peer_identity(request).service}
        ).encode()

    return app


@pytest_twisted.async_yield_fixture
async def consul(real_consul: RealConsulAgent) -> AsyncIterator[ConsulClient]:
    client = ConsulClient(reactor, address=real_consul.http_address)
    yield client
    await client.close()


async def serve(consul: ConsulClient, web: str, app: Any) -> Any:
    """``app`` (a Klein app) as Connect service ``web``, registered."""
    endpoint = ConnectServerEndpoint.for_service(
        reactor,
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        consul,
        web,
        ready_timeout=30,
    )
    port: Any = await endpoint.listen(Site(app.resource()))
    await consul.register_service(
        ServiceRegistration(
            name=web, id=web, port=port.getHost().port, address="127.0.0.1"
        )
    )
    return port


@pytest_twisted.ensureDeferred
async def test_treq_get_and_post_reach_a_klein_app_over_connect(
    consul: ConsulClient, unique_name: str
) -> None:
    web, api = f"{unique_name}-web", f"{unique_name}-api"
    port = await serve(consul, web, web_app())
    pool_client = http.client(api, reactor=reactor, consul=consul, timeout=30)
    try:
        response = await pool_client.get(f"https://{web}.service.consul/whoami")
        assert response.code == 200
        roots = (await consul.agent_ca_roots()).value
        assert (await treq.text_content(response)) == (
            f"spiffe://{roots.trust_domain}/ns/default/dc/dc1/svc/{api}"
        )
        posted = await pool_client.post(
            f"https://{web}.service.dc1.consul/items", json={"name": "x"}
        )
        assert posted.code == 201
        assert json.loads(await treq.content(posted)) == {
            "created": {"name": "x"},
            "by": api,
        }
    finally:
        await pool_client.close()
        await consul.deregister_service(web)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_body_that_stalls_after_the_headers_fails_at_the_deadline(
    consul: ConsulClient, unique_name: str
) -> None:
    web, api = f"{unique_name}-web", f"{unique_name}-api"
    stalled: list[Deferred[None]] = []
    port = await serve(consul, web, web_app(stalled))
    pool_client = http.client(api, reactor=reactor, consul=consul, timeout=30)
    try:
        # Certificates and the connection first, under the default timeout.
        warm = await pool_client.get(f"https://{web}.service.consul/whoami")
        await treq.content(warm)
        response = await pool_client.get(
            f"https://{web}.service.consul/stall", timeout=1
        )
        assert response.code == 200
        with pytest.raises(
            ResponseBodyTimeout, match="response body did not complete within 1s"
        ):
            await treq.content(response)
        # The server sees the connection closed under its unfinished request.
        (finished,) = stalled
        (outcome,) = await finished.addBoth(lambda result: [result])
        assert isinstance(outcome, Failure)
    finally:
        await pool_client.close()
        await consul.deregister_service(web)
        await port.stopListening()
