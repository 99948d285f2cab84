"""
The ``connect:`` endpoint strings, parsed through Twisted's own plugin
discovery (``serverFromString`` / ``clientFromString`` find the parsers in
``twisted/plugins/connect_native_plugins.py``): every option, the escaping of
``endpoint=`` and ``consul=``, errors that name the option at fault; and, in
memory (a ``MemoryReactorClock`` and the development agent behind
``StubTreq``), what a server endpoint runs while it listens: the service's
certificate first, then the registration and the intention authorizer, all
undone when the port stops or the reactor shuts down.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    UNIXServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from connect_native.authorize.intentions import IntentionAuthorizer
from connect_native.client import ConnectClientEndpoint
from connect_native.consul.client import ConsulClient
from connect_native.devagent import DevAgent
from connect_native.endpoints import (
    CLIENT_OPTIONS,
    SERVER_OPTIONS,
    ConnectClientParser,
    ConnectServerParser,
    ConnectStringServerEndpoint,
    EndpointStringError,
    ServerDescription,
    parse_server_description,
)
from connect_native.resolve import ConsulResolver, PreparedQueryResolver
from connect_native.server import ConnectServerEndpoint
from connect_native.service import cert_managers


class Reactor(MemoryReactorClock):
    """A memory reactor whose system event triggers can be removed and fired."""

    def __init__(self) -> None:
        super().__init__()
        self.advance(time.time())
        self.shutdown_triggers: dict[int, Any] = {}
        self._next_trigger = 0

    def addSystemEventTrigger(  # type: ignore[override]
        self, phase: str, eventType: str, callable: Any, *args: Any, **kw: Any
    ) -> int:
        assert (phase, eventType) == ("before", "shutdown")
        self._next_trigger += 1
        self.shutdown_triggers[self._next_trigger] = callable
        return self._next_trigger

    def removeSystemEventTrigger(self, triggerID: Any) -> None:
        del self.shutdown_triggers[triggerID]

    def shut_down(self) -> None:
        for trigger in list(self.shutdown_triggers.values()):
            trigger()


@pytest.fixture
def reactor() -> Reactor:
    return Reactor()


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CONNECT_NATIVE_SERVICE", raising=False)


def server(reactor: Reactor, description: str) -> ConnectStringServerEndpoint:
    endpoint = serverFromString(reactor, description)
    assert isinstance(endpoint, ConnectStringServerEndpoint)
    return endpoint


def client(reactor: Reactor, description: str) -> ConnectClientEndpoint:
    endpoint = clientFromString(reactor, description)
    assert isinstance(endpoint, ConnectClientEndpoint)
    return endpoint


def refused(reactor: Reactor, description: str, *, client_side: bool = False) -> str:
    parse = clientFromString if client_side else serverFromString
    with pytest.raises(EndpointStringError) as caught:
        parse(reactor, description)
    assert isinstance(caught.value, ValueError)
    return str(caught.value)


# --- discovery -------------------------------------------------------------------


def test_twisted_finds_the_server_parser_by_its_prefix() -> None:
    found = [
        p
        for p in getPlugins(IStreamServerEndpointStringParser)
        if isinstance(p, ConnectServerParser)
    ]
    assert [p.prefix for p in found] == ["connect"]


def test_twisted_finds_the_client_parser_by_its_prefix() -> None:
    found = [
        p
        for p in getPlugins(IStreamClientEndpointStringParserWithReactor)
        if isinstance(p, ConnectClientParser)
    ]
    assert [p.prefix for p in found] == ["connect"]


# --- the server: where it listens ----------------------------------------------------


def test_port_interface_and_backlog_make_the_tcp_listener(reactor: Reactor) -> None:
    endpoint = server(reactor, "connect:web:port=8443:interface=127.0.0.1:backlog=7")
    assert endpoint.description.service == "web"
    assert isinstance(endpoint.connect, ConnectServerEndpoint)
    assert endpoint.connect.service == "web"
    assert isinstance(endpoint.wrapped, TCP4ServerEndpoint)
    factory = Factory.forProtocol(Protocol)
    endpoint.wrapped.listen(factory)
    assert reactor.tcpServers == [(8443, factory, 7, "127.0.0.1")]


def test_defaults(reactor: Reactor) -> None:
    endpoint = server(reactor, "connect:web:port=8443")
    assert endpoint.description == ServerDescription(service="web", port=8443)
    assert endpoint.description.interface == ""
    # A real server's listen queue, not Twisted's 50.
    assert endpoint.description.backlog == 1024
    assert endpoint.description.authorize == "agent"
    assert endpoint.description.register is False
    assert (
        endpoint.description.ready_timeout,
        endpoint.description.handshake_timeout,
        endpoint.description.authorize_timeout,
    ) == (60.0, 10.0, 10.0)
    assert endpoint.authorizer is None
    assert endpoint.consul.address == "http://127.0.0.1:8500"


def test_an_ipv6_interface_is_escaped(reactor: Reactor) -> None:
    endpoint = server(reactor, r"connect:web:port=0:interface=\:\:1")
    assert endpoint.description.interface == "::1"
    assert endpoint.description.port == 0


def test_endpoint_takes_an_escaped_server_description(reactor: Reactor) -> None:
    endpoint = server(
        reactor, r"connect:web:endpoint=tcp\:9443\:interface=127.0.0.1\:backlog=3"
    )
    assert endpoint.description.endpoint == "tcp:9443:interface=127.0.0.1:backlog=3"
    assert endpoint.description.port is None
    factory = Factory.forProtocol(Protocol)
    endpoint.wrapped.listen(factory)
    assert reactor.tcpServers == [(9443, factory, 3, "127.0.0.1")]


def test_endpoint_may_be_a_unix_socket(reactor: Reactor, tmp_path: Path) -> None:
    path = tmp_path / "web.sock"
    endpoint = server(reactor, f"connect:web:endpoint=unix\\:{path}\\:mode=600")
    assert isinstance(endpoint.wrapped, UNIXServerEndpoint)
    endpoint.wrapped.listen(Factory.forProtocol(Protocol))
    assert reactor.unixServers[0][0] == str(path)
    assert reactor.unixServers[0][3] == 0o600


# --- the server: the agent, authorization, registration, timeouts -----------------


def test_consul_takes_an_escaped_address(reactor: Reactor) -> None:
    assert (
        server(reactor, r"connect:web:port=1:consul=127.0.0.1\:8501").consul.address
        == "http://127.0.0.1:8501"
    )
    assert (
        server(
            reactor, r"connect:web:port=1:consul=https\://consul.local\:8501"
        ).consul.address
        == "https://consul.local:8501"
    )
    assert (
        server(
            reactor, r"connect:web:port=1:consul=unix\:///run/consul.sock"
        ).consul.address
        == "unix:///run/consul.sock"
    )


def test_the_agent_address_defaults_to_consul_http_addr(
    reactor: Reactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:18500")
    assert server(reactor, "connect:web:port=1").consul.address == (
        "http://127.0.0.1:18500"
    )
    # consul= wins over the environment.
    assert server(
        reactor, r"connect:web:port=1:consul=127.0.0.1\:28500"
    ).consul.address == ("http://127.0.0.1:28500")


def test_a_bad_agent_address_names_consul(reactor: Reactor) -> None:
    message = refused(reactor, r"connect:web:port=1:consul=ftp\://x\:1")
    assert "consul='ftp://x:1'" in message


def test_token_file_gives_the_client_its_token(
    reactor: Reactor, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("5b3c0f6e-secret\n")
    endpoint = server(reactor, f"connect:web:port=1:tokenFile={token}")
    assert endpoint.consul.has_token
    assert not server(reactor, "connect:web:port=1").consul.has_token


def test_an_unreadable_token_file_names_it_without_a_token(
    reactor: Reactor, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    message = refused(reactor, f"connect:web:port=1:tokenFile={missing}")
    assert f"tokenFile={str(missing)!r}" in message
    assert "cannot be read" in message
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    assert "is empty" in refused(reactor, f"connect:web:port=1:tokenFile={empty}")


def test_endpoints_with_the_same_settings_share_the_agent_client(
    reactor: Reactor, tmp_path: Path
) -> None:
    """
    Certificate managers are shared per client object: a server and a client
    of one process with the same agent settings use one client.
    """
    token = tmp_path / "token"
    token.write_text("t1")
    a = server(reactor, rf"connect:web:port=1:consul=127.0.0.1\:8600:tokenFile={token}")
    b = client(
        reactor, rf"connect:db:source=web:consul=127.0.0.1\:8600:tokenFile={token}"
    )
    assert b.resolver.client is a.consul  # type: ignore[attr-defined]
    other = server(reactor, r"connect:web:port=1:consul=127.0.0.1\:8600")
    assert other.consul is not a.consul
    assert server(
        Reactor(), r"connect:web:port=1:consul=127.0.0.1\:8600"
    ).consul is not (other.consul)


def test_authorize_intentions_runs_an_intention_authorizer(reactor: Reactor) -> None:
    endpoint = server(reactor, "connect:web:port=1:authorize=intentions")
    assert endpoint.description.authorize == "intentions"
    assert isinstance(endpoint.authorizer, IntentionAuthorizer)
    assert endpoint.authorizer.service == "web"
    assert endpoint.authorizer.default == "agent"
    assert server(reactor, "connect:web:port=1:authorize=agent").authorizer is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("yes", True),
        ("YES", True),
        ("true", True),
        ("on", True),
        ("1", True),
        ("no", False),
        ("false", False),
        ("off", False),
        ("0", False),
    ],
)
def test_register_is_a_boolean(reactor: Reactor, text: str, value: bool) -> None:
    assert (
        server(reactor, f"connect:web:port=1:register={text}").description.register
        is value
    )


def test_keep_open_on_deny_reaches_the_endpoint(reactor: Reactor) -> None:
    """Open connections are decided again on a change unless told not to."""
    default = server(reactor, "connect:web:port=1")
    assert default.description.keep_open_on_deny is False
    assert default.connect._keep_open_on_deny is False
    kept = server(reactor, "connect:web:port=1:keepOpenOnDeny=yes")
    assert kept.description.keep_open_on_deny is True
    assert kept.connect._keep_open_on_deny is True
    assert "keepOpenOnDeny= must be yes or no" in refused(
        reactor, "connect:web:port=1:keepOpenOnDeny=maybe"
    )


def test_timeouts(reactor: Reactor) -> None:
    description = server(
        reactor,
        "connect:web:port=1:readyTimeout=5:handshakeTimeout=2.5:authorizeTimeout=0.5",
    ).description
    assert (
        description.ready_timeout,
        description.handshake_timeout,
        description.authorize_timeout,
    ) == (5.0, 2.5, 0.5)


# --- the server: refusals ------------------------------------------------------------


def test_an_unknown_option_is_named_with_the_valid_ones(reactor: Reactor) -> None:
    message = refused(reactor, "connect:web:port=1:colour=blue")
    assert "unknown option 'colour'" in message
    assert "the options are " + ", ".join(SERVER_OPTIONS) in message


def test_a_misspelt_option_gets_a_suggestion(reactor: Reactor) -> None:
    assert "unknown option 'prot' (did you mean 'port'?)" in refused(
        reactor, "connect:web:prot=1"
    )
    assert "(did you mean 'tokenFile'?)" in refused(
        reactor, "connect:web:port=1:tokenfile=/x"
    )


def test_no_service_name(reactor: Reactor) -> None:
    message = refused(reactor, "connect:port=8443")
    assert "no service name" in message
    assert "connect:<service>:port=<n>" in message


def test_a_service_name_with_spaces(reactor: Reactor) -> None:
    assert "service name" in refused(reactor, "connect:my web:port=1")


@pytest.mark.parametrize(
    "description",
    [
        "connect:web",
        "connect:web:port=1:endpoint=tcp\\:2",
        r"connect:web:interface=\:\:1",
    ],
)
def test_exactly_one_of_port_and_endpoint(reactor: Reactor, description: str) -> None:
    assert "give either port= or endpoint=" in refused(reactor, description)


@pytest.mark.parametrize("port", ["70000", "-1", "http", "", "1.5"])
def test_a_bad_port(reactor: Reactor, port: str) -> None:
    message = refused(reactor, f"connect:web:port={port}")
    assert "port= must be a whole number from 0 to 65535" in message
    assert repr(port) in message


def test_the_handshake_budget_reaches_the_server_endpoint(reactor: Reactor) -> None:
    endpoint = server(
        reactor, "connect:web:port=8443:maxHandshakes=9:maxHandshakesPerAddress=3"
    )
    assert endpoint.connect._max_handshakes == 9
    assert endpoint.connect._max_handshakes_per_address == 3
    defaults = server(reactor, "connect:web:port=8443").connect
    assert (defaults._max_handshakes, defaults._max_handshakes_per_address) == (
        256,
        64,
    )
    assert "maxHandshakes= must be a whole number from 1" in refused(
        reactor, "connect:web:port=1:maxHandshakes=0"
    )


def test_a_bad_backlog(reactor: Reactor) -> None:
    assert "backlog= must be a whole number from 1" in refused(
        reactor, "connect:web:port=1:backlog=0"
    )


def test_an_interface_must_be_an_address(reactor: Reactor) -> None:
    assert "interface= must be an IP address" in refused(
        reactor, "connect:web:port=1:interface=localhost"
    )


def test_interface_does_not_go_with_endpoint(reactor: Reactor) -> None:
    assert "interface= goes with port=" in refused(
        reactor, r"connect:web:endpoint=tcp\:1:interface=127.0.0.1"
    )


def test_an_unescaped_colon_is_explained(reactor: Reactor) -> None:
    message = refused(reactor, "connect:web:port=1:consul=127.0.0.1:8500")
    assert "unexpected '8500'" in message
    assert "escaped with a backslash" in message


def test_a_bad_sub_endpoint_is_named(reactor: Reactor) -> None:
    message = refused(reactor, r"connect:web:endpoint=nonsense\:1")
    assert "endpoint='nonsense:1' is not usable" in message


def test_connect_over_connect_is_refused(reactor: Reactor) -> None:
    assert "not another connect: description" in refused(
        reactor, r"connect:web:endpoint=connect\:db\:port=1"
    )


def test_a_bad_authorizer(reactor: Reactor) -> None:
    message = refused(reactor, "connect:web:port=1:authorize=acl")
    assert "must be one of agent, intentions or allow-ids, not 'acl'" in message


def test_a_bad_boolean(reactor: Reactor) -> None:
    assert "register= must be yes or no" in refused(
        reactor, "connect:web:port=1:register=maybe"
    )


@pytest.mark.parametrize(
    "name", ["readyTimeout", "handshakeTimeout", "authorizeTimeout"]
)
@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_a_bad_timeout_is_named(reactor: Reactor, name: str, value: str) -> None:
    message = refused(reactor, f"connect:web:port=1:{name}={value}")
    assert f"{name}= must be a number of seconds > 0" in message


def test_an_empty_value(reactor: Reactor) -> None:
    assert "consul= must not be empty" in refused(reactor, "connect:web:port=1:consul=")


def test_the_parser_can_be_used_without_discovery() -> None:
    assert parse_server_description(["web"], {"port": "1"}).port == 1


# --- the client ----------------------------------------------------------------


def test_a_client_for_a_service(reactor: Reactor) -> None:
    endpoint = client(reactor, "connect:db:source=web")
    assert isinstance(endpoint.resolver, ConsulResolver)
    assert endpoint.resolver.service == "db"
    assert endpoint.resolver.query.datacenter is None
    assert endpoint._source.service == "web"  # type: ignore[attr-defined]
    assert endpoint.timeout == 10.0


def test_source_defaults_to_connect_native_service(
    reactor: Reactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONNECT_NATIVE_SERVICE", "api")
    endpoint = client(reactor, "connect:db")
    assert endpoint._source.service == "api"  # type: ignore[attr-defined]
    # source= wins.
    explicit = client(reactor, "connect:db:source=web")
    assert explicit._source.service == "web"  # type: ignore[attr-defined]


def test_no_source_is_explained(reactor: Reactor) -> None:
    message = refused(reactor, "connect:db", client_side=True)
    assert "source=<our service>" in message
    assert "CONNECT_NATIVE_SERVICE" in message


def test_datacenter_namespace_and_partition_reach_the_resolver(
    reactor: Reactor,
) -> None:
    endpoint = client(
        reactor, "connect:db:source=web:datacenter=dc2:namespace=ns1:partition=p1"
    )
    assert isinstance(endpoint.resolver, ConsulResolver)
    query = endpoint.resolver.query
    assert (query.datacenter, query.namespace, query.partition) == ("dc2", "ns1", "p1")


def test_query_dials_a_prepared_query(reactor: Reactor) -> None:
    endpoint = client(reactor, "connect:query=db-near:source=web:datacenter=dc2")
    assert isinstance(endpoint.resolver, PreparedQueryResolver)
    assert endpoint.resolver.name == "db-near"
    assert endpoint.resolver.datacenter == "dc2"
    assert endpoint._source.service == "web"  # type: ignore[attr-defined]


def test_query_and_a_service_name_are_not_both_given(reactor: Reactor) -> None:
    assert "either the service name ('db') or query= ('q')" in refused(
        reactor, "connect:db:query=q:source=web", client_side=True
    )


def test_query_does_not_take_a_namespace(reactor: Reactor) -> None:
    assert "namespace= does not go with query=" in refused(
        reactor, "connect:query=q:namespace=n:source=web", client_side=True
    )


def test_a_client_without_a_service(reactor: Reactor) -> None:
    assert "no service name" in refused(reactor, "connect:source=web", client_side=True)


def test_client_timeout(reactor: Reactor) -> None:
    assert client(reactor, "connect:db:source=web:timeout=2.5").timeout == 2.5
    assert "timeout= must be a number of seconds > 0" in refused(
        reactor, "connect:db:source=web:timeout=0", client_side=True
    )


def test_client_agent_settings(reactor: Reactor, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    endpoint = client(
        reactor, rf"connect:db:source=web:consul=127.0.0.1\:8700:tokenFile={token}"
    )
    consul = endpoint.resolver.client  # type: ignore[attr-defined]
    assert consul.address == "http://127.0.0.1:8700"
    assert consul.has_token


def test_an_unknown_client_option_lists_the_valid_ones(reactor: Reactor) -> None:
    message = refused(reactor, "connect:db:source=web:port=1", client_side=True)
    assert "client endpoint: unknown option 'port'" in message
    assert "the options are " + ", ".join(CLIENT_OPTIONS) in message


# --- the server in memory, against the development agent ---------------------------


class World:
    """A memory reactor, the development agent in memory, and its client."""

    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self.agent = DevAgent(reactor, rng=random.Random(1))
        self.stub = StubTreq(self.agent.resource())
        self.consul = ConsulClient(reactor, http_client=self.stub, timeout=5.0)

    def endpoint(self, description: str) -> ConnectStringServerEndpoint:
        parsed = serverFromString(self.reactor, description)
        assert isinstance(parsed, ConnectStringServerEndpoint)
        # The same description, with the in-memory agent's client.
        return ConnectStringServerEndpoint(
            self.reactor, parsed.description, parsed.wrapped, self.consul
        )

    def settle(self) -> None:
        for _ in range(5):
            self.stub.flush()
            self.reactor.advance(0)

    def instances(self) -> list[tuple[str, int, bool]]:
        d = self.consul.health_connect("web", passing=False)
        self.settle()
        entries = d.result.value if hasattr(d, "result") else pytest.fail("no answer")
        return [
            (e.service.id, e.service.port, e.service.connect_native) for e in entries
        ]


def test_listens_once_the_certificate_is_ready(reactor: Reactor) -> None:
    world = World(reactor)
    endpoint = world.endpoint("connect:web:port=8443:interface=127.0.0.1")
    factory = Factory.forProtocol(Protocol)
    listening = endpoint.listen(factory)
    world.settle()
    assert listening.called
    port = listening.result
    assert [(p, b, i) for p, _, b, i in reactor.tcpServers] == [
        (8443, 1024, "127.0.0.1")
    ]
    assert port.getHost().port == 8443
    # Nothing registered unless asked.
    assert world.instances() == []
    port.stopListening()
    world.settle()


def test_register_yes_registers_while_listening(reactor: Reactor) -> None:
    world = World(reactor)
    endpoint = world.endpoint("connect:web:port=8443:register=yes")
    before = cert_managers.managers()
    listening = endpoint.listen(Factory.forProtocol(Protocol))
    world.settle()
    port = listening.result
    [manager] = [m for m in cert_managers.managers() if m not in before]
    # The endpoint's lease and the registration's.
    assert cert_managers.leases(manager) == 2
    [(_, number, native)] = world.instances()
    assert (number, native) == (8443, True)
    stopped = port.stopListening()
    world.settle()
    assert stopped.called
    assert world.instances() == []
    assert manager not in cert_managers.managers()


def test_reactor_shutdown_deregisters(reactor: Reactor) -> None:
    world = World(reactor)
    endpoint = world.endpoint("connect:web:port=8443:register=yes")
    listening = endpoint.listen(Factory.forProtocol(Protocol))
    world.settle()
    assert listening.called
    assert len(world.instances()) == 1
    assert len(reactor.shutdown_triggers) == 1
    reactor.shut_down()
    world.settle()
    assert world.instances() == []
    assert reactor.shutdown_triggers == {}
    # A later stop (twistd stops its services too) waits for the same stop.
    again = listening.result.stopListening()
    assert again.called


def test_intention_authorizer_runs_while_listening(reactor: Reactor) -> None:
    world = World(reactor)
    endpoint = world.endpoint("connect:web:port=8443:authorize=intentions")
    assert isinstance(endpoint.authorizer, IntentionAuthorizer)
    listening = endpoint.listen(Factory.forProtocol(Protocol))
    assert endpoint.authorizer.running  # warming its cache with the certificate
    world.settle()
    port = listening.result
    assert endpoint.authorizer.intentions == ()
    port.stopListening()
    world.settle()
    assert not endpoint.authorizer.running


def test_a_failed_listen_stops_what_it_started(reactor: Reactor) -> None:
    world = World(reactor)
    endpoint = world.endpoint(
        "connect:web:port=8443:authorize=intentions:register=yes:readyTimeout=1"
    )
    world.stub = StubTreq(Hang())
    endpoint = ConnectStringServerEndpoint(
        reactor,
        endpoint.description,
        endpoint.wrapped,
        ConsulClient(reactor, http_client=world.stub, timeout=30.0),
    )
    listening = endpoint.listen(Factory.forProtocol(Protocol))
    failures: list[Any] = []
    listening.addErrback(failures.append)
    reactor.advance(1.5)
    world.stub.flush()
    assert "no certificate for service 'web'" in str(failures[0].value)
    assert endpoint.authorizer is not None
    assert not endpoint.authorizer.running
    assert reactor.tcpServers == []
    assert reactor.shutdown_triggers == {}


class Hang(Resource):
    """An agent that never answers."""

    isLeaf = True

    def render(self, request: Any) -> int:
        return NOT_DONE_YET


def test_a_registration_that_cannot_start_lets_go_of_everything(
    reactor: Reactor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import connect_native.registration

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no address to register")

    monkeypatch.setattr(connect_native.registration, "Registration", refuse)
    world = World(reactor)
    endpoint = world.endpoint("connect:web:port=8443:register=yes")
    before = cert_managers.managers()
    listening = endpoint.listen(Factory.forProtocol(Protocol))
    failures: list[Any] = []
    listening.addErrback(failures.append)
    world.settle()
    assert "no address to register" in str(failures[0].value)
    # Neither the endpoint's lease nor the registration's keeps a manager.
    assert [m for m in cert_managers.managers() if m not in before] == []
    assert reactor.shutdown_triggers == {}


# --- identity= and authorize=allow-ids ---------------------------------------------


def _identity_files(tmp_path: Path) -> tuple[Any, str]:
    from connect_native.testing import CertificateFactory

    ca = CertificateFactory()
    leaf = ca.leaf("web")
    (tmp_path / "cert.pem").write_text(leaf.chain_pem)
    (tmp_path / "key.pem").write_text(leaf.key_pem)
    (tmp_path / "ca.pem").write_text(ca.root_pem)
    return ca, str(tmp_path).replace(":", "\\:")


@pytest.mark.parametrize("form", ["escaped", "options"])
def test_identity_files_and_allow_ids(
    reactor: Reactor, tmp_path: Path, form: str
) -> None:
    from connect_native.authorize import AllowIdsAuthorizer, Peer
    from connect_native.identity import ServiceIdentity
    from connect_native.sources.files import FileIdentitySource

    ca, d = _identity_files(tmp_path)
    if form == "escaped":
        identity = (
            f"identity=files\\:cert={d}/cert.pem,key={d}/key.pem,roots={d}/ca.pem"
        )
    else:
        identity = f"identity=files:cert={d}/cert.pem:key={d}/key.pem:roots={d}/ca.pem"
    api = ca.service_uri("api").replace(":", "\\:")
    endpoint = server(
        reactor, f"connect:web:port=1:{identity}:authorize=allow-ids:allowIds={api}"
    )
    source = endpoint.connect_service.identity_source
    assert isinstance(source, FileIdentitySource)
    assert source.cert == tmp_path / "cert.pem"
    assert isinstance(endpoint.authorizer, AllowIdsAuthorizer)
    td = ca.trust_domain
    allowed = Peer(ServiceIdentity(td, "default", "dc1", "api"), "01")
    other = Peer(ServiceIdentity(td, "default", "dc1", "evil"), "01")
    assert endpoint.authorizer.decide_now(allowed, "web").allowed
    assert not endpoint.authorizer.decide_now(other, "web").allowed
    # The certificates the endpoint serves are the files'.
    assert endpoint.connect._source is endpoint.connect_service.identity


@pytest.mark.parametrize(
    ("description", "says"),
    [
        ("connect:web:port=1:identity=vault", "identity=: identity must be 'agent'"),
        ("connect:web:port=1:identity=files:cert=/c", "key=PATH, roots=PATH missing"),
        ("connect:web:port=1:cert=/c", "cert= go with identity=files"),
        ("connect:web:port=1:authorize=allow-ids", "needs allowIds="),
        ("connect:web:port=1:allowIds=spiffe\\://x/y", "goes with authorize=allow-ids"),
        (
            "connect:web:port=1:authorize=allow-ids:allowIds=https\\://x/y",
            "allowIds=: allowed ID 'https://x/y' must be a SPIFFE ID",
        ),
    ],
)
def test_bad_identity_and_allow_ids(
    reactor: Reactor, description: str, says: str
) -> None:
    assert says in refused(reactor, description)


def test_without_ready_timeout_listen_keeps_waiting_and_says_so(
    reactor: Reactor,
) -> None:
    """
    ``twistd web`` and Klein's ``app.run`` do nothing useful with a failed
    listen: without ``readyTimeout=`` the endpoint waits for the certificate
    as long as it takes, logging why every 60 s, and can still be cancelled.
    """
    from twisted.internet.defer import CancelledError
    from twisted.logger import LogEvent, globalLogPublisher

    world = World(reactor)
    endpoint = world.endpoint("connect:web:port=8443:authorize=intentions")
    assert endpoint.description.wait_for_certificate
    world.stub = StubTreq(Hang())
    endpoint = ConnectStringServerEndpoint(
        reactor,
        endpoint.description,
        endpoint.wrapped,
        ConsulClient(reactor, http_client=world.stub, timeout=30.0),
    )
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        listening = endpoint.listen(Factory.forProtocol(Protocol))
        outcome: list[Any] = []
        listening.addBoth(outcome.append)
        for _ in range(130):
            reactor.advance(1)
            world.stub.flush()
        assert outcome == []
        waiting = [e for e in events if "still waiting" in str(e.get("log_format"))]
        assert [e["waited"] for e in waiting] == [60.0, 120.0]
        assert "no certificate for service 'web'" in str(waiting[0]["reason"])
        listening.cancel()
        assert isinstance(outcome[0].value, CancelledError)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert endpoint.authorizer is not None
    assert not endpoint.authorizer.running
    assert reactor.tcpServers == []


def test_with_ready_timeout_listen_fails_after_it(reactor: Reactor) -> None:
    description = server(reactor, "connect:web:port=1:readyTimeout=5").description
    assert not description.wait_for_certificate
