"""
Testing a Connect application with ``connect_native.testing``: no agent, no
sockets, no sleeping.  Certificates come from a ``CertificateFactory``, the
endpoints get them from ``FakeBundleSource``s, a ``FakeAuthorizer`` plays
the intentions, and the connections are made on a ``MemoryReactorClock``
and joined in memory, real TLS included, by ``twisted.test.iosim``.

The application under test is ``greeting_site()``, a twisted.web site that
greets its caller by the identity the caller's certificate proved, and the
``OneRequest`` client protocol that asks a greeter for its greeting.

Run it with ``pytest testing_example.py``.
"""

import time

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.resource import Resource
from twisted.web.server import Site

from connect_native import ConnectClientEndpoint, ConnectServerEndpoint, peer_identity
from connect_native.client import IdentityMismatch
from connect_native.testing import (
    CertificateFactory,
    FakeAuthorizer,
    FakeBundleSource,
    FakeServiceInstance,
    StaticResolver,
    fake_instance,
    make_bundle,
)

# --- the application under test -------------------------------------------------


class Greeting(Resource):
    isLeaf = True

    def render_GET(self, request):
        return f"hello, {peer_identity(request).service}\n".encode()


def greeting_site():
    return Site(Greeting())


class OneRequest(Protocol):
    """Sends one HTTP/1.0 request; ``answer`` fires with all that came back."""

    def __init__(self):
        self.received = b""
        self.answer = Deferred()

    def connectionMade(self):
        self.transport.write(b"GET / HTTP/1.0\r\nHost: greeter\r\n\r\n")

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.answer.callback(self.received)


# --- the tests ------------------------------------------------------------------

CA = CertificateFactory()  # a Consul-shaped CA with a random trust domain
GREETER = ("127.0.0.1", 8443)


def memory_reactor():
    reactor = MemoryReactorClock()
    # OpenSSL checks certificates against the wall clock: start there.
    reactor.advance(time.time())
    return reactor


def serve_greeter(reactor, authorizer):
    """Our site behind a Connect server endpoint; the listening factory."""
    endpoint = ConnectServerEndpoint(
        reactor,
        TCP4ServerEndpoint(reactor, GREETER[1]),
        FakeBundleSource(make_bundle(CA, "greeter")),
        authorizer,
        "greeter",
    )
    endpoint.listen(greeting_site())
    [(_port, factory, _backlog, _interface)] = reactor.tcpServers
    return factory


def call_greeter(reactor, server_factory, caller):
    """``caller`` connects to the greeter in memory and sends one request."""
    client = ConnectClientEndpoint(
        reactor,
        StaticResolver([fake_instance("greeter", address=GREETER[0], port=GREETER[1])]),
        FakeBundleSource(make_bundle(CA, caller)),
    )
    request = OneRequest()
    connectProtocol(client, request)
    # The TCP connection the client asked the memory reactor for, joined to
    # one the server accepts; the pump moves the bytes both ways.
    _host, _port, client_factory, _timeout, _bind = reactor.tcpClients[-1]
    server = server_factory.buildProtocol(IPv4Address("TCP", *GREETER))
    client = client_factory.buildProtocol(IPv4Address("TCP", *GREETER))
    pump = iosim.connect(
        server,
        iosim.makeFakeServer(server),
        client,
        iosim.makeFakeClient(client),
        clock=reactor,
    )
    pump.flush()
    return request


def test_an_allowed_caller_is_greeted_by_its_certified_name():
    reactor = memory_reactor()
    greeter = serve_greeter(reactor, FakeAuthorizer(allowed={"caller"}))

    request = call_greeter(reactor, greeter, "caller")

    assert request.answer.called
    assert request.received.startswith(b"HTTP/1.0 200 OK\r\n")
    assert request.received.endswith(b"\r\n\r\nhello, caller\n")


def test_a_caller_the_intentions_deny_never_reaches_the_site():
    reactor = memory_reactor()
    authorizer = FakeAuthorizer(allowed={"caller"})
    greeter = serve_greeter(reactor, authorizer)

    request = call_greeter(reactor, greeter, "stranger")

    assert request.answer.called
    assert request.received == b""
    [(peer, target)] = authorizer.authorize_calls
    assert (peer.identity.service, target) == ("stranger", "greeter")


def test_our_client_refuses_a_server_that_is_another_service():
    reactor = memory_reactor()
    # An instance listed as "greeter" that presents another service's
    # certificate: the client must not send it a byte.
    impostor = FakeServiceInstance(
        make_bundle(CA, "impostor"),
        address=GREETER[0],
        port=GREETER[1],
        identity=fake_instance("greeter").identity,
    )
    client = ConnectClientEndpoint(
        reactor,
        StaticResolver([impostor.instance]),
        FakeBundleSource(make_bundle(CA, "caller")),
    )
    connected = connectProtocol(client, OneRequest())
    impostor.accept(reactor, reactor).flush()

    failures = []
    connected.addErrback(failures.append)
    [failure] = failures
    assert failure.check(IdentityMismatch)
    assert "svc/impostor" in str(failure.value)
    assert [p.received for p in impostor.protocols] == [b""]
