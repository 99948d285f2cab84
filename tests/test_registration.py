"""
Registration on a Clock, against the development agent in memory
(``StubTreq(DevAgent(clock).resource())``): what is registered, the TTL check
following the certificate manager's state, refreshes within the TTL,
registering again after the agent forgot us, back-off on agent errors, and
deregistration on stop.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from connect_native.certs import CertManager, ManagerState, StateChange
from connect_native.consul.client import ConsulClient
from connect_native.devagent import DevAgent
from connect_native.registration import Registration, check_for_state

BASE = "http://127.0.0.1:8500"
TOKEN = "6d1bd8b3-secret-token-never-logged"


class FakeReadiness:
    """A certificate manager's observable state, set by the test."""

    def __init__(
        self, state: ManagerState = ManagerState.STARTING, reason: str = "waiting"
    ) -> None:
        self.state = state
        self.reason = reason
        self.subscribers: list[Callable[[StateChange], object]] = []

    def subscribe(
        self, callback: Callable[[StateChange], object]
    ) -> Callable[[], None]:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)

    def set(self, state: ManagerState, reason: str) -> None:
        change = StateChange(state=state, reason=reason, previous=self.state)
        self.state, self.reason = state, reason
        for callback in list(self.subscribers):
            callback(change)


class Switch(Resource):
    """
    In front of the agent: counts requests, and can answer with an error or
    not at all instead of passing them on.
    """

    isLeaf = True

    def __init__(self, clock: Clock, target: Resource) -> None:
        super().__init__()
        self.clock = clock
        self.target = target
        self.times: list[float] = []
        self.error: tuple[int, bytes] | None = None
        self.hang = False
        self.hold = False
        self.held: list[Request] = []
        self.requests: list[tuple[str, str]] = []

    def render(self, request: Request) -> bytes | int:
        self.requests.append((request.method.decode(), unquote(request.path.decode())))
        self.times.append(self.clock.seconds())
        if self.hang:
            return NOT_DONE_YET
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        if self.error is not None:
            request.setResponseCode(self.error[0])
            return self.error[1]
        result: bytes | int = self.target.render(request)
        return result

    def release(self) -> None:
        """Pass the held requests on, and stop holding."""
        self.hold = False
        held, self.held = self.held, []
        for request in held:
            result = self.target.render(request)
            if result != NOT_DONE_YET:
                assert isinstance(result, bytes)
                request.write(result)
                request.finish()


class World:
    """A dev agent on a Clock at wall-clock time, a client, a fake manager."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.agent = DevAgent(self.clock, rng=random.Random(1))
        self.switch = Switch(self.clock, self.agent.resource())
        self.stub = StubTreq(self.switch)
        self.client = ConsulClient(
            self.clock, http_client=self.stub, token=TOKEN, timeout=5.0
        )
        self.readiness = FakeReadiness()

    def registration(self, **kwargs: Any) -> Registration:
        settings: dict[str, Any] = {
            "service": "web",
            "port": 8443,
            "hostname": "host1",
            "rng": random.Random(2),
        }
        settings.update(kwargs)
        return Registration(self.clock, self.client, self.readiness, **settings)

    def flush(self) -> None:
        self.stub.flush()

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Let ``seconds`` pass in steps, answering requests as they come."""
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step
            self.flush()

    def get(self, path: str) -> Any:
        d = self.stub.get(BASE + path)
        self.flush()
        response = self.successful(d)
        assert response.code == 200, path
        body = self.stub.content(response)
        self.flush()
        return json.loads(self.successful(body))

    def put(self, path: str) -> None:
        d = self.stub.put(BASE + path)
        self.flush()
        assert self.successful(d).code == 200

    @staticmethod
    def successful(d: Deferred[Any]) -> Any:
        results: list[Any] = []
        d.addBoth(results.append)
        assert results, "no answer"
        assert not hasattr(results[0], "raiseException"), results[0]
        return results[0]

    def services(self) -> dict[str, Any]:
        services: dict[str, Any] = self.get("/v1/agent/services")
        return services

    def checks(self) -> dict[str, Any]:
        checks: dict[str, Any] = self.get("/v1/agent/checks")
        return checks

    def passing_instances(self, service: str) -> list[str]:
        entries = self.get(f"/v1/health/connect/{service}?passing=1")
        return [entry["Service"]["ID"] for entry in entries]

    def ready(self, reason: str = "serving spiffe://x/web, serial 1f") -> None:
        self.readiness.set(ManagerState.READY, reason)
        self.flush()


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def started(world: World, **kwargs: Any) -> Registration:
    registration = world.registration(**kwargs)
    registration.startService()
    world.flush()
    return registration


