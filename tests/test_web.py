"""
Per-request (L7) authorization for twisted.web and Klein, in memory: a
``ConnectServerEndpoint`` on a ``MemoryReactorClock`` serving
``Site(protect(resource, authorizer))``, reached by a Connect TLS client
over iosim, so every request carries a peer that a real handshake verified
and ``peer_identity`` finds it the way it does in production.  The
authorizer is an ``IntentionAuthorizer`` polling a scripted agent on the
same clock.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from attrs import define
from klein import Klein
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web._newclient import Request as ClientRequest
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyRequest

from connect_native.authorize import AgentAuthorizer, Decision, Peer
from connect_native.authorize.intentions import IntentionAuthorizer
from connect_native.authorize.rules import HeadersLike
from connect_native.consul.records import (
    AuthorizeResult,
    Indexed,
    Intention,
    IntentionHTTPHeaderPermission,
    IntentionHTTPPermission,
    IntentionPermission,
)
from connect_native.identity import ServiceIdentity
from connect_native.server import ConnectServerEndpoint
from connect_native.testing import CertificateFactory, FakeBundleSource, make_bundle
from connect_native.tls import ClientConnectionCreator
from connect_native.web import (
    FORBIDDEN_BODY,
    ConnectProtected,
    NotAConnectConnection,
    peer_identity,
    protect,
    request_peer,
    routed_path,
)

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)
POLL = 10.0

# --- intentions and a scripted agent -------------------------------------------------


def l4(source: str, action: str, precedence: int = 9) -> Intention:
    return Intention(
        source_ns="default",
        source_name=source,
        destination_ns="default",
        destination_name="web",
        source_type="consul",
        precedence=precedence,
        action=action,
        id=f"id-{source}",
    )


def l7(source: str, *permissions: IntentionPermission) -> Intention:
    return Intention(
        source_ns="default",
        source_name=source,
        destination_ns="default",
        destination_name="web",
        source_type="consul",
        precedence=9,
        action=None,
        permissions=permissions,
        id=f"id-{source}",
    )


def allow(**http: Any) -> IntentionPermission:
    return IntentionPermission("allow", IntentionHTTPPermission(**http))


def deny(**http: Any) -> IntentionPermission:
    return IntentionPermission("deny", IntentionHTTPPermission(**http))


def header(name: str, **rule: Any) -> IntentionHTTPHeaderPermission:
    return IntentionHTTPHeaderPermission(name, **rule)


class ScriptedConsul:
    """
    The agent as ``IntentionAuthorizer`` (polling) sees it: the match for
    ``web`` answers whatever ``intentions`` is now.
    """

    def __init__(self, intentions: Sequence[Intention]) -> None:
        self.intentions = tuple(intentions)
        self.reads = 0

    def intentions_match(
        self, by: str, name: str, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[dict[str, tuple[Intention, ...]]]]:
        self.reads += 1
        return succeed(Indexed({name: self.intentions}, None))

    def intentions_list(
        self, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[tuple[Intention, ...]]]:
        return succeed(Indexed(self.intentions, 1))

    def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> Deferred[AuthorizeResult]:
        return fail(AssertionError("these tests decide locally, default deny"))


# --- the harness: a Site behind ConnectServerEndpoint, clients over iosim ------------


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


@define
class Response:
    code: int
    headers: Headers
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@define
class Connection:
    """One Connect TLS connection to ``web``; requests go one after another."""

    http: HTTP11ClientProtocol
    pump: IOPump

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Sequence[tuple[str, str]] = (),
    ) -> Response:
        raw = Headers({b"host": [b"web.service.consul"]})
        for name, value in headers:
            raw.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        answer = self.http.request(
            ClientRequest(method.encode(), path.encode(), raw, None, persistent=True)
        )
        self.pump.flush()
        response: IResponse = settled(answer)
        body = _Body()
        response.deliverBody(body)
        self.pump.flush()
        assert body.done, "the response body did not finish"
        return Response(response.code, response.headers, body.data)


class _Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.done = True


def settled(d: Deferred[Any]) -> Any:
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "still waiting: the connection did not answer"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class Web:
    """
    ``web`` serving ``Site(protect(resource, authorizer))`` over Connect on
    a MemoryReactorClock, deciding by the scripted agent's intentions.
    """

    def __init__(
        self,
        ca: CertificateFactory,
        resource: Any,
        intentions: Sequence[Intention],
        authorizer: Any = None,
        wrap: bool = True,
    ) -> None:
        self.ca = ca
        self.reactor = MemoryReactorClock()
        self.reactor.advance(time.time())
        self.consul = ScriptedConsul(intentions)
        self.intentions = IntentionAuthorizer(
            self.consul,  # type: ignore[arg-type]
            self.reactor,
            "web",
            blocking=False,
            poll_interval=POLL,
        )
        self.intentions.startService()
        self.protected = protect(
            resource, self.intentions if authorizer is None else authorizer
        )
        endpoint = ConnectServerEndpoint(
            self.reactor,
            TCP4ServerEndpoint(self.reactor, 8443),
            FakeBundleSource(make_bundle(ca, "web")),
            self.intentions,
            "web",
        )
        # wrap=False: the site serves ``resource`` itself, as a user who
        # forgot protect() would.
        site = Site(self.protected if wrap else resource)
        site.displayTracebacks = False
        endpoint.listen(site)
        [(_, self.tls_factory, _, _)] = self.reactor.tcpServers

    def change(self, intentions: Sequence[Intention]) -> None:
        """New intentions at the agent, seen at the authorizer's next poll."""
        self.consul.intentions = tuple(intentions)
        self.reactor.advance(POLL)

    def connect(self, source: str = "api") -> Connection:
        creator = ClientConnectionCreator(
            make_bundle(self.ca, source),
            ServiceIdentity.parse(self.ca.service_uri("web")),
            alpn_protocols=(b"http/1.1",),
        )
        http = HTTP11ClientProtocol()
        client = TLSMemoryBIOFactory(
            creator, True, _Single(http), clock=self.reactor
        ).buildProtocol(ADDRESS)
        server = self.tls_factory.buildProtocol(ADDRESS)
        pump = connect(
            server,
            FakeTransport(server, isServer=True),
            client,
            FakeTransport(client, isServer=False),
            clock=self.reactor,
        )
        return Connection(http, pump)


