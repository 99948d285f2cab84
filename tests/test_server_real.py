"""
ConnectServerEndpoint against a real Consul 1.8.7 agent, on the real reactor
with real sockets on 127.0.0.1.

The point is the real thing: the server's certificates come from the agent
through the shared CertManager, the client holds the agent's leaf for its own
service, and the agent's authorize API (through AgentAuthorizer) decides by
the agent's intentions; a deny intention makes *our server* refuse.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native.authorize import AgentAuthorizer
from connect_native.certs import Bundle, RootPEMs
from connect_native.consul.client import ConsulClient
from connect_native.identity import ServiceIdentity
from connect_native.server import ConnectServerEndpoint, peer_identity
from connect_native.tls import ClientConnectionCreator
from tests.consul_agent import RealConsulAgent
from tests.waiting import authorize_until

T = TypeVar("T")


def bounded(d: Deferred[T], seconds: float = 20.0) -> Deferred[T]:
    return d.addTimeout(seconds, reactor)


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        peer = peer_identity(self.transport).service.encode()
        self.transport.write(peer + b": " + data)  # type: ignore[union-attr]


@implementer(IHandshakeListener)
class Caller(Protocol):
    """
    Sends ``ping`` once its handshake completes; ``done`` fires with what the
    server answered when the connection closes.
    """

    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def handshakeCompleted(self) -> None:
        self.transport.write(b"ping")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.done.callback(self.received)


@pytest.fixture
def decisions() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if "decision" in event and "target" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


async def client_bundle(client: ConsulClient, service: str) -> Bundle:
    leaf = (await bounded(client.leaf(service))).value
    roots = (await bounded(client.agent_ca_roots())).value
    return Bundle.build(
        leaf_cert_pem=leaf.cert_pem,
        private_key_pem=leaf.private_key_pem,
        roots=[
            RootPEMs(r.root_cert_pem, r.intermediate_certs_pem) for r in roots.roots
        ],
        trust_domain=roots.trust_domain,
        now=time.time(),
    )


async def call(port: int, creator: ClientConnectionCreator) -> bytes:
    endpoint = wrapClientTLS(
        creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)
    )
    caller = Caller()
    await bounded(connectProtocol(endpoint, caller))
    return await bounded(caller.done)


@pytest_twisted.ensureDeferred
async def test_api_reaches_web_until_an_intention_denies_it(
    real_consul: RealConsulAgent, unique_name: str, decisions: list[LogEvent]
) -> None:
    web, api = f"{unique_name}-web", f"{unique_name}-api"
    client = ConsulClient(reactor, address=real_consul.http_address)
    # No remembered decisions: each connection asks the agent.
    authorizer = AgentAuthorizer(client, reactor, cache_ttl=0)
    endpoint = ConnectServerEndpoint.for_service(
        reactor,
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
        client,
        web,
        authorizer=authorizer,
        ready_timeout=30,
    )
    port: Any = await bounded(endpoint.listen(Factory.forProtocol(Echo)), 40)
    intention: str | None = None
    try:
        number = port.getHost().port
        api_bundle = await client_bundle(client, api)
        web_identity = ServiceIdentity(
            trust_domain=api_bundle.identity.trust_domain,
            namespace="default",
            datacenter=api_bundle.identity.datacenter,
            service=web,
        )
        creator = ClientConnectionCreator(api_bundle, web_identity)

        # The dev agent allows by default.
        assert await call(number, creator) == api.encode() + b": ping"
        [allowed] = decisions
        assert allowed["allowed"] is True
        assert allowed["source"] == "agent"
        assert allowed["peer"] == api_bundle.identity.uri
        assert allowed["target"] == web

        intention = await bounded(client.create_intention(api, web, "deny"))
        await authorize_until(client, web, api_bundle.identity.uri, False)
        assert await call(number, creator) == b""
        [_, denied] = decisions
        assert denied["allowed"] is False
        assert denied["decision"] == "denied"
        assert denied["source"] == "agent"
        assert denied["peer"] == api_bundle.identity.uri
        assert denied["target"] == web
        assert "intention" in denied["reason"].lower()
    finally:
        if intention is not None:
            await bounded(client.delete_intention(intention))
        await port.stopListening()
        await client.close()
