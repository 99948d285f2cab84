"""
ConsulClient against the real Consul 1.8.7 agent's captured answers.

Each test replays a capture from ``tests/fixtures/real-1.8.7/`` through a
tiny twisted.web resource behind ``treq.testing.StubTreq`` and checks both
what the client sent and what it decoded.  Timeouts run on a ``Clock``.
"""

from __future__ import annotations

import ipaddress
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from connect_native.consul.client import (
    DEFAULT_WAIT,
    ConsulClient,
    ConsulEnterpriseRequired,
    ConsulError,
    ConsulHTTPError,
    ConsulNotFound,
    ConsulPermissionDenied,
    ConsulResponseError,
    ConsulTimeout,
    ConsulUnavailable,
)
from connect_native.consul.records import (
    ServiceRegistration,
    TTLCheck,
)
from tests.captures import load
from tests.deferreds import failed as error
from tests.deferreds import fired as result

FIXTURES = Path(__file__).parent / "fixtures" / "real-1.8.7"
TOKEN = "5e3c0b7a-token-that-must-never-leak-9f1d"


@define
class Seen:
    method: str
    uri: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return self.uri.partition("?")[0]

    @property
    def query(self) -> list[tuple[str, str]]:
        from urllib.parse import parse_qsl

        return parse_qsl(self.uri.partition("?")[2], keep_blank_values=True)

    def json(self) -> Any:
        return json.loads(self.body)


# Framing headers are the server's business, not the capture's.
_FRAMING = {"content-length", "transfer-encoding", "date", "connection"}


@define
class Replay(Resource):
    """Answers every request with one captured (or made-up) response."""

    status: int
    headers: dict[str, str]
    body: str
    seen: list[Seen] = field(factory=list)
    isLeaf = True

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> bytes:
        assert request.uri is not None
        assert request.method is not None
        assert request.content is not None
        self.seen.append(
            Seen(
                method=request.method.decode(),
                uri=request.uri.decode(),
                headers={
                    k.decode().lower(): v[-1].decode()
                    for k, v in request.requestHeaders.getAllRawHeaders()
                },
                body=request.content.read(),
            )
        )
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            if name.lower() not in _FRAMING:
                request.setHeader(name, value)
        return self.body.encode("utf-8")

    @property
    def last(self) -> Seen:
        return self.seen[-1]


def replay(name: str) -> Replay:
    _, status, headers, body = load(name)
    assert status is not None, f"{name} holds no response"
    return Replay(status, headers, body)