class _Single:
    """A client factory building the one given protocol."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def buildProtocol(self, addr: object) -> Any:
        return self.protocol

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


# --- resources ---------------------------------------------------------------------


class Echo(Resource):
    """A leaf answering ``<method> <path> for <peer service>``; counts renders."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list[bytes] = []

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        method, uri = request.method or b"", request.uri or b""
        self.rendered.append(uri)
        caller = peer_identity(request)
        return f"{method.decode()} {uri.decode()} for {caller.service}".encode()


class Tree(Resource):
    """A branch that records every traversal into it."""

    def __init__(self) -> None:
        super().__init__()
        self.traversed: list[bytes] = []

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        self.traversed.append(path)
        return super().getChildWithDefault(path, request)


def tree() -> tuple[Tree, Echo, Echo]:
    root = Tree()
    admin_branch = Tree()
    admin, public = Echo(), Echo()
    root.putChild(b"admin", admin_branch)
    admin_branch.putChild(b"keys", admin)
    root.putChild(b"public", public)
    return root, admin, public


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events  # type: ignore[misc]


def web_decisions(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if "method" in e and e.get("target") == "web"]


def status(
    ca: CertificateFactory,
    intention: Intention,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
) -> int:
    web = Web(ca, Echo(), [intention])
    return web.connect("api").request(method, path, headers).code


# --- allow and deny by the intentions' L7 permissions ------------------------------


