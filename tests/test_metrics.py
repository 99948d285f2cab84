"""
Tests for connect_native.metrics and connect_native.status: what the server
endpoint counts (in memory, over tests.test_server's harness), a service's
metrics and its status resource, and the agent client's error hook.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from connect_native.consul.client import ConsulClient
from connect_native.consul.errors import ConsulError
from connect_native.metrics import REFUSAL_REASONS, ServiceMetrics
from connect_native.service import ConnectService
from connect_native.testing import CertificateFactory, FakeAuthorizer
from connect_native.testing.fakes import FakeBundleSource, make_bundle
from tests.test_server import (  # noqa: F401 (the fixture)
    Harness,
    StaticSource,
    bundle,
    over_each_tls_transport,
)


@pytest.fixture(scope="module")
def ca() -> CertificateFactory:
    return CertificateFactory()


def samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple[Any, ...]], float]:
    """Every sample, parsed back from the text format, by (name, labels)."""
    text = generate_latest(metrics.registry).decode("utf-8")
    out: dict[tuple[str, tuple[Any, ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def connections(metrics: ServiceMetrics, outcome: str, reason: str) -> float:
    key = (
        "connect_native_connections_total",
        (("outcome", outcome), ("reason", reason), ("service", "web")),
    )
    return samples(metrics)[key]


def listening(ca: CertificateFactory, authorizer: Any, **options: Any) -> Harness:
    h = Harness(ca, authorizer, StaticSource(bundle(ca, ca.leaf("web"))))
    h.listen(**options)
    assert h.port is not None
    return h


# -- what the server endpoint counts ------------------------------------------


def test_an_allowed_connection_is_counted_open_and_timed(
    ca: CertificateFactory,
) -> None:
    metrics = ServiceMetrics("web")
    h = listening(ca, FakeAuthorizer({"api"}), metrics=metrics)
    conn = h.connect([b"ping"])
    assert h.apps.built

    assert connections(metrics, "allowed", "authorized") == 1
    assert metrics.open_connections() == 1
    seen = samples(metrics)
    assert seen[("connect_native_open_connections", ())] == 1
    assert seen[("connect_native_handshake_seconds_count", ())] == 1
    assert seen[("connect_native_authorization_seconds_count", ())] == 1
    for reason in REFUSAL_REASONS:
        assert connections(metrics, "refused", reason) == 0

    conn.client.loseConnection()
    conn.pump.flush()
    assert not conn.server.connected
    assert metrics.open_connections() == 0


def test_a_denied_connection_is_counted_refused(ca: CertificateFactory) -> None:
    metrics = ServiceMetrics("web")
    h = listening(ca, FakeAuthorizer(set()), metrics=metrics)
    h.connect([b"let me in"])
    assert h.apps.built == []
    assert connections(metrics, "refused", "denied") == 1
    assert connections(metrics, "allowed", "authorized") == 0
    assert metrics.open_connections() == 0
    assert samples(metrics)[("connect_native_authorization_seconds_count", ())] == 1


def test_an_authorizer_that_does_not_answer_is_a_timeout_refusal(
    ca: CertificateFactory,
) -> None:
    metrics = ServiceMetrics("web")
    authorizer = FakeAuthorizer({"api"}, hold=True)
    h = listening(ca, authorizer, metrics=metrics, authorize_timeout=2)
    h.connect()
    h.reactor.advance(2)
    assert connections(metrics, "refused", "authorizer_timeout") == 1
    key = ("connect_native_authorization_seconds_bucket", (("le", "2.5"),))
    assert samples(metrics)[key] == 1


def test_a_silent_client_is_a_handshake_timeout_refusal(
    ca: CertificateFactory,
) -> None:
    metrics = ServiceMetrics("web")
    h = listening(ca, FakeAuthorizer({"api"}), metrics=metrics, handshake_timeout=5)
    assert h.silent() is not None
    h.reactor.advance(5)
    assert connections(metrics, "refused", "handshake_timeout") == 1
    assert samples(metrics)[("connect_native_handshake_seconds_count", ())] == 0


def test_a_certificate_from_another_ca_is_a_certificate_refusal(
    ca: CertificateFactory,
) -> None:
    metrics = ServiceMetrics("web")
    h = listening(ca, FakeAuthorizer({"api"}), metrics=metrics)
    other = ca.another_ca()
    h.connect(client_leaf=other.leaf("api"), client_ca=other)
    assert connections(metrics, "refused", "certificate") == 1
    assert connections(metrics, "allowed", "authorized") == 0


def test_an_unknown_refusal_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="reason must be one of denied"):
        ServiceMetrics("web").refused("because")


def test_an_endpoint_without_metrics_counts_nothing(ca: CertificateFactory) -> None:
    h = listening(ca, FakeAuthorizer({"api"}))
    h.connect([b"ping"])
    assert h.apps.built  # and nothing raised on the way


# -- a service's metrics ----------------------------------------------------


def test_each_service_has_its_own_registry_and_its_endpoints_count_there(
    ca: CertificateFactory,
) -> None:
    reactor = MemoryReactorClock()
    source = FakeBundleSource(make_bundle(ca, "web"))
    web = ConnectService(
        reactor, "web", identity=source, authorizer=FakeAuthorizer({"api"})
    )
    other = ConnectService(reactor, "web", identity=FakeBundleSource())
    assert web.metrics is web.metrics
    assert web.metrics.registry is not other.metrics.registry

    listener = TCP4ServerEndpoint(reactor, 8443)
    assert web.server_endpoint(listener)._metrics is web.metrics
    explicit = ServiceMetrics("web")
    assert web.server_endpoint(listener, metrics=explicit)._metrics is explicit


def test_the_expiry_gauge_is_the_current_certificates_not_after(
    ca: CertificateFactory,
) -> None:
    source = FakeBundleSource()
    web = ConnectService(MemoryReactorClock(), "web", identity=source)
    web.startService()
    key = ("connect_native_certificate_expiry_timestamp_seconds", ())
    assert key not in samples(web.metrics)
    issued = make_bundle(ca, "web")
    source.set(issued)
    assert samples(web.metrics)[key] == issued.not_after


def test_the_forwarded_bytes_are_a_counter_by_direction() -> None:
    metrics = ServiceMetrics("web")
    metrics.bytes.received += 10
    metrics.bytes.sent += 3
    seen = samples(metrics)
    assert seen[("connect_native_bytes_total", (("direction", "in"),))] == 10
    assert seen[("connect_native_bytes_total", (("direction", "out"),))] == 3


# -- the agent's errors -------------------------------------------------------


class Failing(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(500)
        return b"rpc error: no leader"


def test_the_client_tells_its_observers_of_each_failed_request() -> None:
    client = ConsulClient(Clock(), http_client=StubTreq(Failing()))
    seen: list[ConsulError] = []
    stop = client.observe_errors(seen.append)
    failed: list[Failure] = []
    client.agent_ca_roots().addErrback(failed.append)
    assert len(seen) == 1
    assert failed[0].value is seen[0]
    stop()
    client.agent_ca_roots().addErrback(failed.append)
    assert len(seen) == 1
    assert len(failed) == 2


def test_a_running_service_counts_its_clients_errors() -> None:
    client = ConsulClient(Clock(), http_client=StubTreq(Failing()))
    web = ConnectService(
        MemoryReactorClock(), "web", consul=client, identity=FakeBundleSource()
    )
    metrics = web.metrics
    web.startService()
    client.agent_ca_roots().addErrback(lambda _: None)
    web.stopService()
    client.agent_ca_roots().addErrback(lambda _: None)
    assert samples(metrics)[("connect_native_consul_errors_total", ())] == 1


# -- the status resource ------------------------------------------------------


def get(resource: Resource, path: str) -> tuple[int, str, Any]:
    stub = StubTreq(resource)
    d = stub.get(f"http://admin.invalid{path}")
    stub.flush()
    response = d.result
    body = stub.content(response)
    stub.flush()
    return response.code, body.result.decode("utf-8"), response.headers


def ready_web(ca: CertificateFactory, **kwargs: Any) -> ConnectService:
    web = ConnectService(
        MemoryReactorClock(),
        "web",
        identity=FakeBundleSource(make_bundle(ca, "web")),
        authorizer=FakeAuthorizer({"api"}),
        **kwargs,
    )
    web.startService()
    return web


def test_ready_is_503_with_the_reason_until_a_certificate_is_in_use(
    ca: CertificateFactory,
) -> None:
    source = FakeBundleSource()
    web = ConnectService(MemoryReactorClock(), "web", identity=source)
    page = web.status_resource()
    code, body, _ = get(page, "/ready")
    assert code == 503
    assert body.startswith("not ready: no certificate in use (state stopped)")
    web.startService()
    source.set(make_bundle(ca, "web"))
    assert get(page, "/ready")[:2] == (200, "ready\n")


def test_ready_waits_for_its_checks_and_gives_their_reason(
    ca: CertificateFactory,
) -> None:
    web = ready_web(ca)
    answers: list[Deferred[str | None]] = []

    def backend() -> Deferred[str | None]:
        answers.append(Deferred())
        return answers[-1]

    page = web.status_resource(checks=[lambda: None, backend])
    stub = StubTreq(page)
    responses: list[Any] = []
    stub.get("http://admin.invalid/ready").addCallback(responses.append)
    stub.flush()
    assert responses == []
    answers[0].callback("cannot reach tcp:127.0.0.1:8080: connection refused")
    stub.flush()
    [response] = responses
    assert response.code == 503
    body = stub.content(response)
    stub.flush()
    assert body.result == (
        b"not ready: cannot reach tcp:127.0.0.1:8080: connection refused\n"
    )


def test_ready_gives_up_on_a_check_that_does_not_answer(
    ca: CertificateFactory,
) -> None:
    web = ready_web(ca)
    hung: list[Deferred[None]] = []
    page = web.status_resource(checks=[lambda: hung.append(Deferred()) or hung[-1]])
    stub = StubTreq(page)
    responses: list[Any] = []
    stub.get("http://admin.invalid/ready").addCallback(responses.append)
    stub.flush()
    assert responses == []
    web.reactor.advance(4.9)
    stub.flush()
    assert responses == []
    web.reactor.advance(0.1)
    stub.flush()
    assert [r.code for r in responses] == [503]
    assert hung[0].called  # cancelled
    hung[0].addErrback(lambda _: None)


def test_status_is_json_with_the_certificate_roots_and_authorizer(
    ca: CertificateFactory,
) -> None:
    web = ready_web(ca)
    code, body, headers = get(web.status_resource(), "/status")
    assert code == 200
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    status = json.loads(body)
    issued = web.identity.current()
    assert issued is not None
    assert status["service"] == "web"
    assert status["state"] == "ready"
    assert status["certificate_ready"] is True
    assert status["certificate"]["uri"] == ca.service_uri("web")
    assert status["certificate"]["serial"] == ":".join(
        f"{b:02x}"
        for b in issued.leaf.serial_number.to_bytes(
            (issued.leaf.serial_number.bit_length() + 7) // 8, "big"
        )
    )
    assert status["trust_domain"] == ca.trust_domain
    assert len(status["roots"]) == 1
    assert status["authorizer"]["type"] == "FakeAuthorizer"
    assert status["open_connections"] == 0


def test_metrics_is_the_text_format_of_the_services_registry(
    ca: CertificateFactory,
) -> None:
    web = ready_web(ca)
    web.metrics.refused("denied")
    code, body, headers = get(web.status_resource(), "/metrics")
    assert code == 200
    [kind] = headers.getRawHeaders(b"content-type")
    assert kind.startswith(b"text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {
        "connect_native_connections",
        "connect_native_open_connections",
        "connect_native_handshake_seconds",
        "connect_native_authorization_seconds",
        "connect_native_certificate_expiry_timestamp_seconds",
        "connect_native_bytes",
        "connect_native_consul_errors",
    } <= names


def test_the_resource_mounts_under_a_path_of_a_twisted_web_tree(
    ca: CertificateFactory,
) -> None:
    root = Resource()
    root.putChild(b"admin", ready_web(ca).status_resource())
    assert get(root, "/admin/ready")[:2] == (200, "ready\n")
    assert get(root, "/admin/")[0] == 200
    assert get(root, "/admin/nothing")[0] == 404


def test_the_resource_mounts_in_a_klein_app(ca: CertificateFactory) -> None:
    klein = pytest.importorskip("klein")
    app = klein.Klein()
    page = ready_web(ca).status_resource()

    @app.route("/admin", branch=True)
    def admin(request: Any) -> Any:
        return page

    assert get(app.resource(), "/admin/ready")[:2] == (200, "ready\n")
    assert get(app.resource(), "/admin/status")[0] == 200


def test_a_client_going_away_stops_the_wait_and_the_checks(
    ca: CertificateFactory,
) -> None:
    web = ready_web(ca)
    hung: list[Deferred[None]] = []
    page = web.status_resource(checks=[lambda: hung.append(Deferred()) or hung[-1]])
    waiting = page.ready()
    assert not waiting.called
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    assert hung[0].called  # cancelled
    hung[0].addErrback(lambda _: None)
    assert web.reactor.getDelayedCalls() == []


def test_status_says_why_there_is_no_default_authorizer(
    ca: CertificateFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "ftp://nowhere")
    web = ConnectService(
        MemoryReactorClock(), "web", identity=FakeBundleSource(make_bundle(ca, "web"))
    )
    code, body, _ = get(web.status_resource(), "/status")
    assert code == 200
    authorizer = json.loads(body)["authorizer"]
    assert authorizer["type"] is None
    assert "ftp" in authorizer["error"]
