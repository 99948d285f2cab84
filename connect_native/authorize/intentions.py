"""
:class:`IntentionAuthorizer`: the intentions of our service kept cached out
of band and decided locally, per connection (L4) and per HTTP request (L7).

The intentions come from ``/v1/connect/intentions/match?by=destination``,
which sends no ``X-Consul-Index``.  By default each read first asks
``/v1/connect/intentions`` (which has an index) and blocks on it, then
reads the match; an intention write anywhere wakes it, so changes arrive
within a round trip.  ``blocking=False`` polls the match every
``poll_interval`` seconds instead.  Consul 1.9+ returns the L7
``Permissions`` of config-entry intentions in the match answer itself
(``ServiceIntentionsConfigEntry.ToIntention`` copies them), so no separate
read of the ``service-intentions`` config entry is needed; 1.8.7 has none.

The decision rules are those of :mod:`connect_native.authorize.rules`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from connect_native import _logging
from connect_native._checks import positive_seconds, seconds_or_zero
from connect_native._deferreds import Waiters
from connect_native.authorize import (
    MAX_REMEMBERED,
    AgentAuthorizer,
    ChangeListeners,
    Decision,
    IAuthorizer,
    INotifiesChanges,
    Peer,
    remember_bounded,
)
from connect_native.authorize.rules import (
    DEFAULT_SOURCE,
    CompiledIntentions,
    HeadersLike,
    HTTPRequest,
    IntentionDefault,
    compile_intentions,
    decide_connection,
    decide_http,
)
from connect_native.consul.blocking import Watch
from connect_native.consul.records import AuthorizeResult, Indexed, Intention
from connect_native.identity import ServiceIdentity

__all__ = ["IntentionAuthorizer", "IntentionsClient"]

log = Logger(observer=_logging.observer)


class IntentionsClient(Protocol):
    """What :class:`IntentionAuthorizer` needs of the Consul client."""

    def authorize(
        self, target: str, client_cert_uri: str, client_cert_serial: str
    ) -> Deferred[AuthorizeResult]: ...

    def intentions_match(
        self,
        by: Literal["source", "destination"],
        name: str,
        index: int | None = None,
        wait: float | None = None,
    ) -> Deferred[Indexed[Mapping[str, tuple[Intention, ...]]]]: ...

    def intentions_list(
        self, index: int | None = None, wait: float | None = None
    ) -> Deferred[Indexed[tuple[Intention, ...]]]: ...


def _seconds(name: str, value: float, *, allow_zero: bool = False) -> float:
    """
    The shared :func:`positive_seconds` check, naming this authorizer, with
    0 allowed where it means "never reuse" (``max_staleness``,
    ``agent_cache_ttl``).
    """
    what = f"IntentionAuthorizer {name}"
    if allow_zero:
        return seconds_or_zero(what, value)
    return positive_seconds(what, value)


def _identity(peer: Peer | ServiceIdentity) -> ServiceIdentity:
    return peer.identity if isinstance(peer, Peer) else peer


def _source_key(identity: ServiceIdentity) -> tuple[str, str, str]:
    return (identity.partition or "default", identity.namespace, identity.service)


@implementer(IAuthorizer, INotifiesChanges)
class IntentionAuthorizer(Service):
    """
    Decide from cached intentions for the destination ``service``.

    It tells its subscribers (:class:`~connect_native.authorize.INotifiesChanges`)
    each time the cached intentions change, once the new ones decide.  A
    blocking read that answers with a new index is followed by the next at
    once, so a write made just after another is seen within a round trip.

    :param client: a :class:`~connect_native.consul.client.ConsulClient` (or
        anything with ``intentions_match``, ``intentions_list`` and
        ``authorize``).
    :param clock: schedules reads, timeouts and staleness.
    :param service: our service name; only connections to it are decided.
    :param default: what decides when no intention matches: ``"deny"``,
        ``"allow"``, or ``"agent"`` (ask ``/v1/agent/connect/authorize``
        once per source service and remember the answer for
        ``agent_cache_ttl`` seconds; an L7 request that no permission
        matches is denied in this mode, since the agent's answer for a source
        with an L7 intention is always a denial).
    :param max_staleness: after the agent stops answering, keep deciding
        from the last intentions for this many seconds after the last
        successful read, then fail closed.
    :param poll_interval: seconds between reads when not blocking.
    :param blocking: block on the intentions list's index (default) instead
        of polling.
    :param wait: how long the agent may hold each blocking read.
    :param timeout: bound on waiting for the cache (cold or stale) in
        :meth:`authorize`, and on each agent authorize call.
    :param agent_cache_ttl: see ``default="agent"``.
    :param namespace, partition: our service's (``default`` when ``None``).
    """

    def __init__(
        self,
        client: IntentionsClient,
        clock: IReactorTime,
        service: str,
        *,
        default: IntentionDefault = "deny",
        max_staleness: float = 300.0,
        poll_interval: float = 10.0,
        blocking: bool = True,
        wait: float = 60.0,
        timeout: float = 5.0,
        agent_cache_ttl: float = 30.0,
        namespace: str = "default",
        partition: str | None = None,
    ) -> None:
        if default not in ("deny", "allow", "agent"):
            raise ValueError(
                f"IntentionAuthorizer default must be 'deny', 'allow' or 'agent', "
                f"got {default!r}"
            )
        if not isinstance(service, str) or not service or service == "*":
            raise ValueError(
                f"IntentionAuthorizer service must be a service name, got {service!r}"
            )
        self._client = client
        self._clock = clock
        self.service = service
        self.namespace = namespace
        self.partition = partition
        self.default: IntentionDefault = default
        self.max_staleness = _seconds("max_staleness", max_staleness, allow_zero=True)
        self.poll_interval = _seconds("poll_interval", poll_interval)
        self.timeout = _seconds("timeout", timeout)
        self.agent_cache_ttl = _seconds(
            "agent_cache_ttl", agent_cache_ttl, allow_zero=True
        )
        self._blocking = blocking
        # AuthorizeCall's structural result type is what AuthorizeResult
        # provides; Deferred's invariance alone keeps mypy from seeing it.
        self._agent = AgentAuthorizer(
            client, clock, timeout=self.timeout, cache_ttl=0, watch_intentions=False
        )
        self._listeners = ChangeListeners()
        self._agent_answers: dict[tuple[str, str, str], tuple[float, Decision]] = {}
        self.max_remembered = MAX_REMEMBERED
        self._table: CompiledIntentions | None = None
        self._held: tuple[Intention, ...] | None = None
        self._last_success: float | None = None
        self._failing = False
        self._waiters: Waiters[None] = Waiters()
        self._watch: Watch[tuple[Intention, ...]] = Watch(
            clock,
            self._fetch,
            lambda intentions: None,
            name=f"intentions for {service}",
            wait=_seconds("wait", wait),
            poll_interval=self.poll_interval,
            on_error=self._errored,
            wake_on_change=True,
        )

    # -- the cache ------------------------------------------------------------

    @property
    def intentions(self) -> tuple[Intention, ...] | None:
        """The cached intentions for our service by precedence, or ``None``."""
        return None if self._table is None else self._table.ordered

    @property
    def cache_age(self) -> float | None:
        """
        Seconds since the intentions were last read from the agent, or
        ``None`` before the first read (with a blocking watch the agent
        holds the next read until they change: :attr:`fresh` says whether
        they are current).
        """
        if self._last_success is None:
            return None
        return max(0.0, self._clock.seconds() - self._last_success)

    @property
    def fresh(self) -> bool:
        """``True`` when decisions come from the cache without waiting."""
        if self._table is None or self._last_success is None:
            return False
        if not self._failing:
            # A read held by the agent (blocking) or a poll not yet due:
            # the intentions are current as far as anyone can tell.
            return bool(self.running)
        return self._clock.seconds() - self._last_success <= self.max_staleness

    def startService(self) -> None:
        if self.running:
            return
        super().startService()  # type: ignore[no-untyped-call]
        self._watch.start()

    def stopService(self) -> None:
        if not self.running:
            return
        super().stopService()  # type: ignore[no-untyped-call]
        self._watch.stop()
        self._wake()

    start = startService

    def stop(self) -> None:
        self.stopService()

    def _fetch(
        self, index: int, wait: float
    ) -> Deferred[Indexed[tuple[Intention, ...]]]:
        match = self._client.intentions_match
        name = self.service

        def matched(
            answer: Indexed[Mapping[str, tuple[Intention, ...]]], index: int | None
        ) -> Indexed[tuple[Intention, ...]]:
            # A name with no intention may come back missing or empty.
            intentions = tuple(answer.value.get(name, ()))
            self._store(intentions)
            return Indexed(value=intentions, index=index)

        if not self._blocking:
            return match("destination", name).addCallback(matched, None)

        def listed(
            answer: Indexed[tuple[Intention, ...]],
        ) -> Deferred[Indexed[tuple[Intention, ...]]]:
            # List first, then match: the match is at least as new as the
            # index we block on next, so no change can fall between the two.
            return match("destination", name).addCallback(matched, answer.index)

        if index == 0:
            d = self._client.intentions_list()
        else:
            d = self._client.intentions_list(index=index, wait=wait)
        return d.addCallback(listed)

    def _store(self, intentions: tuple[Intention, ...]) -> None:
        # Stored here rather than in the Watch's on_change: an unchanged
        # answer also proves the cache current and must wake waiters, and
        # the table must be in place before they wake.
        changed = self._held != intentions
        first = self._table is None
        if changed:
            self._held = intentions
            self._changed(intentions)
        self._succeeded()
        if changed and not first:
            # After _succeeded: what the subscribers ask now is fresh.
            self._listeners.notify()

    def subscribe(self, callback: Callable[[], object]) -> Callable[[], None]:
        return self._listeners.subscribe(callback)

    def _changed(self, intentions: tuple[Intention, ...]) -> None:
        self._table = compile_intentions(
            intentions, self.service, self.namespace, self.partition
        )
        self._agent_answers.clear()
        for reason in self._table.invalid.values():
            log.warn(
                "intentions for {service}: {reason}",
                service=self.service,
                reason=reason,
            )
        log.info(
            "intentions for {service}: {count} cached",
            service=self.service,
            count=len(self._table.ordered),
        )

    def _succeeded(self) -> None:
        self._last_success = self._clock.seconds()
        self._failing = False
        self._wake()

    def _errored(self, failure: Failure) -> None:
        self._failing = True

    def _wake(self) -> None:
        self._waiters.fire(None)

    # -- deciding ---------------------------------------------------------------

    def _default_allows(self) -> bool | None:
        return {"allow": True, "deny": False}.get(self.default)

    def _remembered(
        self, identity: ServiceIdentity, *, within: float
    ) -> Decision | None:
        remembered = self._agent_answers.get(_source_key(identity))
        if remembered is None:
            return None
        at, decision = remembered
        if self._clock.seconds() - at > within:
            return None
        return decision

    def _wrong_target(self, target: str) -> Decision | None:
        if target == self.service:
            return None
        return Decision.deny(
            f"this IntentionAuthorizer holds the intentions of {self.service!r}, "
            f"not {target!r}"
        )

    def decide_now(self, peer: Peer, target: str) -> Decision | None:
        try:
            wrong = self._wrong_target(target)
            if wrong is not None:
                return wrong
            if not self.fresh or self._table is None:
                return None
            decision = decide_connection(
                self._table, peer.identity, self._default_allows()
            )
            if decision is None:
                return self._remembered(peer.identity, within=self.agent_cache_ttl)
            return decision
        except Exception:
            # Inside the TLS verify callback: never raise; the gate asks again.
            log.failure("deciding {peer} from cached intentions failed", peer=peer.uri)
            return None

    def authorize(self, peer: Peer, target: str) -> Deferred[Decision]:
        known = self.decide_now(peer, target)
        if known is not None:
            return succeed(known)
        if self.fresh:
            return self._ask_agent(peer, target)
        return self._when_fresh().addCallback(lambda _: self._after_wait(peer, target))

    def _after_wait(self, peer: Peer, target: str) -> Deferred[Decision] | Decision:
        if not self.fresh:
            if self._table is None:
                why = "no intentions have been read from the agent yet"
            else:
                why = (
                    "the cached intentions are older than max_staleness "
                    f"({self.max_staleness:g}s) and the agent does not answer"
                )
            if not self.running:
                why = "the intention authorizer is stopped"
            return Decision.deny(
                f"cannot decide for {peer.uri} within {self.timeout:g}s: {why}"
            )
        known = self.decide_now(peer, target)
        if known is not None:
            return known
        return self._ask_agent(peer, target)

    def _when_fresh(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        waiter = self._waiters.wait()
        timer: IDelayedCall = self._clock.callLater(self.timeout, self._expire, waiter)

        def settle(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return waiter.addBoth(settle)

    def _expire(self, waiter: Deferred[None]) -> None:
        # Past the timeout the caller decides with what it has.
        self._waiters.discard(waiter)
        if not waiter.called:
            waiter.callback(None)

    def _ask_agent(self, peer: Peer, target: str) -> Deferred[Decision]:
        key = _source_key(peer.identity)

        def remember(decision: Decision) -> Decision:
            if decision.source == "agent":
                # Bounded: a source is any service the CA issues to, and
                # entries are only dropped wholesale when intentions change.
                remember_bounded(
                    self._agent_answers,
                    key,
                    (self._clock.seconds(), decision),
                    self.max_remembered,
                )
            return decision

        return self._agent.authorize(peer, target).addCallback(remember)

    def decide_request(
        self,
        peer: Peer | ServiceIdentity,
        method: str | bytes,
        path: str | bytes,
        headers: HeadersLike,
    ) -> Decision:
        """
        The L7 decision for one HTTP request on a connection from ``peer``.
        Never raises, never waits: a cold or stale cache denies; with
        ``default="agent"`` a source that no intention matches is decided by
        the agent's last answer for it (asked again in the background once
        ``agent_cache_ttl`` has passed, kept for up to ``max_staleness``).
        """
        identity = _identity(peer)
        try:
            if not self.fresh or self._table is None:
                return Decision.deny(
                    f"no current intentions for {self.service!r} to decide "
                    f"{identity.uri}'s request by"
                )
            request = HTTPRequest.of(method, path, headers)
            decision = decide_http(
                self._table, identity, request, self._default_allows()
            )
            if decision is not None:
                return decision
            if self._table.first_match(identity) is not None:
                return Decision(
                    False,
                    "No permission of the matching L7 intention matches "
                    f"{request.method} {request.url_path}, and default='agent' "
                    "cannot tell what the default allows",
                    DEFAULT_SOURCE,
                )
            return self._agent_default(peer, identity)
        except Exception as e:
            log.failure("deciding a request from {peer} failed", peer=identity.uri)
            return Decision.deny(f"deciding the request failed: {e}")

    def _agent_default(
        self, peer: Peer | ServiceIdentity, identity: ServiceIdentity
    ) -> Decision:
        if self._remembered(identity, within=self.agent_cache_ttl) is None:
            # Refresh in the background; a Peer carries the serial the agent
            # takes, a bare identity sends an empty one (1.8.7 ignores it).
            as_peer = peer if isinstance(peer, Peer) else Peer(identity, "")
            self._ask_agent(as_peer, self.service)
        decision = self._remembered(identity, within=self.max_staleness)
        if decision is None:
            return Decision.deny(
                f"no intention matches {identity.uri} and the agent has not "
                "answered for it yet"
            )
        return decision