def test_an_allowed_request_reaches_the_resource_with_the_verified_peer(
    ca: CertificateFactory,
) -> None:
    echo = Echo()
    web = Web(ca, echo, [l7("api", allow(path_prefix="/"))])
    response = web.connect("api").request("GET", "/hello?x=1")
    assert (response.code, response.text) == (200, "GET /hello?x=1 for api")
    assert echo.rendered == [b"/hello?x=1"]


def test_a_denied_request_gets_a_short_plain_403_and_never_reaches_the_resource(
    ca: CertificateFactory,
) -> None:
    echo = Echo()
    web = Web(ca, echo, [l7("api", allow(path_prefix="/public"))])
    response = web.connect("api").request("GET", "/private")
    assert response.code == 403
    assert response.body == FORBIDDEN_BODY
    assert response.headers.getRawHeaders(b"content-type") == [
        b"text/plain; charset=utf-8"
    ]
    assert echo.rendered == []


@pytest.mark.parametrize(
    ("permission", "path", "code"),
    [
        (allow(path_exact="/status"), "/status", 200),
        (allow(path_exact="/status"), "/status?verbose=1", 200),
        (allow(path_exact="/status"), "/status/", 403),
        (allow(path_exact="/status"), "/statuses", 403),
        (allow(path_prefix="/api/"), "/api/v1/users", 200),
        (allow(path_prefix="/api/"), "/api", 403),
        (allow(path_prefix="/api/"), "/apiv2/", 403),
        (allow(path_regex="/users/[0-9]+"), "/users/42", 200),
        (allow(path_regex="/users/[0-9]+"), "/users/42/keys", 403),
        (allow(path_regex="/users/[0-9]+"), "/users/abc", 403),
    ],
)
def test_path_rules(
    ca: CertificateFactory, permission: IntentionPermission, path: str, code: int
) -> None:
    assert status(ca, l7("api", permission), "GET", path) == code


@pytest.mark.parametrize(
    ("method", "code"),
    [("GET", 200), ("HEAD", 200), ("POST", 403), ("DELETE", 403)],
)
def test_method_rules(ca: CertificateFactory, method: str, code: int) -> None:
    permission = allow(path_prefix="/", methods=("GET", "HEAD"))
    assert status(ca, l7("api", permission), method, "/thing") == code


@pytest.mark.parametrize(
    ("rule", "headers", "code"),
    [
        (header("x-team", present=True), [("X-Team", "")], 200),
        (header("x-team", present=True), [], 403),
        (header("x-team", present=True, invert=True), [], 200),
        (header("x-team", present=True, invert=True), [("X-Team", "a")], 403),
        (header("x-team", exact="blue"), [("X-Team", "blue")], 200),
        (header("x-team", exact="blue"), [("X-Team", "Blue")], 403),
        (header("x-team", exact="blue", invert=True), [("X-Team", "red")], 200),
        (header("x-team", exact="blue", invert=True), [("X-Team", "blue")], 403),
        # Envoy: an inverted rule never matches a missing header.
        (header("x-team", exact="blue", invert=True), [], 403),
        (header("x-team", prefix="bl"), [("X-Team", "blue")], 200),
        (header("x-team", prefix="bl"), [("X-Team", "red")], 403),
        (header("x-team", suffix="ue"), [("X-Team", "blue")], 200),
        (header("x-team", suffix="ue"), [("X-Team", "blues")], 403),
        (header("x-team", regex="b[a-z]+e"), [("X-Team", "blue")], 200),
        (header("x-team", regex="b[a-z]+e"), [("X-Team", "blue!")], 403),
        # Several values are joined with "," before matching, as Envoy does.
        (
            header("x-team", exact="blue,red"),
            [("X-Team", "blue"), ("X-Team", "red")],
            200,
        ),
        (header("x-team", exact="blue"), [("X-Team", "blue"), ("X-Team", "red")], 403),
        (header(":authority", exact="web.service.consul"), [], 200),
    ],
)
def test_header_rules(
    ca: CertificateFactory,
    rule: IntentionHTTPHeaderPermission,
    headers: list[tuple[str, str]],
    code: int,
) -> None:
    permission = allow(path_prefix="/", headers=(rule,))
    assert status(ca, l7("api", permission), "GET", "/", headers) == code