# -- what is registered ---------------------------------------------------------


def test_registers_a_connect_native_service_with_port_tags_meta_address(
    world: World,
) -> None:
    started(world, address="10.0.0.7", tags=["blue", "v2"], meta={"version": "2.1"})
    service = world.services()["web-host1-8443"]
    assert service["Service"] == "web"
    assert service["Port"] == 8443
    assert service["Connect"] == {"Native": True}
    assert service["Address"] == "10.0.0.7"
    assert service["Tags"] == ["blue", "v2"]
    assert service["Meta"] == {"version": "2.1"}


def test_registers_a_ttl_check_on_the_instance(world: World) -> None:
    started(world)
    check = world.checks()["web-host1-8443:ttl"]
    assert check["ServiceID"] == "web-host1-8443"
    assert check["ServiceName"] == "web"
    assert check["Type"] == "ttl"


def test_service_id_defaults_to_service_host_name_and_port(world: World) -> None:
    registration = world.registration(hostname="box-7", port=9443)
    assert registration.service_id == "web-box-7-9443"
    assert registration.check_id == "web-box-7-9443:ttl"
    assert world.registration(service_id="web-a").check_id == "web-a:ttl"


@implementer(IListeningPort)
class FakeListeningPort:
    def __init__(self, host: str, port: int) -> None:
        self.address = IPv4Address("TCP", host, port)

    def getHost(self) -> IPv4Address:
        return self.address

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        pass


def test_learns_port_and_bound_address_from_a_listening_port(world: World) -> None:
    started(world, port=FakeListeningPort("127.0.0.1", 40123))
    service = world.services()["web-host1-40123"]
    assert (service["Port"], service["Address"]) == (40123, "127.0.0.1")