class Hang(Resource):
    """Never answers; records whether the client went away."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.gone: list[Failure] = []

    def render(self, request: Request) -> object:
        self.requests.append(request)
        request.notifyFinish().addErrback(self.gone.append)
        return NOT_DONE_YET


def make(resource: Resource, **kwargs: Any) -> tuple[ConsulClient, Clock]:
    clock = Clock()
    client = ConsulClient(clock, http_client=StubTreq(resource), **kwargs)
    return client, clock


def pending(d: Deferred[Any]) -> None:
    assert not d.called, f"the Deferred fired early with {d.result!r}"


# -- CA roots ------------------------------------------------------------------


def test_agent_ca_roots_decodes_the_capture_and_its_index_headers() -> None:
    resource = replay("ca-roots.http")
    client, _ = make(resource)
    answer = result(client.agent_ca_roots())
    assert resource.last.method == "GET"
    assert resource.last.uri == "/v1/agent/connect/ca/roots"
    roots = answer.value
    assert roots.trust_domain == "35fbb6e4-f678-8abb-17a1-d9437ce1a4b3.consul"
    assert (
        roots.active_root_id
        == "69:29:fa:ed:fe:52:82:3a:ac:77:2e:01:68:36:fc:90:41:d0:ec:3f"
    )
    (root,) = roots.roots
    assert roots.active_root is root
    assert root.serial_number == 7
    assert root.intermediate_certs_pem == ()  # null on the wire
    assert root.root_cert_pem.startswith("-----BEGIN CERTIFICATE-----\nMIICDDCC")
    assert root.not_after == datetime(2036, 11, 25, 23, 55, 10, tzinfo=timezone.utc)
    assert (root.private_key_type, root.private_key_bits) == ("ec", 256)
    assert answer.index == 9
    assert answer.known_leader is False
    assert answer.last_contact_ms == 0
    assert answer.cache_hit is False  # X-Cache: MISS
    assert answer.age_s is None


def test_agent_ca_roots_cache_hit_and_age() -> None:
    client, _ = make(replay("ca-roots-hit.http"))
    answer = result(client.agent_ca_roots())
    assert answer.cache_hit is True
    assert answer.age_s == 0


def test_rotated_roots_keep_both_with_a_64_bit_serial_and_the_cross_signed_cert() -> (
    None
):
    client, _ = make(replay("rotation-roots-after.http"))
    roots = result(client.agent_ca_roots()).value
    new, old = roots.roots
    assert roots.active_root is new
    assert new.serial_number == 7625921383430209242  # beyond 2**53
    assert len(new.intermediate_certs_pem) == 1
    assert new.intermediate_certs_pem[0].startswith("-----BEGIN CERTIFICATE-----")
    assert old.active is False
    assert old.intermediate_certs_pem == ()


def test_server_ca_roots_path_and_datacenter() -> None:
    resource = replay("ca-roots-server.http")
    client, _ = make(resource, datacenter="dc2")
    answer = result(client.ca_roots())
    assert resource.last.path == "/v1/connect/ca/roots"
    assert resource.last.query == [("dc", "dc2")]
    assert answer.value.roots[0].active
    assert answer.cache_hit is None  # the servers send no X-Cache


# -- leaf ----------------------------------------------------------------------


def test_leaf_decodes_the_capture() -> None:
    resource = replay("leaf-web.http")
    client, _ = make(resource)
    answer = result(client.leaf("web"))
    assert resource.last.uri == "/v1/agent/connect/ca/leaf/web"
    leaf = answer.value
    assert leaf.serial_number == "08"  # a hex string, unlike a root's
    assert leaf.service == "web"
    assert leaf.service_uri == (
        "spiffe://35fbb6e4-f678-8abb-17a1-d9437ce1a4b3.consul/ns/default/dc/dc1/svc/web"
    )
    assert leaf.cert_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert leaf.private_key_pem.startswith("-----BEGIN EC PRIVATE KEY-----")
    assert leaf.valid_after == datetime(2026, 11, 25, 23, 54, 18, tzinfo=timezone.utc)
    assert leaf.valid_before == datetime(2026, 11, 28, 23, 54, 18, tzinfo=timezone.utc)
    assert leaf.valid_after.tzinfo is not None
    assert (leaf.create_index, leaf.modify_index) == (14, 14)
    assert answer.index == 14
    # The leaf sends neither KnownLeader nor LastContact.
    assert answer.known_leader is None
    assert answer.last_contact_ms is None
    assert "PRIVATE KEY" not in repr(leaf)


def test_leaf_escapes_the_service_name_into_one_path_segment() -> None:
    resource = replay("leaf-name-slash.http")
    client, _ = make(resource)
    failure = error(client.leaf("a/b"))
    assert resource.last.uri == "/v1/agent/connect/ca/leaf/a%2Fb"
    assert isinstance(failure, ConsulHTTPError)
    assert failure.status == 500
    assert failure.body.startswith("SPIFFE ID is not in the expected format")


def test_blocking_leaf_sends_index_and_an_explicit_wait() -> None:
    resource = replay("leaf-block-same-index.http")
    client, _ = make(resource)
    result(client.leaf("web", index=14, wait=2.5))
    assert resource.last.query == [("index", "14"), ("wait", "2500ms")]


def test_an_index_without_wait_still_sends_the_default_wait() -> None:
    resource = replay("ca-roots-block-same-index.http")
    client, _ = make(resource)
    result(client.agent_ca_roots(index=9))
    assert resource.last.query == [
        ("index", "9"),
        ("wait", f"{int(DEFAULT_WAIT * 1000)}ms"),
    ]


@pytest.mark.parametrize(
    ("index", "wait"),
    [(None, 5.0), (-1, 5.0), (1, 0.0), (1, -2.0), (1, float("inf")), (1, 0.0001)],
)
def test_bad_blocking_arguments_are_refused_before_sending(
    index: int | None, wait: float
) -> None:
    resource = replay("leaf-web.http")
    client, _ = make(resource)
    with pytest.raises(ValueError, match=r"index|wait"):
        client.leaf("web", index=index, wait=wait)
    assert resource.seen == []


def test_empty_service_name_is_refused() -> None:
    client, _ = make(replay("leaf-web.http"))
    with pytest.raises(ValueError, match="service"):
        client.leaf("")


# -- authorize -------------------------------------------------------------------


def test_authorize_posts_the_body_and_carries_the_reason_verbatim() -> None:
    resource = replay("authz-denied-exact.http")
    client, _ = make(resource, token=TOKEN)
    uri = (
        "spiffe://35fbb6e4-f678-8abb-17a1-d9437ce1a4b3.consul/ns/default/dc/dc1/svc/api"
    )
    decision = result(client.authorize("web", uri, "0a"))
    seen = resource.last
    assert (seen.method, seen.uri) == ("POST", "/v1/agent/connect/authorize")
    assert seen.json() == {
        "Target": "web",
        "ClientCertURI": uri,
        "ClientCertSerial": "0a",
    }
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["x-consul-token"] == TOKEN
    assert decision.authorized is False
    assert decision.reason == (
        "Matched intention: DENY default/api => default/web "
        "(ID: d2469546-56a3-b738-a1be-efbdc9f9ed58, Precedence: 9)"
    )


def test_authorize_allowed() -> None:
    client, _ = make(replay("authz-open-allowed.http"))
    decision = result(
        client.authorize("web", "spiffe://x.consul/ns/default/dc/dc1/svc/a", "")
    )
    assert decision.authorized is True
    assert decision.reason == "ACLs disabled, access is allowed by default"


def test_authorize_bad_uri_is_a_400_with_the_agents_text() -> None:
    client, _ = make(replay("authz-bad-spiffe.http"))
    failure = error(client.authorize("web", "spiffe://bad", ""))
    assert isinstance(failure, ConsulHTTPError)
    assert failure.status == 400
    assert failure.body == "Bad request: ClientCertURI not a valid Connect identifier"


# -- discovery -------------------------------------------------------------------


def test_health_connect_decodes_native_instances_and_the_proxy() -> None:
    resource = replay("health-connect-db.http")
    client, _ = make(resource)
    answer = result(client.health_connect("db", passing=False))
    assert resource.last.uri == "/v1/health/connect/db"
    db1, db2, proxy = answer.value
    assert answer.index == 61
    assert answer.known_leader is True
    assert db1.service.kind == ""
    assert db1.service.connect_native is True
    assert (db1.address, db1.port) == ("127.0.0.1", 5001)
    assert db1.service.meta == {}  # null on the wire
    assert db1.service.tagged_addresses["lan_ipv4"].port == 5001
    assert db1.node.name == "vm"
    assert db1.node.datacenter == "dc1"
    assert [c.check_id for c in db1.checks] == ["serfHealth", "db-1-ttl"]
    assert db1.passing
    # No address registered: the node's, and the critical check shows.
    assert db2.service.address == ""
    assert db2.address == "127.0.0.1"
    assert not db2.passing
    assert db2.checks[1].status == "critical"
    assert db2.checks[1].type == "ttl"
    assert proxy.service.kind == "connect-proxy"
    assert proxy.service.service == "db-sidecar-proxy"
    assert proxy.service.proxy_destination == "db"
    assert proxy.service.connect_native is False
    assert proxy.connect_service == "db"
    assert db1.connect_service == "db"
    assert proxy.port == 21000


def test_health_connect_query_parameters() -> None:
    resource = replay("health-connect-db-passing.http")
    client, _ = make(resource)
    result(
        client.health_connect(
            "db",
            index=61,
            wait=2.0,
            datacenter="dc1",
            filter='Service.Meta.version == "2"',
            near="_agent",
        )
    )
    assert resource.last.path == "/v1/health/connect/db"
    assert resource.last.query == [
        ("passing", "1"),
        ("dc", "dc1"),
        ("filter", 'Service.Meta.version == "2"'),
        ("near", "_agent"),
        ("index", "61"),
        ("wait", "2000ms"),
    ]


def test_health_connect_passing_drops_critical_instances_as_the_agent_does() -> None:
    client, _ = make(replay("health-connect-db-passing.http"))
    entries = result(client.health_connect("db")).value
    assert {e.service.id for e in entries} == {"db-1", "db-proxy-1"}


def test_health_connect_for_an_unknown_service_is_empty_with_an_index() -> None:
    client, _ = make(replay("health-connect-nosuch.http"))
    answer = result(client.health_connect("nosuch"))
    assert answer.value == ()
    assert answer.index is not None
    assert answer.index > 1


def test_catalog_connect_decodes_the_flat_form() -> None:
    resource = replay("catalog-connect-db.http")
    client, _ = make(resource)
    answer = result(client.catalog_connect("db"))
    assert resource.last.uri == "/v1/catalog/connect/db"
    db1, db2, proxy = answer.value
    assert answer.index == 60
    assert db1.service.id == "db-1"
    assert db1.service.connect_native
    assert db1.service.kind == ""
    assert db1.node.address == "127.0.0.1"
    assert db2.service.address == ""
    assert proxy.service.kind == "connect-proxy"
    assert proxy.service.proxy_destination == "db"


def test_execute_prepared_query_with_connect() -> None:
    resource = replay("query-execute-connect.http")
    client, _ = make(resource)
    answer = result(client.execute_prepared_query("db-connect"))
    assert resource.last.path == "/v1/query/db-connect/execute"
    assert resource.last.query == [("connect", "true")]
    query = answer.value
    assert query.service == "db"
    assert query.datacenter == "dc1"
    assert {n.service.id for n in query.nodes} == {"db-1", "db-proxy-1"}
    # Tags and ServiceTags are null in this answer.
    assert all(n.service.tags == () for n in query.nodes)
    assert answer.index == 1


def test_unknown_prepared_query_is_not_found() -> None:
    client, _ = make(replay("query-execute-missing.http"))
    failure = error(client.execute_prepared_query("nosuch"))
    assert isinstance(failure, ConsulNotFound)
    assert failure.body == "Query not found"


# -- intentions ------------------------------------------------------------------


def test_intentions_match_has_no_index() -> None:
    resource = replay("intentions-match-dest-web.http")
    client, _ = make(resource)
    answer = result(client.intentions_match("destination", "web"))
    assert resource.last.query == [("by", "destination"), ("name", "web")]
    assert answer.index is None
    intentions = answer.value["web"]
    assert [(i.source_name, i.action, i.precedence) for i in intentions] == [
        ("api", "deny", 9),
        ("billing", "allow", 9),
        ("*", "allow", 8),
        ("api", "allow", 6),
        ("*", "deny", 5),
    ]
    assert intentions[1].meta == {"team": "payments"}
    assert intentions[0].created_at == datetime(
        2026, 11, 25, 23, 55, 23, 932166, tzinfo=timezone.utc
    )


def test_intentions_match_several_names() -> None:
    resource = replay("intentions-match-dest-multi.http")
    client, _ = make(resource)
    answer = result(client.intentions_match("destination", ["web", "db"]))
    assert resource.last.query == [
        ("by", "destination"),
        ("name", "web"),
        ("name", "db"),
    ]
    assert set(answer.value) == {"web", "db"}


def test_intentions_match_null_list_reads_as_empty() -> None:
    client, _ = make(Replay(200, {}, '{\n    "x": null\n}\n'))
    assert result(client.intentions_match("destination", "x")).value == {"x": ()}


def test_intentions_match_refuses_a_bad_by() -> None:
    client, _ = make(replay("intentions-match-dest-web.http"))
    with pytest.raises(ValueError, match="by"):
        client.intentions_match("sideways", "web")  # type: ignore[arg-type]


def test_intentions_list_index_is_what_match_blocks_on() -> None:
    client, _ = make(replay("intentions-list.http"))
    answer = result(client.intentions_list())
    assert answer.index == 53
    assert len(answer.value) == 5
    assert answer.value[0].id == "d2469546-56a3-b738-a1be-efbdc9f9ed58"


def test_intentions_check() -> None:
    resource = replay("intentions-check-denied.http")
    client, _ = make(resource)
    assert result(client.intentions_check("api", "web")) is False
    assert resource.last.query == [("source", "api"), ("destination", "web")]
    client, _ = make(replay("intentions-check-allowed.http"))
    assert result(client.intentions_check("other", "web")) is True


def test_create_and_delete_intention() -> None:
    resource = replay("intention-create-deny-api-web.http")
    client, _ = make(resource)
    ixn_id = result(
        client.create_intention("api", "web", "deny", description="fixture")
    )
    assert ixn_id == "d2469546-56a3-b738-a1be-efbdc9f9ed58"
    assert (resource.last.method, resource.last.uri) == (
        "POST",
        "/v1/connect/intentions",
    )
    assert resource.last.json() == {
        "SourceName": "api",
        "DestinationName": "web",
        "SourceType": "consul",
        "Action": "deny",
        "Description": "fixture",
    }
    resource = replay("intention-delete.http")
    client, _ = make(resource)
    assert result(client.delete_intention(ixn_id)) is None
    assert (resource.last.method, resource.last.uri) == (
        "DELETE",
        f"/v1/connect/intentions/{ixn_id}",
    )


def test_get_intention_and_a_duplicate_is_a_500() -> None:
    client, _ = make(replay("intention-get.http"))
    ixn = result(client.get_intention("d2469546-56a3-b738-a1be-efbdc9f9ed58"))
    assert ixn.destination_name == "web"
    client, _ = make(replay("intention-create-duplicate.http"))
    failure = error(client.create_intention("api", "web", "deny"))
    assert isinstance(failure, ConsulHTTPError)
    assert failure.status == 500
    assert failure.body.startswith("duplicate intention found")


# -- registration and checks -------------------------------------------------------


def test_register_service_renders_the_native_registration() -> None:
    resource = replay("register-web-native.http")
    client, _ = make(resource, token=TOKEN)
    registration = ServiceRegistration(
        name="web",
        id="web-1",
        port=8080,
        address="127.0.0.1",
        tags=["v2"],
        meta={"version": "2"},
        checks=[
            TTLCheck(
                ttl=15,
                check_id="web-ttl",
                name="web alive",
                status="passing",
                notes="driven by readiness",
                deregister_critical_service_after=90.5,
            )
        ],
    )
    assert result(client.register_service(registration)) is None
    seen = resource.last
    assert (seen.method, seen.uri) == ("PUT", "/v1/agent/service/register")
    assert seen.json() == {
        "Name": "web",
        "ID": "web-1",
        "Port": 8080,
        "Address": "127.0.0.1",
        "Tags": ["v2"],
        "Meta": {"version": "2"},
        "Connect": {"Native": True},
        "Checks": [
            {
                "TTL": "15s",
                "CheckID": "web-ttl",
                "Name": "web alive",
                "Status": "passing",
                "Notes": "driven by readiness",
                "DeregisterCriticalServiceAfter": "90500ms",
            }
        ],
    }


def test_minimal_registration_body() -> None:
    assert ServiceRegistration(name="web", port=8080).to_json() == {
        "Name": "web",
        "Port": 8080,
        "Connect": {"Native": True},
    }


@pytest.mark.parametrize(
    "make_bad",
    [
        lambda: ServiceRegistration(name=""),
        lambda: ServiceRegistration(name="web", port=0),
        lambda: ServiceRegistration(name="web", port=70000),
        lambda: TTLCheck(ttl=0),
        lambda: TTLCheck(ttl=10, status="ok"),
        lambda: TTLCheck(ttl=10, deregister_critical_service_after=-1),
    ],
)
def test_bad_registrations_are_refused_when_built(make_bad: Any) -> None:
    with pytest.raises(ValueError, match=r"name|port|ttl|status|deregister"):
        make_bad()


def test_register_error_carries_the_agents_text() -> None:
    client, _ = make(replay("register-unknown-field.http"))
    failure = error(client.register_service(ServiceRegistration(name="x", port=1)))
    assert isinstance(failure, ConsulHTTPError)
    assert failure.status == 400
    assert failure.body == 'Request decode failed: json: unknown field "Unknown"'


def test_deregister_and_check_updates() -> None:
    resource = replay("check-pass.http")
    client, _ = make(resource)
    assert result(client.deregister_service("web-1")) is None
    assert (resource.last.method, resource.last.uri) == (
        "PUT",
        "/v1/agent/service/deregister/web-1",
    )
    result(client.check_pass("web-ttl"))
    assert (resource.last.method, resource.last.uri) == (
        "PUT",
        "/v1/agent/check/pass/web-ttl",
    )
    result(client.check_warn("web-ttl", note="slow disk"))
    assert resource.last.path == "/v1/agent/check/warn/web-ttl"
    assert resource.last.query == [("note", "slow disk")]
    result(client.check_fail("service:web 1"))
    assert resource.last.uri == "/v1/agent/check/fail/service%3Aweb%201"
    result(client.check_update("web-ttl", "warning", "half ready"))
    assert resource.last.uri == "/v1/agent/check/update/web-ttl"
    assert resource.last.json() == {"Status": "warning", "Output": "half ready"}
    with pytest.raises(ValueError, match="status"):
        client.check_update("web-ttl", "bogus", "")


def test_unknown_ttl_check_is_a_500_with_the_agents_text() -> None:
    client, _ = make(replay("check-pass-unknown.http"))
    failure = error(client.check_pass("nosuch"))
    assert isinstance(failure, ConsulHTTPError)
    assert failure.status == 500
    assert failure.body == 'CheckID "nosuch" does not have associated TTL'
    assert failure.method == "PUT"
    assert failure.path == "/v1/agent/check/pass/nosuch"


# -- agent self and CA configuration ------------------------------------------------


def test_agent_self() -> None:
    resource = replay("agent-self.http")
    client, _ = make(resource)
    me = result(client.agent_self())
    assert resource.last.uri == "/v1/agent/self"
    assert (me.datacenter, me.node_name, me.server, me.version) == (
        "dc1",
        "vm",
        True,
        "1.8.7",
    )
    assert me.node_id == "9ea677c2-ab10-919a-e3ee-b28da7747adf"


def test_ca_configuration_hides_a_private_key_from_its_repr() -> None:
    client, _ = make(replay("rotation-ca-config-after.http"))
    config = result(client.ca_configuration())
    assert config.provider == "consul"
    assert "PrivateKey" in config.config
    assert "BEGIN" not in repr(config)
    assert config.config_json()["LeafCertTTL"] == "72h"


def test_set_ca_configuration_body() -> None:
    resource = replay("rotation-ca-config-put.http")
    client, _ = make(resource)
    result(client.set_ca_configuration("consul", {"LeafCertTTL": "24h"}))
    assert (resource.last.method, resource.last.uri) == (
        "PUT",
        "/v1/connect/ca/configuration",
    )
    assert resource.last.json() == {
        "Provider": "consul",
        "Config": {"LeafCertTTL": "24h"},
        "ForceWithoutCrossSigning": False,
    }


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "kind", "status", "body"),
    [
        ("register-bad-json.http", ConsulHTTPError, 400, "Request decode failed: "),
        ("acl-leaf-anon.http", ConsulPermissionDenied, 403, "Permission denied"),
        ("acl-leaf-bogus-token.http", ConsulPermissionDenied, 403, "ACL not found"),
        ("intention-get-missing.http", ConsulNotFound, 404, "Intention not found"),
        ("register-get-405.http", ConsulHTTPError, 405, "method GET not allowed"),
        ("check-pass-unknown.http", ConsulHTTPError, 500, "CheckID "),
    ],
)
def test_error_statuses_map_to_the_error_family(
    fixture: str, kind: type[ConsulHTTPError], status: int, body: str
) -> None:
    client, _ = make(replay(fixture), token=TOKEN)
    failure = error(client.leaf("web"))
    assert type(failure) is kind
    assert isinstance(failure, ConsulError)
    assert failure.status == status
    assert failure.body.startswith(body)
    assert failure.method == "GET"
    assert failure.path == "/v1/agent/connect/ca/leaf/web"
    assert failure.body in str(failure)
    assert str(status) in str(failure)
    assert TOKEN not in str(failure)


def test_permission_denied_says_what_to_do() -> None:
    client, _ = make(replay("acl-leaf-anon.http"))
    failure = error(client.leaf("web"))
    assert "service:write" in str(failure)
    assert "CONSUL_HTTP_TOKEN" in str(failure)


# What Consul 1.8.7 (OSS) answers to any ns= (observed on the real agent;
# the real-agent suite checks it again).
ENTERPRISE_400 = (
    'Bad request: Invalid query parameter: "ns" - Namespaces are a Consul '
    "Enterprise feature"
)


def test_a_namespace_400_becomes_an_enterprise_error() -> None:
    resource = Replay(
        400, {"Content-Type": "text/plain; charset=utf-8"}, ENTERPRISE_400
    )
    client, _ = make(resource, namespace="team-a")
    failure = error(client.health_connect("db"))
    assert ("ns", "team-a") in resource.last.query
    assert isinstance(failure, ConsulEnterpriseRequired)
    assert isinstance(failure, ConsulHTTPError)
    assert failure.status == 400
    assert "need Consul Enterprise" in str(failure)
    assert "CONSUL_NAMESPACE" in str(failure)


@pytest.mark.parametrize("namespace", [None, "", "default"])
def test_default_namespace_and_partition_are_not_sent(namespace: str | None) -> None:
    resource = replay("leaf-web.http")
    client, _ = make(resource, namespace=namespace, partition="default")
    result(client.leaf("web"))
    assert resource.last.query == []


def test_non_default_namespace_and_partition_are_sent_and_per_call_wins() -> None:
    leaf = replay("leaf-web.http")
    client, _ = make(leaf, namespace="team-a", partition="part-1")
    result(client.leaf("web"))
    assert leaf.last.query == [("ns", "team-a"), ("partition", "part-1")]
    resource = replay("health-connect-db.http")
    client, _ = make(resource, namespace="team-a", partition="part-1")
    result(client.health_connect("db", passing=False, namespace="team-b"))
    assert resource.last.query == [("ns", "team-b"), ("partition", "part-1")]
    result(client.health_connect("db", passing=False, namespace="default"))
    assert resource.last.query == [("partition", "part-1")]
    # Roots are not namespaced.
    roots = replay("ca-roots.http")
    client, _ = make(roots, namespace="team-a", partition="part-1")
    result(client.agent_ca_roots())
    assert roots.last.query == []


def test_a_leaf_without_cert_pem_names_the_field() -> None:
    _, _status, headers, body = load("leaf-web.http")
    leaf = json.loads(body)
    del leaf["CertPEM"]
    client, _ = make(Replay(200, headers, json.dumps(leaf)))
    failure = error(client.leaf("web"))
    assert isinstance(failure, ConsulResponseError)
    assert str(failure) == "leaf: field 'CertPEM' missing"


def test_a_mistyped_nested_field_is_named_with_its_path() -> None:
    _, _, headers, body = load("ca-roots.http")
    roots = json.loads(body)
    roots["Roots"][0]["SerialNumber"] = "07"
    client, _ = make(Replay(200, headers, json.dumps(roots)))
    failure = error(client.agent_ca_roots())
    assert str(failure) == (
        "ca roots: field 'Roots[0].SerialNumber' is a string, expected an integer"
    )


def test_a_mistyped_health_entry_is_named_with_its_path() -> None:
    _, _, headers, body = load("health-connect-db.http")
    entries = json.loads(body)
    entries[2]["Service"]["Port"] = "21000"
    client, _ = make(Replay(200, headers, json.dumps(entries)))
    failure = error(client.health_connect("db"))
    assert str(failure) == (
        "health/connect: field '[2].Service.Port' is a string, expected an integer"
    )


def test_a_bad_time_is_named() -> None:
    _, _, headers, body = load("leaf-web.http")
    leaf = json.loads(body)
    leaf["ValidBefore"] = "tomorrow"
    client, _ = make(Replay(200, headers, json.dumps(leaf)))
    failure = error(client.leaf("web"))
    assert str(failure) == (
        "leaf: field 'ValidBefore' is 'tomorrow', expected an RFC 3339 time"
    )


def test_a_body_that_is_not_json_is_a_response_error() -> None:
    client, _ = make(Replay(200, {}, "<html>proxy error</html>"))
    failure = error(client.agent_self())
    assert isinstance(failure, ConsulResponseError)
    assert "not JSON" in str(failure)
    assert "<html>" in str(failure)


def test_a_bad_index_header_is_a_response_error() -> None:
    _, _, headers, body = load("leaf-web.http")
    client, _ = make(Replay(200, {**headers, "X-Consul-Index": "many"}, body))
    failure = error(client.leaf("web"))
    assert isinstance(failure, ConsulResponseError)
    assert "X-Consul-Index" in str(failure)


def test_a_list_where_an_object_belongs_is_named() -> None:
    client, _ = make(Replay(200, {}, "[]"))
    failure = error(
        client.authorize("web", "spiffe://a.consul/ns/default/dc/d/svc/x", "")
    )
    assert str(failure) == "authorize: the response is a list, expected an object"


# -- timeouts and cancellation ----------------------------------------------------


def test_a_request_times_out_on_the_injected_clock() -> None:
    hang = Hang()
    client, clock = make(hang, timeout=10)
    d = client.agent_self()
    assert len(hang.requests) == 1
    clock.advance(9.9)
    pending(d)
    clock.advance(0.1)
    failure = error(d)
    assert isinstance(failure, ConsulTimeout)
    assert failure.seconds == 10
    assert failure.path == "/v1/agent/self"
    assert "10s" in str(failure)
    assert clock.getDelayedCalls() == []


def test_a_blocking_read_is_bounded_by_wait_plus_a_sixteenth_plus_timeout() -> None:
    hang = Hang()
    client, clock = make(hang, timeout=10)
    d = client.leaf("web", index=14, wait=16)
    clock.advance(16 + 1 + 10 - 0.01)
    pending(d)
    clock.advance(0.01)
    assert isinstance(error(d), ConsulTimeout)


def test_the_timed_out_request_is_abandoned_on_the_wire() -> None:
    hang = Hang()
    stub = StubTreq(hang)
    clock = Clock()
    client = ConsulClient(clock, http_client=stub, timeout=1)
    d = client.agent_self()
    clock.advance(1)
    stub.flush()
    assert isinstance(error(d), ConsulTimeout)
    assert len(hang.gone) == 1  # the server saw the connection go


def test_cancelling_is_a_cancellation_not_a_timeout() -> None:
    client, clock = make(Hang(), timeout=10)
    d = client.agent_self()
    d.cancel()
    assert isinstance(error(d), CancelledError)
    assert clock.getDelayedCalls() == []


def test_an_answer_cancels_the_timer() -> None:
    client, clock = make(replay("leaf-web.http"))
    result(client.leaf("web", index=1, wait=60))
    assert clock.getDelayedCalls() == []


def test_connection_refused_is_unavailable() -> None:
    reactor = MemoryReactorClock()
    client = ConsulClient(reactor, address="127.0.0.1:8599", token=TOKEN)
    d = client.agent_self()
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 8599)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    reactor.advance(0.5)  # HostnameEndpoint settles its attempts on the clock
    failure = error(d)
    assert isinstance(failure, ConsulUnavailable)
    assert "http://127.0.0.1:8599" in str(failure)
    assert "refused" in str(failure).lower()
    assert TOKEN not in str(failure)


# -- the token stays secret -----------------------------------------------------------


def test_the_token_is_a_header_never_a_query_parameter_nor_in_errors() -> None:
    echo = Replay(403, {}, f"Permission denied: token {TOKEN} lacks service:write")
    client, _ = make(echo, token=TOKEN)
    failure = error(client.leaf("web", index=3, wait=1))
    assert echo.last.headers["x-consul-token"] == TOKEN
    assert "token" not in echo.last.uri
    assert TOKEN not in str(failure)
    assert TOKEN not in failure.body
    assert TOKEN not in repr(failure)
    assert TOKEN not in repr(client)
    assert "token=<set>" in repr(client)


def test_no_token_sends_no_token_header() -> None:
    resource = replay("leaf-web.http")
    client, _ = make(resource)
    result(client.leaf("web"))
    assert "x-consul-token" not in resource.last.headers


def test_set_token_changes_the_token_of_the_requests_after_it() -> None:
    resource = replay("leaf-web.http")
    client, _ = make(resource, token=TOKEN)
    assert client.set_token(TOKEN) is False
    assert client.set_token("rotated-token") is True
    result(client.leaf("web"))
    assert resource.last.headers["x-consul-token"] == "rotated-token"
    assert client.set_token(None) is True
    result(client.leaf("web"))
    assert "x-consul-token" not in resource.last.headers


# -- configuration from the environment --------------------------------------------


def env_client(environ: dict[str, str], **overrides: Any) -> ConsulClient:
    return ConsulClient.from_environment(MemoryReactorClock(), environ, **overrides)


def test_the_default_address() -> None:
    client = env_client({})
    assert client.address == "http://127.0.0.1:8500"
    assert not client.has_token
    assert client.namespace is None


@pytest.mark.parametrize(
    ("environ", "address"),
    [
        ({"CONSUL_HTTP_ADDR": "10.0.0.5:8500"}, "http://10.0.0.5:8500"),
        ({"CONSUL_HTTP_ADDR": "consul.local"}, "http://consul.local:8500"),
        ({"CONSUL_HTTP_ADDR": "http://127.0.0.1:18500"}, "http://127.0.0.1:18500"),
        ({"CONSUL_HTTP_ADDR": "https://127.0.0.1:8501/"}, "https://127.0.0.1:8501"),
        ({"CONSUL_HTTP_ADDR": "[::1]:8500"}, "http://[::1]:8500"),
        (
            {"CONSUL_HTTP_ADDR": "127.0.0.1:8501", "CONSUL_HTTP_SSL": "true"},
            "https://127.0.0.1:8501",
        ),
        (
            {"CONSUL_HTTP_ADDR": "consul.local", "CONSUL_HTTP_SSL": "1"},
            "https://consul.local:8501",
        ),
        # A scheme in the address wins over CONSUL_HTTP_SSL, as in Consul's Go client.
        (
            {"CONSUL_HTTP_ADDR": "http://127.0.0.1:8500", "CONSUL_HTTP_SSL": "true"},
            "http://127.0.0.1:8500",
        ),
        (
            {"CONSUL_HTTP_ADDR": "unix:///run/consul/http.sock"},
            "unix:///run/consul/http.sock",
        ),
    ],
)
def test_consul_http_addr_forms(environ: dict[str, str], address: str) -> None:
    assert env_client(environ).address == address


@pytest.mark.parametrize(
    "bad", ["ftp://host:1", "unix://relative.sock", "host:port", "host:99999", "a b:1"]
)
def test_a_bad_consul_http_addr_is_named(bad: str) -> None:
    with pytest.raises(ValueError, match="CONSUL_HTTP_ADDR") as caught:
        env_client({"CONSUL_HTTP_ADDR": bad})
    assert isinstance(caught.value, ConsulError)


@pytest.mark.parametrize("variable", ["CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY"])
def test_a_bad_boolean_is_named(variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        env_client({variable: "yes please"})


def test_the_unix_socket_address_connects_to_the_socket() -> None:
    reactor = MemoryReactorClock()
    client = ConsulClient.from_environment(
        reactor, {"CONSUL_HTTP_ADDR": "unix:///run/consul/http.sock"}
    )
    client.agent_self()
    assert reactor.unixClients[0][0] == "/run/consul/http.sock"
    assert reactor.tcpClients == []


def test_the_token_from_the_environment(tmp_path: Path) -> None:
    assert env_client({"CONSUL_HTTP_TOKEN": TOKEN}).has_token
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}-from-file\n")
    resource = replay("leaf-web.http")
    client = ConsulClient.from_environment(
        Clock(),
        {"CONSUL_HTTP_TOKEN": TOKEN, "CONSUL_HTTP_TOKEN_FILE": str(token_file)},
        http_client=StubTreq(resource),
    )
    result(client.leaf("web"))
    # The file wins over the variable, as in Consul's Go client.
    assert resource.last.headers["x-consul-token"] == f"{TOKEN}-from-file"


def test_an_explicit_token_wins_over_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file")
    resource = replay("leaf-web.http")
    client = ConsulClient.from_environment(
        Clock(),
        {"CONSUL_HTTP_TOKEN": "from-env", "CONSUL_HTTP_TOKEN_FILE": str(token_file)},
        token="explicit",
        namespace=None,  # None means "not given"
        http_client=StubTreq(resource),
    )
    result(client.leaf("web"))
    assert resource.last.headers["x-consul-token"] == "explicit"


def test_an_unreadable_token_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="CONSUL_HTTP_TOKEN_FILE") as caught:
        env_client({"CONSUL_HTTP_TOKEN_FILE": str(missing)})
    assert str(missing) in str(caught.value)


def test_namespace_and_partition_from_the_environment_and_overrides() -> None:
    client = env_client({"CONSUL_NAMESPACE": "team-a", "CONSUL_PARTITION": "p1"})
    assert (client.namespace, client.partition) == ("team-a", "p1")
    client = env_client({"CONSUL_NAMESPACE": "team-a"}, namespace="team-b")
    assert client.namespace == "team-b"


def test_unknown_overrides_are_refused() -> None:
    with pytest.raises(TypeError, match="adress"):
        env_client({}, adress="127.0.0.1:1")


def test_client_certificate_without_key_is_refused() -> None:
    with pytest.raises(ValueError, match="CONSUL_CLIENT_KEY"):
        env_client(
            {
                "CONSUL_HTTP_ADDR": "https://127.0.0.1:8501",
                "CONSUL_CLIENT_CERT": str(FIXTURES / "leaf-web.pem"),
            }
        )


def test_a_ca_file_without_certificates_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "ca.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="CONSUL_CACERT"):
        env_client(
            {"CONSUL_HTTP_ADDR": "https://127.0.0.1:8501", "CONSUL_CACERT": str(empty)}
        )


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_a_bad_timeout_is_refused(timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        ConsulClient(Clock(), timeout=timeout)


# -- real sockets: HTTPS to the agent, and its UNIX socket --------------------------
#
# The point of these is the real TLS handshake (service_identity checking the
# agent's certificate) and a real UNIX socket, so they run on the real reactor
# against a local twisted.web server that replays the agent-self capture.


def _pem_pair(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> tuple[bytes, bytes]:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@define
class Issued:
    key_pem: bytes
    cert_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[str, str]:
        cert, key = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return str(cert), str(key)

    def private_certificate(self) -> PrivateCertificate:
        return PrivateCertificate.loadPEM(self.cert_pem + self.key_pem)


class TestCA:
    """A throwaway CA that issues certificates for the agent and its clients."""

    __test__ = False

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, dns: list[str], ips: list[str] = ()) -> Issued:  # type: ignore[assignment]
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(timezone.utc)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )
        return Issued(*_pem_pair(key, cert))

    def write(self, directory: Path, name: str = "ca.pem") -> str:
        path = directory / name
        path.write_bytes(self.cert_pem)
        return str(path)


@pytest.fixture(scope="module")
def agent_ca() -> TestCA:
    return TestCA("agent test CA")


async def _listen_https(agent_ca: TestCA, *, client_ca: TestCA | None = None) -> Any:
    from twisted.internet import reactor

    server = agent_ca.issue(["server.dc1.consul"], ["127.0.0.1"])
    authorities = [] if client_ca is None else [Certificate.loadPEM(client_ca.cert_pem)]
    options = server.private_certificate().options(*authorities)
    return reactor.listenSSL(  # type: ignore[attr-defined]
        0, Site(replay("agent-self.http")), options, interface="127.0.0.1"
    )


async def _agent_self_via(environ: dict[str, str]) -> Any:
    from twisted.internet import reactor

    client = ConsulClient.from_environment(reactor, environ, timeout=5)
    try:
        return await client.agent_self()
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_https_verifies_the_agent_against_the_ca_file(
    agent_ca: TestCA, tmp_path: Path
) -> None:
    port = await _listen_https(agent_ca)
    try:
        addr = f"https://127.0.0.1:{port.getHost().port}"
        me = await _agent_self_via(
            {"CONSUL_HTTP_ADDR": addr, "CONSUL_CACERT": agent_ca.write(tmp_path)}
        )
        assert me.datacenter == "dc1"
        # The same CA from a directory, and a server name the cert carries.
        ca_dir = tmp_path / "cas"
        ca_dir.mkdir()
        agent_ca.write(ca_dir, "agent.crt")
        (ca_dir / "README").write_text("not a certificate")
        me = await _agent_self_via(
            {
                "CONSUL_HTTP_ADDR": addr,
                "CONSUL_CAPATH": str(ca_dir),
                "CONSUL_TLS_SERVER_NAME": "server.dc1.consul",
            }
        )
        assert me.node_name == "vm"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_https_refuses_an_agent_the_ca_did_not_sign(
    agent_ca: TestCA, tmp_path: Path
) -> None:
    port = await _listen_https(agent_ca)
    other = TestCA("some other CA")
    try:
        addr = f"https://127.0.0.1:{port.getHost().port}"
        with pytest.raises(ConsulUnavailable) as caught:
            await _agent_self_via(
                {"CONSUL_HTTP_ADDR": addr, "CONSUL_CACERT": other.write(tmp_path)}
            )
        assert "certificate" in str(caught.value).lower()
        # CONSUL_HTTP_SSL_VERIFY=false turns checking off (development only).
        me = await _agent_self_via(
            {
                "CONSUL_HTTP_ADDR": addr,
                "CONSUL_CACERT": other.write(tmp_path),
                "CONSUL_HTTP_SSL_VERIFY": "false",
            }
        )
        assert me.datacenter == "dc1"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_https_refuses_a_certificate_for_another_name(
    agent_ca: TestCA, tmp_path: Path
) -> None:
    port = await _listen_https(agent_ca)
    try:
        with pytest.raises(ConsulUnavailable) as caught:
            await _agent_self_via(
                {
                    "CONSUL_HTTP_ADDR": f"127.0.0.1:{port.getHost().port}",
                    "CONSUL_HTTP_SSL": "true",
                    "CONSUL_CACERT": agent_ca.write(tmp_path),
                    "CONSUL_TLS_SERVER_NAME": "server.dc2.consul",
                }
            )
        assert "server.dc2.consul" in str(caught.value)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_https_presents_the_client_certificate(
    agent_ca: TestCA, tmp_path: Path
) -> None:
    clients = TestCA("client CA")
    port = await _listen_https(agent_ca, client_ca=clients)
    try:
        environ = {
            "CONSUL_HTTP_ADDR": f"https://127.0.0.1:{port.getHost().port}",
            "CONSUL_CACERT": agent_ca.write(tmp_path),
        }
        with pytest.raises(ConsulUnavailable):
            await _agent_self_via(environ)
        cert, key = clients.issue(["client.dc1.consul"]).write(tmp_path, "client")
        me = await _agent_self_via(
            {**environ, "CONSUL_CLIENT_CERT": cert, "CONSUL_CLIENT_KEY": key}
        )
        assert me.datacenter == "dc1"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_unix_socket(tmp_path: Path) -> None:
    from twisted.internet import reactor

    path = str(tmp_path / "consul.sock")
    resource = replay("agent-self.http")
    port = reactor.listenUNIX(path, Site(resource))  # type: ignore[attr-defined]
    try:
        me = await _agent_self_via({"CONSUL_HTTP_ADDR": f"unix://{path}"})
        assert me.datacenter == "dc1"
        assert resource.last.uri == "/v1/agent/self"
    finally:
        await port.stopListening()


# -- the client under the blocking loop ----------------------------------------------


def test_a_watch_drives_the_leaf_with_index_and_wait() -> None:
    from connect_native.consul.blocking import Watch

    resource = replay("leaf-web.http")
    client, clock = make(resource)
    seen: list[Any] = []
    watch = Watch(
        clock,
        lambda index, wait: client.leaf("web", index=index, wait=wait),
        seen.append,
        name="leaf web",
        wait=60,
        min_interval=1,
    )
    watch.start()
    clock.advance(0)
    assert resource.last.query == [("index", "0"), ("wait", "60000ms")]
    assert [leaf.serial_number for leaf in seen] == ["08"]
    clock.advance(1)
    # The capture's X-Consul-Index is what the next read blocks on.
    assert resource.last.query == [("index", "14"), ("wait", "60000ms")]
    watch.stop()