def test_all_parts_of_a_permission_must_match(ca: CertificateFactory) -> None:
    permission = allow(
        path_prefix="/api/",
        methods=("POST",),
        headers=(header("x-team", exact="blue"),),
    )
    conn = Web(ca, Echo(), [l7("api", permission)]).connect("api")
    blue = [("X-Team", "blue")]
    assert conn.request("POST", "/api/x", blue).code == 200
    assert conn.request("GET", "/api/x", blue).code == 403
    assert conn.request("POST", "/other", blue).code == 403
    assert conn.request("POST", "/api/x", [("X-Team", "red")]).code == 403


def test_the_first_matching_permission_decides(ca: CertificateFactory) -> None:
    intention = l7(
        "api",
        deny(path_prefix="/admin"),
        allow(path_prefix="/"),
    )
    conn = Web(ca, Echo(), [intention]).connect("api")
    assert conn.request("GET", "/admin/users").code == 403
    assert conn.request("GET", "/users").code == 200


def test_an_l4_intention_decides_every_request(ca: CertificateFactory) -> None:
    conn = Web(ca, Echo(), [l4("api", "allow")]).connect("api")
    assert [conn.request(m, p).code for m, p in [("GET", "/"), ("POST", "/x")]] == [
        200,
        200,
    ]


def test_each_source_gets_its_own_intention(ca: CertificateFactory) -> None:
    web = Web(
        ca,
        Echo(),
        [
            l7("api", allow(path_prefix="/api")),
            l7("billing", allow(path_prefix="/billing")),
        ],
    )
    api, billing = web.connect("api"), web.connect("billing")
    assert api.request("GET", "/api/1").code == 200
    assert api.request("GET", "/billing/1").code == 403
    assert billing.request("GET", "/billing/1").code == 200
    assert billing.request("GET", "/api/1").code == 403


# --- child traversal cannot get past the check -----------------------------------


def test_a_denied_request_is_not_traversed_into_the_wrapped_tree(
    ca: CertificateFactory,
) -> None:
    root, admin, public = tree()
    web = Web(ca, root, [l7("api", allow(path_prefix="/public"))])
    conn = web.connect("api")
    assert conn.request("GET", "/admin/keys").code == 403
    assert root.traversed == []
    assert admin.rendered == []
    assert conn.request("GET", "/public").code == 200
    assert root.traversed == [b"public"]
    assert public.rendered == [b"/public"]


def test_a_deep_path_is_decided_on_the_whole_path(ca: CertificateFactory) -> None:
    root, admin, _ = tree()
    web = Web(
        ca, root, [l7("api", deny(path_exact="/admin/keys"), allow(path_prefix="/"))]
    )
    conn = web.connect("api")
    assert conn.request("GET", "/admin/keys").code == 403
    assert admin.rendered == []
    # The same tree, a path the deny rule does not name: it is traversed.
    assert conn.request("GET", "/admin/other").code == 404


@pytest.mark.parametrize(
    "path",
    ["/adm%69n/keys", "/admin%2Fkeys", "/%61dmin/keys?x=1", "/admin/%6beys"],
)
def test_percent_encoding_cannot_dodge_a_rule(
    ca: CertificateFactory, path: str
) -> None:
    # twisted.web decodes each segment before routing, so the rules see the
    # decoded path: what the resource tree (and Klein) routes by.
    root, admin, _ = tree()
    web = Web(ca, root, [l7("api", deny(path_prefix="/admin"), allow(path_prefix="/"))])
    assert web.connect("api").request("GET", path).code == 403
    assert admin.rendered == []