def test_a_wildcard_listening_address_leaves_the_address_to_the_agent(
    world: World,
) -> None:
    registration = world.registration(port=FakeListeningPort("0.0.0.0", 40124))
    assert registration.registration().address is None
    assert registration.registration().port == 40124


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"port": 0}, "port"),
        ({"port": "8443"}, "port"),
        ({"service": ""}, "service"),
        ({"check_ttl": 0}, "check_ttl"),
        ({"check_ttl": 10, "refresh_interval": 10}, "refresh_interval"),
        ({"degraded_status": "ok"}, "degraded_status"),
        ({"backoff_initial": 5, "backoff_max": 1}, "backoff_max"),
        ({"stop_timeout": float("inf")}, "stop_timeout"),
        ({"tags": "blue"}, "tags"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(
    world: World, kwargs: dict[str, Any], names: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=names):
        world.registration(**kwargs)


# -- the check follows the certificate manager ----------------------------------


def test_check_is_critical_with_the_reason_before_the_manager_is_ready(
    world: World,
) -> None:
    world.readiness.reason = "waiting for the leaf certificate for 'web'"
    started(world)
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "critical"
    assert "waiting for the leaf certificate for 'web'" in check["Output"]
    assert world.passing_instances("web") == []


def test_check_passes_once_the_manager_is_ready(world: World) -> None:
    started(world)
    world.ready("serving spiffe://td/ns/default/dc/dc1/svc/web serial 2a")
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "passing"
    assert check["Output"] == "serving spiffe://td/ns/default/dc/dc1/svc/web serial 2a"
    assert world.passing_instances("web") == ["web-host1-8443"]


def test_an_instance_registered_when_ready_passes_at_once(world: World) -> None:
    world.readiness.state = ManagerState.READY
    started(world)
    assert world.checks()["web-host1-8443:ttl"]["Status"] == "passing"


def test_check_fails_with_the_reason_when_the_certificate_expires(
    world: World,
) -> None:
    started(world)
    world.ready()
    world.readiness.set(
        ManagerState.EXPIRED, "the certificate for 'web' expired at 2030-01-01"
    )
    world.flush()
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "critical"
    assert "the certificate for 'web' expired at 2030-01-01" in check["Output"]
    assert world.passing_instances("web") == []


def test_degraded_stays_passing_with_the_reason_by_default(world: World) -> None:
    started(world)
    world.ready()
    world.readiness.set(ManagerState.DEGRADED, "leaf: agent unreachable")
    world.flush()
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "passing"
    assert "leaf: agent unreachable" in check["Output"]


def test_degraded_status_can_be_warning(world: World) -> None:
    started(world, degraded_status="warning")
    world.ready()
    world.readiness.set(ManagerState.DEGRADED, "leaf: agent unreachable")
    world.flush()
    check = world.checks()["web-host1-8443:ttl"]
    assert (check["Status"], "leaf: agent unreachable" in check["Output"]) == (
        "warning",
        True,
    )


def test_back_to_ready_passes_again(world: World) -> None:
    started(world)
    world.readiness.set(ManagerState.EXPIRED, "expired")
    world.flush()
    world.ready("renewed")
    assert world.checks()["web-host1-8443:ttl"]["Status"] == "passing"


def test_check_for_state_table() -> None:
    assert check_for_state(ManagerState.READY, "r") == ("passing", "r")
    assert check_for_state(ManagerState.DEGRADED, "r")[0] == "passing"
    assert check_for_state(ManagerState.DEGRADED, "r", "critical")[0] == "critical"
    for state in (ManagerState.STARTING, ManagerState.EXPIRED, ManagerState.STOPPED):
        status, output = check_for_state(state, "the reason")
        assert status == "critical"
        assert "the reason" in output


def test_ttl_refresh_keeps_the_check_passing_past_many_ttls(world: World) -> None:
    started(world, check_ttl=30)
    world.ready()
    world.advance(300)
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "passing"
    assert world.passing_instances("web") == ["web-host1-8443"]


def test_refreshes_every_refresh_interval(world: World) -> None:
    started(world, check_ttl=30, refresh_interval=5)
    world.ready()
    before = len(world.switch.requests)
    world.advance(50)
    updates = world.switch.requests[before:]
    assert updates == [("PUT", "/v1/agent/check/update/web-host1-8443:ttl")] * 10


def test_a_real_cert_manager_on_the_dev_agent_makes_the_check_pass(
    world: World,
) -> None:
    manager = CertManager(world.clock, world.client, "web")
    registration = Registration(
        world.clock, world.client, manager, "web", 8443, hostname="host1"
    )
    manager.startService()
    registration.startService()
    world.advance(3)
    assert manager.state is ManagerState.READY
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "passing"
    assert "spiffe://" in check["Output"]
    registration.stopService()
    manager.stopService()
    world.flush()


# -- the agent forgets us ---------------------------------------------------------


def test_registers_again_after_deregistration_behind_its_back(world: World) -> None:
    registration = started(world, check_ttl=30, tags=["blue"])
    world.ready()
    world.put("/v1/agent/service/deregister/web-host1-8443")
    assert "web-host1-8443" not in world.services()
    world.advance(10)
    assert world.services()["web-host1-8443"]["Tags"] == ["blue"]
    assert world.checks()["web-host1-8443:ttl"]["Status"] == "passing"
    assert registration.registered


def test_registers_again_with_a_fresh_agent(world: World) -> None:
    started(world, check_ttl=30)
    world.ready()
    fresh = DevAgent(world.clock, rng=random.Random(3))
    world.switch.target = fresh.resource()
    world.agent = fresh
    world.advance(10)
    assert world.checks()["web-host1-8443:ttl"]["Status"] == "passing"
    assert world.passing_instances("web") == ["web-host1-8443"]


def test_a_404_unknown_check_from_a_newer_agent_means_forgotten(
    world: World,
) -> None:
    started(world, check_ttl=30)
    world.ready()
    world.agent.deregister_service("web-host1-8443")
    world.switch.error = (
        404,
        b'Unknown check ID "web-host1-8443:ttl". Ensure that the check ID is '
        b"passed, not the check name.",
    )
    world.advance(10)
    register = ("PUT", "/v1/agent/service/register")
    assert register in world.switch.requests[-3:]
    world.switch.error = None
    world.advance(5)
    assert "web-host1-8443" in world.services()


def test_forgotten_at_once_again_is_retried_with_back_off(world: World) -> None:
    # An agent that takes registrations and forgets them: no busy loop.
    started(world, check_ttl=30, backoff_initial=1, backoff_max=8)
    world.ready()

    class Forgetful(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes:
            if request.path.startswith(b"/v1/agent/check/"):
                request.setResponseCode(500)
                return b'CheckID "web-host1-8443:ttl" does not have associated TTL'
            return b""

    world.switch.target = Forgetful()
    before = len(world.switch.requests)
    world.advance(60, step=0.25)
    attempts = len(world.switch.requests) - before
    assert 4 <= attempts <= 30


# -- agent errors ------------------------------------------------------------------


def test_agent_errors_back_off_then_recover(
    world: World, logged: list[LogEvent]
) -> None:
    world.switch.error = (503, b"rpc error: No cluster leader")
    started(world, backoff_initial=1, backoff_max=16)
    world.advance(120, step=0.25)
    attempts = len(world.switch.requests)
    # 1, 2, 4, 8, 16, 16 ... (each halved at most by the jitter): far fewer
    # than one a second, and never fewer than the cap allows.
    assert 8 <= attempts <= 20
    times = world.switch.times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] <= 1.0
    assert all(8.0 <= gap <= 16.25 for gap in gaps[-3:])
    messages = [formatEvent(e) for e in logged]
    assert any("No cluster leader" in m and "register" in m for m in messages)
    world.switch.error = None
    world.readiness.set(ManagerState.READY, "ready now")
    world.advance(17)
    assert world.checks()["web-host1-8443:ttl"]["Status"] == "passing"


def test_tokens_are_never_logged(world: World, logged: list[LogEvent]) -> None:
    world.switch.error = (403, b"Permission denied")
    registration = started(world)
    world.advance(5)
    registration.stopService()
    world.flush()
    messages = [formatEvent(e) for e in logged]
    assert any("Permission denied" in m for m in messages)
    assert not any(TOKEN in m for m in messages)
    assert not any(TOKEN in repr(e) for e in logged)


def test_a_silent_agent_is_given_up_on_and_retried(world: World) -> None:
    world.switch.hang = True
    started(world, request_timeout=3, backoff_initial=1, backoff_max=1)
    world.advance(2)
    assert len(world.switch.requests) == 1
    world.switch.hang = False
    world.advance(6)
    assert "web-host1-8443" in world.services()


def test_a_change_while_an_update_is_in_flight_is_sent_when_it_returns(
    world: World,
) -> None:
    started(world)
    world.switch.hold = True
    world.readiness.set(ManagerState.READY, "ready")
    world.flush()
    assert len(world.switch.held) == 1  # in flight, unanswered
    world.readiness.set(ManagerState.EXPIRED, "expired meanwhile")
    world.flush()
    assert len(world.switch.held) == 1  # one request at a time
    world.switch.release()
    world.flush()
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "critical"
    assert "expired meanwhile" in check["Output"]
    updates = [r for r in world.switch.requests if "/check/update/" in r[1]]
    assert len(updates) == 3  # after registering, then one per change


def test_a_change_while_the_agent_hangs_is_sent_after_the_timeout(
    world: World,
) -> None:
    started(world)
    world.ready("first")
    world.switch.hang = True
    world.advance(11)  # a refresh is now waiting for the agent
    world.switch.hang = False
    world.readiness.set(ManagerState.EXPIRED, "expired meanwhile")
    world.advance(15)  # the held request times out and the latest state goes
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "critical"
    assert "expired meanwhile" in check["Output"]


# -- stopping ------------------------------------------------------------------------


def test_stop_deregisters(world: World) -> None:
    registration = started(world)
    world.ready()
    d = registration.stopService()
    world.flush()
    assert world.successful(d) is None
    assert "web-host1-8443" not in world.services()
    assert "web-host1-8443:ttl" not in world.checks()


def test_stop_is_bounded_when_the_agent_does_not_answer(
    world: World, logged: list[LogEvent]
) -> None:
    registration = started(world, stop_timeout=2)
    world.ready()
    world.switch.hang = True
    d = registration.stopService()
    results: list[object] = []
    d.addBoth(results.append)
    world.clock.advance(1.9)
    assert results == []
    world.clock.advance(0.2)
    assert results == [None]
    assert any("could not deregister web-host1-8443" in formatEvent(e) for e in logged)


def test_nothing_is_sent_after_stop(world: World) -> None:
    registration = started(world)
    world.ready()
    registration.stopService()
    world.flush()
    count = len(world.switch.requests)
    world.readiness.set(ManagerState.EXPIRED, "late")
    world.advance(100)
    assert len(world.switch.requests) == count
    assert world.readiness.subscribers == []


def test_start_after_stop_registers_again(world: World) -> None:
    registration = started(world)
    world.ready()
    registration.stopService()
    world.flush()
    registration.startService()
    world.flush()
    assert world.checks()["web-host1-8443:ttl"]["Status"] == "passing"


class RaisingClient:
    """A client whose every call raises before returning a Deferred."""

    calls = 0

    def _boom(self, *args: object) -> Deferred[None]:
        self.calls += 1
        raise RuntimeError("boom")

    register_service = deregister_service = check_update = _boom


def test_a_client_that_raises_is_retried_and_stop_still_fires(
    world: World, logged: list[LogEvent]
) -> None:
    client = RaisingClient()
    registration = Registration(
        world.clock, client, world.readiness, "web", 8443, hostname="host1"
    )
    registration.startService()
    world.clock.advance(10)
    assert client.calls > 1
    d = registration.stopService()
    assert world.successful(d) is None
    assert any("boom" in formatEvent(e) for e in logged)


# -- the backend (issue 17, item 4) -----------------------------------------------


class FakeBackend:
    """A backend's health as a probe would report it, set by the test."""

    def __init__(self, healthy: bool = True, reason: str = "tcp:b:1 answers") -> None:
        self.healthy = healthy
        self.reason = reason
        self.subscribers: list[Callable[[], object]] = []

    def subscribe(self, callback: Callable[[], object]) -> Callable[[], None]:
        self.subscribers.append(callback)
        return lambda: self.subscribers.remove(callback)

    def set(self, healthy: bool, reason: str) -> None:
        self.healthy, self.reason = healthy, reason
        for callback in list(self.subscribers):
            callback()


def test_a_backend_that_goes_down_makes_the_check_critical_at_once(
    world: World,
) -> None:
    backend = FakeBackend()
    started(world, backend=backend)
    world.ready()
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "passing"
    assert check["Output"].endswith("; backend: tcp:b:1 answers")
    assert world.passing_instances("web") == ["web-host1-8443"]

    backend.set(False, "tcp:b:1 unreachable: Connection refused")
    world.flush()
    check = world.checks()["web-host1-8443:ttl"]
    assert check["Status"] == "critical"
    assert check["Output"].startswith(
        "not accepting connections: the backend: tcp:b:1 unreachable: "
        "Connection refused (certificate: serving"
    )
    assert world.passing_instances("web") == []

    backend.set(True, "tcp:b:1 answers")
    world.flush()
    assert world.checks()["web-host1-8443:ttl"]["Status"] == "passing"
    assert world.passing_instances("web") == ["web-host1-8443"]


def test_a_down_backend_is_registered_critical_and_stays_so_on_refresh(
    world: World,
) -> None:
    backend = FakeBackend(False, "tcp:b:1 not probed yet")
    world.readiness.set(ManagerState.READY, "serving")
    registration = started(world, backend=backend)
    assert world.checks()["web-host1-8443:ttl"]["Status"] == "critical"
    world.advance(3 * registration.refresh_interval)
    assert world.checks()["web-host1-8443:ttl"]["Status"] == "critical"
    assert (
        "Connect certificate and backend"
        in (world.checks()["web-host1-8443:ttl"]["Name"])
    )


def test_no_certificate_and_no_backend_says_both(world: World) -> None:
    backend = FakeBackend(False, "tcp:b:1 unreachable: timeout")
    world.readiness.reason = "waiting for the leaf certificate"
    started(world, backend=backend)
    output = world.checks()["web-host1-8443:ttl"]["Output"]
    assert "waiting for the leaf certificate" in output
    assert output.endswith("; and the backend: tcp:b:1 unreachable: timeout")


def test_stop_unsubscribes_from_the_backend(world: World) -> None:
    backend = FakeBackend()
    registration = started(world, backend=backend)
    assert len(backend.subscribers) == 1
    registration.stopService()
    world.flush()
    assert backend.subscribers == []


def test_deregister_critical_after_is_registered_with_the_check(
    world: World,
) -> None:
    registration = world.registration(deregister_critical_after=600.0)
    (check,) = registration.registration().checks
    assert check.to_json()["DeregisterCriticalServiceAfter"] == "600s"
