"""
Tests for ``connect_native.certs.CertManager`` on a ``Clock``: a scripted agent
answers the two blocking reads from a real ``DevCA``, so every Bundle is built
from real certificates, including the cross-signed intermediate of a rotation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from connect_native.certs import (
    Bundle,
    CertManager,
    CertManagerStopped,
    IBundleSource,
    LeafPermissionDenied,
    ManagerState,
    StateChange,
)
from connect_native.consul.client import ConsulPermissionDenied, ConsulUnavailable
from connect_native.consul.records import (
    CARoots,
    Indexed,
    LeafCert,
    decode_ca_roots,
    decode_leaf,
)
from connect_native.devagent.ca import DevCA
from connect_native.testing import CertificateFactory, FakeBundleSource, make_bundle
from tests.deferreds import fired as result_of
from tests.deferreds import not_fired

LEAF_TTL = 3600.0


def wall_clock() -> Clock:
    """A Clock at the wall-clock time: OpenSSL checks real validity later."""
    clock = Clock()
    clock.advance(time.time())
    return clock


class _Blocked:
    """One blocking read held by the scripted agent."""

    def __init__(self, d: Deferred[Any], answer: Callable[[], Indexed[Any]]) -> None:
        self.d = d
        self.answer = answer
        self.timer: IDelayedCall | None = None


class ScriptedAgent:
    """
    The two agent-cache reads of a Consul agent, from a DevCA, on a Clock.

    Like the real agent (REAL-BEHAVIOUR.md section 1): a read at the current
    index blocks until the value changes or ``wait`` passes; any other index
    answers at once.  A leaf is signed on its first read.  ``go_down`` fails
    every held and new read as an unreachable agent would; ``deny_leaf``
    answers 403 to leaf reads; ``hold`` keeps reads pending forever.
    """

    def __init__(self, clock: Clock, ca: DevCA) -> None:
        self.clock = clock
        self.ca = ca
        self._index = 10
        self.roots_index = 0
        self.roots: CARoots = self._publish_roots()
        self.leaves: dict[str, tuple[LeafCert, int]] = {}
        self.blocked: dict[str, list[_Blocked]] = {}
        self.down = False
        self.denied = False
        self.hold = False
        self.requests: list[tuple[str, int | None, float | None]] = []
        self.cancelled: list[str] = []

    # -- the agent's side -----------------------------------------------------

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _publish_roots(self) -> CARoots:
        self.roots_index = self._next_index()
        return decode_ca_roots(self.ca.roots().to_json())

    def publish_roots(self, roots: CARoots | None = None) -> CARoots:
        """New roots (the CA's, or ``roots``) wake the blocked roots reads."""
        published = self._publish_roots()
        self.roots = roots if roots is not None else published
        self._wake("roots")
        return self.roots

    def issue_leaf(self, service: str) -> LeafCert:
        """A new leaf for ``service`` wakes its blocked reads."""
        leaf = decode_leaf(self.ca.sign_leaf(service).to_json())
        self.leaves[service] = (leaf, self._next_index())
        self._wake("leaf " + service)
        return leaf

    def go_down(self) -> None:
        self.down = True
        for key, held in list(self.blocked.items()):
            del self.blocked[key]
            for b in held:
                if b.timer is not None and b.timer.active():
                    b.timer.cancel()
                b.d.errback(self._unavailable(key))

    def come_back(self) -> None:
        self.down = False

    # -- the client's side ----------------------------------------------------

    def agent_ca_roots(
        self, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[CARoots]]:
        self.requests.append(("roots", index, wait))
        return self._read(
            "roots", index, wait, lambda: Indexed(self.roots, self.roots_index)
        )

    def leaf(
        self, service: str, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[LeafCert]]:
        self.requests.append(("leaf " + service, index, wait))
        if self.denied and not self.down:
            return fail(
                ConsulPermissionDenied(
                    403,
                    "GET",
                    f"/v1/agent/connect/ca/leaf/{service}",
                    "Permission denied",
                    agent="127.0.0.1:8500",
                )
            )
        if service not in self.leaves and not self.down and not self.hold:
            self.issue_leaf(service)

        def answer() -> Indexed[LeafCert]:
            leaf, index = self.leaves[service]
            return Indexed(leaf, index)

        return self._read("leaf " + service, index, wait, answer)

    def _unavailable(self, key: str) -> ConsulUnavailable:
        return ConsulUnavailable(
            "GET", key, "Connection refused", agent="127.0.0.1:8500"
        )

    def _current_index(self, key: str) -> int:
        if key == "roots":
            return self.roots_index
        return self.leaves[key.removeprefix("leaf ")][1]

    def _read(
        self,
        key: str,
        index: int | None,
        wait: float | None,
        answer: Callable[[], Indexed[Any]],
    ) -> Deferred[Indexed[Any]]:
        if self.down:
            return fail(self._unavailable(key))
        if not self.hold and index != self._current_index(key):
            return succeed(answer())

        def cancel(d: Deferred[Indexed[Any]]) -> None:
            self.cancelled.append(key)
            for b in self.blocked.get(key, []):
                if b.d is d:
                    self.blocked[key].remove(b)
                    if b.timer is not None and b.timer.active():
                        b.timer.cancel()

        d: Deferred[Indexed[Any]] = Deferred(cancel)
        held = _Blocked(d, answer)
        self.blocked.setdefault(key, []).append(held)
        if wait is not None and not self.hold:
            held.timer = self.clock.callLater(wait, self._time_up, key, held)
        return d

    def _time_up(self, key: str, held: _Blocked) -> None:
        self.blocked[key].remove(held)
        held.d.callback(held.answer())

    def _wake(self, key: str) -> None:
        for b in self.blocked.pop(key, []):
            if b.timer is not None and b.timer.active():
                b.timer.cancel()
            b.d.callback(b.answer())


def make(
    service: str = "web", **options: Any
) -> tuple[Clock, DevCA, ScriptedAgent, CertManager]:
    clock = wall_clock()
    ca = DevCA(clock, leaf_ttl=LEAF_TTL)
    agent = ScriptedAgent(clock, ca)
    options.setdefault("jitter", lambda: 0.5)
    manager = CertManager(clock, agent, service, **options)
    return clock, ca, agent, manager


def pump(clock: Clock, seconds: float, step: float = 1.0) -> None:
    """Advance in steps, so that calls scheduled on the way run in time."""
    end = clock.seconds() + seconds
    while clock.seconds() + step < end:
        clock.advance(step)
    clock.advance(end - clock.seconds())


def serial(leaf: LeafCert) -> int:
    return int(leaf.serial_number.replace(":", ""), 16)


# -- becoming ready --------------------------------------------------------------


def test_provides_ibundlesource() -> None:
    _, _, _, manager = make()
    assert verifyObject(IBundleSource, manager)


def test_ready_once_roots_and_leaf_arrive() -> None:
    _clock, ca, agent, manager = make()
    ready = manager.when_ready()
    assert manager.state is ManagerState.STARTING
    assert not_fired(ready)
    assert manager.current() is None

    manager.startService()

    bundle = result_of(ready)
    assert isinstance(bundle, Bundle)
    assert manager.state is ManagerState.READY
    assert manager.current() is bundle
    assert bundle.identity.uri == (
        f"spiffe://{ca.trust_domain}/ns/default/dc/dc1/svc/web"
    )
    assert bundle.trust_domains == {ca.trust_domain}
    assert bundle.leaf.serial_number == serial(agent.leaves["web"][0])
    # Once ready, when_ready answers at once.
    assert result_of(manager.when_ready()) is bundle


def test_reads_block_with_explicit_wait_on_the_index_answered() -> None:
    clock, _, agent, manager = make(wait=120.0)
    manager.startService()
    roots_reads = [r for r in agent.requests if r[0] == "roots"]
    leaf_reads = [r for r in agent.requests if r[0] == "leaf web"]
    assert roots_reads[0] == ("roots", 0, 120.0)
    assert leaf_reads[0] == ("leaf web", 0, 120.0)
    clock.advance(1.0)
    assert ("roots", agent.roots_index, 120.0) in agent.requests
    assert ("leaf web", agent.leaves["web"][1], 120.0) in agent.requests


def test_waits_while_roots_or_leaf_are_missing() -> None:
    clock, _, agent, manager = make()
    agent.hold = True
    ready = manager.when_ready()
    manager.startService()
    clock.advance(30)
    assert not_fired(ready)
    assert manager.state is ManagerState.STARTING
    assert manager.current() is None


# -- new Bundles -----------------------------------------------------------------


def test_new_bundle_on_leaf_renewal() -> None:
    clock, _, agent, manager = make()
    manager.startService()
    first = manager.current()
    assert first is not None
    clock.advance(1.0)  # the watches now block at the current index

    renewed = agent.issue_leaf("web")

    second = manager.current()
    assert second is not None
    assert second is not first
    assert second.leaf.serial_number == serial(renewed)
    assert second.leaf.serial_number != first.leaf.serial_number
    assert manager.state is ManagerState.READY
    # Bundles are immutable: the one handed out before is unchanged.
    assert first.leaf.serial_number != second.leaf.serial_number


def test_new_bundle_on_root_rotation_then_on_the_cross_signed_leaf() -> None:
    clock, ca, agent, manager = make()
    manager.startService()
    before = manager.current()
    assert before is not None
    clock.advance(1.0)
    old_root = before.root_certificates[0]

    new_root = ca.rotate()
    agent.publish_roots()

    # The roots came first: the old leaf still chains to the old root, which
    # stays listed, so the new Bundle trusts both roots with the old leaf.
    rotated = manager.current()
    assert rotated is not None
    assert rotated is not before
    assert rotated.leaf.serial_number == before.leaf.serial_number
    new_root_cert = x509.load_pem_x509_certificate(new_root.root_cert.encode())
    assert set(rotated.root_certificates) == {old_root, new_root_cert}
    assert manager.state is ManagerState.READY

    clock.advance(1.0)
    agent.issue_leaf("web")

    renewed = manager.current()
    assert renewed is not None
    assert renewed is not rotated
    assert renewed.leaf.issuer == new_root_cert.subject
    # The leaf's chain carries the new root cross-signed by the old one, so
    # peers still on the old root alone accept it.
    assert len(renewed.chain) == 1
    assert renewed.chain[0].issuer == old_root.subject
    assert renewed.chain[0].public_key() == new_root_cert.public_key()


def test_roots_first_then_leaf_keeps_the_old_bundle_until_the_leaf_matches() -> None:
    clock, ca, agent, manager = make()
    changes: list[StateChange] = []
    manager.subscribe(changes.append)
    manager.startService()
    before = manager.current()
    assert before is not None
    clock.advance(1.0)

    # A rotation after which the agent lists only the new root: the current
    # leaf, signed by the old root, does not verify against it.
    ca.rotate()
    full = decode_ca_roots(ca.roots().to_json())
    only_new = CARoots(
        active_root_id=full.active_root_id,
        trust_domain=full.trust_domain,
        roots=tuple(r for r in full.roots if r.active),
    )
    agent.publish_roots(only_new)

    assert manager.current() is before
    assert manager.state is ManagerState.DEGRADED
    assert "does not verify" in manager.reason
    assert "keeping the certificate" in manager.reason
    assert changes[-1].state is ManagerState.DEGRADED

    clock.advance(1.0)
    agent.issue_leaf("web")

    after = manager.current()
    assert after is not None
    assert after is not before
    assert manager.state is ManagerState.READY
    assert len(after.roots) == 1
    assert after.root_certificates[0].subject == after.leaf.issuer


def test_trust_domain_swap_drops_the_old_roots() -> None:
    clock, old_ca, agent, manager = make()
    manager.startService()
    before = manager.current()
    assert before is not None
    clock.advance(1.0)

    # A development agent restarted: a new cluster, a new trust domain.
    new_ca = DevCA(clock, leaf_ttl=LEAF_TTL)
    agent.ca = new_ca
    agent.publish_roots()

    # Our leaf is from the old trust domain: keep it until the new one comes.
    assert manager.current() is before
    assert manager.state is ManagerState.DEGRADED

    clock.advance(1.0)
    agent.issue_leaf("web")

    after = manager.current()
    assert after is not None
    assert manager.state is ManagerState.READY
    assert after.trust_domains == {new_ca.trust_domain}
    assert not after.carries_trust_domain(old_ca.trust_domain)
    assert not set(after.root_certificates) & set(before.root_certificates)
    assert after.identity.trust_domain == new_ca.trust_domain


def test_a_leaf_for_another_service_is_not_used() -> None:
    _clock, ca, agent, manager = make("web")
    agent.leaves["web"] = (decode_leaf(ca.sign_leaf("api").to_json()), 99)
    manager.startService()
    assert manager.current() is None
    assert manager.state is ManagerState.STARTING
    assert "'api'" in manager.reason
    assert "'web'" in manager.reason


# -- the agent away, expiry --------------------------------------------------------


def test_agent_unreachable_degrades_and_keeps_the_last_good_bundle() -> None:
    clock, _, agent, manager = make()
    manager.startService()
    bundle = manager.current()
    clock.advance(1.0)

    agent.go_down()

    assert manager.state is ManagerState.DEGRADED
    assert "Connection refused" in manager.reason
    assert manager.current() is bundle
    pump(clock, 600)
    assert manager.current() is bundle
    assert manager.state is ManagerState.DEGRADED

    agent.come_back()
    pump(clock, 60)  # past the retry backoff (at most backoff_max)
    assert manager.state is ManagerState.READY
    assert manager.current() is bundle


def test_expired_with_the_agent_down_fails_closed() -> None:
    clock, _, agent, manager = make()
    changes: list[StateChange] = []
    manager.subscribe(changes.append)
    manager.startService()
    bundle = manager.current()
    assert bundle is not None
    clock.advance(1.0)
    agent.go_down()

    clock.advance(bundle.not_after - clock.seconds() - 1)
    assert manager.current() is bundle
    assert manager.state is ManagerState.DEGRADED

    clock.advance(1)
    assert manager.current() is None
    assert manager.state is ManagerState.EXPIRED
    assert "expired" in manager.reason
    assert changes[-1] == StateChange(
        ManagerState.EXPIRED, manager.reason, ManagerState.DEGRADED
    )
    waiter = manager.when_ready()
    assert not_fired(waiter)

    agent.come_back()
    agent.issue_leaf("web")  # the agent renews an expired leaf when asked
    pump(clock, 60)
    fresh = result_of(waiter)
    assert fresh is manager.current()
    assert fresh.not_after > clock.seconds()
    assert manager.state is ManagerState.READY


def test_current_never_returns_a_bundle_past_its_end() -> None:
    # Even before the expiry call has run.
    clock, _, _agent, manager = make()
    manager.startService()
    bundle = manager.current()
    assert bundle is not None
    clock.rightNow = bundle.not_after
    assert manager.current() is None


def test_warns_before_expiry() -> None:
    events: list[dict[str, Any]] = []
    clock, _, _agent, manager = make(expiry_warning=300.0)
    manager._log = Logger(observer=events.append)
    manager.startService()
    bundle = manager.current()
    assert bundle is not None

    def warnings() -> list[dict[str, Any]]:
        return [e for e in events if "expires at" in e["log_format"]]

    clock.advance(bundle.not_after - 300 - clock.seconds() - 1)
    assert warnings() == []
    clock.advance(1)
    [warning] = warnings()
    assert warning["log_level"].name == "warn"
    assert warning["identity"] == bundle.identity.uri
    assert manager.current() is bundle


def test_default_warning_is_a_twentieth_of_the_lifetime() -> None:
    events: list[dict[str, Any]] = []
    clock, _, _agent, manager = make()
    manager._log = Logger(observer=events.append)
    manager.startService()
    bundle = manager.current()
    assert bundle is not None
    lead = (bundle.not_after - bundle.not_before) / 20
    clock.advance(bundle.not_after - lead - clock.seconds() - 1)
    assert not [e for e in events if "expires at" in e["log_format"]]
    clock.advance(1)
    assert [e for e in events if "expires at" in e["log_format"]]


def test_renewal_cancels_the_warning() -> None:
    events: list[dict[str, Any]] = []
    clock, _, agent, manager = make(expiry_warning=300.0)
    manager._log = Logger(observer=events.append)
    manager.startService()
    first = manager.current()
    assert first is not None
    clock.advance(600.0)
    agent.issue_leaf("web")
    clock.advance(first.not_after - 300 - clock.seconds() + 1)
    assert not [e for e in events if "expires at" in e["log_format"]]


# -- permission denied -----------------------------------------------------------


def test_leaf_403_fails_when_ready_at_once_with_the_token_message() -> None:
    clock, _, agent, manager = make()
    agent.denied = True
    waiter = manager.when_ready()
    manager.startService()

    with pytest.raises(LeafPermissionDenied) as raised:
        result_of(waiter)
    message = str(raised.value)
    assert "service:write" in message
    assert "'web'" in message
    assert "token" in message
    # While it lasts, a new caller fails at once too.
    with pytest.raises(LeafPermissionDenied):
        result_of(manager.when_ready())
    assert manager.state is ManagerState.STARTING
    assert "service:write" in manager.reason

    # The watch keeps retrying with backoff, and recovers.
    reads = len([r for r in agent.requests if r[0] == "leaf web"])
    clock.advance(5)
    assert len([r for r in agent.requests if r[0] == "leaf web"]) > reads
    agent.denied = False
    pump(clock, 60)
    assert manager.state is ManagerState.READY
    assert result_of(manager.when_ready()) is manager.current()


def test_leaf_403_after_ready_degrades_and_keeps_the_bundle() -> None:
    clock, _, agent, manager = make()
    manager.startService()
    bundle = manager.current()
    clock.advance(1.0)
    agent.denied = True
    agent.issue_leaf("web")  # wakes the blocked read; the next one is denied
    clock.advance(2.0)
    assert manager.state is ManagerState.DEGRADED
    assert "service:write" in manager.reason
    current = manager.current()
    assert current is not None
    assert current is not bundle
    assert result_of(manager.when_ready()) is current


# -- stopping, cancelling, observing ---------------------------------------------


def test_stop_cancels_watches_and_waiters() -> None:
    clock, _, agent, manager = make()
    agent.hold = True
    waiter = manager.when_ready()
    manager.startService()
    assert {"roots", "leaf web"} <= set(agent.blocked)

    manager.stopService()

    assert sorted(agent.cancelled) == ["leaf web", "roots"]
    with pytest.raises(CertManagerStopped):
        result_of(waiter)
    with pytest.raises(CertManagerStopped):
        result_of(manager.when_ready())
    assert manager.state is ManagerState.STOPPED
    assert clock.getDelayedCalls() == []


def test_stop_after_ready_cancels_timers_and_stops_serving() -> None:
    clock, _, _agent, manager = make()
    manager.startService()
    assert manager.current() is not None
    clock.advance(1.0)
    manager.stopService()
    assert manager.current() is None
    assert manager.state is ManagerState.STOPPED
    # Held reads cancelled, expiry timers gone: nothing is left to run.
    assert [c for c in clock.getDelayedCalls() if c.active()] == []


def test_restart_after_stop_serves_again() -> None:
    clock, _, agent, manager = make()
    manager.startService()
    bundle = manager.current()
    clock.advance(1.0)
    agent.go_down()
    manager.stopService()
    agent.come_back()
    manager.startService()
    assert manager.state is ManagerState.READY
    assert manager.current() is bundle


def test_a_cancelled_waiter_is_dropped() -> None:
    clock, _, agent, manager = make()
    agent.hold = True
    manager.startService()
    waiter = manager.when_ready()
    other = manager.when_ready()
    waiter.cancel()
    failures: list[Failure] = []
    waiter.addErrback(failures.append)
    assert failures
    assert failures[0].check(CancelledError)

    # The held reads time out, the retries are answered: only the other
    # waiter fires (firing the cancelled one again would raise).
    agent.hold = False
    pump(clock, 400)
    assert manager.state is ManagerState.READY
    assert result_of(other) is manager.current()


def test_subscribers_see_each_change_until_they_unsubscribe() -> None:
    clock, _, agent, manager = make()
    seen: list[StateChange] = []
    unsubscribe = manager.subscribe(seen.append)
    manager.subscribe(lambda change: 1 / 0)  # a broken subscriber is ignored
    manager.startService()
    assert [c.state for c in seen] == [ManagerState.READY]
    assert seen[0].previous is ManagerState.STARTING
    clock.advance(1.0)
    agent.go_down()
    assert [c.state for c in seen][-1] is ManagerState.DEGRADED
    unsubscribe()
    count = len(seen)
    agent.come_back()
    pump(clock, 60)
    assert manager.state is ManagerState.READY
    assert len(seen) == count


@pytest.mark.parametrize(
    ("argument", "value"),
    [("service", ""), ("expiry_warning", -1.0), ("expiry_warning", float("nan"))],
)
def test_bad_arguments_are_refused_by_name(argument: str, value: object) -> None:
    clock = wall_clock()
    agent = ScriptedAgent(clock, DevCA(clock))
    kwargs: dict[str, Any] = {"service": "web", argument: value}
    with pytest.raises(ValueError, match=argument):
        CertManager(clock, agent, **kwargs)


# -- the fake in connect_native.testing ----------------------------------------


def test_fake_bundle_source_is_driven_by_the_test() -> None:
    factory = CertificateFactory()
    bundle = make_bundle(factory, "web")
    assert bundle.identity.service == "web"
    assert bundle.trust_domains == {factory.trust_domain}

    source = FakeBundleSource()
    assert verifyObject(IBundleSource, source)
    assert source.current() is None
    waiter = source.when_ready()
    cancelled = source.when_ready()
    cancelled.cancel()
    cancelled.addErrback(lambda f: None)
    assert not_fired(waiter)
    source.set(bundle)
    assert result_of(waiter) is bundle
    assert source.current() is bundle
    assert source.current_calls == 2

    source.set(None)
    failing = source.when_ready()
    source.fail(LeafPermissionDenied("web", "Permission denied"))
    with pytest.raises(LeafPermissionDenied):
        result_of(failing)


def test_the_403_message_tells_an_unknown_token_from_a_missing_permission() -> None:
    unknown = str(LeafPermissionDenied("web", "ACL not found"))
    assert "does not know the ACL token" in unknown
    assert "lacks service:write" not in unknown
    lacking = str(LeafPermissionDenied("web", "Permission denied"))
    assert "lacks service:write on 'web'" in lacking
    # Both say what happens: nothing is served until the token allows it.
    for message in (unknown, lacking):
        assert "nothing is served" in message
        assert 'service "web" { policy = "write" }' in message
        assert "\n" not in message