def test_an_encoded_question_mark_cannot_end_the_path_early(
    ca: CertificateFactory,
) -> None:
    web = Web(
        ca, Echo(), [l7("api", deny(path_prefix="/x/admin"), allow(path_prefix="/"))]
    )
    with capturedLogs() as events:
        code = web.connect("api").request("GET", "/x%3F/admin").code
    decisions = [e["path"] for e in web_decisions(events)]
    # "/x?/admin" would be read as the path "/x" and a query: allowed.
    assert decisions == ["/x%3F/admin"]
    assert code == 200


def test_each_request_is_decided_exactly_once(ca: CertificateFactory) -> None:
    root, admin, _ = tree()
    intentions = [l7("api", allow(path_prefix="/"))]
    web = Web(ca, root, intentions)
    calls: list[tuple[str, str]] = []

    class Counting:
        service = "web"

        def decide_request(
            self,
            peer: Peer | ServiceIdentity,
            method: str | bytes,
            path: str | bytes,
            headers: HeadersLike,
        ) -> Decision:
            calls.append((str(method), str(path)))
            return web.intentions.decide_request(peer, method, path, headers)

    web.protected.authorizer = Counting()
    # A tree that leads back through the protector: still one decision.
    root.putChild(b"again", web.protected)
    conn = web.connect("api")
    assert conn.request("GET", "/admin/keys").code == 200
    assert conn.request("GET", "/again/public").code == 200
    assert calls == [("GET", "/admin/keys"), ("GET", "/again/public")]
    assert admin.rendered == [b"/admin/keys"]


def test_a_protected_subtree_is_decided_on_the_full_path(
    ca: CertificateFactory,
) -> None:
    echo = Echo()
    open_root = Resource()
    web = Web(ca, open_root, [l7("api", allow(path_prefix="/api/v1/"))])
    # protect() on a subtree mounted under an unprotected root.
    subtree = Resource()
    subtree.putChild(b"v1", echo)
    open_root.putChild(b"api", protect(subtree, web.intentions))
    web.protected.authorizer = _Allow()
    conn = web.connect("api")
    assert conn.request("GET", "/api/v1/users").code == 200
    assert conn.request("GET", "/api/v2/users").code == 403
    assert echo.rendered == [b"/api/v1/users"]


class _Allow:
    service = "web"

    def decide_request(self, *args: object) -> Decision:
        return Decision(True, "test: everything", "test")


def test_put_child_reaches_the_wrapped_resource(ca: CertificateFactory) -> None:
    echo = Echo()
    root = Resource()
    web = Web(
        ca, root, [l7("api", deny(path_prefix="/secret"), allow(path_prefix="/"))]
    )
    web.protected.putChild(b"secret", echo)
    web.protected.putChild(b"open", echo)
    conn = web.connect("api")
    assert conn.request("GET", "/secret").code == 403
    assert conn.request("GET", "/open").code == 200
    assert echo.rendered == [b"/open"]


# --- Klein -------------------------------------------------------------------------


def klein_app() -> Klein:
    app = Klein()

    @app.route("/hello")
    def hello(request: IRequest) -> str:
        return f"hello {peer_identity(request).service}"

    @app.route("/admin/<name>", methods=["GET", "POST"])
    def admin(request: IRequest, name: str) -> str:
        return f"admin {name}"

    return app


def test_a_klein_app_is_protected_in_one_line(ca: CertificateFactory) -> None:
    app = klein_app()
    intention = l7(
        "api",
        allow(path_exact="/hello", methods=("GET",)),
        allow(path_prefix="/admin/", headers=(header("x-role", exact="admin"),)),
    )
    web = Web(ca, app.resource(), [intention])
    conn = web.connect("api")
    hello = conn.request("GET", "/hello")
    assert (hello.code, hello.text) == (200, "hello api")
    assert conn.request("POST", "/hello").code == 403
    assert conn.request("GET", "/admin/alice").code == 403
    allowed = conn.request("GET", "/admin/alice", [("X-Role", "admin")])
    assert (allowed.code, allowed.text) == (200, "admin alice")
    # Klein routes the decoded path; so do the rules.
    assert conn.request("GET", "/%61dmin/alice").code == 403


