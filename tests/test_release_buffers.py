"""
``--release-buffers`` (``SSL_MODE_RELEASE_BUFFERS``) from the command line to
the OpenSSL context of each accepted connection, in memory: the option, the
workers' command line, ``ConnectServerEndpoint`` and
``ServerConnectionCreator``, and the terminator's public listener.

A context's mode is read with ``set_mode(0)``, which adds nothing and
returns the mode; pyOpenSSL allows it only before the context's first
connection, so each check reads a creator that has made none.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from OpenSSL import SSL
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock

from connect_native.consul.client import ConsulClient
from connect_native.devagent import DevAgent
from connect_native.terminator import Options, Settings, Terminator, worker_arguments
from connect_native.testing import CertificateFactory, FakeAuthorizer
from connect_native.tls import ServerConnectionCreator
from tests.test_server import bundle, harness

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


@pytest.fixture(autouse=True)
def no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)


def releases(context: SSL.Context) -> bool:
    return bool(context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS)


def parse(*args: str) -> Settings:
    options = Options()
    options.parseOptions(list(args))
    assert options.settings is not None
    return options.settings


def test_the_creator_sets_the_mode_only_when_asked(ca: CertificateFactory) -> None:
    leaf_bundle = bundle(ca, ca.leaf("web"))
    assert releases(ServerConnectionCreator(leaf_bundle, release_buffers=True).context)
    assert not releases(ServerConnectionCreator(leaf_bundle).context)


@pytest.mark.parametrize("release", [True, False])
def test_the_endpoint_hands_it_to_each_connections_creator(
    ca: CertificateFactory, release: bool
) -> None:
    h = harness(ca, FakeAuthorizer({"api"}), release_buffers=release)
    tls = h.tls_factory.buildProtocol(ADDRESS)
    assert releases(tls.wrappedProtocol.creator.context) is release
    # ... and such a connection still works end to end.
    conn = h.connect([b"ping"])
    [app] = h.apps.built
    assert app.received == b"ping"
    app.transport.write(b"pong")  # type: ignore[union-attr]
    h.reactor.advance(0)
    conn.pump.flush()
    assert conn.client_app.received == b"pong"


def test_the_option_is_off_by_default_and_reaches_the_workers() -> None:
    assert parse("--service", "web", "--to", "tcp:127.0.0.1:8080").release_buffers is (
        False
    )
    settings = parse(
        "--service",
        "web",
        "--to",
        "tcp:127.0.0.1:8080",
        "--release-buffers",
        "--workers",
        "2",
    )
    assert settings.release_buffers is True
    arguments = worker_arguments(settings, 4321, None)
    after = arguments[arguments.index("connect-native") + 1 :]
    assert parse(*after).release_buffers is True
    plain = worker_arguments(
        parse("--service", "web", "--to", "tcp:127.0.0.1:8080", "--workers", "2"),
        4321,
        None,
    )
    assert "--release-buffers" not in plain


@contextmanager
def public_listener(release: bool, **settings: Any) -> Iterator[Any]:
    """
    A started terminator's public listening factory (in memory, with the
    development agent), stopped afterwards.
    """
    reactor = MemoryReactorClock()
    reactor.advance(time.time())
    agent = DevAgent(reactor)
    client = ConsulClient(reactor, http_client=StubTreq(agent.resource()))
    service = Terminator(
        Settings(
            service="web",
            to="tcp:127.0.0.1:8080",
            register=False,
            release_buffers=release,
            **settings,
        ),
        reactor,
        consul_client=client,
        on_finished=lambda code: None,
    )
    service.startService()
    assert service.started.called
    [(_, factory, _, _)] = reactor.tcpServers
    try:
        yield factory
    finally:
        service.stopService()
        reactor.advance(60)


def public_creator(release: bool) -> Any:
    with public_listener(release) as factory:
        accepted = factory.buildProtocol(ADDRESS)
        return accepted.wrappedProtocol.creator


@pytest.mark.parametrize("release", [True, False])
def test_the_terminators_public_listener_uses_it(release: bool) -> None:
    assert releases(public_creator(release).context) is release