# --- changes of intentions apply to the next request ------------------------------


def test_a_change_of_intentions_applies_to_the_next_request_without_restart(
    ca: CertificateFactory,
) -> None:
    web = Web(ca, Echo(), [l7("api", allow(path_prefix="/"))])
    conn = web.connect("api")
    assert conn.request("GET", "/orders").code == 200
    web.change([l7("api", deny(path_prefix="/orders"), allow(path_prefix="/"))])
    # The same connection, no restart: the next request meets the new rules.
    assert conn.request("GET", "/orders").code == 403
    assert conn.request("GET", "/items").code == 200
    web.change([l4("api", "deny")])
    # A connection-level deny closes the open connection itself (issue 15,
    # item 5): no request of it is answered any more.
    assert refused(conn)


def test_no_current_intentions_deny(ca: CertificateFactory) -> None:
    web = Web(ca, Echo(), [l4("api", "allow")])
    conn = web.connect("api")
    assert conn.request("GET", "/").code == 200
    web.intentions.stopService()
    assert conn.request("GET", "/").code == 403


# --- L7 intentions need per-request enforcement -------------------------------------


def refused(conn: Connection) -> bool:
    """The request got no answer: the server dropped the connection."""
    try:
        conn.request("GET", "/")
    except Exception:
        return True
    return False


def test_without_protect_an_l7_intention_refuses_the_connection(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    # An intention "api may only GET /public": a site that does not decide
    # each request must not serve api at all (as the agent's authorize API).
    echo = Echo()
    web = Web(ca, echo, [l7("api", allow(path_prefix="/public"))], wrap=False)
    conn = web.connect("api")
    assert refused(conn)
    assert echo.rendered == []
    [denial] = [
        e for e in logged if e.get("target") == "web" and e.get("allowed") is False
    ]
    assert "connect_native.web.protect()" in denial["reason"]


def test_without_protect_an_l4_intention_still_serves(ca: CertificateFactory) -> None:
    echo = Echo()
    web = Web(ca, echo, [l4("api", "allow")], wrap=False)
    assert web.connect("api").request("GET", "/x").code == 200
    assert echo.rendered == [b"/x"]


def test_behind_protect_an_l7_intention_is_decided_per_request(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    echo = Echo()
    web = Web(ca, echo, [l7("api", allow(path_prefix="/public"))])
    conn = web.connect("api")
    assert conn.request("GET", "/public/a").code == 200
    assert conn.request("DELETE", "/admin/users").code == 403
    assert echo.rendered == [b"/public/a"]
    [allowed] = [
        e
        for e in logged
        if e.get("target") == "web" and e.get("allowed") is True and "stage" in e
    ]
    assert "every request is decided" in allowed["reason"]


# --- the log -----------------------------------------------------------------------


def test_a_denial_is_logged_with_source_method_path_and_the_deciding_intention(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    web = Web(
        ca, Echo(), [l7("api", deny(path_prefix="/admin"), allow(path_prefix="/"))]
    )
    web.connect("api").request("DELETE", "/admin/users?token=secret")
    [event] = [e for e in web_decisions(logged) if not e["allowed"]]
    assert event["log_level"] == LogLevel.warn
    assert event["peer"] == ca.service_uri("api")
    assert event["method"] == "DELETE"
    assert event["path"] == "/admin/users"
    assert event["decision"] == "denied"
    assert re.match(
        r"Matched intention L7 default/api => default/web \(ID: id-api, "
        r"Precedence: 9\) permission 0 \(deny\) for DELETE /admin/users$",
        event["reason"],
    ), event["reason"]
    assert event["source"] == "intentions"
    assert "FakeAddress" in event["address"]  # iosim's peer address
    assert "secret" not in repr(event)


def test_an_allowed_request_is_logged_at_debug(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    web = Web(ca, Echo(), [l4("api", "allow")])
    web.connect("api").request("GET", "/x")
    [event] = web_decisions(logged)
    assert (event["log_level"], event["allowed"], event["path"]) == (
        LogLevel.debug,
        True,
        "/x",
    )


# --- failing closed ---------------------------------------------------------------


def test_an_authorizer_that_raises_denies(
    ca: CertificateFactory, logged: list[LogEvent]
) -> None:
    class Broken:
        service = "web"

        def decide_request(self, *args: object) -> Decision:
            raise RuntimeError("boom")

    echo = Echo()
    web = Web(ca, echo, [l4("api", "allow")], authorizer=Broken())
    assert web.connect("api").request("GET", "/").code == 403
    assert echo.rendered == []
    [event] = [e for e in web_decisions(logged) if "allowed" in e]
    assert event["reason"] == "deciding the request failed: boom"


def test_an_authorizer_answering_something_else_denies(ca: CertificateFactory) -> None:
    class Odd:
        def decide_request(self, *args: object) -> object:
            return True

    web = Web(ca, Echo(), [l4("api", "allow")], authorizer=Odd())
    assert web.connect("api").request("GET", "/").code == 403


def test_a_request_not_over_connect_is_denied(logged: list[LogEvent]) -> None:
    echo = Echo()
    protected = ConnectProtected(echo, _Allow())
    request = DummyRequest([b"x"])
    body = protected.render(request)
    assert (request.responseCode, body) == (403, FORBIDDEN_BODY)
    assert echo.rendered == []
    [event] = web_decisions(logged)
    assert event["peer"] == "(unverified peer)"
    assert "did not come over a verified Connect connection" in event["reason"]


def test_peer_identity_refuses_a_request_not_over_connect() -> None:
    with pytest.raises(NotAConnectConnection, match="not a Connect TLS connection"):
        peer_identity(DummyRequest([b""]))
    with pytest.raises(NotAConnectConnection):
        request_peer(DummyRequest([b""]))


def test_request_peer_carries_the_certificate_serial(ca: CertificateFactory) -> None:
    seen: list[Peer] = []

    class Record(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:
            seen.append(request_peer(request))
            return b""

    Web(ca, Record(), [l4("api", "allow")]).connect("api").request("GET", "/")
    [peer] = seen
    assert peer.identity.service == "api"
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2})*", peer.serial)


def test_an_authorizer_without_decide_request_is_refused(
    ca: CertificateFactory,
) -> None:
    agent = AgentAuthorizer(None, MemoryReactorClock())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AgentAuthorizer cannot decide HTTP requests"):
        protect(Resource(), agent)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="IntentionAuthorizer"):
        ConnectProtected(Resource(), object())  # type: ignore[arg-type]


def test_only_resources_are_protected() -> None:
    with pytest.raises(TypeError, match="not str"):
        protect("/", _Allow())  # type: ignore[arg-type]


def test_the_service_for_the_logs_defaults_to_the_authorizers() -> None:
    assert protect(Resource(), _Allow()).service == "web"
    assert protect(Resource(), _Allow(), service="other").service == "other"


# --- the path the rules see ----------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (b"/", "/"),
        (b"/a/b/", "/a/b/"),
        (b"/a%2Fb?x=%2F", "/a/b?x=%2F"),
        (b"/caf%C3%A9", "/café"),
        (b"/x%3Fy%23z", "/x%3Fy%23z"),
    ],
)
def test_routed_path_is_what_twisted_web_routes(uri: bytes, expected: str) -> None:
    request = DummyRequest([])
    request.uri = uri
    request.path = uri.split(b"?")[0]
    from urllib.parse import unquote_to_bytes

    request.postpath = [unquote_to_bytes(s) for s in request.path[1:].split(b"/")]
    assert routed_path(request) == expected
